"""Resize / crop an RGB image into the stored frame, keeping track of the geometry.

Coordinates are continuous with pixel *edges* on integers (pixel ``i`` covers ``[i, i + 1)``), the
convention of COCO boxes and of PIL's ``resize(box=...)``. A :class:`Geometry` maps source pixels
to the stored frame: ``x_out = x_src * scale_x + offset_x`` (then ``x_out = out_w - x_out`` when
``flipped``), likewise for y. ``out_h`` / ``out_w`` are the extent of real image content in the
stored frame (for :func:`resize_keep_aspect` the valid region of the canvas).

Resampling is antialiased (the kernel support widens with the downscale factor) and applied only
to the region that survives the crop. Default filter: bicubic (a = -0.5). Two implementations of
the same filter, chosen per call (measurements: ``docs/sources.md``):

* torch's ``interpolate(..., antialias=True)`` on uint8, a vectorised port of Pillow(-SIMD)'s
  resampler, whenever the region is integer-aligned and the filter bilinear or bicubic: exact at
  every scale, 5x faster than Pillow at 2x (0.34 vs 1.9 ms for 500x375 -> 224) and 2-4x faster
  than Pillow's reducing-gap shortcut beyond 6x. It differs from Pillow's exact filter on ~0.3 %
  of pixels by one grey level (fixed-point rounding). The kernel is clipped and renormalised at
  the region's edges (Pillow's ``box=`` also reads pixels beyond a crop).
* Pillow's ``Image.resize(box=..., reducing_gap=...)`` otherwise (other filters, fractional
  boxes); ``reducing_gap`` (default 3.0: exact up to 3x, beyond a coarse integer box reduction
  first) applies to this path only.

The centre crop is taken at integer offsets so that the fast path applies. Large JPEGs can skip
most of their decoding: :func:`decode_for_frame`.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Geometry", "resize_center_crop", "resize_keep_aspect", "random_resized_crop",
           "variant_rng", "decode_for_frame", "DEFAULT_RESAMPLE", "DEFAULT_REDUCING_GAP"]

DEFAULT_RESAMPLE = "bicubic"
DEFAULT_REDUCING_GAP: float | None = 3.0


def _pil_filter(name: str):
    from PIL import Image

    filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
    try:
        return filters[name.lower()]
    except KeyError:
        raise ValueError(f"unknown resample filter {name!r}; choose from {sorted(filters)}") \
            from None


@dataclass(frozen=True)
class Geometry:
    """Affine map (axis-aligned scale + offset, optional horizontal flip) source -> stored frame."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    out_h: int
    out_w: int
    flipped: bool = False

    def apply_to_boxes(self, boxes_xywh) -> tuple[np.ndarray, np.ndarray]:
        """Map ``[x, y, w, h]`` source-pixel boxes into the stored frame.

        Boxes are clipped to ``[0, out_w] x [0, out_h]``; boxes left empty are dropped. Returns
        ``(boxes (M, 4) float32 [x, y, w, h], keep (N,) bool)``.
        """
        b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
        x0 = b[:, 0] * self.scale_x + self.offset_x
        x1 = (b[:, 0] + b[:, 2]) * self.scale_x + self.offset_x
        y0 = b[:, 1] * self.scale_y + self.offset_y
        y1 = (b[:, 1] + b[:, 3]) * self.scale_y + self.offset_y
        if self.flipped:
            x0, x1 = self.out_w - x1, self.out_w - x0
        x0 = np.clip(x0, 0, self.out_w)
        x1 = np.clip(x1, 0, self.out_w)
        y0 = np.clip(y0, 0, self.out_h)
        y1 = np.clip(y1, 0, self.out_h)
        keep = (x1 - x0 > 0) & (y1 - y0 > 0) & (b[:, 2] > 0) & (b[:, 3] > 0)
        out = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)[keep].astype(np.float32)
        return out, keep

    def after_source_scale(self, s: float, s_y: float | None = None) -> "Geometry":
        """The map from a source that was scaled by ``s`` (``s_y`` vertically, default ``s``)
        before this one applied (e.g. a JPEG decoded at reduced scale, ``s = 1 / f``):
        ``x_out = (x_src * s) * scale_x + offset_x``."""
        return Geometry(self.scale_x * s, self.scale_y * (s if s_y is None else s_y),
                        self.offset_x, self.offset_y, self.out_h, self.out_w, self.flipped)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(**d)


def decode_for_frame(src, size: int, *, keep_aspect: bool = False,
                     reducing_gap: float | None = DEFAULT_REDUCING_GAP) -> tuple[np.ndarray, int]:
    """Decode ``src`` for :func:`resize_center_crop` (or, ``keep_aspect``, :func:`resize_keep_aspect`)
    to ``size``: a JPEG that the resize would shrink by ``2 * reducing_gap`` or more is decoded at
    1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling, as long as the resize still shrinks it by
    ``reducing_gap`` or more: the reducing-gap rule (exact filter up to ``reducing_gap``, a coarse
    integer reduction first beyond) with the reduction done by the decoder, which then skips part
    of its work (1411² photo -> 224: 8.4 -> 5.5 ms for decode + resize, for 0.3-7 dB of PSNR,
    docs/sources.md). ``None``: never reduced.

    Returns ``(image, f)``; source pixel coordinates map to the image by ``/ f``
    (``Geometry.after_source_scale(1 / f)`` maps boxes in the source's pixels)."""
    from .decode import decode_image_reduced

    if reducing_gap is None:
        return decode_image_reduced(src)
    need = int(math.ceil(reducing_gap * size))
    # the resize's factor is size / shorter side (centre crop) or size / longer side (keep aspect)
    return decode_image_reduced(src, min_long=need) if keep_aspect else \
        decode_image_reduced(src, min_short=need)


