#!/usr/bin/env bash
# A controlled drift study at the tiny preset (32x32, a 2-block DiT): the four REST stages trained from scratch on
# the demo's procedural faces, then the causal student before ASD and after it, each streamed for 10 minutes from
# 3 held-out portraits (eval --long-portraits 3). The shipped demo student does not drift even before ASD, so it
# cannot show what ASD does to drift. This run asks whether a smaller student, with a longer rolling Context-Cache
# (8 latent frames of its own output instead of the preset's 2, so more room for its errors to feed back), drifts
# before ASD, and what ASD does to it. It asks the same of a weaker student (100 init steps), distilled under four
# noise schedules. Then a student with a 24-frame cache, which does drift before ASD, distilled by the teacher
# and by a teacher fine-tuned on clips as long as the student's, against a sink-only student (no rolling cache)
# and equal-step controls. README's "A controlled drift study" has the results. About 3.5 hours on 2 CPU cores.
# Every stage resumes from its last snapshot.
#   bash scripts/drift_study.sh [RUN_DIR]      (default runs/tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/tiny}
PY=.venv/bin/python
bash scripts/setup_env.sh
# the demo's dataset (scripts/train_demo.sh), rendered at the tiny preset's 32 pixels
[ -f "$RUN/synth/.done" ] || { $PY -m rest_model synth --out "$RUN/synth" --n 400 --seconds 6 --identities 100 \
    --seed 0 --speech espeak && touch "$RUN/synth/.done"; }
[ -f "$RUN/data/index.json" ] || $PY -m rest_model prepare --videos "$RUN/synth" --out "$RUN/data" --preset tiny
common=(--data "$RUN/data" --preset tiny --batch 8 --chunks 4 --save-every 100)
$PY -m rest_model train-vae "${common[@]}" --out "$RUN/vae" --steps 3000 --lr 1e-3 --face-weight 1 --mouth-weight 6
VAE="$RUN/vae/rest_vae.safetensors"
$PY -m rest_model train-teacher "${common[@]}" --out "$RUN/teacher" --vae "$VAE" --steps 4000 --lr 1e-3 \
    --mouth-weight 6
TEACHER="$RUN/teacher/teacher.safetensors"
# a student stage with an 8-latent-frame rolling cache, on clips of 8 chunks (16 latent frames) so that the cache
# fills and rolls within each training clip: student STAGE OUT [ARGS]
student() { local stage=$1 out=$2; shift 2
  $PY -m rest_model "$stage" "${common[@]}" --chunks 8 --out "$out" --vae "$VAE" --teacher "$TEACHER" \
      --mouth-weight 6 --audio-guidance 4 "$@"; }
student init-student "$RUN/student" --context-frames 8 --steps 400 --lr 5e-4
student distill "$RUN/student" --student "$RUN/student/student_init.safetensors" --steps 300 --lr 2e-4
# and with its current chunk re-noised more (t_j from 0.5: less of the student's own chunk survives into the target)
student distill "$RUN/student_t0.5-0.95" --student "$RUN/student/student_init.safetensors" --steps 300 --lr 2e-4 \
    --t-min 0.5 --t-max 0.95
# the equal-step control: the same student's ODE init run on to 700 steps (its 400 + ASD's 300) without ASD; it
# resumes from the 400-step snapshot, so its learning rate follows the 700-step schedule from there:
# control FROM OUT STAGE_FN [ARGS]
control() { local from=$1 out=$2 fn=$3; shift 3
  mkdir -p "$out"
  [ -f "$out/student.state.safetensors" ] || cp "$from/student.state.safetensors" "$out/"
  "$fn" init-student "$out" --steps 700 --lr 5e-4 "$@"; }
control "$RUN/student" "$RUN/student700" student --context-frames 8
# a weaker student (100 init steps), distilled under four asynchronous schedules (t_ctx, t_min, t_max): the default;
# its context re-noised more (the teacher then redraws more of the student's context); and its current chunk
# re-noised more (less of the student's chunk survives into the teacher's target)
student init-student "$RUN/weak" --context-frames 8 --steps 100 --lr 5e-4
dits=("$RUN/student/student_init.safetensors" "$RUN/student/student_asd.safetensors"
      "$RUN/student_t0.5-0.95/student_asd.safetensors" "$RUN/student700/student_init.safetensors"
      "$RUN/weak/student_init.safetensors")
for arm in "0.1 0.2 0.7" "0.4 0.2 0.7" "0.1 0.5 0.95" "0.1 0.8 1.0"; do
  read -r ctx lo hi <<< "$arm"
  out="$RUN/weak_ctx${ctx}_t${lo}-${hi}"
  student distill "$out" --student "$RUN/weak/student_init.safetensors" --steps 300 --lr 2e-4 \
      --t-ctx "$ctx" --t-min "$lo" --t-max "$hi"
  dits+=("$out/student_asd.safetensors")
done
$PY -m rest_model eval --vae "$VAE" --data "$RUN/data" --minutes 10 --long-portraits 3 --json "$RUN/eval_drift.json" \
    "${dits[@]/#/--dit=}"

# --- a 24-latent-frame rolling cache (3.8 s of the student's own output), on clips of 16 chunks (32 latent frames,
# nearly the 6 s clips' 37) so that it fills and rolls within each clip
long() { local stage=$1 out=$2; shift 2; student "$stage" "$out" --chunks 16 "$@"; }
long init-student "$RUN/long" --context-frames 24 --steps 400 --lr 5e-4
long distill "$RUN/long" --student "$RUN/long/student_init.safetensors" --steps 300 --lr 2e-4
# the floor of the measure: a student with the ID-Sink alone, whose chunks cannot inherit each other's errors
student init-student "$RUN/sink_only" --context-frames 0 --steps 400 --lr 5e-4
# the equal-step control, as above
control "$RUN/long" "$RUN/long700" long --context-frames 24
# the teacher learned on clips of 8 latent frames, but ASD asks it for chunks after up to 30 frames of context:
# the same teacher, fine-tuned for 1000 steps on clips of 32
$PY -m rest_model train-teacher "${common[@]}" --chunks 16 --out "$RUN/teacher_long" --vae "$VAE" --init "$TEACHER" \
    --steps 1000 --lr 5e-4 --mouth-weight 6
TEACHER="$RUN/teacher_long/teacher.safetensors"
long distill "$RUN/long_tlong" --student "$RUN/long/student_init.safetensors" --steps 300 --lr 2e-4
long distill "$RUN/long_tlong_t0.5-0.95" --student "$RUN/long/student_init.safetensors" --steps 300 --lr 2e-4 \
    --t-min 0.5 --t-max 0.95
# and the equal-step control under the fine-tuned teacher: the 400-step init run on to 700 steps against its solves
control "$RUN/long" "$RUN/long700_tlong" long --context-frames 24
long_dits=("$RUN/long/student_init.safetensors" "$RUN/long700/student_init.safetensors"
           "$RUN/long700_tlong/student_init.safetensors"
           "$RUN/long/student_asd.safetensors" "$RUN/long_tlong/student_asd.safetensors"
           "$RUN/long_tlong_t0.5-0.95/student_asd.safetensors" "$RUN/sink_only/student_init.safetensors")
$PY -m rest_model eval --vae "$VAE" --data "$RUN/data" --minutes 10 --long-portraits 3 \
    --json "$RUN/eval_long_cache.json" "${long_dits[@]/#/--dit=}"
