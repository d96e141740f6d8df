"""CAE operating points on held-out photos, next to JPEG at the same bits per pixel.

Trains three codecs near Torfason et al.'s 0.098 / 0.33 / 0.64 bpp (C = 8 / 16 / 32, the
training rate steered to a target by dual ascent) on one set of scikit-image images and
evaluates them on five OTHER photographs (224x224 centre crops, short side resized to 256
first): bpp of the actual bitstreams (headers and side information included), PSNR and MS-SSIM.
JPEG (PIL, optimize=True, 4:2:0) gets, per image, the highest quality whose file is no larger
than the CAE bitstream of that image. Prints the published Kodak anchors of the issue beside
them and writes a rate-distortion plot.

    python benchmarks/codec_points.py [--minutes 8 | --steps 1500] [--prior factorized|hyper]
        [--save DIR | --load DIR] [--png docs/codec_rd.png] [--json FILE]
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scatstore.codecs import center_crop, fit_codec, load_codec, ms_ssim, psnr
from scatstore.sample_data import load_image

# name, channels, target rate of the training crops (bpp)
POINTS = [("low", 8, 0.098), ("mid", 16, 0.33), ("high", 32, 0.635)]
PAPER = {"low": 0.0983, "mid": 0.330, "high": 0.635}
# PSNR on Kodak (RGB) from each method's published rate-distortion results (the anchors)
ANCHORS = [("JPEG (Pillow)", 26.6, 30.2), ("JPEG 2000", 29.6, 32.4),
           ("Balle 2017 factorized (stride 16)", 30.2, 33.1), ("Balle 2018 hyperprior", 31.0, 34.2),
           ("BPG 4:4:4", 31.4, 34.5)]

# Held out: five natural photographs never seen in training (three colour, two grey). Training:
# every other image bundled with scikit-image that is a real photograph or texture (the right
# view of the stereo pair included). lfw_subset (25x25 faces) is too small for 64² crops.
HELDOUT = ("astronaut", "coffee", "rocket", "camera", "coins")
TRAIN = ("chelsea", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle", "retina",
         "moon", "page", "text", "cell", "clock", "colorwheel", "brick", "grass", "gravel")


def machine_header() -> str:
    """machine.sh's lines (CPU model, ISA level, bandwidths) and the load average."""
    try:
        header = subprocess.run(["bash", "/work/shared/tools/machine.sh"], capture_output=True,
                                text=True, timeout=60, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        header = ""
    try:
        load = "load average: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = ""
    return "\n".join(x for x in (header or "(machine.sh not available)", load) if x)


def training_images() -> list:
    import skimage.data

    imgs = [load_image(n) for n in TRAIN]
    imgs.append(np.asarray(skimage.data.stereo_motorcycle()[1]))  # the right view
    return imgs


def heldout_images(size: int = 224) -> np.ndarray:
    return np.stack([center_crop(load_image(n), size) for n in HELDOUT])


def jpeg_bytes(img_chw: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_chw.transpose(1, 2, 0)).save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def jpeg_matched(img_chw: np.ndarray, max_bytes: int) -> tuple[int, int, np.ndarray]:
    """Highest quality whose JPEG fits in max_bytes (binary search; quality 1 if none)."""
    lo, hi, best = 1, 100, 1
    while lo <= hi:
        q = (lo + hi) // 2
        if len(jpeg_bytes(img_chw, q)) <= max_bytes:
            best, lo = q, q + 1
        else:
            hi = q - 1
    data = jpeg_bytes(img_chw, best)
    dec = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    return best, len(data), dec


def evaluate(codec, images: np.ndarray) -> dict:
    pixels = images.shape[2] * images.shape[3]
    t0 = time.perf_counter()
    blobs = codec.encode(images)
    t_enc = time.perf_counter() - t0
    nbytes = np.array([len(b) for b in blobs])
    est_model = codec.estimated_bits(images, "model")
    est_tables = codec.estimated_bits(images, "tables")
    symbols = codec.decode_symbols(blobs, [f"img{i}" for i in range(len(blobs))])
    assert np.array_equal(symbols, codec.quantize(images)[0]), "symbols did not round-trip"
    rec = codec.decode_images(symbols)
    jq, jb, jp, js = [], [], [], []
    for img, n in zip(images, nbytes):
        q, b, dec = jpeg_matched(img, int(n))
        jq.append(q), jb.append(b), jp.append(psnr(img, dec)), js.append(ms_ssim(img, dec))
    return {
        "bpp": float(nbytes.mean() * 8 / pixels),
        "bytes": float(nbytes.mean()),
        "actual_over_model_est": float(nbytes.sum() * 8 / est_model.sum()),
        "actual_over_tables_est": float(nbytes.sum() * 8 / est_tables.sum()),
        "psnr": float(np.mean(psnr(images, rec))),
        "ms_ssim": float(np.mean(ms_ssim(images, rec))),
        "jpeg_bpp": float(np.mean(jb) * 8 / pixels),
        "jpeg_bytes": float(np.mean(jb)),
        "jpeg_quality_median": float(np.median(jq)),
        "jpeg_q1_images": int(sum(1 for q, b, n in zip(jq, jb, nbytes) if q == 1 and b > n)),
        "jpeg_psnr": float(np.mean(jp)),
        "jpeg_ms_ssim": float(np.mean(js)),
        "encode_s": t_enc,
    }


def jpeg_curve(images: np.ndarray, qualities=(2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90)) -> list[dict]:
    pixels = images.shape[2] * images.shape[3]
    out = []
    for q in qualities:
        bpp, ps = [], []
        for img in images:
            data = jpeg_bytes(img, q)
            dec = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
            bpp.append(len(data) * 8 / pixels)
            ps.append(psnr(img, dec))
        out.append({"quality": q, "bpp": float(np.mean(bpp)), "psnr": float(np.mean(ps))})
    return out


def plot(rows: list[dict], curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.plot([c["bpp"] for c in curve], [c["psnr"] for c in curve], "s-", color="0.5", ms=3,
            label="JPEG, quality sweep (same held-out crops)")
    for prior in sorted({r["prior"] for r in rows}):
        rr = sorted((r for r in rows if r["prior"] == prior), key=lambda r: r["bpp"])
        ax.plot([r["bpp"] for r in rr], [r["psnr"] for r in rr], "o-", lw=2, label=f"CAE, {prior} prior")
        ax.plot([r["jpeg_bpp"] for r in rr], [r["jpeg_psnr"] for r in rr], "x", color="k", ms=7,
                label=f"JPEG matched per image ({prior})")
    for name, a, b in ANCHORS:
        ax.plot([0.33, 0.64], [a, b], ":", marker=".", lw=1, label=f"{name} (Kodak, published)")
    ax.set_xlabel("bits per pixel (actual bitstreams)")
    ax.set_ylabel("PSNR (dB, RGB)")
    ax.set_xlim(0, max(0.9, max(r["bpp"] for r in rows) + 0.05))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="steps per point (default 1500)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock training minutes per point")
    ap.add_argument("--prior", default="factorized", help="factorized, hyper, or both (comma separated)")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="training crop size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dual-rate", type=float, default=0.02, help="step of log beta per step (dual control)")
    ap.add_argument("--rate-size", type=int, default=224,
                    help="rate calibration size of the dual control (0: steer the crops' rate, as before)")
    ap.add_argument("--save", type=Path, help="write the codec files here")
    ap.add_argument("--load", type=Path, help="evaluate codec files from here instead of training")
    ap.add_argument("--points", default="low,mid,high")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--png", type=Path, help="rate-distortion plot (matplotlib)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared 2-core machine)")
    args = ap.parse_args()
    if args.steps is None and args.minutes is None:
        args.steps = 1500

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_header())
    train = training_images()
    images = heldout_images()
    raw_bytes = 224 * 224 * 3
    rows = []
    for prior in args.prior.split(","):
        for name, C, target in POINTS:
            if name not in args.points.split(","):
                continue
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            fname = f"cae_{name}_{prior}.cae"
            if args.load:
                codec = load_codec(args.load / fname)
            else:
                codec = fit_codec(train, channels=C, beta=0.003, steps=args.steps, minutes=args.minutes,
                                  target_bpp=target, prior=prior, hidden=args.hidden,
                                  batch_size=args.batch_size, size=args.size, seed=0, device=args.device,
                                  rate_size=args.rate_size or None, dual_rate=args.dual_rate,
                                  progress=lambda step, st: print(
                                      f"  step {step}: bpp {st['bpp']:.3f}, PSNR {st['psnr']:.2f} dB "
                                      f"(crops), deployed bpp {st.get('bpp_deployed', float('nan')):.3f}, "
                                      f"beta {st['beta']:.3g}", flush=True)
                                  if step % 250 == 0 else None)
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    codec.save(args.save / fname)
            train_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
            r = evaluate(codec, images)
            r.update(point=name, prior=prior, channels=C, paper_bpp=PAPER[name], train_s=train_s,
                     train_cpu_s=cpu_s, steps=codec.info.get("steps_done", codec.config.get("steps")),
                     ratio_raw=raw_bytes / r["bytes"])
            rows.append(r)
            print(f"[{name}/{prior}] C={C} trained/loaded in {train_s:.0f}s ({cpu_s:.0f} CPU-s): "
                  f"{json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})}",
                  flush=True)

    print()
    print(f"held out: {', '.join(HELDOUT)} (224x224 centre crops); trained on {len(train)} other "
          f"images: {', '.join(TRAIN)} (both stereo views)")
    print("| point | prior | C | steps | train CPU-min | paper bpp | bpp | bytes/img | x raw | PSNR dB | "
          "MS-SSIM | JPEG bpp | JPEG PSNR | JPEG MS-SSIM | actual/est |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['point']} | {r['prior']} | {r['channels']} | {r['steps']} | {r['train_cpu_s'] / 60:.1f} | "
              f"{r['paper_bpp']} | {r['bpp']:.3f} | {r['bytes']:.0f} | {r['ratio_raw']:.0f}x | "
              f"{r['psnr']:.2f} | {r['ms_ssim']:.3f} | {r['jpeg_bpp']:.3f} | {r['jpeg_psnr']:.2f} | "
              f"{r['jpeg_ms_ssim']:.3f} | {r['actual_over_model_est']:.4f} |")
    if any(r["jpeg_q1_images"] for r in rows):
        print("JPEG bpp above the CAE's: at quality 1 JPEG still exceeds the CAE bitstream on "
              + ", ".join(f"{r['jpeg_q1_images']} images ({r['point']}/{r['prior']})"
                          for r in rows if r["jpeg_q1_images"]))
    curve = jpeg_curve(images)
    print("JPEG quality sweep on the same crops: " + ", ".join(
        f"q{c['quality']} {c['bpp']:.3f} bpp {c['psnr']:.2f} dB" for c in curve))
    print("Published anchors (Kodak, RGB PSNR at ~0.33 / ~0.64 bpp; other images than these):")
    for n, a, b in ANCHORS:
        print(f"  {n}: {a} / {b} dB")
    if args.png and rows:
        steps = "; ".join(f"{p} " + "/".join(str(r["steps"]) for r in rows if r["prior"] == p)
                          for p in dict.fromkeys(r["prior"] for r in rows))
        plot(rows, curve, args.png, f"held-out skimage photos ({len(images)} x 224²); training steps: {steps}")
        print(f"rate-distortion plot: {args.png}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "jpeg_curve": curve}, indent=1))


if __name__ == "__main__":
    main()
