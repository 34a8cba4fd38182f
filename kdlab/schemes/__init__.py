"""Distillation schemes (`mode=`): where the knowledge comes from, one module per scheme."""

from kdlab.schemes.base import Scheme, Sources, TeacherProvider
from kdlab.schemes.baseline import Baseline
from kdlab.schemes.born_again import BornAgain
from kdlab.schemes.byot import BYOT
from kdlab.schemes.cskd import CSKD
from kdlab.schemes.offline import Offline
from kdlab.schemes.on_policy import OnPolicy
from kdlab.schemes.online import Online
from kdlab.schemes.pskd import PSKD
from kdlab.schemes.seqkd import SeqKD
from kdlab.schemes.student import StudentScheme
from kdlab.schemes.tfkd import TfKD, TfKDSelf

__all__ = [
    "BYOT",
    "CSKD",
    "PSKD",
    "Baseline",
    "BornAgain",
    "Offline",
    "OnPolicy",
    "Online",
    "Scheme",
    "SeqKD",
    "Sources",
    "StudentScheme",
    "TeacherProvider",
    "TfKD",
    "TfKDSelf",
]
