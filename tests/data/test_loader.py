"""Samplers and loaders: epochs as pure functions of the seed, exact resume, sharding, aspect grouping."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from retinanet.config import Config
from retinanet.data.coco import CocoDataset
from retinanet.data.loader import InferenceSampler, TrainBatchSampler, build_test_loader, build_train_loader, collate
from retinanet.data.transforms import Compose, RandomHorizontalFlip, ResizeShortestSide

from .conftest import annotation, coco, image_record, save_image


def _take(sampler, n):
    return list(islice(iter(sampler), n))


def test_an_epoch_is_a_permutation_and_epochs_differ():
    sampler = TrainBatchSampler(12, 3, seed=5)
    batches = _take(sampler, 8)  # 4 batches per epoch
    first = [k[0] for b in batches[:4] for k in b]
    second = [k[0] for b in batches[4:] for k in b]
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second and first != list(range(12))
    assert batches == _take(TrainBatchSampler(12, 3, seed=5), 8)
    assert batches != _take(TrainBatchSampler(12, 3, seed=6), 8)
    assert [k[0] for b in _take(TrainBatchSampler(6, 2, shuffle=False), 3) for k in b] == list(range(6))


def test_sample_seeds_are_per_epoch_and_index():
    batches = _take(TrainBatchSampler(4, 2, seed=0), 4)  # two epochs
    seeds = [{i: s for b in batches[e * 2:e * 2 + 2] for i, s in b} for e in range(2)]
    assert len(set(seeds[0].values()) | set(seeds[1].values())) == 8
    assert all(isinstance(s, int) and s >= 0 for s in seeds[0].values())


@pytest.mark.parametrize("groups", [None, [0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0]])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_from_any_iteration_gives_the_same_remaining_batches(groups, world_size):
    for rank in range(world_size):
        straight = _take(TrainBatchSampler(11, 2, seed=3, groups=groups, rank=rank, world_size=world_size), 20)
        for skip in (1, 2, 5, 7, 13):
            resumed = TrainBatchSampler(11, 2, seed=3, groups=groups, rank=rank, world_size=world_size,
                                        start_iteration=skip)
            assert _take(resumed, 20 - skip) == straight[skip:]


def test_shards_together_are_the_single_process_batches():
    single = _take(TrainBatchSampler(16, 4, seed=1), 8)
    ranks = [_take(TrainBatchSampler(16, 2, seed=1, rank=r, world_size=2), 8) for r in range(2)]
    for j in range(8):
        assert sorted(ranks[0][j] + ranks[1][j]) == sorted(single[j])


def test_uneven_shards_drop_the_remainder_and_still_add_up_to_the_single_process_batches():
    orders = [TrainBatchSampler(5, 1, seed=0, rank=r, world_size=2).epoch_order(0)[0].tolist() for r in range(2)]
    assert len(orders[0]) == len(orders[1]) == 2 and len(set(orders[0] + orders[1])) == 4
    single = _take(TrainBatchSampler(11, 4, seed=2), 6)  # 2 batches per epoch, 3 images cut
    ranks = [_take(TrainBatchSampler(11, 2, seed=2, rank=r, world_size=2), 6) for r in range(2)]
    for j in range(6):
        assert sorted(ranks[0][j] + ranks[1][j]) == sorted(single[j])
    with pytest.raises(ValueError, match="cannot fill a batch"):
        TrainBatchSampler(5, 3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        TrainBatchSampler(5, 1, rank=2, world_size=2)


def test_aspect_grouping_batches_one_group_and_merges_leftovers():
    groups = [0, 1, 0, 0, 1, 0, 1, 0, 0, 1]  # six landscape, four portrait
    sampler = TrainBatchSampler(10, 2, seed=0, groups=groups)
    for epoch in range(5):
        batches = sampler.epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(10))  # even group sizes: nothing left over
        assert all(groups[a] == groups[b] for a, b in batches)
    odd = [0, 1, 0, 0, 1, 0, 1, 0, 1]  # five landscape, four portrait, batch 3
    sampler = TrainBatchSampler(9, 3, seed=0, groups=odd)
    for epoch in range(5):
        order = sampler.epoch_order(epoch)[0].tolist()
        batches = sampler.epoch_batches(epoch)
        # one batch per group, then the leftovers (two landscape, one portrait) merged in epoch order
        assert len(batches) == 3 and sorted(i for b in batches for i in b) == list(range(9))
        assert [len({odd[i] for i in b}) for b in batches] == [1, 1, 2]
        assert batches[2] == sorted(batches[2], key=order.index)


def test_inference_sampler_covers_every_image_once():
    shards = [list(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [len(InferenceSampler(10, rank=r, world_size=3)) for r in range(3)] == [3, 3, 4]


def test_collate_returns_lists():
    images, targets = collate([(torch.zeros(3, 2, 2), {"a": 1}), (torch.ones(3, 4, 2), {"a": 2})])
    assert isinstance(images, list) and [i.shape[1] for i in images] == [2, 4]
    assert targets == [{"a": 1}, {"a": 2}]


@pytest.fixture
def dataset(tmp_path, write_json):
    rng = np.random.default_rng(0)
    records, anns = [], []
    for i in range(6):
        h, w = (12, 16) if i % 2 else (16, 12)
        save_image(tmp_path / f"{i}.png", rng.integers(0, 256, size=(h, w, 3)))
        records.append(image_record(i + 1, f"{i}.png", h, w))
        anns.append(annotation(i + 1, i + 1, [1, 2, 5, 6]))
    return write_json(coco(records, anns)), tmp_path


def test_loader_with_workers_equals_loader_without(dataset):
    cfg = Config()
    cfg.data.batch_size, cfg.data.train_sizes, cfg.data.train_max_size = 2, [8, 10, 14], 20
    transforms = Compose([ResizeShortestSide(cfg.data.train_sizes, 20), RandomHorizontalFlip(0.5)])
    ds = CocoDataset(*dataset, transforms=transforms)
    runs = []
    for workers in (0, 2):
        cfg.data.num_workers = workers
        runs.append(list(islice(build_train_loader(cfg, ds, seed=4, start_iteration=1), 4)))
    for (images0, targets0), (images2, targets2) in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(images0, images2))
        assert [t["image_id"] for t in targets0] == [t["image_id"] for t in targets2]
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets0, targets2))
    sizes = {min(i.shape[1:]) for images, _ in runs[0] for i in images}
    assert len(sizes) > 1  # the jitter did vary


def test_test_loader_and_batch_size_split(dataset):
    ds = CocoDataset(*dataset)
    ids = [t["image_id"] for r in range(2) for _, targets in build_test_loader(ds, batch_size=2, rank=r, world_size=2)
           for t in targets]
    assert ids == [1, 2, 3, 4, 5, 6]
    cfg = Config()
    cfg.data.batch_size = 3
    with pytest.raises(ValueError, match="not divisible"):
        build_train_loader(cfg, ds, seed=0, world_size=2)
