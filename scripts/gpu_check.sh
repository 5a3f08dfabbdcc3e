#!/usr/bin/env bash
# GPU check, run from the repository root on the GPU machine (no network; torch/triton/transformers there):
#   1. editable install of dga_hf (no deps, no build isolation);
#   2. the prefill attention benchmark (presets default, expand, paper against SDPA-flash), results in
#      $OUT/bench: first, so that a run cut short still gives the headline table;
#   3. the GPU test subset with compiled Triton kernels (TRITON_INTERPRET unset, CUDA used), among them
#      the check of the Triton backend against the PyTorch backend at the benchmark's shape and presets
#      (forward and gradients), which the benchmark does not repeat: read the table of step 2 only with it;
#   4. its training table (forward + backward at 16K and 32K), added to the same report, in a process of
#      its own (a fault in the backward kernels cannot take the prefill numbers with it);
#   5. the attention of one decoding step, dense vs DGACache keep_full / compact (Triton decode kernels, and
#      keep_full on the PyTorch path too), 16K to 128K ($OUT/bench/decode_step.md).
# Logs are tee'd to $OUT (default runs/gpu_check). Every step runs even if an earlier one failed; the exit
# status is non-zero when any step failed. Budget: about 9 minutes (each step has its own timeout).
set -uo pipefail

OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
status=0
t0=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.log"
    local start rc
    start=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.log"
    [ "$rc" -eq 0 ] || status=1
}

{
    echo "host: $(hostname)  date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
    python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.log"

# limits add up to 550 s (+ a few seconds of probes): the whole script fits one 10-minute call
step pip_install 40 python -m pip install --no-deps --no-build-isolation -e .

step bench 170 python -m dga_hf.bench.attention --out "$OUT/bench"

tests=(tests/test_triton_backend.py)
[ -f tests/test_triton_backward.py ] && tests+=(tests/test_triton_backward.py)
[ -f tests/test_ops.py ] && tests+=(tests/test_ops.py)
[ -f tests/test_triton_decode.py ] && tests+=(tests/test_triton_decode.py)
step pytest 155 python -m pytest -q --maxfail=10 -rs --durations=10 "${tests[@]}"

step model_smoke 55 python scripts/gpu_model_smoke.py

step bench_train 75 python -m dga_hf.bench.attention --train-only --repeats 3 --out "$OUT/bench"

step bench_decode 55 python -m dga_hf.bench.decoding --attention-step --lengths 16384,32768,65536,131072 --out "$OUT/bench"

echo "=== total $(( $(date +%s) - t0 ))s, status=$status" | tee -a "$OUT/summary.log"
exit "$status"
