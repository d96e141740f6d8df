"""End-to-end tests of the encode job (issue 3): layouts, methods, stores, traps, resume, determinism."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scatstore.pipelines.encode import EncodeConfig, EncodeError, encode
from scatstore.pipelines.report import report
from scatstore.sources import decode_for_frame, resize_center_crop, resize_keep_aspect
from scatstore.sources.demo_data import make_coco_layout, make_imagenet_layout, make_trap_files
from scatstore.stores import open_dataset, read_manifest, verify

SIZE = 64  # small images keep the suite fast; the pipeline is size-agnostic


@pytest.fixture(scope="module")
def imagenet_src(tmp_path_factory) -> Path:
    return make_imagenet_layout(tmp_path_factory.mktemp("src") / "imagenet", n_per_class=4, seed=0)


@pytest.fixture(scope="module")
def coco_src(tmp_path_factory) -> Path:
    return make_coco_layout(tmp_path_factory.mktemp("src") / "coco", n_images=6, seed=0)


def _run(src, out, **kw) -> dict:
    kw.setdefault("size", SIZE)
    kw.setdefault("shard_size", 5)
    kw.setdefault("progress", False)
    return encode(EncodeConfig(src=src, out=out, **kw), log=lambda m: None)


def _store_digest(out: Path) -> dict[str, str]:
    """sha256 of every file of a store except the resume bookkeeping."""
    digests = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not rel.startswith(".scatstore"):
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _cli_encode(src: Path, out: Path, shard_size: int, *extra: str) -> list[str]:
    """The `scatstore encode` command line of the subprocess tests (scat1 J=2, wds)."""
    return [sys.executable, "-m", "scatstore.cli.main", "encode", str(src), str(out),
            "--method", "scat1", "--J", "2", "--format", "wds", "--shard-size", str(shard_size),
            "--size", str(SIZE), "--quiet", *extra]


def _wait_for_commits(proc: subprocess.Popen, out: Path, n: int, freeze: bool = False) -> Path:
    """Wait until the job running in ``proc`` has committed ``n`` shards (or ended); returns the
    folder of its shard markers. ``freeze``: then SIGSTOP its process group, so that a slow test
    machine cannot let it finish before the test acts on it (SIGCONT resumes it; a signal sent
    meanwhile is delivered then)."""
    markers = out / "_store"  # the store's commit records
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if markers.exists() and len(list(markers.glob("shard-*.json"))) >= n:
            break
        time.sleep(0.005)
    if freeze and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGSTOP)
    return markers


def _reference_scattering(src_root: Path, meta: dict, J: int, order: int, keep_aspect=False):
    # the engine's decode: JPEGs ≥ 6× the frame come out of the decoder already reduced
    img, _ = decode_for_frame(src_root / meta["path"], SIZE, keep_aspect=keep_aspect)
    if keep_aspect:
        pixels, _, _ = resize_keep_aspect(img, SIZE)
    else:
        pixels, _ = resize_center_crop(img, SIZE)
    from scatstore import Scattering2D

    S = Scattering2D(J=J, shape=(SIZE, SIZE), L=8, max_order=order)
    x = torch.from_numpy(pixels[None].astype(np.float32) / 255.0)
    return S(x)[0].numpy()


@pytest.mark.parametrize("fmt", ["zarr", "wds", "h5"])
def test_scat1_every_store_matches_transform_of_decoded_image(imagenet_src, tmp_path, fmt):
    out = tmp_path / "out"
    m = _run(imagenet_src, out, method="scat1", J=2, format=fmt, dtype="float32")
    ds = open_dataset(out)
    assert len(ds) == m["count"] == 12
    assert m["rejected"] == 0
    assert m["sample_shape"] == [3, 17, SIZE // 4, SIZE // 4]
    for i in (0, 5, 11):
        x, y, meta = ds[i]
        ref = _reference_scattering(imagenet_src, meta, J=2, order=1)
        np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-6)
        assert y == m["class_names"].index(Path(meta["path"]).parent.name)
    assert verify(out).ok


def test_scat2_float16_and_raw(imagenet_src, tmp_path):
    out = tmp_path / "scat2"
    m = _run(imagenet_src, out, method="scat2", J=2, format="zarr")
    assert m["sample_shape"] == [3, 1 + 16 + 64, SIZE // 4, SIZE // 4]
    x, _, meta = open_dataset(out)[3]
    ref = _reference_scattering(imagenet_src, meta, J=2, order=2)
    np.testing.assert_allclose(x, ref.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-4)

    raw = tmp_path / "raw"
    m = _run(imagenet_src, raw, method="raw", format="wds")
    x, _, meta = open_dataset(raw)[2]
    pixels, _ = resize_center_crop(decode_for_frame(imagenet_src / meta["path"], SIZE)[0], SIZE)
    assert x.shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(x).astype(np.uint8), pixels)


def test_uint8_quantization_error_is_small(imagenet_src, tmp_path):
    out = tmp_path / "q"
    _run(imagenet_src, out, method="scat1", J=2, format="h5", dtype="uint8")
    ds = open_dataset(out)
    x, _, meta = ds[0]
    ref = _reference_scattering(imagenet_src, meta, J=2, order=1)
    rel_rms = np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref ** 2))
    assert rel_rms < 0.02


def test_coco_boxes_follow_the_resize(coco_src, tmp_path):
    out = tmp_path / "coco"
    m = _run(coco_src, out, method="scat1", J=2, format="zarr")
    assert m["source"]["layout"] == "coco"
    ds = open_dataset(out)
    ann = json.loads(next((coco_src / "annotations").glob("instances_*.json")).read_text())
    by_id = {im["id"]: im for im in ann["images"]}
    n_boxes = 0
    for i in range(len(ds)):
        x, y, meta = ds[i]
        assert y == -1
        im = by_id[meta["image_id"]]
        scale = SIZE / max(im["width"], im["height"])
        h, w = meta["hw"]
        assert max(h, w) == SIZE and abs(min(h, w) - round(min(im["width"], im["height"]) * scale)) <= 1
        src_boxes = [a["bbox"] for a in ann["annotations"] if a["image_id"] == im["id"]]
        for box in meta["boxes"]:
            # every stored box is a source box scaled by the resize factor
            assert any(np.allclose(box, np.asarray(b) * scale, atol=0.51) for b in src_boxes)
            n_boxes += 1
        ref = _reference_scattering(coco_src, meta, J=2, order=1, keep_aspect=True)
        np.testing.assert_allclose(x, ref.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-4)
    assert n_boxes > 0


def test_folder_layout_is_unlabeled(imagenet_src, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for p in sorted(imagenet_src.rglob("*.JPEG"))[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    m = _run(folder, out, method="raw", format="h5", layout="folder")
    assert m["count"] == 4 and m["class_names"] == []
    assert all(open_dataset(out)[i][1] == -1 for i in range(4))


def test_trap_files_are_rejected_with_reasons_and_the_job_goes_on(tmp_path):
    src = tmp_path / "traps"
    expected = make_trap_files(src)
    out = tmp_path / "out"
    said: list[str] = []
    m = encode(EncodeConfig(src=src, out=out, method="scat1", J=2, format="wds", layout="folder",
                            size=SIZE, shard_size=5, progress=False), log=said.append)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    bad = {n for n, outcome in expected.items() if outcome != "ok"}
    good = {n for n, outcome in expected.items() if outcome == "ok"}
    # this many rejections is worth a line of its own, not only a count in the summary
    assert said[-1] == (f"warning: {len(bad)} of {len(expected)} source files were rejected; "
                        f"their reasons are in {out / 'rejected.jsonl'}")
    assert {Path(r["path"]).name for r in rejected} == bad
    assert all(r["reason"] and r["code"] == expected[Path(r["path"]).name] for r in rejected)
    assert m["rejected"] == len(bad) and m["count"] == len(good)
    assert {Path(open_dataset(out)[i][2]["path"]).name for i in range(m["count"])} == good


def test_a_source_with_no_usable_image_is_an_error_after_the_commit(tmp_path):
    from click.testing import CliRunner

    from scatstore.cli.main import main

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.JPEG").write_bytes(b"\xff\xd8\xff\xe0 cut short")  # truncated JPEG
    (src / "a" / "y.jpg").write_text("not an image")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["encode", str(src), str(out), "--size", str(SIZE), "--quiet"])
    assert r.exit_code == 1 and f"no source file of {src} could be used" in r.output
    m = read_manifest(out)  # committed all the same: report and rejected.jsonl say why
    assert m["count"] == 0 and m["rejected"] == 2 and verify(out).ok


def test_report_ratios(imagenet_src, tmp_path):
    out = tmp_path / "r"
    _run(imagenet_src, out, method="scat1", J=3, format="zarr", size=64)
    r = report(out)
    assert r["coefficient_ratio"] == pytest.approx((1 + 8 * 3) / 4 ** 3)
    assert r["raw_bytes"] == 12 * 3 * 64 * 64
    assert r["bytes_ratio"] == pytest.approx(r["bytes_stored"] / r["raw_bytes"])
    assert r["bits_per_pixel"] == pytest.approx(8 * r["bytes_stored"] / (12 * 64 * 64))
    assert 0 < r["source_bytes_ratio"]


@pytest.mark.parametrize("fmt", ["zarr", "wds", "h5"])
def test_output_bytes_do_not_depend_on_worker_count(imagenet_src, tmp_path, fmt):
    one = tmp_path / "one"
    two = tmp_path / "two"
    _run(imagenet_src, one, method="scat1", J=2, format=fmt, workers=1)
    _run(imagenet_src, two, method="scat1", J=2, format=fmt, workers=2)
    assert _store_digest(one) == _store_digest(two)


def test_the_three_executors_give_identical_stores(imagenet_src, tmp_path):
    """In-process, the process pool and dask (thread workers), each picked from the executors'
    table: byte-identical stores, job bookkeeping aside, with augment variants across shard
    boundaries and a rejected file."""
    from scatstore.pipelines.encode import EXECUTORS
    from scatstore.pipelines.encode.executors import executor_for

    src = tmp_path / "src"
    shutil.copytree(imagenet_src, src)
    (sorted(p for p in src.iterdir() if p.is_dir())[0] / "broken.JPEG").write_bytes(b"\xff\xd8\xff")
    modes = {"in-process": {}, "processes": {"workers": 2},
             "dask": {"workers": 2, "scheduler": "local"}}
    assert set(modes) == set(EXECUTORS)
    digests = {}
    for name, kw in modes.items():
        out = tmp_path / name
        cfg = EncodeConfig(src=src, out=out, method="scat1", J=2, size=SIZE, shard_size=5,
                           augment=2, progress=False, **kw)
        assert executor_for(cfg) == name
        m = encode(cfg, log=lambda msg: None)
        assert m["count"] == 24 and m["rejected"] == 2
        digests[name] = _store_digest(out)
    assert digests["processes"] == digests["in-process"]
    assert digests["dask"] == digests["in-process"]


def test_a_job_dir_of_the_previous_version_resumes(imagenet_src, tmp_path):
    """Earlier versions committed each shard twice (a copy of the store's record in
    .scatstore/shards/, temporary names .NAME.tmp-PID): such a job dir resumes without redoing
    a shard, and their leftovers are removed."""
    out = tmp_path / "old"
    _run(imagenet_src, out, method="scat1", J=2, format="wds")
    clean = _store_digest(out)
    (out / "manifest.json").unlink()
    notes = sorted((out / ".scatstore" / "shards").glob("shard-*.json"))
    for p in notes:  # the old marker: {"record", "rejected", "quality"}
        record = json.loads((out / "_store" / p.name).read_text())
        p.write_text(json.dumps({"record": record, **json.loads(p.read_text())}, sort_keys=True))
    (out / ".scatstore" / "shards" / ".shard-000001.json.tmp-4242").write_text("{")
    (out / ".rejected.jsonl.tmp-4242").write_text("")
    lines = []
    m = encode(EncodeConfig(src=imagenet_src, out=out, method="scat1", J=2, format="wds",
                            size=SIZE, shard_size=5, progress=False), log=lines.append)
    assert f"resuming: {len(notes)}/{len(notes)} shards complete and verified, 0 to do" in lines
    assert m["count"] == 12 and _store_digest(out) == clean
    assert not list(out.rglob("*.tmp-4242"))


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_bytes(imagenet_src, tmp_path):
    one = tmp_path / "one"
    dask = tmp_path / "dask"
    _run(imagenet_src, one, method="scat1", J=2, format="zarr", workers=1)
    _run(imagenet_src, dask, method="scat1", J=2, format="zarr", workers=2, scheduler="local")
    assert _store_digest(one) == _store_digest(dask)


@pytest.mark.slow
def test_dask_cluster_of_processes_gives_the_same_bytes(imagenet_src, tmp_path):
    """A running cluster of worker processes (what `--scheduler ADDRESS` reaches), next to the
    thread workers of `--scheduler local`: same bytes."""
    from distributed import Client

    from scatstore.pipelines.encode import local_cluster

    threaded = tmp_path / "threads"
    _run(imagenet_src, threaded, method="scat1", J=2, format="h5", workers=2, scheduler="local")
    with local_cluster(2, processes=True) as cluster, Client(cluster):
        assert len(cluster.workers) == 2
        procs = tmp_path / "procs"
        _run(imagenet_src, procs, method="scat1", J=2, format="h5", workers=2,
             scheduler=cluster.scheduler_address)
    assert _store_digest(threaded) == _store_digest(procs)
    one = tmp_path / "one"
    _run(imagenet_src, one, method="scat1", J=2, format="h5", workers=1)
    assert _store_digest(one) == _store_digest(procs)


def test_sigkill_then_resume_is_identical_to_a_clean_run(imagenet_src, tmp_path):
    clean = tmp_path / "clean"
    _run(imagenet_src, clean, method="scat1", J=2, format="wds", shard_size=2)
    killed = tmp_path / "killed"
    cmd = _cli_encode(imagenet_src, killed, 2)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_commits(proc, killed, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the job finished before it could be killed"
    # A half-written shard must not survive: damage one completed shard as a crash might.
    victim = killed / "shard-000000.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _store_digest(killed) == _store_digest(clean)
    assert verify(killed).ok


@pytest.fixture(scope="module")
def longer_src(tmp_path_factory) -> Path:
    """Enough one-sample shards that a job is still running when interrupted."""
    return make_imagenet_layout(tmp_path_factory.mktemp("src") / "imagenet", n_per_class=12, seed=3)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("mode", [[], ["--workers", "2"], ["--workers", "2", "--scheduler", "local"]],
                         ids=["in-process", "process-pool", "dask-threads"])
def test_a_stop_signal_stops_cleanly_and_the_resume_is_identical(longer_src, tmp_path, mode, sig):
    clean = tmp_path / "clean"
    _run(longer_src, clean, method="scat1", J=2, format="wds", shard_size=1)
    out = tmp_path / "out"
    cmd = _cli_encode(longer_src, out, 1, *mode)
    # its own process group, signalled as a whole: what Ctrl-C in a terminal does, and a batch
    # scheduler's SIGTERM at its time limit (the pool's worker processes get it too)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    markers = _wait_for_commits(proc, out, 1, freeze=True)
    os.killpg(proc.pid, sig)
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert not (out / "manifest.json").exists(), "the job finished before it could be interrupted"
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "WARNING" not in err, err
    assert "re-run the same command to resume" in err
    committed = len(list(markers.glob("shard-*.json")))
    how = " (SIGTERM)" if sig == signal.SIGTERM else ""
    assert f"interrupted{how}: {committed}/36 shards committed" in err
    assert not any((out / ".scatstore" / "cancel").glob("*")), "the cancel file outlived the run"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _store_digest(out) == _store_digest(clean)
    assert verify(out).ok


def test_a_second_encode_into_a_busy_out_is_refused_and_a_killed_one_leaves_no_lock(longer_src,
                                                                                     tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(_cli_encode(longer_src, out, 1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_commits(first, out, 1, freeze=True)  # stopped, holding OUT
    with pytest.raises(EncodeError, match=rf"being written by another encode \(pid {first.pid} "):
        _run(longer_src, out, method="scat1", J=2, format="wds", shard_size=1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (out / "manifest.json").exists(), "the first job ended before the second started"
    m = _run(longer_src, out, method="scat1", J=2, format="wds", shard_size=1)  # resumes
    assert m["count"] == 36 and verify(out).ok


def test_a_cancelled_run_stops_its_shard_tasks(imagenet_src, tmp_path):
    """A shard task of an interrupted run stops at its next batch, before writing anything."""
    from scatstore.pipelines.encode import jobdir, shards
    from scatstore.sources import FrameSpec

    out = tmp_path / "out"
    _run(imagenet_src, out, method="raw", format="wds")  # a valid OUT for the task to write to
    cfg = EncodeConfig(src=imagenet_src, out=out, method="raw", format="wds", size=SIZE,
                       shard_size=5, batch_size=2, progress=False)
    from scatstore.sources import discover
    from scatstore.stores import StoreSpec
    from scatstore.transforms.methods import make_method

    index = discover(imagenet_src)
    method = make_method("raw")
    spec = StoreSpec(format="wds", n_slots=len(index.items), shard_size=5,
                     sample_shape=method.sample_shape(SIZE), dtype="uint8", quantized=False,
                     has_hw=False, compression="default")
    task = shards.make_tasks(cfg, method, index, spec, [1], 0, "r1", FrameSpec(SIZE), "float16")[0]
    shard = out / "shard-000001.tar"
    before = shard.read_bytes()
    shard.unlink()
    jobdir.cancel_run(out, "r1")
    with pytest.raises(shards.ShardCancelled, match="shard 1"):
        shards.encode_shard(task)
    assert not shard.exists()
    jobdir.clear_cancel(out, "r1")
    shards.encode_shard(task)  # the same task of a run not cancelled writes its shard
    assert shard.read_bytes() == before


@pytest.mark.parametrize("fmt", ["zarr", "wds", "h5"])
def test_a_full_disk_is_a_clear_error_and_the_resume_is_identical(imagenet_src, tmp_path, fmt):
    import resource

    clean = tmp_path / "clean"
    _run(imagenet_src, clean, method="scat1", J=2, format=fmt)
    out = tmp_path / "out"
    cmd = [*_cli_encode(imagenet_src, out, 5), "--format", fmt]  # the last --format counts

    def small_files():  # no file over 16 kB: a shard write fails as on a full disk (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "scatstore: error: cannot write" in proc.stderr and "File too large" in proc.stderr
    assert "re-run the same command to resume" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (out / "manifest.json").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _store_digest(out) == _store_digest(clean)
    assert verify(out).ok


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_any_work(imagenet_src, tmp_path):
    from click.testing import CliRunner

    from scatstore.cli.main import main

    out = tmp_path / "out"
    for device, why in (("cuda", "CUDA"), ("cuda:3", "CUDA"), ("gpu", "unknown device")):
        r = CliRunner().invoke(main, ["encode", str(imagenet_src), str(out), "--device", device,
                                      "--quiet"])
        assert r.exit_code == 2 and "Invalid value for '--device'" in r.output and why in r.output
        with pytest.raises(EncodeError, match=why):
            _run(imagenet_src, out, method="scat1", J=2, device=device)
    assert not out.exists(), "nothing may be written for a job that cannot run"


def test_fatal_errors_are_clear(imagenet_src, tmp_path):
    with pytest.raises(EncodeError, match="does not exist"):
        _run(tmp_path / "nope", tmp_path / "o1", method="raw")
    out = tmp_path / "o2"
    _run(imagenet_src, out, method="raw", format="h5")
    with pytest.raises(EncodeError, match="different job"):
        _run(imagenet_src, out, method="scat1", J=2, format="h5")
    foreign = tmp_path / "o3"
    foreign.mkdir()
    (foreign / "thesis.pdf").write_bytes(b"%PDF")
    with pytest.raises(EncodeError, match="not empty"):
        _run(imagenet_src, foreign, method="raw")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(EncodeError, match="not writable"):
            _run(imagenet_src, ro / "out", method="raw")


def test_cli_encode_report_verify(imagenet_src, tmp_path):
    out = tmp_path / "cli"
    base = [sys.executable, "-m", "scatstore.cli.main"]
    run = subprocess.run(base + ["encode", str(imagenet_src), str(out), "--method", "scat1", "--J", "2",
                                 "--size", str(SIZE), "--format", "zarr", "--shard-size", "5",
                                 "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "encoded 12 samples (0 rejected, 0 skipped)" in run.stderr
    rep = subprocess.run(base + ["report", str(out), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(rep.stdout)["count"] == 12
    assert subprocess.run(base + ["verify", str(out)], capture_output=True).returncode == 0
    manifest = read_manifest(out)
    shard_file = sorted(manifest["store"]["shards"][1]["files"])[0]
    path = out / shard_file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    bad = subprocess.run(base + ["verify", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and "shard 1" in bad.stderr
    missing = subprocess.run(base + ["encode", str(tmp_path / "missing"), str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# --------------------------------------------------------------------------------------------
# the in-process pipeline's machinery


def test_float16_is_the_transform_output_rounded_once(imagenet_src, tmp_path):
    # The engine asks the transform for float16 directly; it must equal the method's float32
    # output converted by numpy (round to nearest even), bit for bit.
    from scatstore.transforms.methods import make_method

    out = tmp_path / "f16"
    _run(imagenet_src, out, method="scat1", J=2, format="zarr", dtype="float16")
    ds = open_dataset(out)
    metas = [ds[i][2] for i in range(len(ds))]
    pixels = np.stack([resize_center_crop(decode_for_frame(imagenet_src / m["path"], SIZE)[0], SIZE)[0]
                       for m in metas])
    ref = make_method("scat1", J=2).encode(pixels).astype(np.float16)
    got = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))]).astype(np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), ref.view(np.uint16))


def test_large_jpeg_is_decoded_reduced_like_decode_for_frame(tmp_path):
    from PIL import Image

    from scatstore.sample_data import load_image

    src = tmp_path / "big"
    src.mkdir()
    Image.fromarray(load_image("retina")).save(src / "retina.jpg", quality=90)   # 1411²
    Image.fromarray(load_image("coffee")).save(src / "coffee.jpg", quality=90)   # 400 x 600
    out = tmp_path / "out"
    _run(src, out, method="raw", format="zarr", layout="folder", size=224)
    ds = open_dataset(out)
    for i in range(len(ds)):
        x, _, meta = ds[i]
        img, f = decode_for_frame(src / meta["path"], 224)
        assert f == (2 if "retina" in meta["path"] else 1)
        np.testing.assert_array_equal(np.asarray(x), resize_center_crop(img, 224)[0])


def test_decode_threads_leave_the_callers_torch_threads_alone(imagenet_src, tmp_path):
    # Regression: the decode threads' torch.set_num_threads(1) also set torch's process-wide
    # default, which a thread adopts when it first touches torch (lazily): the encode's main
    # thread then ran the transform on one core (1.1 cores busy instead of 2). Fresh interpreter.
    code = f"""
