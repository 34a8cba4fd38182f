"""Tests for kdlab.data: readers, data modules and conf/data configs, on tiny files in the real formats.

Every tiny dataset encodes the sample index in its pixels, so a batch's "index" can be
checked against the image it came with, not only against the label.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision import datasets
from torchvision.transforms import v2

from kdlab.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from kdlab.data.idx import read_idx
from kdlab.errors import KdlabError
from tests.conftest import compose_config

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 60, 20
# Test images hold 100 + i, train images hold i: the two splits can't be confused.
TEST_OFFSET = 100


# -- writers for the on-disk formats ----------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def idx_split(n: int, offset: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Image i is filled with offset + i; its label is i % 10."""
    values = offset + np.arange(n)
    images = np.broadcast_to(values[:, None, None], (n, size, size)).astype(np.uint8)
    return images, (np.arange(n) % 10).astype(np.uint8)


def write_mnist(folder: Path, gz: bool = False, size: int = 28) -> Path:
    for prefix, n, offset in (("train", N_TRAIN, 0), ("t10k", N_TEST, TEST_OFFSET)):
        images, labels = idx_split(n, offset, size)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return folder


def cifar_rows(n: int, offset: int) -> np.ndarray:
    """Image i has red = offset + i, green = 255 - (offset + i), blue = 7 everywhere."""
    value = offset + np.arange(n)
    planes = [
        np.repeat(value[:, None], 1024, 1),
        np.repeat(255 - value[:, None], 1024, 1),
        np.full((n, 1024), 7),
    ]
    return np.concatenate(planes, axis=1).astype(np.uint8)


