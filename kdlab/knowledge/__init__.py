"""Pluggable knowledge losses: response-, feature- and relation-based.

Each loss is a `Knowledge` module; the `knowledge=` config group selects one or a weighted
list of them (`knowledge=[kd,at]`), and every scheme sums them with the task loss.
"""

from kdlab.knowledge.base import Knowledge
from kdlab.knowledge.contrastive import CRD
from kdlab.knowledge.response import DIST, DKD, KD

__all__ = ["CRD", "DIST", "DKD", "KD", "Knowledge"]
