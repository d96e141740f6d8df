"""Loader throughput (issue 11's goals): scatstore's loader per store format and codec against
torchvision's JPEG pipeline, from the page cache, on this machine's cores, side by side.

Builds, under ``--workdir`` (kept between runs, so the second run skips the build):

- ``jpeg/``: an ImageNet-layout folder of ``--images`` JPEGs (q90, 375–500 px sides, from the
  photos and textures shipped in scikit-image);
- scat1 J=3 float16 coefficients of those images at 224² (3×25×28×28, 117.6 kB/sample), tiled to
  ``--samples`` samples, written through the store writers: ``scatstore encode``'s defaults
  (read from ``EncodeConfig``: zarr, float16, the store's default compression = zstd-3),
  zarr uncompressed, zarr uint8 (none and zstd), zarr transform-coded (``tc`` quality 50, the
  codec fitted on the distinct images; decoded by the C kernel of the CPU's ISA, its
  x86-64-v3 build and numpy), and with ``--all`` webdataset and HDF5.

Prints the machine header (``tools/machine.sh`` when it is there, ``uptime``), the conversion
kernel chosen for this CPU, a table of the conversion kernels alone (one thread, one batch of
256 samples: the CPU's build, the x86-64-v3 build, the generic build, torch, numpy), and the
loader table: medians of ``--rounds`` rounds in which every pipeline runs ``--seconds`` in turn
(so load from other jobs hits all rows alike), with ratios to torchvision's decode + resize 256 +
centre crop 224 DataLoader (``benchmarks/jpeg_torchvision.py``, run by the Python given with
``--torchvision-python`` or found automatically: this interpreter if its torchvision works, else
``$SCATSTORE_TORCHVISION_PYTHON``, else ``/tmp/tvenv/bin/python``) and to scatstore's own
decode + RandomResizedCrop JPEG DataLoader (PIL/simplejpeg, ``scatstore.loaders.pixels``).

Usage: python benchmarks/loading.py [--workdir /tmp/scatstore-bench-load] [--samples 4096]
       [--rounds 5] [--seconds 2] [--all] [--torchvision-python PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def build_jpegs(dst: Path, n_images: int) -> Path:
    from scatstore.sources.demo_data import DEMO_CLASSES, make_imagenet_layout

    if not (dst / "LOC_synset_mapping.txt").exists():
        per = max(1, -(-n_images // len(DEMO_CLASSES)))
        make_imagenet_layout(dst, n_per_class=per, size_range=(375, 500), seed=0)
    return dst


def coefficients(src: Path, cache: Path):
    """scat1 J=3 float16 coefficients (n, 3, 25, 28, 28) and labels of the JPEGs under ``src``."""
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["x"], z["y"]
    from scatstore.sources import decode_image, discover, resize_center_crop
    from scatstore.transforms.methods import make_method

    index = discover(src)
    imgs = np.stack([resize_center_crop(decode_image(str(Path(index.root) / it.path)), 224)[0]
                     for it in index.items])
    method = make_method("scat1", J=3)
    xs = [method.encode(np.ascontiguousarray(imgs[i:i + 32])) for i in range(0, len(imgs), 32)]
    x = np.concatenate(xs).astype(np.float16)
    y = np.asarray([it.label for it in index.items], dtype=np.int64)
    np.savez(cache, x=x, y=y)
    return x, y


def build_store(out: Path, fmt: str, x: np.ndarray, y: np.ndarray, n: int, *, compression: str,
                dtype: str = "float16", shard_size: int = 512, class_names=()) -> Path:
    from scatstore.stores import ShardBatch, StoreSpec, writer_for
    from scatstore.transforms.quantize import quantize_uint8

    if (out / "manifest.json").exists():
        return out
    quant = dtype == "uint8"
    codec = None
    if dtype.startswith("tc"):  # "tc-q50": transform-coded, fitted once on the distinct images
        from scatstore.transforms.coefcodec import CoefficientCodec

        codec = CoefficientCodec.fit(x[:128].astype(np.float32), quality=float(dtype[4:]))
    spec = StoreSpec(format=fmt, n_slots=n, shard_size=shard_size,
                     sample_shape=None if codec else tuple(x.shape[1:]),
                     dtype="bytes" if codec else dtype, quantized=quant, compression=compression)
    w = writer_for(out, spec)
    w.prepare()
    recs = []
    m = len(x)
    for s in range(spec.n_shards):
        lo, hi = spec.shard_range(s)
        slots = np.arange(lo, hi)
        src = slots % m  # consecutive samples are distinct images (no intra-chunk repeats)
        kw = {}
        xs = x[src]
        if quant:
            q, qs, qo = quantize_uint8(xs.astype(np.float32))
            xs, kw = q, {"qscale": qs, "qoffset": qo}
        xs = codec.encode(xs.astype(np.float32)) if codec else np.ascontiguousarray(xs)
        recs.append(w.write_shard(s, ShardBatch(slots=slots, keys=[f"s{i:07d}" for i in slots],
                                                x=xs, y=y[src], meta=[{} for _ in slots], **kw)))
    extra = {"coefficient_codec": codec.to_json()} if codec else {}
    w.finalize({"method": {"name": "scat1", "params": {"J": 3, "L": 8, "max_order": 1}},
                "class_names": list(class_names),
                "preprocess": {"size": 224, "augment": 0}, **extra}, recs)
    return out


ROOT = Path(__file__).resolve().parent.parent


def machine_header() -> str:
    import os
    import subprocess

    lines = []
    tool = Path(os.environ.get("SCATSTORE_MACHINE_SH", "/work/shared/tools/machine.sh"))
    if tool.exists():
        try:
            lines.append(subprocess.run(["bash", str(tool)], capture_output=True, text=True,
                                        timeout=120, cwd=ROOT).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    if not lines:
        from scatstore import _cbuild

        lines.append(f"cpu: {_cbuild.cpu_model()}; {os.cpu_count()} cores; isa: {_cbuild.isa_levels()[0]}")
    try:
        lines.append("uptime:" + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return "\n".join(lines)


def _median(xs):
    import statistics

    return statistics.median(xs) if xs else float("nan")


def kernel_table(rounds: int, batch: int = 256) -> str:
    """One thread, one batch: float16 -> float32 and uint8 dequantization, each way."""
    from scatstore import _cbuild
    from scatstore.loaders import convert as cv
    from scatstore.transforms.quantize import dequantize_uint8

    x = torch.randn(batch, 3, 25, 28, 28).half()
    q = torch.randint(0, 256, x.shape, dtype=torch.uint8)
    qs, qo = torch.rand(batch, 3, 25), torch.randn(batch, 3, 25)
    out = torch.empty(x.shape)
    libs = {"this CPU's build": cv.load()}
    for lv in ("x86-64-v3", "generic") if _cbuild._machine() == "x86_64" else ("generic",):
        if lv in _cbuild.isa_levels():
            libs[f"{lv} build"] = cv.library_for(lv).load()
    cases = []
    for name, lib in libs.items():
        if lib is None:
            continue
        kn = lib.cv_kernel().decode()
        cases.append((f"f16->f32 C {name} ({kn})",
                      lambda lib=lib: lib.cv_f16_to_f32(x.data_ptr(), out.data_ptr(), x.numel())))
    cases.append(("f16->f32 torch copy_ (pieces, no OpenMP)",
                  lambda: cv._torch_pieces(out, x, lambda d, s: d.copy_(s))))
    cases.append(("f16->f32 numpy astype", lambda: out.numpy().__setitem__(slice(None), x.numpy())))
    for name, lib in libs.items():
        if lib is not None:
            cases.append((f"uint8 dequantize C {name}",
                          lambda lib=lib: cv.dequantize_into(q, out, qs, qo, lib=lib)))
    cases.append(("uint8 dequantize torch (quantize.dequantize_uint8)",
                  lambda: dequantize_uint8(q, qs, qo)))
    times = {n: [] for n, _ in cases}
    for fn in (f for _, f in cases):
        fn()
    for _ in range(max(3, rounds)):
        for n, fn in cases:
            t = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t)
    ref = _median(times[cases[0][0]])
    head = f"{'conversion, one thread, batch of ' + str(batch) + ' scat1 J=3 samples':<62} {'samples/s':>10} {'GB/s out':>9} {'vs first':>8}"
    lines = [head, "-" * len(head)]
    for n, _ in cases:
        m = _median(times[n])
        lines.append(f"{n:<62} {batch / m:>10,.0f} {out.nbytes / m / 1e9:>9.2f} {ref / m:>7.2f}x")
    return "\n".join(lines)


def find_torchvision_python(given: str | None) -> str | None:
    import os
    import subprocess

    cands = [given] if given else [sys.executable, os.environ.get("SCATSTORE_TORCHVISION_PYTHON"),
                                   "/tmp/tvenv/bin/python"]
    for c in filter(None, cands):
        if not Path(c).exists():
            continue
        try:
            r = subprocess.run([c, "-c", "import torchvision.io, torchvision.transforms.v2"],
                               capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return c
    return None


def torchvision_round(py: str, root: Path, batch: int, workers: int, seconds: float) -> dict | None:
    import subprocess

    r = subprocess.run([py, str(Path(__file__).with_name("jpeg_torchvision.py")), str(root),
                        "--batch-size", str(batch), "--num-workers", str(workers),
                        "--seconds", str(seconds)], capture_output=True, text=True, timeout=900)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(f"torchvision baseline failed: {r.stderr.strip()[-400:]}", file=sys.stderr)
        return None


def encode_defaults() -> dict:
    """``scatstore encode``'s defaults, read from its configuration class (not restated here)."""
    import dataclasses

    from scatstore.pipelines.encode import EncodeConfig
    from scatstore.pipelines.encode.options import DEFAULTS

    f = {x.name: x.default for x in dataclasses.fields(EncodeConfig)}
    # a field left at None takes the method's default (EncodeConfig.value)
    f = {k: DEFAULTS.get(k) if v is None else v for k, v in f.items()}
    return {"format": f["format"], "dtype": f["dtype"], "compression": f["compression"],
            "shard_size": f["shard_size"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/scatstore-bench-load")
    ap.add_argument("--images", type=int, default=250)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--jpeg-batch-size", type=int, default=64,
                    help="batch of the JPEG baselines (finer timing at ~1k samples/s)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--all", action="store_true", help="also webdataset and HDF5 stores")
    ap.add_argument("--only", default="", help="comma list of rows (names in the first column)")
    ap.add_argument("--no-jpeg", action="store_true", help="skip both JPEG baselines")
    ap.add_argument("--torchvision-python", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    from scatstore.loaders import bench
    from scatstore.loaders import convert as cv
    from scatstore.loaders.stream import loader
    from scatstore.sources.demo_data import DEMO_CLASSES
    from scatstore.transforms import coefcodec

    torch.set_num_threads(a.num_workers)
    print(machine_header())
    ki = cv.kernel_info()
    print(f"conversion kernel: {ki['kernel']} (float16: {ki['f16_to_f32']}; uint8: {ki['uint8']}); "
          f"why: {ki['why']}")
    tk = coefcodec.kernel_info()
    print(f"coefficient-codec kernel: {tk['kernel']} ({tk['isa']}; {tk['reason']})")
    defaults = encode_defaults()
    print(f"scatstore encode defaults: {defaults}")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jpeg = build_jpegs(work / "jpeg", a.images)
    x, y = coefficients(jpeg, work / "coefficients.npz")
    names = [c[2] for c in DEMO_CLASSES]
    d = defaults
    stores = {
        "defaults": (d["format"], d["compression"], d["dtype"]),
        "zarr-none": ("zarr", "none", "float16"),
        "zarr-uint8-none": ("zarr", "none", "uint8"),
        "zarr-uint8-zstd": ("zarr", "default", "uint8"),
        "zarr-tc-q50": ("zarr", "default", "tc-q50"),
    }
    if a.all:
        stores.update({"wds": ("wds", "default", "float16"), "h5-none": ("h5", "none", "float16"),
                       "h5-gzip": ("h5", "default", "float16")})
    paths = {name: build_store(work / f"{fmt}-{comp}-{dt}", fmt, x, y, a.samples, compression=comp,
                               dtype=dt, shard_size=d["shard_size"], class_names=names)
             for name, (fmt, comp, dt) in stores.items()}
    print(f"data ready in {time.perf_counter() - t0:.0f} s under {work} "
          f"({a.samples} samples, {len(x)} distinct images)", file=sys.stderr)

    print()
    print(kernel_table(a.rounds))
    print()

    # (row name, store, output dtype, conversion build); None = stored dtype
    rows = [("defaults, float32 out", "defaults", torch.float32, None),
            ("defaults, float16 out", "defaults", None, None),
            ("zarr none, float16 out", "zarr-none", None, None),
            ("zarr none, float32 out", "zarr-none", torch.float32, None),
            ("zarr none, float32 out, x86-64-v3 kernel", "zarr-none", torch.float32, "x86-64-v3"),
            ("zarr none, float32 out, torch conversion", "zarr-none", torch.float32, "torch"),
            ("zarr uint8 none, dequantized float32", "zarr-uint8-none", torch.float32, None),
            ("zarr uint8 zstd-3, dequantized float32", "zarr-uint8-zstd", torch.float32, None),
            ("zarr tc q50, decoded float32", "zarr-tc-q50", torch.float32, None),
            ("zarr tc q50, decoded float32, x86-64-v3 kernel", "zarr-tc-q50", torch.float32,
             "tc:x86-64-v3"),
            ("zarr tc q50, decoded float32, numpy decode", "zarr-tc-q50", torch.float32,
             "tc:numpy")]
    if a.all:
        rows += [("webdataset, float32 out", "wds", torch.float32, None),
                 ("HDF5 none, float32 out", "h5-none", torch.float32, None),
                 ("HDF5 gzip (default), float32 out", "h5-gzip", torch.float32, None)]
    from scatstore import _cbuild

    if "x86-64-v3" not in _cbuild.isa_levels():
        rows = [r for r in rows if r[3] not in ("x86-64-v3", "tc:x86-64-v3")]
    only = set(filter(None, a.only.split(",")))
    if only:
        rows = [r for r in rows if r[0] in only or r[1] in only]
    loaders = {}
    for name, store, dt, _ in rows:
        bench.warm_files([paths[store]])
        loaders[name] = loader(paths[store], a.batch_size, shuffle=True, seed=0,
                               num_workers=a.num_workers, dtype=dt)
    tv_py = None if a.no_jpeg else find_torchvision_python(a.torchvision_python)
    jb = None
    if not a.no_jpeg:
        from scatstore.loaders.pixels import jpeg_batches

        bench.warm_files([jpeg])
        jb = jpeg_batches(jpeg, a.jpeg_batch_size, size=224, train=True, seed=0,
                          num_workers=a.num_workers, drop_last=False)
    res: dict[str, list] = {r[0]: [] for r in rows}
    tv_runs, tv_cpu, own_runs, tv_meta = [], [], [], None
    for rnd in range(a.rounds):
        for name, store, dt, build in rows:
            ld = loaders[name]
            if build == "torch":
                cv.select(use_torch=True)
            elif build == "tc:numpy":
                coefcodec.select_kernel(use_numpy=True)
            elif build is not None and build.startswith("tc:"):
                coefcodec.select_kernel(build[3:])
            elif build is not None:
                cv.select(build)
            try:
                warm = max(3, 2 * len(ld)) if rnd == 0 else 3
                res[name].append(bench._timed(ld, a.seconds, lambda ld=ld: ld.bytes_read,
                                              warmup_batches=warm))
            finally:
                cv.select()
                coefcodec.select_kernel()
        if jb is not None:
            own_runs.append(bench._timed(jb, a.seconds, lambda: jb.bytes_read, warmup_batches=1))
        if tv_py:
            r = torchvision_round(tv_py, jpeg, a.jpeg_batch_size, a.num_workers, a.seconds)
            if r:
                tv_meta = r
                tv_runs.append(r["samples_per_s"][0])
                tv_cpu.append(r.get("cpu_us_per_sample", [float("nan")])[0])
        print(f"  round {rnd + 1}/{a.rounds} done", file=sys.stderr)

    tv = _median(tv_runs) if tv_runs else None
    own = _median([r[0] for r in own_runs]) if own_runs else None
    tvc = _median(tv_cpu) if tv_cpu else None
    head = (f"{'loader, batch ' + str(a.batch_size) + ', ' + str(a.num_workers) + ' threads, page cache':<46} "
            f"{'samples/s':>10} {'min..max':>15} {'MB/s read':>9} {'vs torchvision':>14} "
            f"{'vs own JPEG':>11} {'CPU us/sample':>13} {'CPU vs tv':>9}")
    lines = [head, "-" * len(head)]
    out = {"header": machine_header(), "kernel": ki, "defaults": defaults, "rows": {}}

    def line(name, sps, lo, hi, mbs, cpu):
        vt = f"{sps / tv:.1f}x" if tv else "-"
        vo = f"{sps / own:.1f}x" if own else "-"
        vc = f"{tvc / cpu:.1f}x" if tvc and cpu == cpu and cpu > 0 else "-"
        lines.append(f"{name:<46} {sps:>10,.0f} {f'{lo:,.0f}..{hi:,.0f}':>15} "
                     f"{mbs if isinstance(mbs, str) else f'{mbs:,.0f}':>9} {vt:>14} {vo:>11} "
                     f"{cpu:>13,.1f} {vc:>9}")

    for name, *_ in rows:
        sps = [r[0] for r in res[name]]
        m = _median(sps)
        cpu = _median([r[2] for r in res[name]])
        line(name, m, min(sps), max(sps), _median([r[1] for r in res[name]]), cpu)
        out["rows"][name] = {"samples_per_s": m, "runs": sps, "cpu_us_per_sample": cpu}
    if tv:
        line(f"torchvision {tv_meta['torchvision']} JPEG (bs {a.jpeg_batch_size})", tv,
             min(tv_runs), max(tv_runs), "-", tvc if tvc is not None else float("nan"))
        out["torchvision"] = {"samples_per_s": tv, "runs": tv_runs, **tv_meta}
    elif not a.no_jpeg:
        lines.append("torchvision JPEG baseline: no working torchvision found (see --torchvision-python)")
    if own:
        osps = [r[0] for r in own_runs]
        line(f"scatstore JPEG DataLoader (bs {a.jpeg_batch_size})", own, min(osps), max(osps),
             _median([r[1] for r in own_runs]), float("nan"))  # its workers' CPU is not counted
        out["own_jpeg"] = {"samples_per_s": own, "runs": osps}
    print("\n".join(lines))
    goals = []
    g16 = out["rows"].get("zarr none, float16 out", {}).get("samples_per_s")
    g32 = out["rows"].get("zarr none, float32 out", {}).get("samples_per_s")
    gd = out["rows"].get("defaults, float32 out", {}).get("samples_per_s")
    if g16:
        goals.append(f"float16 out >= 30,000/s: {'met' if g16 >= 30000 else 'NOT met'} ({g16:,.0f})")
    if g32:
        goals.append(f"float32 out >= 15,000/s: {'met' if g32 >= 15000 else 'NOT met'} ({g32:,.0f})")
    if gd and tv:
        goals.append(f"encode defaults >= 10x torchvision: {'met' if gd >= 10 * tv else 'NOT met'} "
                     f"({gd / tv:.1f}x wall clock")
        gdc = out["rows"]["defaults, float32 out"]["cpu_us_per_sample"]
        goals[-1] += f", {tvc / gdc:.1f}x in CPU per sample)" if tvc else ")"
    if goals:
        print("goals: " + "; ".join(goals))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
