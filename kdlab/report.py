"""The end of a run: the results table a researcher reads, and `metrics.json` beside it.

One row per model the scheme reports (teacher, student, peers): architecture, parameter
count, test top-1 (and top-5), and for students the agreement with the teacher and the
mean KL to it. The same rows go to the console, to `metrics.json` in the run directory,
and to every logger that can show a table (W&B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from torch import nn

from kdlab.tables import markdown_table

COLUMNS = ("model", "architecture", "params", "test top-1", "test top-5", "agreement", "KL to teacher")
_METRIC_OF_COLUMN = {
    "test top-1": "top1",
    "test top-5": "top5",
    "agreement": "agreement",
    "KL to teacher": "kl_to_teacher",
}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_rows(
    models: dict[str, nn.Module],
    architectures: dict[str, str],
    metrics: dict[str, float],
    extra: list[str] = (),
) -> list[dict]:
    """One row per model (its size and `test/<model>/<metric>` values), then one per `extra` entry."""
    rows = []
    for name in [*models, *extra]:
        model = models.get(name)
        row: dict[str, Any] = {
            "model": name,
            "architecture": architectures.get(name, type(model).__name__ if model is not None else name),
            "params": parameter_count(model) if model is not None else None,
        }
        for column, metric in _METRIC_OF_COLUMN.items():
            row[column] = metrics.get(f"test/{name}/{metric}")
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value / 1e6:.2f}M" if value >= 10_000 else str(value)
    return str(value)


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows, dropping columns no row has a value for."""
    columns = [c for c in COLUMNS if any(row.get(c) is not None for row in rows)]
    return markdown_table(columns, [[_cell(row.get(c)) for c in columns] for row in rows])


def write_metrics(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))


def log_table(loggers: list[Logger], rows: list[dict]) -> None:
    """Send the rows to the loggers that show tables (W&B); the others get them in metrics.json."""
    columns = list(COLUMNS)
    data = [[row.get(c) for c in columns] for row in rows]
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key="results", columns=columns, data=data)
