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
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt opencv-python-headless pytest playwright
# the live page's browser test drives Debian's chromium through playwright (never a browser playwright downloads)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
  { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    || echo "setup_env: could not install chromium with apt-get; tests/test_live_browser.py will skip" >&2
fi
