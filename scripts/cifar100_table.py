"""The CIFAR-100 table: every method on a CRD-benchmark pair, 5 seeds, beside the published numbers.

    python scripts/cifar100_table.py PAIR [--seeds 1,2,3,4,5] [--out results/cifar100] [-- overrides...]
    python scripts/cifar100_table.py --render [--out results/cifar100]

PAIR is a config of conf/experiment/cifar100/ (e.g. resnet32x4_resnet8x4). The first form runs the
student alone and every method the published table has (KD, FitNet, AT, SP, CC, VID, RKD, PKT, AB,
FT, FSP, NST, CRD, CRD+KD, DKD, ReviewKD, MLKD, CTKD, LS) with the CRD protocol (240 epochs of SGD,
conf/experiment/cifar100/), one Hydra multirun per group, every job with `ckpt_path=auto` (rerun the
command to resume) and `test_last_epoch=true`; then it renders docs/results/cifar100.md. `--render`
only renders, from whatever runs OUT holds. Extra arguments after `--` go to every run (e.g.
`trainer=gpu data.root=/data/cifar`). A GPU run: about 1-3 hours per job on one modern GPU; the
whole table for one pair is about 100 jobs, so spread the sweeps over machines (same OUT).

The published numbers come from docs/results/cifar100_published.md (its table and sources). kdlab's
columns are the mean ± sample std over seeds of the student's test top-1 at the last epoch (what the
CRD paper reports) and at the epoch with the best validation top-1. Published means come from the
papers (several runs each, see the published file for what each says) and some report the best
epoch on the test set, which kdlab never does: it selects on its validation split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "docs" / "results" / "cifar100_published.md"
DOC = ROOT / "docs" / "results" / "cifar100.md"
# The published table's column for each conf/experiment/cifar100 pair.
PAIRS = {
    "wrn_40_2_wrn_16_2": "WRN-40-2 → WRN-16-2",
    "resnet56_resnet20": "resnet56 → resnet20",
    "resnet110_resnet32": "resnet110 → resnet32",
    "resnet32x4_resnet8x4": "resnet32x4 → resnet8x4",
    "vgg13_vgg8": "vgg13 → vgg8",
    "resnet32x4_shufflev2": "resnet32x4 → ShuffleNetV2",
}
# Published row -> kdlab's knowledge (a list for a sum), or the row's role.
METHODS = {
    "KD": ["kd"],
    "FitNet": ["fitnet"],
    "AT": ["at"],
    "SP": ["sp"],
    "CC": ["cc"],
    "VID": ["vid"],
    "RKD": ["rkd"],
    "PKT": ["pkt"],
    "AB": ["ab"],
    "FT": ["ft"],
    "FSP": ["fsp"],
    "NST": ["nst"],
    "CRD": ["crd"],
    "CRD+KD": ["crd", "kd"],
    "DKD": ["dkd"],
    "ReviewKD": ["reviewkd"],
    "MLKD": ["mlkd"],
    "KD+CTKD": ["ctkd"],
    "KD+LS": ["ls"],
}
TEACHER, ALONE = "Teacher", "Student alone"
LAST, BEST = "test_last/student/top1", "test/student/top1"


def published_table(path: Path = PUBLISHED) -> dict[str, dict[str, str]]:
    """The published markdown table: row name -> column header -> cell (markers such as † kept)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        # A row marked † (numbers quoted by a third party) carries the mark on each of its numbers.
        name, mark = cells[0].replace("†", "").strip(), " †" if "†" in cells[0] else ""
        table[name] = {column: cell + mark for column, cell in zip(header[1:], cells[1:], strict=True)}
    return table


