#!/usr/bin/env bash
# On a machine with a CUDA GPU whose python3 has torch and triton (no install step, nothing
# fetched): the GPU tests and the GPU benchmarks in one call, so a session that is lent a GPU
# spends its minutes measuring. Writes results/bench/ops_gpu.md and glu_gpu.md (copied to $OUT
# when set). Liger-Kernel's SwiGLU joins `bench ops` as a second baseline when liger_kernel
# imports: carry its wheel and pass LIGER_WHEEL=path/to/liger_kernel-*.whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${LIGER_WHEEL:-}" ]; then "$PY" -m pip install -q --no-deps "$LIGER_WHEEL" || echo "gpu_check: liger-kernel not installed"; fi
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'gpu_check: torch sees no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))"
"$PY" -m pytest -q -m gpu tests/test_triton_kernel.py
"$PY" -m sqs.cli bench ops --device cuda --dtype bfloat16 --numel 8388608 67108864 --reps 20 --out results/bench/ops_gpu.md
"$PY" -m sqs.cli bench glu --device cuda --dtype bfloat16 --batch 256 512 1024 2048 --width 256 512 1024 2048 \
  --reps 20 --out results/bench/glu_gpu.md
if [ -n "${OUT:-}" ]; then cp results/bench/ops_gpu.md results/bench/glu_gpu.md "$OUT"/; fi
