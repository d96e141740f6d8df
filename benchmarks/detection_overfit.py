"""Detection from stored scattering vs pixels on CPU: does Faster R-CNN overfit the demo COCO set?

Builds the demo COCO sources (``scatstore demo``'s: 12 scikit-image photos with pasted textures,
seed 0), encodes them as scat1 J=3 on 128-pixel keep-aspect canvases, then runs the two
``scatstore train --task detection`` commands printed below, one after the other, each with
``OMP_NUM_THREADS`` threads, scoring the training set itself (``--val`` = the training data).
Prints the commands, a table (wall and CPU seconds, load average, AP50 per scored epoch, the first
scored epoch with training-set AP50 >= 0.5 and the wall time it was reached) and writes the JSON
lines to ``WORKDIR/{scat,pixels}.jsonl``.

    python benchmarks/detection_overfit.py [--workdir /tmp/det-overfit] [--epochs 50] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["--task", "detection", "--epochs", "{epochs}", "--batch-size", "2",
          "--box-batch-size", "64", "--proposals", "200", "--eval-every", "10", "--flip", "off",
          "--no-progress", "--device", "cpu"]


def commands(work: Path, epochs: int) -> dict[str, list[str]]:
    exe = [sys.executable, "-m", "scatstore.cli.main", "train"]
    common = [c.format(epochs=epochs) for c in COMMON]
    store, src = str(work / "coco-scat1-J3-128"), str(work / "sources" / "coco")
    return {
        "scat": exe + [store, "--val", store, "--arch", "fasterrcnn_scatresnet50", "--width", "64",
                       "--layers", "2,2,2", "--fpn-channels", "128", "--lr", "0.01", *common,
                       "--checkpoint-dir", str(work / "ckpt-scat")],
        "pixels": exe + ["--pixels", src, "--val", src, "--image-size", "128",
                         "--arch", "fasterrcnn_resnet18", "--lr", "0.005", *common,
                         "--checkpoint-dir", str(work / "ckpt-pixels")],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/det-overfit")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["scat", "pixels"], default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sources.demo_data import make_coco_layout

    src = work / "sources" / "coco"
    if not src.exists():
        make_coco_layout(src, n_images=12, seed=0)   # = scatstore demo's COCO layout
    store = work / "coco-scat1-J3-128"
    if not (store / "manifest.json").exists():
        encode(EncodeConfig(src=src, out=store, method="scat1", J=3, size=128, format="zarr",
                            shard_size=16, progress=False), log=lambda m: None)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    rows = []
    for name, cmd in commands(work, a.epochs).items():
        if a.only and name != a.only:
            continue
        print(f"$ OMP_NUM_THREADS={a.threads} " + shlex.join(cmd), flush=True)
        load0 = os.getloadavg()[0]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{name}: exit {out.returncode}")
        (work / f"{name}.jsonl").write_text(out.stdout)
        recs = [json.loads(s) for s in out.stdout.splitlines() if s.startswith("{")]
        scored = [r for r in recs if r.get("val_map50") is not None]
        elapsed = 0.0
        first = None
        for r in recs:
            elapsed += r["epoch_time_s"]
            if first is None and (r.get("val_map50") or 0) >= 0.5:
                first = (r["epoch"], elapsed)
        rows.append((name, wall, ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime,
                     load0, os.getloadavg()[0], scored, first, recs))
    print("\n| run | wall s | CPU s | load 1-min (start/end) | train loss first/last | "
          "AP50 per scored epoch | AP / AP75 last | AP50 >= 0.5 at |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, wall, cpu, l0, l1, scored, first, recs in rows:
        ap50 = ", ".join(f"e{r['epoch']} {r['val_map50']:.2f}" for r in scored)
        last = scored[-1]
        at = f"epoch {first[0]}, {first[1]:.0f} s" if first else "not reached"
        print(f"| {name} | {wall:.0f} | {cpu:.0f} | {l0:.1f} / {l1:.1f} | "
              f"{recs[0]['train_loss']:.3f} / {recs[-1]['train_loss']:.3f} | {ap50} | "
              f"{last['val_map']:.2f} / {last['val_map75']:.2f} | {at} |")


if __name__ == "__main__":
    main()
