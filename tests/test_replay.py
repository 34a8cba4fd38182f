"""Replayable augmentation (kdlab.data.replay): views stored as parameters, replayed bit for bit."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from kdlab.data.replay import (
    CropStep,
    FlipStep,
    ReplayedViews,
    ReplayPipeline,
    ResizedCropStep,
    draw_views,
    unreplayable,
)
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


def stored_views(count=3, n=6, **kwargs):
    images = torch.stack([image(seed=i) for i in range(n)])
    pipeline = ReplayPipeline([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()])
    params = draw_views(pipeline, images, count, seed=11)
    tail = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.5,), (0.25,))])
    return images, pipeline, params, tail, ReplayedViews(images, torch.arange(n) % 3, pipeline, params, tail)


def test_views_are_drawn_from_their_own_seed_and_served_in_turn_each_epoch():
    images, pipeline, params, tail, dataset = stored_views()
    torch.manual_seed(123)  # the run's seed plays no part in the draw
    assert params.shape == (6, 3, 3) and torch.equal(params, draw_views(pipeline, images, 3, seed=11))
    assert not torch.equal(params, draw_views(pipeline, images, 3, seed=12))
    for epoch in (0, 1, 5):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            view = (epoch + i) % 3  # views cycle when there are more epochs than K
            assert item["view"] == view and item["index"] == i and item["target"] == i % 3
            assert torch.equal(item["input"], tail(pipeline.apply(images[i], params[i, view])))


def test_a_finite_set_of_views_is_shared_by_every_sample():
    images, pipeline, _, tail, _ = stored_views()
    every = pipeline.choices(images[0])
    dataset = ReplayedViews(images, torch.zeros(len(images)), pipeline, every, tail)
    dataset.set_epoch(4)
    item = dataset[2]
    assert item["view"] == 6 and torch.equal(item["input"], tail(pipeline.apply(images[2], every[6])))


def test_persistent_loader_workers_follow_the_epoch_set_before_each_epoch():
    from kdlab.data.base import EpochShuffle
    from kdlab.data.datasets import collate

    _, _, _, _, dataset = stored_views(count=4)
    sampler = EpochShuffle(dataset, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, sampler=sampler, num_workers=1, persistent_workers=True, collate_fn=collate
    )
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)  # TeacherCache does, at the start of each training epoch
        seen = {
            int(i): int(v) for batch in loader for i, v in zip(batch["index"], batch["view"], strict=True)
        }
        assert seen == {i: (epoch + i) % 4 for i in range(len(dataset))}
