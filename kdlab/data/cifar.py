"""Read the python-pickle batches that CIFAR-10 and CIFAR-100 ship in.

Each batch is a pickled dict with b"data" (uint8, one 3072-byte row per image: the
1024 red, then green, then blue values of a 32x32 image) and a label list (b"labels"
for CIFAR-10, b"fine_labels" for CIFAR-100). The class names are in a meta pickle beside
them (`batches.meta`: b"label_names"; `meta`: b"fine_label_names"). Only open files you trust:
unpickling can run code, which is true of torchvision's CIFAR reader as well.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kdlab.errors import KdlabError

log = logging.getLogger(__name__)

_ROW_BYTES = 3 * 32 * 32


def read_cifar_batches(paths: Sequence[str | Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the batches at `paths` into uint8 images [N,3,32,32] and int64 labels [N]."""
    images, labels = [], []
    for path in paths:
        batch_images, batch_labels = _read_batch(Path(path), label_key)
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels)


def read_cifar_label_names(path: str | Path, names_key: bytes) -> list[str] | None:
    """The class names, by label, in the meta pickle at `path`; None when it is missing or damaged
    (the names only label figures, so they are never worth stopping a run for)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f, encoding="bytes")
        names = meta[names_key]
        return [name.decode() if isinstance(name, bytes) else str(name) for name in names]
    except Exception as e:  # as in _read_batch: a damaged pickle can raise almost anything
        log.warning("Could not read the class names from %s (%s: %s)", path, type(e).__name__, e)
        return None


def _read_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            # The files were written by Python 2; "bytes" keeps their str keys as bytes.
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # a damaged pickle can raise almost anything, not only UnpicklingError
        raise _corrupt(path, f"it could not be unpickled ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise _corrupt(path, f"it is not a dict with keys b'data' and {label_key!r}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_BYTES:
        raise _corrupt(path, f"b'data' is {data.dtype} {data.shape}, expected uint8 (N, {_ROW_BYTES})")
    if labels.ndim != 1 or len(labels) != len(data):
        raise _corrupt(path, f"it has {len(data)} images but {labels.size} labels")
    images = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _corrupt(path: Path, why: str) -> KdlabError:
    return KdlabError(
        f"The CIFAR batch file {path} is damaged: {why}. Delete its folder and fetch the data again "
        f"(re-download and unpack the python version of the archive), then rerun."
    )
