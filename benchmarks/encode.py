"""End-to-end encode throughput next to the transform alone (issue 3).

Goals: ``scatstore encode`` (decode + resize/crop + transform + zarr write) reaches ≥ 85 % of the
transform's own throughput, and dask with 2 workers is no slower than ``--workers 2``.

Builds an ImageNet-layout sample set from scikit-image's shipped photos and textures (JPEG q90,
sizes 375–500 px a side), then, in rounds (each round runs every pipeline once, so that slow drifts
of the machine hit all of them alike), times:

- **transform alone**: the same ``scatstore.Scattering2D`` call the engine makes (order 1, float16
  output, 224², batches of ``--batch`` images already decoded, cropped and scaled to [0, 1]) on
  the same number of images, in this process with torch's default threads;
- **encode, in-process** (``workers=1``): the whole ``encode()`` call, from listing the sources to
  the committed manifest;
- **encode --workers 2** (process pool): the whole call, start-up of the worker processes
  (spawn, imports) included; its *steady* rate counts the images from the moment the first task
  started to the end of the last one (``encode(..., stats=)``: ``steady_s``), i.e. with the
  workers up;
- **encode --workers 2 --scheduler local** (dask): the LocalCluster the engine builds per job,
  2 single-threaded workers that are threads of this process (``local_cluster(2)``), start-up
  of the cluster included;
- **dask on a running cluster of processes** (``--scheduler ADDRESS``): a LocalCluster of 2
  worker processes (``local_cluster(2, processes=True)``, the way a real cluster's workers
  run), started before the measurement and warmed by one untimed job (imports, filters): what
  a job costs on a cluster that is already up. It is up only for its own measurement: an idle
  cluster costs ~9 % of a core (heartbeats, monitors) that would slow the other pipelines down.

Before each round, each stage is also timed alone (CPU ms per image: decode + resize, the
transform, the shard write). On a machine whose cores the transform alone fills, a pipeline
spends at least the transform alone's CPU per image (cores / its rate) plus the other stages',
which bounds its ratio to the transform alone: printed per round.

Prints medians over the rounds: rates, the per-round ratios to the transform alone and of dask to
``--workers 2`` (per round, because the machine's speed drifts between rounds),
the stage costs the engine measures (CPU ms per image in the decode threads and the writer), and
the CPU time other processes on the machine used during each measurement ("foreign", in cores):
the table is only meaningful when that column is near 0.

Usage: python benchmarks/encode.py [--images 480] [--repeats 5] [--batch 32] [--shard N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HZ = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / HZ


def _namespace_cpu_s() -> float:
    """CPU seconds of every process visible here, with the reaped children they account for."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in rest[11:15])  # utime stime cutime cstime
    return total / HZ


class Meter:
    """Wall time of a block and the cores that processes outside this one's view used meanwhile."""

    def __enter__(self):
        self.t0, self.b0, self.c0 = time.perf_counter(), _machine_busy_s(), _namespace_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        own = _namespace_cpu_s() - self.c0
        self.foreign = max(0.0, (_machine_busy_s() - self.b0 - own) / self.wall)
        return False


def wait_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until the machine was < 5 % busy for a second; returns the wait."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        b0, w0 = _machine_busy_s(), time.perf_counter()
        time.sleep(1.0)
        if (_machine_busy_s() - b0) / ((time.perf_counter() - w0) * (os.cpu_count() or 1)) < 0.05:
            break
    return time.perf_counter() - t0


def decoded_batches(src: Path, batch: int) -> list:
    """The sample set decoded and centre-cropped as the engine does, in [0, 1], as batches."""
    import torch

    from scatstore.sources import decode_image, discover, resize_center_crop

    index = discover(src)
    imgs = np.stack([resize_center_crop(decode_image(index.abspath(it)), 224)[0] for it in index.items])
    x = np.divide(imgs, np.float32(255.0), dtype=np.float32)
    return [torch.from_numpy(x[i:i + batch]) for i in range(0, len(x), batch)]


def transform_alone(S, batches) -> tuple[float, float]:
    import torch

    n = sum(len(b) for b in batches)
    with torch.no_grad(), Meter() as m:
        for b in batches:
            S(b)
    return n / m.wall, m.foreign


