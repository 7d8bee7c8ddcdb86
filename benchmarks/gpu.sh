#!/usr/bin/env bash
# The GPU evidence in one command, sized for 8 minutes on one H100 (each part has its own time limit, so one that
# hangs cannot eat the rest): the kernel tests compiled for the GPU (no interpreter), then every GPU benchmark --
# attention against SDPA's flash and cuDNN backends, int4 / int8 / fp8 matmuls against fp16 and bf16 cuBLAS and
# torch._scaled_mm, the fused training ops against eager torch (time and peak memory) -- each appending CSV rows with
# the device name to benchmarks/results/, then RESULTS.md regenerated from them. Exit status: 1 if any part failed.
#
#   bash benchmarks/gpu.sh            # from the repository root, after `make install`
#   PY=python bash benchmarks/gpu.sh  # another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT/logs"
status=0

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log it, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/logs/gpu_$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device')" || exit 1
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

# 1. correctness on the GPU: the kernels compiled for this device, against their references
part tests 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels/test_int4_mm.py tests/kernels/test_w4a8_mm.py \
  tests/kernels/test_fp8_mm.py tests/kernels/test_int8_mm.py tests/kernels/test_fused_rms_norm.py \
  tests/kernels/test_fused_layer_norm.py tests/kernels/test_fused_swiglu.py tests/kernels/test_fused_rope.py \
  tests/kernels/test_fused_linear_cross_entropy.py tests/kernels/test_flash_attention.py -k "not property"

# 2. attention: forward and forward + backward against SDPA's flash and cuDNN backends
part attention 90 "$PY" benchmarks/attention.py --seqlens 1024,4096,16384 --head-dims 64,128 --causal true \
  --modes fwd,fwd_bwd --providers triton,sdpa_flash,sdpa_cudnn --results "$OUT/attention.csv" --no-plot

# 3. low-bit matmuls: int4 at batch 1 (4096^2, 4096x11008, 8192^2) and prefill, int8, fp8 (sm_90) vs fp16 / bf16
part matmul 130 "$PY" benchmarks/matmul.py --results "$OUT/matmul.csv" --no-plot \
  --shapes 1x4096x4096,1x4096x11008,1x8192x8192,16x4096x4096,512x4096x4096,1024x4096x4096,4096x4096x4096

# 4. fused training ops: time and peak memory (linear + cross-entropy at V = 49152)
part fused_ops 50 "$PY" benchmarks/fused_ops.py --results "$OUT/fused_ops.csv"

# 5. the report, from the CSV files alone
part report 20 "$PY" benchmarks/suite.py --report-only
exit $status
