"""Object storage (issue 16): encode into s3://, stream from it, resume across world sizes.

A real S3 API is served on 127.0.0.1 by moto's ThreadedMotoServer (as s3fs's own tests do), a
read-only webdataset store by ``http.server`` on 127.0.0.1, and a 503 storm by a small HTTP
server of this file in front of the files. Nothing here reaches a non-loopback address.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scatstore import loader
from scatstore.loaders import partition
from scatstore.pipelines.encode import EncodeConfig, EncodeError, encode
from scatstore.sources.demo_data import make_imagenet_layout
from scatstore.stores import StoreError, open_dataset, verify
from scatstore.stores import fs as sfs

SIZE = 64
SECRET = "s3cr3t-REMOTE-TEST-9f2c"   # a credential that must never show up anywhere
KEY_ID = "AKIDREMOTETEST0042"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the environment pointing s3fs (and subprocesses) at it;
    yields an s3fs filesystem with the bucket ``bkt``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": KEY_ID,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "SCATSTORE_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sfs._FS.clear()
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir("bkt")
    yield fs
    sfs._FS.clear()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_imagenet_layout(tmp_path_factory.mktemp("src") / "imagenet", n_per_class=12, seed=3)


def _run(src, out, **kw):
    kw.setdefault("size", SIZE)
    kw.setdefault("progress", False)
    lines = []
    m = encode(EncodeConfig(src=src, out=out, **kw), log=lines.append)
    return m, lines


def _objects(fs, prefix: str) -> dict:
    """sha256 of every object under ``prefix`` but the job's bookkeeping (.scatstore/)."""
    out = {}
    for key in sorted(fs.find(prefix)):
        rel = key[len(prefix) + 1:]
        if not rel.startswith(".scatstore"):
            out[rel] = hashlib.sha256(fs.cat_file(key)).hexdigest()
    return out


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()
            and not p.relative_to(root).as_posix().startswith(".scatstore")}


@pytest.fixture(scope="module")
def stores(s3, src, tmp_path_factory):
    """The same job (scat1, default J=3) into a local directory and into s3://, zarr and wds."""
    local = tmp_path_factory.mktemp("local")
    out = {}
    for fmt in ("zarr", "wds"):
        _run(src, local / fmt, format=fmt, shard_size=8)
        _, lines = _run(src, f"s3://bkt/{fmt}", format=fmt, shard_size=8)
        out[fmt] = (local / fmt, f"s3://bkt/{fmt}", lines)
    return out


