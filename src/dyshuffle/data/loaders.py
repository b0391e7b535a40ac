"""Batch iterators whose order is a function of ``(seed, epoch)`` only.

:class:`InMemoryLoader` keeps uint8 images on the training device and augments there (random crop
with zero padding, horizontal flip, normalization), like KellerJordan's cifar10-airbench: a GPU
never waits on Python workers. :class:`FileLoader` wraps a standard multi-worker
``torch.utils.data.DataLoader`` with torchvision transforms for data sets that do not fit in
memory (ImageNet). Both split every global batch into one slice per rank, so the samples of a
global batch do not depend on the number of processes, and both can start an epoch at any step,
which is what an exact mid-epoch resume needs. Their random augmentation is a function of
``(seed, epoch)`` (in memory) or ``(seed, epoch, sample index)`` (files) only, so a resumed epoch
is augmented as the epoch that never stopped. Both also offer torchvision's RandAugment,
TrivialAugmentWide and random erasing (:mod:`dyshuffle.data.augment`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import (
    NUM_MAGNITUDE_BINS,
    RA_NUM_OPS,
    AugmentChoice,
    auto_augment,
    check_magnitude,
    check_policy,
    check_prob,
    draw_auto_augment,
    draw_erase_boxes,
    erase,
    torchvision_erase_box,
)
from .common import DatasetError

__all__ = [
    "EVAL_CROP_FRACTION",
    "EpochDraws",
    "EpochPlan",
    "FileLoader",
    "InMemoryLoader",
    "mix_seed",
    "normalize",
    "random_crop",
]

#: evaluation of image files: the shorter side resized to ``size / EVAL_CROP_FRACTION``, then the
#: center ``size`` crop (torchvision's ImageNet evaluation); in-memory images are already at
#: their size (fraction 1)
EVAL_CROP_FRACTION = 0.875


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across Python runs, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochPlan:
    """Which samples each rank sees at each step of an epoch.

    The order of epoch ``e`` is ``randperm(N)`` drawn from a generator seeded with
    ``mix_seed(seed, e)``. Global batch ``s`` is ``order[s*B:(s+1)*B]`` and rank ``r`` takes its
    ``r``-th slice of ``B / world_size`` samples. The last incomplete batch is dropped.

    Args:
        num_samples: ``N``.
        batch_size: global batch ``B``; reduced to the largest multiple of ``world_size`` not
            above ``N`` for tiny data sets.
        world_size, rank: the process group.
        seed: the run's seed.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"batch_size must be a positive multiple of the world size {world_size}, "
                f"got {batch_size}"
            )
        usable = (num_samples // world_size) * world_size
        if usable < world_size:
            raise DatasetError(
                f"{num_samples} training samples are too few for {world_size} processes"
            )
        self.num_samples, self.seed = num_samples, seed
        self.world_size, self.rank = world_size, rank
        self.global_batch = min(batch_size, usable)
        self.local_batch = self.global_batch // world_size
        self.steps = num_samples // self.global_batch

    def generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, epoch))

    def order(self, epoch: int) -> Tensor:
        """The sample order of ``epoch``."""
        return torch.randperm(self.num_samples, generator=self.generator(epoch))

    def positions(self, step: int) -> slice:
        """Positions in the epoch order of this rank's part of batch ``step``."""
        start = step * self.global_batch + self.rank * self.local_batch
        return slice(start, start + self.local_batch)

    def __len__(self) -> int:
        return self.steps


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std``."""
    return x.float().div_(255.0).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def random_crop(x: Tensor, offsets: Tensor, padding: int) -> Tensor:
    """Per-sample crop of ``x`` padded with zeros by ``padding`` pixels, back to its own size.

    Args:
        x: ``(N, C, H, W)``.
        offsets: ``(N, 2)`` integers in ``[0, 2 * padding]``: the top-left corner of each crop in
            the padded image (``padding, padding`` is the identity).
        padding: pixels of zero padding on each side.
    """
    if padding == 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))  # (N, C, H + 2p, W + 2p)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (offsets[:, 0:1] + ar_h)[:, None, :, None].expand(n, c, h, w + 2 * padding)
    xp = xp.gather(2, rows)  # (N, C, H, W + 2p)
    cols = (offsets[:, 1:2] + ar_w)[:, None, None, :].expand(n, c, h, w)
    return xp.gather(3, cols)  # (N, C, H, W)


def _check_augment(auto_augment: str, ra_magnitude: int, random_erasing: float) -> None:
    check_policy(auto_augment)
    check_magnitude(ra_magnitude, "ra_magnitude")
    check_prob(random_erasing, "random_erasing")


@dataclass(frozen=True)
class EpochDraws:
    """The random draws of one training epoch of :class:`InMemoryLoader`, by position in the epoch.

    Attributes:
        order: ``(n,)`` sample indices (the epoch order).
        offsets: ``(n, 2)`` random-crop corners (:func:`random_crop`).
        flips: ``(n,)`` bool, horizontal flips.
        augment: the auto-augment operations (:func:`~dyshuffle.data.augment.draw_auto_augment`),
            ``None`` when off.
        erase: ``(n, 4)`` random-erasing rectangles
            (:func:`~dyshuffle.data.augment.draw_erase_boxes`), ``None`` when off.
    """

    order: Tensor
    offsets: Tensor
    flips: Tensor
    augment: AugmentChoice | None
    erase: Tensor | None


class _EpochLength:
    """Length of a loader's epoch: the plan's steps in training, this rank's share otherwise;
    and the last step of every batch, on the device (:meth:`_finish`).

    Subclasses set ``train``, ``batch_size``, ``mean``, ``std``, ``channels_last`` and either
    ``plan`` (training) or ``local``.
    """

    train: bool
    batch_size: int
    plan: EpochPlan
    local: Sequence[int] | Tensor
    mean: Tensor
    std: Tensor
    channels_last: bool

    def _finish(self, x: Tensor, boxes: Tensor | None = None) -> Tensor:
        """uint8 batch on the device -> normalized float32, erased in ``boxes`` (0 after
        normalization: the mean colour), in the loader's memory format."""
        x = normalize(x, self.mean, self.std)
        if boxes is not None:
            x = erase(x, boxes)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def num_samples(self) -> int:
        """Samples seen by this rank in one epoch."""
        if self.train:
            return self.plan.steps * self.plan.local_batch
        return len(self.local)

    def __len__(self) -> int:
        if self.train:
            return self.plan.steps
        return math.ceil(len(self.local) / self.batch_size)


