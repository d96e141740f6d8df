"""The GPU check behind ``benchmarks/gpu_check.sh``: every section guarded, one table at the end.

Sections (each prints its own progress to stderr and adds rows to the table; a section that fails
or cannot run adds a row saying why, and the others still run):

1. ``env``        torch / CUDA / CuPy versions and the device.
2. ``transform``  scatstore's scattering on torch-CUDA and on CuPy against the CPU result (max
                  relative error = max |gpu - cpu| / max |cpu| over 4 real photos), then img/s
                  for order 1 and order 2, J=3, 224², batch 256, on each GPU backend.
3. ``loader``     encodes a scat1 J=3 store from scikit-image's photos and textures (ImageNet
                  layout, encoded on the GPU), then the loader (device="cuda": float16 batches
                  copied from pinned memory and converted on the GPU) feeds a 200-step AMP
                  (float16 autocast + GradScaler) ScatResNet-50 training: samples/s and the
                  fraction of wall time spent waiting for data.
4. ``cae``        a small codec trained for a few steps on CPU, saved, loaded on CPU and on the
                  GPU: bitstreams encoded on the CPU decode to identical symbols with either
                  codec, the dequantized latents are equal, and the GPU encoder's symbols are
                  compared with the CPU encoder's (share identical).

``--dry-run``: the same code paths on the CPU with tiny sizes (64² images, batch 4, 3 training
steps), to test the script where no GPU is at hand. ``--sections a,b`` runs only those.
Usage: python benchmarks/gpu_check.py [--dry-run] [--workdir DIR] [--sections ...] [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS: list[tuple[str, str, str, str]] = []  # (section, what, value, status)


def row(section: str, what: str, value, status: str = "ok") -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    ROWS.append((section, what, str(value), status))
    print(f"  [{section}] {what}: {value} ({status})", file=sys.stderr, flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Cfg:
    def __init__(self, dry: bool, workdir: Path):
        self.dry = dry
        self.workdir = workdir
        self.device = "cpu" if dry else "cuda"
        self.size = 64 if dry else 224
        self.batch = 4 if dry else 256
        self.steps = 3 if dry else 200
        self.train_batch = 4 if dry else 256
        self.images_per_class = 2 if dry else 400  # 3 classes: 1,200 samples, 4 batches of 256
        self.reps = 1 if dry else 3


def sync(cfg: Cfg) -> None:
    import torch

    if cfg.device == "cuda":
        torch.cuda.synchronize()


def photos(n: int, size: int):
    """``n`` real RGB photos from scikit-image, centre-cropped and resized to ``size``²: uint8
    (n, 3, size, size)."""
    import numpy as np
    from skimage import data
    from skimage.transform import resize

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"]
    out = []
    for k in range(n):
        img = getattr(data, names[k % len(names)])()
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
        img = resize(img, (size, size), anti_aliasing=True, preserve_range=True)
        if k >= len(names):
            img = img[:, ::-1]  # a different image for the same photo
        out.append(np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.uint8))
    return np.stack(out)


# ------------------------------------------------------------------------------------------ env
# the project's runtime dependencies (pyproject.toml) the sections need, by import name
DEPENDENCIES = ("numpy", "zarr", "numcodecs", "webdataset", "h5py", "dask", "click", "tqdm",
                "PIL", "simplejpeg", "constriction", "skimage")


def section_env(cfg: Cfg) -> None:
    import importlib

    missing = []
    for mod in DEPENDENCIES:
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001
            missing.append(mod)
    row("env", "project dependencies importable", "all" if not missing else
        "missing: " + ", ".join(missing), "ok" if not missing else
        "FAIL (install their wheels: pip install --no-index --find-links DIR ...)")
    import torch

    row("env", "torch", torch.__version__)
    row("env", "CUDA available", torch.cuda.is_available(),
        "ok" if torch.cuda.is_available() or cfg.dry else "FAIL")
    if torch.cuda.is_available():
        row("env", "device", torch.cuda.get_device_name(0))
        row("env", "CUDA runtime", torch.version.cuda)
    try:
        import cupy

        row("env", "cupy", cupy.__version__)
    except Exception as e:  # noqa: BLE001
        row("env", "cupy", f"not importable: {type(e).__name__}", "skip")
    from scatstore.loaders import convert

    row("env", "CPU conversion kernel", convert.kernel_info()["kernel"])


# ------------------------------------------------------------------------------------ transform
def _cupy(cfg: Cfg):
    """The CuPy module usable for this run, or None (dry run: NumPy stands in, same code path)."""
    if cfg.dry:
        import numpy

        return numpy
    import cupy

    return cupy


def section_transform(cfg: Cfg) -> None:
    import numpy as np
    import torch

    from scatstore.transforms import Scattering2D

    x = photos(4, cfg.size).astype(np.float32) / 255.0
    for order in (1, 2):
        ref = Scattering2D(J=3, shape=(cfg.size, cfg.size), max_order=order, backend="torch")(
            torch.from_numpy(x)).numpy()
        scale = float(np.abs(ref).max())
        # torch on the device
        try:
            S = Scattering2D(J=3, shape=(cfg.size, cfg.size), max_order=order, backend="torch")
            got = S(torch.from_numpy(x).to(cfg.device)).cpu().numpy()
            err = float(np.abs(got - ref).max()) / scale
            row("transform", f"torch-{cfg.device} order {order} max rel. error vs CPU", err,
                "ok" if err < 1e-4 else "FAIL")
        except Exception as e:  # noqa: BLE001
            row("transform", f"torch-{cfg.device} order {order} vs CPU", _why(e), "FAIL")
        # CuPy (NumPy in a dry run)
        try:
            xp = _cupy(cfg)
            backend = "numpy" if cfg.dry else "cupy"
            S = Scattering2D(J=3, shape=(cfg.size, cfg.size), max_order=order, backend=backend)
            got = S(xp.asarray(x))
            got = got.get() if hasattr(got, "get") else np.asarray(got)
            err = float(np.abs(got - ref).max()) / scale
            row("transform", f"{backend} order {order} max rel. error vs CPU", err,
                "ok" if err < 1e-4 else "FAIL")
        except Exception as e:  # noqa: BLE001
            row("transform", f"cupy order {order} vs CPU", _why(e), "FAIL")
    # throughput, batch 256 at 224² (tiny on a dry run)
    base = photos(8, cfg.size).astype(np.float32) / 255.0
    xb = np.ascontiguousarray(np.resize(base, (cfg.batch, *base.shape[1:])))
    for order in (1, 2):
        for backend in ("torch", "cupy"):
            try:
                if backend == "torch":
                    S = Scattering2D(J=3, shape=(cfg.size, cfg.size), max_order=order,
                                     backend="torch")
                    inp = torch.from_numpy(xb).to(cfg.device)
                    run = lambda: S(inp)  # noqa: E731
                    done = lambda: sync(cfg)  # noqa: E731
                else:
                    xp = _cupy(cfg)
                    S = Scattering2D(J=3, shape=(cfg.size, cfg.size), max_order=order,
                                     backend="numpy" if cfg.dry else "cupy")
                    inp = xp.asarray(xb)
                    run = lambda: S(inp)  # noqa: E731
                    done = (lambda: None) if cfg.dry else \
                        (lambda: xp.cuda.Stream.null.synchronize())  # noqa: E731
                out = run()
                done()
                del out
                ts = []
                for _ in range(cfg.reps):
                    t0 = time.perf_counter()
                    out = run()
                    done()
                    ts.append(time.perf_counter() - t0)
                    del out
                ts.sort()
                name = backend if not (cfg.dry and backend == "cupy") else "numpy (cupy path)"
                row("transform", f"{name} order {order} J=3 {cfg.size}² batch {cfg.batch} img/s",
                    cfg.batch / ts[len(ts) // 2])
            except Exception as e:  # noqa: BLE001
                row("transform", f"{backend} order {order} img/s", _why(e), "FAIL")
            finally:
                if cfg.device == "cuda":
                    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- loader
def section_loader(cfg: Cfg) -> None:
    import torch

    from scatstore.loaders import loader
    from scatstore.models import build_model
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sources.demo_data import make_imagenet_layout

    src = cfg.workdir / "jpeg"
    out = cfg.workdir / "scat1-store"
    if not (src / "LOC_synset_mapping.txt").exists():
        make_imagenet_layout(src, n_per_class=cfg.images_per_class, size_range=(256, 400), seed=0)
    t0 = time.perf_counter()
    if not (out / "manifest.json").exists():
        encode(EncodeConfig(src=src, out=out, method="scat1", J=3, size=cfg.size,
                            device=cfg.device, progress=False), log=lambda m: None)
    ld = loader(out, cfg.train_batch, shuffle=True, seed=0, device=cfg.device, drop_last=True)
    row("loader", f"store encoded on {cfg.device} ({len(ld.slots)} samples)",
        f"{time.perf_counter() - t0:.1f} s")
    model = build_model("scatresnet50", in_channels=ld.in_channels,
                        num_classes=max(ld.num_classes, 2)).to(cfg.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    amp = cfg.device == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loss_fn = torch.nn.CrossEntropyLoss()

    def batches():
        epoch = 0
        while True:
            yield from ld(epoch)
            epoch += 1

    it = batches()
    warm = 2 if cfg.dry else 10
    wait = 0.0
    n = 0
    steps_total = warm + cfg.steps
    for step in range(steps_total):
        if step == warm:
            sync(cfg)
            t_start, wait, n = time.perf_counter(), 0.0, 0
        tw = time.perf_counter()
        x, y = next(it)
        wait += time.perf_counter() - tw
        with torch.autocast(device_type=cfg.device, dtype=torch.float16, enabled=amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        n += int(y.shape[0])
    sync(cfg)
    dt = time.perf_counter() - t_start
    row("loader", f"{cfg.steps}-step {'AMP ' if amp else ''}ScatResNet-50 training, batch "
        f"{cfg.train_batch}: samples/s", n / dt)
    frac = wait / dt
    row("loader", "data-wait fraction", f"{100 * frac:.1f} %",
        "ok" if frac <= 0.05 or cfg.dry else "WARN (> 5 %)")
    row("loader", "final loss (finite)", float(loss.detach().float().cpu()),
        "ok" if torch.isfinite(loss.detach()).item() else "FAIL")
    # the loader alone on the device: stored float16 -> float32 on the GPU
    t0 = time.perf_counter()
    m = 0
    for x, y in ld(1000):
        m += int(y.shape[0])
    sync(cfg)
    row("loader", f"loader alone, device={cfg.device}, one epoch: samples/s",
        m / (time.perf_counter() - t0))
    ld.close()


# ------------------------------------------------------------------------------------------ cae
def section_cae(cfg: Cfg) -> None:
    import numpy as np
    import torch

    from scatstore.codecs import fit_codec, load_codec

    imgs = photos(6, 64)
    train = [np.ascontiguousarray(im.transpose(1, 2, 0)) for im in imgs]
    codec = fit_codec(train, channels=4, beta=0.01, steps=8 if cfg.dry else 60, batch_size=4,
                      size=32, progress=False, device="cpu")
    path = cfg.workdir / "check.codec"
    codec.save(path)
    cpu = load_codec(path, device="cpu")
    dev = load_codec(path, device=cfg.device)
    x = torch.from_numpy(imgs)
    blobs = cpu.encode(x)
    s_cpu = cpu.decode_symbols(blobs)
    s_dev = dev.decode_symbols(blobs)
    same = bool(np.array_equal(s_cpu, s_dev))
    row("cae", f"CPU bitstreams decoded by the CPU and {cfg.device} codecs: identical symbols",
        same, "ok" if same else "FAIL")
    y_cpu = cpu.dequantize(s_cpu, device="cpu")
    y_dev = dev.dequantize(s_dev, device=cfg.device).cpu()
    eq = bool(torch.equal(y_cpu, y_dev))
    row("cae", f"dequantized latents CPU vs {cfg.device}: equal", eq, "ok" if eq else "FAIL")
    blobs_dev = dev.encode(x)
    s_enc = dev.decode_symbols(blobs_dev)
    share = float((s_enc == s_cpu).mean()) if s_enc.shape == s_cpu.shape else 0.0
    row("cae", f"symbols of the {cfg.device} encoder equal to the CPU encoder's", f"{100 * share:.3f} %",
        "ok" if share > 0.99 else "WARN")
    rt = dev.decode_symbols(blobs_dev)
    row("cae", f"{cfg.device}-encoded bitstreams round-trip", bool(np.array_equal(rt, s_enc)),
        "ok" if np.array_equal(rt, s_enc) else "FAIL")


SECTIONS = {"env": section_env, "transform": section_transform, "loader": section_loader,
            "cae": section_cae}


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def table() -> str:
    w0 = max([len("section")] + [len(r[0]) for r in ROWS])
    w1 = max([len("check")] + [len(r[1]) for r in ROWS])
    w2 = max([len("value")] + [len(r[2]) for r in ROWS])
    head = f"{'section':<{w0}}  {'check':<{w1}}  {'value':>{w2}}  status"
    lines = [head, "-" * len(head)]
    lines += [f"{s:<{w0}}  {c:<{w1}}  {v:>{w2}}  {st}" for s, c, v, st in ROWS]
    return "\n".join(lines)


def _map_checkout_packages() -> None:
    """An installed scatstore has ``scatstore.pipelines`` (the checkout's ``pipelines/``, see
    pyproject.toml); with the checkout on PYTHONPATH only, map it here."""
    import importlib
    import importlib.util

    import scatstore

    for sub in ("pipelines", "cli"):
        name = f"scatstore.{sub}"
        try:
            importlib.import_module(name)
        except ImportError:
            init = ROOT / sub / "__init__.py"
            if not init.exists():
                continue
            spec = importlib.util.spec_from_file_location(
                name, init, submodule_search_locations=[str(ROOT / sub)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            setattr(scatstore, sub, mod)


def main(argv=None) -> int:
    _map_checkout_packages()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (no GPU needed)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="scatstore-gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = Cfg(a.dry_run, work)
    t_all = time.perf_counter()
    for name in [s for s in a.sections.split(",") if s]:
        fn = SECTIONS.get(name)
        if fn is None:
            row(name, "unknown section", "-", "FAIL")
            continue
        log(f"== {name} ==")
        t0 = time.perf_counter()
        try:
            fn(cfg)
        except KeyboardInterrupt:  # the shell script's time limit (SIGINT): keep what we have
            row(name, "interrupted (time limit)", f"after {time.perf_counter() - t0:.0f} s", "FAIL")
            break
        except Exception as e:  # noqa: BLE001 - a failed section must not stop the others
            traceback.print_exc()
            row(name, "section failed", _why(e), "FAIL")
        row(name, "section time", f"{time.perf_counter() - t0:.1f} s")
    print(f"\nscatstore GPU check ({'dry run on CPU' if cfg.dry else cfg.device}), "
          f"{time.perf_counter() - t_all:.0f} s, workdir {work}")
    print(table())
    if a.json:
        Path(a.json).write_text(json.dumps([dict(zip(("section", "check", "value", "status"), r))
                                            for r in ROWS], indent=1))
    return 1 if any(r[3] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
