"""`scatstore study`: the JSON's documented keys with sane values, the table, the figures, reuse of
stores, the linear probe, and scattering inversion of a real photograph."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scatstore.evaluation.probe import LinearProbe, fit_and_score, holdout_split, pooled_features
from scatstore.evaluation.reconstruct import PSNR_FLOOR_J1, invert_scattering, psnr_db


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One study over every default representation at 64²: 5 classes (three textures, faces,
    photographs), 6 training and 4 held-out images each (--val)."""
    from scatstore.pipelines.study import StudyConfig, run_study
    from scatstore.sources.demo_data import make_small_classes

    root = tmp_path_factory.mktemp("study")
    src, val = make_small_classes(root / "src", n_train=6, n_val=4, size_range=(72, 120), seed=0)
    cfg = StudyConfig(src=src, out=root / "out", val=val, size=64, batch_size=8, num_workers=1,
                      loader_seconds=0.1, loader_repeats=1, recon_images=2, recon_steps=4,
                      progress=False)
    result = run_study(cfg, log=lambda m: None)
    return cfg, result


def test_study_json_has_every_documented_key(study):
    from scatstore.pipelines.study import REPRESENTATIONS, ROW_KEYS, STUDY_FORMAT, STUDY_KEYS

    cfg, result = study
    on_disk = json.loads((cfg.out / "study.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert set(STUDY_KEYS) <= set(on_disk) and on_disk["format"] == STUDY_FORMAT
    rows = on_disk["representations"]
    assert [r["name"] for r in rows] == list(REPRESENTATIONS)  # every default, registry order
    for r in rows:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
    d = on_disk["dataset"]
    assert (d["n_train"], d["n_val"]) == (30, 20) and d["split"] == "val"
    assert d["classes"] == ["brick", "face", "grass", "gravel", "photo"]
    assert on_disk["machine"]["cpu"] and on_disk["machine"]["cores"] >= 1


def test_study_values_are_sane(study):
    _, result = study
    rows = {r["name"]: r for r in result["representations"]}
    raw_px = 3 * 64 * 64
    for r in rows.values():
        assert r["count"] == 30
        assert r["bytes_per_sample"] > 0
        assert r["ratio_vs_raw"] == pytest.approx(r["bytes_per_sample"] / raw_px)
        assert r["loader_samples_per_s"] > 0 and r["loader_cpu_ms_per_sample"] > 0
        # one epoch reads every sample at least once, and no more than a chunk per sample
        # (tc: bytes_per_sample includes the codec record of the manifest, read once per store)
        low = 0.0 if r["options"].get("dtype") == "tc" else 0.3
        assert 0 < r["bytes_read_per_epoch"] and \
            low * r["bytes_per_sample"] * 30 <= r["bytes_read_per_epoch"] <= 20 * r["bytes_per_sample"] * 30
        assert r["model_macs"] > 0 and len(r["model_input_shape"]) == 3
        assert 0 <= r["probe_top1"] <= 1 and r["probe_s"] >= 0
        assert r["train_top1"] is None  # no --train
    # bytes ordered as the representations imply
    for q_lo, q_hi in (("50", "75"), ("75", "90")):
        assert rows[f"jpeg-q{q_lo}"]["bytes_per_sample"] < rows[f"jpeg-q{q_hi}"]["bytes_per_sample"]
    for J in (2, 3, 4):
        assert rows[f"scat1-J{J}-uint8"]["bytes_per_sample"] < rows[f"scat1-J{J}-float16"]["bytes_per_sample"]
    for dt in ("float16", "uint8"):
        b = [rows[f"scat1-J{J}-{dt}"]["bytes_per_sample"] for J in (2, 3, 4)]
        assert b[0] > b[1] > b[2]
    assert rows["scat2-J3-float16"]["bytes_per_sample"] > rows["scat1-J3-float16"]["bytes_per_sample"]
    # transform-coded rows: fewer bytes at lower quality, the float16 rows' model input (at 30
    # images the codec record in the manifest, 45-77 kB, is a large share of every sample)
    for J in (3, 4):
        tc = [rows[f"scat1-J{J}-tc-q{q}"] for q in (40, 50, 60)]
        assert tc[0]["bytes_per_sample"] < tc[1]["bytes_per_sample"] < tc[2]["bytes_per_sample"]
        assert tc[1]["model_input_shape"] == rows[f"scat1-J{J}-float16"]["model_input_shape"]
    # per sample without the codec record (once per store: at 64² and 30 images it is ~1.5 kB
    # of every sample), the coded coefficients are smaller than float16 even at quality 60
    q60 = rows["scat1-J3-tc-q60"]
    rec = len(json.dumps(json.loads((Path(q60["path"]) / "manifest.json").read_text())
                         ["coefficient_codec"]))
    assert q60["bytes_per_sample"] - rec / q60["count"] < rows["scat1-J3-float16"]["bytes_per_sample"]
    for r in rows.values():
        assert r["ratio_vs_jpeg_q90"] == pytest.approx(
            r["bytes_per_sample"] / rows["jpeg-q90"]["bytes_per_sample"])
    assert rows["jpeg-q90"]["bytes_per_sample"] < rows["raw"]["bytes_per_sample"]
    # model inputs and their cost follow J: (3·(1+8J), 64/2^J, 64/2^J), fewer MACs as J grows
    for J in (2, 3, 4):
        assert rows[f"scat1-J{J}-float16"]["model_input_shape"] == [3 * (1 + 8 * J), 64 >> J, 64 >> J]
    macs = [rows[f"scat1-J{J}-float16"]["model_macs"] for J in (2, 3, 4)]
    assert macs[0] > macs[1] > macs[2]
    assert rows["raw"]["model_input_shape"] == [3, 64, 64] and rows["raw"]["model"] == "resnet18"
    # five separable classes: every representation's probe is well above chance (1/5)
    assert all(r["probe_top1"] >= 0.6 for r in rows.values()), {n: r["probe_top1"] for n, r in rows.items()}


def test_study_table_and_figures(study):
    from scatstore.pipelines.study_figures import ACCURACY_SIZE_IN, FIG_DPI, LOADER_SIZE_IN

    cfg, result = study
    md = (cfg.out / "study.md").read_text()
    for r in result["representations"]:
        assert f"| {r['label']} |" in md
    assert result["machine"]["cpu"] in md
    sizes = {"accuracy": ACCURACY_SIZE_IN, "loader": LOADER_SIZE_IN}
    for key, name in result["figures"].items():
        with Image.open(cfg.out / name) as im:
            im.load()
            assert im.format == "PNG"
            if key in sizes:
                assert im.size == (round(sizes[key][0] * FIG_DPI), round(sizes[key][1] * FIG_DPI))
            else:  # the sheet: a cell per column and image
                cols = 1 + len(result["reconstruction"][0]["psnr_db"])
                assert im.size[0] == pytest.approx(1.9 * cols * FIG_DPI, abs=2)
            assert np.asarray(im).std() > 5  # something is drawn
    rec = result["reconstruction"]
    assert len(rec) == 2 and rec[0]["image"].startswith("brick") and rec[1]["image"].startswith("face")
    assert {"scat1 J=1", "scat1 J=4", "JPEG q50", "JPEG q90"} <= set(rec[0]["psnr_db"])
    for r in rec:  # JPEG keeps more at higher quality; J=1 keeps more than J=4
        assert r["psnr_db"]["JPEG q90"] > r["psnr_db"]["JPEG q50"]
        assert r["psnr_db"]["scat1 J=1"] > r["psnr_db"]["scat1 J=4"]


def test_study_reuses_its_stores(study):
    from scatstore.pipelines.study import StudyConfig, run_study

    cfg, result = study
    # the same training stores, scored this time on a held-out split of SRC (no --val)
    again = StudyConfig(src=cfg.src, out=cfg.out, methods=["scat1-J3-float16", "jpeg-q75"], size=64,
                        batch_size=8, num_workers=1, loader_seconds=0.1, loader_repeats=1,
                        recon_images=0, progress=False)
    logs: list[str] = []
    r2 = run_study(again, log=logs.append)
    first = {r["name"]: r for r in result["representations"]}
    assert [r["name"] for r in r2["representations"]] == ["jpeg-q75", "scat1-J3-float16"]
    for r in r2["representations"]:
        assert r["bytes_per_sample"] == first[r["name"]]["bytes_per_sample"]
        assert r["probe_top1"] > 0.4
    assert r2["dataset"]["split"].startswith("holdout") and r2["dataset"]["n_val"] == 10
    assert not any(m.startswith("wrote") for m in logs)  # the JPEG folder was not rewritten
    assert any(m.startswith("resuming: 1/1 shards") for m in logs), logs  # the store was kept


@pytest.mark.slow
def test_study_trains_and_fits_codecs(tmp_path):
    """--fit-codec adds the cae operating points --methods selects; --train trains each row's
    model through its loader and scores it on VAL; --budget stops after the epoch that crosses it."""
    from scatstore.pipelines.study import StudyConfig, run_study
    from scatstore.sources.demo_data import make_small_classes

    src, val = make_small_classes(tmp_path / "src", n_train=3, n_val=2, size_range=(72, 96), seed=1)
    cfg = StudyConfig(src=src, out=tmp_path / "out", val=val, methods=["jpeg-q50", "cae-C8"],
                      fit_codec=True, codec_steps=3, size=64, batch_size=8, num_workers=1,
                      loader_seconds=0.1, loader_repeats=1, train_archs=["auto"], epochs=3,
                      train_batch_size=5, budget_s=1e-3, recon_images=1, recon_steps=2,
                      progress=False)
    result = run_study(cfg, log=lambda m: None)
    rows = {r["name"]: r for r in result["representations"]}
    assert list(rows) == ["jpeg-q50", "cae-C8"]
    assert rows["cae-C8"]["model_input_shape"] == [8, 8, 8]  # C=8 latents of a 64² frame
    for r in rows.values():
        assert r["train_epochs"] == 1 and 0 <= r["train_top1"] <= 1 and r["train_s"] > 0
    assert rows["cae-C8"]["model"] == "cresnet51" and rows["jpeg-q50"]["model"] == "resnet18"
    assert {"cae-C8", "JPEG q50"} <= set(result["reconstruction"][0]["psnr_db"])
    assert "trained top-1 %" in (cfg.out / "study.md").read_text()
    assert [p.name for p in (cfg.out / "codecs").iterdir()] == ["cae-C8.codec"]


def test_study_cli_errors(tmp_path):
    from click.testing import CliRunner

    from scatstore.cli.main import main
    from scatstore.sources.demo_data import make_imagenet_layout

    src = make_imagenet_layout(tmp_path / "src", n_per_class=2, seed=0)
    r = CliRunner().invoke(main, ["study", str(src), str(tmp_path / "out"), "--train", "auto"])
    assert r.exit_code == 2 and "--train needs --val" in r.output
    r = CliRunner().invoke(main, ["study", str(src), str(tmp_path / "out"), "--methods", "nope-*"])
    assert r.exit_code == 2 and "no representation matches nope-*" in r.output
    r = CliRunner().invoke(main, ["study", str(src), str(src / "study")])
    assert r.exit_code == 2 and "inside SRC" in r.output
    r = CliRunner().invoke(main, ["study", str(src), str(tmp_path / "out"), "--val", str(src)])
    assert r.exit_code == 2 and "--val is SRC" in r.output
    r = CliRunner().invoke(main, ["study", "--list"])
    assert r.exit_code == 0 and "scat1-J3-float16" in r.output and "jpeg-q90" in r.output


def test_registry_one_line_per_representation():
    from scatstore.pipelines.study import REPRESENTATIONS, Representation, select

    assert {r.kind for r in REPRESENTATIONS.values()} == {"pixels", "scattering"}
    assert [r.name for r in select(["scat1-J3-*"])] == [
        "scat1-J3-float16", "scat1-J3-uint8", "scat1-J3-tc-q40", "scat1-J3-tc-q50", "scat1-J3-tc-q60"]
    with pytest.raises(ValueError):
        Representation("x", "voxels", "x", "x")


def test_pareto_front():
    from scatstore.pipelines.study_figures import pareto_front

    pts = [(10, 0.9), (5, 0.8), (20, 0.85), (40, 0.95), (5, 0.7)]
    assert pareto_front(pts) == [1, 0, 3]


# ----------------------------------------------------------------------------- probe


def test_probe_separates_textures(textures):
    """Pooled log-scattering of crops of three real textures: a linear probe tells them apart on
    crops from rows it has not seen (top 70 % of each texture for fitting, bottom 30 % held out)."""
    from scatstore.transforms.scattering import Scattering2D

    rng = np.random.default_rng(0)
    S = Scattering2D(J=3, shape=(64, 64), L=8, max_order=1)
    z_tr, y_tr, z_va, y_va = [], [], [], []
    for c, name in enumerate(("brick", "grass", "gravel")):
        img = textures[name].astype(np.float32) / 255
        cut = int(img.shape[0] * 0.7)
        for rows, zs, ys, n in (((0, cut), z_tr, y_tr, 20), ((cut, img.shape[0]), z_va, y_va, 10)):
            for _ in range(n):
                i = int(rng.integers(rows[0], rows[1] - 64))
                j = int(rng.integers(0, img.shape[1] - 64))
                zs.append(torch.from_numpy(img[i:i + 64, j:j + 64].copy()))
                ys.append(c)
    f_tr = pooled_features(S(torch.stack(z_tr)[:, None]), "scattering")
    f_va = pooled_features(S(torch.stack(z_va)[:, None]), "scattering")
    assert f_tr.shape == (60, 25)
    r = fit_and_score(f_tr, torch.tensor(y_tr), f_va, torch.tensor(y_va))
    assert r.train_top1 == 1.0 and r.val_top1 >= 0.8, r


def test_probe_checks_its_input():
    with pytest.raises(ValueError):
        LinearProbe(l2=-1)
    with pytest.raises(ValueError):
        LinearProbe().fit(torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError):
        pooled_features(torch.zeros(2, 3), "scattering")
    with pytest.raises(ValueError):
        pooled_features(torch.zeros(2, 3, 4, 4), "voxels")
    with pytest.raises(RuntimeError):
        LinearProbe().predict(torch.zeros(2, 2))


def test_holdout_split_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), [8, 4, 2, 1])
    tr, held = holdout_split(labels, 0.25, seed=0)
    assert np.array_equal(tr, holdout_split(labels, 0.25, seed=0)[0])
    assert set(tr) | set(held) == set(range(len(labels))) and not set(tr) & set(held)
    assert [int((labels[held] == c).sum()) for c in range(4)] == [2, 1, 1, 0]
    assert [int((labels[tr] == c).sum()) for c in range(4)] == [6, 3, 1, 1]


# ----------------------------------------------------------------------------- reconstruction


def test_scat1_j1_reconstruction_of_a_photo(astronaut):
    """Gradient descent on ‖S(x̃) − S(x)‖² recovers a real photograph from its order-1 J=1
    coefficients above the documented floor, and well above where it starts (the low-pass)."""
    from scatstore.sources import resize_center_crop

    img, _ = resize_center_crop(astronaut, 96)
    x = torch.from_numpy(np.ascontiguousarray(img)).float()[None] / 255
    xr, losses = invert_scattering(x, J=1, steps=40)
    start, _ = invert_scattering(x, J=1, steps=0)
    assert xr.shape == x.shape and float(xr.min()) >= 0 and float(xr.max()) <= 1
    p, p0 = psnr_db(xr, x), psnr_db(start, x)
    assert p > PSNR_FLOOR_J1 and p > p0 + 3, (p, p0)
    assert losses[-1] < 0.1 * losses[0]
