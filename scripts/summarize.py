"""The results table of a sweep: one row per configuration, mean ± std over its seeds.

    python scripts/summarize.py multirun/2025-01-01/12-00-00-000000 [--out PREFIX]

Reads every run's `metrics.json` below the directory, and the overrides its job was started
with (`.hydra/overrides.yaml`). A configuration is the set of overrides that differ between
the runs, leaving out the seed and settings that only change where or how a run reports.
Each row gives the student's test top-1 and its agreement with the teacher as mean ± sample
standard deviation over the configuration's runs, and n. Runs with `mode=baseline` form
their own labelled rows: the student alone, the reference a distillation table is read
against. A sweep without such runs takes the student alone from the baseline rows its runs stored
(`baseline_row: true`, the default: metrics.json's `baseline` and `test/baseline/top1`). Every
other row's gain in top-1 over its baseline (the baseline row with the same settings, apart from
the distillation ones) comes with a 95% confidence interval: Welch's t
interval for a difference of two means with unequal variances (Welch 1947), which needs at
least two runs on each side; and, where the runs of both share seeds, the paired interval over
those seeds (a student and its baseline with one seed share their initialisation and batch
order, so the per-seed difference varies less than either side; a baseline row that pools
several runs of a seed gives their mean). The table is printed and written to PREFIX.md and PREFIX.csv
(default: DIR/summary); the gains, with their intervals as error bars, are drawn in PREFIX.png.
Where the runs recorded it, a column gives each row's mean wall time (a run's training and testing,
`wall_time_s` in metrics.json). A configuration none of whose jobs ran (each left a failed.json) is a
row too, of n = 0, with the error's first sentence as its finding. `--findings FILE` gives each row
what was found about it, from a YAML mapping of the method, as the table names it, to text (a failed
configuration's key is "<method> (failed)").
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

from scipy import stats

from kdlab.errors import KdlabError
from kdlab.sweeps import FAILED_FILE, METRICS_FILE, override_dict, read_overrides, varying_keys
from kdlab.tables import markdown_table

# Overrides that say which repeat a run is, or where and how it reports: never what is compared.
NOT_COMPARED = (
    "seed",
    "paths.",
    "hydra.",
    "hydra/",
    "logger",
    "hparams_search",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)
# Shown in the method column instead (the scheme and the knowledge terms a run really used).
IN_METHOD = ("mode", "knowledge")
# A baseline trains with cross-entropy alone, so the distillation and teacher settings do not apply to it.
NOT_FOR_BASELINE = ("knowledge", "mode.", "dot.", "teacher", "model@teacher")
BASELINE = "baseline (student alone)"
NOT_APPLICABLE = "-"
DEFAULT = "default"
MEASURES = {"student top-1": "test/student/top1", "agreement": "test/student/agreement"}
GAIN = "student top-1"  # the measure whose gain over the baseline is given
GAIN_FIELDS = ("gain", "gain ci95 low", "gain ci95 high")
WALL = "wall time s"  # a run's training and testing (metrics.json's wall_time_s), mean over the row's runs
FINDING = "finding"
PAIRED_FIELDS = ("paired gain", "paired ci95 low", "paired ci95 high", "paired seeds")


def collect(root: Path) -> tuple[list[dict], list[Path]]:
    """Every finished run below root, as {method, overrides, metrics}; and the failed jobs' directories."""
    if not root.is_dir():
        raise KdlabError(
            f"{root} is not a directory. Pass a run or sweep directory (outputs/... or multirun/...)."
        )
    # A metrics.json beside a failed.json is from a job that failed after writing it, or an earlier attempt.
    failed = sorted(path.parent for path in root.rglob(FAILED_FILE))
    runs = []
    for path in sorted(root.rglob(METRICS_FILE)):
        if path.parent in failed:
            continue
        results = json.loads(path.read_text())
        overrides = override_dict(read_overrides(path.parent))
        runs.append(
            {
                "method": _method(results, overrides.get("knowledge")),
                "overrides": overrides,
                "metrics": results.get("metrics", {}),
                "wall_time_s": results.get("wall_time_s"),
                "baseline": results.get("baseline"),
            }
        )
    if not any(run["method"] == BASELINE for run in runs):
        runs += stored_baselines(runs)
    if not runs:
        raise KdlabError(
            f"No {METRICS_FILE} below {root}: no run in it has finished. Pass the directory of a sweep "
            f"(multirun/<date>/<time>) or of runs (outputs/) whose jobs have completed."
        )
    return runs, failed


