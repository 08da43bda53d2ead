#!/usr/bin/env bash
# The README's training benchmark: bench-100m and a SmolLM2-135M-shaped model at 1024 to 16384
# tokens, without and with gradient checkpointing, each length beside PyTorch in the same run
# (one timed step after one warm-up step; both sides on the same cores).
#
#   distill/benches/train_table.sh > train_table.log
#
# DISTILL and PYTHON name the binary and the interpreter with torch and transformers; CONFIGS,
# MODES ("plain", "checkpointing") and LENGTHS narrow the table; WARMUP and STEPS set the warm-up
# and timed steps (more timed steps steady the short lengths, where one step takes seconds).
set -uo pipefail
cd "$(dirname "$0")/../.."
DISTILL=${DISTILL:-${CARGO_TARGET_DIR:-target}/release/distill}
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-$(nproc)}
CONFIGS=${CONFIGS:-student_configs/bench-100m.toml student_configs/bench-smollm2-135m.toml}
MODES=${MODES:-plain checkpointing}
LENGTHS=${LENGTHS:-1024,4096,8192,16384}
WARMUP=${WARMUP:-1}
STEPS=${STEPS:-1}
# PyTorch fails with an allocation error past this, instead of the kernel killing it.
LIMIT=$(awk '/MemTotal/ {printf "%.1f", $2 / 1048576 - 1.5}' /proc/meminfo)
for config in $CONFIGS; do
    for mode in $MODES; do
        flag=""
        [ "$mode" = checkpointing ] && flag="--gradient-checkpointing"
        echo "== $config $mode"
        "$DISTILL" bench train --device flex --config "$config" --seq-len "$LENGTHS" \
            --steps "$STEPS" --warmup-steps "$WARMUP" $flag \
            --reference "$PYTHON distill/benches/reference_train.py --threads $THREADS --memory-limit-gib $LIMIT" \
            || echo "($config $mode: exit $?)"
    done
done
