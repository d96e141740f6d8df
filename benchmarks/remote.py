"""Object storage (issue 16's goals), side by side in one run against a local S3 API (moto's
ThreadedMotoServer on 127.0.0.1):

- **cold cache**: the streaming loader from ``s3://`` with an empty cache, one epoch (store open
  included), against a plain ``s3fs`` concurrent read (``fs.cat`` of the list) of the same
  objects (every shard and global file of the store): goal ≥ 80 % of that raw object rate;
- **warm cache**: the same loader again (everything cached; 3 epochs after a first untimed one)
  against the loader on a local copy
  of the store: goal ≥ 90 %;
- **encode**: the same ``scatstore encode`` job into ``s3://`` and into a local directory:
  goal ≥ 90 %.

Stores: scat1 J=3 at 224² with ``scatstore encode``'s defaults (zarr, float16, zstd-3), built
by the store writers from real coefficients tiled to ``--samples`` (benchmarks/loading.py's
builder), and ``cae`` bitstreams of a tiny codec fitted here (a real encode job). Each round runs
every row in turn (load from other jobs hits all alike); the table gives medians of ``--rounds``
rounds. Prints machine.sh's header and ``uptime``.

Usage: python benchmarks/remote.py [--workdir /tmp/scatstore-bench-remote] [--samples 2048]
       [--rounds 3] [--images 96]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loading import build_jpegs, build_store, coefficients, encode_defaults, machine_header  # noqa: E402


def start_s3():
    """moto's S3 server in a process of its own on 127.0.0.1 (in this process, its request
    handling would take the GIL from the loader's and the encoder's threads: a real object store
    is elsewhere)."""
    import socket
    import subprocess

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    code = ("import logging, time; logging.getLogger('werkzeug').setLevel(logging.ERROR); "
            "from moto.server import ThreadedMotoServer; "
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); "
            "s.start(); time.sleep(1e9)")
    srv = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir("bench")
    return srv, fs


class CpuClock:
    """CPU seconds (user + system) of this process and of the S3 server's process together: on
    a 2-core machine the server's work and the loader's share the cores, so the cold epoch's
    wall time has a floor of (server + client + loader CPU) / cores."""

    def __init__(self, server_pid: int):
        import psutil

        self.server = psutil.Process(server_pid)

    def __call__(self) -> float:
        t = self.server.cpu_times()
        return time.process_time() + t.user + t.system


def raw_read(fs, prefix: str, manifest: dict) -> tuple[float, int]:
    """Seconds and bytes of one concurrent s3fs read of every object the store lists."""
    store = manifest["store"]
    rels = [r for s in store["shards"] for r in s["files"]] + list(store["global_files"])
    paths = [f"{prefix}/{r}" for r in rels] + [f"{prefix}/manifest.json"]
    fs.invalidate_cache()
    t = time.perf_counter()
    data = fs.cat(paths)
    dt = time.perf_counter() - t
    return dt, sum(len(v) for v in data.values())


def epoch_rate(make, batch: int, steady: int = 0) -> tuple[float, int]:
    """(samples/s, samples): with ``steady`` 0, one epoch of ``make()`` with its construction
    (store open: manifest, global files) timed too; else ``steady`` epochs timed after an
    untimed first one (buffers allocated, files mapped: the steady rate of a training run)."""
    t = time.perf_counter()
    ld = make()
    epochs = [0]
    if steady:
        for _ in ld(0):
            pass
        t, epochs = time.perf_counter(), list(range(1, steady + 1))
    n = 0
    for ep in epochs:
        for _, y in ld(ep):
            n += len(y)
    dt = time.perf_counter() - t
    ld.close()
    return n / dt, n


def fit_tiny_codec(path: Path) -> Path:
    if path.exists():
        return path
    from scatstore.codecs import fit_codec
    from scatstore.sample_data import load_image

    imgs = [np.ascontiguousarray(load_image(n)[:64, :64]) for n in ("astronaut", "coffee", "chelsea")]
    codec = fit_codec(imgs, channels=4, beta=0.01, steps=25, batch_size=4, size=32, hidden=16,
                      lr=3e-3, seed=0, progress=False)
    codec.save(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/scatstore-bench-remote")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--images", type=int, default=768, help="source images of the encode rows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(machine_header())
    srv, fs = start_s3()
    try:
        return _run(args, work, fs, CpuClock(srv.pid))
    finally:
        srv.kill()
        srv.wait()


def _run(args, work: Path, fs, cpu) -> int:
    from scatstore import loader
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.stores import read_manifest
    from scatstore.stores.fs import as_path

    d = encode_defaults()
    src = build_jpegs(work / "jpeg", args.images)
    x, y = coefficients(src, work / "coef.npz")
    local = build_store(work / f"scat1-{args.samples}", d["format"], x, y, args.samples,
                        compression=d["compression"], dtype=d["dtype"] or "float16",
                        shard_size=d["shard_size"])
    build_store(as_path("s3://bench/scat1"), d["format"], x, y, args.samples,
                compression=d["compression"], dtype=d["dtype"] or "float16",
                shard_size=d["shard_size"])
    codec = fit_tiny_codec(work / "tiny.cae")
    cae_local = work / f"cae-{args.images}"
    cae = dict(src=src, method="cae", codec=str(codec), shard_size=64, augment=8, progress=False)
    if not (cae_local / "manifest.json").exists():
        shutil.rmtree(cae_local, ignore_errors=True)
        encode(EncodeConfig(out=cae_local, **cae), log=lambda m: None)
    encode(EncodeConfig(out="s3://bench/cae", **cae), log=lambda m: None)
    # warm-up of the encode path (kernels built and loaded, threads started), not timed
    shutil.rmtree(work / "enc-warm", ignore_errors=True)
    encode(EncodeConfig(src=src, out=work / "enc-warm", shard_size=32, progress=False),
           log=lambda m: None)
    stores = {"scat1 J=3 (encode defaults)": (local, "s3://bench/scat1"),
              "cae bitstreams": (cae_local, "s3://bench/cae")}
    rows: dict = {}
    for r in range(args.rounds):
        for name, (loc, url) in stores.items():
            m = read_manifest(loc)
            c0 = cpu()
            dt, nbytes = raw_read(fs, url[5:], m)
            raw_cpu = cpu() - c0
            cache = work / f"cache-{r}-{name.split()[0]}"
            shutil.rmtree(cache, ignore_errors=True)
            kw = dict(shuffle=True, seed=r, num_workers=2, drop_last=False, variants="all")
            c0 = cpu()
            cold, n = epoch_rate(lambda: loader(url, args.batch, cache_dir=cache, **kw), args.batch)
            cold_cpu = cpu() - c0
            c0 = cpu()
            warm, _ = epoch_rate(lambda: loader(url, args.batch, cache_dir=cache, **kw), args.batch,
                                 steady=3)
            warm_cpu = (cpu() - c0) / 4  # per epoch (the untimed first one included)
            disk, _ = epoch_rate(lambda: loader(loc, args.batch, **kw), args.batch, steady=3)
            shutil.rmtree(cache, ignore_errors=True)
            row = rows.setdefault(name, {k: [] for k in ("raw", "raw_mbs", "cold", "warm", "disk",
                                                         "raw_cpu", "cold_cpu", "floor")})
            row["raw_cpu"].append(raw_cpu)
            row["cold_cpu"].append(cold_cpu)
            # the cold epoch's floor on these cores: the raw read's CPU (server + client) plus a
            # warm epoch's loader CPU, spread over every core, with no idle moment
            row["floor"].append(n / ((raw_cpu + warm_cpu) / (os.cpu_count() or 1)))
            row["raw"].append(n / dt)
            row["raw_mbs"].append(nbytes / dt / 2**20)
            row["cold"].append(cold)
            row["warm"].append(warm)
            row["disk"].append(disk)
        # encode: the same job into the bucket and into a local directory, order alternating
        enc = rows.setdefault("encode", {"s3": [], "local": []})
        for where in (("s3", "local") if r % 2 == 0 else ("local", "s3")):
            out = f"s3://bench/enc-{r}" if where == "s3" else work / f"enc-{r}"
            shutil.rmtree(work / f"enc-{r}", ignore_errors=True)
            stats: dict = {}
            t = time.perf_counter()
            encode(EncodeConfig(src=src, out=out, shard_size=128, progress=False),
                   log=lambda m: None, stats=stats)
            enc[where].append(stats["images"] / (time.perf_counter() - t))
        shutil.rmtree(work / f"enc-{r}", ignore_errors=True)
    med = statistics.median
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"\nloader: one shuffled epoch, batch {args.batch}, 2 reader threads, float32 out; "
          f"medians of {args.rounds} rounds (samples/s)")
    print(f"{'store':30} {'raw s3fs':>10} {'MiB/s':>7} {'cold':>8} {'cold/raw':>9} "
          f"{'warm':>8} {'disk':>8} {'warm/disk':>9}")
    floors = []
    for name in stores:
        v = {k: med(xs) for k, xs in rows[name].items()}
        floors.append((name, v["raw_cpu"], v["cold_cpu"],
                       med([c / f for c, f in zip(rows[name]["cold"], rows[name]["floor"])]),
                       med([min(f, a) / a for f, a in zip(rows[name]["floor"], rows[name]["raw"])])))
        cold_raw = med([c / a for c, a in zip(rows[name]["cold"], rows[name]["raw"])])
        warm_disk = med([w / dk for w, dk in zip(rows[name]["warm"], rows[name]["disk"])])
        bound = med([c / min(a, dk) for c, a, dk in zip(rows[name]["cold"], rows[name]["raw"],
                                                         rows[name]["disk"])])
        print(f"{name:30} {v['raw']:10,.0f} {v['raw_mbs']:7.0f} {v['cold']:8,.0f} "
              f"{cold_raw:9.0%} {v['warm']:8,.0f} {v['disk']:8,.0f} {warm_disk:9.0%}"
              + (f"   cold / min(raw, disk) {bound:.0%}" if bound != cold_raw else ""))
    print(f"\nCPU (this process + the S3 server's, s per epoch) and the cold epoch against its floor "
          f"on {os.cpu_count()} cores, (raw read CPU + warm loader CPU) / cores:")
    print(f"{'store':30} {'raw CPU':>8} {'cold CPU':>9} {'cold/floor':>11} {'best cold/raw':>14}")
    for name, rc, cc, cf, best in floors:
        print(f"{name:30} {rc:8.2f} {cc:9.2f} {cf:11.0%} {best:14.0%}")
    e = rows["encode"]
    ratio = med([a / b for a, b in zip(e["s3"], e["local"])])
    print(f"\nencode scat1 J=3 defaults, {args.images} images, shard 128 (img/s): into s3:// "
          f"{med(e['s3']):.1f}, into a local dir {med(e['local']):.1f}, ratio {ratio:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
