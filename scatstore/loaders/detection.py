"""Detection data: stored COCO canvases (or the source JPEGs) as per-sample tensors with boxes.

A COCO store holds each image as a ``size``×``size`` keep-aspect canvas, the image at the top-left,
its valid extent ``hw`` in the sample's meta, and its boxes ``[x, y, w, h]`` in the stored frame's
pixels (docs/sources.md). A detection sample is:

* ``image``: the **valid cells** of the canvas, ``(C', ⌈h/s⌉, ⌈w/s⌉)`` float32, ``s`` = the input
  stride (``2^J`` for scattering, flattened to ``C·K`` channels; 8 for ``cae`` latents, decoded by
  the store's codec; 1 for pixels, in [0, 1]). The reflected rest of the canvas is left out: it
  holds mirror images of the objects, unannotated.
* ``target``: ``boxes`` ``(N, 4)`` float32 ``[x0, y0, x1, y1]`` in image pixels of the stored frame,
  ``labels`` ``(N,)`` int64 in ``1..K`` (the store's categories in id order; 0 is torchvision's
  background), ``image_id``, ``hw`` (the valid extent), ``flipped``, ``index``, ``nbytes``
  (stored bytes of the sample: the I/O figure).

:func:`detection_collate` gives ``(list of images, list of targets)``, what torchvision's detection
models take. :func:`detection_batches` is a batches factory (``f(epoch)``) as the training engine
uses, sharded over DDP ranks like :func:`scatstore.loaders.pixels.shard_indices`.

**Flip that survives caching.** ``flip=True`` flips each training sample with probability ½, drawn
from ``(seed, epoch, index)``: scattering coefficients by
:func:`scatstore.transforms.flip.flip_coefficients` (orientation permutation + spatial flip, with
the sub-cell correction), pixels exactly; boxes are mirrored inside the frame of the valid cells,
``x → ⌈w/s⌉·s − x``. Codec latents have no flip (a learned encoder is not flip-equivariant):
asking for one is an error. The flip's error on coefficients is measured in docs/models.md ("Detection").
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from .pixels import shard_indices


def category_labels(categories: list[dict] | None) -> list[int]:
    """COCO category ids in label order: label ``k`` (1-based) is ``ids[k - 1]``."""
    return sorted(int(c["id"]) for c in (categories or []))


class _DetectionSamples(torch.utils.data.Dataset):
    """Common part: boxes/labels from a sample's meta, the flip draw, the crop to valid cells.
    ``ds[i]`` or ``ds[(i, epoch)]`` (the epoch seeds the flip)."""

    input_stride: int = 1
    input_kind: str = "pixels"

    def __init__(self, categories, flip: bool, seed: int):
        self.category_ids = category_labels(categories)
        if not self.category_ids:
            raise ValueError("no COCO categories: a detection dataset needs the annotation "
                             "file's categories")
        self._label_of = {c: k + 1 for k, c in enumerate(self.category_ids)}
        self.flip, self.seed = bool(flip), int(seed)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _flipped(self, i: int, epoch: int) -> bool:
        return self.flip and bool(np.random.default_rng([self.seed, epoch, i]).random() < 0.5)

    def _target(self, meta: dict, hw: tuple[int, int], frame_w: int, flipped: bool, i: int,
                nbytes: int) -> dict[str, Any]:
        b = np.asarray(meta.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
        cats = list(meta.get("category_ids") or [])
        if len(cats) != len(b):
            raise ValueError(f"sample {i}: {len(b)} boxes but {len(cats)} category ids")
        unknown = sorted({int(c) for c in cats} - set(self._label_of))
        if unknown:
            raise ValueError(f"sample {i}: category ids {unknown} are not among the dataset's "
                             f"categories {self.category_ids}")
        xyxy = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
        if flipped:
            xyxy = np.stack([frame_w - xyxy[:, 2], xyxy[:, 1], frame_w - xyxy[:, 0], xyxy[:, 3]], 1)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        labels = np.asarray([self._label_of[int(c)] for c in cats], dtype=np.int64)
        out = {
            "boxes": torch.as_tensor(xyxy[keep], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels[keep], dtype=torch.int64),
            "image_id": int(meta.get("image_id") if meta.get("image_id") is not None else -1),
            "hw": (int(hw[0]), int(hw[1])),
            "flipped": bool(flipped),
            "index": int(i),
            "nbytes": int(nbytes),
        }
        if isinstance(meta.get("geometry"), dict):  # the encoder's source -> frame map
            out["geometry"] = meta["geometry"]
        return out

    @staticmethod
    def _key(key) -> tuple[int, int]:
        if isinstance(key, tuple):
            return int(key[0]), int(key[1])
        return int(key), 0


class StoreDetection(_DetectionSamples):
    """Detection samples of a COCO store (scat1 coefficients, ``cae`` latents, raw pixels).

    ``codec``: a loaded codec for ``cae`` stores (default: the one the manifest records).
    ``align``: the coefficient flip's sub-cell alignment (:func:`flip_coefficients`).
    """

    def __init__(self, path, *, flip: bool = False, seed: int = 0, codec=None,
                 align: str = "interp", cache_dir=None, cache_bytes: int | None = None):
        from scatstore.stores import open_dataset

        self.path = os.fspath(path)
        self.dataset = open_dataset(self.path, cache_dir=cache_dir, cache_bytes=cache_bytes)
        m = self.manifest = self.dataset.manifest
        if m.get("preprocess", {}).get("resize") != "keep-aspect canvas" and \
                m.get("source", {}).get("layout") != "coco":
            raise ValueError(f"{self.path}: not a COCO store (detection needs the boxes of a "
                             "COCO source encoded on keep-aspect canvases)")
        super().__init__(m.get("categories"), flip, seed)
        meth = m["method"]
        self.method, self.params = meth["name"], dict(meth.get("params") or {})
        self.align = align
        self.codec = None
        if self.method in ("scat1", "scat2"):
            self.input_kind = "scattering"
            self.input_stride = 2 ** int(self.params["J"])
        elif self.method == "cae":
            if flip:
                raise ValueError(f"{self.path}: flip is not defined on learned-codec latents "
                                 "(the encoder is not flip-equivariant); train without --flip")
            self.input_kind = "latent"
            self.codec = codec if codec is not None else self._load_codec()
            self.input_stride = int(getattr(self.codec, "stride", 8))
        elif self.method == "raw":
            self.input_kind, self.input_stride = "pixels", 1
        else:
            raise ValueError(f"{self.path}: no detection input for method {self.method!r}")
        shape = m.get("sample_shape")
        itemsize = {"float16": 2, "float32": 4, "uint8": 1}.get(m.get("dtype"), 0)
        self._sample_bytes = int(np.prod(shape)) * itemsize if shape else 0

    def _load_codec(self):
        from scatstore.codecs import load_codec

        p = self.params.get("codec_path")
        if not p or not os.path.exists(p):
            raise ValueError(f"{self.path}: the codec recorded in the manifest ({p!r}) is not "
                             "there; pass codec=load_codec(PATH)")
        return load_codec(p)

    @property
    def in_channels(self) -> int:
        x, _ = self[0]
        return int(x.shape[0])

    def __len__(self) -> int:
        return len(self.dataset)

    def meta(self, i: int) -> dict:
        return self.dataset[i][2]

    def __getitem__(self, key):
        i, epoch = self._key(key)
        x, _, meta = self.dataset[i]
        if self.method == "cae":
            nbytes = len(x)
            x = self.codec.dequantize(self.codec.decode_symbols([x]))[0]
        else:
            nbytes = self._sample_bytes
            x = torch.from_numpy(np.asarray(x))
        canvas = x.shape[-1] * self.input_stride
        h, w = meta.get("hw") or (canvas, canvas)
        s = self.input_stride
        hc, wc = math.ceil(h / s), math.ceil(w / s)
        x = x[..., :hc, :wc]
        if self.input_kind == "scattering":
            x = x.reshape(-1, hc, wc)
        x = x.float() / 255.0 if self.method == "raw" else x.float()
        flipped = self._flipped(i, epoch)
        if flipped:
            if self.input_kind == "scattering":
                from scatstore.transforms.flip import flip_coefficients

                x = flip_coefficients(x, int(self.params["J"]), int(self.params.get("L", 8)),
                                      int(self.params.get("max_order", 1)), align=self.align)
            else:
                x = x.flip(-1)
        return x.contiguous(), self._target(meta, (h, w), wc * s, flipped, i, nbytes)


class PixelDetection(_DetectionSamples):
    """The pixel baseline: the COCO source's JPEGs, decoded and framed on every read exactly as
    the encoder frames them (:func:`scatstore.sources.prepare_item`, keep-aspect canvas of side
    ``size``), cropped to the valid extent; ``nbytes`` is the JPEG file's size."""

    input_kind, input_stride = "pixels", 1

    def __init__(self, src, size: int, *, split: str | None = None, flip: bool = False,
                 seed: int = 0):
        from scatstore.sources import discover

        self.index = discover(src, layout="coco", split=split)
        super().__init__(self.index.categories, flip, seed)
        self.size = int(size)
        self.items = self.index.items

    in_channels = 3

    def __len__(self) -> int:
        return len(self.items)

    def _prepared(self, i: int):
        from scatstore.sources.samples import FrameSpec, prepare_item

        item = self.items[i]
        path = self.index.abspath(item)
        (pixels, meta, hw), = prepare_item(path, item, [0], FrameSpec(self.size, keep_aspect=True))
        return pixels, meta, hw, os.path.getsize(path)

    def meta(self, i: int) -> dict:
        return self._prepared(i)[1]

    def __getitem__(self, key):
        i, epoch = self._key(key)
        pixels, meta, (h, w), nbytes = self._prepared(i)
        x = torch.from_numpy(np.ascontiguousarray(pixels[:, :h, :w])).float() / 255.0
        flipped = self._flipped(i, epoch)
        if flipped:
            x = x.flip(-1)
        return x.contiguous(), self._target(meta, (h, w), w, flipped, i, nbytes)


