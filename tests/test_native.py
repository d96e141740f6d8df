"""The C kernels per ISA level: built for every level this CPU runs, each checked against the
pure-torch transform; the per-primitive kernel table and native_info()."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from scatstore import _cbuild
from scatstore.sample_data import load_image
from scatstore.transforms import _native
from scatstore.transforms._torch_backend import TorchPlan, run_cpu
from scatstore.transforms.geometry import Geometry

needs_cc = pytest.mark.skipif(_cbuild.find_compiler() is None, reason="no C compiler")


def _photo(H, W):
    img = load_image("chelsea")  # 300 x 451 RGB photograph
    return torch.from_numpy(np.ascontiguousarray(img[:H, :W].transpose(2, 0, 1))
                            .astype(np.float32) / 255)


def _run(plan, x, theta_block=3, group=2):
    g = plan.geo
    out = torch.empty(x.shape[0], g.K, g.Mo, g.No)
    run_cpu(plan, x, out, 1, theta_block, group)
    return out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@needs_cc
@pytest.mark.parametrize("prims", [
    ("fft",), ("prod_periodize",), ("modulus",), ("lowpass",),
    ("prod_periodize", "modulus"), ("fft", "prod_periodize", "modulus", "lowpass")])
def test_any_mix_of_c_and_torch_primitives_agrees_with_pure_torch(prims):
    geo = Geometry(104, 130, 3, 6, 2)  # padded 120 x 144: sizes the own FFT handles
    x = _photo(104, 130)
    ref = _run(TorchPlan(geo, torch.device("cpu"), torch.float32, use_native=False), x)
    kernels = {p: ("native" if p in prims else "torch") for p in _native.PRIMITIVES}
    plan = TorchPlan(geo, torch.device("cpu"), torch.float32, kernels=kernels)
    if plan.native is None:
        pytest.skip("C kernels unavailable")
    assert plan.kernels == kernels
    assert _rel(_run(plan, x), ref) <= 1e-5


_PROBE = """
import json, numpy as np, torch
from skimage import data
from scatstore import Scattering2D
from scatstore.transforms._native import native_info
img = data.chelsea()[:96, :120].transpose(2, 0, 1).astype(np.float32) / 255
x = torch.from_numpy(np.ascontiguousarray(img))[None]
y = Scattering2D(3, (96, 120), L=6, max_order=2)(x)
print(json.dumps({"info": native_info(), "y": y.flatten().tolist()}))
"""


def _probe(env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_cc
def test_every_level_this_cpu_runs_builds_and_agrees(tmp_path):
    """Each ISA level (vector width and tiles of that target) gives the pure-torch result, and
    the same bytes on every run of the same level."""
    ref = np.array(_probe({"SCATSTORE_NATIVE": "0"})["y"])
    for level in _cbuild.isa_levels():
        res = _probe({"SCATSTORE_ISA": level, "SCATSTORE_CACHE": str(tmp_path)})
        info = res["info"]
        assert info["available"] and info["isa"] == level, info
        assert f"-march={level}" in " ".join(info["flags"]) or level == "generic"
        bits = {"x86-64-v4": 512, "x86-64-v3": 256}.get(level, 128)
        assert info["vector_bits"] == bits
        assert set(info["kernels"]) == set(_native.PRIMITIVES)
        assert all(w.startswith(level) for w in info["why"].values())
        y = np.array(res["y"])
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), level
        if level == _cbuild.isa_levels()[0]:  # deterministic: same machine, same bytes
            again = _probe({"SCATSTORE_ISA": level, "SCATSTORE_CACHE": str(tmp_path)})["y"]
            assert np.array_equal(np.array(again), y)


def test_kernel_table_covers_every_level_and_primitive():
    levels = {lv for lvls in _cbuild._ARCH_LEVELS.values() for lv in lvls}
    assert levels <= set(_native.KERNEL_TABLE)
    for row in _native.KERNEL_TABLE.values():
        assert set(row) == set(_native.PRIMITIVES)
        assert all(k in ("native", "torch") and why for k, why in row.values())


def test_own_fft_only_where_the_grid_sizes_fit():
    geo = Geometry(7 * 20 - 16, 64, 2, 4, 1)  # padded height 7·20: a factor 7
    assert not _native.own_fft_fits(geo)
    kernels, why = _native.select_kernels(geo)
    assert kernels["fft"] == "torch"
    table = _native.KERNEL_TABLE[_cbuild.isa_level()]["fft"][0]
    if _native.load() is not None and table == "native":
        assert "2^a 3^b 5^c" in why["fft"]
    assert _native.own_fft_fits(Geometry(224, 224, 3, 8, 1))
