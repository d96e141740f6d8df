"""discover() on ImageNet (incl. train/val roots), COCO and plain folders."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from scatstore.sources import (discover, escape_key, make_coco_layout, make_imagenet_layout,
                               make_trap_files, unescape_key)


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    return make_imagenet_layout(tmp_path_factory.mktemp("inet"), n_per_class=3)


@pytest.fixture(scope="module")
def coco_template(tmp_path_factory):
    return make_coco_layout(tmp_path_factory.mktemp("coco"), n_images=5)


@pytest.fixture
def coco(coco_template, tmp_path):
    dst = tmp_path / "coco"
    shutil.copytree(coco_template, dst)
    return dst


def _check_keys(ix):
    keys = [it.key for it in ix.items]
    assert len(set(keys)) == len(keys)
    for k in keys:
        assert k and "." not in k and "/" not in k and all(c.isalnum() or c in "_-" for c in k)


def test_imagenet_layout(inet):
    ix = discover(inet)
    assert ix.layout == "imagenet" and ix.split is None
    wnids = sorted(p.name for p in inet.iterdir() if p.is_dir())
    assert ix.class_names == wnids
    assert ix.class_descriptions[0] == "brick wall"
    assert len(ix.items) == 9
    for it in ix.items:
        cls, fname = it.path.split("/")
        assert it.label == wnids.index(cls)
        assert it.key == fname.rsplit(".", 1)[0]          # n00000001_0
        assert os.path.isfile(ix.abspath(it))
    assert [it.path for it in ix.items] == sorted(it.path for it in ix.items)
    assert ix.total_bytes == sum(os.path.getsize(ix.abspath(it)) for it in ix.items)
    assert ix.missing == [] and ix.categories is None
    _check_keys(ix)
    assert discover(inet, "imagenet").fingerprint() == ix.fingerprint()


def test_train_val_roots(inet, tmp_path):
    root = tmp_path / "ilsvrc"
    shutil.copytree(inet, root / "train")
    (root / "val").mkdir()
    for d in ("n00000001", "n00000003"):
        shutil.copytree(inet / d, root / "val" / d)
    with pytest.raises(ValueError, match="split"):
        discover(root)
    val = discover(root, split="val")
    assert val.layout == "imagenet" and val.split == "val"
    assert val.class_names == ["n00000001", "n00000003"]
    assert all(it.path.startswith("val/") for it in val.items) and len(val.items) == 6
    train = discover(root, "imagenet", split="train")
    assert len(train.items) == 9 and train.class_descriptions is not None  # synsets in train/
    shutil.rmtree(root / "val")
    assert discover(root).split == "train"


def test_fingerprint_tracks_content(inet, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(inet, a)
    fp = discover(a).fingerprint()
    assert discover(inet).fingerprint() == fp        # independent of where the root lives
    f = next((a / "n00000003").iterdir())
    with open(f, "ab") as fh:
        fh.write(b"\0")
    fp2 = discover(a).fingerprint()
    assert fp2 != fp
    f.rename(f.with_name("n00000003_99.JPEG"))
    assert discover(a).fingerprint() not in (fp, fp2)
    assert discover(a, "folder").fingerprint() != discover(a, "imagenet").fingerprint()


def test_generic_class_folders_duplicate_stems(tmp_path):
    make_trap_files(tmp_path / "t")
    img = (tmp_path / "t" / "gray.JPEG").read_bytes()
    for rel in ("cat/001.jpg", "dog/001.jpg", "dog/001.PNG", "dog/002.Jpeg", "dog/sub/x.y.jpg",
                "dog/notes.txt", "dog/.hidden.jpg"):
        p = tmp_path / "ds" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(img)
    ix = discover(tmp_path / "ds")
    assert ix.layout == "imagenet" and ix.class_names == ["cat", "dog"]
    keys = {it.path: it.key for it in ix.items}
    assert set(keys) == {"cat/001.jpg", "dog/001.jpg", "dog/001.PNG", "dog/002.Jpeg",
                         "dog/sub/x.y.jpg"}
    assert keys["dog/002.Jpeg"] == "002"
    assert unescape_key(keys["cat/001.jpg"]) == "cat/001.jpg"
    assert keys["dog/sub/x.y.jpg"] == "x-dy"        # unique stem, dot escaped
    _check_keys(ix)


def test_folder_layout(tmp_path):
    expected = make_trap_files(tmp_path / "traps")
    (tmp_path / "traps" / "more").mkdir()
    shutil.copy(tmp_path / "traps" / "gray.JPEG", tmp_path / "traps" / "more" / "g 2.jpeg")
    (tmp_path / "traps" / "readme.txt").write_text("not an image")
    ix = discover(tmp_path / "traps")
    assert ix.layout == "folder" and ix.class_names == []
    assert all(it.label == -1 for it in ix.items)
    assert {it.path for it in ix.items} == set(expected) | {"more/g 2.jpeg"}
    assert {it.key for it in ix.items} >= {"cmyk-dJPEG", "more-sg-w2-djpeg"}
    _check_keys(ix)
    (tmp_path / "empty_dir").mkdir()
    empty = discover(tmp_path / "empty_dir")
    assert empty.layout == "folder" and empty.items == [] and empty.total_bytes == 0


def test_escape_key_injective():
    names = ["a.b", "a-b", "a_b", "a/b", "a--b", "a-sb", "a-db", "ü.jpg", "a b", "a\tb", "-s",
             "x.y.z/w", "a-u000041", "A"]
    keys = [escape_key(n) for n in names]
    assert len(set(keys)) == len(keys)
    for n, k in zip(names, keys):
        assert unescape_key(k) == n
        assert "." not in k and "/" not in k


def test_coco_layout(coco):
    ix = discover(coco)
    assert ix.layout == "coco" and ix.split == "demo"
    doc = json.loads((coco / "annotations" / "instances_demo.json").read_text())
    assert ix.categories == doc["categories"]
    assert ix.class_names == ["brick", "grass", "gravel"]
    assert [it.meta["image_id"] for it in ix.items] == sorted(im["id"] for im in doc["images"])
    for it in ix.items:
        assert it.key == f"coco_{it.meta['image_id']:012d}" and it.label == -1
        anns = sorted((a for a in doc["annotations"] if a["image_id"] == it.meta["image_id"]),
                      key=lambda a: a["id"])
        assert it.meta["boxes"] == [a["bbox"] for a in anns]
        assert it.meta["category_ids"] == [a["category_id"] for a in anns]
        assert it.path == "images/" + it.meta["file_name"]
        json.dumps(it.meta)
    assert ix.missing == []
    _check_keys(ix)


def test_coco_missing_and_escapes(coco, tmp_path):
    (tmp_path / "secret.jpg").write_bytes((coco / "images" / "000000000001.jpg").read_bytes())
    ann = coco / "annotations" / "instances_demo.json"
    doc = json.loads(ann.read_text())
    os.remove(coco / "images" / "000000000002.jpg")
    doc["images"] += [{"id": 90, "file_name": "../../secret.jpg", "width": 1, "height": 1},
                      {"id": 91, "file_name": "/etc/passwd", "width": 1, "height": 1},
                      {"id": 92, "file_name": "link.jpg", "width": 1, "height": 1}]
    os.symlink(tmp_path / "secret.jpg", coco / "images" / "link.jpg")
    doc["annotations"].append({"id": 999, "image_id": 12345, "category_id": 1,
                               "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0})
    ann.write_text(json.dumps(doc))
    ix = discover(coco)
    ids = [it.meta["image_id"] for it in ix.items]
    assert ids == [1, 3, 4, 5]
    reasons = {(m.get("image_id"), m["reason"]) for m in ix.missing}
    assert (2, "file_not_found") in reasons
    assert (90, "path_escapes_root") in reasons and (91, "path_escapes_root") in reasons
    assert (92, "path_escapes_root") in reasons       # symlink resolving outside the root
    assert (12345, "unknown_image_id") in reasons
    m2 = next(m for m in ix.missing if m.get("image_id") == 2)
    assert m2["n_annotations"] == sum(a["image_id"] == 2 for a in doc["annotations"])


def test_coco_several_splits(coco):
    shutil.copy(coco / "annotations" / "instances_demo.json",
                coco / "annotations" / "instances_other.json")
    with pytest.raises(ValueError, match="split"):
        discover(coco)
    assert discover(coco, split="demo").split == "demo"
    assert discover(coco, "coco", split="other").split == "other"


def test_symlinks_inside_and_outside(inet, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(inet, root)
    outside = tmp_path / "outside"
    shutil.copytree(inet / "n00000001", outside)
    src = next((root / "n00000002").iterdir())
    os.symlink(src, root / "n00000002" / "n00000002_link.JPEG")          # inside: kept
    os.symlink(outside / "n00000001_0.JPEG", root / "n00000002" / "evil.JPEG")  # outside
    os.symlink(outside, root / "n00000009")                             # class dir outside
    os.symlink(root / "n00000003", root / "n00000003" / "loop")         # cycle inside
    ix = discover(root)
    paths = {it.path for it in ix.items}
    assert "n00000002/n00000002_link.JPEG" in paths
    assert "n00000002/evil.JPEG" not in paths
    # the class folder out of SRC is not read, but keeps its index: no later label shifts
    assert ix.class_names[3] == "n00000009" and not any(it.label == 3 for it in ix.items)
    assert {"path": "n00000009", "reason": "empty_class", "label": 3} in ix.skipped()
    assert {m["path"] for m in ix.missing if m["reason"] == "symlink_outside_root"} == \
        {"n00000002/evil.JPEG", "n00000009"}
    assert len([p for p in paths if p.startswith("n00000003/")]) == 3   # cycle not followed
    _check_keys(ix)


def test_an_unreadable_folder_is_listed_and_its_class_keeps_its_index(tmp_path, monkeypatch):
    """(Permission bits do not stop root: the listing failure is simulated.)"""
    root = make_imagenet_layout(tmp_path / "ds", n_per_class=2, seed=2)
    full = discover(root)
    victim = os.path.join(str(root), full.class_names[0])
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == victim:
            raise PermissionError(13, "Permission denied", victim)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ix = discover(root)
    assert ix.class_names == full.class_names
    assert not any(it.label == 0 for it in ix.items)
    assert [it.label for it in ix.items] == [it.label for it in full.items if it.label != 0]
    assert {"path": full.class_names[0], "reason": "unreadable", "detail": "Permission denied"} \
        in ix.skipped()
    assert {"path": full.class_names[0], "reason": "empty_class", "label": 0} in ix.skipped()
