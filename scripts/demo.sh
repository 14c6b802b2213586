#!/usr/bin/env bash
# The main job for a newcomer: set up .venv (first run only), then generate a lip-synced talking-head
# mp4 from the bundled portrait and speech with the bundled demo model. Extra arguments go to
# `python -m rest_model generate` (e.g. --image face.png --audio speech.wav --out my.mp4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m rest_model generate --out out/talking_head.mp4 "$@"
