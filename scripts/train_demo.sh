#!/usr/bin/env bash
# How the shipped demo model (models/demo/) was made: procedural faces -> the four REST stages on CPU.
# Every stage spends extra loss weight on the mouth region (--mouth-weight): lip-sync lives in a few pixels
# (VAE) and a few latent cells (DiT stages) that an unweighted loss leaves for last.
# Every stage resumes from its last snapshot, so re-running this after an interruption continues.
#   bash scripts/train_demo.sh [RUN_DIR]      (default runs/demo; about 3.5 hours on 2 CPU cores)
# Step counts can be overridden: VAE_STEPS, TEACHER_STEPS, STUDENT_STEPS, ASD_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
PY=.venv/bin/python
bash scripts/setup_env.sh
mkdir -p "$RUN"
[ -f "$RUN/synth/.done" ] || { $PY -m rest_model synth --out "$RUN/synth" --n 400 --seconds 6 --identities 100 \
    --seed 0 && touch "$RUN/synth/.done"; }
[ -f "$RUN/data/index.json" ] || $PY -m rest_model prepare --videos "$RUN/synth" --out "$RUN/data" --preset demo
common=(--data "$RUN/data" --out "$RUN/ckpt" --preset demo --save-every 100)
dit=(--mouth-weight 6)
$PY -m rest_model train-vae "${common[@]}" --steps "${VAE_STEPS:-8000}" --batch 4 --chunks 2 --lr 6e-4 \
    --face-weight 1 --mouth-weight 6
VAE="$RUN/ckpt/rest_vae.safetensors"
# the teacher ran 3000 steps, then was resumed to 6000: the cosine schedule restarts from lr 2.75e-4 at the resume
T=${TEACHER_STEPS:-6000}
for steps in $(( T < 3000 ? T : 3000 )) "$T"; do
    $PY -m rest_model train-teacher "${common[@]}" "${dit[@]}" --vae "$VAE" --steps "$steps" --batch 4 --chunks 3 --lr 5e-4
done
$PY -m rest_model init-student "${common[@]}" "${dit[@]}" --vae "$VAE" --teacher "$RUN/ckpt/teacher.safetensors" \
    --steps "${STUDENT_STEPS:-300}" --batch 4 --chunks 3 --lr 2e-4
$PY -m rest_model distill "${common[@]}" "${dit[@]}" --vae "$VAE" --teacher "$RUN/ckpt/teacher.safetensors" \
    --student "$RUN/ckpt/student_init.safetensors" --steps "${ASD_STEPS:-200}" --batch 4 --chunks 3 --lr 1e-4 \
    --audio-guidance 4
mkdir -p models/demo
# float16 storage halves the files (the loaders cast back to float32)
$PY -m rest_model export --in "$VAE" --out models/demo/rest_vae_demo.safetensors
$PY -m rest_model export --in "$RUN/ckpt/student_asd.safetensors" --out models/demo/rest_dit_demo.safetensors
echo "demo model -> models/demo/ (VAE + ASD student); teacher and pre-ASD student stay in $RUN/ckpt"