def encode_once(src: Path, out: Path, **kw) -> dict:
    import inspect

    from scatstore.pipelines.encode import EncodeConfig, encode

    if out.exists():
        shutil.rmtree(out)
    stats: dict = {}
    # an engine without stats (before they existed) can be timed too, for before/after tables
    extra = {"stats": stats} if "stats" in inspect.signature(encode).parameters else {}
    with Meter() as m:
        manifest = encode(EncodeConfig(src=src, out=out, progress=False, **kw), log=lambda msg: None,
                          **extra)
    shutil.rmtree(out)
    n, nan = manifest["count"], float("nan")
    steady = stats.get("steady_s")
    return {"rate": n / m.wall, "steady": n / steady if steady else nan,
            "ready_s": stats.get("ready_s", nan), "foreign": m.foreign,
            "decode_ms": 1e3 * stats.get("decode_cpu_s", nan) / n,
            "write_ms": 1e3 * stats.get("write_cpu_s", nan) / n}


def _process_cluster(n: int):
    """A LocalCluster of n worker processes, the way a real cluster's workers run."""
    try:
        from scatstore.pipelines.encode import local_cluster
    except ImportError:  # an engine from before local_cluster (before/after tables)
        from distributed import LocalCluster

        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
    import inspect

    if "processes" in inspect.signature(local_cluster).parameters:
        return local_cluster(n, processes=True)
    return local_cluster(n)  # before thread workers: it built processes


