"""Small sample datasets and "real ImageNet" trap files, made from images shipped in scikit-image.

Everything is deterministic given ``seed`` (numpy ``default_rng`` + PIL's JPEG encoder).

* :func:`make_imagenet_layout`: ``dst/<wnid>/<wnid>_<i>.JPEG`` class folders with fake wnids
  ``n00000001`` ... and a ``dst/LOC_synset_mapping.txt`` (the ImageNet devkit format,
  ``<wnid> <human-readable name>``) that :func:`scatstore.sources.discover` reads into
  ``SourceIndex.class_descriptions``. Three classes, one per shipped texture (brick, grass,
  gravel); each image is a random crop + rescale + flip of the texture, and every third one has a
  photograph inset (astronaut, coffee, cat, rocket, motorcycle; at most ~20 % of the area) as a
  distractor; JPEG q90, random size.
* :func:`make_coco_layout`: ``dst/annotations/instances_demo.json`` (real COCO format) +
  ``dst/images/<id:012d>.jpg``: photographs with 1-3 texture patches pasted in, each patch boxed
  exactly (categories brick / grass / gravel).
* :func:`make_trap_files`: the awkward files found in the real ImageNet, each with its expected
  :func:`decode_image` outcome.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from ..sample_data import load_image

__all__ = ["make_imagenet_layout", "make_coco_layout", "make_trap_files", "make_small_classes",
           "SMALL_CLASSES", "DEMO_CLASSES",
           "COCO_CATEGORIES", "COCO_BACKGROUNDS"]

# (wnid, shipped texture, human-readable name)
DEMO_CLASSES: tuple[tuple[str, str, str], ...] = (
    ("n00000001", "brick", "brick wall"),
    ("n00000002", "grass", "grass"),
    ("n00000003", "gravel", "gravel"),
)
# photographs inset as distractors in some images of every class
DEMO_SCENES = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")
COCO_CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "brick", "supercategory": "texture"},
    {"id": 2, "name": "grass", "supercategory": "texture"},
    {"id": 3, "name": "gravel", "supercategory": "texture"},
)
COCO_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle",
                    "hubble_deep_field")


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a[:, :, :3]


def _jpeg_bytes(img: np.ndarray, quality: int = 90, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _random_view(src: np.ndarray, out_w: int, out_h: int, rng: np.random.Generator,
                 zoom=(0.45, 1.0)) -> np.ndarray:
    """Random crop of ``src`` with aspect out_w/out_h, resized to (out_h, out_w), maybe flipped."""
    from PIL import Image

    H, W = src.shape[:2]
    zmax = min(W / out_w, H / out_h)
    z = zmax * rng.uniform(*zoom)
    cw, ch = out_w * z, out_h * z
    x0 = rng.uniform(0, W - cw)
    y0 = rng.uniform(0, H - ch)
    im = Image.fromarray(np.ascontiguousarray(src)).resize(
        (out_w, out_h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    out = np.asarray(im)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def make_imagenet_layout(dst, n_per_class: int = 8, size_range=(160, 400), seed: int = 0
                         ) -> Path:
    """Write an ImageNet-style class-folder dataset under ``dst``; returns ``Path(dst)``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lo, hi = size_range
    with open(dst / "LOC_synset_mapping.txt", "w", encoding="utf-8") as f:
        for wnid, _src, name in DEMO_CLASSES:
            f.write(f"{wnid} {name}\n")
    scenes = [_rgb(load_image(n, rgb=False)) for n in DEMO_SCENES]
    for wnid, src_name, _name in DEMO_CLASSES:
        src = _rgb(load_image(src_name, rgb=False))
        d = dst / wnid
        d.mkdir(exist_ok=True)
        for i in range(n_per_class):
            w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            img = _random_view(src, w, h, rng)
            if i % 3 == 2:
                # a distractor: a photograph inset covering 25-45 % of each side
                img = img.copy()
                pw, ph = int(w * rng.uniform(0.25, 0.45)), int(h * rng.uniform(0.25, 0.45))
                x, y = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
                scene = scenes[int(rng.integers(len(scenes)))]
                img[y:y + ph, x:x + pw] = _random_view(scene, pw, ph, rng, zoom=(0.3, 1.0))
            (d / f"{wnid}_{i}.JPEG").write_bytes(_jpeg_bytes(img, 90))
    return dst


