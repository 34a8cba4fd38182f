"""The fixed small datasets: Fashion-MNIST (kdlab's default), MNIST, CIFAR-10 and CIFAR-100.

Each class only states its dataset's facts — file names and layouts, shape, mean/std,
usual augmentation, class names, system install location, torchvision downloader — on top of
`InMemoryDataModule`, which does the locating, reading, splitting and loading.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch
from torchvision import datasets
from torchvision.transforms import v2

from kdlab.data.cifar import read_cifar_batches, read_cifar_label_names
from kdlab.data.idx import read_idx
from kdlab.data.in_memory import InMemoryDataModule
from kdlab.errors import KdlabError

log = logging.getLogger(__name__)


class IdxDataModule(InMemoryDataModule):
    """MNIST-style data: four IDX files, raw or .gz, flat or in torchvision's <Name>/raw folder."""

    # torchvision downloads into <download_dir>/<torchvision_folder>/raw.
    torchvision_folder: ClassVar[str]
    torchvision_class: ClassVar[type]
    split_files: ClassVar[dict[bool, tuple[str, str]]] = {
        True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def layouts(self, directory: Path) -> list[Path]:
        return [directory, directory / self.torchvision_folder / "raw"]

    def find_files(self, folder: Path) -> dict[str, Path] | None:
        found = {}
        for name in (*self.split_files[True], *self.split_files[False]):
            # Prefer the uncompressed copy (torchvision keeps both): it reads faster.
            candidates = [folder / name, folder / f"{name}.gz"]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                return None
            found[name] = path
        return found

    def read_files(self, found: dict[str, Path], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images_name, labels_name = self.split_files[train]
        images = read_idx(found[images_name], ndim=3)
        labels = read_idx(found[labels_name], ndim=1)
        if len(images) != len(labels):
            raise KdlabError(
                f"{found[images_name]} holds {len(images)} images but {found[labels_name]} holds "
                f"{len(labels)} labels; one of them is damaged or from another release. Delete both and "
                f"fetch them again."
            )
        # IDX images have no channel axis; the models expect [N,1,H,W].
        return images.unsqueeze(1), labels.long()

    def fetch(self, directory: Path) -> None:
        # torchvision fetches all four files whichever split is asked for.
        self.torchvision_class(str(directory), train=True, download=True)

    def wanted_files(self) -> str:
        names = (*self.split_files[True], *self.split_files[False])
        return ", ".join(names) + ", each raw or .gz"


class FashionMNISTDataModule(IdxDataModule):
    """Fashion-MNIST: 60k/10k 28x28 grayscale clothing images in 10 classes; kdlab's default."""

    name = "Fashion-MNIST"
    facts = {"num_classes": 10, "in_channels": 1, "input_size": 28}
    # Measured on the 60k training images.
    mean = (0.2860,)
    std = (0.3530,)
    # Debian's dataset-fashion-mnist package installs the .gz files here.
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    install_hint = "install Debian's package (apt-get install dataset-fashion-mnist)"
    torchvision_folder = "FashionMNIST"
    torchvision_class = datasets.FashionMNIST
    # The IDX files carry only label numbers; the names are those of the dataset's documentation
    # (github.com/zalandoresearch/fashion-mnist, "Labels"), in label order.
    classes = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def default_augmentation(self) -> list:
        return [v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()]


class MNISTDataModule(IdxDataModule):
    """MNIST: 60k/10k 28x28 grayscale handwritten digits in 10 classes."""

    name = "MNIST"
    facts = {"num_classes": 10, "in_channels": 1, "input_size": 28}
    mean = (0.1307,)
    std = (0.3081,)
    torchvision_folder = "MNIST"
    torchvision_class = datasets.MNIST
    # MNIST's labels are the digits themselves, so the base class's names ("0".."9") are right.

    def default_augmentation(self) -> list:
        # No flips: a mirrored digit is a different (or no) digit.
        return [v2.RandomCrop(28, padding=2)]


class CifarDataModule(InMemoryDataModule):
    """CIFAR-style data: python pickle batches in one folder; `root` may be that folder or its parent."""

    batches_folder: ClassVar[str]
    train_batches: ClassVar[tuple[str, ...]]
    test_batches: ClassVar[tuple[str, ...]]
    label_key: ClassVar[bytes]
    # The pickle beside the batches that names the classes, and its key for the names of label_key.
    meta_file: ClassVar[str]
    names_key: ClassVar[bytes]
    torchvision_class: ClassVar[type]

    @property
    def class_names(self) -> list[str]:
        """The names in the meta file next to the batches; the indices if it is missing or damaged
        (it is not needed for training, so a bad one only costs the figures their names)."""
        found, _ = self.locate()
        names = read_cifar_label_names(found / self.meta_file, self.names_key) if found else None
        if names is not None and len(names) != self.num_classes:
            log.warning(
                "%s names %d classes, but %s has %d: labelling classes by index",
                found / self.meta_file,
                len(names),
                self.name,
                self.num_classes,
            )
            names = None
        return names if names is not None else super().class_names

    def layouts(self, directory: Path) -> list[Path]:
        return [directory, directory / self.batches_folder]

    def find_files(self, folder: Path) -> Path | None:
        names = (*self.train_batches, *self.test_batches)
        return folder if all((folder / name).is_file() for name in names) else None

    def read_files(self, found: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        names = self.train_batches if train else self.test_batches
        return read_cifar_batches([found / name for name in names], self.label_key)

    def fetch(self, directory: Path) -> None:
        # Downloads the archive and unpacks <batches_folder> into `directory`.
        self.torchvision_class(str(directory), train=True, download=True)

    def wanted_files(self) -> str:
        return f"{self.batches_folder}/" + ", ".join((*self.train_batches, *self.test_batches))

    def default_augmentation(self) -> list:
        return [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]


class CIFAR10DataModule(CifarDataModule):
    """CIFAR-10: 50k/10k 32x32 colour images in 10 classes."""

    name = "CIFAR-10"
    facts = {"num_classes": 10, "in_channels": 3, "input_size": 32}
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    batches_folder = "cifar-10-batches-py"
    train_batches = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_batches = ("test_batch",)
    label_key = b"labels"
    meta_file = "batches.meta"
    names_key = b"label_names"
    torchvision_class = datasets.CIFAR10


class CIFAR100DataModule(CifarDataModule):
    """CIFAR-100: 50k/10k 32x32 colour images in 100 fine classes."""

    name = "CIFAR-100"
    facts = {"num_classes": 100, "in_channels": 3, "input_size": 32}
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    batches_folder = "cifar-100-python"
    train_batches = ("train",)
    test_batches = ("test",)
    label_key = b"fine_labels"
    meta_file = "meta"
    names_key = b"fine_label_names"
    torchvision_class = datasets.CIFAR100
