#!/usr/bin/env bash
# What stored views cost in accuracy: offline KD on real Fashion-MNIST with its usual augmentation
# (RandomCrop(28, padding=2) + horizontal flip), the teacher run live against the teacher-output
# cache's stored views (K = the 5 planned epochs, and K = 2), with every logit (fp16) and with the
# top-3 and the tail's mass (FKD's storage); the student trained alone as the reference. 3 seeds each,
# the same budget. Writes OUT/summary.md (mean ± std over the seeds).
#
#   bash scripts/cache_accuracy.sh [OUT] [extra overrides for every run...]
#
# About 40 minutes on a 2-core CPU (teacher training and four cache builds included).
# PYTHON (default python), SEEDS (default 1,2,3) and TEACHER (a teacher's weights file, instead of
# training one) may be set in the environment.
#
# Every run is started with ckpt_path=auto: rerunning the script skips the runs already finished in
# OUT and resumes an interrupted one from its checkpoint.
set -euo pipefail
OUT=$(realpath -m "${1:-results/cache_accuracy}")
shift || true
PYTHON=${PYTHON:-python}
SEEDS=${SEEDS:-1,2,3}
# The pair: the tutorial's DeepNN teacher, trained for 3 full epochs, and LightNN, whose short
# budget (5 epochs of 100 batches) leaves room for the teacher to help. One teacher for every run:
# trained first, alone, unless TEACHER names one.
if [ -z "${TEACHER:-}" ]; then
  $PYTHON -m kdlab.run mode=baseline model@student=deepnn seed=0 trainer.max_epochs=3 \
    trainer.limit_train_batches=1.0 logger=csv trainer.enable_progress_bar=false "hydra.run.dir=$OUT/teacher" \
    ckpt_path=auto "$@"
  TEACHER="$OUT/teacher/student.pt"
fi
COMMON=(
  model@teacher=deepnn model@student=lightnn "teacher.checkpoint=$TEACHER"
  trainer.max_epochs=5 trainer.limit_train_batches=100
  "paths.teacher_store=$OUT/store" logger=csv trainer.enable_progress_bar=false ckpt_path=auto
  baseline_row=false  # the student alone is its own arm (mode=baseline) here
)
$PYTHON -m kdlab.run -m mode=baseline seed=$SEEDS "hydra.sweep.dir=$OUT/runs/baseline" "${COMMON[@]}" "$@"
$PYTHON -m kdlab.run -m knowledge=kd teacher_cache.enabled=false seed=$SEEDS \
  "hydra.sweep.dir=$OUT/runs/live" "${COMMON[@]}" "$@"
$PYTHON -m kdlab.run -m knowledge=kd teacher_cache.enabled=true teacher_cache.views=5,2 \
  teacher_cache.logits=fp16,topk teacher_cache.topk=3 seed=$SEEDS \
  "hydra.sweep.dir=$OUT/runs/stored" "${COMMON[@]}" "$@"
$PYTHON "$(dirname "$0")/summarize.py" "$OUT/runs" --out "$OUT/summary"
