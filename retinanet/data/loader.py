"""Batches for training and evaluation: samplers, collate, and the builders that read `cfg.data`.

The training data order contract (what the engine relies on for exact resume and DDP):

- `TrainBatchSampler` yields an endless stream of batches. Batch j of process `rank` is a pure
  function of (seed, rank, world_size, batch_size, aspect groups, j); nothing else is state. To resume
  after j iterations, build the sampler (or loader) with `start_iteration=j`: it recomputes the
  order and skips j batches, so the remaining batches are exactly those of an uninterrupted run.
- Epoch e shuffles all N images with a generator seeded by (seed, e), the same on every process;
  process `rank` of `world_size` takes positions rank, rank + world_size, ... of that order, cut to
  a multiple of world_size (like `DistributedSampler(drop_last=True)`; the few images cut differ from
  epoch to epoch). Without aspect grouping, the processes' batch j together are exactly the
  single-process batch j of batch_size * world_size images.
- Each item is keyed (index, sample_seed), where sample_seed is drawn per (seed, e, index); the
  dataset seeds its transforms with it, so augmentation also repeats exactly, whichever worker
  loads the item and however many workers there are.
- `data.batch_size` counts images per iteration over all processes together (the paper's 16);
  each process loads batch_size / world_size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config
from ..syncs import to_device
from .coco import CocoDataset
from .transforms import Compose, PendingImage, RandomHorizontalFlip, ResizeShortestSide, ScaleJitterCrop


def collate(batch: list) -> tuple:
    """[(image, target), ...] -> (list of images, list of targets); the model pads images itself."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class _PendingPixels(Dataset):
    """A CocoDataset whose items keep their images as `PendingImage`s (uint8, pixel operations not applied)."""

    def __init__(self, dataset: CocoDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> tuple:
        return self.dataset.item(key, pending=True)


def batch_to_device(images: list, targets: list, device) -> tuple:
    """A training batch onto `device` without waiting for it (`syncs.to_device`: asynchronous from
    pinned memory): `PendingImage`s are copied as uint8 and realized there (converted to float,
    resized, cropped, flipped: (3, H, W) float32 in [0, 1]); other images and the targets' tensors
    are copied as they are."""
    images = [image.realize(device) if isinstance(image, PendingImage) else to_device(image, device)
              for image in images]
    targets = [{k: to_device(v, device) if torch.is_tensor(v) else v for k, v in target.items()} for target in targets]
    return images, targets


def images_to_device(images: list, device) -> list:
    """Inference images onto `device` without waiting for it (`syncs.to_device`: asynchronous from
    pinned memory), for the model's `preprocess` to convert, normalize and resize there:
    `PendingImage`s with no pixel operations are copied as their (3, H, W) uint8 data; those with
    operations (a dataset with transforms) are realized there ((3, H, W) float32 in [0, 1]); other
    images are copied as they are. On the CPU the detections are those of the float images, bit for bit."""
    return [(to_device(image.data, device) if not image.ops else image.realize(device))
            if isinstance(image, PendingImage) else to_device(image, device) for image in images]


class TrainBatchSampler(Sampler):
    """Endless batches of keys (index, sample_seed) for one process (contract in the module docstring).

    num_images: N. batch_size: images per batch for this process.
    groups: per image a group id (e.g. `CocoDataset.aspect_groups()`); a batch takes images of one
        group only, filled in the epoch's order; at the end of an epoch the groups' leftovers are merged,
        in order, into full batches and the last incomplete batch is dropped. None: no grouping.
    shuffle: False keeps 0..N-1 order every epoch (sample seeds still differ per epoch).
    """

    def __init__(self, num_images: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 groups: Optional[Sequence[int]] = None, rank: int = 0, world_size: int = 1,
                 start_iteration: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if seed < 0 or start_iteration < 0 or batch_size <= 0:
            raise ValueError(f"seed and start_iteration must be >= 0 and batch_size > 0, "
                             f"got {seed}, {start_iteration}, {batch_size}")
        if num_images // world_size < batch_size:
            raise ValueError(f"{num_images} images over {world_size} process(es) cannot fill a batch of {batch_size}")
        if groups is not None and len(groups) != num_images:
            raise ValueError(f"groups has {len(groups)} entries for {num_images} images")
        self.num_images, self.batch_size, self.seed, self.shuffle = num_images, batch_size, seed, shuffle
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        self.rank, self.world_size, self.start_iteration = rank, world_size, start_iteration

    def epoch_order(self, epoch: int) -> tuple:
        """(this process's image indices in order, sample seed of every image) for one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_images) if self.shuffle else np.arange(self.num_images)
        seeds = rng.integers(0, 2 ** 63 - 1, size=self.num_images)  # (N,) per image, this epoch
        usable = self.num_images // self.world_size * self.world_size
        return order[:usable][self.rank::self.world_size], seeds

    def epoch_batches(self, epoch: int) -> list:
        """This process's batches of image indices for one epoch."""
        order, _ = self.epoch_order(epoch)
        if self.groups is None:
            full = len(order) // self.batch_size * self.batch_size
            return [order[i:i + self.batch_size].tolist() for i in range(0, full, self.batch_size)]
        batches, buckets = [], {}  # buckets: group -> positions in `order` waiting for a full batch
        for position, index in enumerate(order.tolist()):
            bucket = buckets.setdefault(int(self.groups[index]), [])
            bucket.append(position)
            if len(bucket) == self.batch_size:
                batches.append(order[bucket].tolist())
                bucket.clear()
        leftovers = order[sorted(p for b in buckets.values() for p in b)].tolist()
        full = len(leftovers) // self.batch_size * self.batch_size
        batches += [leftovers[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
        return batches

    def __iter__(self):
        skip, epoch = self.start_iteration, 0
        while True:
            batches = self.epoch_batches(epoch)
            if skip >= len(batches):
                skip -= len(batches)
            else:
                _, seeds = self.epoch_order(epoch)
                for batch in batches[skip:]:
                    yield [(index, int(seeds[index])) for index in batch]
                skip = 0
            epoch += 1


class InferenceSampler(Sampler):
    """Indices rank*N/W .. (rank+1)*N/W - 1 in order: every image exactly once over all processes."""

    def __init__(self, num_images: int, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.start = num_images * rank // world_size
        self.stop = num_images * (rank + 1) // world_size

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


# ----------------------------------------------------------------------------------------------
# builders: the functions that read cfg.data


def build_train_transforms(cfg: Config) -> Compose:
    """Shorter-side resize (data.train_sizes, default the model's min_size), or with data.scale_jitter the
    large-scale jitter crop (padded with the model's pixel mean), then horizontal flip."""
    d, m = cfg.data, cfg.model
    if d.scale_jitter:
        return Compose([ScaleJitterCrop(d.crop_size, d.scale_jitter, fill=m.pixel_mean),
                        RandomHorizontalFlip(d.flip_prob)])
    sizes = d.train_sizes or [m.min_size]
    max_size = d.train_max_size if d.train_max_size is not None else m.max_size
    return Compose([ResizeShortestSide(sizes, max_size, sampling=d.train_size_sampling, rounding=m.resize_rounding),
                    RandomHorizontalFlip(d.flip_prob)])


def _dataset(json_path: Optional[str], image_dir: Optional[str], which: str, cfg: Config, transforms,
             progress: bool, masks: bool = False) -> CocoDataset:
    if not json_path or not image_dir:
        raise ValueError(f"data.{which}_json and data.{which}_images must both be set")
    return CocoDataset(json_path, image_dir, transforms=transforms, strict=cfg.data.strict,
                       check_images=cfg.data.check_images, skip_unreadable=cfg.data.skip_unreadable, progress=progress,
                       masks=masks)


def build_train_dataset(cfg: Config, progress: bool = False) -> CocoDataset:
    """The validated training set with the training transforms (and mask targets if data.masks;
    progress: a bar while images are read)."""
    return _dataset(cfg.data.train_json, cfg.data.train_images, "train", cfg, build_train_transforms(cfg), progress,
                    masks=cfg.data.masks)


def build_val_dataset(cfg: Config, progress: bool = False) -> Optional[CocoDataset]:
    """The validated validation set without transforms (the model resizes in eval mode), or None if not set.
    Without masks: evaluation reads the ground truth from the JSON, not from the targets."""
    if not cfg.data.val_json and not cfg.data.val_images:
        return None
    return _dataset(cfg.data.val_json, cfg.data.val_images, "val", cfg, None, progress)


def build_train_loader(cfg: Config, dataset: CocoDataset, *, seed: int, rank: int = 0, world_size: int = 1,
                       start_iteration: int = 0, pin_memory: bool = False, pending_images: bool = False) -> DataLoader:
    """Endless training batches (images, targets) of data.batch_size / world_size images for this process.

    seed: the same on every process. start_iteration: batches already trained on (resume).
    With data.scale_jitter every image is a crop_size square, so aspect grouping is skipped (one group).
    pending_images: images come as uint8 `PendingImage`s, for `batch_to_device` to realize on the GPU
    (what the engine asks for on a GPU, with pin_memory); otherwise (3, H, W) float32 in [0, 1].
    """
    if cfg.data.batch_size % world_size:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by the {world_size} processes")
    sampler = TrainBatchSampler(len(dataset), cfg.data.batch_size // world_size, seed=seed,
                                groups=dataset.aspect_groups() if cfg.data.aspect_grouping and not cfg.data.scale_jitter
                                else None,
                                rank=rank, world_size=world_size, start_iteration=start_iteration)
    return DataLoader(_PendingPixels(dataset) if pending_images else dataset, batch_sampler=sampler,
                      num_workers=cfg.data.num_workers, collate_fn=collate, pin_memory=pin_memory)


def build_test_loader(dataset: CocoDataset, *, batch_size: int = 1, num_workers: int = 0, rank: int = 0,
                      world_size: int = 1, pin_memory: bool = False, pending_images: bool = False) -> DataLoader:
    """Each image of this process's contiguous shard once, in order, as (images, targets) batches.

    pending_images: images come as uint8 `PendingImage`s, for `images_to_device` to copy to the device
    as uint8 (what evaluation asks for; pin_memory on a GPU); otherwise (3, H, W) float32 in [0, 1]."""
    return DataLoader(_PendingPixels(dataset) if pending_images else dataset, batch_size=batch_size,
                      sampler=InferenceSampler(len(dataset), rank=rank, world_size=world_size),
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory)