import torch
torch.set_num_threads(2)        # no torch op yet in this thread: its per-thread set-up is lazy
from scatstore.pipelines.encode import EncodeConfig, encode
from scatstore.pipelines.encode.prefetch import decode_pool
decode = decode_pool().submit(torch.get_num_threads).result()
main = torch.get_num_threads()  # first touch, after the decode threads exist
stats = {{}}
encode(EncodeConfig(src={str(imagenet_src)!r}, out={str(tmp_path / 'o')!r}, method='scat1', J=2,
                    size=64, shard_size=5, progress=False), log=lambda m: None, stats=stats)
print(decode, main, torch.get_num_threads(), stats['images'], sorted(stats))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    decode, main, main_after, images, keys = run.stdout.split(" ", 4)
    assert (decode, main, main_after) == ("1", "2", "2")
    assert int(images) == 12
    for k in ("elapsed_s", "ready_s", "steady_s", "decode_cpu_s", "encode_s", "write_s"):
        assert repr(k) in keys


def test_transform_error_stops_the_job_with_that_error(imagenet_src, tmp_path, monkeypatch):
    import scatstore.pipelines.encode.shards as engine

    calls = []
    real = engine.encode_batch

    def flaky(task, method, images):
        calls.append(task.index)
        if len(calls) == 3:
            raise RuntimeError("transform exploded")
        return real(task, method, images)

    monkeypatch.setattr(engine, "encode_batch", flaky)
    out = tmp_path / "boom"
    with pytest.raises(RuntimeError, match="transform exploded"):
        _run(imagenet_src, out, method="scat1", J=2, format="zarr", shard_size=2, batch_size=1)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(engine, "encode_batch", real)
    m = _run(imagenet_src, out, method="scat1", J=2, format="zarr", shard_size=2, batch_size=1)
    assert m["count"] == 12 and verify(out).ok


