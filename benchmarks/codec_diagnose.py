"""Short ablations of the CAE training recipe, evaluated on held-out photos (docs/codec.md).

Each run trains one codec for ``--steps`` steps on the training images of
``benchmarks/codec_points.py`` (one torch thread) and reports, on the held-out 224² centre
crops, the ideal code length under the frozen tables (bpp) and the PSNR of the reconstruction.

    python benchmarks/codec_diagnose.py [--steps 300] [--runs 'NAME;NAME...']
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_points import heldout_images, training_images

from scatstore.codecs import fit_codec, psnr

V1 = {"architecture": "cae-sgdn-v1", "hidden": 64, "lr": 2e-3}
# name -> fit_codec keyword arguments (C=32, the point where quality fell)
RUNS = {
    "v1 hinge b=0.5 (old)": dict(V1, beta=0.5, rate_control="hinge", target_bpp=0.8),
    "v1 hinge b=0.5, 2x steps": dict(V1, beta=0.5, rate_control="hinge", target_bpp=0.8, _steps=2),
    "v1 hinge b=0.005": dict(V1, beta=0.005, rate_control="hinge", target_bpp=0.8),
    "v1 dual": dict(V1, beta=0.003, rate_control="dual", target_bpp=0.8),
    "v1 dual lr 1e-3": dict(V1, beta=0.003, rate_control="dual", target_bpp=0.8, lr=1e-3),
    "v1 dual, density lr x1": dict(V1, beta=0.003, rate_control="dual", target_bpp=0.8,
                                   density_lr_scale=1.0),
    "v1 dual, noise proxy": dict(V1, beta=0.003, rate_control="dual", target_bpp=0.8,
                                 quant_proxy="noise"),
    "v1 dual, crops 128 (batch 4)": dict(V1, beta=0.003, rate_control="dual", target_bpp=0.8,
                                         size=128, batch_size=4),
    "v2 GDN N=64 dual": {"architecture": "cae-gdn-v2", "hidden": 64, "lr": 1e-3, "beta": 0.003,
                         "rate_control": "dual", "target_bpp": 0.8},
    "v2 GDN N=64 dual, latent gain 1": {"architecture": "cae-gdn-v2", "hidden": 64, "lr": 1e-3,
                                        "beta": 0.003, "rate_control": "dual", "target_bpp": 0.8,
                                        "latent_gain": 1.0},
    "v2 GDN N=128 dual": {"architecture": "cae-gdn-v2", "hidden": 128, "lr": 1e-3, "beta": 0.003,
                          "rate_control": "dual", "target_bpp": 0.8},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--runs", default=";".join(RUNS), help="names separated by ;")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train = training_images()
    test = heldout_images()
    pixels = test.shape[2] * test.shape[3]
    rows = []
    for name in args.runs.split(";"):
        kw = dict(RUNS[name])
        steps = args.steps * kw.pop("_steps", 1)
        kw.setdefault("batch_size", 16)
        kw.setdefault("size", 64)
        t0 = time.perf_counter()
        codec = fit_codec(train, channels=args.channels, steps=steps, seed=0, progress=False, **kw)
        sec = time.perf_counter() - t0
        bpp = float(codec.estimated_bits(test, "tables").mean() / pixels)
        rec = codec.decode_images(codec.quantize(test)[0])
        row = {"run": name, "steps": steps, "train_s": round(sec, 1), "bpp": round(bpp, 4),
               "psnr": round(float(np.mean(psnr(test, rec))), 3),
               "train_bpp": round(codec.info["final"]["bpp"], 4),
               "train_psnr": round(codec.info["final"]["psnr"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| run | steps | s | held-out bpp | held-out PSNR dB | train-crop bpp | train-crop PSNR |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['train_s']:.0f} | {r['bpp']:.3f} | {r['psnr']:.2f} | "
              f"{r['train_bpp']:.3f} | {r['train_psnr']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
