"""Born-Again Networks (`mode=born_again`): generation k distils from generation k-1.

Furlanello et al. 2018, "Born-Again Neural Networks" (ICML). Every generation has the student's
architecture; the earlier ones are frozen teachers kept in the teacher store.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
from omegaconf import DictConfig
from torch import nn

from kdlab.schemes.base import Sources, TeacherProvider
from kdlab.schemes.offline import Offline


class BornAgain(Offline):
    """Born-Again Networks (Furlanello et al. 2018, Sec. 3): generation k distils from generation
    k-1 of the same architecture. This scheme trains the last generation; `teacher` is the one
    before it, and `earlier` the generations before that (tested and reported, never trained).
    The chain comes from the teacher store (`sources_for`), so an interrupted run resumes.

    Args:
        generations: K, the generation this run trains (generations 0..K-1 come from the store).
    """

    name = "born_again"

    @classmethod
    def sources_for(
        cls, cfg: DictConfig, datamodule: L.LightningDataModule, store: TeacherProvider
    ) -> Sources:
        """Generations 0..K-1 of the student's architecture, from the store (trained if missing)."""
        teacher, earlier, record = store.generations(cfg, datamodule, int(cfg.mode.generations))
        architectures = {name: cfg.student.name for name in ("teacher", *earlier)}
        return Sources(
            modules={"teacher": teacher, "earlier": earlier},
            architectures=architectures,
            frozen=record,
            frozen_config=cfg.student,
        )

    def __init__(self, *args, generations: int = 2, earlier: Mapping[str, nn.Module] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generations = int(generations)
        self.earlier = nn.ModuleDict(dict(earlier or {}))
        self.earlier.eval().requires_grad_(False)
        for name in self.earlier:
            self.add_metrics(name, validate=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "earlier"):
            self.earlier.eval()
        return self

    def models(self) -> dict[str, nn.Module]:
        return {**self.earlier, **super().models()}
