"""The end of a run: the results table a researcher reads, and `metrics.json` beside it.

One row per model the scheme reports (teacher, student, peers): architecture, parameter
count, test top-1 (and top-5; for a language model, next-token top-1 and the perplexity), for
students the agreement with the teacher and the mean KL to it, and for each network what it costs
to deploy (FLOPs per image, weights in MB, and latency in ms at batch 1 and at the training batch
size: kdlab.efficiency measures them).
The same rows go to the console, to `metrics.json` in the run directory, and to every logger
that can show a table (W&B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from torch import nn

from kdlab.tables import markdown_table

# "ms @ batch" is headed with the training batch size on the console ("ms @ 128"): see format_table.
COLUMNS = (
    "model",
    "architecture",
    "params",
    "test top-1",
    "test top-5",
    "test ppl",
    "agreement",
    "KL to teacher",
    "FLOPs",
    "weights MB",
    "ms @ 1",
    "ms @ batch",
)
_METRIC_OF_COLUMN = {
    "test top-1": "top1",
    "test top-5": "top5",
    "test ppl": "perplexity",
    "agreement": "agreement",
    "KL to teacher": "kl_to_teacher",
}
# A column of the cost of a network, and how kdlab.efficiency's record of it gives the column's value.
_COST_OF_COLUMN = {
    "FLOPs": lambda cost: cost["flops"],
    "weights MB": lambda cost: cost["weights_bytes"] / 1e6,
    "ms @ 1": lambda cost: cost["latency_ms_batch_1"],
    "ms @ batch": lambda cost: cost["latency_ms_training_batch"],
}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_rows(
    models: dict[str, nn.Module],
    architectures: dict[str, str],
    metrics: dict[str, float],
    extra: list[str] = (),
    efficiency: dict[str, Any] | None = None,
) -> list[dict]:
    """One row per model (its size, `test/<model>/<metric>` values, and its costs where `efficiency`,
    kdlab.efficiency.measure_models' record, has them), then one per `extra` entry."""
    costs = (efficiency or {}).get("models", {})
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
        for column, value in _COST_OF_COLUMN.items():
            row[column] = value(costs[name]) if name in costs else None
        rows.append(row)
    return rows


def _cell(value: Any, column: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in _FORMAT_OF_COLUMN:
        return _FORMAT_OF_COLUMN[column](value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value / 1e6:.2f}M" if value >= 10_000 else str(value)
    return str(value)


def _flops(value: int) -> str:
    """140.7M, 1.2G: one decimal, in thousands (K), millions (M) or billions (G)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return str(value)


def _milliseconds(value: float) -> str:
    """3 significant digits, without an exponent: 0.357, 8.32, 12.0, 604, 1234."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _megabytes(value: float) -> str:
    """2 decimals: 3.76, 0.83; 2 significant digits below 0.1 (0.0021)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


_FORMAT_OF_COLUMN = {
    "FLOPs": _flops,
    "weights MB": _megabytes,
    "ms @ 1": _milliseconds,
    "ms @ batch": _milliseconds,
}


def format_table(rows: list[dict], batch_size: int | None = None) -> str:
    """A markdown table of the rows, dropping columns no row has a value for; the latency at the
    training batch size is headed with that size ("ms @ 128") when `batch_size` is given."""
    columns = [c for c in COLUMNS if any(row.get(c) is not None for row in rows)]
    header = [f"ms @ {batch_size}" if c == "ms @ batch" and batch_size else c for c in columns]
    return markdown_table(header, [[_cell(row.get(c), c) for c in columns] for row in rows])


def write_metrics(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))


def log_table(loggers: list[Logger], rows: list[dict]) -> None:
    """Send the rows to the loggers that show tables (W&B); the others get them in metrics.json."""
    columns = list(COLUMNS)
    data = [[row.get(c) for c in columns] for row in rows]
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key="results", columns=columns, data=data)
