"""`scatstore demo` (pipelines/demo.py) end to end on the sample data of scikit-image."""
from __future__ import annotations

import pytest


def test_demo_reports_every_store_and_the_tc_job(tmp_path):
    from scatstore.pipelines.demo import run_demo

    lines: list = []
    reports = run_demo(tmp_path / "demo", n_per_class=12, progress=False, echo=lines.append)
    assert set(reports) == {"imagenet-scat1-J3", "imagenet-raw", "imagenet-scat1-J3-uint8-wds",
                            "imagenet-scat1-J3-tc", "coco-scat1-J3"}
    tc, f16 = reports["imagenet-scat1-J3-tc"], reports["imagenet-scat1-J3"]
    assert tc["dtype"] == "tc" and tc["coefficient_codec"]["quality"] == 50.0  # the default
    assert tc["sample_shape"] == f16["sample_shape"] and tc["count"] == f16["count"] == 36
    # bytes per sample against the source files and a q90 JPEG of the stored frame, every file
    # counted: smaller than both, and than the float16 store
    assert tc["ratio_vs_jpeg_q90"] == pytest.approx(tc["bytes_per_sample"] / tc["jpeg_q90_bytes_per_sample"])
    assert tc["ratio_vs_jpeg_q90"] < 1 and tc["source_bytes_ratio"] < 1
    assert tc["bytes_per_sample"] < f16["bytes_per_sample"] / 2
    text = "\n".join(lines)
    assert "--J 3 --dtype tc" in text and "coefficient codec" in text
    summary = text[text.index("== summary"):].splitlines()[1:]
    row = next(s for s in summary if s.startswith("imagenet-scat1-J3-tc "))
    assert f"vs q90 JPEG {tc['ratio_vs_jpeg_q90']:.3f}×" in row
    assert f"vs source {tc['source_bytes_ratio']:.3f}×" in row
    assert len(summary) == len(reports)
