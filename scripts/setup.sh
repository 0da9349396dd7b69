#!/usr/bin/env bash
# Create .venv and install the package with its test extras, the scale-out extras (Ray, TensorBoard, W&B) and the
# Hugging Face extras
# (transformers, so the tests can check sqs.integrations.transformers on tiny models; gguf + accelerate,
# about 0.5 MB of wheels, so they can write and load tiny GGUF files). The package asks only for a
# torch lower bound (pyproject.toml); here we install the tested version, 2.13.0, first, so
# pip takes the CPU build when one is available locally instead of pulling a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
# scale: Ray, tensorboardX and wandb (about 300 MB installed, mostly Ray), so the Ray launcher's and the
# loggers' tests run instead of skipping; SQS_SKIP_SCALE=1 leaves them out. Measured 2026-12-06 on this
# 2-core machine, pip cache warm: the three with their dependencies install in 49 s (430 MB) into an empty
# venv. Without PyPI, the local index in pip's config resolves ray (2.58) and tensorboardX, not wandb (one of
# its opentelemetry dependencies is missing there): SQS_SKIP_SCALE=1 then, and install sqs[ray,tensorboard].
EXTRAS="test,hf,gguf"
if [ "${SQS_SKIP_SCALE:-0}" = "1" ] || ! .venv/bin/python -m pip install -q -e ".[$EXTRAS,scale]"; then
  # where the scale extra cannot resolve (e.g. no PyPI: wandb), install the rest, then what of it can
  [ "${SQS_SKIP_SCALE:-0}" = "1" ] || echo "setup: the scale extra did not install; trying sqs[ray,tensorboard] (the wandb tests will skip)"
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  [ "${SQS_SKIP_SCALE:-0}" = "1" ] || .venv/bin/python -m pip install -q -e ".[ray,tensorboard]" \
    || echo "setup: Ray/TensorBoard not installed (their tests will skip)"
fi
# Optional: triton lets the test suite run the GPU kernel under Triton's CPU
# interpreter. Nothing needs it; skip quietly where it cannot be installed.
if [ "${SQS_SKIP_TRITON:-0}" != "1" ]; then
  .venv/bin/python -m pip install -q triton >/dev/null 2>&1 || echo "setup: triton not installed (optional; its tests will skip)"
fi
.venv/bin/python -c "import torch, sqs; print('sqs', sqs.__version__, 'torch', torch.__version__)"
