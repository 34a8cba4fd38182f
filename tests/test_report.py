"""The results tables: the markdown formatter (kdlab.tables) that runs and scripts/summarize.py share."""

from __future__ import annotations

import subprocess
import sys

from kdlab.report import format_table
from kdlab.tables import markdown_table
from tests.conftest import ROOT


def test_markdown_table_pads_each_column_to_its_widest_cell():
    table = markdown_table(["model", "n"], [["teacher", "12"], ["s", "3"]])
    assert table.splitlines() == [
        "| model   | n  |",
        "| ------- | -- |",
        "| teacher | 12 |",
        "| s       | 3  |",
    ]
    assert markdown_table(["a"], []) == "| a |\n| - |"  # no rows: the header alone


def test_run_table_drops_empty_columns_and_formats_the_cells():
    rows = [
        {"model": "teacher", "architecture": "deepnn", "params": 1_234_567, "test top-1": 0.8123456},
        {"model": "student", "architecture": "lightnn", "params": 9000, "test top-1": 0.7, "agreement": 0.9},
    ]
    assert format_table(rows).splitlines() == [
        "| model   | architecture | params | test top-1 | agreement |",
        "| ------- | ------------ | ------ | ---------- | --------- |",
        "| teacher | deepnn       | 1.23M  | 0.8123     | -         |",
        "| student | lightnn      | 9000   | 0.7000     | 0.9000    |",
    ]


def test_run_table_formats_the_costs_and_heads_the_latency_with_the_batch_size():
    # What kdlab.efficiency measures: FLOPs per image, weights in MB, latency in ms at batch 1 and N.
    def row(model, params, flops, megabytes, ms_1, ms_batch):
        costs = {"FLOPs": flops, "weights MB": megabytes, "ms @ 1": ms_1, "ms @ batch": ms_batch}
        return {"model": model, "params": params, **costs}

    rows = [
        row("teacher", 938_922, 1_234_567_890, 3.76, 6.4123, 1234.5),
        row("student", 206_010, 1_535_488, 0.827, 0.35912, 14.74),
        row("tiny", 500, 520, 0.0021, 0.01, 0.5),
        {"model": "ensemble", "params": None},
    ]
    assert format_table(rows, batch_size=128).splitlines() == [
        "| model    | params | FLOPs | weights MB | ms @ 1 | ms @ 128 |",
        "| -------- | ------ | ----- | ---------- | ------ | -------- |",
        "| teacher  | 0.94M  | 1.2G  | 3.76       | 6.41   | 1234     |",
        "| student  | 0.21M  | 1.5M  | 0.83       | 0.359  | 14.7     |",
        "| tiny     | 500    | 520   | 0.0021     | 0.01   | 0.5      |",
        "| ensemble | -      | -     | -          | -      | -        |",
    ]
    assert format_table(rows).splitlines()[0].endswith("| ms @ 1 | ms @ batch |")  # no batch size given


def test_summarize_starts_without_torch():
    # The reason kdlab.tables imports nothing heavy: the script reads JSON files, and torch alone
    # takes seconds to import.
    code = "import sys; sys.path.insert(0, 'scripts'); import summarize; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