class InMemoryLoader(_EpochLength):
    """Batches from uint8 images held on the training device, augmented on the device.

    Evaluation takes the images as they are (decoded at their size: ``crop_fraction`` 1).

    Args:
        images: uint8 ``(N, C, H, W)``, already on the device.
        labels: int64 ``(N,)`` on the same device.
        batch_size: global batch size (training) or per-rank batch size (evaluation).
        train: shuffle, augment and drop the last incomplete batch; otherwise iterate this rank's
            ``rank::world_size`` share in order.
        mean, std: normalization (fractions of 255).
        crop_padding: zero padding of the random crop (0 disables it).
        hflip: random horizontal flips.
        auto_augment: ``"randaugment"`` (torchvision's ``RandAugment``, ``num_ops=2``),
            ``"trivialaugment"`` (``TrivialAugmentWide``) or ``"none"``: per image, after the
            crop and flip, on the uint8 batch (:func:`~dyshuffle.data.augment.auto_augment`).
        ra_magnitude: RandAugment's magnitude bin (0-30).
        random_erasing: chance that an image gets one rectangle set to 0 after normalization
            (the mean colour), torchvision's ``RandomErasing`` defaults otherwise.
        seed, world_size, rank: see :class:`EpochPlan`.
        channels_last: return batches in channels-last memory format.
    """

    #: evaluation crop: the center ``size`` of the shorter side resized to ``size / crop_fraction``
    crop_fraction = 1.0

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        hflip: bool = False,
        auto_augment: str = "none",
        ra_magnitude: int = 9,
        random_erasing: float = 0.0,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        channels_last: bool = False,
    ) -> None:
        _check_augment(auto_augment, ra_magnitude, random_erasing)
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        self.images, self.labels = images, labels
        self.device = images.device
        self.train = train
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.crop_padding = int(crop_padding) if train else 0
        self.hflip = bool(hflip) and train
        self.auto_augment = auto_augment if train else "none"
        self.ra_magnitude = int(ra_magnitude)
        self.random_erasing = float(random_erasing) if train else 0.0
        self.channels_last = channels_last
        self.batch_size = batch_size
        self.world_size, self.rank = world_size, rank
        if train:
            self.plan = EpochPlan(
                len(labels), batch_size, world_size=world_size, rank=rank, seed=seed
            )
        else:
            self.local = torch.arange(rank, len(labels), world_size, device=self.device)

    def draws(self, epoch: int) -> EpochDraws:
        """The random draws of training epoch ``epoch``, all from one CPU generator seeded with
        ``mix_seed(seed, epoch)``: the order, crop offsets, flips, then (when on) the
        auto-augment operations and the erasing rectangles of every position of the epoch."""
        plan = self.plan
        g = plan.generator(epoch)
        n = plan.num_samples
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g)
        flips = torch.randint(0, 2, (n,), generator=g).bool()
        augment = draw_auto_augment(self.auto_augment, n, g, magnitude=self.ra_magnitude)
        boxes = None
        if self.random_erasing > 0:
            h, w = self.images.shape[-2:]
            boxes = draw_erase_boxes(n, h, w, self.random_erasing, g)
        return EpochDraws(order, offsets, flips, augment, boxes)

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(normalized float32 images, labels)`` of ``epoch`` from batch ``start_step``."""
        if not self.train:
            for i in range(start_step * self.batch_size, len(self.local), self.batch_size):
                idx = self.local[i : i + self.batch_size]
                yield self._finish(self.images[idx]), self.labels[idx]
            return
        plan = self.plan
        d = self.draws(epoch)
        order, offsets, flips = (t.to(self.device) for t in (d.order, d.offsets, d.flips))
        boxes = None if d.erase is None else d.erase.to(self.device)
        for step in range(start_step, plan.steps):
            pos = plan.positions(step)
            idx = order[pos]
            x = self.images[idx]
            x = random_crop(x, offsets[pos], self.crop_padding)
            if self.hflip:
                x = torch.where(flips[pos].view(-1, 1, 1, 1), x.flip(3), x)
            if d.augment is not None:  # (its choices stay on the CPU, where it groups them)
                x = auto_augment(x, d.augment[pos], self.auto_augment)
            yield self._finish(x, None if boxes is None else boxes[pos]), self.labels[idx]


class _PlanBatches(torch.utils.data.Sampler):
    """Batch sampler over this rank's slices of an :class:`EpochPlan` epoch, from ``start_step``.

    Yields lists of ``(epoch, index)`` keys of :class:`_Files`, so that each sample is augmented
    with draws seeded by its epoch and index wherever it is decoded.
    """

    def __init__(self, plan: EpochPlan, epoch: int, start_step: int) -> None:
        self.plan, self.epoch, self.start_step = plan, epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.plan.order(self.epoch)
        for step in range(self.start_step, self.plan.steps):
            yield [(self.epoch, i) for i in order[self.plan.positions(step)].tolist()]

    def __len__(self) -> int:
        return self.plan.steps - self.start_step


class _Files(torch.utils.data.Dataset):
    """Decoded image files through ``transform``; a key is an index, or ``(epoch, index)``.

    With an ``(epoch, index)`` key the transform runs with torch's global CPU generator seeded
    with ``mix_seed(seed, epoch, index)`` and restored afterwards: its random draws (torchvision's
    v1 transforms, ``RandAugment``, ``TrivialAugmentWide`` and ``RandomErasing`` included, draw
    from that generator only, never from Python's ``random``) are then a function of the run's
    seed, the epoch and the sample, not of the worker that decodes it or of the draws before it,
    and the caller's generator is left as it was when there are no workers (the main process).

    With ``erase_prob`` an item is ``(image, label, box)``: ``box`` is the rectangle that
    torchvision's ``RandomErasing(p=erase_prob)`` draws next (``torchvision_erase_box`` of
    :mod:`dyshuffle.data.augment`), erased later on the normalized batch.
    """

    def __init__(
        self, samples: list[tuple[str, int]], transform, seed: int = 0, erase_prob: float = 0.0
    ) -> None:
        self.samples, self.transform, self.seed = samples, transform, seed
        self.erase_prob = erase_prob

    def __len__(self) -> int:
        return len(self.samples)

    def _item(self, image, label: int) -> tuple:
        x = self.transform(image)
        if self.erase_prob > 0:
            return x, label, torchvision_erase_box(x, self.erase_prob)
        return x, label

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        from .decode import open_image

        epoch, i = key if isinstance(key, tuple) else (None, key)
        path, label = self.samples[i]
        image = open_image(path, path)
        if epoch is None:
            return self._item(image, label)
        # only the CPU generator: torch.manual_seed would also reseed (and not restore) CUDA's
        state = torch.default_generator.get_state()
        try:
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, i))
            return self._item(image, label)
        finally:
            torch.default_generator.set_state(state)


class FileLoader(_EpochLength):
    """A multi-worker ``DataLoader`` over image files with torchvision transforms.

    Training: ``RandomResizedCrop(size)``, ``RandomHorizontalFlip``, then ``RandAugment`` or
    ``TrivialAugmentWide`` (bilinear) on the PIL image, and ``RandomErasing`` after normalization,
    as torchvision's classification recipe; evaluation: resize to ``size / 0.875`` and
    ``CenterCrop(size)``. Workers return uint8 tensors (and, with random erasing, the rectangle
    each image's draws chose); normalization and erasing run on the device. The order follows
    :class:`EpochPlan`; the augmentation of a sample is drawn from a generator seeded with
    ``mix_seed(seed, epoch, index)``, so it depends neither on the number of workers or processes
    nor on the step an epoch starts from.

    Args:
        samples: ``(path, label)`` pairs.
        image_size: output side.
        batch_size: global batch size (training) or per-rank batch size (evaluation).
        train: shuffle and augment.
        device: where batches go.
        mean, std, hflip, auto_augment, ra_magnitude, random_erasing, seed, world_size, rank,
            channels_last: as :class:`InMemoryLoader`.
        workers: loader processes.
    """

    #: evaluation crop: the center ``size`` of the shorter side resized to ``size / crop_fraction``
    crop_fraction = EVAL_CROP_FRACTION

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        image_size: int,
        batch_size: int,
        train: bool,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        hflip: bool = True,
        auto_augment: str = "none",
        ra_magnitude: int = 9,
        random_erasing: float = 0.0,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        workers: int = 8,
        channels_last: bool = False,
    ) -> None:
        from torchvision import transforms as T

        _check_augment(auto_augment, ra_magnitude, random_erasing)
        self.auto_augment = auto_augment if train else "none"
        self.ra_magnitude = int(ra_magnitude)
        self.random_erasing = float(random_erasing) if train else 0.0
        if train:
            ops = [T.RandomResizedCrop(image_size, antialias=True)]
            if hflip:
                ops.append(T.RandomHorizontalFlip())
            bilinear = T.InterpolationMode.BILINEAR
            if auto_augment == "randaugment":
                ops.append(
                    T.RandAugment(RA_NUM_OPS, self.ra_magnitude, NUM_MAGNITUDE_BINS, bilinear)
                )
            elif auto_augment == "trivialaugment":
                ops.append(T.TrivialAugmentWide(NUM_MAGNITUDE_BINS, bilinear))
        else:
            ops = [
                T.Resize(round(image_size / EVAL_CROP_FRACTION), antialias=True),
                T.CenterCrop(image_size),
            ]
        self.dataset = _Files(
            samples, T.Compose([*ops, T.PILToTensor()]), seed, erase_prob=self.random_erasing
        )
        self.train, self.device, self.workers = train, torch.device(device), workers
        self.batch_size, self.seed, self.channels_last = batch_size, seed, channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.world_size, self.rank = world_size, rank
        if train:
            self.plan = EpochPlan(
                len(samples), batch_size, world_size=world_size, rank=rank, seed=seed
            )
        else:
            self.local = list(range(rank, len(samples), world_size))

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(normalized float32 images, labels)`` on the device from batch ``start_step``."""
        if self.train:
            batches = _PlanBatches(self.plan, epoch, start_step)
        else:
            idx = self.local[start_step * self.batch_size :]
            batches = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            # seeds the workers' generators (reseeded per sample) without a draw from the caller's
            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)),
            persistent_workers=False,
        )
        for x, y, *box in loader:  # (box: the rectangles drawn with each sample, if erasing)
            x = self._finish(x.to(self.device, non_blocking=True), box[0] if box else None)
            yield x, y.to(self.device, non_blocking=True)
