#!/usr/bin/env bash
# Download, into .wheels/ (ignored by git), the wheels of leandiff's dependencies that a CUDA machine with
# PyTorch, pytest and the usual scientific stack lacks (the project's GPU machine: no package index there).
# Versions are those of the venv that runs this script, so the GPU machine runs what the tests ran here.
# Usage (on a machine with a package index): benchmarks/fetch_wheels.sh [PYTHON]   then carry .wheels
# with the tree and run benchmarks/device_check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
# diffusers (UNet2DModel), torch-pruning (structured pruning), mlxtend (the bundled MNIST digits).
# diffusers' own needs (huggingface_hub >= 1.32, safetensors, regex, requests, filelock, Pillow) are on
# that machine; --no-deps: nothing else comes along.
PKGS=(diffusers torch-pruning mlxtend)
mkdir -p .wheels
for p in "${PKGS[@]}"; do
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .wheels "$p==$v"
done
du -sh .wheels && ls .wheels