def stored_baselines(runs: list[dict]) -> list[dict]:
    """The student alone as the runs' baseline rows recorded it (kdlab/baseline_row.py), one run per
    stored entry: a sweep run with the default `baseline_row: true` has its baseline without a
    `mode=baseline` job. That entry is the mode=baseline run of its seed, so a sweep holding such
    jobs uses them instead."""
    entries: dict[str, dict] = {}
    for run in runs:
        record, top1 = run.get("baseline"), run["metrics"].get("test/baseline/top1")
        if record and top1 is not None and record.get("path") not in entries:
            entries[record.get("path")] = {
                "method": BASELINE,
                "overrides": run["overrides"],  # the table sets the ones a baseline has no part in aside
                "metrics": {MEASURES[GAIN]: top1},
                "wall_time_s": None,  # trained once, by whichever run came first
            }
    return list(entries.values())


def _method(results: dict, chosen: str | None = None) -> str:
    """The scheme and the knowledge: as chosen on the command line (`knowledge=dot` is KD with another
    optimizer, so its terms alone would not tell it from `knowledge=kd`), else the terms the run used."""
    if results.get("mode") == "baseline":
        return BASELINE
    knowledge = chosen.strip("[]").replace(",", "+") if chosen else "+".join(results.get("knowledge") or [])
    return f"{results.get('mode')} {knowledge}".strip()


def setting_keys(runs: list[dict]) -> list[str]:
    """The override keys that tell the configurations apart: the columns of the table."""
    varying = varying_keys([run["overrides"] for run in runs])
    return [key for key in varying if not key.startswith(NOT_COMPARED) and key not in IN_METHOD]


def table(runs: list[dict], keys: list[str]) -> list[dict]:
    """One row per (method, settings): mean, sample std and n of each measure, baselines first."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        baseline = run["method"] == BASELINE
        settings = tuple(
            NOT_APPLICABLE
            if baseline and key.startswith(NOT_FOR_BASELINE)
            else run["overrides"].get(key, DEFAULT)
            for key in keys
        )
        groups.setdefault((run["method"], settings), []).append(run)
    rows = []
    for (method, settings), members in sorted(groups.items(), key=_row_order):
        row = {"method": method, **dict(zip(keys, settings, strict=True)), "n": len(members)}
        for name, metric in MEASURES.items():
            values = [run["metrics"][metric] for run in members if run["metrics"].get(metric) is not None]
            row[f"{name} mean"] = statistics.mean(values) if values else None
            row[f"{name} std"] = statistics.stdev(values) if len(values) > 1 else None
        times = [run["wall_time_s"] for run in members if run.get("wall_time_s") is not None]
        row[WALL] = statistics.mean(times) if times else None
        metric = MEASURES[GAIN]
        row["_values"] = [run["metrics"][metric] for run in members if metric in run["metrics"]]
        by_seed: dict[str, list[float]] = {}
        for run in members:
            if metric in run["metrics"] and "seed" in run["overrides"]:
                by_seed.setdefault(run["overrides"]["seed"], []).append(run["metrics"][metric])
        row["_by_seed"] = {seed: statistics.mean(values) for seed, values in by_seed.items()}
        rows.append(row)
    add_gains(rows, keys)
    for row in rows:
        del row["_values"], row["_by_seed"]
    return rows


def add_gains(rows: list[dict], keys: list[str]) -> None:
    """Each distillation row's gain over its baseline row, with Welch's 95% interval (None where unknown)."""
    shared = [key for key in keys if not key.startswith(NOT_FOR_BASELINE)]
    baselines = {tuple(row[key] for key in shared): row for row in rows if row["method"] == BASELINE}
    for row in rows:
        baseline = baselines.get(tuple(row[key] for key in shared))
        gain = paired = None
        if row["method"] != BASELINE and baseline is not None:
            gain = welch_interval(row["_values"], baseline["_values"])
            paired = paired_interval(row["_by_seed"], baseline["_by_seed"])
        row.update(zip(GAIN_FIELDS, gain or (None,) * 3, strict=True))
        row.update(zip(PAIRED_FIELDS, paired or (None,) * 4, strict=True))


def paired_interval(a: dict[str, float], b: dict[str, float], level: float = 0.95) -> tuple | None:
    """The mean per-seed difference a - b over the seeds both have, its `level` t interval, and the
    number of seeds (None with under 2 shared seeds)."""
    differences = [a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())]
    if len(differences) < 2:
        return None
    mean = statistics.mean(differences)
    half = stats.t.ppf(0.5 + level / 2, len(differences) - 1) * statistics.stdev(differences)
    half /= math.sqrt(len(differences))
    return mean, mean - half, mean + half, len(differences)


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """mean(a) - mean(b) and its `level` confidence interval by Welch's t (None with under 2 runs a side)."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return diff, diff, diff
    # Welch-Satterthwaite degrees of freedom (a side with zero variance adds nothing to them).
    df = (va + vb) ** 2 / sum(v**2 / (len(x) - 1) for v, x in ((va, a), (vb, b)) if v > 0)
    half = stats.t.ppf(0.5 + level / 2, df) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


