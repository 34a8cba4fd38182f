"""Markdown tables of strings, for the console and for .md files.

Kept free of torch and Lightning (it imports nothing from kdlab), so that scripts such as
scripts/summarize.py start in a fraction of a second; kdlab.report formats a run's results with it.
"""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: each column padded to its widest cell, header and separator first."""
    widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, name in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
