"""Transform coding of scattering coefficients (``scatstore.transforms.coefcodec``) against the q90
JPEG of the same 224² frame: bytes, error, encode / decode speed and a linear probe.

Images: the 19 pictures shipped with scikit-image, short side resized to 256 (bicubic), centre
crop 224². scat1 = ``scatstore.Scattering2D(J, (224, 224), L=8, max_order=1)`` on x/255.
Held-out bytes: the images are split in two halves (even / odd index); each half is coded with
a codec fitted on random crops of the *other* half, so no frame is coded by parameters that saw it.

Tables:
  1. options (J=3 and J=4): log companding alone, fixed transform (colour x angular DFT), fitted
     PCA, at three qualities; float16 + zstd and uint8-log + zstd as references. Bytes per image
     (mean), ratio to the q90 JPEG (total bytes / total JPEG bytes), relative L2 error.
  2. lossless-stage options on the PCA codes (quality 50): order-0 entropy, zstd levels, blosc
     bit-shuffle (of bytes, or of 16-bit pairs as format version 2 does) + zstd / lz4, left /
     planar spatial prediction of the top components; bytes, encode and decode time.
  3. speed: transform vs codec encode per image (one thread); decode samples/s for the entropy
     stage and the full decode, 1 and 2 threads, vs float16 + zstd; one row per kernel (the C
     kernels for the CPU's ISA level and for x86-64-v3, numpy), rounds interleaved.
  4. linear probe (5 classes: brick, grass, gravel textures with disjoint train / val regions,
     lfw faces / non-faces with disjoint train / val images): logistic regression on 2x2-pooled
     log coefficients, trained and tested on each representation.

    python benchmarks/coefficient_codec.py [--quick] [--no-probe] [--speed-only] [--encode-job]

About 3 minutes on 2 idle cores (the probe's scattering is most of it).
"""
from __future__ import annotations

import argparse
import functools
import io
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import scatstore
from scatstore.sample_data import SHIPPED_IMAGES, TEXTURES, load_faces, load_image
from scatstore.transforms.coefcodec import CoefficientCodec

ROOT = Path(__file__).resolve().parents[1]
QUALITIES = (40, 50, 60)


def crop224(img: np.ndarray) -> np.ndarray:
    im = Image.fromarray(img)
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)))


def random_crop(img: np.ndarray, rng: np.random.Generator, lo: float = 1 / 3) -> np.ndarray:
    H, W = img.shape[:2]
    s = int(rng.integers(max(8, int(min(H, W) * lo)), min(H, W) + 1))
    y, x = int(rng.integers(0, H - s + 1)), int(rng.integers(0, W - s + 1))
    c = np.asarray(Image.fromarray(img[y:y + s, x:x + s]).resize((224, 224), Image.BICUBIC))
    if rng.random() < 0.5:
        c = c[:, ::-1]
    return np.ascontiguousarray(c)


def jpeg_size(frame: np.ndarray, quality: int = 90) -> int:
    b = io.BytesIO()
    Image.fromarray(frame).save(b, format="JPEG", quality=quality)
    return len(b.getvalue())


def scat(frames: np.ndarray, J: int, batch: int = 32) -> np.ndarray:
    S = scatstore.Scattering2D(J=J, shape=(224, 224), L=8, max_order=1)
    out = []
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + batch])).permute(0, 3, 1, 2).float() / 255
        out.append(S(x).numpy())
    return np.concatenate(out)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def zstd_bytes(arrs, level: int = 3) -> list[int]:
    from numcodecs import Zstd

    z = Zstd(level=level)
    return [len(z.encode(np.ascontiguousarray(a))) for a in arrs]


