"""Training engine: real learning on texture scattering, exact resume, DDP sharding, CLI, pixel path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from scatstore.loaders.pixels import shard_indices
from scatstore.models import build_model
from scatstore.pipelines.train import (JSON_KEYS, load_checkpoint, lr_at, resolve_device,
                                       tensor_batches, train)

CLASSES = ("brick", "grass", "gravel")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core runner (or under
    pytest-xdist) OpenMP threads fighting for cores make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- data

def _scattering(J: int, size: int, max_order: int):
    """kymatio's Scattering2D (the reference); scatstore's own once it is there."""
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
        return ScatteringTorch2D(J=J, shape=(size, size), L=8, max_order=max_order)
    except ImportError:
        from scatstore import Scattering2D
        return Scattering2D(J=J, shape=(size, size), L=8, max_order=max_order)


@pytest.fixture(scope="module")
def texture_scattering(textures):
    """Order 1+2 scattering (J=2) of 48x48 grey crops of three skimage textures.

    Training crops come from the top 70 % of each texture, held-out crops from the bottom 30 %:
    no pixel is shared between the two sets.
    """
    size, n_train, n_val = 48, 80, 30
    rng = np.random.default_rng(0)

    def crops(img, n, r0, r1):
        out = []
        for _ in range(n):
            i = int(rng.integers(r0, r1 - size))
            j = int(rng.integers(0, img.shape[1] - size))
            out.append(img[i:i + size, j:j + size])
        return np.stack(out)

    xtr, ytr, xva, yva = [], [], [], []
    for c, name in enumerate(CLASSES):
        img = textures[name].astype(np.float32) / 255.0
        cut = int(img.shape[0] * 0.7)
        xtr.append(crops(img, n_train, 0, cut))
        xva.append(crops(img, n_val, cut, img.shape[0]))
        ytr += [c] * n_train
        yva += [c] * n_val
    scat = _scattering(J=2, size=size, max_order=2)
    with torch.no_grad():
        s_tr = scat(torch.from_numpy(np.concatenate(xtr))[:, None])   # (N, 1, 81, 12, 12)
        s_va = scat(torch.from_numpy(np.concatenate(xva))[:, None])
    return s_tr, torch.tensor(ytr), s_va, torch.tensor(yva)


def _small_scatresnet(in_channels: int, num_classes: int = 3, widths=(8, 16)):
    return build_model("scatresnet10", in_channels, num_classes, widths=widths)


# ----------------------------------------------------------------------------- learning

def test_scatresnet_learns_textures(texture_scattering):
    s_tr, y_tr, s_va, y_va = texture_scattering
    torch.manual_seed(0)
    model = _small_scatresnet(s_tr.shape[1] * s_tr.shape[2], widths=(16, 32))
    lines: list[dict] = []
    hist = train(model, tensor_batches(s_tr, y_tr, 8, seed=0),
                 tensor_batches(s_va, y_va, 90, shuffle=False), epochs=4, lr=0.05,
                 schedule="cosine", progress=False, log=lambda r: lines.append(json.loads(json.dumps(r))))
    assert len(lines) == 4 and hist == lines
    for rec in lines:
        assert set(JSON_KEYS) <= set(rec)
        assert 0 <= rec["data_wait_frac"] <= 1 and rec["samples_per_s"] > 0
        assert rec["bytes_read"] == s_tr[:240].nbytes + 240 * 8   # estimated from the tensors
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    # three classes: chance is 1/3
    assert lines[-1]["val_top1"] >= 0.8, lines
    assert lines[-1]["val_top5"] == 1.0


def test_lr_schedules():
    lr = [lr_at(e, base_lr=0.1, epochs=90, schedule="step") for e in range(90)]
    assert lr[0] == lr[29] == 0.1
    assert lr[30] == pytest.approx(0.01) and lr[59] == pytest.approx(0.01)
    assert lr[60] == pytest.approx(0.001) and lr[89] == pytest.approx(0.001)
    short = [lr_at(e, base_lr=1.0, epochs=6, schedule="step") for e in range(6)]
    assert short == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = [lr_at(e, base_lr=1.0, epochs=10, schedule="cosine") for e in range(10)]
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] > 0
    assert lr_at(0, base_lr=1.0, epochs=10, schedule="constant", warmup_epochs=3) == 0.25


# ----------------------------------------------------------------------------- checkpoints

def _toy_data(n=96, c=6, hw=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, c, hw, hw, generator=g)
    x[torch.arange(n), y] += 2.0
    return x, y


class _Crash(RuntimeError):
    pass


def test_resume_matches_uninterrupted_run(tmp_path):
    x, y = _toy_data()
    kw = dict(epochs=4, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step", progress=False,
              log=None)

    torch.manual_seed(1)
    full = _small_scatresnet(6)
    hist_full = train(full, tensor_batches(x, y, 16, seed=3), tensor_batches(x, y, 48, shuffle=False),
                      checkpoint_dir=tmp_path / "a", **kw)

    # the same run, killed while reading epoch 3 (index 2) ...
    torch.manual_seed(1)
    part = _small_scatresnet(6)
    base = tensor_batches(x, y, 16, seed=3)

    def crashing(epoch):
        if epoch == 2:
            raise _Crash
        return base(epoch)

    with pytest.raises(_Crash):
        train(part, crashing, tensor_batches(x, y, 48, shuffle=False), checkpoint_dir=tmp_path / "b", **kw)
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["epoch"] == 2
    # ... and resumed in a fresh model with a different initialisation
    torch.manual_seed(99)
    resumed = _small_scatresnet(6)
    hist_res = train(resumed, tensor_batches(x, y, 16, seed=3), tensor_batches(x, y, 48, shuffle=False),
                     checkpoint_dir=tmp_path / "b", resume=True, **kw)

    sa, sb = full.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [h["epoch"] for h in hist_res] == [1, 2, 3, 4]
    assert hist_res[-1]["train_loss"] == hist_full[-1]["train_loss"]
    assert hist_res[-1]["val_top1"] == hist_full[-1]["val_top1"]
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])


def test_checkpoint_is_weights_only_and_atomic(tmp_path):
    x, y = _toy_data(n=32)
    torch.manual_seed(0)
    model = _small_scatresnet(6)
    train(model, tensor_batches(x, y, 16), None, epochs=1, lr=0.01, checkpoint_dir=tmp_path,
          progress=False, log=None, meta={"arch": "scatresnet10", "in_channels": 6})
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]       # no temporary file left behind
    ck = torch.load(tmp_path / "last.pt", weights_only=True)   # no arbitrary unpickling needed
    assert ck["epoch"] == 1 and ck["meta"]["arch"] == "scatresnet10"
    assert {"model", "optimizer", "scaler", "rng", "history"} <= set(ck)
    assert ck["history"][0]["val_top1"] is None


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    x, y = _toy_data(n=32)
    hist = train(_small_scatresnet(6), tensor_batches(x, y, 16), None, epochs=1, lr=0.01,
                 checkpoint_dir=tmp_path / "none", resume=True, progress=False, log=None)
    assert len(hist) == 1


def test_amp_cpu_bfloat16():
    x, y = _toy_data(n=32, c=4, hw=4)
    model = build_model("scatwrn", 4, 3, k=1, n=1)
    hist = train(model, tensor_batches(x, y, 16), tensor_batches(x, y, 32, shuffle=False), epochs=1,
                 lr=0.05, amp=True, progress=False, log=None)
    assert np.isfinite(hist[0]["train_loss"]) and hist[0]["val_top1"] is not None
    assert next(model.parameters()).dtype == torch.float32     # autocast, not a cast of the model


class _CountingSource:
    """A loader-like iterable that reports its own ``bytes_read`` counter."""

    def __init__(self, x, y, bs):
        self.x, self.y, self.bs, self.bytes_read = x, y, bs, 0

    def __iter__(self):
        for i in range(0, len(self.x), self.bs):
            self.bytes_read += 1000
            yield self.x[i:i + self.bs], self.y[i:i + self.bs]


def test_bytes_read_prefers_the_loader_counter():
    x, y = _toy_data(n=48)
    src = _CountingSource(x, y, 16)
    hist = train(_small_scatresnet(6), lambda e: src, None, epochs=2, lr=0.01, progress=False, log=None)
    assert [h["bytes_read"] for h in hist] == [3000, 3000]
    assert hist[0]["train_samples"] == 48


# ----------------------------------------------------------------------------- sharding / DDP

def test_shard_indices_disjoint_and_even():
    n, w = 103, 4
    shards = [shard_indices(n, 5, seed=7, rank=r, world_size=w) for r in range(w)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // w
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == len(flat)                 # disjoint
    again = [shard_indices(n, 5, seed=7, rank=r, world_size=w) for r in range(w)]
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    assert not np.array_equal(shards[0], shard_indices(n, 6, seed=7, rank=0, world_size=w))
    ev = [shard_indices(n, 0, rank=r, world_size=w, shuffle=False, even=False) for r in range(w)]
    assert sorted(np.concatenate(ev).tolist()) == list(range(n))   # evaluation: every sample once


DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from scatstore.models import build_model
    from scatstore.pipelines.train import setup_distributed, tensor_batches, train

    rank, world, _ = setup_distributed("cpu")
    assert world == 2 and dist.get_backend() == "gloo"
    n = 70
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 5, 6, 6, generator=g)
    x[:, -1] = torch.arange(n, dtype=torch.float32)[:, None, None]   # sample id in the last channel
    seen, batches = {}, {}
    base = tensor_batches(x, y, 8, seed=1)          # rank / world size from the process group

    def factory(epoch):
        def gen():
            for xb, yb in base(epoch):
                seen.setdefault(epoch, []).extend(int(v) for v in xb[:, -1, 0, 0])
                batches[epoch] = batches.get(epoch, 0) + 1
                yield xb, yb
        return gen()

    torch.manual_seed(rank)                          # DDP must broadcast rank 0's weights
    model = build_model("scatresnet10", 5, 3, widths=(8, 16))
    train(model, factory, tensor_batches(x, y, 16, shuffle=False), epochs=2, lr=0.05,
          checkpoint_dir=sys.argv[1], progress=False)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "batches": batches, "checksum": flat.double().sum().item(),
                   "first": flat[:20].tolist()}, f)
    dist.destroy_process_group()
''')


def _run_torchrun(tmp_path: Path, script: str, *args: str, timeout: int = 240):
    path = tmp_path / "job.py"
    path.write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(path), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_ddp_two_gloo_processes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    r = _run_torchrun(tmp_path, DDP_SCRIPT, str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert [ln["epoch"] for ln in lines] == [1, 2]                 # rank 0 only, one per epoch
    for ln in lines:
        assert set(JSON_KEYS) <= set(ln) and ln["world_size"] == 2
        assert ln["train_samples"] == 2 * 32                        # 70 -> 35 per rank -> 4 batches of 8
        assert ln["val_samples"] == 70                              # evaluation sees every sample once
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = (set(rk["seen"][epoch]) for rk in ranks)
        assert not a & b                                            # disjoint samples
        assert len(a) == len(b) == 32
        # equal batch counts: 4 to train, the same 4 again for the precise-BatchNorm pass that
        # ends an epoch this short (precise_bn="auto")
        assert ranks[0]["batches"][epoch] == ranks[1]["batches"][epoch] == 2 * 4
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]          # reshuffled per epoch
    assert ranks[0]["first"] == ranks[1]["first"]                   # replicas stay in sync
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    assert sorted(os.listdir(out)) == ["last.pt", "rank0.json", "rank1.json"]  # rank 0 saves


# ----------------------------------------------------------------------------- pixel baseline + CLI

def _sources_ready() -> bool:
    try:
        from scatstore.sources import make_imagenet_layout  # noqa: F401
        from scatstore.sources import discover, decode_image, random_resized_crop, resize_center_crop  # noqa: F401
    except ImportError:
        return False
    return True


needs_sources = pytest.mark.skipif(not _sources_ready(), reason="scatstore.sources not available")


@pytest.fixture(scope="module")
def demo_jpegs(tmp_path_factory):
    from scatstore.sources import make_imagenet_layout
    root = tmp_path_factory.mktemp("jpegs")
    make_imagenet_layout(root / "train", n_per_class=4, size_range=(64, 120), seed=0)
    make_imagenet_layout(root / "val", n_per_class=2, size_range=(64, 120), seed=1)
    return root


@needs_sources
def test_jpeg_batches(demo_jpegs):
    from scatstore.loaders.pixels import jpeg_batches
    n_classes = sum(p.is_dir() for p in (demo_jpegs / "train").iterdir())
    n = 4 * n_classes
    f = jpeg_batches(demo_jpegs / "train", 4, size=32, train=True, seed=0)
    assert f.num_classes == n_classes and len(f) == n // 4
    b1 = list(f(0))
    assert len(b1) == n // 4 and b1[0][0].shape == (4, 3, 32, 32) and b1[0][0].dtype == torch.float32
    assert abs(float(torch.cat([x for x, _ in b1]).mean())) < 2.0   # normalised
    files = sum(p.stat().st_size for p in (demo_jpegs / "train").rglob("*.JPEG"))
    assert f.bytes_read == files                                      # every image read once
    b2 = list(f(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(b1, b2))     # deterministic per epoch
    assert not torch.equal(b1[0][0], list(f(1))[0][0])
    shards = [jpeg_batches(demo_jpegs / "train", 2, size=32, rank=r, world_size=2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == n // 4
    v = jpeg_batches(demo_jpegs / "val", 3, size=32, train=False)
    assert sum(len(yb) for _, yb in v(0)) == 2 * n_classes          # keeps the partial batch


@needs_sources
def test_cli_trains_pixel_baseline_and_resumes(demo_jpegs, tmp_path):
    from click.testing import CliRunner

    from scatstore.cli.train import train_cmd
    args = ["--pixels", str(demo_jpegs / "train"), "--val", str(demo_jpegs / "val"),
            "--arch", "resnet18", "--batch-size", "5", "--image-size", "32", "--num-workers", "0",
            "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress", "--device", "cpu"]
    r = CliRunner().invoke(train_cmd, [*args, "--epochs", "1"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1 and set(JSON_KEYS) <= set(lines[0]) and lines[0]["val_top1"] is not None
    r = CliRunner().invoke(train_cmd, [*args, "--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert [ln["epoch"] for ln in lines] == [2]
    ck = load_checkpoint(tmp_path / "ck" / "last.pt")
    assert ck["meta"]["arch"] == "resnet18"
    assert ck["meta"]["num_classes"] == sum(p.is_dir() for p in (demo_jpegs / "train").iterdir())


def test_cli_trains_on_a_real_store(tmp_path):
    from click.testing import CliRunner

    from scatstore.cli.train import train_cmd
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sources.demo_data import make_imagenet_layout

    src = make_imagenet_layout(tmp_path / "src", n_per_class=4, seed=0)
    for name in ("train", "val"):
        encode(EncodeConfig(src=src, out=tmp_path / name, method="scat1", J=2, size=64,
                            shard_size=4, progress=False), log=lambda m: None)
    r = CliRunner().invoke(train_cmd, [str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                                       "--epochs", "2", "--batch-size", "4", "--num-workers", "1",
                                       "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    # 12 samples and batches of 16 with the partial one dropped: not a silent epoch of no steps
    r_big = CliRunner().invoke(train_cmd, [str(tmp_path / "train"), "--epochs", "1",
                                           "--batch-size", "16", "--no-progress", "--device", "cpu"])
    assert r_big.exit_code == 2 and "gives no batch" in r_big.output, r_big.output
    # the default architecture for scat1, on 3·17 channels of 16×16 maps, 3 classes
    assert "scatresnet50" in r.stderr and "input (51, 16, 16)" in r.stderr and "3 classes" in r.stderr
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert [ln["epoch"] for ln in lines] == [1, 2]
    # the loader's own counter of bytes read from the shards: every sample of the training store
    # each epoch, some compressed 4-sample chunks more than once (a shuffled batch takes samples
    # of several chunks); never more than a chunk per sample
    stored = sum(f.stat().st_size for f in (tmp_path / "train" / "data.zarr" / "x").rglob("*")
                 if f.is_file() and f.name != "zarr.json")
    assert all(0.95 * stored <= ln["bytes_read"] <= 4 * stored for ln in lines), (lines, stored)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_a_device_this_machine_lacks(tmp_path):
    from click.testing import CliRunner

    from scatstore.cli.train import train_cmd

    r = CliRunner().invoke(train_cmd, [str(tmp_path), "--device", "cuda", "--epochs", "1"])
    assert r.exit_code == 2 and "Invalid value for '--device'" in r.output and "CUDA" in r.output
    with pytest.raises(ValueError, match="CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_cli_ctrl_c_says_which_checkpoint_to_resume_from(tmp_path):
    import signal
    import time

    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sources.demo_data import make_imagenet_layout

    src = make_imagenet_layout(tmp_path / "src", n_per_class=4, seed=0)
    store = tmp_path / "store"
    encode(EncodeConfig(src=src, out=store, method="scat1", J=2, size=64, shard_size=4,
                        progress=False), log=lambda m: None)
    ck = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-m", "scatstore.cli.main", "train", str(store),
                             "--arch", "scatresnet10", "--epochs", "1000", "--batch-size", "4",
                             "--num-workers", "1", "--no-progress", "--device", "cpu",
                             "--checkpoint-dir", str(ck)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (ck / "last.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    epoch = load_checkpoint(ck / "last.pt")["epoch"]
    assert f"interrupted; {ck / 'last.pt'} holds epoch {epoch}: re-run the same command with " \
           "--resume" in err


def test_cli_refuses_a_missing_or_unfinished_store(tmp_path):
    from click.testing import CliRunner

    from scatstore.cli.train import train_cmd

    r = CliRunner().invoke(train_cmd, [str(tmp_path / "nope"), "--epochs", "1"])
    assert r.exit_code == 2 and "no such store directory" in r.output
    (tmp_path / "half").mkdir()  # what an interrupted encode leaves: no manifest yet
    r = CliRunner().invoke(train_cmd, [str(tmp_path / "half"), "--epochs", "1"])
    assert r.exit_code == 2 and "not a finished scatstore store" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


# ----------------------------------------------------------------------------- precise BatchNorm

def test_recalibrate_batchnorm_recomputes_population_statistics():
    """After the pass every BatchNorm holds the statistics of the given batches under the current
    weights (for the input BN: the data's own per-channel mean), momenta and weights untouched."""
    from scatstore.pipelines.train import recalibrate_batchnorm

    torch.manual_seed(0)
    model = _small_scatresnet(6)
    x = torch.rand(40, 6, 12, 12) * torch.linspace(0.1, 10, 6).view(1, 6, 1, 1)
    y = torch.zeros(40, dtype=torch.long)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    n = recalibrate_batchnorm(model, tensor_batches(x, y, 8, shuffle=False)(0), device=torch.device("cpu"))
    assert n == 5 and model.training
    assert torch.allclose(model.bn0.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-5)
    batch_vars = torch.stack([x[i:i + 8].var(dim=(0, 2, 3), unbiased=True) for i in range(0, 40, 8)])
    assert torch.allclose(model.bn0.running_var, batch_vars.mean(0), rtol=1e-4)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert recalibrate_batchnorm(model, [], device=torch.device("cpu"), max_batches=0) == 0


def test_precise_bn_auto_on_short_epochs_only(texture_scattering):
    s_tr, y_tr, s_va, y_va = texture_scattering
    torch.manual_seed(0)
    recs = {}
    for mode in ("auto", False):
        hist = train(_small_scatresnet(81), tensor_batches(s_tr, y_tr, 24), epochs=1, lr=0.05,
                     device="cpu", log=None, progress=False, precise_bn=mode)
        recs[mode] = hist[-1]["bn_recalibrated"]
    assert recs == {"auto": 10, False: 0}  # 240 samples / 24: 10 steps < PRECISE_BN_MAX_STEPS
    with pytest.raises(ValueError, match="precise_bn"):
        train(_small_scatresnet(81), tensor_batches(s_tr, y_tr, 24), epochs=1, precise_bn="yes",
              device="cpu", log=None, progress=False)


@pytest.mark.slow
def test_small_data_training_comes_within_5_points_of_the_linear_probe(tmp_path):
    """The issue's case: 5 classes (three textures, faces, photographs), 150 training / 50
    held-out images, scat1 J=3; ``scatstore train --arch scatresnet10 --epochs 8 --batch-size 32``
    with the default recipe must come within 5 points of a linear probe on pooled coefficients
    (it reached 20-48 % before precise BatchNorm; docs/models.md). Frames of 64² keep it short."""
    from click.testing import CliRunner

    from scatstore import loader
    from scatstore.cli.train import train_cmd
    from scatstore.evaluation.probe import fit_and_score, pooled_features
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.sources.demo_data import make_small_classes

    src, val = make_small_classes(tmp_path / "src", n_train=30, n_val=10, seed=0)
    data = {}
    for name, root in (("train", src), ("val", val)):
        encode(EncodeConfig(src=root, out=tmp_path / name, method="scat1", J=3, size=64,
                            shard_size=64, progress=False), log=lambda m: None)
        xs, ys = zip(*loader(tmp_path / name, 64, shuffle=False, num_workers=1))
        data[name] = (torch.cat(xs), torch.cat(ys))
    assert len(data["train"][1]) == 150 and len(data["val"][1]) == 50
    probe = fit_and_score(pooled_features(data["train"][0], "scattering"), data["train"][1],
                          pooled_features(data["val"][0], "scattering"), data["val"][1], 5)
    assert probe.val_top1 >= 0.9, probe
    r = CliRunner().invoke(train_cmd, [str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                                       "--arch", "scatresnet10", "--epochs", "8", "--batch-size", "32",
                                       "--num-workers", "1", "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 8 and all(ln["bn_recalibrated"] > 0 for ln in lines)
    assert lines[-1]["val_top1"] >= probe.val_top1 - 0.05, (probe, [ln["val_top1"] for ln in lines])
