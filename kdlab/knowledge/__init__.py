"""Pluggable knowledge losses: response-, feature- and relation-based.

Each loss is a `Knowledge` module; the `knowledge=` config group selects one or a weighted
list of them (`knowledge=[kd,at]`), and every scheme sums them with the task loss.
"""

from kdlab.knowledge.base import Knowledge, LossContext, Stage, views_of
from kdlab.knowledge.contrastive import CRD
from kdlab.knowledge.ctkd import CTKD
from kdlab.knowledge.feature import AT, NST, VID, CosineHint, FeatureL2, FitNet
from kdlab.knowledge.minilm import MiniLM
from kdlab.knowledge.relation import CC, FSP, PKT, RKD, SP
from kdlab.knowledge.response import DIST, DKD, KD, NKD
from kdlab.knowledge.sequence import SequenceKD

__all__ = [
    "AT",
    "CC",
    "CRD",
    "CTKD",
    "DIST",
    "DKD",
    "FSP",
    "KD",
    "NKD",
    "NST",
    "PKT",
    "RKD",
    "SP",
    "SequenceKD",
    "VID",
    "CosineHint",
    "FeatureL2",
    "FitNet",
    "Knowledge",
    "LossContext",
    "MiniLM",
    "Stage",
    "views_of",
]