def write_cifar(folder: Path, hundred: bool = False) -> Path:
    key = b"fine_labels" if hundred else b"labels"
    n_classes = 100 if hundred else 10
    if hundred:
        parts = {"train": (0, N_TRAIN), "test": (TEST_OFFSET, N_TEST)}
    else:
        # Five train batches of 12 so that concatenation order is tested too.
        parts = {f"data_batch_{b + 1}": (b * 12, 12) for b in range(5)}
        parts["test_batch"] = (TEST_OFFSET, N_TEST)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (offset, n) in parts.items():
        batch = {b"data": cifar_rows(n, offset), key: [(offset + i) % n_classes for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


IMAGEFOLDER_CLASSES = ("ant", "bee", "cat")


def colour(split: str, cls: int, j: int) -> tuple[int, int, int]:
    return (40 * cls + 10, 20 * j + 5, 200 if split == "train" else 50)


def write_imagefolder(root: Path, splits=("train", "val"), per_class: int = 4) -> Path:
    for split in splits:
        for c, name in enumerate(IMAGEFOLDER_CLASSES):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                # Different sizes per image: the loader must bring them all to input_size.
                Image.new("RGB", (20 + j, 18 + 2 * j), colour(split, c, j)).save(
                    root / split / name / f"{j}.png"
                )
    return root


# -- helpers ----------------------------------------------------------------------------------


def pixel_values(batch_input: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo Normalize and ToDtype: back to the uint8 values the files held."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return torch.round((batch_input * std + mean) * 255)


def concat(batches, key) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


def check_batch(batch: dict, shape: tuple[int, ...]) -> None:
    assert set(batch) == {"input", "target", "index"}
    assert batch["input"].dtype == torch.float32 and tuple(batch["input"].shape[1:]) == shape
    assert batch["target"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    assert len(batch["input"]) == len(batch["target"]) == len(batch["index"])


def make(cls, root, tmp_path=None, **kwargs):
    """A data module on `root` that never downloads; download_dir is <tmp_path or root>/dl."""
    download_dir = Path(tmp_path if tmp_path is not None else root) / "dl"
    kwargs = {"download": False, "download_dir": str(download_dir), "val_size": 10, **kwargs}
    return cls(root=str(root), **kwargs)


# -- IDX reader -------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_returns_the_stored_array(tmp_path, gz):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, gz)
    assert torch.equal(read_idx(path, ndim=3), torch.from_numpy(array))


def test_read_idx_rejects_damaged_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((4, 28, 28), np.uint8))
    raw = good.read_bytes()
    cases = {
        "truncated": raw[:-10],
        "trailing": raw + b"\0",
        "magic": b"\1" + raw[1:],
        "dtype": raw[:2] + b"\x0d" + raw[3:],
        "header": raw[:9],
        "corrupt.gz": b"\x1f\x8b" + os.urandom(200),
        "truncated.gz": gzip.compress(raw)[:-30],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(KdlabError, match="damaged") as err:
            read_idx(path, ndim=3)
        assert str(path) in str(err.value) and "fetch it again" in str(err.value)
    with pytest.raises(KdlabError, match="2 dimensions, expected 3"):
        read_idx(write_idx(tmp_path / "2d", np.zeros((4, 28), np.uint8)), ndim=3)


# -- MNIST / Fashion-MNIST --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [FashionMNISTDataModule, MNISTDataModule])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_data_modules_read_both_layouts(tmp_path, cls, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / cls.torchvision_folder / "raw"
    write_mnist(folder, gz)
    dm = make(cls, tmp_path, train_transforms=[], batch_size=16)
    dm.setup()
    assert (dm.num_classes, dm.in_channels, dm.input_size, dm.input_shape) == (10, 1, 28, (1, 28, 28))

    train, val, test = (
        list(dm.train_dataloader()),
        list(dm.val_dataloader()),
        list(dm.test_dataloader()),
    )
    for batch in train + val + test:
        check_batch(batch, (1, 28, 28))
    for batches, offset in ((train, 0), (val, 0), (test, TEST_OFFSET)):
        index, target = concat(batches, "index"), concat(batches, "target")
        pixels = pixel_values(concat(batches, "input"), cls.mean, cls.std)
        # Each image is the one the index names, in the split it claims to be from.
        assert torch.equal(pixels, (offset + index).float().view(-1, 1, 1, 1).expand_as(pixels))
        assert torch.equal(target, index % 10)
    assert torch.equal(dm.test_set.targets[concat(test, "index")], concat(test, "target"))

    # Train and val partition the official training split; test is the whole t10k split.
    train_idx, val_idx = concat(train, "index"), concat(val, "index")
    assert len(val_idx) == 10 and len(train_idx) == N_TRAIN - 10
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(N_TRAIN))
    assert concat(test, "index").tolist() == list(range(N_TEST))


def test_default_augmentation_and_eval_transforms(tmp_path):
    write_mnist(tmp_path)
    fashion = make(FashionMNISTDataModule, tmp_path)
    mnist = make(MNISTDataModule, tmp_path)
    assert [type(t) for t in fashion.augmentation] == [v2.RandomCrop, v2.RandomHorizontalFlip]
    assert [type(t) for t in mnist.augmentation] == [v2.RandomCrop]  # digits are not flipped
    fashion.setup("fit")
    torch.manual_seed(0)
    train = next(iter(fashion.train_dataloader()))
    check_batch(train, (1, 28, 28))
    # Padding-crops shift zero borders into train images; val images stay untouched.
    shifted = pixel_values(train["input"], fashion.mean, fashion.std) == 0
    assert shifted[train["index"] != 0].any()
    val = next(iter(fashion.val_dataloader()))
    pixels = pixel_values(val["input"], fashion.mean, fashion.std)
    assert torch.equal(pixels, val["index"].float().view(-1, 1, 1, 1).expand_as(pixels))


def test_loader_settings(tmp_path):
    write_mnist(tmp_path)
    dm = make(MNISTDataModule, tmp_path, batch_size=7, num_workers=1, pin_memory=True)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, RandomSampler) and isinstance(val.sampler, SequentialSampler)
    assert train.batch_size == 7 and train.num_workers == 1 and train.persistent_workers and train.pin_memory
    in_process = make(MNISTDataModule, tmp_path)
    in_process.setup("fit")
    assert not in_process.train_dataloader().persistent_workers


def test_val_split_is_seeded_and_sized(tmp_path):
    write_mnist(tmp_path)

    def val_indices(**kwargs) -> list[int]:
        dm = make(MNISTDataModule, tmp_path, **kwargs)
        dm.setup("fit")
        return list(dm.val_set.indices)

    assert val_indices(split_seed=3) == val_indices(split_seed=3)
    assert val_indices(split_seed=3) != val_indices(split_seed=4)
    assert len(val_indices(val_size=0.25)) == 15
    for bad in (0, N_TRAIN, 1.5, True):
        with pytest.raises(KdlabError, match="data.val_size"):
            val_indices(val_size=bad)


def test_prepare_data_downloads_into_download_dir(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(self, directory):  # stands in for torchvision's download, which needs internet
        fetched.append(directory)
        write_mnist(directory / "MNIST" / "raw", gz=True)

    monkeypatch.setattr(MNISTDataModule, "fetch", fake_fetch)
    dm = MNISTDataModule(root=None, download_dir=str(tmp_path / "dl"), val_size=10)
    dm.prepare_data()
    dm.prepare_data()  # already there: no second download
    dm.setup("test")
    assert fetched == [tmp_path / "dl"] and len(dm.test_set) == N_TEST


def test_missing_data_names_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "system_dirs", (str(tmp_path / "system"),))
    dm = make(FashionMNISTDataModule, tmp_path / "nowhere", tmp_path)
    with pytest.raises(KdlabError) as err:
        dm.setup("fit")
    message = str(err.value)
    for tried in (
        "nowhere",
        "nowhere/FashionMNIST/raw",
        "system",
        "system/FashionMNIST/raw",
        "dl",
        "dl/FashionMNIST/raw",
    ):
        assert str(tmp_path / tried) in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message
    assert "data.download=false" in message

    cifar = make(CIFAR100DataModule, tmp_path / "nowhere", tmp_path)
    with pytest.raises(KdlabError, match="cifar-100-python") as err:
        cifar.setup("test")
    assert str(tmp_path / "dl" / "cifar-100-python") in str(err.value)


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def offline(self, directory):
        raise OSError("no route to host")

    monkeypatch.setattr(MNISTDataModule, "fetch", offline)
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"), download_dir=str(tmp_path / "dl"))
    with pytest.raises(KdlabError, match="no route to host") as err:
        dm.prepare_data()
    assert str(tmp_path / "nowhere") in str(err.value) and "internet access" in str(err.value)


def test_damaged_idx_files_are_reported(tmp_path):
    write_mnist(tmp_path, gz=True)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-8])
    with pytest.raises(KdlabError, match="train-labels-idx1-ubyte.gz is damaged"):
        make(MNISTDataModule, tmp_path).setup("fit")