def make_coco_layout(dst, n_images: int = 12, seed: int = 0) -> Path:
    """Write a COCO-style detection dataset under ``dst``; returns ``Path(dst)``."""
    dst = Path(dst)
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    textures = {c["id"]: _rgb(load_image(c["name"], rgb=False)) for c in COCO_CATEGORIES}
    backgrounds = {n: _rgb(load_image(n, rgb=False)) for n in COCO_BACKGROUNDS}
    images, annotations = [], []
    ann_id = 1
    for i in range(n_images):
        iid = i + 1
        bg = backgrounds[COCO_BACKGROUNDS[i % len(COCO_BACKGROUNDS)]]
        if rng.random() < 0.25:  # some portrait images
            W, H = int(rng.integers(240, 360)), int(rng.integers(360, 500))
        else:
            W, H = int(rng.integers(320, 520)), int(rng.integers(240, 420))
        img = _random_view(bg, W, H, rng, zoom=(0.6, 1.0)).copy()
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, 4))):
            cat = int(rng.integers(1, len(COCO_CATEGORIES) + 1))
            for _try in range(30):
                pw = int(rng.integers(32, min(W, H) // 2 + 1))
                ph = int(rng.integers(32, min(W, H) // 2 + 1))
                x = int(rng.integers(0, W - pw + 1))
                y = int(rng.integers(0, H - ph + 1))
                if all(x + pw <= bx or bx + bw <= x or y + ph <= by or by + bh <= y
                       for bx, by, bw, bh in placed):
                    break
            else:
                continue
            tex = textures[cat]
            tx = int(rng.integers(0, tex.shape[1] - pw + 1))
            ty = int(rng.integers(0, tex.shape[0] - ph + 1))
            img[y:y + ph, x:x + pw] = tex[ty:ty + ph, tx:tx + pw]
            placed.append((x, y, pw, ph))
            annotations.append({
                "id": ann_id, "image_id": iid, "category_id": cat,
                "bbox": [float(x), float(y), float(pw), float(ph)], "area": float(pw * ph),
                "iscrowd": 0,
                "segmentation": [[x, y, x + pw, y, x + pw, y + ph, x, y + ph]],
            })
            ann_id += 1
        fname = f"{iid:012d}.jpg"
        (dst / "images" / fname).write_bytes(_jpeg_bytes(img, 90))
        images.append({"id": iid, "file_name": fname, "width": W, "height": H})
    doc = {
        "info": {"description": "scatstore demo: scikit-image photos with pasted textures",
                 "version": "1.0", "year": 2026},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in COCO_CATEGORIES],
    }
    with open(dst / "annotations" / "instances_demo.json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return dst


# --------------------------------------------------------------------------------------------
# trap files


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + \
        struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOF) dimensions of a JPEG."""
    b = bytearray(data)
    pos = 2
    while pos < len(b):
        assert b[pos] == 0xFF
        marker = b[pos + 1]
        (length,) = struct.unpack_from(">H", b, pos + 2)
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", b, pos + 5, height, width)
            return bytes(b)
        pos += 2 + length
    raise ValueError("no SOF marker")


def _exif_orientation_bytes(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def make_trap_files(dst) -> dict[str, str]:
    """Write the awkward files of the real ImageNet into ``dst`` (a folder).

    Returns ``{file name: expected outcome}``: ``"ok"`` or the :class:`DecodeError` code.
    """
    from PIL import Image

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    photo = load_image("chelsea")                     # 300 x 451 RGB
    small = np.ascontiguousarray(photo[::2, ::2])      # 150 x 226
    gray = load_image("camera", rgb=False)[::2, ::2]   # 256 x 256
    out: dict[str, str] = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        (dst / name).write_bytes(data)
        out[name] = outcome

    buf = io.BytesIO()
    Image.fromarray(small).convert("CMYK").save(buf, "JPEG", quality=90)
    put("cmyk.JPEG", buf.getvalue(), "ok")             # Adobe (inverted) CMYK, as Photoshop
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, "PNG")
    put("png_named.JPEG", buf.getvalue(), "ok")        # a PNG with a .JPEG name
    put("gray.JPEG", _jpeg_bytes(np.ascontiguousarray(gray), 90), "ok")
    put("exif_rotated.JPEG", _jpeg_bytes(small, 90, exif=_exif_orientation_bytes(6)), "ok")
    put("progressive.JPEG", _jpeg_bytes(small, 90, progressive=True), "ok")
    plain = _jpeg_bytes(small, 90)
    # "Corrupt JPEG data: N extraneous bytes before marker": harmless, libjpeg skips them
    put("extraneous_bytes.JPEG", plain[:20] + b"\x00\x00junk" + plain[20:], "ok")
    tiny = np.ascontiguousarray(photo[100:106, 200:208])  # 8 wide x 6 high
    put("tiny.JPEG", _jpeg_bytes(tiny, 90), "ok")
    buf = io.BytesIO()
    Image.fromarray(np.dstack([small, np.full(small.shape[:2], 200, np.uint8)])).save(buf, "PNG")
    put("rgba.png", buf.getvalue(), "ok")
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(buf, "PNG")
    put("gray16.png", buf.getvalue(), "ok")
    buf = io.BytesIO()
    Image.fromarray(small).convert("P", palette=Image.ADAPTIVE, colors=64).save(buf, "PNG")
    put("palette.png", buf.getvalue(), "ok")
    # decompression bombs: real, tiny files whose headers claim 40000 x 40000 pixels
    put("bomb.JPEG", _patch_jpeg_size(_jpeg_bytes(tiny, 90), 40000, 40000), "too_large")
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + \
        _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4001 * 10)) + _png_chunk(b"IEND", b"")
    put("bomb.png", png, "too_large")
    full = _jpeg_bytes(small, 90)
    put("truncated.JPEG", full[: len(full) * 2 // 3], "truncated")
    put("empty.JPEG", b"", "empty")
    put("text.JPEG", b"<html><body>404 Not Found</body></html>\n" * 4, "not_an_image")
    return out


# --------------------------------------------------------------------------------------------
# a small 5-class classification set (textures, faces, photographs)

SMALL_CLASSES: tuple[tuple[str, str], ...] = (
    ("brick", "texture"), ("grass", "texture"), ("gravel", "texture"),
    ("face", "faces"), ("photo", "photos"),
)
_SMALL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "camera",
                 "coins", "clock", "immunohistochemistry", "hubble_deep_field")


def make_small_classes(dst, n_train: int = 30, n_val: int = 10, size_range=(96, 200),
                       seed: int = 0) -> tuple[Path, Path]:
    """Write a 5-class ImageNet-layout training set and a disjoint validation set.

    ``dst/train/<class>/…JPEG`` (``n_train`` per class) and ``dst/val/<class>/…JPEG``
    (``n_val`` per class): three textures (random crops, rescales and flips of each texture),
    faces (the 100 faces of ``skimage.data.lfw_subset``, upscaled: the first 70 people for
    training, the last 30 for validation) and photographs (random views of ten shipped
    photographs). Training and validation views are drawn independently. Every
    image has a random size in ``size_range`` and is stored as JPEG q90. Returns
    ``(dst/train, dst/val)``.
    """
    from ..sample_data import load_faces

    dst = Path(dst)
    rng = np.random.default_rng(seed)
    lo, hi = size_range
    faces = load_faces(100)
    photos = [_rgb(load_image(n, rgb=False)) for n in _SMALL_PHOTOS]
    textures = {n: _rgb(load_image(n, rgb=False)) for n, kind in SMALL_CLASSES if kind == "texture"}

    def views(name: str, kind: str, split: str, n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            w = h = int(rng.integers(lo, hi + 1))
            if kind == "texture":
                src = textures[name]
            elif kind == "faces":
                idx = int(rng.integers(0, 70)) if split == "train" else int(rng.integers(70, 100))
                src = _rgb(faces[idx])
            else:
                src = photos[int(rng.integers(len(photos)))]
            zoom = (0.8, 1.0) if kind == "faces" else (0.45, 1.0)
            out.append(_random_view(src, w, h, rng, zoom=zoom))
        return out

    roots = []
    for split, n in (("train", n_train), ("val", n_val)):
        root = dst / split
        for cname, kind in SMALL_CLASSES:
            d = root / cname
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(views(cname, kind, split, n)):
                (d / f"{cname}_{i:03d}.JPEG").write_bytes(_jpeg_bytes(img, 90))
        roots.append(root)
    return roots[0], roots[1]
