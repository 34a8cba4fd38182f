"""scripts/summarize.py on a hand-made sweep directory: the rows, means and sample stds over seeds."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "summarize.py"
# (mode, temperature, seed) -> (student test top-1, agreement); a grid sweep as Hydra runs it.
RESULTS = {
    ("offline", "2", "1"): (0.80, 0.90),
    ("offline", "2", "2"): (0.82, 0.94),
    ("offline", "10", "1"): (0.70, 0.80),
    ("offline", "10", "2"): (0.76, 0.84),
    ("baseline", "2", "1"): (0.75, None),
    ("baseline", "2", "2"): (0.77, None),
    ("baseline", "10", "1"): (0.73, None),
    ("baseline", "10", "2"): (0.79, None),
}


def _job(job_dir, overrides, results=None, failed=False):
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (job_dir / "metrics.json").write_text(json.dumps(results))
    if failed:
        (job_dir / "failed.json").write_text(json.dumps({"error": "KdlabError", "message": "no"}))


@pytest.fixture()
def sweep(tmp_path):
    """Eight finished jobs (2 modes x 2 temperatures x 2 seeds) and one that failed after writing metrics."""
    root = tmp_path / "sweep"
    for num, ((mode, temperature, seed), (top1, agreement)) in enumerate(RESULTS.items()):
        metrics = {"test/student/top1": top1, "val/student/top1": 0.5}
        if agreement is not None:
            metrics["test/student/agreement"] = agreement
        _job(
            root / str(num),
            # paths.* and hydra.* differ per job and the seed varies: none of them makes a configuration.
            [
                f"paths.teacher_store=/s/{num}",
                f"hydra.run.dir=/r/{num}",
                "trainer.max_epochs=1",
                f"mode={mode}",
                f"knowledge.kd.temperature={temperature}",
                f"seed={seed}",
            ],
            {"mode": mode, "knowledge": ["kd"] if mode == "offline" else [], "metrics": metrics},
        )
    _job(
        root / "8",
        ["mode=offline", "knowledge.kd.temperature=3", "seed=1"],
        {"mode": "offline", "knowledge": ["kd"], "metrics": {"test/student/top1": 0.1}},
        failed=True,
    )
    return root


def _summarize(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def _expected(mode, temperature=None):
    runs = [v for (m, t, _), v in RESULTS.items() if m == mode and temperature in (None, t)]
    top1 = [top1 for top1, _ in runs]
    return statistics.mean(top1), statistics.stdev(top1), len(runs)


def test_rows_are_configurations_with_mean_and_sample_std_over_seeds(sweep):
    proc = _summarize(sweep)
    assert proc.returncode == 0, proc.stderr
    with (sweep / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    # The baseline is one labelled row: the temperature does not apply to it, so its 4 runs pool.
    # Then one row per temperature, in numeric order (2 before 10); the configuration whose only job
    # failed is a row of n = 0 at the end, its error as the finding.
    assert [(r["method"], r["knowledge.kd.temperature"], r["n"]) for r in rows] == [
        ("baseline (student alone)", "-", "4"),
        ("offline kd", "2", "2"),
        ("offline kd", "10", "2"),
        ("offline", "3", "0"),
    ]
    assert rows[3]["finding"] == "failed (KdlabError): no." and rows[3]["student top-1 mean"] == ""
    assert list(rows[0]) == [
        "method", "knowledge.kd.temperature", "student top-1 mean", "student top-1 std",
        "agreement mean", "agreement std", "gain", "gain ci95 low", "gain ci95 high",
        "paired gain", "paired ci95 low", "paired ci95 high", "paired seeds", "n", "finding",
    ]  # fmt: skip
    for row, (mode, temperature) in zip(
        rows[:3], [("baseline", None), ("offline", "2"), ("offline", "10")], strict=True
    ):
        mean, std, n = _expected(mode, temperature)
        assert float(row["student top-1 mean"]) == pytest.approx(mean)
        assert float(row["student top-1 std"]) == pytest.approx(std)
    # By hand: T=2 agreement 0.90, 0.94 -> 0.92 ± 0.0283; T=10 top-1 0.70, 0.76 -> 0.73 ± 0.0424.
    assert float(rows[1]["agreement mean"]) == pytest.approx(0.92)
    assert float(rows[1]["agreement std"]) == pytest.approx(0.0282843, abs=1e-6)
    assert float(rows[2]["student top-1 std"]) == pytest.approx(0.0424264, abs=1e-6)
    assert rows[0]["agreement mean"] == rows[0]["agreement std"] == ""  # no teacher, no agreement
    # Gain over the pooled baseline (0.75, 0.77, 0.73, 0.79) with Welch's 95% interval, by hand for T=2
    # (0.80, 0.82): 0.05; variances of the means 0.0002/2 and 0.002667/4, so se = 0.016330;
    # Welch-Satterthwaite df = (1e-4 + 1.6667e-4)^2 / ((1e-4)^2/1 + (1.6667e-4)^2/3) = 3.692; t(0.975, 3.692)
    # = 2.870 (between the table's 3.182 at df 3 and 2.776 at df 4); half-width 0.04687.
    assert float(rows[1]["gain"]) == pytest.approx(0.05)
    assert float(rows[1]["gain ci95 low"]) == pytest.approx(0.05 - 0.046869, abs=1e-5)
    assert float(rows[1]["gain ci95 high"]) == pytest.approx(0.05 + 0.046869, abs=1e-5)
    assert rows[0]["gain"] == ""  # the baseline has no gain over itself
    # Paired by seed: the pooled baseline's mean per seed is 0.74 (seed 1) and 0.78 (seed 2); T=2 gives
    # 0.80, 0.82, so differences 0.06 and 0.04: mean 0.05, sd 0.01414, se 0.01, t(0.975, 1) = 12.706.
    assert float(rows[1]["paired gain"]) == pytest.approx(0.05)
    assert float(rows[1]["paired ci95 low"]) == pytest.approx(0.05 - 0.12706, abs=1e-5)
    assert float(rows[1]["paired ci95 high"]) == pytest.approx(0.05 + 0.12706, abs=1e-5)
    assert rows[1]["paired seeds"] == "2"
    # The chart of the gains: one bar per distillation row, drawn as a real PNG.
    from matplotlib.image import imread

    chart = sweep / "summary.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(chart) in proc.stdout
    height, width, _ = imread(chart).shape
    assert width >= 5 * 120 and height > 100  # 5 inches of plot beside the labels, at 120 dpi

    table = (sweep / "summary.md").read_text()
    assert table.strip() in proc.stdout
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()]
    assert cells[0] == [
        "method", "knowledge.kd.temperature", "student top-1", "agreement", "gain in top-1 (95% CI)",
        "paired by seed (95% CI, seeds)", "n", "finding",
    ]  # fmt: skip
    assert cells[2:] == [
        ["baseline (student alone)", "-", "0.7600 ± 0.0258", "-", "-", "-", "4", ""],
        ["offline kd", "2", "0.8100 ± 0.0141", "0.9200 ± 0.0283", "+0.0500 [+0.0031, +0.0969]",
         "+0.0500 [-0.0771, +0.1771] (2)", "2", ""],
        ["offline kd", "10", "0.7300 ± 0.0424", "0.8200 ± 0.0283", "-0.0300 [-0.2501, +0.1901]",
         "-0.0300 [-0.1571, +0.0971] (2)", "2", ""],
        ["offline", "3", "-", "-", "-", "-", "0", "failed (KdlabError): no."],
    ]  # fmt: skip
    assert "seed" not in cells[0] and "paths." not in table and "hydra." not in table  # no seed column
    assert f"Failed: {sweep / '8'}" in proc.stderr


def test_out_prefix_chooses_where_both_files_go(sweep, tmp_path):
    proc = _summarize(sweep, "--out", tmp_path / "tables" / "kd")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tables" / "kd.md").read_text().startswith("| method")
    assert (tmp_path / "tables" / "kd.csv").read_text().startswith("method,")
    assert not (sweep / "summary.md").exists()


def test_one_configuration_over_seeds_has_no_setting_columns(tmp_path):
    for seed, top1 in ((1, 0.6), (2, 0.7), (3, 0.8)):
        _job(
            tmp_path / "runs" / str(seed),
            [f"seed={seed}"],
            {"mode": "online", "knowledge": ["dml"], "metrics": {"test/student/top1": top1}},
        )
    proc = _summarize(tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "runs" / "summary.csv").open()))
    assert [(r["method"], r["n"]) for r in rows] == [("online dml", "3")]
    assert float(rows[0]["student top-1 mean"]) == pytest.approx(0.7)
    assert float(rows[0]["student top-1 std"]) == pytest.approx(0.1)
    assert not (tmp_path / "runs" / "summary.png").exists()  # no baseline, no gains to draw


def test_a_directory_without_results_is_a_clear_error(tmp_path):
    _job(tmp_path / "sweep" / "0", ["seed=1"], failed=True)
    proc = _summarize(tmp_path / "sweep")
    assert proc.returncode != 0
    assert "No metrics.json below" in proc.stderr and str(tmp_path / "sweep") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep" / "summary.md").exists()


def test_wall_time_and_findings_columns(tmp_path):
    root = tmp_path / "sweep"
    for num, (mode, seed, top1, wall) in enumerate(
        [
            ("baseline", 1, 0.80, 10.0),
            ("baseline", 2, 0.82, 14.0),
            ("offline", 1, 0.79, 30.0),
            ("offline", 2, 0.80, 32.5),
        ]
    ):
        _job(
            root / str(num),
            [f"mode={mode}", f"seed={seed}"],
            {"mode": mode, "knowledge": ["kd"] if mode == "offline" else [], "wall_time_s": wall,
             "metrics": {"test/student/top1": top1}},
        )  # fmt: skip
    findings = tmp_path / "findings.yaml"
    findings.write_text("offline kd: >\n  budget: the student\n  is underfit\nnot a row: dropped\n")
    proc = _summarize(root, "--findings", findings)
    assert proc.returncode == 0, proc.stderr
    assert "not a row" in proc.stderr
    cells = [
        [c.strip() for c in line.split("|")[1:-1]] for line in (root / "summary.md").read_text().splitlines()
    ]
    assert cells[0][-2:] == ["wall time (s)", "finding"]
    # Means over each row's runs: (10 + 14) / 2 = 12 and (30 + 32.5) / 2 = 31.25, shown to the second.
    assert cells[2][0] == "baseline (student alone)" and cells[2][-2:] == ["12", ""]
    assert cells[3][0] == "offline kd" and cells[3][-2:] == ["31", "budget: the student is underfit"]
    with (root / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert float(rows[1]["wall time s"]) == pytest.approx(31.25)
    assert rows[1]["finding"] == "budget: the student is underfit"


def test_method_is_the_knowledge_chosen_on_the_command_line(tmp_path):
    """knowledge=dot runs KD's term with another optimizer: its row must not pool with knowledge=kd's."""
    root = tmp_path / "sweep"
    for num, (chosen, seed, top1) in enumerate(
        [("kd", 1, 0.8), ("kd", 2, 0.82), ("dot", 1, 0.7), ("dot", 2, 0.72)]
    ):
        _job(
            root / str(num),
            ["mode=offline", f"knowledge={chosen}", f"seed={seed}"],
            {"mode": "offline", "knowledge": ["kd"], "metrics": {"test/student/top1": top1}},
        )
    summed = {"mode": "offline", "knowledge": ["crd", "kd"], "metrics": {"test/student/top1": 0.9}}
    _job(root / "4", ["mode=offline", "knowledge=[crd,kd]", "seed=1"], summed)
    assert _summarize(root).returncode == 0
    with (root / "summary.csv").open() as file:
        rows = {row["method"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"offline kd", "offline dot", "offline crd+kd"}
    assert float(rows["offline dot"]["student top-1 mean"]) == pytest.approx(0.71)
    assert float(rows["offline kd"]["student top-1 mean"]) == pytest.approx(0.81)


def test_a_failed_configuration_takes_its_finding_from_the_failed_key(sweep, tmp_path):
    findings = tmp_path / "findings.yaml"
    findings.write_text("offline (failed): not applicable here\noffline kd: ran\n")
    assert _summarize(sweep, "--findings", findings).returncode == 0
    with (sweep / "summary.csv").open() as file:
        rows = {(row["method"], row["n"]): row["finding"] for row in csv.DictReader(file)}
    assert rows[("offline", "0")] == "not applicable here"
    assert rows[("offline kd", "2")] == "ran"


def test_a_sweep_without_baseline_jobs_reads_the_baselines_its_runs_stored(tmp_path):
    """Runs with the default baseline_row: true record the student alone of their seed. Two methods
    over two seeds share two stored entries: the baseline row has one run per entry, not per job."""
    alone = {"1": 0.70, "2": 0.74}
    for num, (method, seed, top1) in enumerate(
        [("kd", "1", 0.73), ("kd", "2", 0.76), ("at", "1", 0.71), ("at", "2", 0.75)]
    ):
        results = {
            "mode": "offline",
            "knowledge": [method],
            "baseline": {"source": "store", "path": f"/store/lightnn-{seed}/teacher.pt", "key": seed},
            "metrics": {"test/student/top1": top1, "test/baseline/top1": alone[seed]},
        }
        _job(tmp_path / "runs" / str(num), [f"knowledge={method}", f"seed={seed}"], results)
    proc = _summarize(tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "runs" / "summary.csv").open())}
    assert list(rows) == ["baseline (student alone)", "offline at", "offline kd"]
    assert rows["baseline (student alone)"]["n"] == "2"
    assert float(rows["baseline (student alone)"]["student top-1 mean"]) == pytest.approx(0.72)
    # kd: +0.03 and +0.02 over the same seeds' entries
    assert float(rows["offline kd"]["paired gain"]) == pytest.approx(0.025)
    assert rows["offline kd"]["paired seeds"] == "2"
    assert float(rows["offline at"]["gain"]) == pytest.approx(0.73 - 0.72)