def _assert_same_batches(a, b, epochs=(0, 1)):
    n = 0
    for ep in epochs:
        for (x1, y1), (x2, y2) in zip(a(ep), b(ep), strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            n += len(y1)
    assert n > 0


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_an_s3_store_is_the_local_store_object_for_object_and_sample_for_sample(stores, s3, fmt,
                                                                               tmp_path,
                                                                               monkeypatch):
    local, url, lines = stores[fmt]
    assert _objects(s3, url[5:]) == _files(local)      # the same bytes, every object
    assert verify(url).ok
    # map-style, and the streaming loader, cold then warm cache, against the local store
    ds, ref = open_dataset(url, cache_dir=tmp_path / "c"), open_dataset(local)
    for i in (0, 17, len(ref) - 1):
        (xa, ya, ma), (xb, yb, mb) = ds[i], ref[i]
        assert np.array_equal(xa, xb) and ya == yb and ma == mb
    # single samples were ranged reads (wds: index.npy offsets; zarr: its shard index, through
    # zarr's FsspecStore), no shard was downloaded
    assert not any(ds.cache.has_shard(s) for s in ds.cache.shard_files)
    b = ds.get_batch([1, 2, 30])                        # a batch fetches its shards
    assert np.array_equal(b["x"], ref.get_batch([1, 2, 30])["x"]) and ds.cache.has_shard(0)
    for kw in ({"shuffle": True, "buffer_size": 10}, {"shuffle": False}):
        cold = loader(url, 4, cache_dir=tmp_path / "l", **kw)
        _assert_same_batches(cold, loader(local, 4, **kw))
        assert cold.dataset.cache.fetched_bytes > 0 or kw["shuffle"] is False
        warm = loader(url, 4, cache_dir=tmp_path / "l", **kw)
        _assert_same_batches(warm, loader(local, 4, **kw), epochs=(0,))
        assert warm.dataset.cache.fetched_bytes == 0
    # a cache smaller than the store: shards evicted and fetched again, the batches the same;
    # objects fetched as ranged parts written at their offsets
    from scatstore.stores import cache as scache

    monkeypatch.setattr(scache, "PART_BYTES", 4096)
    monkeypatch.setattr(scache, "EVICT_MIN_AGE_S", 0.0)
    small = loader(url, 4, cache_dir=tmp_path / "small", cache_bytes=1, num_workers=1,
                   shuffle=False, buffer_size=8)
    _assert_same_batches(small, loader(local, 4, shuffle=False), epochs=(0,))
    c = small.dataset.cache
    assert sum(c.has_shard(s) for s in c.shard_files) < len(c.shard_files)  # some were evicted


def test_no_credential_reaches_a_manifest_a_log_or_an_error(stores, s3):
    for fmt, (local, url, lines) in stores.items():
        text = "\n".join(lines) + "".join(s3.cat_file(k).decode("latin-1")
                                         for k in s3.find(url[5:]))
        assert SECRET not in text and KEY_ID not in text
        assert url in "\n".join(lines)  # the log names the store by its (clean) URL
    with pytest.raises(StoreError) as e:
        open_dataset(f"s3://{KEY_ID}:{SECRET}@bkt/zarr")
    assert SECRET not in str(e.value) and KEY_ID not in str(e.value)
    assert sfs.redact(f"https://u:{SECRET}@h/x?X-Amz-Signature={SECRET}") == "https://***@h/x?***"


def test_a_missing_object_is_a_one_line_error_naming_it(stores, s3, tmp_path):
    _, url, _ = stores["wds"]
    s3.copy(f"{url[5:]}", "bkt/broken", recursive=True)
    s3.rm_file("bkt/broken/shard-000001.tar")
    ld = loader("s3://bkt/broken", 4, shuffle=False, cache_dir=tmp_path)
    with pytest.raises(StoreError) as e:
        list(ld(0))
    msg = str(e.value)
    assert "\n" not in msg and "s3://bkt/broken/shard-000001.tar" in msg and "no such object" in msg
    rep = verify("s3://bkt/broken")
    assert not rep.ok and any("shard-000001.tar" in p for p in rep.problems)
    with pytest.raises(StoreError, match="s3://bkt/nothing-here/manifest.json"):
        open_dataset("s3://bkt/nothing-here")


@pytest.mark.parametrize("fmt,extra", [("zarr", "data.zarr/x/c/99/0/0/0"),
                                       ("wds", "shard-000099.tar")])
def test_verify_of_a_url_names_the_objects_the_manifest_does_not(stores, s3, fmt, extra):
    _, url, _ = stores[fmt]
    copy = f"bkt/extra-{fmt}"
    s3.copy(url[5:], copy, recursive=True)
    s3.pipe_file(f"{copy}/{extra}", b"not a shard of this store")
    s3.invalidate_cache()
    rep = verify(f"s3://{copy}")
    assert not rep.ok and not rep.damaged
    why = ("zarr readers would open it" if fmt == "zarr"
           else "a plain shard-*.tar glob would read it")
    assert rep.problems == [f"unlisted file {extra}: not part of the store ({why})"], rep.problems
    s3.rm_file(f"{copy}/{extra}")
    s3.invalidate_cache()
    assert verify(f"s3://{copy}").ok


def test_a_resume_against_the_bucket_keeps_committed_shards_without_downloading_them(
        stores, s3, src, monkeypatch):
    _, clean, _ = stores["zarr"]
    url = "s3://bkt/resumed"
    s3.copy(clean[5:], url[5:], recursive=True)   # the job, its notes, records and objects
    s3.rm_file(f"{url[5:]}/manifest.json")          # killed before the manifest,
    s3.rm_file(f"{url[5:]}/_store/shard-000003.json")  # before shard 3's commit marker,
    x2 = [k for k in s3.find(f"{url[5:]}/data.zarr/x/c/2")]
    assert len(x2) == 1
    s3.pipe_file(x2[0], s3.cat_file(x2[0])[:-10])  # and shard 2's object is not the recorded one
    s3.invalidate_cache()
    fs = sfs.as_path(url).fs
    read: list = []
    for name in ("cat_file", "open", "get_file"):   # every way the library reads an object
        orig = getattr(fs, name)
        monkeypatch.setattr(fs, name, functools.partial(
            lambda orig, path, *a, **k: (read.append(path), orig(path, *a, **k))[1], orig))
    _, lines = _run(src, url, format="zarr", shard_size=8)
    assert "resuming: 3/5 shards complete and verified, 2 to do" in lines
    s3.invalidate_cache()
    assert _objects(s3, url[5:]) == _objects(s3, clean[5:])
    data = [p for p in read if "/data.zarr/x/c/" in p]
    assert data == [], data                          # committed shards: sizes only (HEAD)


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Serves a directory read-only, with ``Range`` requests (as object stores and web servers
    do; http.server alone has none); answers 503 to the first ``fail[path]`` requests of a path
    (``-1``: always); a GET of a path in ``hold`` waits for its event first (a slow object)."""

    fail: dict = {}
    hold: dict = {}
    seen: dict = {}
    ranged: list = []

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not rng.startswith("bytes=") or not os.path.isfile(path):
            return super().send_head()
        a, _, b = rng[6:].partition("-")
        size = os.path.getsize(path)
        a, b = int(a), min(int(b) if b else size - 1, size - 1)
        with open(path, "rb") as f:
            f.seek(a)
            data = f.read(b - a + 1)
        self.ranged.append(self.path)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        import io

        return io.BytesIO(data)

    def _maybe_503(self) -> bool:
        n = self.fail.get(self.path.split("?")[0], 0)
        self.seen[self.path] = self.seen.get(self.path, 0) + 1
        if n:
            if n > 0:
                self.fail[self.path] = n - 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True
        return False

    def do_GET(self):
        hold = self.hold.get(self.path.split("?")[0])
        if hold is not None:
            hold.wait(30)
        if not self._maybe_503():
            super().do_GET()

    def do_HEAD(self):
        if not self._maybe_503():
            super().do_HEAD()

    def log_message(self, *a):
        pass


@pytest.fixture
def http_store(stores, monkeypatch):
    """The local wds store served over HTTP on 127.0.0.1 (read-only), through _Flaky."""
    local, _, _ = stores["wds"]
    monkeypatch.setattr(sfs, "BACKOFF_S", 0.01)
    _Flaky.fail, _Flaky.seen, _Flaky.ranged, _Flaky.hold = {}, {}, [], {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(_Flaky, directory=str(local)))
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield local, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_webdataset_store_streams_over_http_through_transient_503s(http_store, tmp_path):
    local, url = http_store
    _Flaky.fail.update({"/manifest.json": 2, "/shard-000002.tar": 3, "/index.npy": 1})
    ds = open_dataset(url, cache_dir=tmp_path / "m")
    ref = open_dataset(local)
    x, y, m = ds[20]                                    # ranged GETs of its members
    assert np.array_equal(x, ref[20][0]) and y == ref[20][1] and m == ref[20][2]
    assert _Flaky.ranged and not ds.cache.has_shard(20 // 8)
    _assert_same_batches(loader(url, 4, cache_dir=tmp_path / "l", shuffle=True),
                         loader(local, 4, shuffle=True), epochs=(0,))
    assert _Flaky.fail["/shard-000002.tar"] == 0       # its 503s were met and retried


def test_a_slow_shard_does_not_hold_up_the_reads_of_the_shards_that_arrived(http_store,
                                                                            tmp_path):
    local, url = http_store
    slow = _Flaky.hold["/shard-000000.tar"] = threading.Event()
    # one window over every shard, one reader thread: the pieces of shard 0 come first
    kw = dict(shuffle=False, buffer_size=1000, num_workers=1)
    ld = loader(url, 4, cache_dir=tmp_path, **kw)
    got: list = []
    th = threading.Thread(target=lambda: got.extend(ld(0)), daemon=True)
    th.start()
    cache, others = ld.dataset.cache, set(range(1, len(ld.dataset.cache.shard_files)))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not others <= set(cache._lru):
        time.sleep(0.02)
    read_meanwhile = set(cache._lru)                    # pieces read (their shards ensured)
    slow.set()
    th.join(30)
    assert read_meanwhile == others, read_meanwhile     # all but the slow one, before it came
    ref = list(loader(local, 4, **kw)(0))
    assert len(got) == len(ref) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                        for a, b in zip(got, ref))


def test_a_503_storm_is_a_one_line_error_naming_the_object(http_store, tmp_path):
    local, url = http_store
    _Flaky.fail["/shard-000003.tar"] = -1
    ld = loader(url, 4, shuffle=False, cache_dir=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        list(ld(0))
    msg = str(e.value)
    assert "\n" not in msg and f"{url}/shard-000003.tar" in msg and "503" in msg, msg
    assert f"after {sfs.RETRIES + 1} attempts" in msg and time.monotonic() - t0 < 30


def _cli(src, out, *extra):
    return [sys.executable, "-m", "scatstore.cli.main", "encode", str(src), str(out), "--method",
            "scat1", "--J", "2", "--format", "wds", "--shard-size", "1", "--size", str(SIZE),
            "--quiet", *extra]


def test_sigkill_into_s3_then_resume_gives_the_objects_of_a_clean_run(s3, src):
    _run(src, "s3://bkt/clean", method="scat1", J=2, format="wds", shard_size=1)
    url = "s3://bkt/killed"
    proc = subprocess.Popen(_cli(src, url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        s3.invalidate_cache()
        if len(s3.glob("bkt/killed/_store/shard-*.json")) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGSTOP)  # holds the prefix, frozen
    try:
        with pytest.raises(EncodeError, match=rf"being written by another encode \(pid {proc.pid} "):
            _run(src, url, method="scat1", J=2, format="wds", shard_size=1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    s3.invalidate_cache()
    assert not s3.exists("bkt/killed/manifest.json"), "the job ended before it was killed"
    assert s3.exists("bkt/killed/.scatstore/lock.json")  # a killed holder cannot remove it
    done = subprocess.run(_cli(src, url), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    s3.invalidate_cache()
    assert _objects(s3, "bkt/killed") == _objects(s3, "bkt/clean")
    assert not s3.exists("bkt/killed/.scatstore/lock.json")
    report = subprocess.run([sys.executable, "-m", "scatstore.cli.main", "report", url, "--json"],
                            capture_output=True, text=True)
    assert report.returncode == 0 and json.loads(report.stdout)["count"] == 36


def test_an_expired_lock_object_is_taken_over_and_a_live_one_refused(s3, src, monkeypatch):
    from scatstore.pipelines.encode import jobdir

    lock = sfs.as_path("s3://bkt/locked/.scatstore/lock.json")
    body = {"token": "x", "pid": 1, "host": "elsewhere", "since": "then",
            "expires": time.time() + 60}
    lock.write_bytes(json.dumps(body).encode())
    with pytest.raises(EncodeError, match="pid 1 on elsewhere"):
        _run(src, "s3://bkt/locked", method="raw", format="wds", shard_size=12)
    body["expires"] = time.time() - 1                   # its heartbeat stopped: expired
    lock.write_bytes(json.dumps(body).encode())
    monkeypatch.setattr(jobdir, "LOCK_TTL_S", 0.4)      # heartbeats every 0.1 s meanwhile
    m, _ = _run(src, "s3://bkt/locked", method="raw", format="wds", shard_size=12)
    assert m["count"] == 36 and not lock.exists()


# ------------------------------------------------------------------------- multi-node resume
@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_with_another_world_size_and_worker_count_covers_the_epoch_once(stores, shuffle):
    local, _, _ = stores["zarr"]                        # 36 samples
    B, k, epoch = 2, 3, 1
    kw = dict(shuffle=shuffle, drop_last=True, buffer_size=6, seed=5)
    first = [loader(local, B, rank=r, world_size=2, num_workers=2, **kw) for r in range(2)]
    seen = []
    states = []
    for ld in first:                                   # each rank runs k steps, then checkpoints
        ld.set_epoch(epoch)
        it = iter(ld)
        for s in range(k):
            x, y = next(it)
            seen += ld(epoch).batch_indices(s).tolist()
            assert torch.equal(y, torch.from_numpy(ld.labels[ld(epoch).batch_indices(s)]))
        states.append(ld.state_dict())
        it.close()
    assert states[0] == states[1] and states[0]["step"] == k
    second = [loader(local, B, rank=r, world_size=3, num_workers=1, **kw) for r in range(3)]
    for ld in second:
        ld.load_state_dict(states[0])
        ep = ld(ld.epoch, ld.start_step)
        got = [(x, y) for x, y in ep]
        assert len(got) == ep.plan.n_batches == 4     # 24 remaining samples / 3 ranks / B=2
        for s, (x, y) in enumerate(got):
            idx = ep.batch_indices(s)
            assert torch.equal(y, torch.from_numpy(ld.labels[idx]))
            seen += idx.tolist()
    assert sorted(seen) == list(range(36))              # every sample of the epoch exactly once
    # the next epoch is planned afresh, whatever the checkpoint's world was
    assert second[0].plan(epoch + 1).n_batches == 36 // 3 // B


def test_the_resume_rule_holds_for_any_world_and_batch_sizes():
    """The pure functions alone, over many sizes: the consumed samples and the remainder's plan
    never overlap, and only drop_last's trim (< W'·B') is left out."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 300))
        slots = np.sort(rng.choice(2 * n, n, replace=False))
        sel = np.arange(n)
        W, W2 = (int(v) for v in rng.integers(1, 6, 2))
        B, B2 = (int(v) for v in rng.integers(1, 9, 2))
        buf, seed, epoch = int(rng.integers(1, 40)), int(rng.integers(1e6)), int(rng.integers(5))
        shuffle = bool(rng.integers(2))
        order = partition.global_order(sel, slots, 4, seed, epoch, shuffle)
        full = partition.rank_plan(order, 0, W, B, True, buf, seed, epoch, shuffle)
        k = int(rng.integers(0, full.n_batches + 1))
        seg = [[W, B, k, buf]]
        done = partition.consumed(order, W, B, k, True, buf, seed, epoch, shuffle)
        rest = partition.remaining(order, seg, True, seed, epoch, shuffle)
        later = np.concatenate([partition.rank_plan(rest, r, W2, B2, True, buf, seed, epoch,
                                                    shuffle, 1).order for r in range(W2)])
        assert len(done) == W * k * B and len(np.unique(later)) == len(later)
        assert not np.isin(later, done).any()
        left_out = n - len(done) - len(later)
        assert 0 <= left_out < W2 * B2


def test_cae_and_tc_stores_stream_from_s3_like_their_local_copies(s3, src, tmp_path):
    """The bitstream stores: learned-codec latents (cae, a tiny codec fitted here) and
    transform-coded coefficients (dtype tc), through the loader's bitstream paths."""
    from scatstore.codecs import fit_codec
    from scatstore.sample_data import load_image

    torch.set_num_threads(1)
    imgs = [np.ascontiguousarray(load_image(n)[:64, :64]) for n in ("astronaut", "coffee")]
    codec = fit_codec(imgs, channels=4, beta=0.01, steps=4, batch_size=2, size=32, hidden=8,
                      lr=3e-3, seed=0, progress=False)
    codec.save(tmp_path / "tiny.cae")
    jobs = {"cae": dict(method="cae", codec=str(tmp_path / "tiny.cae"), format="wds"),
            "tc": dict(method="scat1", J=2, dtype="tc", format="zarr")}
    for name, kw in jobs.items():
        _run(src, tmp_path / name, shard_size=8, **kw)
        _run(src, f"s3://bkt/bits-{name}", shard_size=8, **kw)
        assert _objects(s3, f"bkt/bits-{name}") == _files(tmp_path / name)
        _assert_same_batches(loader(f"s3://bkt/bits-{name}", 4, cache_dir=tmp_path / "c"),
                             loader(tmp_path / name, 4), epochs=(0,))


def test_processes_sharing_one_cache_each_get_whole_files(stores, tmp_path):
    """Three processes fill one cache directory at once: per-file locks and atomic renames
    leave every file whole (sha256 of the manifest), no temporary behind, each object once."""
    _, url, _ = stores["zarr"]
    code = ("import sys; from scatstore.stores import open_dataset; "
            "ds = open_dataset(sys.argv[1], cache_dir=sys.argv[2]); "
            "ds.cache.ensure(sorted(ds.cache.shard_files)); print(ds.cache.fetched_bytes)")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    fetched = [int(p.communicate(timeout=120)[0].split()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ds = open_dataset(url, cache_dir=tmp_path)
    m = ds.manifest["store"]
    listed = {rel: info for s in m["shards"] for rel, info in s["files"].items()}
    for rel, info in listed.items():
        assert hashlib.sha256((ds.cache.root / rel).read_bytes()).hexdigest() == info["sha256"]
    assert not [p for p in ds.cache.root.rglob(".tmp-*")]
    listed.update(m["global_files"])
    assert sum(fetched) == sum(i["bytes"] for i in listed.values())  # each object once
