"""Find the samples of a source dataset: ImageNet class folders, COCO detection, plain folders.

``discover(src, layout="auto", split=None) -> SourceIndex``. See ``docs/sources.md``.

* Items are sorted deterministically (ImageNet / folder: by relative path; COCO: by image id).
* ``SourceItem.path`` is relative to ``SourceIndex.root`` (the absolute source directory).
* Keys are unique, deterministic and hold only ``[A-Za-z0-9_-]`` (no ``.``, no ``/``: webdataset
  cuts keys at the first dot). :func:`escape_key` is injective.
* Paths never escape the root: symlinks are followed only when they resolve inside the root
  (checked on the real path); a COCO ``file_name`` that is absolute or climbs out with ``..`` is
  refused and reported in ``missing``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SourceItem", "SourceIndex", "discover", "escape_key", "unescape_key", "source_key",
           "path_meta",
           "IMAGE_EXTENSIONS", "LAYOUTS"]

LAYOUTS = ("imagenet", "coco", "folder")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif",
                              ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm"})
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "classes.txt")
SPLIT_DIRS = ("train", "val", "test")


@dataclass
class SourceItem:
    key: str
    path: str          # relative to SourceIndex.root, '/'-separated
    label: int         # -1 when unlabeled (folder, COCO)
    meta: dict = field(default_factory=dict)


@dataclass
class SourceIndex:
    root: str
    layout: str
    items: list[SourceItem]
    class_names: list[str]
    categories: list[dict] | None
    missing: list[dict]
    total_bytes: int
    split: str | None = None
    class_descriptions: list[str] | None = None   # human-readable names, when a synset file exists
    sizes: list[int] | None = field(default=None, repr=False)  # file size per item

    def __len__(self) -> int:
        return len(self.items)

    def abspath(self, item: SourceItem) -> str:
        return os.path.join(self.root, *item.path.split("/"))

    def fingerprint(self) -> str:
        """sha256 over layout, split, class names and the sorted (path, size, label) list."""
        h = hashlib.sha256()
        h.update(f"scatstore-sources-v1\n{self.layout}\n{self.split}\n".encode())
        h.update(json.dumps(self.class_names).encode() + b"\n")
        sizes = self.sizes if self.sizes is not None else [-1] * len(self.items)
        for path, size, label in sorted((it.path, sz, it.label)
                                        for it, sz in zip(self.items, sizes)):
            # surrogateescape: a file name that is not UTF-8 hashes as its bytes
            h.update(f"{path}\t{size}\t{label}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def skipped(self) -> list[dict]:
        """What discovery left out, one JSON-able dict per entry (``OUT/skipped.jsonl``,
        docs/format.md): ``reason`` and ``path`` (or COCO's ``image_id`` / ``file_name`` /
        ``annotation_id``); paths bytes-safe as in :func:`scatstore.sources.path_meta`."""
        out = []
        for m in self.missing:
            m = dict(m)
            for k in ("path", "file_name"):
                if isinstance(m.get(k), str):
                    safe = path_meta(m[k])
                    m[k] = safe["path"]
                    if "path_bytes_b64" in safe:
                        m[k + "_bytes_b64"] = safe["path_bytes_b64"]
            out.append(m)
        return out

    def summary(self) -> dict:
        return {"root": self.root, "layout": self.layout, "split": self.split,
                "n_items": len(self.items), "n_classes": len(self.class_names),
                "n_missing": len(self.missing), "total_bytes": self.total_bytes,
                "fingerprint": self.fingerprint()}


# --------------------------------------------------------------------------------------------
# keys and bytes-safe paths


def path_meta(path: str) -> dict[str, str]:
    """``{"path": path}``, bytes-safe: a name that is not valid UTF-8 (POSIX file names are bytes;
    Python lists them with lone surrogates, ``surrogateescape``) is stored readably with U+FFFD
    in ``path`` and exactly in ``path_bytes_b64`` (base64 of ``os.fsencode(path)``)."""
    try:
        path.encode("utf-8")
        return {"path": path}
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return {"path": raw.decode("utf-8", "replace"),
                "path_bytes_b64": base64.b64encode(raw).decode("ascii")}


_SAFE = re.compile(r"[A-Za-z0-9_]")


def _key_tokens(s: str) -> list[str]:
    out = []
    for ch in s:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        elif ch == "-":
            out.append("--")
        elif ch == "/":
            out.append("-s")
        elif ch == ".":
            out.append("-d")
        elif ch == " ":
            out.append("-w")
        else:
            out.append(f"-u{ord(ch):06x}")
    return out


def escape_key(s: str) -> str:
    """Injective escape into ``[A-Za-z0-9_-]``: ``-`` -> ``--``, ``/`` -> ``-s``, ``.`` -> ``-d``,
    space -> ``-w``, any other character -> ``-u`` + 6 hex digits of its code point (a byte of a
    non-UTF-8 file name, which Python lists as a lone surrogate U+DC80..U+DCFF, likewise)."""
    return "".join(_key_tokens(s))


# Longest key a source item gets: the store's limit (90, the ustar name field less ".x.npy")
# less room for an augment variant's suffix ("_a" + up to 8 digits).
KEY_LIMIT = 80
_HASH_CHARS = 20  # 80 bits of sha256: a collision needs ~10^12 shortened names


def source_key(name: str) -> str:
    """The key of the source name ``name``: :func:`escape_key` when that is at most
    :data:`KEY_LIMIT` characters (every ordinary name: unchanged), else a stable short form:
    the escaped name cut after whole escapes to a readable prefix, then ``-h`` and 20 hex digits
    of sha256 over the name's bytes (``os.fsencode``). ``-h`` is no escape of
    :func:`escape_key`, so a short form never equals the key of another name."""
    tokens = _key_tokens(name)
    key = "".join(tokens)
    if len(key) <= KEY_LIMIT:
        return key
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:_HASH_CHARS]
    prefix, room = [], KEY_LIMIT - 2 - _HASH_CHARS
    for t in tokens:
        if room < len(t):
            break
        prefix.append(t)
        room -= len(t)
    return "".join(prefix) + "-h" + digest


def unescape_key(k: str) -> str:
    """The name of an :func:`escape_key` key (a shortened :func:`source_key` has none:
    ``ValueError``; the exact path is in the sample's meta)."""
    out, i = [], 0
    simple = {"-": "-", "s": "/", "d": ".", "w": " "}
    while i < len(k):
        ch = k[i]
        if ch != "-":
            out.append(ch)
            i += 1
            continue
        nxt = k[i + 1]
        if nxt in simple:
            out.append(simple[nxt])
            i += 2
        elif nxt == "u":
            out.append(chr(int(k[i + 2:i + 8], 16)))
            i += 8
        else:
            raise ValueError(f"bad escaped key {k!r}")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# filesystem helpers


def _dedupe(entries: list[dict]) -> list[dict]:
    seen, out = set(), []
    for e in entries:
        k = json.dumps(e, sort_keys=True, default=str)
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def relative_to(path: str, root: str) -> str:
    """``path`` relative to ``root``, with "/" separators.

    Every path listed here is ``root`` + separator + names (os.scandir joins them so): cutting
    the prefix gives what os.path.relpath would, ~17× faster (0.3 against 5.1 µs: relpath
    normalises both paths each call; called three times per file, ~18 s for ImageNet's 1.28 M)."""
    prefix = root if root.endswith(os.sep) else root + os.sep
    rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
    return rel if os.sep == "/" else rel.replace(os.sep, "/")


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


class _Walker:
    """Lists files under a root, following symlinks only when they resolve inside the root."""

    def __init__(self, root: str):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.refused: list[dict] = []

    def _rel(self, path: str) -> str:
        return relative_to(path, self.root)

    def entries(self, directory: str):
        """Sorted (name, path, is_dir, size) for the non-hidden entries of ``directory``."""
        out = []
        try:
            it = list(os.scandir(directory))
        except OSError as exc:
            self.refused.append({"path": self._rel(directory), "reason": "unreadable",
                                 "detail": exc.strerror or str(exc)})
            return out
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                if e.is_symlink():
                    real = os.path.realpath(e.path)
                    if not _inside(real, self.real_root):
                        self.refused.append({"path": self._rel(e.path),
                                             "reason": "symlink_outside_root"})
                        continue
                    if not os.path.exists(real):
                        self.refused.append({"path": self._rel(e.path),
                                             "reason": "broken_symlink"})
                        continue
                is_dir = e.is_dir()
                size = 0 if is_dir else e.stat().st_size
            except OSError as exc:
                self.refused.append({"path": self._rel(e.path), "reason": "unreadable",
                                     "detail": exc.strerror or str(exc)})
                continue
            out.append((e.name, e.path, is_dir, size))
        out.sort(key=lambda t: t[0])
        return out

    def images(self, directory: str, recursive: bool):
        """(path, size) of the image files under ``directory``, sorted by relative path."""
        found = []
        seen = {os.path.realpath(directory)}
        stack = [directory]
        while stack:
            d = stack.pop()
            for name, path, is_dir, size in self.entries(d):
                if is_dir:
                    if recursive:
                        real = os.path.realpath(path)
                        if real not in seen:  # symlink cycles
                            seen.add(real)
                            stack.append(path)
                elif _is_image_name(name):
                    found.append((path, size))
        found.sort(key=lambda t: self._rel(t[0]))
        return found

    def has_images(self, directory: str) -> bool:
        try:
            with os.scandir(directory) as it:
                return any(_is_image_name(e.name) and not e.is_dir() for e in it)
        except OSError:
            return False


# --------------------------------------------------------------------------------------------
# layouts


def _coco_annotation_files(root: Path) -> dict[str, Path]:
    ann = root / "annotations"
    if not ann.is_dir():
        return {}
    out = {}
    for p in sorted(ann.glob("instances_*.json")):
        out[p.name[len("instances_"):-len(".json")]] = p
    return out


def _split_roots(walker: _Walker, root: str) -> dict[str, str]:
    """train/ val/ test/ sub-folders that hold class folders."""
    out = {}
    for name in SPLIT_DIRS:
        d = os.path.join(root, name)
        if os.path.isdir(d) and any(is_dir and walker.has_images(p)
                                    for _n, p, is_dir, _s in walker.entries(d)):
            out[name] = d
    return out


def _detect(root: str, walker: _Walker) -> str:
    if _coco_annotation_files(Path(root)):
        return "coco"
    if _split_roots(walker, root):
        return "imagenet"
    if walker.has_images(root):
        return "folder"
    if any(is_dir and walker.has_images(p) for _n, p, is_dir, _s in walker.entries(root)):
        return "imagenet"
    return "folder"


def _pick_split(available: list[str], split: str | None, what: str) -> str:
    if split is not None:
        if split not in available:
            raise ValueError(f"split {split!r} not found for {what}; available: {available}")
        return split
    if len(available) == 1:
        return available[0]
    raise ValueError(f"{what} has several splits {available}: pass split= (--split) to choose")


def _read_synsets(root: str) -> dict[str, str]:
    for name in SYNSET_FILES:
        p = os.path.join(root, name)
        if os.path.isfile(p):
            out = {}
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.strip().split(None, 1)
                    if parts:
                        out[parts[0]] = parts[1] if len(parts) > 1 else parts[0]
            return out
    return {}


def _discover_imagenet(root: str, walker: _Walker, split: str | None) -> SourceIndex:
    splits = _split_roots(walker, root)
    if splits:
        split = _pick_split(sorted(splits), split, f"ImageNet root {root}")
        class_root = splits[split]
    elif split is not None:
        raise ValueError(f"split {split!r} requested but {root} has no train/ val/ sub-folders")
    else:
        class_root = root
    n_refused = len(walker.refused)
    classes = [(name, path) for name, path, is_dir, _s in walker.entries(class_root)
               if is_dir and name not in ("annotations",)]
    # A class folder refused by the walker (a symlink out of SRC, a broken one) is still a
    # class: it keeps its place in the sorted list, so no later label shifts.
    listed = {name for name, _p in classes}
    for r in walker.refused[n_refused:]:  # direct children of class_root, refused
        name = r["path"].rsplit("/", 1)[-1]
        if name not in listed and os.path.isdir(os.path.join(class_root, name)):
            classes.append((name, None))
            listed.add(name)
    classes.sort(key=lambda c: c[0])
    files = []  # (class index, path, size)
    class_names = []
    for name, path in classes:
        imgs = walker.images(path, recursive=True) if path is not None else []
        idx = len(class_names)
        class_names.append(name)
        if not imgs:
            # Kept with its index (labels are positions in the sorted folder list: dropping it
            # would shift every later class), reported in skipped.jsonl.
            walker.refused.append({"path": relative_to(os.path.join(class_root, name), root),
                                   "reason": "empty_class", "label": idx})
        files.extend((idx, p, s) for p, s in imgs)
    if not files and walker.has_images(class_root):
        raise ValueError(f"{class_root} holds images but no class folders: use layout='folder'")
    synsets = _read_synsets(root) or (_read_synsets(class_root) if class_root != root else {})
    descriptions = [synsets.get(c, c) for c in class_names] if synsets else None

    rel_cls = [relative_to(p, class_root) for _i, p, _s in files]
    stems = [os.path.splitext(r.rsplit("/", 1)[-1])[0] for r in rel_cls]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    items, sizes = [], []
    for (label, path, size), rc, stem in zip(files, rel_cls, stems):
        # The file stem (ImageNet names are unique: n01440764_10026, ILSVRC2012_val_00000001);
        # when a stem repeats, the escaped path below the class root (always holds "-s").
        key = source_key(stem) if counts[stem] == 1 else source_key(rc)
        items.append(SourceItem(key, walker._rel(path), label, {}))
        sizes.append(size)
    order = sorted(range(len(items)), key=lambda k: items[k].path)
    items = [items[k] for k in order]
    sizes = [sizes[k] for k in order]
    return SourceIndex(root, "imagenet", items, class_names, None, _dedupe(walker.refused),
                       sum(sizes), split, descriptions, sizes)


def _discover_folder(root: str, walker: _Walker, split: str | None) -> SourceIndex:
    if split is not None:
        raise ValueError("split= is not used by the plain folder layout")
    items, sizes = [], []
    for path, size in walker.images(root, recursive=True):
        rel = walker._rel(path)
        items.append(SourceItem(source_key(rel), rel, -1, {}))
        sizes.append(size)
    return SourceIndex(root, "folder", items, [], None, _dedupe(walker.refused), sum(sizes), None,
                       None, sizes)


def _safe_join(real_root: str, base: str, file_name: str) -> tuple[str | None, str]:
    """Join a COCO ``file_name`` below ``base``; (None, reason) when it escapes the root."""
    if not isinstance(file_name, str) or not file_name:
        return None, "bad_file_name"
    norm = file_name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in norm.split("/"):
        return None, "path_escapes_root"
    p = os.path.join(base, *norm.split("/"))
    if not _inside(os.path.realpath(p), real_root):
        return None, "path_escapes_root"
    return p, ""


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_coco_json(path: Path) -> dict:
    """The annotation file's ``images`` / ``annotations`` / ``categories`` lists; ``ValueError``
    (one line, naming the file) when the file is not a COCO object at all. Single bad entries
    inside the lists are skipped later, one by one, with a reason."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path.name} is not UTF-8 JSON: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a JSON object with 'images', 'annotations' and "
                         f"'categories', got a {type(data).__name__}")
    out = {}
    for name in ("images", "annotations", "categories"):
        v = data.get(name, [])
        if v is None:
            v = []
        if not isinstance(v, list):
            raise ValueError(f"{path.name}: '{name}' must be a list, got a {type(v).__name__}")
        out[name] = v
    bad = [c for c in out["categories"] if not isinstance(c, dict) or not _is_id(c.get("id"))]
    if bad:
        raise ValueError(f"{path.name}: {len(bad)} categories are not objects with an integer "
                         f"'id' (first: {json.dumps(bad[0])[:80]})")
    return out


def _coco_box(a: dict) -> tuple[list[float] | None, int | None]:
    bb, cat = a.get("bbox"), a.get("category_id")
    if not (isinstance(bb, (list, tuple)) and len(bb) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bb)):
        return None, None
    if not _is_id(cat):
        return None, None
    return [float(v) for v in bb], cat


def _discover_coco(root: str, walker: _Walker, split: str | None) -> SourceIndex:
    files = _coco_annotation_files(Path(root))
    if not files:
        raise ValueError(f"{root}: no annotations/instances_*.json (COCO layout)")
    split = _pick_split(sorted(files), split, f"COCO root {root}")
    data = _read_coco_json(files[split])
    images, anns, categories = data["images"], data["annotations"], data["categories"]
    real_root = walker.real_root

    # image folder: <root>/<split>, <root>/images/<split>, <root>/images, <root>
    candidates = [os.path.join(root, split), os.path.join(root, "images", split),
                  os.path.join(root, "images"), root]
    candidates = [c for c in candidates if os.path.isdir(c)]
    bad_entries = [im for im in images if not isinstance(im, dict)]
    images = [im for im in images if isinstance(im, dict)]
    probe = [im.get("file_name") for im in images[:50] if isinstance(im.get("file_name"), str)]
    base = root
    for c in candidates:
        if any((p := _safe_join(real_root, c, fn)[0]) and os.path.isfile(p) for fn in probe):
            base = c
            break
    else:
        base = candidates[0] if candidates else root

    by_image: dict[int, list[dict]] = {}
    missing: list[dict] = _dedupe(walker.refused)
    missing += [{"entry": json.dumps(e)[:200], "reason": "bad_image_entry"} for e in bad_entries]
    image_ids = {im.get("id") for im in images if _is_id(im.get("id"))}
    for a in anns:
        if not isinstance(a, dict):
            missing.append({"entry": json.dumps(a)[:200], "reason": "bad_annotation_entry"})
            continue
        iid = a.get("image_id")
        if iid not in image_ids:
            missing.append({"annotation_id": a.get("id"), "image_id": iid,
                            "reason": "unknown_image_id"})
            continue
        by_image.setdefault(iid, []).append(a)

    items, sizes = [], []
    seen_ids = set()
    for im in sorted(images, key=lambda m: (m.get("id") if _is_id(m.get("id")) else -1,
                                            str(m.get("file_name")))):
        iid = im.get("id")
        fn = im.get("file_name")
        n_ann = len(by_image.get(iid, [])) if _is_id(iid) else 0
        if not _is_id(iid) or iid in seen_ids:
            missing.append({"image_id": iid, "file_name": fn, "n_annotations": n_ann,
                            "reason": "bad_or_duplicate_image_id"})
            continue
        seen_ids.add(iid)
        path, reason = _safe_join(real_root, base, fn)
        if path is None:
            missing.append({"image_id": iid, "file_name": fn, "n_annotations": n_ann,
                            "reason": reason})
            continue
        try:
            size = os.stat(path).st_size
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
        except OSError:
            missing.append({"image_id": iid, "file_name": fn, "n_annotations": n_ann,
                            "reason": "file_not_found"})
            continue
        boxes, cats, crowd, ann_ids = [], [], [], []
        # (annotation ids of mixed types sort integers first, then the others as text)
        for a in sorted(by_image.get(iid, []), key=lambda a: (0, a["id"], "") if _is_id(a.get("id"))
                        else (1, 0, str(a.get("id")))):
            box, cat = _coco_box(a)
            if box is None:
                missing.append({"annotation_id": a.get("id"), "image_id": iid,
                                "reason": "bad_bbox_or_category"})
                continue
            boxes.append(box)
            cats.append(cat)
            crowd.append(1 if a.get("iscrowd") in (1, True) else 0)
            ann_ids.append(a.get("id"))
        meta = {"image_id": iid, "file_name": fn, "boxes": boxes, "category_ids": cats,
                "iscrowd": crowd, "annotation_ids": ann_ids,
                "width": im.get("width"), "height": im.get("height")}
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        key = f"coco_{iid:012d}"
        items.append(SourceItem(key if len(key) <= KEY_LIMIT else source_key(key), rel, -1, meta))
        sizes.append(size)
    class_names = [str(c.get("name", c.get("id"))) for c in categories]
    return SourceIndex(root, "coco", items, class_names, categories, missing, sum(sizes), split,
                       None, sizes)


def discover(src: str | os.PathLike, layout: str = "auto", split: str | None = None
             ) -> SourceIndex:
    """Index a source dataset. ``layout``: ``auto``, ``imagenet``, ``coco`` or ``folder``.

    Auto-detection: ``annotations/instances_*.json`` -> coco; ``train/``/``val/``/``test/``
    holding class folders -> imagenet; images directly in ``src`` -> folder; sub-folders holding
    images -> imagenet; else folder. ``split`` picks ``train``/``val`` (ImageNet) or the
    ``instances_<split>.json`` file (COCO); it is required when several exist.
    """
    root = os.path.abspath(os.fspath(src))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source {src!r} is not a directory")
    walker = _Walker(root)
    if layout == "auto":
        layout = _detect(root, walker)
        walker.refused.clear()
    if layout == "imagenet":
        return _discover_imagenet(root, walker, split)
    if layout == "coco":
        return _discover_coco(root, walker, split)
    if layout == "folder":
        return _discover_folder(root, walker, split)
    raise ValueError(f"unknown layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