def detection_collate(batch):
    """``[(image, target), ...]`` → ``(list of images, list of targets)``."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class DetectionEpoch:
    """One epoch's batches of this rank; ``bytes_read`` grows as batches are delivered."""

    def __init__(self, dataset, idx: np.ndarray, epoch: int, batch_size: int, drop_last: bool,
                 num_workers: int):
        self.dataset, self.idx, self.epoch = dataset, idx, epoch
        self.batch_size, self.drop_last, self.num_workers = batch_size, drop_last, num_workers
        self.bytes_read = 0

    def __len__(self) -> int:
        n = len(self.idx)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _batches(self) -> list[list[tuple[int, int]]]:
        keys = [(int(i), self.epoch) for i in self.idx]
        return [keys[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def __iter__(self):
        batches = self._batches()
        if self.num_workers > 0:
            it = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                             num_workers=self.num_workers,
                                             collate_fn=detection_collate,
                                             persistent_workers=False)
        else:
            it = (detection_collate([self.dataset[k] for k in b]) for b in batches)
        for images, targets in it:
            self.bytes_read += sum(t["nbytes"] for t in targets)
            yield images, targets


def detection_batches(dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                      drop_last: bool | None = None, num_workers: int = 0,
                      rank: int | None = None, world_size: int | None = None):
    """A batches factory ``f(epoch) -> DetectionEpoch`` over a detection dataset."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    rank = (dist.get_rank() if on else 0) if rank is None else rank
    world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
    drop_last = shuffle if drop_last is None else drop_last

    def factory(epoch: int) -> DetectionEpoch:
        idx = shard_indices(len(dataset), epoch, seed=seed, rank=rank, world_size=world_size,
                            shuffle=shuffle, even=shuffle)
        return DetectionEpoch(dataset, idx, epoch, batch_size, drop_last, num_workers)

    factory.dataset = dataset
    return factory


__all__ = ["StoreDetection", "PixelDetection", "detection_collate", "detection_batches",
           "DetectionEpoch", "category_labels"]
