"""Data for kdlab: LightningDataModules whose batches are {"input", "target", "index"} dicts (images and
labels, or token windows and their next tokens: kdlab.data.text).

`conf/data/*.yaml` instantiates one of these; Fashion-MNIST is the default. `index` is
the sample's index in its underlying split, so per-sample caches can key on it.
"""

from kdlab.data.base import ImageClassificationDataModule
from kdlab.data.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from kdlab.data.datasets import IndexedDataset
from kdlab.data.image_folder import ImageFolderDataModule
from kdlab.data.in_memory import InMemoryDataModule
from kdlab.data.text import TextCorpusDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "IndexedDataset",
    "MNISTDataModule",
    "TextCorpusDataModule",
]
