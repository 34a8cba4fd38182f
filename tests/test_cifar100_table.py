"""scripts/cifar100_table.py: its sweeps compose, its published numbers parse, and its table is recomputed.

The real command trains for hours on a GPU; here its sweeps are composed (not run), and its table is
rendered from hand-made run directories whose means and stds are worked out by hand.
"""

from __future__ import annotations

import json
import shlex

import pytest

from tests.conftest import ROOT, compose_config

cifar100_table = pytest.importorskip("scripts.cifar100_table")


def test_every_method_and_pair_is_a_kdlab_config():
    for knowledge in cifar100_table.METHODS.values():
        for name in knowledge:
            assert (ROOT / "conf" / "knowledge" / f"{name}.yaml").is_file(), name
    for pair in cifar100_table.PAIRS:
        assert (ROOT / "conf" / "experiment" / "cifar100" / f"{pair}.yaml").is_file(), pair


def test_published_numbers_are_read_from_the_published_file():
    table = cifar100_table.published_table()
    # CRD Table 1 (via RepDistiller's README), resnet32x4 -> resnet8x4.
    assert table["KD"]["resnet32x4 → resnet8x4"] == "73.33"
    assert table["CRD"]["resnet32x4 → resnet8x4"] == "75.51"
    assert table["Student alone"]["resnet56 → resnet20"] == "69.06"
    assert set(cifar100_table.METHODS) <= set(table)
    for column in cifar100_table.PAIRS.values():
        assert column in table["Teacher"]


def test_the_sweeps_compose_with_the_crd_protocol(tmp_path):
    commands = cifar100_table.commands("resnet56_resnet20", "1,2,3,4,5", tmp_path, ["trainer=gpu"])
    assert len(commands) == 3
    for command in commands:
        args = command[command.index("-m", 2) + 1 :]
        assert "seed=1,2,3,4,5" in args and "test_last_epoch=true" in args and "ckpt_path=auto" in args
        # One job of each sweep: the first value of every swept override.
        one = [arg.split(",")[0] if "=" in arg and "[" not in arg else arg for arg in args]
        cfg = compose_config([a for a in one if not a.startswith("hydra.")])
        assert cfg.trainer.max_epochs == 240 and cfg.data.batch_size == 64
        assert cfg.teacher.name == "resnet56" and cfg.student.name == "resnet20"
        assert cfg.test_last_epoch is True
    swept = shlex.join(commands[1])
    for name, knowledge in cifar100_table.METHODS.items():
        if len(knowledge) == 1:
            assert f",{knowledge[0]}," in f",{swept.split('knowledge=')[1].split()[0]},", name
    assert "knowledge=[crd,kd]" in commands[2]


def _run(root, pair, group, num, mode, knowledge, metrics):
    job = root / pair / group / str(num)
    job.mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({"mode": mode, "knowledge": knowledge, "metrics": metrics}))


def test_rendered_table_gives_last_and_best_epoch_means(tmp_path):
    pair = "resnet32x4_resnet8x4"
    for num, (last, best) in enumerate([(0.70, 0.71), (0.72, 0.74), (0.74, 0.74)]):
        _run(
            tmp_path,
            pair,
            "offline",
            num,
            "offline",
            ["kd"],
            {"test_last/student/top1": last, "test/student/top1": best, "test/teacher/top1": 0.79},
        )
    # A run that ended on its best epoch has no test_last: its one test is also its last epoch's.
    _run(tmp_path, pair, "baseline", 0, "baseline", [], {"test/student/top1": 0.69})
    _run(tmp_path, pair, "baseline", 1, "baseline", [], {"test/student/top1": 0.71})
    doc = tmp_path / "cifar100.md"
    text = cifar100_table.render(tmp_path, doc)
    assert doc.read_text() == text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    section = text.split("## resnet32x4 → resnet8x4")[1].split("## ")[0]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in section.splitlines()
        if line.startswith("| ")
    }
    # KD: last 70, 72, 74 -> 72.00 ± 2.00; best 71, 74, 74 -> 73.00 ± 1.73 (sample std).
    assert rows["KD"][2:] == ["73.33", "72.00 ± 2.00 (n=3)", "73.00 ± 1.73 (n=3) |"]
    assert rows["Student alone"][2:] == ["72.50", "70.00 ± 1.41 (n=2)", "70.00 ± 1.41 (n=2) |"]
    assert rows["Teacher"][3:] == ["79.00 (n=1)", "79.00 (n=1) |"]
    assert rows["CRD"][3:] == ["not run yet", "not run yet |"]
