#!/usr/bin/env bash
# The Fashion-MNIST results table: every knowledge method in conf/knowledge and every scheme, each
# over 3 seeds, beside the student trained alone with the same budget. Writes
# docs/results/fashion_mnist.md (mean ± std of test top-1, gain over the student alone with its 95%
# intervals, agreement with the teacher, wall time) and the chart of the gains beside it (.png).
#
#   bash scripts/fashion_mnist_table.sh [OUT] [extra overrides for every run...]
#
# The protocol (below, PROTOCOL): the tutorial's DeepNN teacher, trained once and stored, and its
# LightNN student, on Fashion-MNIST without augmentation, so that the teacher-output cache serves
# every teacher output (logits and features) from one exact entry and the teacher never runs in a
# student's training. Online and self-distillation use LightNN on both sides. Runtime on a 2-core CPU
# is in docs/results/fashion_mnist.md.
#
# Every run starts with ckpt_path=auto: rerunning the script skips the runs OUT already holds and
# resumes an interrupted one. PYTHON (default python), SEEDS (default 1,2,3), METHODS (default: every
# knowledge config, as below), DOC (the table's path without extension, default
# docs/results/fashion_mnist) and RENDER_ONLY (1: only rewrite the document) may be set in the environment.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${1:-results/fashion_mnist}")
shift || true
PYTHON=${PYTHON:-python}
SEEDS=${SEEDS:-1,2,3}
DOC=${DOC:-$HERE/../docs/results/fashion_mnist}
# The teacher: 2 full epochs (860 steps). The students: 2 half-epochs (430 steps) of the 55,000
# training images, Adam with a cosine schedule, as every conf/knowledge recipe sets its own weights.
PROTOCOL=(
  data.train_transforms=[] scheduler=cosine
  trainer.max_epochs=2 trainer.limit_train_batches=0.5
  teacher_training.trainer.max_epochs=2 teacher_training.trainer.limit_train_batches=1.0
)
RUN=(
  "${PROTOCOL[@]}" "paths.teacher_store=$OUT/store" teacher_cache.enabled=auto baseline_row=false
  logger=csv trainer.enable_progress_bar=false trainer.enable_model_summary=false ckpt_path=auto
)
# Every knowledge config but the families' defaults (response = kd, feature = fitnet, relation =
# rkd) and the schemes' own (dml: mode=online, byot: mode=self), which run below as schemes.
# METHODS in the environment (e.g. METHODS=kd,dkd) runs those instead.
METHODS=${METHODS:-$(cd "$HERE/../conf/knowledge" && ls ./*.yaml | sed 's|^\./||; s|\.yaml$||' \
  | grep -vxE 'response|feature|relation|dml|byot' | paste -sd, -)}
sweep() {  # sweep NAME OVERRIDES...: one Hydra multirun into OUT/runs/NAME
  local name=$1
  shift
  echo "== $name: $*"
  # A sweep with failed jobs exits non-zero; their rows in the table say why (a method a pair cannot run).
  $PYTHON -m kdlab.run -m "${RUN[@]}" seed="$SEEDS" "hydra.sweep.dir=$OUT/runs/$name" "$@" "${EXTRA[@]}" \
    || echo "== $name: some jobs failed (see above); the table lists them with their errors"
}
EXTRA=("$@")
# RENDER_ONLY=1 skips the runs and only rewrites the document from what OUT holds (e.g. after editing
# the findings).
if [ -z "${RENDER_ONLY:-}" ]; then
sweep baseline mode=baseline
# AB's and FT's first stage is 30 epochs in their recipe (of the CRD protocol's 240); here 1 epoch.
PLAIN=$(tr , '\n' <<<"$METHODS" | grep -vxE 'ab|ft' | paste -sd, - || true)
if [ -n "$PLAIN" ]; then sweep offline mode=offline "knowledge=$PLAIN"; fi
for staged in $(tr , '\n' <<<"$METHODS" | grep -xE 'ab|ft' || true); do
  sweep "offline_$staged" mode=offline "knowledge=$staged" "knowledge.$staged.init_epochs=1"
done
# The tutorial models have no pre-activation stage taps (no BatchNorm, so the recipes' `stages_preact`
# names nothing): their rows above say so. These rows name the layers instead: ReviewKD on the stages
# after their ReLU, AB on each stage's last convolution (the activation before its ReLU).
if tr , '\n' <<<"$METHODS" | grep -qx reviewkd; then
  sweep offline_reviewkd_stages mode=offline knowledge=reviewkd 'knowledge.reviewkd.teacher_layers=[stages,embedding]'
fi
if tr , '\n' <<<"$METHODS" | grep -qx ab; then
  sweep offline_ab_convs mode=offline knowledge=ab knowledge.ab.init_epochs=1 \
    'knowledge.ab.student_layers=[features.0,features.3]' 'knowledge.ab.teacher_layers=[features.2,features.7]'
fi
# Online: deep mutual learning between two LightNN peers, against LightNN trained alone (the baseline).
sweep online mode=online model@teacher=lightnn
# Self-distillation, each against the same student alone. Born-Again's generation 0 is trained in the
# store with the student's budget (every generation has it, whatever teacher_training.* says);
# generations=1,2 gives generation 1 (from 0) and 2 (from 1); Tf-KD's self variant learns from generation 0 too.
sweep self mode=self
sweep pskd mode=pskd
sweep cskd mode=cskd
sweep born_again mode=born_again mode.generations=1,2
sweep tfkd mode=tfkd mode.variant=reg,self
fi
# The table (with what was found about each row: docs/results/fashion_mnist_findings.yaml) under the
# protocol and the time this invocation took; the chart beside it.
$PYTHON "$HERE/summarize.py" "$OUT/runs" --out "$OUT/summary" \
  --findings "$HERE/../docs/results/fashion_mnist_findings.yaml"
mkdir -p "$(dirname "$DOC")"
cp "$OUT/summary.png" "$DOC.png"
# The runs' own time (their wall_time_s), without the teacher's training and the cache builds' share.
MINUTES=$($PYTHON -c "import csv, sys; rows = list(csv.DictReader(open(sys.argv[1])));
print(round(sum(float(r['wall time s'] or 0) * int(r['n']) for r in rows) / 60))" "$OUT/summary.csv")
{
  cat <<EOF
# Fashion-MNIST: every kdlab method and scheme against the student trained alone

Produced by \`bash scripts/fashion_mnist_table.sh\` on $(date +%Y-%m-%d) on a $(nproc)-core $(uname -m)
CPU: the runs took $MINUTES min in all, plus the teacher's training (about 8 min) and the teacher-output
cache's builds (about a minute for each set of layers a method reads). Test top-1 on
the official 10,000 test images, mean ± sample std over seeds $SEEDS. Gains are over the student alone
(\`mode=baseline\`, same budget and seeds), with Welch's 95% interval and the interval paired by seed.
Agreement is the fraction of test images on which the student's top-1 class is the teacher's. Wall time
is one run's training and testing in seconds, averaged over its seeds; the first run of a method also
builds the cache entry for the layers it reads, and some runs shared the 2 cores with other jobs, so
the column is indicative.

Protocol: teacher \`deepnn\` (0.94M parameters), trained once for 2 epochs; student \`lightnn\` (0.21M),
2 half-epochs (430 steps of 128 images); Adam at 1e-3 with a cosine schedule; no augmentation, so that
the teacher-output cache serves the teacher's logits and features exactly; each method's own recipe from
conf/knowledge. Online and self-distillation rows use \`lightnn\` for every model. Overrides:
\`${PROTOCOL[*]}\`.

![gains over the student alone](fashion_mnist.png)

EOF
  cat "$OUT/summary.md"
} >"$DOC.md"
echo "Written: $DOC.md, $DOC.png"
