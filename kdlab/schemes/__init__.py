"""Distillation schemes (`mode=`): where the knowledge comes from."""

from kdlab.schemes.base import Scheme
from kdlab.schemes.baseline import Baseline
from kdlab.schemes.offline import Offline

__all__ = ["Baseline", "Offline", "Scheme"]
