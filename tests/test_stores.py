"""Stores: zarr v3 / webdataset / HDF5 writers, the manifest, open_dataset, verify, resume."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from scatstore.sample_data import load_image
from scatstore.stores import (MANIFEST_VERSION, ShardBatch, ShardRecord, StoreError, StoreSpec,
                              open_dataset, read_manifest, upgrade_manifest, verify, writer_for)
from scatstore.transforms.quantize import dequantize_uint8, quantize_uint8

FORMATS = ("zarr", "wds", "h5")
N_SLOTS = 23
SHARD = 8            # 3 shards: 8 + 8 + 7 slots
EMPTY = {3, 8, 9, 10, 11, 12, 13, 14, 15, 22}  # slot 3; all of shard 1; the last slot
CLASSES = ["cat", "dog", "rocket"]
METHOD = {"name": "test", "params": {"k": 4}}


# --------------------------------------------------------------------------------------- data
def _tiles(n: int, size: int) -> np.ndarray:
    """n RGB uint8 crops (n, 3, size, size) cut from the shipped photographs."""
    out = []
    names = ("astronaut", "chelsea", "coffee", "rocket")
    for i in range(n):
        img = load_image(names[i % len(names)])
        r = (i * 37) % (img.shape[0] - size)
        c = (i * 53) % (img.shape[1] - size)
        out.append(img[r:r + size, c:c + size].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


def _coefficients(pix: np.ndarray) -> np.ndarray:
    """A cheap scattering-like float transform (C=3, K=4 maps at 1/4 resolution): a low-pass and
    three |gradient| maps, average-pooled 4x4. Real image statistics, no kymatio needed."""
    x = pix.astype(np.float32) / 255.0
    gx = np.abs(np.diff(x, axis=-1, append=x[..., -1:]))
    gy = np.abs(np.diff(x, axis=-2, append=x[..., -1:, :]))
    maps = np.stack([x, gx, gy, np.sqrt(gx * gy)], axis=2)           # (n, 3, 4, S, S)
    n, c, k, s, _ = maps.shape
    return maps.reshape(n, c, k, s // 4, 4, s // 4, 4).mean(axis=(4, 6))


@pytest.fixture(scope="module")
def data():
    pix = _tiles(N_SLOTS, 32)
    coef = _coefficients(pix)
    from PIL import Image

    bits = []
    for i in range(N_SLOTS):
        buf = io.BytesIO()
        big = np.repeat(np.repeat(pix[i].transpose(1, 2, 0), 2, 0), 2, 1)
        Image.fromarray(big).save(buf, format="JPEG", quality=40 + i)
        bits.append(buf.getvalue())                                   # real 1-4 kB bitstreams
    return {"pix": pix, "coef": coef, "bits": bits}


KINDS = {
    "float16": dict(dtype="float16", has_hw=True),
    "float32": dict(dtype="float32"),
    "uint8q": dict(dtype="uint8", quantized=True),
    "pixels": dict(dtype="uint8"),
    "bytes": dict(dtype="bytes"),
}


def make_spec(fmt: str, kind: str, n_slots: int = N_SLOTS, shard_size: int = SHARD,
              **over) -> StoreSpec:
    kw = dict(KINDS[kind])
    if kind == "bytes":
        shape = None
    elif kind == "pixels":
        shape = (3, 32, 32)
    else:
        shape = (3, 4, 8, 8)
    kw.update(over)
    return StoreSpec(format=fmt, n_slots=n_slots, shard_size=shard_size, sample_shape=shape, **kw)


def expected(data, spec: StoreSpec, slot: int):
    if spec.dtype == "bytes":
        return data["bits"][slot]
    if spec.dtype == "uint8" and not spec.quantized:
        return data["pix"][slot]
    return data["coef"][slot].astype(spec.dtype if not spec.quantized else np.float32)


def sample_meta(slot: int) -> dict:
    nb = slot % 3
    return {"path": f"train/{slot}.jpg", "variant": 0, "image_id": 1000 + slot,
            "boxes": [[1.25 * j, 2.5, 3.0 + slot, 4.75] for j in range(nb)],
            "category_ids": [j + 1 for j in range(nb)]}


def make_batch(data, spec: StoreSpec, shard: int, empty=EMPTY) -> ShardBatch:
    lo, hi = spec.shard_range(shard)
    slots = np.asarray([s for s in range(lo, hi) if s not in empty], dtype=np.int64)
    kw = {}
    if spec.dtype == "bytes":
        x = [data["bits"][s] for s in slots]
    elif spec.quantized:
        x, qs, qo = quantize_uint8(data["coef"][slots].reshape(len(slots), *spec.sample_shape))
        kw = {"qscale": qs, "qoffset": qo}
    elif spec.dtype == "uint8":
        x = data["pix"][slots]
    else:
        x = data["coef"][slots].astype(spec.dtype)
    if spec.has_hw:
        kw["hw"] = np.asarray([[8, 6 + s % 3] for s in slots], dtype=np.int32).reshape(-1, 2)
    return ShardBatch(slots=slots, keys=[f"img_{s:04d}" for s in slots], x=x,
                      y=(slots % len(CLASSES)).astype(np.int64), meta=[sample_meta(int(s)) for s in slots],
                      **kw)


def engine_manifest(spec: StoreSpec) -> dict:
    count = N_SLOTS - len(EMPTY)
    return {"method": METHOD, "class_names": CLASSES, "rejected": N_SLOTS - count,
            "source": {"root": "/data/src", "layout": "folder", "n_items": N_SLOTS,
                       "total_bytes": 12345, "fingerprint": "abc"},
            "job": {"method": METHOD, "shard_size": spec.shard_size}}


def write_store(out: Path, data, spec: StoreSpec, order=None) -> list:
    w = writer_for(out, spec)
    w.prepare()
    recs = {}
    for s in (order or range(spec.n_shards)):
        recs[s] = w.write_shard(s, make_batch(data, spec, s))
    records = [recs[s] for s in range(spec.n_shards)]
    w.finalize(engine_manifest(spec), records)
    return records


def tree_hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------- spec
def test_spec_roundtrip_and_validation():
    spec = make_spec("zarr", "uint8q")
    d = json.loads(json.dumps(spec.to_dict()))
    assert StoreSpec.from_dict(d) == spec
    assert spec.n_shards == 3 and spec.shard_range(2) == (16, 23) and spec.qparam_shape == (3, 4)
    with pytest.raises(StoreError):
        StoreSpec("zarr", 10, 4, (3, 4, 8, 8), "bfloat16")
    with pytest.raises(StoreError):
        StoreSpec("zip", 10, 4, (3, 4, 8, 8))
    with pytest.raises(StoreError):
        StoreSpec("zarr", 10, 4, (3, 4, 8, 8), "float16", quantized=True)
    with pytest.raises(StoreError):
        StoreSpec("zarr", 10, 4, (3, 4, 8, 8), chunk_samples=3)


def test_batch_validation(data):
    spec = make_spec("wds", "float16")
    w = writer_for("/nonexistent/never/written", spec)
    b = make_batch(data, spec, 0)
    b.keys[0] = "bad.key"
    with pytest.raises(StoreError, match="key"):
        w.write_shard(0, b)
    b = make_batch(data, spec, 0)
    b.x = b.x.astype(np.float32)
    with pytest.raises(StoreError, match="dtype"):
        w.write_shard(0, b)
    b = make_batch(data, spec, 0)
    b.slots = b.slots + SHARD
    with pytest.raises(StoreError, match="outside"):
        w.write_shard(0, b)
    for bad in (np.nan, np.inf, -np.inf):  # float16 overflow must never reach a shard
        b = make_batch(data, spec, 0)
        b.x = b.x.copy()
        b.x.flat[b.x.size // 2 + 1] = bad
        with pytest.raises(StoreError, match="NaN or inf"):
            w.write_shard(0, b)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_all_finite_matches_numpy(data, dtype):
    from scatstore.stores.base import all_finite

    x = data["coef"][:4].astype(dtype)  # real scattering coefficients of skimage photos
    info = np.finfo(dtype)
    x.flat[7] = info.max  # the largest finite values are still finite
    x.flat[8] = -info.max
    x.flat[9] = info.tiny / 4  # subnormal
    assert all_finite(x) and np.isfinite(x).all()
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y.flat[-1] = bad
        assert not all_finite(y)
        assert not all_finite(y[:, ::-1])  # non-contiguous views too


# --------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_open_dataset_roundtrip(tmp_path, data, fmt, kind):
    spec = make_spec(fmt, kind)
    records = write_store(tmp_path, data, spec)
    assert [r.count for r in records] == [7, 0, 6]
    ds = open_dataset(tmp_path)
    slots = [s for s in range(N_SLOTS) if s not in EMPTY]
    assert len(ds) == len(slots) == ds.manifest["count"]
    assert ds.slots.tolist() == slots
    assert ds.keys == [f"img_{s:04d}" for s in slots]
    assert ds.labels.tolist() == [s % 3 for s in slots]
    for i, s in enumerate(slots):
        x, y, meta = ds[i]
        want = expected(data, spec, s)
        if spec.dtype == "bytes":
            assert x == want
        elif spec.quantized:
            assert x.dtype == np.float32
            err = np.abs(x - want).max()
            assert err <= (want.max() - want.min()) / 255 * 0.5 + 1e-6
        else:
            assert x.dtype == (np.uint8 if kind == "pixels" else np.float32)
            np.testing.assert_array_equal(x, want)
        assert y == s % 3
        m = sample_meta(s)
        assert {k: meta[k] for k in m} == m
        assert meta["key"] == f"img_{s:04d}" and meta["slot"] == s
        if spec.has_hw:
            assert meta["hw"] == [8, 6 + s % 3]
    # raw access and batches
    b = ds.get_batch([0, len(ds) - 1, 2])
    assert b["y"].tolist() == [slots[0] % 3, slots[-1] % 3, slots[2] % 3]
    if spec.quantized:
        qb = make_batch(data, spec, 0)
        np.testing.assert_array_equal(b["x"][0], qb.x[0])
        np.testing.assert_array_equal(b["qscale"][0], qb.qscale[0])
        xr, _, mr = ds.get(0, raw=True)
        assert xr.dtype == np.uint8 and mr["qscale"].shape == (3, 4)
    # shard iteration: shard 1 is empty
    assert ds.shard_indices(1).size == 0
    assert ds.shard_indices(2).tolist() == list(range(7, 13))
    streamed = list(ds.iter_shard(2))
    assert [m["key"] for _, _, m in streamed] == [ds.keys[i] for i in range(7, 13)]
    # pickles without handles (DataLoader workers), reads after unpickling
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2[-1][2]["key"] == ds[-1][2]["key"]
    # manifest contents
    m = read_manifest(tmp_path)
    assert m["format_version"] == MANIFEST_VERSION and m["store"]["format"] == fmt
    assert m["count"] == 13 and m["rejected"] == len(EMPTY) and m["class_names"] == CLASSES
    assert m["store"]["n_shards"] == 3 and len(m["store"]["shards"]) == 3
    assert m["dtype"] == spec.dtype and m["created_by"]["numpy"] == np.__version__
    assert (m["quantization"] is not None) == spec.quantized
    assert m["bytes_stored"] == sum(s["bytes"] for s in m["store"]["shards"]) + \
        sum(f["bytes"] for f in m["store"]["global_files"].values())
    ds.close()
    assert verify(tmp_path).ok


# --------------------------------------------------------------------------------------- plain readers
def test_plain_zarr_and_tensorstore(tmp_path, data):
    import tensorstore as ts
    import zarr

    spec = make_spec("zarr", "float16")
    write_store(tmp_path, data, spec)
    g = zarr.open_group(str(tmp_path / "data.zarr"), mode="r")
    slots = [s for s in range(N_SLOTS) if s not in EMPTY]
    valid = g["valid"][:]
    assert np.flatnonzero(valid).tolist() == slots
    x = g["x"][:]
    assert x.shape == (N_SLOTS, 3, 4, 8, 8) and g["x"].shards == (SHARD, 3, 4, 8, 8)
    np.testing.assert_array_equal(x[slots], data["coef"][slots].astype(np.float16))
    assert not x[sorted(EMPTY)].any()
    keys = [bytes(r).rstrip(b"\0").decode() for r in g["key"][:]]
    assert [keys[s] for s in slots] == [f"img_{s:04d}" for s in slots]
    assert g["y"][:][slots].tolist() == [s % 3 for s in slots]
    off = g["box_offsets"][:]
    boxes = g["boxes"][:]
    for s in slots:
        np.testing.assert_array_equal(boxes[off[s]:off[s + 1]],
                                      np.asarray(sample_meta(s)["boxes"], np.float32).reshape(-1, 4))
    np.testing.assert_array_equal(g["hw"][:][slots], [[8, 6 + s % 3] for s in slots])

    def tsread(name):
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                        "path": str(tmp_path / "data.zarr" / name)}}, read=True).result().read().result()

    np.testing.assert_array_equal(tsread("x"), x)
    np.testing.assert_array_equal(tsread("key"), g["key"][:])
    np.testing.assert_array_equal(tsread("valid"), valid)
    mj = tsread("meta_json")
    mo = tsread("meta_offsets")
    assert json.loads(bytes(mj[mo[5]:mo[6]])) == sample_meta(5)


def test_plain_zarr_bitstreams(tmp_path, data):
    import tensorstore as ts
    import zarr

    spec = make_spec("zarr", "bytes")
    write_store(tmp_path, data, spec)
    g = zarr.open_group(str(tmp_path / "data.zarr"), mode="r")
    off = g["bits_offsets"][:]
    for s in [s for s in range(N_SLOTS) if s not in EMPTY]:
        sh = s // SHARD
        base = off[sh * SHARD]
        arr = g[f"bits/{sh:06d}"]
        assert bytes(arr[off[s] - base:off[s + 1] - base]) == data["bits"][s]
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                     "path": str(tmp_path / "data.zarr" / "bits" / f"{sh:06d}")}}, read=True).result()
        assert bytes(t[off[s] - base:off[s + 1] - base].read().result()) == data["bits"][s]


@pytest.mark.parametrize("kind", ["float16", "uint8q", "bytes"])
def test_plain_webdataset_and_tar(tmp_path, data, kind):
    import webdataset as wds

    spec = make_spec("wds", kind)
    write_store(tmp_path, data, spec)
    slots = [s for s in range(N_SLOTS) if s not in EMPTY]
    urls = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(3)]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert [s["__key__"] for s in got] == [f"img_{s:04d}" for s in slots]
    for s, smp in zip(slots, got):
        if kind == "bytes":
            assert smp["bits"] == data["bits"][s] and smp["json"]["cls"] == s % 3
        else:
            assert smp["cls"] == s % 3
            if kind == "float16":
                np.testing.assert_array_equal(smp["x.npy"], data["coef"][s].astype(np.float16))
                assert smp["json"]["hw"] == [8, 6 + s % 3]
            else:
                q = smp["q.npy"]
                x = dequantize_uint8(smp["x.npy"][None], q[0][None], q[1][None])[0]
                assert np.abs(x - data["coef"][s]).max() <= q[0].max() / 2 + 1e-6
        assert smp["json"]["meta"] == sample_meta(s)
    listing = subprocess.run(["tar", "tvf", urls[0]], capture_output=True, text=True, check=True).stdout
    names = [ln.split()[-1] for ln in listing.splitlines()]
    exts = ["bits", "json"] if kind == "bytes" else (["x.npy", "q.npy", "cls", "json"] if kind == "uint8q"
                                                      else ["x.npy", "cls", "json"])
    assert names == [f"img_{s:04d}.{e}" for s in slots if s < SHARD for e in exts]
    assert all(ln.startswith("-rw-r--r-- 0/0") for ln in listing.splitlines())
    with tarfile.open(urls[2]) as tf:   # recorded offsets point at the member data
        idx = np.load(tmp_path / "index.npy", allow_pickle=False)
        first = [m for m in tf.getmembers()][0]
        assert first.offset_data == idx[idx["shard"] == 2][0][f"off_{exts[0].replace('.', '_')}"]


def test_plain_h5(tmp_path, data):
    import h5py

    spec = make_spec("h5", "uint8q", has_hw=True)
    write_store(tmp_path, data, spec)
    with h5py.File(tmp_path / "shard-000002.h5", "r") as f:
        slots = f["slot"][:].tolist()
        assert slots == [s for s in range(16, 23) if s not in EMPTY]
        b = make_batch(data, spec, 2)
        np.testing.assert_array_equal(f["x"][:], b.x)
        np.testing.assert_array_equal(f["qscale"][:], b.qscale)
        np.testing.assert_array_equal(f["hw"][:], b.hw)
        assert [k.decode() for k in f["key"][:]] == b.keys
        assert [json.loads(m) for m in f["meta"][:]] == b.meta
        assert f["x"].compression == "gzip" and f["x"].chunks == (1, 3, 4, 8, 8)
    with h5py.File(tmp_path / "shard-000001.h5", "r") as f:   # the empty shard is a valid file
        assert f["x"].shape == (0, 3, 4, 8, 8)


# --------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic_bytes(tmp_path, data, fmt):
    kind = "uint8q" if fmt != "zarr" else "float16"
    spec = make_spec(fmt, kind)
    write_store(tmp_path / "a", data, spec)
    write_store(tmp_path / "b", data, spec, order=[2, 0, 1])   # other task order
    a, b = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b")
    assert a == b and "manifest.json" in a


def test_deterministic_across_processes(tmp_path, data):
    """Shards written by worker processes (writer pickled) equal shards written in-process."""
    from concurrent.futures import ProcessPoolExecutor

    spec = make_spec("zarr", "bytes")
    write_store(tmp_path / "a", data, spec)
    w = writer_for(tmp_path / "b", spec)
    w.prepare()
    batches = [make_batch(data, spec, s) for s in range(spec.n_shards)]
    with ProcessPoolExecutor(2) as ex:
        recs = list(ex.map(w.write_shard, range(spec.n_shards), batches))
    w.finalize(engine_manifest(spec), [ShardRecord.from_dict(json.loads(json.dumps(r.to_dict())))
                                       for r in recs])
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")


# --------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_semantics(tmp_path, data, fmt):
    spec = make_spec(fmt, "float16")
    w = writer_for(tmp_path, spec)
    w.prepare()
    r0 = w.write_shard(0, make_batch(data, spec, 0))
    r2 = w.write_shard(2, make_batch(data, spec, 2))
    assert w.check_shard(r0) and w.check_shard(r2)
    before = tree_hashes(tmp_path)
    # a killed writer leaves a temp file; prepare() removes it and keeps the completed shards
    stale = tmp_path / ".tmp-shard-000001.tar-99999"
    stale.write_bytes(b"partial")
    w2 = writer_for(tmp_path, spec)
    w2.prepare()
    assert not stale.exists() and tree_hashes(tmp_path) == before
    assert w2.load_record(0) == r0 and w2.load_record(1) is None
    # a truncated shard file fails check_shard
    rel = max(r2.files, key=lambda k: r2.files[k]["bytes"])
    p = tmp_path / rel
    p.write_bytes(p.read_bytes()[:-100])
    assert not w2.check_shard(r2) and w2.check_shard(r0)
    # redo and finish: same bytes as an uninterrupted run
    r2b = w2.write_shard(2, make_batch(data, spec, 2))
    r1 = w2.write_shard(1, make_batch(data, spec, 1))
    w2.finalize(engine_manifest(spec), [w2.load_record(0), r1, r2b])
    write_store(tmp_path.parent / f"{tmp_path.name}-ref", data, spec)
    assert tree_hashes(tmp_path) == tree_hashes(tmp_path.parent / f"{tmp_path.name}-ref")
    # a different spec is refused
    with pytest.raises(StoreError, match="different spec"):
        writer_for(tmp_path, make_spec(fmt, "float32")).prepare()


_KILL_SCRIPT = r"""
import json, sys, numpy as np
from scatstore.stores import ShardBatch, StoreSpec, writer_for
pix = np.load(sys.argv[1], allow_pickle=False)
spec = StoreSpec.from_dict(json.loads(sys.argv[2]))
w = writer_for(sys.argv[3], spec)
w.prepare()
print("start", flush=True)
recs = []
for s in range(spec.n_shards):
    r = w.load_record(s)
    if r is None or not w.check_shard(r):
        lo, hi = spec.shard_range(s)
        slots = np.asarray([i for i in range(lo, hi) if i not in (3, 50, 51, 52)], dtype=np.int64)
        r = w.write_shard(s, ShardBatch(slots=slots, keys=[f"k{i}" for i in slots], x=pix[slots],
                                        y=slots % 7, meta=[{"i": int(i)} for i in slots]))
    recs.append(r)
