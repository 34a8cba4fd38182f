"""Replayable augmentation (kdlab.data.replay): views stored as parameters, replayed bit for bit."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from kdlab.data.replay import CropStep, FlipStep, ReplayPipeline, ResizedCropStep, unreplayable
from kdlab.errors import KdlabError


def image(channels=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("seed", range(5))
def test_a_replayed_crop_is_the_image_the_transform_made_when_it_drew_those_parameters(seed):
    x = image(3, 32)
    for transform, step in (
        (v2.RandomCrop(32, padding=4), CropStep),
        (v2.RandomResizedCrop(24, antialias=True), ResizedCropStep),
    ):
        torch.manual_seed(seed)
        made = transform(x)  # the transform's own forward: make_params, then transform
        torch.manual_seed(seed)
        params = transform.make_params([x])  # the same draw, read as parameters
        row = [params["top"], params["left"]]
        if step is ResizedCropStep:
            row += [params["height"], params["width"]]
        assert torch.equal(step(transform).apply(x, row), made), type(transform).__name__


@pytest.mark.parametrize("seed", range(6))
def test_a_replayed_flip_is_the_flip_the_transform_made(seed):
    x = image()
    for transform in (v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(p=0.3)):
        torch.manual_seed(seed)
        made = transform(x)
        torch.manual_seed(seed)
        applied = int(float(torch.rand(1)) < transform.p)  # the transforms' own rule
        assert torch.equal(FlipStep(transform).apply(x, [applied]), made)


def test_views_depend_only_on_their_generator_and_replay_exactly():
    pipeline = ReplayPipeline([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()])
    x = image()
    torch.manual_seed(1)
    first = [pipeline.draw(x, torch.Generator().manual_seed(7)) for _ in range(3)]
    torch.manual_seed(2)  # another run's seed changes nothing
    again = [pipeline.draw(x, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert pipeline.width == 3 and first[0].dtype == torch.int32
    # The drawing walk's image is the replayed one.
    made, row = pipeline._walk(x, None, torch.Generator().manual_seed(3))
    assert torch.equal(pipeline.apply(x, row), made)


def test_a_small_finite_set_of_views_is_listed_whole_and_draws_come_from_it():
    pipeline = ReplayPipeline([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()])
    x = image()
    views = pipeline.choices(x)
    assert views.shape == ((2 * 2 + 1) ** 2 * 2, 3)  # (2p+1)^2 positions x 2 flips
    assert len({tuple(row.tolist()) for row in views}) == len(views)
    images = {pipeline.apply(x, row).numpy().tobytes() for row in views}
    assert len(images) == len(views)  # every listed view is a different image
    g = torch.Generator().manual_seed(0)
    drawn = {tuple(pipeline.draw(x, g).tolist()) for _ in range(2000)}
    assert drawn == {tuple(row.tolist()) for row in views}  # draws cover exactly the listed views
    # A continuous draw has no finite list.
    assert ReplayPipeline([v2.RandomResizedCrop(20)]).choices(x) is None


def test_deterministic_steps_pass_through_and_unreplayable_ones_are_refused_by_name():
    x = image(3, 32)
    pipeline = ReplayPipeline([v2.Resize(36, antialias=True), v2.RandomCrop(32), v2.RandomHorizontalFlip()])
    row = pipeline.draw(x, torch.Generator().manual_seed(0))
    assert pipeline.apply(x, row).shape == (3, 32, 32)
    assert unreplayable([v2.RandomRotation(10), v2.RandomCrop(32), v2.ColorJitter(0.4)]) == [
        "RandomRotation",
        "ColorJitter",
    ]
    with pytest.raises(
        KdlabError, match="The training augmentation RandAugment cannot be stored and replayed"
    ):
        ReplayPipeline([v2.RandomCrop(28, padding=2), v2.Compose([v2.RandAugment()])])
