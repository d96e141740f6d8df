"""The pixel baseline's data path: a standard torch ``DataLoader`` over the source JPEG folder.

Decode (:func:`scatstore.sources.decode_image`) → training: RandomResizedCrop + horizontal flip
(:func:`scatstore.sources.random_resized_crop`, torchvision's algorithm) | evaluation: shorter side
to ``size`` + centre crop (:func:`scatstore.sources.resize_center_crop`, the same framing the encode
job stores) → float32 in [0, 1] → ImageNet mean/std normalisation. This is what the scattering and
codec stores are compared against: same images, same framing, decoded on every epoch.

Randomness is per sample: ``np.random.default_rng([seed, epoch, index])``, so an epoch's crops do
not depend on the number of workers or ranks. Sharding over DDP ranks follows :func:`shard_indices`.
"""
from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def shard_indices(n: int, epoch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True, even: bool = True) -> np.ndarray:
    """This rank's sample indices for ``epoch`` (DistributedSampler-like, without padding).

    The permutation depends only on ``(seed, epoch)``, so all ranks agree on it; rank ``r`` takes
    positions ``r, r + W, …``. With ``even=True`` (training) the tail is trimmed to a multiple of
    ``world_size`` (at most W−1 samples left out per epoch, a different set each epoch) so that
    every rank sees the same number of samples, hence the same number of batches; with
    ``even=False`` (evaluation) nothing is dropped or repeated and ranks differ by at most one sample.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} / world_size {world_size}")
    idx = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if even:
        idx = idx[: (n // world_size) * world_size]
    return idx[rank::world_size]


class JpegDataset(torch.utils.data.Dataset):
    """``(x float32 (3, size, size) normalised, label, file bytes)`` per source item."""

    def __init__(self, root: str, paths: list[str], labels: list[int], size: int, train: bool,
                 seed: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.root, self.paths, self.labels = root, paths, labels
        self.size, self.train, self.seed, self.epoch = size, train, seed, 0
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from scatstore.sources import DecodeError, decode_image, random_resized_crop, resize_center_crop

        path = os.path.join(self.root, *self.paths[i].split("/"))
        with open(path, "rb") as f:
            data = f.read()
        try:
            img = decode_image(data)
        except DecodeError as e:
            raise DecodeError(getattr(e, "code", "corrupt"), f"{path}: {e}") from e
        if self.train:
            out, _ = random_resized_crop(img, self.size, np.random.default_rng([self.seed, self.epoch, i]))
        else:
            out, _ = resize_center_crop(img, self.size)
        x = torch.from_numpy(np.ascontiguousarray(out)).float().div_(255.0)
        x = (x - self.mean) / self.std
        return x, self.labels[i], len(data)


class _JpegEpoch:
    def __init__(self, owner: "JpegBatches", epoch: int):
        self.owner, self.epoch = owner, epoch
        self.indices = shard_indices(len(owner.dataset), epoch, seed=owner.seed, rank=owner.rank,
                                     world_size=owner.world_size, shuffle=owner.train,
                                     even=owner.train)

    def __len__(self) -> int:
        n, b = len(self.indices), self.owner.batch_size
        return n // b if self.owner.drop_last else math.ceil(n / b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        o = self.owner
        o.dataset.epoch = self.epoch  # workers are forked per epoch (not persistent): they see it
        dl = torch.utils.data.DataLoader(
            o.dataset, batch_size=o.batch_size, sampler=self.indices.tolist(),
            num_workers=o.num_workers, drop_last=o.drop_last, pin_memory=o.pin_memory,
            persistent_workers=False, prefetch_factor=4 if o.num_workers > 0 else None)
        for x, y, nbytes in dl:
            o.bytes_read += int(nbytes.sum())
            yield x, y


class JpegBatches:
    """Batches factory over a source folder: ``factory(epoch)`` → iterable of ``(x, y)``.

    Attributes: ``index`` (the :class:`~scatstore.sources.SourceIndex`), ``class_names``,
    ``num_classes``, ``bytes_read`` (source-file bytes read so far, a counter the training engine
    reports per epoch), ``in_channels`` (3), ``input_size``.
    """

    def __init__(self, src, batch_size: int, size: int = 224, train: bool = True, seed: int = 0,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, *, layout: str = "auto",
                 split: str | None = None, drop_last: bool | None = None, pin_memory: bool | None = None):
        from scatstore.sources import discover

        self.index = discover(src, layout=layout, split=split)
        items = self.index.items
        if not items:
            raise ValueError(f"no images found under {src!r}")
        unlabeled = sum(1 for it in items if it.label < 0)
        if unlabeled:
            raise ValueError(f"{unlabeled} of {len(items)} images under {src!r} have no class label "
                             f"(layout {self.index.layout!r}); the pixel baseline needs class folders")
        self.class_names = list(self.index.class_names)
        self.num_classes = len(self.class_names)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.in_channels, self.input_size = 3, size
        self.bytes_read = 0
        self.dataset = JpegDataset(self.index.root, [it.path for it in items],
                                   [int(it.label) for it in items], size, train, seed)

    def __call__(self, epoch: int) -> _JpegEpoch:
        return _JpegEpoch(self, epoch)

    def __len__(self) -> int:
        return len(_JpegEpoch(self, 0))


def jpeg_batches(src, batch_size: int, size: int = 224, train: bool = True, seed: int = 0,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, **kw) -> JpegBatches:
    """The pixel baseline's batches factory (see :class:`JpegBatches`); ``kw``: ``layout``,
    ``split``, ``drop_last``, ``pin_memory``."""
    return JpegBatches(src, batch_size, size, train, seed, num_workers, rank, world_size, **kw)
