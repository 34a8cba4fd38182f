"""ImageFolder data in the ImageNet layout: <root>/train/<class>/<image>, test from <root>/val.

Images are decoded from disk per sample (torchvision's ImageFolder), so any size of
dataset works. Class indices follow the sorted class-folder names, as in torchvision,
and must be the same folders in train and val so that index i means one class in both; those
names are the class names.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from kdlab.data.base import ImageClassificationDataModule
from kdlab.errors import KdlabError

# ImageNet statistics: the usual choice for natural photos and for ImageNet-pretrained models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes to input_size / 0.875 then centre-crops: the standard ImageNet 256 -> 224 recipe.
CROP_FRACTION = 0.875


class ImageFolderDataModule(ImageClassificationDataModule):
    """A folder tree of RGB images; `root` is required, `download`/`download_dir` are unused."""

    name = "ImageFolder"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    # The default loader converts every image to RGB.
    facts = {"in_channels": 3}
    defaults = {"num_classes": 1000, "input_size": 224}
    decode = True

    def default_augmentation(self) -> list:
        return [v2.RandomResizedCrop(self.input_size, antialias=True), v2.RandomHorizontalFlip()]

    def eval_geometry(self) -> list:
        return [
            v2.Resize(round(self.input_size / CROP_FRACTION), antialias=True),
            v2.CenterCrop(self.input_size),
        ]

    @property
    def class_names(self) -> list[str]:
        """The training split's class-folder names, sorted: the order of the class indices."""
        return find_classes(str(self._split_dir(train=True)))[0]

    def sample_digest(self, samples: ImageFolder, digest: hashlib._Hash) -> None:
        # Decoding every image to hash it would cost an epoch; paths, sizes and times say when files change.
        for path, _ in samples.samples:
            stat = os.stat(path)
            digest.update(
                f"{os.path.relpath(path, samples.root)}:{stat.st_size}:{stat.st_mtime_ns};".encode()
            )

    def load_split(self, train: bool) -> tuple[ImageFolder, torch.Tensor]:
        folder = self._split_dir(train)
        try:
            dataset = ImageFolder(str(folder))
        except FileNotFoundError as e:  # no class folders, or class folders without images
            raise KdlabError(
                f"{folder} is not an image-folder tree ({e}). It must hold one sub-folder per class with "
                f"the images inside (<root>/train/<class>/<image>.jpg); fix the tree or data.root."
            ) from e
        found = len(dataset.classes)
        if found != self.num_classes:
            raise KdlabError(
                f"{folder} has {found} class folders but data.num_classes={self.num_classes}. Set "
                f"data.num_classes={found} (the model's output size follows it), or fix the folder tree."
            )
        if not train:
            self._check_same_classes(folder, dataset.classes)
        return dataset, torch.tensor(dataset.targets, dtype=torch.int64)

    def _split_dir(self, train: bool) -> Path:
        if self.root is None:
            raise KdlabError(
                "The imagefolder data needs data.root: set data.root=/path/to/dataset, a folder holding "
                "train/<class>/<images> and val/<class>/<images> (the ImageNet layout)."
            )
        root = Path(self.root).expanduser()
        candidates = [root / "train"] if train else [root / "val", root / "test"]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        which = "training" if train else "test (val, or test if there is no val)"
        raise KdlabError(
            f"No {which} folder for the imagefolder data; looked for {', '.join(map(str, candidates))}. "
            f"data.root must hold train/<class>/<images> and val/<class>/<images>: fix the tree or "
            f"point data.root at the right folder."
        )

    def _check_same_classes(self, folder: Path, classes: list[str]) -> None:
        train_dir = Path(self.root).expanduser() / "train"
        if not train_dir.is_dir():
            return
        train_classes, _ = find_classes(str(train_dir))
        if train_classes != classes:
            only_train = sorted(set(train_classes) - set(classes))[:5]
            only_test = sorted(set(classes) - set(train_classes))[:5]
            raise KdlabError(
                f"{folder} and {train_dir} have different class folders (only in train: {only_train}, only "
                f"in {folder.name}: {only_test}), so class indices would disagree between them. Give both "
                f"splits the same class folders."
            )
