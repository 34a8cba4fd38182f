"""Baseline: one model trained with cross-entropy alone.

The control run every distillation result is compared with, and the scheme kdlab uses to
train teachers for offline distillation.
"""

from __future__ import annotations

from kdlab.schemes.student import StudentScheme


class Baseline(StudentScheme):
    """Plain supervised training. Knowledge terms have no source here, so none are used."""

    def __init__(self, *args, **kwargs):
        kwargs["knowledge"] = None  # nothing to distil from
        kwargs["task_weight"] = 1.0
        super().__init__(*args, **kwargs)
        self.prepare()