def _row_order(item: tuple) -> tuple:
    (method, settings), _ = item
    # Baselines first, then by method and by each setting, numbers in numeric order.
    return (method != BASELINE, method, [_number_first(value) for value in settings])


def _number_first(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def markdown(rows: list[dict], keys: list[str]) -> str:
    header = ["method", *keys, *MEASURES, "gain in top-1 (95% CI)", "paired by seed (95% CI, seeds)", "n"]
    timed = any(row.get(WALL) is not None for row in rows)
    noted = any(row.get(FINDING) for row in rows)
    header += ["wall time (s)"] * timed + ["finding"] * noted
    cells = [
        [
            row["method"],
            *(row[key] for key in keys),
            *(_mean_std(row, m) for m in MEASURES),
            _gain(row),
            _paired(row),
            str(row["n"]),
            *([NOT_APPLICABLE if row[WALL] is None else f"{row[WALL]:.0f}"] * timed),
            *([row.get(FINDING) or ""] * noted),
        ]
        for row in rows
    ]
    return markdown_table(header, cells)


def failed_rows(failed: list[Path], rows: list[dict], keys: list[str]) -> list[dict]:
    """A row for each configuration whose every job failed: n = 0, and the error's first sentence as
    its finding (a method a pair cannot run is a result too, not a gap in the table)."""
    done = {(row["method"], tuple(row[key] for key in keys)) for row in rows}
    added: dict[tuple, dict] = {}
    for job in failed:
        failure = json.loads((job / FAILED_FILE).read_text())
        overrides = override_dict(read_overrides(job) or failure.get("overrides", []))
        # Named as a finished run's row is: the scheme and knowledge the job composed (in failed.json).
        mode = overrides.get("mode") or failure.get("mode") or "offline"
        method = _method({"mode": mode, "knowledge": failure.get("knowledge")}, overrides.get("knowledge"))
        settings = tuple(overrides.get(key, DEFAULT) for key in keys)
        if (method, settings) in done or (method, settings) in added:
            continue
        message = " ".join(str(failure.get("message", "")).split())
        row = {"method": method, **dict(zip(keys, settings, strict=True)), "n": 0}
        for name in MEASURES:
            row[f"{name} mean"] = row[f"{name} std"] = None
        row.update(dict.fromkeys((*GAIN_FIELDS, *PAIRED_FIELDS, WALL)))
        row[FINDING] = f"failed ({failure.get('error', 'error')}): {message.split('. ')[0].rstrip('.')}."
        added[(method, settings)] = row
    return [added[key] for key in sorted(added)]


def add_findings(rows: list[dict], path: Path | None) -> None:
    """Each row's finding from a YAML mapping of method (as the table names it) to text, if given."""
    if path is None:
        return
    import yaml

    findings = yaml.safe_load(path.read_text()) or {}
    unknown = set(findings) - {row["method"] for row in rows} - {f"{row['method']} (failed)" for row in rows}
    if unknown:
        print(
            f"Findings for methods not in the table (left out): {', '.join(sorted(unknown))}", file=sys.stderr
        )
    for row in rows:
        # A configuration that failed is looked up as "<method> (failed)": the same method may also
        # have rows that ran, with other settings.
        key = f"{row['method']} (failed)" if row["n"] == 0 else row["method"]
        row[FINDING] = " ".join(str(findings.get(key, "")).split()) or row.get(FINDING)


def _paired(row: dict) -> str:
    gain, low, high, seeds = (row[field] for field in PAIRED_FIELDS)
    return NOT_APPLICABLE if gain is None else f"{gain:+.4f} [{low:+.4f}, {high:+.4f}] ({seeds})"


def _gain(row: dict) -> str:
    gain, low, high = (row[field] for field in GAIN_FIELDS)
    return NOT_APPLICABLE if gain is None else f"{gain:+.4f} [{low:+.4f}, {high:+.4f}]"


def _mean_std(row: dict, measure: str) -> str:
    mean, std = row[f"{measure} mean"], row[f"{measure} std"]
    if mean is None:
        return NOT_APPLICABLE
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def write_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    fields = [
        "method",
        *keys,
        *(f"{m} {s}" for m in MEASURES for s in ("mean", "std")),
        *GAIN_FIELDS,
        *PAIRED_FIELDS,
        "n",
        *([WALL] if any(row.get(WALL) is not None for row in rows) else []),
        *([FINDING] if any(row.get(FINDING) for row in rows) else []),
    ]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)  # None is written as an empty cell


