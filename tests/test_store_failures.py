"""Hostile and damaged stores (issue 12, store and command parts of failure classes 1, 4, 5, 7, 8).

Every store here holds real images (skimage photographs, see test_stores.py). Each command test
asserts the exit code, a one-line message without a traceback, that nothing was written outside
the store / ``--out``, and that the corrected command then succeeds.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from scatstore.stores import StoreError, open_dataset, verify
from scatstore.stores.safepath import check_key_array, inside, safe_name, safe_relpath
from test_stores import data, make_spec, write_store  # noqa: F401  (data: a fixture)


# --------------------------------------------------------------------------------------- helpers
def tree(root: Path, skip=()) -> dict:
    """path -> (size, mtime_ns) of every file below ``root`` outside the ``skip`` folders."""
    out = {}
    skip = [str(Path(s)) for s in skip]
    for dirpath, _, names in os.walk(root):
        if any(dirpath == s or dirpath.startswith(s + os.sep) for s in skip):
            continue
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def tree_wo(snapshot: dict, folder: Path) -> dict:
    return {p: v for p, v in snapshot.items() if not p.startswith(str(folder) + os.sep)}


def one_line_error(res, code: int, *needles):
    """The command failed with ``code``, its error is one line (the last on stderr, after at
    most the command's progress notes) holding ``needles``, and there is no traceback."""
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and not isinstance(res.exception, (TypeError, KeyError,
                                                                            IndexError, ValueError))
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    err = errors[0]
    for n in needles:
        assert n in err, err
    return err


def run(cmd, args):
    return CliRunner().invoke(cmd, [str(a) for a in args])


@pytest.fixture()
def store(tmp_path, data):  # noqa: F811
    def make(fmt="zarr", kind="float32", name=None, **over):
        root = tmp_path / (name or f"{fmt}-{kind}")
        write_store(root, data, make_spec(fmt, kind, **over))
        return root
    return make


# --------------------------------------------------------------------------------------- class 1
HOSTILE = ["../../../x", "..", ".", "", "a/b", "/etc/passwd", "a\\b", ".hidden", "x\0y",
           "a" * 300, "../x", "ok/../../x", "ok//x"]


@pytest.mark.parametrize("bad", HOSTILE)
def test_safe_names_and_paths_refuse_anything_that_could_escape(tmp_path, bad):
    with pytest.raises(StoreError, match="refusing"):
        safe_name(bad)
    if bad != "a/b":  # a/b is a fine relative path, not a name
        with pytest.raises(StoreError):
            safe_relpath(bad)
    assert safe_name("img_0001.png") == "img_0001.png"
    assert safe_relpath("data.zarr/x/c/0/0") == "data.zarr/x/c/0/0"


def test_inside_refuses_a_symlink_out_of_the_store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", root / "index.npy")
    with pytest.raises(StoreError, match="resolves outside"):
        inside(root, "index.npy")
    (root / "shard-000000.tar").write_bytes(b"")
    assert inside(root, "shard-000000.tar") == root / "shard-000000.tar"


def test_key_arrays_are_checked_in_one_pass():
    ok = np.asarray([b"img_0001", b"a", b"Z-+=,@~:"], dtype="S12")
    check_key_array(ok, "t")
    for bad in (b"../../x", b"a.b", b"a/b", b"", b"a\0b", b"sp ace"):
        with pytest.raises(StoreError, match="not a valid key"):
            check_key_array(np.asarray([b"fine", bad], dtype="S12"), "t")


@pytest.mark.parametrize("fmt", ["zarr", "wds", "h5"])
def test_a_store_whose_index_names_a_path_is_refused_at_open(store, fmt):
    root = store(fmt)
    if fmt == "zarr":
        import zarr

        arr = zarr.open_array(str(root / "data.zarr" / "key"), mode="r+")
        row = np.zeros(arr.shape[1], np.uint8)
        row[:8] = np.frombuffer(b"../../x\0", np.uint8)
        arr[0] = row
    else:
        ix = np.load(root / "index.npy", allow_pickle=False)
        ix["key"][0] = b"../../x"
        np.save(root / "index.npy", ix, allow_pickle=False)
    with pytest.raises(StoreError, match="not a valid key"):
        open_dataset(root)
    assert not verify(root).ok


@pytest.fixture(scope="module")
def cae_store(tmp_path_factory):
    """A small wds store of the `cae` method (a tiny codec fitted on skimage photographs)."""
    from PIL import Image

    from scatstore.codecs import fit_codec
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sample_data import load_image

    base = tmp_path_factory.mktemp("cae")
    imgs = [load_image(n) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    codec = fit_codec(imgs, channels=4, beta=0.01, steps=3, batch_size=4, size=32, hidden=8,
                      seed=0, progress=False)
    codec.save(base / "c.cae")
    src = base / "src"
    src.mkdir()
    for n in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(load_image(n)).save(src / f"{n}.png")
    encode(EncodeConfig(src=src, out=base / "store", method="cae", codec=str(base / "c.cae"),
                        format="wds", shard_size=2, size=64, progress=False), log=lambda m: None)
    return base


def test_decode_never_writes_outside_out(cae_store, tmp_path):
    from scatstore.cli.codec import decode_cmd

    root = tmp_path / "store"
    shutil.copytree(cae_store / "store", root)
    good = (root / "index.npy").read_bytes()
    ix = np.load(root / "index.npy", allow_pickle=False)
    wide = ix.astype([(n, "S40" if n == "key" else ix.dtype[n]) for n in ix.dtype.names])
    wide["key"][0] = b"../../../x"
    np.save(root / "index.npy", wide, allow_pickle=False)
    out = tmp_path / "a" / "b" / "png"
    before = tree(tmp_path.parent, skip=[out])
    res = run(decode_cmd, [root, "--out", out, "--codec", cae_store / "c.cae", "--no-metrics"])
    one_line_error(res, 2, "../../../x", "not a valid key")
    assert tree(tmp_path.parent, skip=[out, root]) == tree_wo(before, root)
    assert not list(tmp_path.parent.rglob("x.png"))
    (root / "index.npy").write_bytes(good)  # the corrected store decodes, inside --out only
    res = run(decode_cmd, [root, "--out", out, "--codec", cae_store / "c.cae", "--no-metrics"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.png" for k in open_dataset(root).keys)
    assert tree(tmp_path.parent, skip=[out, root]) == tree_wo(before, root)


# --------------------------------------------------------------------------------------- class 4
def _flip_byte(path: Path, at: float = 0.3) -> bytes:
    good = path.read_bytes()
    b = bytearray(good)
    b[int(len(b) * at)] ^= 0x10
    path.write_bytes(bytes(b))
    return good


def _x_shard(root: Path, shard: int = 0) -> Path:
    return next(p for p in (root / "data.zarr" / "x" / "c" / str(shard)).rglob("*") if p.is_file())


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16: the converting read
@pytest.mark.parametrize("compression", ["none", "default"])
def test_a_flipped_byte_in_a_zarr_chunk_raises_naming_the_shard(store, compression, dtype):
    import scatstore

    root = store("zarr", dtype, compression=compression, chunk_samples=4)
    want = [open_dataset(root)[i][0] for i in range(len(open_dataset(root)))]
    path = _x_shard(root, 2)
    good = _flip_byte(path)
    ld = scatstore.loader(root, 4, shuffle=False, num_workers=1)
    with pytest.raises(StoreError, match="shard 000002 is damaged"):
        list(ld(0))
    ds = open_dataset(root)
    with pytest.raises(StoreError, match="shard 000002"):
        for i in ds.shard_indices(2):
            ds[i]
    # skip_damaged: the damaged chunk's samples are counted and left out, the rest is intact
    ld = scatstore.loader(root, 4, shuffle=False, num_workers=1, skip_damaged=True)
    got = [x for x, _ in ld(0)]
    n = sum(len(x) for x in got)
    assert ld.reader.damaged and ld.reader.damaged_chunks >= 1
    assert n == len(want) - len(ld.reader.damaged)
    assert all(np.isfinite(x.numpy()).all() for x in got)
    path.write_bytes(good)  # repaired: every sample again, equal to the map-style reader
    ld = scatstore.loader(root, 4, shuffle=False, num_workers=1, drop_last=False)
    got = np.concatenate([x.numpy() for x, _ in ld(0)])
    np.testing.assert_array_equal(got.reshape(len(want), -1),
                                  np.stack(want).astype(np.float32).reshape(len(want), -1))


def test_train_stops_on_a_damaged_chunk_or_skips_it(store, tmp_path):
    from scatstore.cli.train import train_cmd

    root = store("zarr", "float32", compression="none", chunk_samples=4)
    good = _flip_byte(_x_shard(root, 0))
    args = [root, "--epochs", "1", "--batch-size", "2", "--no-progress", "--num-workers", "1"]
    before = tree(tmp_path, skip=[root])
    one_line_error(run(train_cmd, args), 2, "shard 000000 is damaged", "crc32c")
    res = run(train_cmd, args + ["--skip-damaged"])
    assert res.exit_code == 0, res.output
    assert re.search(r"left out [1-4] samples of 1 damaged chunks of the training store", res.stderr)
    assert tree(tmp_path, skip=[root]) == before
    _x_shard(root, 0).write_bytes(good)
    assert run(train_cmd, args).exit_code == 0


def test_train_refuses_a_validation_store_with_other_classes(store, tmp_path):
    from scatstore.cli.train import train_cmd

    root = store("zarr", "float32", name="train")
    val = store("wds", "float32", name="val")
    m = json.loads((val / "manifest.json").read_text())
    m["class_names"] = ["dog", "cat", "rocket"]  # same count, other order
    (val / "manifest.json").write_text(json.dumps(m))
    args = [root, "--val", val, "--epochs", "1", "--batch-size", "4", "--no-progress"]
    before = tree(tmp_path)
    err = one_line_error(run(train_cmd, args), 2, "[dog, cat, rocket]", "[cat, dog, rocket]")
    assert str(val) in err and str(root) in err
    assert tree(tmp_path) == before
    m["class_names"] = ["cat", "dog", "rocket"]
    (val / "manifest.json").write_text(json.dumps(m))
    res = run(train_cmd, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["val_samples"] == 13


# --------------------------------------------------------------------------------------- class 5
def _refresh(root: Path, rel: str) -> None:
    """Update the manifest's checksum of ``rel`` (what an attacker would do)."""
    m = json.loads((root / "manifest.json").read_text())
    for s in m["store"]["shards"]:
        if rel in s["files"]:
            p = root / rel
            s["files"][rel] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                               "bytes": p.stat().st_size}
    (root / "manifest.json").write_text(json.dumps(m))


def _verify_cli(root):
    from scatstore.cli.main import main

    return CliRunner().invoke(main, ["verify", str(root)])


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_verify_finds_hostile_members_and_unlisted_shards(store, tmp_path):
    root = store("wds", "float32")
    tar = root / "shard-000000.tar"
    good = tar.read_bytes()
    marker = tmp_path / "pwned"
    with tarfile.open(tar, "a", format=tarfile.USTAR_FORMAT) as tf:
        for name, blob in (("../../evil.npy", b"\x93NUMPY"),
                           ("img_0001.pyd", pickle.dumps(_Evil(str(marker)))),
                           ("img_0002.pickle", pickle.dumps(_Evil(str(marker))))):
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    _refresh(root, "shard-000000.tar")
    shutil.copy(root / "shard-000002.tar", root / "shard-000003.tar")  # a glob would read it
    before = tree(tmp_path, skip=[root])
    res = _verify_cli(root)
    assert res.exit_code == 1 and "Traceback" not in res.output
    err = res.stderr
    for needle in ("'../../evil.npy'", "'img_0001.pyd'", "'img_0002.pickle'",
                   "unlisted file shard-000003.tar"):
        assert needle in err, err
    assert err.strip().splitlines()[-1].startswith("scatstore: error:")
    assert not marker.exists() and tree(tmp_path, skip=[root]) == before
    tar.write_bytes(good)
    _refresh(root, "shard-000000.tar")
    (root / "shard-000003.tar").unlink()
    res = _verify_cli(root)
    assert res.exit_code == 0 and res.stdout.startswith("ok:"), res.output


MANIFEST_EDITS = {
    "invalid JSON": (None, "not JSON"),
    "future version": (lambda m: m.update(format_version=99), "newer than this scatstore"),
    "wrong counts": (lambda m: m.update(count=m["count"] + 1), "shard counts sum to 13, count=14"),
    "path outside": (lambda m: m["store"]["shards"][0]["files"].update(
        {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "'../../etc/passwd'"),
    "shard_size 0": (lambda m: m["store"].update(shard_size=0), "shard_size is 0"),
    "n_shards": (lambda m: m["store"].update(n_shards=7), "lists 3 shards, n_shards=7"),
    "two problems": (lambda m: (m.update(rejected=-1), m["store"].update(layout=3)),
                     "rejected=-1"),
}


@pytest.mark.parametrize("what", list(MANIFEST_EDITS))
def test_verify_names_manifest_problems(store, tmp_path, what):
    root = store("h5", "float32")
    good = (root / "manifest.json").read_text()
    edit, needle = MANIFEST_EDITS[what]
    if edit is None:
        (root / "manifest.json").write_text(good[: len(good) // 2])
    else:
        m = json.loads(good)
        edit(m)
        (root / "manifest.json").write_text(json.dumps(m))
    rep = verify(root)
    assert not rep.ok and any(needle in p for p in rep.problems), rep.problems
    if what == "two problems":
        assert any("layout has type int" in p for p in rep.problems), rep.problems
    res = _verify_cli(root)
    assert res.exit_code == 1 and needle in res.stderr and "Traceback" not in res.output
    (root / "manifest.json").write_text(good)
    assert _verify_cli(root).exit_code == 0


def test_verify_finds_a_damaged_chunk_behind_refreshed_checksums(store):
    root = store("zarr", "float32", compression="none", chunk_samples=4)
    path = _x_shard(root, 2)
    good = _flip_byte(path)
    rel = path.relative_to(root).as_posix()
    _refresh(root, rel)
    rep = verify(root)
    assert not rep.ok and rep.damaged_shards == [2], rep.format()
    path.write_bytes(good)
    _refresh(root, rel)
    assert verify(root).ok


# --------------------------------------------------------------------------------------- class 7
def test_train_options_are_one_line_errors(store, tmp_path):
    from scatstore.cli.train import train_cmd

    root = store("zarr", "float32", name="train")
    unlabeled = store("h5", "float32", name="unlabeled")
    m = json.loads((unlabeled / "manifest.json").read_text())
    m["class_names"] = []
    (unlabeled / "manifest.json").write_text(json.dumps(m))
    base = [root, "--epochs", "2", "--batch-size", "4", "--no-progress"]
    before = tree(tmp_path)
    for extra, needle in ((["--arch", "nope"], "unknown arch 'nope'"),
                          (["--num-classes", "1"], "--num-classes"),
                          (["--num-classes", "2"], "holds label 2"),
                          (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"),
                          (["--momentum", "1.5"], "--momentum"),
                          (["--weight-decay", "inf"], "--weight-decay"),
                          (["--warmup-epochs", "2"], "--warmup-epochs"),
                          (["--seed", "-1"], "--seed"),
                          (["--num-workers", "-1"], "--num-workers"),
                          (["--val", unlabeled], "is unlabeled")):
        one_line_error(run(train_cmd, base + extra), 2, needle)
    assert tree(tmp_path) == before
    res = run(train_cmd, [root, "--epochs", "2", "--batch-size", "4", "--no-progress",
                          "--arch", "scatresnet10", "--num-classes", "3", "--lr", "0.01",
                          "--warmup-epochs", "1"])
    assert res.exit_code == 0, res.output


def test_bench_load_on_a_tar_with_extra_members(store, tmp_path):
    from scatstore.cli.loading import bench_load_cmd

    root = store("wds", "float32")
    tar = root / "shard-000002.tar"
    good = tar.read_bytes()
    with tarfile.open(tar, "a", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("img_9999.txt")
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"hi"))
    args = [root, "--seconds", "0.2", "--repeats", "1", "--batch-size", "2", "--num-workers", "0"]
    before = tree(tmp_path)
    one_line_error(run(bench_load_cmd, args), 2, "img_9999.txt")
    one_line_error(run(bench_load_cmd, [root, "--seconds", "nan"]), 2, "--seconds")
    assert tree(tmp_path) == before
    tar.write_bytes(good)
    res = run(bench_load_cmd, args)
    assert res.exit_code == 0, res.output
    assert "plain webdataset" in res.output


# --------------------------------------------------------------------------------------- class 8
def test_an_index_claiming_2_36_rows_is_a_store_error(store):
    root = store("wds", "float32")
    p = root / "index.npy"
    raw = p.read_bytes()
    head = raw[:raw.index(b"\n") + 1].decode("latin1")
    n = int(head.split("'shape': (")[1].split(",")[0])
    edited = head.replace(f"'shape': ({n},)", f"'shape': ({2 ** 36},)")
    edited = edited[:-1].ljust(len(head) - 1) + "\n"  # keep the header length
    p.write_bytes(edited.encode("latin1") + raw[len(head):])
    with pytest.raises(StoreError, match="header describes"):
        open_dataset(root)


def test_zarr_arrays_claiming_more_rows_than_their_files_are_store_errors(store):
    root = store("zarr", "float32")
    meta = root / "data.zarr" / "valid" / "zarr.json"
    good = meta.read_text()
    m = json.loads(good)
    m["shape"] = [2 ** 36]
    meta.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="rows"):
        open_dataset(root)
    meta.write_text(good)
    assert len(open_dataset(root)) == 13


@pytest.mark.parametrize("fmt", ["wds", "h5"])
def test_damaged_shard_files_are_store_errors(store, fmt):
    root = store(fmt, "float32")
    ds = open_dataset(root)
    if fmt == "wds":
        ix = np.load(root / "index.npy", allow_pickle=False)
        ix["size_x_npy"][0] = 2 ** 40
        np.save(root / "index.npy", ix, allow_pickle=False)
        ds = open_dataset(root)
    else:
        p = root / "shard-000000.h5"
        b = bytearray(p.read_bytes())
        b[: len(b) // 2] = bytes(len(b) // 2)  # superblock and half the file gone
        p.write_bytes(bytes(b))
    with pytest.raises(StoreError):
        ds[0]
    assert ds[len(ds) - 1][2]["key"] == "img_0021"
