"""Extending kdlab without forking it: a user's loss, scheme, model and dataset in their own package.

The test writes such a package and config directory into a temporary directory outside the
repository (the README's "Extending kdlab" example, in full) and trains it through the command
line, found with `hydra.searchpath`, in offline, online and self mode and with its own scheme.
No kdlab file is changed.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import NO_PLOTS, cli_overrides, run_main

PACKAGE = '''
"""myext: a knowledge loss, a scheme, a model and a dataset, kept outside kdlab."""

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.data import InMemoryDataModule
from kdlab.knowledge import Knowledge
from kdlab.schemes import StudentScheme


class LogitMSE(Knowledge):
    """Mean squared error between the logits (Ba & Caruana 2014, "Do Deep Nets Really Need to be
    Deep?", Eq. 2): logit regression, the loss before temperature softmax."""

    key = "logit_mse"

    def forward(self, student, source, batch, context=None):
        return F.mse_loss(student.logits, source.logits.detach())


class MeanTeacher(StudentScheme):
    """The source is an exponential moving average of the student's own weights (Tarvainen &
    Valpola 2017, "Mean teachers are better role models", Eq. 1): theta' <- a theta' + (1 - a) theta."""

    name = "mean_teacher"

    def __init__(self, *args, decay=0.9, **kwargs):
        super().__init__(*args, **kwargs)
        self.decay = float(decay)
        self.average = copy.deepcopy(self.student).requires_grad_(False)
        self.average_tap = self.tap(self.average, "teacher", "average")
        self.prepare()

    @torch.no_grad()
    def sources(self, x, batch):
        return self.average_tap(x)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        with torch.no_grad():
            for mean, live in zip(self.average.parameters(), self.student.parameters()):
                mean.lerp_(live, 1 - self.decay)


class TinyNet(nn.Module):
    """Two conv stages and a linear head; `tap_points` names the stages for feature knowledge."""

    tap_points = {"stage1": "stage1", "stage2": "stage2", "embedding": "pool"}

    def __init__(self, num_classes, in_channels, input_size, width=8):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stage2(self.stage1(x))))


class Stripes(InMemoryDataModule):
    """8x8 grey images of stripes in 4 orientations, read from stripes_{train,test}.pt."""

    name = "Stripes"
    facts = {"num_classes": 4, "in_channels": 1, "input_size": 8}
    mean, std = (0.5,), (0.5,)

    def find_files(self, folder: Path):
        files = {train: folder / f"stripes_{'train' if train else 'test'}.pt" for train in (True, False)}
        return files if all(f.is_file() for f in files.values()) else None

    def read_files(self, found, train):
        data = torch.load(found[train])
        return data["images"], data["labels"]

    def fetch(self, directory):
        raise FileNotFoundError("Stripes is made by make_stripes(), not downloaded")

    def wanted_files(self):
        return "stripes_train.pt, stripes_test.pt"

    def default_augmentation(self):
        return []

    @property
    def class_names(self):
        return ["horizontal", "vertical", "diagonal", "anti-diagonal"]


def make_stripes(folder, n, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    patterns = torch.stack([i % 2, j % 2, (i + j) % 2, (i - j) % 3 == 0]).float()
    noise = torch.rand(n, 8, 8, generator=generator) * 0.5
    images = ((patterns[labels] * 0.5 + noise) * 255).clamp(0, 255).to(torch.uint8).unsqueeze(1)
    return {"images": images, "labels": labels}
'''

CONFIGS = {
    "knowledge/logit_mse.yaml": """
        # Logit regression (Ba & Caruana 2014): MSE between the logits.
        logit_mse:
          _target_: myext.LogitMSE
          weight: 0.5
        """,
    "mode/mean_teacher.yaml": """
        # @package _global_
        # Self-distillation from an exponential moving average of the student (Tarvainen & Valpola 2017).
        defaults:
          - override /knowledge: logit_mse
        mode:
          _target_: myext.MeanTeacher
          decay: 0.9
          task_weight: null
          scheduler_interval: epoch
        """,
    "model/tinynet.yaml": """
        _target_: kdlab.models.create_model
        name: myext.TinyNet
        """,
    "data/stripes.yaml": """
        _target_: myext.Stripes
        num_classes: 4
        in_channels: 1
        input_size: 8
        root: ???
        batch_size: 32
        val_size: 64
        """,
}


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> Path:
    """The user's package `myext`, their config directory and their data, outside the repository."""
    root = tmp_path_factory.mktemp("user_project")
    (root / "myext").mkdir()
    (root / "myext" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    for name, text in CONFIGS.items():
        path = root / "conf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    namespace: dict = {}
    exec(textwrap.dedent(PACKAGE), namespace)  # noqa: S102 - the user's own data maker
    (root / "data").mkdir()
    torch.save(namespace["make_stripes"](root, 320, seed=0), root / "data" / "stripes_train.pt")
    torch.save(namespace["make_stripes"](root, 96, seed=1), root / "data" / "stripes_test.pt")
    return root


@pytest.mark.parametrize(
    "mode",
    [
        ["mode=offline", "knowledge=logit_mse"],
        ["mode=online", "knowledge=[dml,logit_mse]"],
        ["mode=self", "knowledge=[kd,logit_mse]"],
        ["mode=mean_teacher"],
    ],
    ids=["offline", "online", "self", "own-scheme"],
)
def test_a_users_loss_scheme_model_and_data_train_from_the_cli(mode, extension, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(extension))  # the user's package is importable, as with pip install -e
    args = [
        *cli_overrides(tmp_path, batches=4),
        f"hydra.searchpath=[file://{extension / 'conf'}]",
        "data=stripes",
        f"data.root={extension / 'data'}",
        "model@teacher=tinynet",
        "model@student=tinynet",
        NO_PLOTS,
        *mode,
    ]
    proc = run_main(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = {row["model"]: row for row in results["models"]}
    assert rows["student"]["architecture"] == "myext.TinyNet"
    assert 0.0 <= rows["student"]["test top-1"] <= 1.0
    logged = results["metrics"]
    if mode[0] == "mode=mean_teacher":
        assert results["mode"] == "mean_teacher" and "train/logit_mse_epoch" in logged
    elif mode[0] == "mode=online":
        assert "train/student/logit_mse_epoch" in logged and "train/teacher/logit_mse_epoch" in logged
    elif mode[0] == "mode=self":
        assert results["mode"] == "byot" and "train/exit1/logit_mse_epoch" in logged
    else:
        assert results["teacher"]["source"] == "trained" and "train/logit_mse_epoch" in logged