def _check(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"empty image {img.shape}")
    return np.ascontiguousarray(img)


_TORCH_FILTERS = ("bilinear", "bicubic")


def _resize_chw(img: np.ndarray, out_w: int, out_h: int, box, resample: str,
                reducing_gap: float | None) -> np.ndarray:
    """Resample ``box`` (x0, y0, x1, y1) of ``img`` (H, W, 3) to a C-contiguous (3, out_h, out_w)."""
    H, W = img.shape[:2]
    if (out_w, out_h) == (W, H) and tuple(box) == (0, 0, W, H):
        return _chw(img)
    name = resample.lower()
    if name in _TORCH_FILTERS and all(float(v).is_integer() for v in box):
        import torch

        x0, y0, x1, y1 = (int(v) for v in box)
        if not img.flags.writeable:  # torch.from_numpy warns on read-only arrays; it only reads
            img = img.copy()
        # (1, 3, h, w) view with channels-last strides: no copy before the resampler, and its
        # output is already channels-first and contiguous.
        t = torch.from_numpy(img)[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0)
        out = torch.nn.functional.interpolate(t, size=(out_h, out_w), mode=name, antialias=True,
                                              align_corners=False)
        return out[0].contiguous().numpy()
    from PIL import Image

    out = Image.fromarray(img).resize((out_w, out_h), _pil_filter(resample),
                                      box=tuple(float(v) for v in box), reducing_gap=reducing_gap)
    return _chw(np.asarray(out))


def _chw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def resize_center_crop(img: np.ndarray, size: int, *, resample: str = DEFAULT_RESAMPLE,
                       reducing_gap: float | None = DEFAULT_REDUCING_GAP
                       ) -> tuple[np.ndarray, Geometry]:
    """Shorter side to ``size`` (antialiased), centre crop ``size`` x ``size``.

    Implemented as one resample of the central square of side ``c = min(H, W)``, at integer
    offsets ``((W - c) // 2, (H - c) // 2)`` (half a source pixel left/up of the exact centre when
    ``W - c`` is odd; the Geometry records the offsets used). Same map as "resize then crop",
    without resampling the pixels the crop throws away.
    Returns ``(uint8 (3, size, size), Geometry)``.
    """
    img = _check(img)
    H, W = img.shape[:2]
    c = min(H, W)
    x0, y0 = (W - c) // 2, (H - c) // 2
    s = size / c
    out = _resize_chw(img, size, size, (x0, y0, x0 + c, y0 + c), resample, reducing_gap)
    return out, Geometry(s, s, -x0 * s, -y0 * s, size, size, False)


def resize_keep_aspect(img: np.ndarray, size: int, *, resample: str = DEFAULT_RESAMPLE,
                       reducing_gap: float | None = DEFAULT_REDUCING_GAP
                       ) -> tuple[np.ndarray, tuple[int, int], Geometry]:
    """Longer side to ``size``, aspect kept, placed top-left on a ``size`` x ``size`` canvas.

    The rest of the canvas is filled by reflecting the image (edge replication for a 1-pixel
    extent), so a later transform with its own reflection padding (the scattering) sees no hard
    black edge whose wavelet response would leak into the valid region.
    Returns ``(uint8 (3, size, size) canvas, (h, w) valid extent, Geometry)``.
    """
    img = _check(img)
    H, W = img.shape[:2]
    if W >= H:
        nw, nh = size, max(1, min(size, int(round(H * size / W))))
    else:
        nh, nw = size, max(1, min(size, int(round(W * size / H))))
    out = _resize_chw(img, nw, nh, (0, 0, W, H), resample, reducing_gap)
    pad_h, pad_w = size - nh, size - nw
    if pad_h or pad_w:
        mode_h = "reflect" if nh > 1 else "edge"
        mode_w = "reflect" if nw > 1 else "edge"
        out = np.pad(out, ((0, 0), (0, 0), (0, pad_w)), mode=mode_w) if pad_w else out
        out = np.pad(out, ((0, 0), (0, pad_h), (0, 0)), mode=mode_h) if pad_h else out
    geom = Geometry(nw / W, nh / H, 0.0, 0.0, nh, nw, False)
    return np.ascontiguousarray(out), (nh, nw), geom


def rrc_params(height: int, width: int, rng: np.random.Generator,
               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: returns ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    # fallback: central crop at the closest allowed ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = max(1, int(round(w / min(ratio))))
    elif in_ratio > max(ratio):
        h = height
        w = max(1, int(round(h * max(ratio))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5, *,
                        resample: str = DEFAULT_RESAMPLE,
                        reducing_gap: float | None = DEFAULT_REDUCING_GAP
                        ) -> tuple[np.ndarray, Geometry]:
    """RandomResizedCrop + horizontal flip (torchvision's algorithm), deterministic given ``rng``.

    Draws, in order: up to 10 x (scale, log-ratio, top, left) attempts, then one flip draw.
    Returns ``(uint8 (3, size, size), Geometry)``.
    """
    img = _check(img)
    H, W = img.shape[:2]
    i, j, h, w = rrc_params(H, W, rng, scale, ratio)
    flip = bool(rng.random() < flip_p)
    out = _resize_chw(img, size, size, (j, i, j + w, i + h), resample, reducing_gap)
    if flip:
        out = np.ascontiguousarray(out[:, :, ::-1])
    sx, sy = size / w, size / h
    return out, Geometry(sx, sy, -j * sx, -i * sy, size, size, flip)


def variant_rng(seed: int, key: str, variant: int) -> np.random.Generator:
    """A generator for augmentation variant ``variant`` of sample ``key``: independent of the
    order in which samples are processed and of the number of workers."""
    digest = hashlib.sha256(f"{int(seed)}\0{key}\0{int(variant)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))
