"""Baseline: one model trained with cross-entropy alone.

The control run every distillation result is compared with, and the scheme kdlab uses to
train teachers for offline distillation.
"""

from __future__ import annotations

import logging

import lightning as L
from omegaconf import DictConfig

from kdlab.schemes.base import Sources, TeacherProvider
from kdlab.schemes.student import StudentScheme

log = logging.getLogger(__name__)


class Baseline(StudentScheme):
    """Plain supervised training. Knowledge terms have no source here, so none are used."""

    name = "baseline"

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        if cfg.get("knowledge"):
            log.info(
                "mode=baseline trains with the task loss only; knowledge=%s is not used.", list(cfg.knowledge)
            )
        return Sources()

    def __init__(self, *args, **kwargs):
        kwargs["knowledge"] = None  # nothing to distil from
        kwargs["task_weight"] = 1.0
        super().__init__(*args, **kwargs)
        self.prepare()
