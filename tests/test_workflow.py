"""The README's workflow end to end: encode the demo sources, then train from the shards."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scatstore.sources.demo_data import make_imagenet_layout


@pytest.mark.slow
def test_encode_then_train_from_shards_beats_chance(tmp_path):
    # Train and held-out images are different random crops (different seeds) of the textures.
    train_src = make_imagenet_layout(tmp_path / "train", n_per_class=16, seed=0)
    val_src = make_imagenet_layout(tmp_path / "val", n_per_class=8, seed=1)
    base = [sys.executable, "-m", "scatstore.cli.main"]
    for src, out in ((train_src, tmp_path / "train.zarr"), (val_src, tmp_path / "val.zarr")):
        subprocess.run(base + ["encode", str(src), str(out), "--method", "scat1", "--J", "3",
                               "--size", "128", "--shard-size", "16", "--quiet"],
                       check=True, capture_output=True)
    run = subprocess.run(
        base + ["train", str(tmp_path / "train.zarr"), "--val", str(tmp_path / "val.zarr"),
                "--arch", "scatresnet10", "--epochs", "12", "--batch-size", "4", "--lr", "0.005",
                "--schedule", "cosine", "--num-workers", "1", "--no-progress", "--device", "cpu",
                "--checkpoint-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in lines] == list(range(1, 13))
    keys = {"epoch", "train_loss", "train_top1", "val_top1", "val_top5", "samples_per_s",
            "data_wait_frac", "bytes_read"}
    assert keys <= set(lines[-1])
    assert lines[-1]["bytes_read"] > 0
    # Three texture classes: chance is 1/3. (Few optimisation steps and eval-mode BatchNorm make
    # very short runs noisy, hence small batches for more steps.)
    assert lines[-1]["val_top1"] >= 0.8, lines
    assert (tmp_path / "ckpt" / "last.pt").exists()
