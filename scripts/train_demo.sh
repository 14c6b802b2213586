#!/usr/bin/env bash
# How the shipped demo model (models/demo/) was made: procedural faces -> the four REST stages on CPU, in five
# phases.
#  1. A demo model with 4 video frames per latent frame: the one shipped at commit 584f457, made by that
#     commit's scripts/train_demo.sh (VAE 8,000 steps, teacher 6,000, student init 300, ASD 200; about 3.5 hours
#     on 2 CPU cores).
#  2. Carried over to 2 frames per latent frame (rest_model/relayout.py: the VAE keeps its latent space, the
#     DiT its audio-window embeddings) and fine-tuned through the same stages (VAE 1,500 steps, teacher 3,000
#     from the phase-1 DiT, student init 300, ASD 200 with audio guidance 7; about 1.6 hours on 2 CPU cores):
#     the one shipped at commit 9756bca, made by that commit's scripts/train_demo.sh (its VAE run was started
#     with --steps 3000 and resumed at step 200 with 1500, so its first 200 learning rates differ slightly).
#  3. Fine-tuned once more, with extra VAE loss on the pixels that change from frame to frame
#     (--change-weight): VAE 2,000 steps from phase 2's VAE, teacher 2,000 from phase 2's ASD student (a
#     causal DiT of the same shape: only the attention mask differs), student init 300, ASD 200 with audio
#     guidance 4 (about 1.3 hours on 2 CPU cores): the one shipped at commit 77006b7.
#  4. The VAE encoder keeps two frames apart for two levels instead of merging them at its input
#     (--encoder-merge-level 2), so the latent carries more of the mouth's motion between the two frames of a
#     latent frame: VAE 1,000 steps from phase 3's VAE, teacher 2,000 from phase 3's ASD student, student init
#     300 on the unguided teacher's solves, ASD 200 with audio guidance 4 (about 1.4 hours on 2 CPU cores): the
#     one shipped at commit 50fb170.
#  5. Phase 4 again, but the student init learns the guided teacher's solves (--audio-guidance 4, as ASD does),
#     and then the VAE's decoder splits a latent frame into its two frames at its level 2 and draws each apart
#     (--decoder-split-level 2), fine-tuned decoder-only for 1,000 steps from phase 4's VAE: the latents, and
#     so the DiT trained on them, stay phase 4's (about 2.5 hours on 2 CPU cores): shipped at commit a367228.
#  6. A lip-sync expert trained on the latents of phase 5's VAE (train-sync, 600 steps), and 300 more ASD steps of
#     phase 5's student with the expert's loss added (--sync-weight 0.1): about 50 minutes on 2 CPU cores.
# This script runs phases 5 and 6; it takes phase 3's files from git history instead of training phases 1 to 3
# again.
# Every stage spends extra loss weight on the mouth region (--mouth-weight): lip-sync lives in a few pixels
# (VAE) and a few latent cells (DiT stages) that an unweighted loss leaves for last.
# Every stage resumes from its last snapshot, so re-running this after an interruption continues. The VAE and
# teacher write to RUN_DIR/phase4 (phase 5 trains them as phase 4 did), the student stages to
# RUN_DIR/phase4/guided-student, the decoder split to RUN_DIR/phase4/decoder-split and phase 6 to RUN_DIR/phase6:
# never the folders of an earlier version of this script, so a finished stage of another phase is never resumed
# as this one.
#   bash scripts/train_demo.sh [RUN_DIR]      (default runs/demo)
# Step counts can be overridden: VAE_STEPS, TEACHER_STEPS, STUDENT_STEPS, ASD_STEPS, SPLIT_STEPS, SYNC_STEPS,
# SYNC_ASD_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
PY=.venv/bin/python
PHASE3=77006b7
bash scripts/setup_env.sh
PREV="$RUN/phase3-shipped"
mkdir -p "$PREV"
for f in rest_vae_demo rest_dit_demo; do
    [ -s "$PREV/$f.safetensors" ] || git show "$PHASE3:models/demo/$f.safetensors" > "$PREV/$f.safetensors" \
        || { echo "phase 5 needs this repository's git history (commit $PHASE3): clone it, do not export it" >&2
             exit 1; }
done
# --speech espeak, not the default auto: without espeak-ng, auto falls back to babble speech and silently
# makes another dataset (another held-out set too, so eval's figures are no longer README's)
[ -f "$RUN/synth/.done" ] || { $PY -m rest_model synth --out "$RUN/synth" --n 400 --seconds 6 --identities 100 \
    --seed 0 --speech espeak && touch "$RUN/synth/.done"; }