def write_gain_chart(path: Path, rows: list[dict], keys: list[str]) -> bool:
    """A horizontal bar per row with a gain, its 95% interval as the error bar; False if no row has one."""
    gained = [row for row in rows if row["gain"] is not None]
    if not gained:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Each setting as its last name part (teacher_cache.views=2 -> views=2): the labels stay short.
    labels = [
        ", ".join([row["method"], *(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in keys if row[k] != DEFAULT)])
        for row in gained
    ]
    # A "$" would start matplotlib's mathtext (an interpolation such as ${trainer.max_epochs}).
    labels = [label.replace("$", r"\$") for label in labels]
    gains = [row["gain"] for row in gained]
    errors = [[g - row["gain ci95 low"] for g, row in zip(gains, gained, strict=True)],
              [row["gain ci95 high"] - g for g, row in zip(gains, gained, strict=True)]]  # fmt: skip
    # Wide enough for the longest label beside a 5-inch plot (about 0.075 inch per character at 10 pt).
    width = 5 + 0.075 * max(len(label) for label in labels)
    figure = Figure(figsize=(width, 1.4 + 0.35 * len(gained)), layout="constrained")
    FigureCanvasAgg(figure)  # renders without a display
    axes = figure.add_subplot()
    positions = list(range(len(gained)))[::-1]  # the table's order, top to bottom
    colours = [
        "tab:green" if row["gain ci95 low"] > 0 else "tab:red" if row["gain ci95 high"] < 0 else "tab:gray"
        for row in gained
    ]
    axes.barh(positions, gains, xerr=errors, color=colours, capsize=3)
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(positions, labels)
    axes.set_xlabel(f"gain in {GAIN} over the student alone, with its 95% interval")
    axes.set_title("green: better than the student alone; red: worse; gray: not told apart", fontsize=9)
    figure.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a sweep directory (multirun/...) or a directory of runs")
    parser.add_argument("--out", type=Path, help="prefix of the .md, .csv and .png (default: DIR/summary)")
    parser.add_argument(
        "--findings", type=Path, help="a YAML file of method (as in the table) -> what was found, as a column"
    )
    args = parser.parse_args(argv)
    try:
        runs, failed = collect(args.dir)
    except KdlabError as error:
        parser.error(str(error))
    keys = setting_keys(runs)
    rows = table(runs, keys)
    rows += failed_rows(failed, rows, keys)
    for job in failed:
        print(
            f"Failed: {job} (see its {FAILED_FILE}); a configuration none of whose jobs ran is a row, n = 0.",
            file=sys.stderr,
        )
    add_findings(rows, args.findings)
    prefix = args.out or args.dir / "summary"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, keys)
    Path(f"{prefix}.md").write_text(text + "\n")
    write_csv(Path(f"{prefix}.csv"), rows, keys)
    written = [f"{prefix}.md", f"{prefix}.csv"]
    if write_gain_chart(Path(f"{prefix}.png"), rows, keys):
        written.append(f"{prefix}.png")
    print(f"{text}\n\n{len(runs)} runs in {len(rows)} rows. Written: {', '.join(written)}")


if __name__ == "__main__":
    main()
