"""Hostile and messy inputs to `scatstore encode` (issue 12): every failure class ends in one line
and a clear exit code, writes nothing outside OUT, and the corrected command then succeeds."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scatstore.cli.main import main
from scatstore.sample_data import load_image
from scatstore.sources import discover, escape_key
from scatstore.sources.demo_data import make_coco_layout, make_imagenet_layout
from scatstore.stores import open_dataset, read_manifest, verify

SIZE = 32


def _jpeg(name: str, side: int = 80) -> bytes:
    img = Image.fromarray(load_image(name)).resize((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _snapshot(root: Path, out: Path) -> dict[str, str]:
    """Every file under ``root`` outside ``out``, with its sha256."""
    files = {}
    for dirpath, _dirs, names in os.walk(os.fsencode(root)):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.fsdecode(p).startswith(str(out) + os.sep) or os.path.islink(p):
                continue
            with open(p, "rb") as f:
                files[os.fsdecode(p)] = hashlib.sha256(f.read()).hexdigest()
    return files


def _encode(src: Path, out: Path, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["encode", str(src), str(out), "--size", str(SIZE),
                                  "--shard-size", "4", "--quiet", *args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("scatstore: error: "), output
    return lines[0]


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    return make_imagenet_layout(tmp_path_factory.mktemp("src") / "in", n_per_class=2,
                                size_range=(60, 90), seed=4)


# ------------------------------------------------------------------ class 2: any file name encodes

@pytest.mark.parametrize("fmt", ["wds", "zarr", "h5"])
def test_any_name_the_filesystem_allows_encodes(tmp_path, fmt):
    src = tmp_path / "src"
    deep = src / "cls_a" / Path(*[f"d{i}" for i in range(30)])
    deep.mkdir(parents=True)
    (src / "cls_b").mkdir()
    names = {
        "cls_a/" + "猫" * 11 + ".jpg": "astronaut",                 # 11 CJK: 88 escaped chars
        "cls_a/" + "x" * 120 + ".jpg": "coffee",                     # 120-character name
        "cls_a/" + "/".join(f"d{i}" for i in range(30)) + "/deep.jpg": "chelsea",
        "cls_b/plain_name.jpg": "rocket",
    }
    for rel, img in names.items():
        (src / rel).write_bytes(_jpeg(img))
    odd = os.fsencode(src / "cls_b") + b"/caf\xe9-latin1.jpg"       # not UTF-8
    with open(odd, "wb") as f:
        f.write(_jpeg("camera"))
    before = _snapshot(tmp_path, tmp_path / "out")
    for layout in ("imagenet", "folder"):
        out = tmp_path / "out" / layout
        code, output = _encode(src, out, "--layout", layout, "--format", fmt, "--J", "2")
        assert code == 0, output
        m = read_manifest(out)
        assert m["count"] == 5 and m["rejected"] == 0
        recs = [json.loads(p.read_text()) for p in sorted((out / "_store").glob("shard-*.json"))]
        keys = [k for r in recs for k in r["keys"]]
        metas = [mm for r in recs for mm in r["meta"]]
        assert len(set(keys)) == 5 and all(len(k) <= 80 for k in keys)
        assert set(names) <= {mm["path"] for mm in metas}  # exact paths in the meta
        # the exact bytes of the odd name are in the meta
        odd_meta = next(mm for mm in metas if "path_bytes_b64" in mm)
        assert base64.b64decode(odd_meta["path_bytes_b64"]) == b"cls_b/caf\xe9-latin1.jpg"
        # ordinary names keep their keys exactly
        plain = "plain_name" if layout == "imagenet" else escape_key("cls_b/plain_name.jpg")
        assert plain in keys
        assert verify(out).ok
        # deterministic: a second index gives the same keys
        assert [it.key for it in discover(src, layout=layout).items] == \
            [it.key for it in discover(src, layout=layout).items]
        code, output = _encode(src, out, "--layout", layout, "--format", fmt, "--J", "2")
        assert code == 0, output  # re-run of the finished job
        # and a reader gives the exact bytes back from the meta
        metas_read = [open_dataset(out)[i][2] for i in range(5)]
        assert any(base64.b64decode(mm.get("path_bytes_b64", "")) == b"cls_b/caf\xe9-latin1.jpg"
                   for mm in metas_read)
    assert _snapshot(tmp_path, tmp_path / "out") == before


# ------------------------------------------------- class 3: every option checked before OUT exists

@pytest.mark.parametrize("bad, fixed, why", [
    (["--compression", "zstd:99"], ["--compression", "zstd:9"], "--compression: zstd level must be in 1..22"),
    (["--compression", "lzf"], ["--compression", "gzip:1"], "--compression: 'lzf' does not apply to format zarr"),
    (["--format", "wds", "--compression", "zstd"], ["--format", "wds"], "webdataset members are never compressed"),
    (["--format", "h5", "--compression", "zstd:3"], ["--format", "h5", "--compression", "lzf"], "HDF5 has no zstd"),
    (["--L", "20"], ["--L", "16"], "L must be an integer in 1..16, got 20"),
    (["--J", "9"], ["--J", "2"], "J must be an integer in 1..8"),
    (["--J", "6"], ["--J", "5"], "--size: image size 32 is too small for J=6"),
    (["--method", "raw", "--J", "3"], ["--method", "raw"], "--J: is not used by method raw"),
    (["--method", "raw", "--dtype", "float32"], ["--method", "raw"], "--dtype: does not apply to method raw"),
    (["--shard-size", "0"], ["--shard-size", "1"], "--shard-size: must be ≥ 1"),
    (["--augment", "-1"], ["--augment", "1"], "--augment: must be ≥ 0"),
], ids=["zstd99", "lzf-zarr", "wds-zstd", "h5-zstd", "L20", "J9", "J-vs-size", "raw-J", "raw-dtype",
        "shard0", "augment-neg"])
def test_a_bad_option_is_refused_before_out_and_the_fixed_command_runs(small_src, tmp_path, bad,
                                                                      fixed, why):
    out = tmp_path / "out"
    before = _snapshot(tmp_path, out)
    code, output = _encode(small_src, out, *bad)
    line = _one_error_line(output)
    assert code == 2 and why in line, line
    assert not out.exists(), "a refused command must not create OUT"
    code, output = _encode(small_src, out, *fixed)
    assert code == 0, output
    assert verify(out).ok
    assert _snapshot(tmp_path, out) == before


def test_every_method_meets_the_contract_and_checks_the_size():
    from scatstore.transforms.methods import EncodeMethod, make_method

    for name in ("scat1", "scat2", "raw"):
        m = make_method(name, J=3)
        assert isinstance(m, EncodeMethod), name
        m.validate(8)
        assert m.measure(np.zeros((1, 3, 8, 8), np.uint8), None) is None
    with pytest.raises(ValueError, match="too small for J=3"):
        make_method("scat1", J=3).validate(7)
    with pytest.raises(ValueError, match="L must be an integer in 1..16"):
        make_method("scat1", L=20)
    with pytest.raises(ValueError, match="J must be an integer"):
        make_method("scat2", J=True)


def test_an_option_without_effect_is_said(small_src, tmp_path):
    code, output = _encode(small_src, tmp_path / "out", "--seed", "3")
    assert code == 0 and "warning: seed 3 has no effect without augment" in output


def test_an_unreachable_scheduler_is_one_line_and_the_job_runs_without(small_src, tmp_path):
    out = tmp_path / "out"
    code, output = _encode(small_src, out, "--scheduler", "not-an-address")
    assert code == 2 and "cannot reach the dask scheduler 'not-an-address'" in _one_error_line(output)
    code, output = _encode(small_src, out)  # the scheduler is not part of the job: resumes
    assert code == 0, output


def test_codec_with_a_scattering_method_is_refused(small_src, tmp_path):
    codec = tmp_path / "fake.codec"
    codec.write_bytes(b"x")
    code, output = _encode(small_src, tmp_path / "out", "--codec", str(codec))
    assert code == 2 and "--codec: is not used by method scat1" in _one_error_line(output)
    assert not (tmp_path / "out").exists()


def test_an_image_side_of_exactly_2_to_the_J_encodes_as_kymatio(small_src, tmp_path):
    import torch
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["encode", str(small_src), str(out), "--size", "8", "--J", "3",
                                  "--dtype", "float32", "--quiet"])
    assert r.exit_code == 0, r.output
    x, _y, meta = open_dataset(out)[0]
    assert x.shape == (3, 25, 1, 1)
    # the same frame, through kymatio
    from scatstore.sources import decode_for_frame, resize_center_crop

    img, _ = decode_for_frame(small_src / meta["path"], 8)
    pixels, _ = resize_center_crop(img, 8)
    ref = ScatteringTorch2D(J=3, shape=(8, 8), L=8, max_order=1)(torch.from_numpy(pixels[None] / 255.0).float())
    np.testing.assert_allclose(x, ref[0].numpy(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------- class 4: no silent wrong labels or boxes

def test_an_empty_or_unreadable_class_keeps_its_index(tmp_path):
    src = make_imagenet_layout(tmp_path / "src", n_per_class=2, size_range=(60, 90), seed=5)
    full = discover(src)
    (src / "n00000000_empty").mkdir()   # sorts first: would shift every label by one
    out = tmp_path / "out"
    code, output = _encode(src, out)
    assert code == 0, output
    m = read_manifest(out)
    assert m["class_names"][0] == "n00000000_empty"
    assert m["class_names"][1:] == full.class_names
    recs = [json.loads(p.read_text()) for p in sorted((out / "_store").glob("shard-*.json"))]
    y = [v for r in recs for v in r["y"]]
    assert sorted(set(y)) == list(range(1, len(full.class_names) + 1))
    assert "1 skipped" in output and "skipped.jsonl" in output
    skipped = [json.loads(ln) for ln in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"path": "n00000000_empty", "reason": "empty_class", "label": 0}]


def test_coco_declared_size_that_disagrees_uses_the_decoded_image(tmp_path):
    src = make_coco_layout(tmp_path / "coco", n_images=4, seed=1)
    good = tmp_path / "good"
    assert _encode(src, good, "--J", "2")[0] == 0
    # the annotations of image 2 written for a copy twice the size (boxes and size doubled)
    ann_file = src / "annotations" / "instances_demo.json"
    doc = json.loads(ann_file.read_text())
    for im in doc["images"]:
        if im["id"] == 2:
            im["width"], im["height"] = 2 * im["width"], 2 * im["height"]
    for a in doc["annotations"]:
        if a["image_id"] == 2:
            a["bbox"] = [2 * v for v in a["bbox"]]
    ann_file.write_text(json.dumps(doc))
    out = tmp_path / "scaled"
    code, output = _encode(src, out, "--J", "2")
    assert code == 0, output
    assert "1 COCO images differ in size from their declared width/height" in output

    def boxes(store):
        recs = [json.loads(p.read_text()) for p in sorted((store / "_store").glob("shard-*.json"))]
        return {mm["image_id"]: mm for r in recs for mm in r["meta"]}

    b_good, b_scaled = boxes(good), boxes(out)
    for iid in b_good:
        np.testing.assert_allclose(b_scaled[iid]["boxes"], b_good[iid]["boxes"], atol=0.01)
    assert "declared_size" in b_scaled[2] and "declared_size" not in b_scaled[1]


# --------------------------------------------------------------- class 5: every skip is reported

def test_skips_are_counted_and_listed(tmp_path):
    src = make_imagenet_layout(tmp_path / "src", n_per_class=2, size_range=(60, 90), seed=6)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(_jpeg("coffee"))
    cls = sorted(p for p in src.iterdir() if p.is_dir())[0]
    os.symlink(outside / "secret.jpg", cls / "link_out.jpg")
    os.symlink(src / "nowhere.jpg", cls / "broken.jpg")  # inside SRC, but broken
    out = tmp_path / "out"
    before = _snapshot(tmp_path, out)
    code, output = _encode(src, out)
    assert code == 0, output
    assert "(0 rejected, 2 skipped)" in output
    skipped = {(d["path"], d["reason"])
               for d in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert skipped == {(f"{cls.name}/link_out.jpg", "symlink_outside_root"),
                       (f"{cls.name}/broken.jpg", "broken_symlink")}
    assert _snapshot(tmp_path, out) == before


def test_bad_coco_entries_are_skipped_and_listed(tmp_path):
    src = make_coco_layout(tmp_path / "coco", n_images=4, seed=2)
    ann_file = src / "annotations" / "instances_demo.json"
    doc = json.loads(ann_file.read_text())
    doc["images"].append({"id": 90, "file_name": "../../etc/passwd", "width": 10, "height": 10})
    doc["images"].append("not an object")
    huge = dict(doc["images"][0], id=10 ** 100)                # a key of 105 characters
    doc["images"].append(huge)
    doc["annotations"][0]["bbox"] = None                      # null bbox
    doc["annotations"][1]["id"] = "ann-text-id"               # mixed-type ids
    ann_file.write_text(json.dumps(doc))
    out = tmp_path / "out"
    code, output = _encode(src, out, "--J", "2")
    assert code == 0, output
    reasons = sorted(d["reason"] for d in map(json.loads, (out / "skipped.jsonl").read_text().splitlines()))
    assert reasons == ["bad_bbox_or_category", "bad_image_entry", "path_escapes_root"]
    assert "3 skipped" in output
    assert read_manifest(out)["count"] == 5
    keys = [k for p in (out / "_store").glob("shard-*.json") for k in json.loads(p.read_text())["keys"]]
    assert "coco_000000000001" in keys and len(set(keys)) == 5 and max(map(len, keys)) <= 80


@pytest.mark.parametrize("doc, why", [
    ([], "must hold a JSON object"),
    ({"images": {"id": 1}}, "'images' must be a list"),
    ({"images": [], "categories": [{"name": "x"}]}, "categories are not objects with an integer 'id'"),
    ("{not json", "is not valid JSON"),
], ids=["list", "images-dict", "category-no-id", "broken-json"])
def test_structurally_bad_coco_json_is_one_line(tmp_path, doc, why):
    src = make_coco_layout(tmp_path / "coco", n_images=2, seed=3)
    ann_file = src / "annotations" / "instances_demo.json"
    good = ann_file.read_text()
    ann_file.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    out = tmp_path / "out"
    code, output = _encode(src, out)
    assert code == 2 and why in _one_error_line(output)
    assert not out.exists()
    ann_file.write_text(good)
    code, output = _encode(src, out, "--J", "2")
    assert code == 0, output


# ------------------------------------------------------ class 6: workers die with their parent

def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(d))
            except OSError:
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_die_with_a_killed_parent_and_commit_nothing_after(tmp_path):
    src = make_imagenet_layout(tmp_path / "src", n_per_class=10, size_range=(60, 90), seed=7)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scatstore.cli.main", "encode", str(src), str(out), "--J", "2",
           "--size", str(SIZE), "--shard-size", "1", "--workers", "2", "--format", "wds", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    records = out / "_store"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and len(list(records.glob("shard-*.json"))) >= 1:
            break
        time.sleep(0.01)
    # the pool's processes (the resource tracker is not a worker)
    workers = [p for p in _children(proc.pid)
               if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]
    assert workers, "no worker process found"
    proc.kill()
    proc.wait()
    time.sleep(1.5)
    survivors = [p for p in workers if _alive(p)]
    for p in survivors:  # never leave them running, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not survivors, "a worker outlived its killed parent"
    n = len(list(records.glob("shard-*.json")))
    time.sleep(1.0)
    assert len(list(records.glob("shard-*.json"))) == n, "a shard was committed after the kill"
    assert not (out / "manifest.json").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert verify(out).ok and read_manifest(out)["count"] == 30


def test_a_dask_task_whose_run_is_gone_stops_without_writing(small_src, tmp_path, monkeypatch):
    """The run's client goes away (its process killed) while a shard task runs on a cluster: the
    task sees its cancellation between batches and writes nothing."""
    from distributed import Client

    from scatstore.pipelines.encode import EncodeConfig, encode, local_cluster, shards
    from scatstore.pipelines.encode.manifest import stored_dtype
    from scatstore.sources import FrameSpec
    from scatstore.stores import StoreSpec
    from scatstore.transforms.methods import make_method

    out = tmp_path / "out"
    cfg = EncodeConfig(src=small_src, out=out, J=2, size=SIZE, shard_size=6, batch_size=1,
                       progress=False)
    encode(cfg, log=lambda m: None)  # a valid OUT; then shard 0 is to be redone
    record = out / "_store" / "shard-000000.json"
    record.unlink()
    index = discover(small_src)
    method = make_method("scat1", J=2)
    spec = StoreSpec(format="zarr", n_slots=len(index.items), shard_size=6,
                     sample_shape=method.sample_shape(SIZE), dtype=stored_dtype(cfg, method))
    task = shards.make_tasks(cfg, method, index, spec, [0], 0, "gone", FrameSpec(SIZE),
                             "float16")[0]
    real = shards.encode_batch
    calls = []

    def slow(*a):  # thread workers run in this process: the same module
        calls.append(1)
        time.sleep(0.3)
        return real(*a)

    monkeypatch.setattr(shards, "encode_batch", slow)
    with local_cluster(1) as cluster:
        client = Client(cluster)
        fut = client.submit(shards.encode_shard, task, pure=False, key="encode-shard-0-gone")
        deadline = time.monotonic() + 30
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        client.close()  # what the scheduler sees when the run's process dies
        del fut
        time.sleep(2.5)
        assert 1 <= len(calls) < 6, "the task went on after its run was gone"
    assert not record.exists()
    monkeypatch.setattr(shards, "encode_batch", real)
    assert encode(cfg, log=lambda m: None)["count"] == len(index.items)
    assert verify(out).ok