[ -f "$RUN/data/index.json" ] || $PY -m rest_model prepare --videos "$RUN/synth" --out "$RUN/data" --preset demo
CKPT="$RUN/phase4"
STUDENT="$CKPT/guided-student"
common=(--data "$RUN/data" --preset demo --save-every 100)
dit=(--mouth-weight 6)
# the decoder split trains with the VAE's own losses, so its gain is the split's alone
vae=(--batch 4 --chunks 4 --lr 3e-4 --face-weight 1 --mouth-weight 6 --change-weight 4)
# --decoder-split-level 0: phase 4's VAE writes a latent's frames together (the demo preset's split comes last,
# decoder-only, so the latents the DiT learns are this VAE's)
$PY -m rest_model train-vae "${common[@]}" "${vae[@]}" --out "$CKPT" --init "$PREV/rest_vae_demo.safetensors" \
    --encoder-merge-level 2 --decoder-split-level 0 --steps "${VAE_STEPS:-1000}"
VAE="$CKPT/rest_vae.safetensors"
$PY -m rest_model train-teacher "${common[@]}" "${dit[@]}" --out "$CKPT" --vae "$VAE" \
    --init "$PREV/rest_dit_demo.safetensors" --steps "${TEACHER_STEPS:-2000}" --batch 4 --chunks 3 --lr 2e-4
# the student init learns the guided teacher's solves, as ASD does: the unguided ones open the mouth too weakly
$PY -m rest_model init-student "${common[@]}" "${dit[@]}" --out "$STUDENT" --vae "$VAE" \
    --teacher "$CKPT/teacher.safetensors" --steps "${STUDENT_STEPS:-300}" --batch 4 --chunks 3 --lr 2e-4 \
    --audio-guidance 4
$PY -m rest_model distill "${common[@]}" "${dit[@]}" --out "$STUDENT" --vae "$VAE" \
    --teacher "$CKPT/teacher.safetensors" --student "$STUDENT/student_init.safetensors" --steps "${ASD_STEPS:-200}" \
    --batch 4 --chunks 3 --lr 1e-4 --audio-guidance 4
# the decoder alone learns to draw the two frames of a latent frame apart; the encoder, so the latents, stay
SPLIT="$CKPT/decoder-split"
$PY -m rest_model train-vae "${common[@]}" "${vae[@]}" --out "$SPLIT" --init "$VAE" --decoder-only \
    --decoder-split-level 2 --steps "${SPLIT_STEPS:-1000}"
mkdir -p models/demo
# float16 storage halves the files (the loaders cast back to float32)
$PY -m rest_model export --in "$SPLIT/rest_vae.safetensors" --out models/demo/rest_vae_demo.safetensors
$PY -m rest_model export --in "$STUDENT/student_asd.safetensors" --out models/demo/rest_dit_demo.safetensors
# phase 6: a lip-sync expert over the shipped VAE's latents, then 300 more ASD steps of phase 5's shipped (float16)
# student with the expert's loss added (--sync-weight 0.1): regression onto the teacher alone stops at its lip-sync
P6="$RUN/phase6"
mkdir -p "$P6"
[ -s "$P6/phase5_student.safetensors" ] || cp models/demo/rest_dit_demo.safetensors "$P6/phase5_student.safetensors"
$PY -m rest_model train-sync --data "$RUN/data" --preset demo --save-every 100 --out "$P6" \
    --vae models/demo/rest_vae_demo.safetensors --steps "${SYNC_STEPS:-600}"
$PY -m rest_model distill "${common[@]}" "${dit[@]}" --out "$P6" --vae models/demo/rest_vae_demo.safetensors \
    --teacher "$CKPT/teacher.safetensors" --student "$P6/phase5_student.safetensors" --steps "${SYNC_ASD_STEPS:-300}" \
    --batch 4 --chunks 3 --lr 1e-4 --audio-guidance 4 --sync-expert "$P6/sync_expert.safetensors" --sync-weight 0.1
$PY -m rest_model export --in "$P6/student_asd.safetensors" --out models/demo/rest_dit_demo.safetensors
echo "demo model -> models/demo/ (split VAE + ASD student with the lip-sync term); teacher and unsplit VAE in $CKPT,"
echo "pre-ASD student in $STUDENT, phase 5's ASD student and the lip-sync expert in $P6"
