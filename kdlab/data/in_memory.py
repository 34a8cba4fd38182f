"""Base for datasets small enough to hold in memory as uint8 tensors, read from local files.

It owns the search order for the files — `root`, then the dataset's system locations,
then `download_dir` — and the torchvision download into `download_dir` as a last resort.
The download runs in `prepare_data()` (once per node in Lightning); `setup()` only
locates and reads, so it is safe on every rank.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import TensorDataset

from kdlab.data.base import ImageClassificationDataModule
from kdlab.errors import KdlabError

log = logging.getLogger(__name__)


class InMemoryDataModule(ImageClassificationDataModule):
    """Locate, optionally download, and read a fixed dataset into uint8 [N,C,H,W] tensors."""

    # Folders a system package installs the dataset into, searched after `root`.
    system_dirs: ClassVar[tuple[str, ...]] = ()
    # Extra install advice for the not-found message, e.g. the Debian package to install.
    install_hint: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._download_error: Exception | None = None

    # -- what subclasses provide ------------------------------------------------------------

    def layouts(self, directory: Path) -> list[Path]:
        """The folders under `directory` where the files may sit (flat, torchvision's layout...)."""
        return [directory]

    def find_files(self, folder: Path) -> Any | None:
        """Return whatever `read_files` needs if `folder` holds the whole dataset, else None."""
        raise NotImplementedError

    def read_files(self, found: Any, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the train (or test) split from `found` as uint8 images [N,C,H,W] and int64 labels [N]."""
        raise NotImplementedError

    def fetch(self, directory: Path) -> None:
        """Download the dataset into `directory` with torchvision."""
        raise NotImplementedError

    def wanted_files(self) -> str:
        """Names of the files looked for, for the not-found message."""
        raise NotImplementedError

    # -- Lightning hooks --------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.locate()[0] is not None or not self.download:
            return
        target = Path(self.download_dir).expanduser()
        log.info("%s not found locally; downloading it into %s", self.name, target)
        try:
            self.fetch(target)
        except Exception as e:  # no network surfaces as URLError, RuntimeError, ... depending on the mirror
            self._download_error = e
            raise self._not_found_error() from e

    def load_split(self, train: bool) -> tuple[TensorDataset, torch.Tensor]:
        found, tried = self.locate()
        if found is None:
            raise self._not_found_error()
        log.info("Reading the %s %s split from %s", self.name, "train" if train else "test", tried[-1])
        images, targets = self.read_files(found, train)
        if images.shape[1:] != self.input_shape:
            raise KdlabError(
                f"The {self.name} files found via {found} hold images of shape {tuple(images.shape[1:])}, "
                f"expected {self.input_shape}. They are not {self.name} (or are damaged): point data.root at "
                f"the right files, or delete these and fetch them again."
            )
        return TensorDataset(images, targets), targets

    def sample_digest(self, samples: TensorDataset, digest: hashlib._Hash) -> None:
        digest.update(samples.tensors[0].contiguous().numpy())  # the uint8 pixels, read without a copy

    # -- helpers ----------------------------------------------------------------------------

    def search_dirs(self) -> list[Path]:
        """The directories searched, in order: root, system locations, download_dir."""
        dirs = [self.root] if self.root is not None else []
        dirs += [*self.system_dirs, self.download_dir]
        unique: list[Path] = []
        for d in dirs:
            path = Path(d).expanduser()
            if path not in unique:
                unique.append(path)
        return unique

    def locate(self) -> tuple[Any | None, list[Path]]:
        """Return (the first complete copy of the files found, or None; every folder tried)."""
        tried: list[Path] = []
        for directory in self.search_dirs():
            for folder in self.layouts(directory):
                tried.append(folder)
                found = self.find_files(folder)
                if found is not None:
                    if self.root is not None and directory != Path(self.root).expanduser():
                        # The search order falls through, but a mistyped root must not pass unnoticed.
                        log.warning(
                            "data.root=%s holds no %s files; using %s instead", self.root, self.name, folder
                        )
                    return found, tried
        return None, tried

    def _not_found_error(self) -> KdlabError:
        _, tried = self.locate()
        target = Path(self.download_dir).expanduser()
        if self._download_error is not None:
            # torchvision's message spans lines (one per mirror); keep ours one paragraph.
            reason = " ".join(str(self._download_error).split())
            download = f"Downloading it into {target} failed ({reason})."
        elif self.download:
            # Reached when setup() runs without prepare_data(), e.g. when the module is used by hand.
            download = (
                "Nothing was downloaded: downloads happen in prepare_data(), which Lightning's Trainer "
                "calls; call prepare_data() before setup() when using the data module directly."
            )
        else:
            download = "Downloading is off (data.download=false)."
        hint = f"{self.install_hint}, or " if self.install_hint else ""
        return KdlabError(
            f"Could not find the {self.name} files ({self.wanted_files()}). Looked in: "
            f"{', '.join(str(p) for p in tried)}. {download} To fix this, {hint}set "
            f"data.root=/path/to/folder holding the files, or run once with internet access and "
            f"data.download=true so torchvision fetches them into data.download_dir ({target})."
        )