w.finalize({"method": {"name": "pixels", "params": {}}}, recs)
print("done", flush=True)
"""


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_sigkill_and_resume_is_identical(tmp_path, data, fmt):
    """SIGKILL at several moments of a job, resume each time: same bytes as one clean run."""
    n = 120
    pix = np.concatenate([data["pix"]] * 6)[:n]
    np.save(tmp_path / "pix.npy", pix)
    spec = make_spec(fmt, "pixels", n_slots=n, shard_size=3)
    ref, out = tmp_path / "ref", tmp_path / "out"

    def start(target):
        p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "pix.npy"),
                              json.dumps(spec.to_dict()), str(target)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "start"
        return p

    p = start(ref)
    t0 = time.perf_counter()
    assert p.stdout.readline().strip() == "done" and p.wait(60) == 0
    job = time.perf_counter() - t0
    kills = 0
    for frac in (0.1, 0.35, 0.6, 0.85):
        p = start(out)
        time.sleep(job * frac)
        p.send_signal(signal.SIGKILL)
        kills += p.wait(30) == -signal.SIGKILL
    p = start(out)
    assert p.stdout.readline().strip() == "done" and p.wait(60) == 0
    assert kills >= 1, f"no kill landed before the job ended (job {job:.2f} s)"
    assert tree_hashes(out) == tree_hashes(ref)
    assert verify(out).ok


# --------------------------------------------------------------------------------------- verify
@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_names_damaged_shard(tmp_path, data, fmt):
    spec = make_spec(fmt, "float16")
    records = write_store(tmp_path, data, spec)
    assert verify(tmp_path).exit_code == 0
    rel = max(records[2].files, key=lambda k: records[2].files[k]["bytes"])
    p = tmp_path / rel
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    rep = verify(tmp_path)
    assert not rep.ok and rep.exit_code == 1 and rep.damaged_shards == [2]
    assert rep.damaged[0][1] == rel and "sha256" in rep.damaged[0][2]
    assert "shard 000002" in rep.format()
    p.unlink()
    assert verify(tmp_path).damaged[0][2] == "missing"


def test_verify_cli_style_errors(tmp_path):
    rep = verify(tmp_path / "nothing")
    assert not rep.ok and "not found" in rep.problems[0]


# --------------------------------------------------------------------------------------- manifest
def _v0():
    return {"version": 0, "format": "wds", "shard_size": 4, "n": 5,
            "method": {"name": "scat1", "params": {"J": 3}}, "dtype": "float16",
            "sample_shape": [3, 25, 28, 28], "n_slots": 6, "class_names": ["a"],
            "shards": [{"index": 0, "count": 3, "path": "shard-000000.tar", "sha256": "0" * 64, "bytes": 10},
                       {"index": 1, "count": 2, "path": "shard-000001.tar", "sha256": "1" * 64, "bytes": 7}]}


def test_manifest_upgrade_and_errors(tmp_path):
    m = upgrade_manifest(_v0())
    assert m["format_version"] == MANIFEST_VERSION
    assert m["count"] == 5 and m["rejected"] == 1 and m["store"]["n_shards"] == 2
    assert m["store"]["shards"][1]["files"] == {"shard-000001.tar": {"sha256": "1" * 64, "bytes": 7}}
    (tmp_path / "manifest.json").write_text(json.dumps(_v0()))
    assert read_manifest(tmp_path)["store"]["format"] == "wds"
    newer = dict(m, format_version=MANIFEST_VERSION + 1)
    (tmp_path / "manifest.json").write_text(json.dumps(newer))
    with pytest.raises(StoreError, match="newer"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "store": ')
    with pytest.raises(StoreError, match="corrupt"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="not found"):
        read_manifest(tmp_path)
    bad = json.loads(json.dumps(m))
    bad["store"]["shards"][0]["files"] = {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(StoreError, match="outside"):
        read_manifest(tmp_path)


def test_finalize_validates(tmp_path, data):
    spec = make_spec("h5", "float32")
    w = writer_for(tmp_path, spec)
    w.prepare()
    recs = [w.write_shard(s, make_batch(data, spec, s)) for s in range(3)]
    with pytest.raises(StoreError, match="method"):
        w.finalize({"class_names": CLASSES}, recs)
    with pytest.raises(StoreError, match="one record per shard"):
        w.finalize(engine_manifest(spec), recs[:2])
    with pytest.raises(StoreError, match="contradicts"):
        w.finalize(dict(engine_manifest(spec), count=99), recs)
    assert not (tmp_path / "manifest.json").exists()


# --------------------------------------------------------------------------------------- no pickle
class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _tar_with(path: Path, members: dict) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_no_pickle_and_no_paths(tmp_path):
    from scatstore.stores.formats.wds import iter_tar_samples
    from scatstore.stores.index_npy import npy_bytes

    marker = tmp_path / "pwned"
    good = {"k1.x.npy": npy_bytes(np.zeros((2, 2), np.float16)), "k1.cls": b"1", "k1.json": b"{}"}
    _tar_with(tmp_path / "pyd.tar", {**good, "k2.pyd": pickle.dumps(_Evil(str(marker)))})
    with pytest.raises(StoreError, match="never unpickled"):
        list(iter_tar_samples(tmp_path / "pyd.tar"))
    assert not marker.exists()
    _tar_with(tmp_path / "evil.tar", {**good, "../evil.json": b"{}"})
    with pytest.raises(StoreError, match="not trusted"):
        list(iter_tar_samples(tmp_path / "evil.tar"))
    obj = np.empty(1, dtype=object)
    obj[0] = _Evil(str(marker))
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    _tar_with(tmp_path / "objnpy.tar", {"k1.x.npy": buf.getvalue()})
    with pytest.raises(StoreError, match="not a plain array"):
        list(iter_tar_samples(tmp_path / "objnpy.tar"))
    assert not marker.exists()
    assert [s["__key__"] for s in iter_tar_samples(_tar_and_return(tmp_path / "ok.tar", good))] == ["k1"]


def _tar_and_return(path, members):
    _tar_with(path, members)
    return path


def test_wds_random_read_checks_member_name(tmp_path, data):
    spec = make_spec("wds", "float16")
    write_store(tmp_path, data, spec)
    idx = np.load(tmp_path / "index.npy", allow_pickle=False)
    idx["off_x_npy"][0] = idx["off_json"][0]        # index points at the wrong member
    np.save(tmp_path / "index.npy", idx, allow_pickle=False)
    m = json.loads((tmp_path / "manifest.json").read_text())
    ds = open_dataset(tmp_path)
    with pytest.raises(StoreError, match="expected"):
        ds[0]
    assert ds[1][2]["key"] == "img_0001"
    assert m["store"]["index"] == "index.npy"


def test_fork_after_open(tmp_path, data):
    """A dataset opened (and used) in the parent reads correctly in forked DataLoader workers."""
    import torch

    spec = make_spec("h5", "pixels")
    write_store(tmp_path, data, spec)
    ds = open_dataset(tmp_path)
    first = ds[0][0]
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                     multiprocessing_context="fork",
                                     collate_fn=lambda b: [s[2]["key"] for s in b])
    keys = [k for batch in dl for k in batch]
    assert keys == ds.keys
    np.testing.assert_array_equal(ds[0][0], first)
