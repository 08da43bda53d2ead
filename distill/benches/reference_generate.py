"""PyTorch / transformers reference for `distill bench generate`.

Builds the same architecture with random weights, left-pads the same prompts as the Rust side
(`bench_prompts` in distill/src/main.rs) into one batch and times transformers' `generate`
(greedy, `--new-tokens` for every row, no EOS stop) on the CPU with `--threads` threads.
Prints one JSON line: {"tokens_per_s": ...}.

    distill bench generate --device flex \
        --reference ".venv/bin/python distill/benches/reference_generate.py --threads 2"
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

from reference_forward import load_config


def prompts(batch_size, prompt_len, vocab):
    rows = []
    for row in range(batch_size):
        length = max(prompt_len // 2 + row * ((prompt_len + 1) // 2) // max(batch_size, 1), 1)
        rows.append([((row * 131 + i) * 7919) % vocab for i in range(length)])
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    rows = prompts(args.batch_size, args.prompt_len, config.vocab_size)
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    generate = lambda new_tokens: model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
    )
    with torch.inference_mode():
        generate(2)
        start = time.perf_counter()
        output = generate(args.new_tokens)
        elapsed = time.perf_counter() - start
    assert output.shape[1] == width + args.new_tokens
    print(json.dumps({"tokens_per_s": len(rows) * args.new_tokens / elapsed}))


if __name__ == "__main__":
    main()
