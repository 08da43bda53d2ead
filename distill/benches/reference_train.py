"""PyTorch / transformers reference for `distill bench train`.

Builds the same architecture with random weights from a student config (TOML) or a
config.json and times full training steps on one row of `--seq-len` tokens: forward, loss
over every token, backward, global norm clipping at 1.0 and a torch.optim.AdamW step (lr
1e-4), as `distill bench train` does. Runs on CUDA when available, else the CPU with
`--threads` threads. Prints one JSON line: {"tokens_per_s": ..., "peak_memory_bytes": ...},
where the peak is torch.cuda.max_memory_allocated on a GPU, else the process's peak RSS.

    distill bench train --device flex \\
        --reference ".venv/bin/python distill/benches/reference_train.py --threads 2"
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, __import__("os").path.dirname(__file__))
from reference_forward import load_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="autocast to bf16 over f32 weights")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="fail cleanly (an allocation error) instead of being killed past this much memory")
    args = parser.parse_args()
    if args.memory_limit_gib:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = load_config(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-8, weight_decay=0.0)
    ids = torch.tensor([[(i * 7919) % config.vocab_size for i in range(args.seq_len)]], device=device)
    times = []
    for step in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tokens_per_s": args.seq_len / statistics.median(times), "peak_memory_bytes": peak}))


if __name__ == "__main__":
    main()