def commands(pair: str, seeds: str, out: Path, extra: list[str]) -> list[list[str]]:
    """The Hydra multiruns that fill one pair's column: the student alone, then each method group."""
    common = [
        f"experiment=cifar100/{pair}",
        f"seed={seeds}",
        "test_last_epoch=true",
        "baseline_row=false",
        "ckpt_path=auto",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    single = ",".join(knowledge[0] for knowledge in METHODS.values() if len(knowledge) == 1)
    run = [sys.executable, "-m", "kdlab.run", "-m"]
    return [
        [*run, "mode=baseline", f"hydra.sweep.dir={out / pair / 'baseline'}", *common],
        [*run, f"knowledge={single}", f"hydra.sweep.dir={out / pair / 'offline'}", *common],
        [*run, "knowledge=[crd,kd]", f"hydra.sweep.dir={out / pair / 'crd_kd'}", *common],
    ]


def collect(out: Path) -> dict[str, dict[str, list[dict]]]:
    """pair -> row name -> the metrics of its finished runs."""
    found: dict[str, dict[str, list[dict]]] = {}
    by_knowledge = {tuple(k): name for name, k in METHODS.items()}
    for path in sorted(out.glob("*/*/*/metrics.json")):
        pair = path.relative_to(out).parts[0]
        results = json.loads(path.read_text())
        metrics = results.get("metrics", {})
        rows = found.setdefault(pair, {})
        if results.get("mode") == "baseline":
            rows.setdefault(ALONE, []).append(metrics)
            continue
        name = by_knowledge.get(tuple(results.get("knowledge") or []))
        if name:
            rows.setdefault(name, []).append(metrics)
        if "test/teacher/top1" in metrics and TEACHER not in rows:  # one teacher, shared by every run
            rows[TEACHER] = [{BEST: metrics["test/teacher/top1"]}]
    return found


def _cell(runs: list[dict], key: str) -> str:
    # The last epoch is the best when the run has no test_last (it ended on its best epoch).
    values = [100 * run.get(key, run.get(BEST)) for run in runs if run.get(key, run.get(BEST)) is not None]
    if not values:
        return "not run yet"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def render(out: Path, doc: Path = DOC) -> str:
    """docs/results/cifar100.md: per pair, the published number beside kdlab's last and best epoch."""
    published = published_table()
    found = collect(out)
    parts = [
        "# CIFAR-100, the CRD benchmark: published numbers beside kdlab's",
        "",
        "Generated by `python scripts/cifar100_table.py PAIR` (which runs the methods, 5 seeds each,",
        "with the CRD protocol of `conf/experiment/cifar100/`) and `--render`; do not edit by hand.",
        "Top-1 % on the CIFAR-100 test set.",
        "",
        "- **Published**: the papers' figures, means over several runs (most papers say 5; what each",
        "  source says, and the sources, are in [cifar100_published.md](cifar100_published.md)). The CRD",
        "  paper's are last-epoch figures; DKD's and LS's are best-epoch ones.",
        "- **kdlab**: mean ± std over seeds of the student's top-1 at the **last epoch** (comparable with",
        "  CRD's) and at the epoch with the best **validation** top-1 (kdlab never selects on the test set).",
        "- kdlab trains on 45,000 of the 50,000 training images (the other 5,000 are its validation split);",
        "  the papers train on all 50,000.",
        "",
    ]
    for pair, column in PAIRS.items():
        rows = found.get(pair, {})
        parts += [f"## {column} (`experiment=cifar100/{pair}`)", ""]
        parts += [
            "| method | kdlab knowledge | published | kdlab, last epoch | kdlab, best validation epoch |"
        ]
        parts += ["| --- | --- | --- | --- | --- |"]
        for name in [TEACHER, ALONE, *METHODS]:
            knowledge = {TEACHER: "-", ALONE: "mode=baseline"}.get(name) or "+".join(METHODS[name])
            runs = rows.get(name, [])
            parts.append(
                f"| {name} | {knowledge} | {published.get(name, {}).get(column, 'n/a')} | "
                f"{_cell(runs, LAST)} | {_cell(runs, BEST)} |"
            )
        parts.append("")
    text = "\n".join(parts)
    doc.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pair", nargs="?", choices=sorted(PAIRS), help="a conf/experiment/cifar100 pair")
    parser.add_argument(
        "--seeds", default="1,2,3,4,5", help="the seeds (default 1,2,3,4,5, as the papers' 5 runs)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/cifar100"), help="where the runs go")
    parser.add_argument("--render", action="store_true", help="only write the table from the runs in --out")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    if not args.render:
        if args.pair is None:
            parser.error("name a PAIR to run (or pass --render to only write the table)")
        for command in commands(args.pair, args.seeds, args.out.resolve(), extra):
            print(" ".join(command), flush=True)
            if not args.dry_run:
                subprocess.run(command, check=True, cwd=ROOT)
        if args.dry_run:
            return
    render(args.out.resolve())
    print(f"Written: {DOC}")


if __name__ == "__main__":
    main()
