"""Distillation schemes (`mode=`): where the knowledge comes from."""

from kdlab.schemes.base import Scheme
from kdlab.schemes.baseline import Baseline
from kdlab.schemes.offline import Offline
from kdlab.schemes.online import Online
from kdlab.schemes.student import StudentScheme

__all__ = ["Baseline", "Offline", "Online", "Scheme", "StudentScheme"]
