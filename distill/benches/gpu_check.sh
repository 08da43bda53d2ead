#!/usr/bin/env bash
# The GPU checks of the trainer in one run, on a machine with an NVIDIA GPU, its Vulkan driver
# and python3 with torch and transformers (no Rust, no network needed):
#   1. the attention exactness test (outputs, dQ, dK, dV against dense attention) on wgpu
#      (WGSL kernels over Vulkan) and on vulkan (SPIR-V kernels, bf16 too where it computes it),
#      and the model parity tests (logits, NLL, greedy decoding against transformers);
#   2. a 1.5B student's shape (Qwen2.5-Math-1.5B, random weights) fully fine-tuned with
#      gradient checkpointing at 4096 and 16384 tokens, beside PyTorch on CUDA: tokens/s, peak
#      memory against the plan, MFU; in bf16 on vulkan where that works, else f32 on wgpu;
#   3. QLoRA (4-bit base, LoRA rank 16) of a 14B shape (Qwen2.5-14B) at 4096 tokens (refused on
#      wgpu, which cannot bind its 2.9 GiB f32 embeddings: give a CUDA build and STUDENT_DEVICE);
#   4. `bench train` on bench-100m beside PyTorch (f32, checkpointing).
# The parts run in that order, each under its own time limit, and all of them within DEADLINE
# seconds (default 570): a part that would start too late is skipped and says so, and a part
# that fails does not stop the next. Everything goes to OUT_DIR/gpu.log. PARTS chooses some of
# them (default "exact student qlora bench100m parity"; "attention" adds the attention
# operation alone beside SDPA on CUDA); LENGTHS the lengths of the student and bench-100m runs
# (default 4096,16384), STEPS their timed steps (default 2).
#
#   distill/benches/gpu_check.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds `distill` and the test binaries `attention` and `parity` of the default build
# (flex, wgpu with WGSL kernels), and the same three with `-vulkan` appended from a build with
# `--features vulkan` (in that build a Vulkan adapter runs SPIR-V kernels, under `--device
# wgpu` too). README's "GPU runs" says how they are built and carried. PEAK_F32 and PEAK_BF16
# are the device's dense peak rates in TFLOP/s for the MFU (an H100/H200's by default).
# STUDENT_DEVICE=cuda (with `distill` built with `--features cuda`) trains the students there in
# bf16 instead.
set -u
bin=$(cd "$1" && pwd)
out=$2
deadline=${DEADLINE:-570}
parts=" ${PARTS:-exact student qlora bench100m parity} "
lengths=${LENGTHS:-4096,16384}
steps=${STEPS:-2}
peak_f32=${PEAK_F32:-67}
peak_bf16=${PEAK_BF16:-989}
mkdir -p "$out"
log="$out/gpu.log"
reference="python3 distill/benches/reference_train.py"

say() { echo "$*" | tee -a "$log"; }

# part NAME SECONDS COMMAND...: runs the command under the smaller of its limit and the time
# left, its output into the log; its exit status is left in $rc.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS - 5))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        say "== $name: skipped, ${left}s left"
        rc=skipped
        return
    fi
    say "== $name (at ${SECONDS}s, limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    say "== $name: exit $rc after $((SECONDS - start))s"
}

# The test binaries find the fixtures at the repository path they were built in.
built_root=${BUILT_ROOT:-/work/main}
[ -e "$built_root" ] || { mkdir -p "$(dirname "$built_root")" && ln -s "$PWD" "$built_root"; }
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi

part env 30 sh -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; python3 -c "import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())"'

wanted() { [[ $parts == *" $1 "* ]]; }

wanted exact && part "attention exactness (flex, wgpu)" 90 "$bin/attention" --test-threads 1 --nocapture
wanted exact && part "attention exactness (vulkan)" 90 env DISTILL_TEST_DEVICES=vulkan "$bin/attention-vulkan" --test-threads 1 --nocapture on_the_devices_named
vulkan_bf16=no
if wanted exact && [ "$rc" = 0 ] && grep -q "^vulkan bf16: output relative error" "$log"; then vulkan_bf16=yes; fi

wanted parity && part "parity (flex, wgpu)" 90 "$bin/parity" --test-threads 1 --nocapture --skip _command_ --skip parquet_rows
wanted parity && [ -x "$bin/parity-vulkan" ] && part "parity (vulkan)" 90 env DISTILL_TEST_DEVICES=vulkan DISTILL_TEST_SKIP_WGPU=1 "$bin/parity-vulkan" --test-threads 1 --nocapture --skip _command_ --skip parquet_rows

student() {
    wanted student || return
    part "Qwen2.5-Math-1.5B full fine-tuning, $1" 240 "${@:2}" --config student_configs/qwen2.5-math-1.5b.toml \
        --seq-len "$lengths" --steps "$steps" --warmup-steps 1 --gradient-checkpointing --reference "$reference"
}
qlora() {
    wanted qlora || return
    part "Qwen2.5-14B QLoRA, $1" 200 "${@:2}" --config student_configs/qwen2.5-14b.toml \
        --lora-rank 16 --load-in-4bit --gradient-checkpointing --seq-len 4096 --steps 1 --warmup-steps 1
}
wgpu_f32=("$bin/distill" bench train --device wgpu --peak-tflops "$peak_f32")
vulkan_bf16_cmd=("$bin/distill-vulkan" bench train --device vulkan --bf16 --peak-tflops "$peak_bf16")
if [ -n "${STUDENT_DEVICE:-}" ]; then
    named=("$bin/distill" bench train --device "$STUDENT_DEVICE" --bf16 --peak-tflops "$peak_bf16")
    student "$STUDENT_DEVICE bf16" "${named[@]}"
    qlora "$STUDENT_DEVICE bf16" "${named[@]}"
elif [ "$vulkan_bf16" = yes ]; then
    student "vulkan bf16" "${vulkan_bf16_cmd[@]}"
    if wanted student && [ "$rc" != 0 ]; then student "wgpu f32" "${wgpu_f32[@]}"; fi
    qlora "vulkan bf16" "${vulkan_bf16_cmd[@]}"
    if wanted qlora && [ "$rc" != 0 ]; then qlora "wgpu f32" "${wgpu_f32[@]}"; fi
else
    wanted exact && say "vulkan bf16 is not available here: the students run in f32 on wgpu"
    student "wgpu f32" "${wgpu_f32[@]}"
    qlora "wgpu f32" "${wgpu_f32[@]}"
fi

wanted bench100m && part "bench-100m, wgpu f32, checkpointing" 150 "${wgpu_f32[@]}" --config student_configs/bench-100m.toml \
    --seq-len "$lengths" --steps "$steps" --warmup-steps 1 --gradient-checkpointing --reference "$reference"

wanted attention && part "attention alone, wgpu f32, beside SDPA on CUDA" 120 "$bin/distill" bench attention --device wgpu \
    --seq-len "$lengths" --reference "python3 distill/benches/reference_attention.py"

nvidia-smi --query-gpu=memory.used,memory.total --format=csv >>"$log" 2>&1
say "== done at ${SECONDS}s"
