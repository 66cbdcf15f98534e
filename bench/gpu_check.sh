#!/usr/bin/env bash
# The checks of owngpt that need an NVIDIA GPU, as one script (about 8-9 minutes on one H200):
#   1. the CUDA-only tests (`-m cuda`: no sync in the step, eager and compiled) and the device/step/train tests,
#      which on a GPU machine must still pass against their CPU references;
#   2. bench/bench_gpu.py: owngpt against nanoGPT's train.py, writing docs/benchmarks.md (section bench:gpu).
#
#   bash bench/gpu_check.sh NANOGPT_CHECKOUT [tests|bench|all]     (default all; run from the repository root)
#
# Needs python3 with torch (CUDA), transformers, safetensors, tokenizers, tqdm, pyyaml, numpy, matplotlib and
# pytest; owngpt runs from src/. Logs and the updated docs/benchmarks.md go to $OUT (default /tmp/owngpt-gpu).
set -uo pipefail
nanogpt=${1:?usage: bash bench/gpu_check.sh NANOGPT_CHECKOUT [tests|bench|all]}
what=${2:-all}
out=${OUT:-/tmp/owngpt-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'EOF' 2>&1 | tee "$out/machine.log"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
EOF
status=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -p no:cacheprovider -q -rs tests/test_device.py tests/test_train_step.py tests/test_train.py \
    2>&1 | tee "$out/tests.log" || status=1
fi
if [[ $what == bench || $what == all ]]; then
  python3 bench/bench_gpu.py --nanogpt "$nanogpt" 2>&1 | tee "$out/bench.log" || status=1
  cp docs/benchmarks.md "$out/benchmarks.md"
fi
exit $status
