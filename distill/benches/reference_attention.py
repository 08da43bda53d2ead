"""PyTorch reference for `distill bench attention`.

Times torch.nn.functional.scaled_dot_product_attention (causal, one row) forward and backward
at the given shape, on CUDA when PyTorch has it (as reference_train.py does) and otherwise on the
CPU with `--threads` threads, per sequence length: the median of
`--repeats` after one warm-up (the higher middle value of an even count, as distill takes it). K and V are repeated over the query groups first, as
transformers' SDPA attention does for GQA (outside the timed forward). Prints one JSON line:
{"forward_s": [...], "backward_s": [...]}, one entry per length.

    distill bench attention --device flex \\
        --reference ".venv/bin/python distill/benches/reference_attention.py --threads 2"
"""

import argparse
import json
import statistics
import time

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, required=True)
    parser.add_argument("--kv-heads", type=int, required=True)
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--seq-len", required=True, help="comma-separated lengths")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def now():
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    group = args.heads // args.kv_heads
    forward_s, backward_s = [], []
    for seq in (int(s) for s in args.seq_len.split(",")):
        forward, backward = [], []
        for repeat in range(args.repeats + 1):
            shape = lambda heads: (1, heads, seq, args.head_dim)
            q = torch.randn(shape(args.heads), dtype=dtype, device=device, requires_grad=True)
            k = torch.randn(shape(args.kv_heads), dtype=dtype, device=device, requires_grad=True)
            v = torch.randn(shape(args.kv_heads), dtype=dtype, device=device, requires_grad=True)
            upstream = torch.randn(shape(args.heads), dtype=dtype, device=device)
            keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            started = now()
            output = torch.nn.functional.scaled_dot_product_attention(q, keys, values, is_causal=True)
            middle = now()
            output.backward(upstream)
            ended = now()
            if repeat > 0:
                forward.append(middle - started)
                backward.append(ended - middle)
        forward_s.append(statistics.median_high(forward))
        backward_s.append(statistics.median_high(backward))
    print(json.dumps({"forward_s": forward_s, "backward_s": backward_s}))


if __name__ == "__main__":
    main()