def test_idx_files_of_the_wrong_shape_or_labels_are_rejected(tmp_path):
    write_mnist(tmp_path / "big", size=32)
    with pytest.raises(KdlabError, match=r"shape \(1, 32, 32\), expected \(1, 28, 28\)"):
        make(MNISTDataModule, tmp_path / "big", tmp_path).setup("fit")
    write_mnist(tmp_path / "labels")
    write_idx(tmp_path / "labels" / "train-labels-idx1-ubyte", np.full(N_TRAIN, 12, np.uint8))
    with pytest.raises(KdlabError, match=r"outside 0\.\.9"):
        make(MNISTDataModule, tmp_path / "labels", tmp_path).setup("fit")
    write_idx(tmp_path / "labels" / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, np.uint8))
    with pytest.raises(KdlabError, match="59 labels"):
        make(MNISTDataModule, tmp_path / "labels", tmp_path).setup("fit")


def test_config_values_must_match_dataset_facts(tmp_path):
    with pytest.raises(KdlabError, match="data.num_classes=10"):
        FashionMNISTDataModule(num_classes=100)
    with pytest.raises(KdlabError, match="data.in_channels=3"):
        CIFAR10DataModule(in_channels=1)
    with pytest.raises(KdlabError, match="data.input_size=28"):
        MNISTDataModule(input_size=32)
    with pytest.raises(KdlabError, match="not a transform"):
        MNISTDataModule(train_transforms=[{"_target_": "torchvision.transforms.v2.RandomCrop"}])
    with pytest.raises(KdlabError, match="data.batch_size"):
        MNISTDataModule(batch_size=0)


# -- CIFAR ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
@pytest.mark.parametrize("point_at", ["parent", "batches"])
def test_cifar_data_modules(tmp_path, cls, point_at):
    hundred = cls is CIFAR100DataModule
    batches = write_cifar(tmp_path / cls.batches_folder, hundred)
    dm = make(cls, tmp_path if point_at == "parent" else batches, tmp_path, train_transforms=[], batch_size=8)
    dm.setup()
    n_classes = 100 if hundred else 10
    assert (dm.num_classes, dm.input_shape) == (n_classes, (3, 32, 32))
    train, val, test = (
        list(dm.train_dataloader()),
        list(dm.val_dataloader()),
        list(dm.test_dataloader()),
    )
    for batches_, offset, split in (
        (train, 0, dm.train_set),
        (val, 0, dm.val_set),
        (test, TEST_OFFSET, None),
    ):
        for batch in batches_:
            check_batch(batch, (3, 32, 32))
        index, target = concat(batches_, "index"), concat(batches_, "target")
        pixels = pixel_values(concat(batches_, "input"), cls.mean, cls.std)
        value = (offset + index).float()
        # Channel planes decode in red, green, blue order.
        assert torch.equal(pixels[:, 0, 5, 9], value)
        assert torch.equal(pixels[:, 1, 31, 0], 255 - value)
        assert torch.all(pixels[:, 2] == 7)
        targets = (split.dataset if split is not None else dm.test_set).targets
        assert torch.equal(targets[index], target) and torch.equal(target, (offset + index) % n_classes)
    assert sorted(concat(train, "index").tolist() + concat(val, "index").tolist()) == list(range(N_TRAIN))
    assert concat(test, "index").tolist() == list(range(N_TEST))
    assert [type(t) for t in make(cls, batches, tmp_path).augmentation] == [
        v2.RandomCrop,
        v2.RandomHorizontalFlip,
    ]