def stage_costs(src: Path, S, batches, shard: int) -> dict:
    """CPU ms per image of each stage run alone in one thread: decode + resize + crop, the
    transform (one OpenMP thread: no spin-waiting team), the shard write (zarr, zstd; with zarr's
    own I/O thread). What a pipeline spends per image beyond the transform: the bound printed at
    the end follows from them."""
    from concurrent.futures import ThreadPoolExecutor

    def measure() -> dict:
        import torch

        from scatstore.sources import decode_for_frame, discover, resize_center_crop
        from scatstore.stores import ShardBatch, StoreSpec, writer_for
        from scatstore.transforms._torch_backend import set_thread_openmp_threads

        set_thread_openmp_threads(1)
        index = discover(src)
        paths = [index.abspath(it) for it in index.items]
        t0 = time.thread_time()
        for p in paths:
            resize_center_crop(decode_for_frame(p, 224)[0], 224)
        decode = (time.thread_time() - t0) / len(paths)
        S(batches[0])  # this thread's workspaces
        t0 = time.thread_time()
        with torch.no_grad():
            outs = [S(b).numpy() for b in batches]
        transform = (time.thread_time() - t0) / len(paths)
        x = np.concatenate(outs)
        n = len(x) - len(x) % shard
        spec = StoreSpec(format="zarr", n_slots=n, shard_size=shard, sample_shape=x.shape[1:],
                         dtype="float16", quantized=False, has_hw=False, compression="default")
        with tempfile.TemporaryDirectory() as tmp:
            w = writer_for(Path(tmp), spec)
            w.prepare()
            t0 = time.process_time()  # zarr compresses in its own thread
            for i in range(n // shard):
                lo, hi = i * shard, (i + 1) * shard
                w.write_shard(i, ShardBatch(
                    slots=np.arange(lo, hi), keys=[f"k{j}" for j in range(lo, hi)], x=x[lo:hi],
                    y=np.zeros(shard, np.int64), meta=[{"source_key": f"k{j}"} for j in range(lo, hi)]))
            write = (time.process_time() - t0) / n
        return {"decode": 1e3 * decode, "transform": 1e3 * transform, "write": 1e3 * write}

    with ThreadPoolExecutor(1) as ex:  # its own thread: the main thread keeps torch's threads
        return ex.submit(measure).result()


ALONE = "transform alone"
INPROC = "encode, in-process"
POOL = "encode --workers 2 (process pool)"
DASK = "encode --workers 2 --scheduler local (dask)"
RUNNING = "encode on a running 2-process dask cluster"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (each runs every pipeline once)")
    ap.add_argument("--J", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard", type=int, default=0, help="shard size [default: images / 8]")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each measurement, wait up to this many seconds for an idle machine")
    ap.add_argument("--no-dask", action="store_true")
    args = ap.parse_args()

    import torch

    from scatstore import Scattering2D
    from scatstore.sources.demo_data import make_imagenet_layout

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = make_imagenet_layout(work / "src", n_per_class=max(1, args.images // 3),
                                   size_range=(375, 500), seed=0)
        n = sum(1 for _ in src.rglob("*.JPEG"))
        shard = args.shard or max(8, n // 8)
        common = dict(method="scat1", J=args.J, format="zarr", shard_size=shard, batch_size=args.batch)
        S = Scattering2D(J=args.J, shape=(224, 224), L=8, max_order=1, out_dtype=torch.float16)
        batches = decoded_batches(src, args.batch)
        transform_alone(S, batches[:2])  # filters, plans, first-touch of buffers
        encode_once(src, work / "warm", workers=1, **common)

        plan = [(ALONE, None), (INPROC, dict(workers=1)), (POOL, dict(workers=2))]
        if not args.no_dask:
            plan += [(DASK, dict(workers=2, scheduler="local")), (RUNNING, dict(workers=2))]
        rows: dict[str, list] = {name: [] for name, _ in plan}
        costs = []
        for r in range(args.repeats):
            wait_idle(args.wait_idle)
            costs.append(stage_costs(src, S, batches, shard))
            for name, kw in plan:
                cluster = client = None
                if name == RUNNING:
                    from distributed import Client

                    # the cluster `--scheduler local` builds for itself, up only for this
                    # measurement (an idle cluster costs CPU: it would skew the others) and
                    # warmed by one untimed job (imports, filters) first
                    cluster = _process_cluster(2)
                    client = Client(cluster)
                    kw = dict(kw, scheduler=cluster.scheduler_address)
                    encode_once(src, work / "warm", **common, **kw)
                wait_idle(args.wait_idle)
                if kw is None:
                    rate, foreign = transform_alone(S, batches)
                    rows[name].append({"rate": rate, "foreign": foreign})
                else:
                    rows[name].append(encode_once(src, work / f"out-{r}", **common, **kw))
                if client is not None:
                    client.close()
                    cluster.close()
                print(f"round {r + 1}/{args.repeats}: {name}: {rows[name][-1]['rate']:.1f} img/s",
                      file=sys.stderr, flush=True)

    def med(name, key):
        vals = [v[key] for v in rows[name] if key in v]
        return statistics.median(vals) if vals else float("nan")

    def med_ratio(name, ref):
        # per round, then the median: the machine's speed drifts between rounds (±10 % seen)
        return statistics.median(a["rate"] / b["rate"] for a, b in zip(rows[name], rows[ref]))

    cost = {k: statistics.median(c[k] for c in costs) for k in costs[0]}
    cores = os.cpu_count() or 1
    # Per round: the transform alone on all cores spends cores / rate of CPU per image (more than
    # one thread alone: the threads share caches and memory bandwidth); a pipeline on the same
    # cores spends at least that plus the other stages' cost alone.
    bounds = []
    for c, row in zip(costs, rows[ALONE]):
        t_all = 1e3 * cores / row["rate"]
        bounds.append(t_all / (t_all + c["decode"] + c["write"]))
    t_all = 1e3 * cores / statistics.median(r["rate"] for r in rows[ALONE])
    print(f"\nCPU ms per image, each stage alone in one thread (medians of {len(costs)}): decode + "
          f"resize + crop {cost['decode']:.2f}, transform {cost['transform']:.2f} (on all {cores} "
          f"cores, transform alone: {t_all:.2f}), shard write {cost['write']:.2f}")
    print(f"bound for any pipeline on these cores: transform alone / (transform alone + decode + "
          f"write) = {statistics.median(bounds):.0%} (rounds: "
          f"{', '.join(f'{b:.0%}' for b in bounds)})")
    print(f"\nscat1 J={args.J}, 224², float16, zarr (zstd), shard {shard}, batch {args.batch}; {n} JPEGs "
          f"375–500 px; {os.cpu_count()} cores; medians of {args.repeats} rounds")
    print(f"{'pipeline':<44} {'img/s':>7} {'vs transform':>12} {'steady img/s':>12} {'start-up s':>10} "
          f"{'decode ms':>9} {'write ms':>8} {'foreign':>7}")
    for name, kw in plan:
        cols = ["", "", "", ""] if kw is None else [
            f"{med(name, 'steady'):.1f}", f"{med(name, 'ready_s'):.2f}",
            f"{med(name, 'decode_ms'):.2f}", f"{med(name, 'write_ms'):.2f}"]
        print(f"{name:<44} {med(name, 'rate'):>7.1f} {med_ratio(name, ALONE):>12.0%} {cols[0]:>12} "
              f"{cols[1]:>10} {cols[2]:>9} {cols[3]:>8} {med(name, 'foreign'):>7.2f}")
    for name in (DASK, RUNNING):
        if rows.get(name):
            steady = statistics.median(a["steady"] / b["steady"] for a, b in zip(rows[name], rows[POOL]))
            print(f"{name} / --workers 2: {med_ratio(name, POOL):.2f}× end to end, {steady:.2f}× steady")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
