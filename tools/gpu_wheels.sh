#!/usr/bin/env bash
# The wheels tools/gpu_check.py needs on a GPU machine without a package registry (an NGC-like PyTorch image: torch
# and numpy there, megatron-core and transformers not), downloaded here into .gpu/wheels, which git ignores.
#
#   bash tools/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12; run from the repository root
#
# Then on the device machine, in one call (carry .gpu/wheels):
#   pip install -q --no-index --no-deps .gpu/wheels/*.whl && python tools/gpu_check.py
#
# The list is what `gpu_check.py --device cpu --small` imports, found by running it from a bare checkout in a venv
# holding only torch and numpy (Python 3.11 with megatron-core 0.16.1, and 3.12 with 0.19.2): ~22 MB.
# megatron-core 0.17+ needs Python >= 3.12; 3.11 gets 0.16.1. --no-deps on the device keeps the image's own torch.
set -euo pipefail
PY="${1:-3.12}"
MCORE=0.19.2
if [ "$PY" = "3.11" ] || [ "$PY" = "3.10" ]; then MCORE=0.16.1; fi
DEST=.gpu/wheels
mkdir -p "$DEST" .git/info
grep -qxF '.gpu/' .git/info/exclude 2>/dev/null || echo '.gpu/' >> .git/info/exclude
PLATFORMS=""  # glibc <= 2.28 (any recent NGC image has newer); pip does not widen an explicit --platform itself
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 \
         manylinux_2_5 manylinux1; do PLATFORMS="$PLATFORMS --platform ${p}_x86_64"; done
# shellcheck disable=SC2086
pip download -q --no-deps --only-binary=:all: --python-version "$PY" $PLATFORMS -d "$DEST" \
    "megatron-core==$MCORE" transformers==5.19.0 huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 \
    regex pyyaml tqdm packaging psutil httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 idna truststore
ls -1 "$DEST"
du -sh "$DEST"
