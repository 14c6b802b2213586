#!/usr/bin/env bash
# Create ./.venv with everything the pack needs to run and test outside ComfyUI (idempotent).
# torch 2.9.1 + torchaudio 2.9 is the pair known to install from PyPI here; ComfyUI users skip this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchaudio" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.9.1
  .venv/bin/pip install -q --disable-pip-version-check torch==2.9.1 'torchaudio==2.9.*'
fi
# OpenCV draws the procedural faces and finds faces in `prepare`: training and tests need it, the nodes do not
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt opencv-python-headless pytest
