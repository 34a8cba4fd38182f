#!/usr/bin/env bash
# What kdlab does on a GPU, measured in one short session on a lent GPU machine (never in CI or tests):
#   1. training steps per second of the CRD benchmark's CIFAR models (batch 128, synthetic 3x32x32
#      inputs, 100 classes), in fp32 and in bf16 autocast;
#   2. a short real run of each scheme through `python -m kdlab.run` on Fashion-MNIST (offline KD,
#      online, self/BYOT, PS-KD, Born-Again, CS-KD, Tf-KD, baseline): wall time and test top-1;
#   3. scripts/bench.py (kdlab against hand-written PyTorch) in fp32 and bf16-mixed, with the frozen
#      teacher compiled and not.
# Prints the figures as markdown tables and writes them to OUT/gpu_check.md; logs and run folders
# go under OUT too (OUT is cleared of them first).
#
#   bash scripts/gpu_check.sh [OUT] [extra overrides for the kdlab.run runs...]
#
# About 6 to 7 minutes on one H200, and never more than 8: every part runs under `timeout`, and a
# part that would start past the budget (BUDGET seconds, default 450) is skipped and marked so.
# PYTHON (default python) must have kdlab installed (scripts/setup.sh) and see a CUDA GPU; without
# one the script stops at once, so that a CPU run is never taken for its results.
set -euo pipefail
OUT=$(realpath -m "${1:-results/gpu_check}")
shift || true
PYTHON=${PYTHON:-python}
BUDGET=${BUDGET:-450}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" # python -m kdlab.run and scripts/bench.py are run from the repository's root
MD="$OUT/gpu_check.md"
export PYTHONUNBUFFERED=1 # logs of a run stopped by `timeout` keep what it printed

# ---------------------------------------------------------------------------------- preflight
if ! INFO=$($PYTHON - <<'EOF'
import sys

try:
    import torch
except ImportError as error:
    sys.exit(f"{sys.executable} has no torch ({error}): set PYTHON to kdlab's, e.g. PYTHON=.venv/bin/python")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU is visible to {sys.executable} (torch.cuda.is_available() is False)")
try:
    import kdlab.conf  # noqa: F401  (the configs python -m kdlab.run loads)
    import lightning
except ImportError as error:
    sys.exit(f"kdlab is not installed for {sys.executable} ({error}): run scripts/setup.sh")
print(f"| GPU | {torch.cuda.get_device_name(0)} |")
print(f"| torch | {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}) |")
print(f"| Lightning | {lightning.__version__} |")
print(f"| Python | {sys.version.split()[0]} |")
EOF
); then
  echo "gpu_check: stopped before measuring anything; this script's figures are GPU figures only." >&2
  exit 1
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
GRACE=5         # seconds `timeout` waits after SIGTERM (Lightning saves a checkpoint) before SIGKILL
MIN_PART=20     # a part is not started with less time left than this
mkdir -p "$OUT"
rm -rf "$OUT/logs" "$OUT/models" "$OUT/bench" "$OUT/runs" # stale results must not pass for this run's
mkdir -p "$OUT/logs" "$OUT/models" "$OUT/bench" "$OUT/runs"
: >"$MD"

emit() { tee -a "$MD"; } # stdin to the console and to the report

DRIVER=$(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>/dev/null \
  | head -n 1 || true)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$COMMIT" != unknown ] && ! git diff --quiet HEAD 2>/dev/null; then
  COMMIT="$COMMIT + uncommitted changes"
fi
{
  echo "# kdlab GPU check"
  echo
  echo "| setting | value |"
  echo "| --- | --- |"
  echo "| date | $(date -u '+%Y-%m-%d %H:%M UTC') |"
  echo "$INFO" | head -n 1
  echo "| driver, memory | ${DRIVER:-nvidia-smi not found} |"
  echo "$INFO" | tail -n +2
  echo "| kdlab | $COMMIT |"
  echo
} | emit

# Runs "$@" with its output in LOG, under `timeout`: CAP seconds, or fewer if the budget has fewer left.
# Sets STATUS (ok, timeout, failed, skipped) and WALL (seconds, as text). In the background with
# `wait`, so that Ctrl-C reaches the trap below (`timeout` puts its command in a process group of
# its own, which the terminal's signals miss).
CHILD=""
trap '[ -z "$CHILD" ] || kill -TERM "$CHILD" 2>/dev/null; exit 130' INT TERM
timed() {
  local cap=$1 log=$2 left limit start rc=0
  shift 2
  left=$((DEADLINE - $(date +%s) - GRACE))
  limit=$((cap < left ? cap : left))
  WALL="-"
  if [ "$limit" -lt "$MIN_PART" ]; then
    STATUS="skipped (budget spent)"
    echo "   skipped: ${left} s of the budget left" >&2
    return
  fi
  start=$(date +%s.%N)
  timeout -k "$GRACE" "$limit" "$@" >"$log" 2>&1 &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  WALL=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) STATUS=ok ;;
    124 | 137) STATUS="timeout (${limit} s)" ;;
    *) STATUS="failed (exit $rc)" ;;
  esac
  echo "   $STATUS in $WALL s (log: $log)" >&2
  if [ "$rc" -ne 0 ]; then tail -n 15 "$log" | sed 's/^/   | /' >&2; fi
}

