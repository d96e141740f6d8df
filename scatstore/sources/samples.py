"""One source item -> its stored-frame samples: decode once, then crop each variant and carry its
boxes along (docs/sources.md, "Preprocessing").

:func:`prepare_item` is what the encode engine calls per item (in its decode threads); the
geometry (resize, crop, random-resized-crop, box mapping, COCO declared sizes) lives here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .decode import decode_image_reduced
from .layouts import SourceItem, path_meta
from .preprocess import (decode_for_frame, random_resized_crop, resize_center_crop,
                         resize_keep_aspect, variant_rng)

__all__ = ["FrameSpec", "prepare_item"]


@dataclass(frozen=True)
class FrameSpec:
    """How every image of a job is framed: ``size``×``size``; ``keep_aspect`` (COCO: the whole
    image on a canvas) or a centre crop; ``augment`` > 0: random-resized-crop + flip variants
    seeded by ``(seed, key, variant)``."""

    size: int
    keep_aspect: bool = False
    augment: int = 0
    seed: int = 0


def _declared_size(meta: dict) -> tuple[int, int] | None:
    w, h = meta.get("width"), meta.get("height")
    if isinstance(w, (int, float)) and isinstance(h, (int, float)) and not isinstance(w, bool) \
            and not isinstance(h, bool) and w > 0 and h > 0:
        return float(w), float(h)
    return None


def prepare_item(abspath: str, item: SourceItem, variants: list[int], frame: FrameSpec
                 ) -> list[tuple[np.ndarray, dict, tuple[int, int]]]:
    """Decode ``item`` once and frame the given variants of it.

    Returns ``[(pixels uint8 (3, S, S), meta, (h, w) of the content), ...]``; raises
    :class:`DecodeError` for a bad file.

    COCO boxes are in the pixels of the annotation's declared ``width`` × ``height``. When the
    decoded image has another size (a resized copy of the dataset, a wrong JSON), the decoded size
    wins: the boxes are scaled by decoded / declared per axis and the sample's meta says
    ``declared_size: [w, h]`` (the engine counts these in its summary)."""
    if frame.augment:
        # a random crop may keep 8 % of the area: always decoded at full size
        img, f = decode_image_reduced(abspath)
    else:
        # a JPEG ≥ 6× the frame is decoded at reduced DCT scale (docs/sources.md)
        img, f = decode_for_frame(abspath, frame.size, keep_aspect=frame.keep_aspect)
    declared = _declared_size(item.meta) if "boxes" in item.meta else None
    mismatch = declared is not None and (
        -(-int(declared[0]) // f) != img.shape[1] or -(-int(declared[1]) // f) != img.shape[0]
        or declared[0] != int(declared[0]) or declared[1] != int(declared[1]))
    if mismatch:
        full = (img.shape[1], img.shape[0])
        if f != 1:  # a reduced JPEG: its exact full size from the header
            from .decode import jpeg_size

            with open(abspath, "rb") as fh:
                full = jpeg_size(fh.read())
    out = []
    for variant in variants:
        meta: dict[str, Any] = {"source_key": item.key, **path_meta(item.path)}
        if frame.augment:
            meta["variant"] = variant
            # Seeded by (job seed, source key, variant): never by worker or shard position.
            pixels, geom = random_resized_crop(img, frame.size,
                                               variant_rng(frame.seed, item.key, variant))
            hw = (frame.size, frame.size)
        elif frame.keep_aspect:
            pixels, hw, geom = resize_keep_aspect(img, frame.size)
        else:
            pixels, geom = resize_center_crop(img, frame.size)
            hw = (frame.size, frame.size)
        if mismatch:
            # declared pixels -> full-size pixels, per axis, then the reduction f
            geom = geom.after_source_scale(full[0] / declared[0] / f, full[1] / declared[1] / f)
        elif f != 1:
            geom = geom.after_source_scale(1.0 / f)  # boxes are in full-size source pixels
        if "boxes" in item.meta:
            boxes = np.asarray(item.meta["boxes"], dtype=np.float64).reshape(-1, 4)
            kept_boxes, kept = geom.apply_to_boxes(boxes)
            cats = np.asarray(item.meta.get("category_ids", []), dtype=np.int64)
            meta["image_id"] = item.meta.get("image_id")
            meta["boxes"] = np.round(np.asarray(kept_boxes, dtype=np.float64), 3).tolist()
            meta["category_ids"] = cats[np.asarray(kept, dtype=bool)].tolist() if len(cats) else []
            if mismatch:
                meta["declared_size"] = [item.meta.get("width"), item.meta.get("height")]
        if frame.keep_aspect:
            meta["hw"] = [int(hw[0]), int(hw[1])]
        out.append((pixels, meta, hw))
    return out
