"""Distillation schemes (`mode=`): where the knowledge comes from."""

from kdlab.schemes.base import Scheme
from kdlab.schemes.baseline import Baseline
from kdlab.schemes.offline import Offline
from kdlab.schemes.online import Online
from kdlab.schemes.self_distillation import BYOT, PSKD, BornAgain, SelfDistillation
from kdlab.schemes.student import StudentScheme

__all__ = [
    "BYOT",
    "PSKD",
    "Baseline",
    "BornAgain",
    "Offline",
    "Online",
    "Scheme",
    "SelfDistillation",
    "StudentScheme",
]
