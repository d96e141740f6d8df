"""COCO box evaluation (pycocotools) of detections made in the stored frame.

A detector trained on a store predicts ``[x0, y0, x1, y1]`` boxes in pixels of the stored frame
(the keep-aspect canvas). COCO's metric is defined on the source images, so every prediction is
clipped to the sample's valid extent ``hw`` and mapped back through the frame's geometry,
``x_src = (x − offset_x) / scale_x`` (same for y), then scored by pycocotools' ``COCOeval``
against the source annotation file: AP@[.5:.95], AP50, AP75, AP small/medium/large, as COCO
defines them (areas in source pixels).

The geometry of a sample is the meta's ``geometry`` (a :class:`scatstore.sources.Geometry` dict)
when the encoder recorded one; otherwise it is that of the keep-aspect canvas, which puts the
image at the top-left (offset 0) scaled to ``hw``: ``scale_x = w / width``, ``scale_y = h /
height`` with the annotation file's declared ``width`` × ``height`` (the frame the boxes are in,
also when the decoded image had another size). For JPEGs decoded at reduced DCT scale (≥ 6× the
frame, docs/sources.md) the encoder's scale differs from this by at most ``(f − 1)/width``
relative (``f`` ≤ 8): below 0.2 % for images of 4000 pixels.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np

METRIC_KEYS = ("map", "map50", "map75", "map_s", "map_m", "map_l")


def find_annotations(manifest: dict) -> Path | None:
    """The COCO annotation file a store was encoded from (``SRC/annotations/instances_<split>.json``
    of the manifest's source root and split), or ``None`` when it is not there any more."""
    root = (manifest.get("source") or {}).get("root")
    if not root:
        return None
    files = sorted(Path(root, "annotations").glob("instances_*.json"))
    split = ((manifest.get("job") or {}).get("params") or {}).get("split")
    if split:
        files = [f for f in files if f.name == f"instances_{split}.json"]
    return files[0] if len(files) == 1 else None


def frame_geometry(meta: dict, image_entry: dict | None):
    """The stored frame's geometry for a sample (see the module docstring); ``None`` when neither
    the meta nor the annotation entry says enough (the evaluation then stays in the stored frame)."""
    from scatstore.sources.preprocess import Geometry

    if isinstance(meta.get("geometry"), dict):
        return Geometry.from_dict(meta["geometry"])
    hw = meta.get("hw")
    if not hw or not image_entry:
        return None
    W, H = image_entry.get("width"), image_entry.get("height")
    if not (isinstance(W, (int, float)) and isinstance(H, (int, float)) and W > 0 and H > 0):
        return None
    h, w = int(hw[0]), int(hw[1])
    return Geometry(w / W, h / H, 0.0, 0.0, h, w, False)


def to_source_boxes(boxes_xyxy, geometry, hw=None) -> np.ndarray:
    """Stored-frame ``[x0, y0, x1, y1]`` → source ``[x0, y0, x1, y1]``: clipped to the valid extent
    ``hw`` (default the geometry's), then ``(x − offset) / scale``."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).copy()
    h, w = hw if hw is not None else (geometry.out_h, geometry.out_w)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    if geometry is None:
        return b
    if geometry.flipped:
        b[:, [0, 2]] = geometry.out_w - b[:, [2, 0]]
    b[:, [0, 2]] = (b[:, [0, 2]] - geometry.offset_x) / geometry.scale_x
    b[:, [1, 3]] = (b[:, [1, 3]] - geometry.offset_y) / geometry.scale_y
    return b


def gt_from_samples(samples: list[tuple[dict, dict | None]], categories: list[dict]) -> dict:
    """A COCO ground-truth dict from stored samples ``(meta, image_entry)``: the stored boxes mapped
    back to the source (or left in the stored frame when no geometry is known). Used when the
    source annotation file is gone; the official file is preferred (it keeps boxes the frame cut)."""
    images, anns = [], []
    for meta, entry in samples:
        geom = frame_geometry(meta, entry)
        iid = int(meta["image_id"])
        h, w = meta.get("hw") or (0, 0)
        images.append({"id": iid, "width": (entry or {}).get("width", w),
                       "height": (entry or {}).get("height", h)})
        b = np.asarray(meta.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
        xyxy = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
        src = to_source_boxes(xyxy, geom, (h, w)) if len(b) else xyxy
        for box, cat in zip(src, meta.get("category_ids") or []):
            bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": int(cat),
                         "bbox": [float(box[0]), float(box[1]), bw, bh], "area": bw * bh,
                         "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in categories]}


class CocoEvaluator:
    """Collect detections of the stored frame per image, score them with pycocotools.

    ``gt``: a COCO annotation dict (the source file's, or :func:`gt_from_samples`);
    ``category_ids``: label ``k`` (1-based, torchvision's convention) → ``category_ids[k − 1]``.
    """

    def __init__(self, gt: dict, category_ids: list[int]):
        self.gt = gt
        self.category_ids = list(category_ids)
        self.entries = {int(im["id"]): im for im in gt.get("images", [])
                        if isinstance(im, dict) and "id" in im}
        self.results: list[dict] = []
        self.image_ids: set[int] = set()

    def add(self, meta: dict, boxes_xyxy, scores, labels) -> None:
        """Detections of one sample (``meta``: the stored sample's meta; boxes in its frame)."""
        iid = int(meta["image_id"])
        self.image_ids.add(iid)
        geom = frame_geometry(meta, self.entries.get(iid))
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        if not len(boxes):
            return
        hw = meta.get("hw")
        src = to_source_boxes(boxes, geom, tuple(hw) if hw else None)
        for b, s, lab in zip(src, np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)):
            lab = int(lab)
            if not 1 <= lab <= len(self.category_ids):
                continue
            self.results.append({"image_id": iid, "category_id": self.category_ids[lab - 1],
                                 "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]),
                                          float(b[3] - b[1])], "score": float(s)})

    def summarize(self) -> dict:
        """``{"map", "map50", "map75", "map_s", "map_m", "map_l"}`` (``None`` where COCO has no
        ground truth in a size range), plus ``n_images`` and ``n_detections``."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        out: dict = {k: 0.0 for k in METRIC_KEYS}
        out.update(n_images=len(self.image_ids), n_detections=len(self.results))
        ids = sorted(self.image_ids)
        if not ids:
            return {k: None for k in METRIC_KEYS} | {"n_images": 0, "n_detections": 0}
        keep = set(ids)
        sub = {"images": [self.entries[i] if i in self.entries else {"id": i} for i in ids],
               "annotations": [dict(a, **({} if "area" in a else {"area": a["bbox"][2] * a["bbox"][3]}),
                                    **({} if "iscrowd" in a else {"iscrowd": 0}))
                               for a in self.gt.get("annotations", []) if a.get("image_id") in keep
                               and a.get("bbox") is not None],
               "categories": self.gt.get("categories", [])}
        for k, a in enumerate(sub["annotations"]):
            a.setdefault("id", k + 1)
        quiet = contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco = COCO()
            coco.dataset = sub
            coco.createIndex()
            if not self.results:
                has_gt = bool(sub["annotations"])
                return {k: (0.0 if has_gt else None) for k in METRIC_KEYS} | \
                    {"n_images": len(ids), "n_detections": 0}
            dt = coco.loadRes(self.results)
            ev = COCOeval(coco, dt, "bbox")
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for k, v in zip(METRIC_KEYS, ev.stats[:6]):
            out[k] = None if v < 0 else float(v)
        return out


def load_gt(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["CocoEvaluator", "find_annotations", "frame_geometry", "to_source_boxes",
           "gt_from_samples", "load_gt", "METRIC_KEYS"]
