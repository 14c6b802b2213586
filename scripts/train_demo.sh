#!/usr/bin/env bash
# How the shipped demo model (models/demo/) was made: procedural faces -> the four REST stages on CPU, in two
# phases.
#  1. A demo model with 4 video frames per latent frame: the one shipped at commit 584f457, made by that
#     commit's scripts/train_demo.sh (VAE 8,000 steps, teacher 6,000, student init 300, ASD 200; about 3.5 hours
#     on 2 CPU cores). This script takes its files from git history instead of training them again.
#  2. Carried over to 2 frames per latent frame (rest_model/relayout.py: the VAE keeps its latent space, the
#     DiT its audio-window embeddings) and fine-tuned through the same stages: VAE 1,500 steps, teacher 3,000
#     (from the phase-1 DiT), student init 300, ASD 200 with audio guidance 7 (about 1.6 hours on 2 CPU
#     cores). The shipped run's VAE was started with --steps 3000 and resumed at step 200 with 1500, so its
#     first 200 learning rates differ slightly.
# Every stage spends extra loss weight on the mouth region (--mouth-weight): lip-sync lives in a few pixels
# (VAE) and a few latent cells (DiT stages) that an unweighted loss leaves for last.
# Every stage resumes from its last snapshot, so re-running this after an interruption continues.
#   bash scripts/train_demo.sh [RUN_DIR]      (default runs/demo)
# Step counts can be overridden: VAE_STEPS, TEACHER_STEPS, STUDENT_STEPS, ASD_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
PY=.venv/bin/python
PHASE1=584f457
bash scripts/setup_env.sh
mkdir -p "$RUN/phase1"
for f in rest_vae_demo rest_dit_demo; do
    [ -s "$RUN/phase1/$f.safetensors" ] || git show "$PHASE1:models/demo/$f.safetensors" > "$RUN/phase1/$f.safetensors" \
        || { echo "phase 1 needs this repository's git history (commit $PHASE1): clone it, do not export it" >&2; exit 1; }
done
[ -f "$RUN/synth/.done" ] || { $PY -m rest_model synth --out "$RUN/synth" --n 400 --seconds 6 --identities 100 \
    --seed 0 && touch "$RUN/synth/.done"; }
[ -f "$RUN/data/index.json" ] || $PY -m rest_model prepare --videos "$RUN/synth" --out "$RUN/data" --preset demo
common=(--data "$RUN/data" --out "$RUN/ckpt" --preset demo --save-every 100)
dit=(--mouth-weight 6)
$PY -m rest_model train-vae "${common[@]}" --init "$RUN/phase1/rest_vae_demo.safetensors" \
    --steps "${VAE_STEPS:-1500}" --batch 4 --chunks 4 --lr 3e-4 --face-weight 1 --mouth-weight 6
VAE="$RUN/ckpt/rest_vae.safetensors"
$PY -m rest_model train-teacher "${common[@]}" "${dit[@]}" --vae "$VAE" --init "$RUN/phase1/rest_dit_demo.safetensors" \
    --steps "${TEACHER_STEPS:-3000}" --batch 4 --chunks 3 --lr 3e-4
$PY -m rest_model init-student "${common[@]}" "${dit[@]}" --vae "$VAE" --teacher "$RUN/ckpt/teacher.safetensors" \
    --steps "${STUDENT_STEPS:-300}" --batch 4 --chunks 3 --lr 2e-4
$PY -m rest_model distill "${common[@]}" "${dit[@]}" --vae "$VAE" --teacher "$RUN/ckpt/teacher.safetensors" \
    --student "$RUN/ckpt/student_init.safetensors" --steps "${ASD_STEPS:-200}" --batch 4 --chunks 3 --lr 1e-4 \
    --audio-guidance 7
mkdir -p models/demo
# float16 storage halves the files (the loaders cast back to float32)
$PY -m rest_model export --in "$VAE" --out models/demo/rest_vae_demo.safetensors
$PY -m rest_model export --in "$RUN/ckpt/student_asd.safetensors" --out models/demo/rest_dit_demo.safetensors
echo "demo model -> models/demo/ (VAE + ASD student); teacher and pre-ASD student stay in $RUN/ckpt"