# ------------------------------------------------------------------- 1. CIFAR models' step rate
# Synthetic data on the GPU, so the figure is the model's step alone. Torch's defaults, as a kdlab
# run has them: cudnn.benchmark off, and fp32 convolutions may use TF32.
cat >"$OUT/models/models.py" <<'EOF'
import sys
import time

import torch
import torch.nn.functional as F

from kdlab.models import create_model
from kdlab.tables import markdown_table

table, names = sys.argv[1], sys.argv[2].split(",")
BATCH, WARMUP, STEPS = 128, 10, 50
x = torch.randn(BATCH, 3, 32, 32, device="cuda")
y = torch.randint(0, 100, (BATCH,), device="cuda")


def steps_per_s(name: str, bf16: bool) -> float:
    """Forward, backward and SGD step (the CRD recipe's), timed over STEPS after WARMUP."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    return STEPS / (time.perf_counter() - start)


rows = []
for name in names:
    params = sum(p.numel() for p in create_model(name, num_classes=100).parameters())
    fp32, bf16 = steps_per_s(name, False), steps_per_s(name, True)
    rows.append([name, f"{params / 1e6:.2f}M", f"{fp32:.1f}", f"{bf16:.1f}", f"{bf16 / fp32:.2f}x"])
    print(" | ".join(rows[-1]), flush=True)
    # Rewritten after each model: a timeout keeps the rows already measured.
    header = ["model", "params", "fp32 steps/s", "bf16 steps/s", "bf16 / fp32"]
    with open(table, "w") as out:
        out.write(markdown_table(header, rows) + "\n")
EOF
MODELS=resnet32x4,resnet8x4,wrn_40_2,wrn_16_2,resnet56,resnet20,vgg13,vgg8,shufflev2,mobilenetv2
echo "== 1. CIFAR models, steps per second" >&2
timed 90 "$OUT/logs/models.log" "$PYTHON" "$OUT/models/models.py" "$OUT/models/table.md" "$MODELS"
{
  echo "## CIFAR models: training steps per second"
  echo
  echo "Batch 128 of synthetic 3x32x32 inputs, 100 classes; forward, backward and SGD step (momentum 0.9,"
  echo "weight decay 5e-4) after 10 warm-up steps, 50 timed between torch.cuda.synchronize() calls; bf16 is"
  echo "torch.autocast. Torch's defaults: cudnn.benchmark off, fp32 convolutions may use TF32."
  echo "Status: $STATUS, $WALL s."
  echo
  cat "$OUT/models/table.md" 2>/dev/null || echo "(no figures)"
  echo
} | emit

# ----------------------------------------------------------------------- 3a. scripts/bench.py
# Run before the schemes (2) in fp32 and bf16, after them with the compiled teacher, whose
# compilation time is the least predictable. One work folder: its seeded teacher and cache entries
# are built by the first run and reused by the others.
BENCH_ARGS=(--batches 50 --warmup 10 --repeats 1)
bench() {
  local label=$1
  shift
  echo "== 3. scripts/bench.py $*" >&2
  timed 120 "$OUT/logs/bench_$label.log" "$PYTHON" scripts/bench.py "${BENCH_ARGS[@]}" "$@" \
    --workdir "$OUT/bench/work" --json "$OUT/bench/$label.json"
  printf '%s\t%s\t%s\n' "$label" "$STATUS" "$WALL" >>"$OUT/bench/status.tsv"
}
bench fp32 --precision 32-true
bench bf16 --precision bf16-mixed

# --------------------------------------------------------------------- 2. each scheme, a short run
# One epoch of 50 batches (the teacher and the stored student-alone row too), full validation and
# test sets. The store is shared by the runs: the first run that needs a teacher trains it.
COMMON=(
  trainer.max_epochs=1 trainer.limit_train_batches=50 teacher_training.trainer.limit_train_batches=50
  trainer.accelerator=gpu trainer.enable_progress_bar=false logger=csv
  "paths.teacher_store=$OUT/runs/teachers"
)
SCHEMES=(
  "offline_kd|mode=offline knowledge=kd"
  "online|mode=online"
  "self_byot|mode=self"
  "pskd|mode=pskd"
  "born_again|mode=born_again"
  "cskd|mode=cskd"
  "tfkd|mode=tfkd"
  "baseline|mode=baseline"
)
for scheme in "${SCHEMES[@]}"; do
  name=${scheme%%|*}
  read -r -a overrides <<<"${scheme#*|}"
  echo "== 2. python -m kdlab.run ${overrides[*]}" >&2
  timed 60 "$OUT/logs/run_$name.log" "$PYTHON" -m kdlab.run "${overrides[@]}" "${COMMON[@]}" \
    "hydra.run.dir=$OUT/runs/$name" "$@"
  printf '%s\t%s\t%s\t%s\n' "$name" "${overrides[*]}" "$STATUS" "$WALL" >>"$OUT/runs/status.tsv"
done
$PYTHON - "$OUT/runs" "$*" <<'EOF' | emit || echo "gpu_check: no schemes table written" >&2
import json
import sys
from pathlib import Path

from kdlab.tables import markdown_table

runs, extra = Path(sys.argv[1]), sys.argv[2]


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


rows = []
for line in (runs / "status.tsv").read_text().splitlines():
    name, overrides, status, wall = line.split("\t")
    metrics = runs / name / "metrics.json"
    results = json.loads(metrics.read_text()) if status == "ok" and metrics.is_file() else {}
    top1 = results.get("metrics", {}).get("test/student/top1")
    student_s = results.get("wall_time_s")
    rows.append([name, f"`{overrides}`", status, wall, cell(student_s, ".1f"), cell(top1, ".4f")])
print("## Schemes: a short run each (python -m kdlab.run, Fashion-MNIST)\n")
print(
    "One epoch of 50 batches of 128 on the GPU (a teacher, Born-Again's generations and the stored "
    "student-alone row trained with the same budget, once, in a shared store), then validation and the "
    "10,000-image test set. Wall: the whole command; student: metrics.json's wall_time_s (the student's "
    "fit and test alone). Top-1: metrics.json's test/student/top1."
    + (f" Extra overrides: `{extra}`." if extra else "")
    + "\n"
)
header = ["run", "overrides", "status", "wall s", "student s", "test top-1"]
print(markdown_table(header, rows) + "\n")
EOF

# ---------------------------------------------------------------- 3b. bench.py, compiled teacher
bench fp32_compiled --precision 32-true --compile-teacher
bench bf16_compiled --precision bf16-mixed --compile-teacher
$PYTHON - "$OUT/bench" "${BENCH_ARGS[*]}" <<'EOF' | emit || echo "gpu_check: no bench table written" >&2
import json
import math
import sys
from pathlib import Path

from kdlab.tables import markdown_table

folder, args = Path(sys.argv[1]), sys.argv[2]
COLUMNS = {
    "fp32": "fp32",
    "bf16": "bf16-mixed",
    "fp32_compiled": "fp32, compiled teacher",
    "bf16_compiled": "bf16-mixed, compiled teacher",
}
status = {}
for line in (folder / "status.tsv").read_text().splitlines():
    label, state, wall = line.split("\t")
    status[label] = (state, wall)
figures = {}
for label in COLUMNS:
    path = folder / f"{label}.json"
    figures[label] = json.loads(path.read_text()) if path.is_file() else {}


def cell(label: str, fmt: str, *keys: str) -> str:
    """The figure at `keys` in `label`'s JSON, formatted; "-" where there is none."""
    value = figures[label]
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def row(title: str, fmt: str, *keys: str) -> list[str]:
    return [title, *(cell(label, fmt, *keys) for label in COLUMNS)]