def test_bytes_do_not_depend_on_transform_threads(imagenet_src, tmp_path):
    # In-process, batches go to as many transform threads as torch has threads, and the job's
    # last batches run on all of them: none of that may change a byte.
    outs = {}
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs[n] = tmp_path / f"t{n}"
            _run(imagenet_src, outs[n], method="scat1", J=2, format="h5", shard_size=3, batch_size=2)
    finally:
        torch.set_num_threads(before)
    assert _store_digest(outs[1]) == _store_digest(outs[2]) == _store_digest(outs[3])


def test_augment_variants_across_shard_boundaries(imagenet_src, tmp_path):
    # 3 variants per image, shards of 4 slots: an image's variants straddle shards, each shard
    # decodes it once for the variants it holds
    from scatstore.sources import random_resized_crop, variant_rng

    one, two = tmp_path / "one", tmp_path / "two"
    m = _run(imagenet_src, one, method="raw", format="zarr", augment=3, shard_size=4, seed=5)
    _run(imagenet_src, two, method="raw", format="zarr", augment=3, shard_size=4, seed=5, workers=2)
    assert m["count"] == 36 and _store_digest(one) == _store_digest(two)
    ds = open_dataset(one)
    for i in (0, 4, 5, 35):                          # slot 4 and 5: variants 1, 2 of image 1
        x, _, meta = ds[i]
        img = decode_for_frame(imagenet_src / meta["path"], SIZE, reducing_gap=None)[0]
        key = meta["source_key"]
        ref, _ = random_resized_crop(img, SIZE, variant_rng(5, key, meta["variant"]))
        np.testing.assert_array_equal(np.asarray(x), ref)
        assert meta["variant"] == i % 3
