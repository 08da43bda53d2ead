"""PyTorch / transformers reference for `distill bench forward`.

Builds the same architecture with random weights from a student config (TOML) or a
config.json, then times prefill of `--prompt-len` tokens and greedy decode of
`--decode-tokens` tokens with the KV cache, on the CPU with `--threads` threads. Prints one
JSON line: {"prefill_tokens_per_s": ..., "decode_tokens_per_s": ...}.

    distill bench forward --device flex \
        --reference ".venv/bin/python distill/benches/reference_forward.py --threads 2"
"""

import argparse
import json
import statistics
import time
import tomllib

import torch
from transformers import AutoConfig, LlamaConfig, Qwen2Config
from transformers import AutoModelForCausalLM


def load_config(path):
    if path.endswith(".toml"):
        with open(path, "rb") as f:
            model = tomllib.load(f)["model"]
        arch = model["architectures"][0]
        cls = Qwen2Config if arch == "Qwen2ForCausalLM" else LlamaConfig
        return cls(**{k: v for k, v in model.items() if k != "architectures"}, architectures=[arch])
    return AutoConfig.from_pretrained(path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prompt = torch.tensor([[(i * 7919) % config.vocab_size for i in range(args.prompt_len)]])
    prefill, decode = [], []
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            start = time.perf_counter()
            out = model(prompt, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            past = out.past_key_values
            t_prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.decode_tokens):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            t_decode = time.perf_counter() - start
            if repeat > 0:
                prefill.append(t_prefill)
                decode.append(t_decode)
    print(json.dumps({
        "prefill_tokens_per_s": args.prompt_len / statistics.median(prefill),
        "decode_tokens_per_s": args.decode_tokens / statistics.median(decode),
    }))


if __name__ == "__main__":
    main()
