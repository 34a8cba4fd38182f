"""Lightning's fork-safe CUDA probe, switched off where it cannot work: no NVML library to ask.

`import lightning` sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that `torch.cuda.is_available()` asks NVML
instead of initialising CUDA, which would make forked processes (DataLoader workers, ddp_fork) unsafe.
Where NVML's library is absent, as on a CPU-only machine with a CUDA build of torch, every such call
dlopen()s it again, fails and falls back to the CUDA runtime's count: about 0.4 ms, and torch's
optimizers ask once per step (their graph-capture check). There the variable only costs time: without
it torch makes the same runtime call directly. On a machine with NVML nothing changes.
"""

from __future__ import annotations

import ctypes
import os

import torch

VARIABLE = "PYTORCH_NVML_BASED_CUDA_CHECK"
NVML = "libnvidia-ml.so.1"  # the name torch.cuda loads


def drop_failing_nvml_probe() -> bool:
    """Unset PYTORCH_NVML_BASED_CUDA_CHECK when NVML cannot be loaded; True if it was unset."""
    if os.environ.get(VARIABLE) != "1" or not torch.backends.cuda.is_built():
        return False
    try:
        ctypes.CDLL(NVML)
    except OSError:
        del os.environ[VARIABLE]
        return True
    return False