variants = next((f["img_per_s"] for f in figures.values() if f), {})
ratios = next((f["ratios"] for f in figures.values() if f), {})
rows = [
    ["status", *(status.get(label, ("not run", ""))[0] for label in COLUMNS)],
    ["wall s", *(status.get(label, ("", "-"))[1] for label in COLUMNS)],
    row("device", "s", "settings", "device"),
]
rows += [row(f"{name} (img/s)", ",.0f", "img_per_s", name) for name in variants]
rows += [row(f"ratio {name}", ".3f", "ratios", name) for name in ratios]
rows.append(row("cache build s (0: reused)", ".1f", "cache_build_s"))
rows.append(row("stored views build s (0: reused)", ".1f", "stored_views", "build_s"))
print("## scripts/bench.py: kdlab against hand-written PyTorch\n")
print(
    f"Fashion-MNIST, DeepNN teacher and LightNN student, batch 128 (`scripts/bench.py {args}`; variants "
    "and ratios as in the README's Speed section). The work folder is shared, so the first run builds the "
    "teacher-output cache and the stored views and the others reuse them.\n"
)
print(markdown_table(["variant", *COLUMNS.values()], rows) + "\n")
EOF
echo "gpu_check: $(($(date +%s) - START)) s of the ${BUDGET} s budget; report in $MD" >&2