def test_corrupt_cifar_pickle_is_reported(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    (batches / "data_batch_3").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(KdlabError, match="data_batch_3 is damaged"):
        make(CIFAR10DataModule, tmp_path, tmp_path).setup("fit")
    with open(batches / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(KdlabError, match="expected uint8"):
        make(CIFAR10DataModule, tmp_path, tmp_path).setup("fit")


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("cls", [CIFAR10DataModule, CIFAR100DataModule])
def test_cifar_class_names_come_from_the_meta_file(tmp_path, cls, caplog):
    hundred = cls is CIFAR100DataModule
    batches = write_cifar(tmp_path / cls.batches_folder, hundred)
    # Without the meta file (the batches alone train fine): the indices.
    assert make(cls, tmp_path, tmp_path).class_names == [str(i) for i in range(cls.facts["num_classes"])]
    # The archives' meta pickles, written by Python 2: names as bytes, beside other keys.
    names = [f"fine{i}" for i in range(100)] if hundred else CIFAR10_NAMES
    meta = {cls.names_key: [n.encode() for n in names], b"num_cases_per_batch": 10000}
    if hundred:
        meta[b"coarse_label_names"] = [f"coarse{i}".encode() for i in range(20)]
    (batches / cls.meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    assert make(cls, tmp_path, tmp_path).class_names == names
    # Names only label figures: a damaged or mismatched meta file is a warning, not a failed run.
    (batches / cls.meta_file).write_bytes(b"\x80\x04not a pickle")
    assert make(cls, tmp_path, tmp_path).class_names[:2] == ["0", "1"]
    (batches / cls.meta_file).write_bytes(pickle.dumps({cls.names_key: [b"a", b"b"]}))
    assert make(cls, tmp_path, tmp_path).class_names[:2] == ["0", "1"]
    assert "Could not read the class names" in caplog.text and "names 2 classes" in caplog.text


def test_fashion_mnist_and_mnist_class_names():
    # Fashion-MNIST's documented names, in label order (torchvision keeps the same list).
    fashion = FashionMNISTDataModule(download=False).class_names
    assert fashion == datasets.FashionMNIST.classes
    assert fashion[0] == "T-shirt/top" and fashion[9] == "Ankle boot"
    assert MNISTDataModule(download=False).class_names == [str(d) for d in range(10)]


# -- ImageFolder ------------------------------------------------------------------------------


def test_imagefolder_data_module(tmp_path):
    root = write_imagefolder(tmp_path / "tree")
    dm = ImageFolderDataModule(root=str(root), num_classes=3, input_size=16, val_size=3, batch_size=5)
    assert dm.input_shape == (3, 16, 16)
    dm.setup()
    loaders = (
        (dm.train_dataloader(), "train", dm.train_set.dataset),
        (dm.val_dataloader(), "train", dm.val_set.dataset),
        (dm.test_dataloader(), "val", dm.test_set),
    )
    for loader, split, dataset in loaders:
        batches = list(loader)
        for batch in batches:
            check_batch(batch, (3, 16, 16))
        index, target = concat(batches, "index"), concat(batches, "target")
        assert torch.equal(dataset.targets[index], target)
        # Resizing and cropping keep a one-colour image one colour, so each input must be
        # exactly the colour of the file its index names.
        pixels = pixel_values(concat(batches, "input"), dm.mean, dm.std)
        for i, pix in zip(index.tolist(), pixels, strict=True):
            path = Path(dataset.base.samples[i][0])
            cls, j = IMAGEFOLDER_CLASSES.index(path.parent.name), int(path.stem)
            assert path.parts[-3] == split
            assert torch.all(pix == torch.tensor(colour(split, cls, j)).view(3, 1, 1))
    assert len(dm.train_set) + len(dm.val_set) == 12 and len(dm.test_set) == 12
    # The class folders name the classes, in the order of the class indices.
    assert dm.class_names == list(IMAGEFOLDER_CLASSES) == dm.test_set.base.classes


def test_imagefolder_checks(tmp_path):
    root = write_imagefolder(tmp_path / "tree", splits=("train", "test"), per_class=1)
    with pytest.raises(KdlabError, match="3 class folders but data.num_classes=1000. Set data.num_classes=3"):
        ImageFolderDataModule(root=str(root), input_size=16, val_size=1).setup("fit")
    # No val folder: the test split comes from test/.
    dm = ImageFolderDataModule(root=str(root), num_classes=3, input_size=16)
    dm.setup("test")
    assert Path(dm.test_set.base.root).name == "test"
    with pytest.raises(KdlabError, match="needs data.root"):
        ImageFolderDataModule(num_classes=3).setup("fit")
    with pytest.raises(KdlabError, match="data.in_channels=3"):
        ImageFolderDataModule(root=str(root), in_channels=1)
    (root / "test" / "bee").rename(root / "test" / "bear")
    with pytest.raises(KdlabError, match="different class folders"):
        ImageFolderDataModule(root=str(root), num_classes=3).setup("test")
    with pytest.raises(KdlabError, match="No training folder"):
        ImageFolderDataModule(root=str(tmp_path / "empty"), num_classes=3).setup("fit")


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "shape"),
    [
        ("fashion_mnist", FashionMNISTDataModule, (1, 28, 28)),
        ("mnist", MNISTDataModule, (1, 28, 28)),
        ("cifar10", CIFAR10DataModule, (3, 32, 32)),
        ("cifar100", CIFAR100DataModule, (3, 32, 32)),
        ("imagefolder", ImageFolderDataModule, (3, 224, 224)),
    ],
)
def test_data_configs_instantiate(tmp_path, name, cls, shape):
    # Composed through kdlab's real config, so its interpolations (paths.data_dir) resolve.
    full = compose_config([f"data={name}", f"paths.data_dir={tmp_path / 'downloads'}"])
    cfg = full.data
    assert full.student.num_classes == cfg.num_classes
    assert cfg.train_transforms is None and cfg.root is None
    assert (cfg.in_channels, cfg.input_size, cfg.input_size) == shape
    if cls in (FashionMNISTDataModule, MNISTDataModule):
        write_mnist(tmp_path)
    elif cls is ImageFolderDataModule:
        write_imagefolder(tmp_path)
        cfg.num_classes = 3
    else:
        write_cifar(tmp_path / cls.batches_folder, hundred=cls is CIFAR100DataModule)
    cfg.root, cfg.val_size = str(tmp_path), 2
    # A list in the config becomes transform objects (ImageFolder's must also fix the size).
    steps = [{"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 1.0}]
    if cls is ImageFolderDataModule:
        steps.insert(0, {"_target_": "torchvision.transforms.v2.RandomResizedCrop", "size": cfg.input_size})
    cfg.train_transforms = steps
    dm = instantiate(cfg)
    assert type(dm) is cls and dm.input_shape == shape and dm.num_classes == cfg.num_classes
    assert [type(t) for t in dm.augmentation][-1] is v2.RandomHorizontalFlip
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), shape)
    cfg.train_transforms = []
    assert instantiate(cfg).augmentation == []


# -- the real Fashion-MNIST -------------------------------------------------------------------


def test_real_fashion_mnist(tmp_path):
    if not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{REAL_FASHION_MNIST} is missing; CI must install dataset-fashion-mnist")
        pytest.skip(f"{REAL_FASHION_MNIST} is missing (apt-get install dataset-fashion-mnist)")
    dm = FashionMNISTDataModule(download=False, download_dir=str(tmp_path), val_size=5000)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    # Fashion-MNIST is balanced: 6000 images per class in train, 1000 in test.
    assert torch.bincount(dm.train_set.dataset.targets).tolist() == [6000] * 10
    assert torch.bincount(dm.test_set.targets).tolist() == [1000] * 10
    batch = next(iter(dm.val_dataloader()))
    check_batch(batch, (1, 28, 28))
    assert torch.equal(dm.train_set.dataset.targets[batch["index"]], batch["target"])
    # Normalised with the dataset's own statistics: roughly zero mean, unit std.
    assert abs(batch["input"].mean()) < 0.2 and 0.8 < batch["input"].std() < 1.2
