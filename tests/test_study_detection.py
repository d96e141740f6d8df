"""`scatstore study --detection COCO_SRC`: the detection rows in study.json and study.md (a tiny
run on the demo COCO layout), their bytes against the files, and the one-line error of a
non-COCO --detection folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

TINY = {"width": 16, "layers": (1, 1, 1), "fpn_channels": 64, "proposals": 100}


@pytest.fixture(scope="module")
def det_study(tmp_path_factory):
    """A one-representation study of 5 classes at 32² with a detection part: 4 demo COCO
    images on 64-px canvases, 1 epoch each, scored on the training images (no held-out set)."""
    from scatstore.pipelines.study import StudyConfig, run_study
    from scatstore.sources.demo_data import make_coco_layout, make_small_classes

    root = tmp_path_factory.mktemp("detstudy")
    src, val = make_small_classes(root / "src", n_train=2, n_val=2, size_range=(40, 60), seed=0)
    coco = make_coco_layout(root / "coco", n_images=4, seed=0)
    cfg = StudyConfig(src=src, out=root / "out", val=val, methods=["scat1-J3-float16"], size=32,
                      batch_size=4, num_workers=1, loader_seconds=0.05, loader_repeats=1,
                      recon_images=0, progress=False, detection=coco, detection_epochs=1,
                      detection_size=64, detection_options=TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))  # the machine's two cores at most
    try:
        return cfg, coco, run_study(cfg, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


def test_detection_rows_in_json_and_markdown(det_study):
    from scatstore.pipelines.study_detection import DETECTION_ROW_KEYS

    cfg, coco, result = det_study
    on_disk = json.loads((cfg.out / "study.json").read_text())
    det = on_disk["detection"]
    assert det == json.loads(json.dumps(result["detection"]))
    assert det["split"] == "train" and det["val"] is None and det["size"] == 64
    rows = det["rows"]
    assert [r["name"] for r in rows] == ["scat1-J3", "pixels"]
    assert [r["arch"] for r in rows] == ["fasterrcnn_scatresnet50", "fasterrcnn_resnet18"]
    for r in rows:
        assert set(DETECTION_ROW_KEYS) <= set(r), set(DETECTION_ROW_KEYS) - set(r)
        assert r["count"] == 4 and r["epochs"] == 1 and r["split"] == "train"
        for k in ("ap", "ap50", "ap75"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        for k in ("bytes_per_image", "ratio_vs_source", "samples_per_s", "data_wait_frac",
                  "train_cpu_s", "train_s", "build_s"):
            assert math.isfinite(r[k]) and r[k] >= 0, (k, r[k])
        assert r["samples_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1 and r["train_cpu_s"] > 0
    doc = (Path(__file__).parents[1] / "docs" / "study.md").read_text()
    assert all(f"`{k}`" in doc for k in DETECTION_ROW_KEYS)  # every key documented
    md = (cfg.out / "study.md").read_text()
    assert "Detection (" in md and "AP scored on the training images" in md
    assert "| scat1 J=3 float16 (stored) | fasterrcnn_scatresnet50 |" in md
    assert "fasterrcnn_resnet18" in md


def test_detection_bytes_match_the_files(det_study):
    cfg, coco, result = det_study
    scat, pixels = result["detection"]["rows"]
    store = cfg.out / "detection" / "scat1-J3" / "train"
    assert scat["path"] == str(store)
    # every file of the store but the encode job's resume markers (scatstore report's count)
    on_disk = sum(f.stat().st_size for f in store.rglob("*")
                  if f.is_file() and ".scatstore" not in f.relative_to(store).parts)
    assert scat["bytes_per_image"] * scat["count"] == pytest.approx(on_disk)
    jpegs = [f for f in (coco / "images").iterdir() if f.suffix == ".jpg"]
    assert pixels["bytes_per_image"] == pytest.approx(sum(f.stat().st_size for f in jpegs) / len(jpegs))
    assert pixels["ratio_vs_source"] == pytest.approx(1.0)
    assert scat["ratio_vs_source"] == pytest.approx(scat["bytes_per_image"] / pixels["bytes_per_image"])


def test_detection_of_a_non_coco_folder_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from scatstore.cli.main import main
    from scatstore.sources.demo_data import make_imagenet_layout

    src = make_imagenet_layout(tmp_path / "src", n_per_class=1, seed=0)
    r = CliRunner().invoke(main, ["study", str(src), str(tmp_path / "out"), "--detection", str(src)])
    assert r.exit_code == 2, r.output
    assert f"--detection {src} is not a COCO source" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_detection_scored_on_a_held_out_coco_source(tmp_path):
    from scatstore.pipelines.study import run_detection_rows
    from scatstore.sources.demo_data import make_coco_layout

    coco = make_coco_layout(tmp_path / "coco", n_images=2, seed=0)
    held = make_coco_layout(tmp_path / "held", n_images=2, seed=1)
    det = run_detection_rows(coco, tmp_path / "out", val=held, size=48, epochs=1, **TINY)
    assert det["split"] == "val" and det["val"] == str(held.resolve())
    assert (tmp_path / "out" / "scat1-J3" / "val" / "manifest.json").exists()
    for r in det["rows"]:
        assert r["split"] == "val" and r["count"] == 2 and 0.0 <= r["ap50"] <= 1.0