def log_uint8(x: np.ndarray, eps: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Per-map log companding to 8 bits (min/max of log(x+eps) per map), for reference."""
    y = np.log(np.maximum(x, 0) + eps)
    lo = y.min(axis=(-2, -1), keepdims=True)
    hi = y.max(axis=(-2, -1), keepdims=True)
    sc = np.where(hi > lo, (hi - lo) / 255, 1)
    q = np.rint((y - lo) / sc).astype(np.uint8)
    return q, np.maximum(np.exp(q * sc + lo) - eps, 0)


# ------------------------------------------------------------------ data


def shipped_frames():
    names = list(SHIPPED_IMAGES)
    frames = np.stack([crop224(load_image(n)) for n in names])
    rng = np.random.default_rng(0)
    crops = np.stack([random_crop(load_image(n), rng) for n in names for _ in range(4)])
    crop_owner = np.repeat(np.arange(len(names)), 4)
    return names, frames, crops, crop_owner


def heldout_codecs(crops_c, crop_owner, n_images, **kw):
    """Two codecs: [0] fitted on crops of odd images (codes even ones), [1] the reverse."""
    even = crop_owner % 2 == 0
    return CoefficientCodec.fit(crops_c[~even], **kw), CoefficientCodec.fit(crops_c[even], **kw)


def heldout_encode(codecs, frames_c):
    idx = np.arange(len(frames_c))
    blobs: list = [None] * len(frames_c)
    recon = np.empty_like(frames_c)
    for parity, codec in enumerate(codecs):
        sel = idx[idx % 2 == parity]
        b = codec.encode(frames_c[sel])
        recon[sel] = codec.decode(b)
        for i, blob in zip(sel, b):
            blobs[i] = blob
    return blobs, recon


# ------------------------------------------------------------------ tables


def table_options(J, frames_c, crops_c, crop_owner, jpg):
    rows = []
    f16 = frames_c.astype(np.float16)
    rows.append(("float16 + zstd-3", np.mean(zstd_bytes(f16)), rel_l2(f16, frames_c)))
    q8, r8 = log_uint8(frames_c)
    rows.append(("log uint8 per map + zstd-3 (+8 B scales/map)",
                 np.mean(zstd_bytes(q8)) + 8 * q8.shape[1] * q8.shape[2], rel_l2(r8, frames_c)))
    for transform, label in (("identity", "log + steps, no transform"),
                             ("fixed", "log + colour x angular DFT"),
                             ("pca", "log + PCA (fitted, held out)")):
        for q in QUALITIES:
            codecs = heldout_codecs(crops_c, crop_owner, len(frames_c), quality=q, transform=transform)
            blobs, recon = heldout_encode(codecs, frames_c)
            rows.append((f"tc {label}, quality {q}", np.mean([len(b) for b in blobs]),
                         rel_l2(recon, frames_c)))
    print(f"\n## scat1 J={J}: bytes per 224² image (mean of {len(frames_c)}), q90 JPEG = "
          f"{np.mean(jpg):.0f} B\n")
    print("| coding | bytes / image | × q90 JPEG | relative L2 error |")
    print("|---|---:|---:|---:|")
    for name, b, e in rows:
        print(f"| {name} | {b:,.0f} | {b / np.mean(jpg):.3f} | {e * 100:.2f} % |")


def entropy0(q: np.ndarray) -> float:
    """Order-0 entropy in bytes per sample, one histogram per component over all samples."""
    bits = 0.0
    for c in range(q.shape[1]):
        _, n = np.unique(q[:, c], return_counts=True)
        bits -= float((n * np.log2(n / n.sum())).sum())
    return bits / 8 / q.shape[0]


def table_lossless(J, frames_c, crops_c, crop_owner, jpg):
    from numcodecs import blosc

    codec = CoefficientCodec.fit(crops_c, quality=50)
    q = codec.quantize(frames_c)  # (B, D, H, W) int32
    left = q.copy()
    left[..., 1:] = q[..., 1:] - q[..., :-1]
    planar = q.copy()
    planar[..., 1:, :] -= q[..., :-1, :]
    planar[..., :, 1:] -= q[..., :, :-1]
    planar[..., 1:, 1:] += q[..., :-1, :-1]

    def zz(a):
        return ((a << 1) ^ (a >> 31)).reshape(len(a), -1)

    def planes(u):  # low / high byte planes
        return [np.concatenate([(r & 255).astype(np.uint8), (r >> 8).astype(np.uint8)]) for r in u]

    def bl(u, cname, clevel, typesize=1):
        """Mean bytes, encode and decode seconds per image of blosc (bit-shuffle) on rows
        ``u``; ``typesize=2`` shuffles 8-bit codes as 16-bit pairs (format version 2)."""
        rows_ = [np.ascontiguousarray(r, dtype=np.uint8 if r.max() < 256 else "<u2") for r in u]
        if typesize == 2:
            rows_ = [r.view("<u2") if r.dtype == np.uint8 and r.size % 2 == 0 else r for r in rows_]
        t = time.perf_counter()
        cs = [blosc.compress(r, cname.encode(), clevel, 2, 0) for r in rows_]
        enc = (time.perf_counter() - t) / len(u)

        def dec():
            for c, r in zip(cs, rows_):
                blosc.decompress(c, np.empty_like(r))
        return float(np.mean([len(c) for c in cs])), enc, _median_time(dec, 3) / len(u)

    rows = []
    u = zz(q)
    rows.append(("order-0 entropy (ideal static coder, per component)", entropy0(q), None, None))
    for lvl in (3, 19):
        t = time.perf_counter()
        n = np.mean(zstd_bytes(planes(u), lvl))
        rows.append((f"zstd-{lvl} on byte planes", n, (time.perf_counter() - t) / len(u), None))
    chosen = {1: ("zstd", 1, 1), 2: ("zstd", 2, 2)}  # format version -> (cname, clevel, typesize)
    for cname, lvl, ts in (("lz4", 5, 1), ("zstd", 1, 1), ("zstd", 5, 1), ("zstd", 1, 2),
                           ("zstd", 2, 2), ("zstd", 5, 2), ("lz4", 1, 2), ("lz4hc", 9, 2)):
        tag = "".join(f" (format v{v})" for v, c in chosen.items() if c == (cname, lvl, ts))
        elem = "16-bit pairs" if ts == 2 else "bytes"
        rows.append((f"blosc {cname} clevel {lvl}, bit-shuffle of {elem}{tag}", *bl(u, cname, lvl, ts)))
    for name, pred in (("left", left), ("planar", planar)):
        for top in (8, q.shape[1]):
            mixed = np.concatenate([pred[:, :top], q[:, top:]], axis=1)
            rows.append((f"{name} prediction on top {top} components + blosc zstd 1",
                         *bl(zz(mixed), "zstd", 1)))
    print(f"\n## scat1 J={J}: lossless stage on the PCA codes, quality 50 (mean of {len(frames_c)})\n")
    print("| lossless coder | bytes / image | × q90 JPEG | encode ms / image | decode µs / image, 1 thread |")
    print("|---|---:|---:|---:|---:|")
    for name, b, t, d in rows:
        print(f"| {name} | {b:,.0f} | {b / np.mean(jpg):.3f} | {'' if t is None else f'{t * 1e3:.2f}'} "
              f"| {'' if d is None else f'{d * 1e6:.0f}'} |")


def _median_time(fn, rounds=5):
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


KERNELS = (("C, CPU's ISA", {}), ("C, x86-64-v3", {"level": "x86-64-v3"}),
           ("numpy", {"use_numpy": True}))


def table_speed(frames, quick=False, rounds=5):
    """Encode and decode speed of every kernel choice, rounds interleaved (each round times every
    variant once, so a change of load hits them alike); medians over rounds."""
    from scatstore import _cbuild
    from scatstore.transforms import coefcodec

    kernels = [(n, k) for n, k in KERNELS
               if k.get("level") is None or k["level"] in _cbuild.isa_levels()]
    print(f"\n## speed, quality 50 (medians of {rounds} interleaved rounds; samples/s unless "
          "marked)\n")
    print("| J | kernel | transform ms / image | float16+zstd-3 encode ms | tc encode ms | "
          "tc encode / transform | float16+zstd decode, 1 thread | tc entropy stage (codes), "
          "1 / 2 threads | tc full decode float32, 1 / 2 threads | tc full decode, log domain, "
          "1 thread |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for J in (3, 4):
        rows = _speed_rows(J, frames, quick, rounds, kernels, coefcodec)
        for name, r in rows.items():
            print(f"| {J} | {name} ({r['kernel']}) | {r['tr'] * 1e3:.2f} | {r['f16e'] * 1e3:.2f} | "
                  f"{r['en'] * 1e3:.2f} | {r['en'] / r['tr'] * 100:.1f} % | {r['f16']:,.0f} | "
                  f"{r[('codes', 1)]:,.0f} / {r[('codes', 2)]:,.0f} | "
                  f"{r[('full', 1)]:,.0f} / {r[('full', 2)]:,.0f} | {r['log']:,.0f} |")


def _speed_rows(J, frames, quick, rounds, kernels, coefcodec) -> dict:
    from numcodecs import Zstd

    z = Zstd(level=3)
    torch.set_num_threads(1)
    S = scatstore.Scattering2D(J=J, shape=(224, 224), L=8, max_order=1)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    c = S(x).numpy()
    codec = CoefficientCodec.fit(c, quality=50)
    reps = 8 if quick else 27
    blobs = codec.encode(c) * reps  # 19 * 27 = 513 samples
    n = len(blobs)
    f16 = [z.encode(np.ascontiguousarray(a.astype(np.float16))) for a in c] * reps

    def f16_decode():
        out = np.empty((n, *c.shape[1:]), np.float32)
        for i, b in enumerate(f16):
            out[i] = np.frombuffer(z.decode(b), np.float16).reshape(c.shape[1:])

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    common = {"tr": (lambda: S(x), len(frames)),
              "f16e": (lambda: [z.encode(np.ascontiguousarray(a.astype(np.float16))) for a in c],
                       len(frames)),
              "f16": (f16_decode, -n)}
    per_kernel = {"en": (lambda: codec.encode(c), len(frames)),
                  ("codes", 1): (functools.partial(codec.decode_codes, blobs, threads=1), -n),
                  ("codes", 2): (functools.partial(codec.decode_codes, blobs, threads=2), -n),
                  ("full", 1): (functools.partial(codec.decode, blobs, threads=1), -n),
                  ("full", 2): (functools.partial(codec.decode, blobs, threads=2), -n),
                  "log": (lambda: codec.decode(blobs, domain="log"), -n)}
    times: dict = {}
    for _ in range(rounds):
        for key, (fn, _) in common.items():
            times.setdefault(key, []).append(timed(fn))
        for name, kw in kernels:
            coefcodec.select_kernel(**kw)
            for key, (fn, _) in per_kernel.items():
                times.setdefault((name, key), []).append(timed(fn))
        coefcodec.select_kernel()
    rows = {}
    for name, kw in kernels:
        coefcodec.select_kernel(**kw)
        info = coefcodec.kernel_info()
        coefcodec.select_kernel()
        r = {"kernel": info["kernel"] if info["available"] else f"numpy: {info['reason'][:40]}"}
        for key, (_, k) in {**common, **per_kernel}.items():
            t = float(np.median(times[key] if key in common else times[(name, key)]))
            r[key] = t / k if k > 0 else -k / t  # seconds per image, or samples per second
        rows[name] = r
    return rows


# ------------------------------------------------------------------ probe


def probe_set(seed: int = 0, n_tex_train: int = 80, n_tex_val: int = 60):
    """5 classes: brick, grass, gravel (train crops from the top 60 % of each texture, val crops
    from the bottom 40 %), lfw faces and non-faces (train images 0-69, val images 70-99 of each;
    two augmented views per val image)."""
    rng = np.random.default_rng(seed)
    Xtr, ytr, Xva, yva = [], [], [], []
    for label, name in enumerate(TEXTURES):
        img = load_image(name)
        cut = int(img.shape[0] * 0.6)
        for _ in range(n_tex_train):
            Xtr.append(random_crop(img[:cut], rng, lo=0.25))
            ytr.append(label)
        for _ in range(n_tex_val):
            Xva.append(random_crop(img[cut:], rng, lo=0.25))
            yva.append(label)
    faces = load_faces()
    for k, label in ((0, len(TEXTURES)), (1, len(TEXTURES) + 1)):
        group = faces[k * 100:(k + 1) * 100]
        for i, face in enumerate(group):
            rgb = np.repeat(face[:, :, None], 3, axis=2)
            views = 1 if i < 70 else 2
            for _ in range(views):
                v = random_crop(rgb, rng, lo=0.8)
                v = np.clip(v.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
                (Xtr if i < 70 else Xva).append(v)
                (ytr if i < 70 else yva).append(label)
    return np.stack(Xtr), np.array(ytr), np.stack(Xva), np.array(yva)


def pooled_log_features(c: np.ndarray) -> np.ndarray:
    """2x2 spatial mean of log(x + 1e-4): (B, C*K*4)."""
    B, C, K, H, W = c.shape
    y = np.log(np.maximum(c.astype(np.float64), 0) + 1e-4)
    y = y[..., :H // 2 * 2, :W // 2 * 2].reshape(B, C * K, 2, H // 2, 2, W // 2).mean(axis=(3, 5))
    return y.reshape(B, -1)


def linear_probe(ftr, ytr, fva, yva, decay=1e-3, iters=200) -> float:
    torch.manual_seed(0)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-8
    a = torch.from_numpy((ftr - mu) / sd)
    b = torch.from_numpy((fva - mu) / sd)
    t = torch.from_numpy(ytr)
    n_cls = int(ytr.max()) + 1
    W = torch.zeros(a.shape[1], n_cls, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_cls, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ W + bias, t) + decay * (W * W).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(((b @ W + bias).argmax(1).numpy() == yva).mean())


def table_probe():
    Xtr, ytr, Xva, yva = probe_set()
    print(f"\n## linear probe: 5 classes, {len(Xtr)} train / {len(Xva)} held-out samples "
          "(2x2-pooled log coefficients, logistic regression, LBFGS)\n")
    print("| J | representation | bytes / sample | val accuracy | Δ vs float16 (points) |")
    print("|---|---|---:|---:|---:|")
    for J in (3, 4):
        ctr, cva = scat(Xtr, J), scat(Xva, J)
        reps = []
        f16 = lambda a: a.astype(np.float16).astype(np.float32)
        reps.append(("float16", f16(ctr), f16(cva), ctr[0].size * 2))
        for q in QUALITIES:
            codec = CoefficientCodec.fit(ctr, quality=q)
            btr, bva = codec.encode(ctr), codec.encode(cva)
            reps.append((f"tc quality {q}", codec.decode(btr), codec.decode(bva),
                         np.mean([len(b) for b in bva])))
        base = None
        for name, rtr, rva, nbytes in reps:
            acc = linear_probe(pooled_log_features(rtr), ytr, pooled_log_features(rva), yva)
            base = acc if base is None else base
            print(f"| {J} | {name} | {nbytes:,.0f} | {acc * 100:.1f} % | {(acc - base) * 100:+.1f} |")


def table_encode_job(n_images: int = 240, rounds: int = 3, J: int = 3) -> None:
    """``scatstore encode`` in-process, float16 store vs ``--dtype tc --quality 50``, rounds
    interleaved: the end-to-end rate (the tc job also fits its codec on 128 images first) and
    the steady rate (first shard task start to last task end: the per-image cost)."""
    import shutil
    import tempfile

    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sources.demo_data import DEMO_CLASSES, make_imagenet_layout

    work = Path(tempfile.mkdtemp(prefix="tc-encode-"))
    try:
        src = make_imagenet_layout(work / "src", n_per_class=-(-n_images // len(DEMO_CLASSES)),
                                   size_range=(375, 500), seed=0)
        jobs = {"float16 (default)": {"dtype": "float16"},
                "tc quality 50": {"dtype": "tc", "quality": 50}}
        res: dict = {k: [] for k in jobs}
        for r in range(rounds):
            for name, kw in jobs.items():
                out = work / f"out-{r}-{len(res[name])}-{kw['dtype']}"
                st: dict = {}
                t0 = time.perf_counter()
                m = encode(EncodeConfig(src=src, out=out, method="scat1", J=J, shard_size=60,
                                        progress=False, **kw), log=lambda msg: None, stats=st)
                wall = time.perf_counter() - t0
                res[name].append((m["count"] / wall, st["images"] / st["steady_s"],
                                  m["bytes_stored"] / m["count"]))
                shutil.rmtree(out)
        print(f"\n## encode job, scat1 J={J}, 224², zarr, shard 60, {n_images} JPEGs 375-500 px, "
              f"in-process; medians of {rounds} interleaved rounds\n")
        print("| store | end-to-end img/s | steady img/s | steady vs float16 | stored B / sample |")
        print("|---|---:|---:|---:|---:|")
        base = float(np.median([v[1] for v in res["float16 (default)"]]))
        for name, v in res.items():
            e2e, steady, b = (float(np.median([x[i] for x in v])) for i in range(3))
            print(f"| {name} | {e2e:.1f} | {steady:.1f} | {steady / base:.3f} | {b:,.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer decode repetitions")
    ap.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    ap.add_argument("--speed-only", action="store_true", help="only the speed table")
    ap.add_argument("--lossless-only", action="store_true",
                    help="only the lossless-stage tables (J=3 and J=4)")
    ap.add_argument("--encode-job", action="store_true",
                    help="also time `scatstore encode` float16 vs tc (in-process, 240 images)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tool = Path("/work/shared/tools/machine.sh")
    print(subprocess.run(["bash", str(tool)], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip() if tool.exists() else "(machine.sh not found)")
    print("load average (1, 5, 15 min):", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    _, frames, crops, crop_owner = shipped_frames()
    jpg = np.array([jpeg_size(f) for f in frames])
    if not args.speed_only:
        for J in (3, 4):
            fc, cc = scat(frames, J), scat(crops, J)
            if not args.lossless_only:
                table_options(J, fc, cc, crop_owner, jpg)
            table_lossless(J, fc, cc, crop_owner, jpg)
        if args.lossless_only:
            return
    table_speed(frames, args.quick)
    if args.encode_job:
        table_encode_job()
    if not (args.no_probe or args.speed_only):
        table_probe()
    print("\nuptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
