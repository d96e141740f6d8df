"""scatstore._cbuild: building a C source into a cached library, typed loading, CPU features."""
from __future__ import annotations

import ctypes
import os
import platform

import numpy as np
import pytest
from skimage import data

from scatstore import _cbuild

_SRC = r"""
#include <stdint.h>
double cb_sum(const float *x, int64_t n) {
    double s = 0; for (int64_t i = 0; i < n; i++) s += x[i]; return s; }
void cb_scale(float *x, int64_t n, float a) { for (int64_t i = 0; i < n; i++) x[i] *= a; }
"""

needs_cc = pytest.mark.skipif(_cbuild.find_compiler() is None, reason="no C compiler")


def _lib(tmp_path, monkeypatch, flags=("-O2",)):
    monkeypatch.setenv("SCATSTORE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "k.c"
    src.write_text(_SRC)
    sig = {"cb_sum": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_double),
           "cb_scale": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]}
    return _cbuild.NativeLibrary(src, name="cbtest", flags=list(flags), signatures=sig)


@needs_cc
def test_build_load_and_call_with_typed_signatures(tmp_path, monkeypatch):
    nl = _lib(tmp_path, monkeypatch, flags=["-O2", *_cbuild.march_flags()])
    lib = nl.load()
    assert lib is not None, nl.info()["reason"]
    x = np.ascontiguousarray(data.camera()[:64, :64].astype(np.float32).ravel())
    assert lib.cb_sum(x.ctypes.data, x.size) == pytest.approx(float(x.astype(np.float64).sum()))
    lib.cb_scale(x.ctypes.data, x.size, 0.5)
    assert float(x[0]) == data.camera()[0, 0] / 2
    info = nl.info()
    assert info["available"] and info["reason"] == "loaded"
    assert info["path"].startswith(str(tmp_path / "cache" / "kernels"))
    # the same inputs reuse the cached library; other flags build another one
    assert _lib(tmp_path, monkeypatch, flags=["-O2", *_cbuild.march_flags()]).info()["path"] \
        == info["path"]
    assert _lib(tmp_path, monkeypatch, flags=["-O1"]).info()["path"] != info["path"]


def test_disabled_and_missing_compiler_give_reasons(tmp_path, monkeypatch):
    nl = _lib(tmp_path, monkeypatch)
    monkeypatch.setenv("SCATSTORE_NATIVE", "0")
    assert nl.load() is None and "SCATSTORE_NATIVE=0" in nl.info()["reason"]
    nl.reset()
    monkeypatch.delenv("SCATSTORE_NATIVE")
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert nl.load() is None and "no C compiler" in nl.info()["reason"]


@needs_cc
def test_broken_source_warns_and_reports(tmp_path, monkeypatch):
    nl = _lib(tmp_path, monkeypatch)
    nl.source.write_text("this is not C")
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert nl.load() is None
    assert nl.info()["reason"].startswith("build failed")


def test_isa_levels_follow_the_cpu_flags(monkeypatch):
    levels = _cbuild.isa_levels()
    assert levels[-1] == "generic" and _cbuild.isa_level() == levels[0]
    flags = _cbuild.cpu_features()
    if platform.machine() == "x86_64":
        assert ("x86-64-v3" in levels) == all(f in flags for f in ("avx2", "fma", "f16c"))
        assert ("x86-64-v4" in levels) == ("avx512f" in flags and "avx512bw" in flags)
    # a lower level can be forced, a higher one never
    low = levels[-1]
    monkeypatch.setenv("SCATSTORE_ISA", low)
    assert _cbuild.isa_level() == low and "SCATSTORE_ISA" in _cbuild.isa_level_reason()
    monkeypatch.setenv("SCATSTORE_ISA", "aarch64-sve" if platform.machine() == "x86_64"
                       else "x86-64-v4")
    with pytest.warns(RuntimeWarning, match="not supported"):
        assert _cbuild.isa_level() == levels[0]


def test_feature_parsing_from_cpuinfo_text(monkeypatch):
    _cbuild.cpu_features.cache_clear()
    monkeypatch.setattr(_cbuild, "_cpuinfo_text",
                        lambda: "processor\t: 0\nflags\t\t: fpu sse4_2 AVX2 fma f16c bmi1 bmi2 "
                                "movbe avx popcnt ssse3 sse4_1 cx16\n")
    monkeypatch.setattr(_cbuild, "_machine", lambda: "x86_64")
    try:
        assert _cbuild.has_features("avx2", "fma")
        assert _cbuild.isa_levels() == ["x86-64-v3", "x86-64-v2", "generic"]
        monkeypatch.setattr(_cbuild, "_cpuinfo_text", lambda: "Features\t: fp asimd sve\n")
        monkeypatch.setattr(_cbuild, "_machine", lambda: "aarch64")
        _cbuild.cpu_features.cache_clear()
        assert _cbuild.isa_levels() == ["aarch64-sve", "aarch64-neon", "generic"]
    finally:
        _cbuild.cpu_features.cache_clear()
    assert os.environ.get("SCATSTORE_ISA") is None
