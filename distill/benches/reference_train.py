"""PyTorch / transformers reference for `distill bench train`.

Builds the same architecture with random weights from a student config (TOML) or a
config.json and times full training steps on `--batch-size` rows of `--seq-len` tokens: forward, loss
over every token, backward, global norm clipping at 1.0 and a torch.optim.AdamW step (lr
1e-4), as `distill bench train` does. Runs on CUDA when available, else the CPU with
`--threads` threads. Prints one JSON line: {"tokens_per_s": ..., "peak_memory_bytes": ...},
where the peak is, on a GPU, what the caching allocator reserved at most
(torch.cuda.max_memory_reserved, as burn's figure there is its pools' reservation; the
tensors' own peak, max_memory_allocated, is printed beside it as "peak_allocated_bytes"),
else the process's peak RSS.

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


def linux_child_policy():
    """If memory runs out anyway, the kernel kills this process rather than the benchmark that
    started it; and this process ends with its parent instead of running on, orphaned, beside
    the next measurement."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
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
    linux_child_policy()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = load_config(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-8, weight_decay=0.0)
    row = [(i * 7919) % config.vocab_size for i in range(args.seq_len)]
    ids = torch.tensor([row] * args.batch_size, device=device)
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
    result = {"tokens_per_s": args.batch_size * args.seq_len / statistics.median(times)}
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_reserved()
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()
