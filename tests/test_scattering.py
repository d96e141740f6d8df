"""Scattering2D against kymatio 0.3 on real images, plus API, errors, chunking and caching."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import scatstore
from scatstore.sample_data import load_image
from scatstore.transforms import Scattering2D, scattering_channels, scattering_output_size
from scatstore import _cbuild
from scatstore.transforms import _native as native
from scatstore.transforms import _torch_backend, filters
from scatstore.transforms.scattering import scattering_paths

kymatio_frontend = pytest.importorskip("kymatio.scattering2d.frontend.torch_frontend")
TOL = 1e-4  # maximum relative error, float32

# (H, W, J, L, max_order): every J in 1..4, every L in {4, 6, 8}, both orders, square and not.
GRID = [
    (33, 40, 1, 8, 1),
    (24, 24, 1, 4, 2),
    (40, 56, 2, 8, 2),
    (64, 64, 2, 6, 1),
    (48, 36, 2, 4, 1),
    (64, 64, 3, 6, 2),
    (56, 72, 3, 8, 1),
    (96, 80, 3, 4, 2),
    (80, 96, 4, 8, 1),
    (96, 80, 4, 4, 2),
    (40, 36, 4, 6, 1),
]


def _crop(img: np.ndarray, H: int, W: int, top: int = 0, left: int = 0) -> np.ndarray:
    return img[top:top + H, left:left + W]


def _batch(H: int, W: int) -> torch.Tensor:
    """(2, 3, H, W) float32 in [0, 1]: an RGB photograph and three grey textures."""
    photo = _crop(load_image("astronaut"), H, W, 90, 170).transpose(2, 0, 1)
    tex = np.stack([_crop(load_image(n, rgb=False), H, W, 37, 51)
                    for n in ("brick", "grass", "gravel")])
    x = np.stack([photo, tex]).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(x))


_REF: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _reference(H, W, J, L, order, x=None):
    key = (H, W, J, L, order)
    if key not in _REF:
        x = _batch(H, W) if x is None else x
        k = kymatio_frontend.ScatteringTorch2D(J, (H, W), L=L, max_order=order)
        with torch.no_grad():
            _REF[key] = (x, k(x))
    return _REF[key]


def _rel_err(y, ref) -> float:
    """Largest, over every output map, of max|y - ref| / max|ref| on that map."""
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).double()
    ref = ref.double()
    num = (y - ref).abs().flatten(-2).amax(-1)
    den = ref.abs().flatten(-2).amax(-1).clamp_min(1e-12)
    return float((num / den).max())


@pytest.mark.parametrize("H,W,J,L,order", GRID)
def test_matches_kymatio_torch(H, W, J, L, order):
    x, ref = _reference(H, W, J, L, order)
    S = Scattering2D(J, (H, W), L=L, max_order=order)
    y = S(x)
    assert y.shape == ref.shape == (2, 3, scattering_channels(J, L, order), H // 2**J, W // 2**J)
    assert y.dtype == torch.float32
    assert _rel_err(y, ref) <= TOL


@pytest.mark.parametrize("H,W,J,L,order", GRID[1::2])
def test_pure_torch_cpu_path_matches_kymatio(H, W, J, L, order):
    """The fallback used where the C kernels cannot be built (and for float64) stays exact."""
    x, ref = _reference(H, W, J, L, order)
    geo = _torch_backend.Geometry(H, W, J, L, order)
    plan = _torch_backend.get_plan(geo, torch.device("cpu"), torch.float32, use_native=False)
    assert plan.native is None
    out = torch.empty(6, geo.K, geo.Mo, geo.No)
    _torch_backend.run_cpu(plan, x.reshape(6, H, W), out, 2, L, 2)
    assert _rel_err(out.reshape(ref.shape), ref) <= TOL


def test_native_kernels_built_and_used_where_a_compiler_exists():
    info = native.native_info()
    if _cbuild.find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert info["available"], info["reason"]
    geo = _torch_backend.Geometry(56, 72, 3, 8, 1)
    assert _torch_backend.get_plan(geo, torch.device("cpu"), torch.float32).native is not None
    # float64 has no kernels: the pure-torch path
    assert _torch_backend.get_plan(geo, torch.device("cpu"), torch.float64).native is None


@pytest.mark.parametrize("H,W,J,L,order,theta_block,group", [
    (224, 224, 3, 8, 2, 3, 3),  # theta1 blocks that do not divide L, 3 maps per step
    (100, 130, 2, 6, 2, 6, 2),
    (64, 48, 4, 4, 1, 4, 1),
])
def test_native_and_pure_torch_paths_agree(H, W, J, L, order, theta_block, group):
    img = load_image("chelsea")  # a 300 x 451 photograph
    x = torch.from_numpy(np.ascontiguousarray(
        img[:H, :W].transpose(2, 0, 1).astype(np.float32) / 255.0))
    geo = _torch_backend.Geometry(H, W, J, L, order)
    outs = []
    for use_native in (False, True):
        plan = _torch_backend.get_plan(geo, torch.device("cpu"), torch.float32, use_native)
        if use_native and plan.native is None:
            pytest.skip("C kernels unavailable here")
        out = torch.empty(3, geo.K, geo.Mo, geo.No)
        _torch_backend.run_cpu(plan, x, out, 2, theta_block, group)
        outs.append(out)
    assert _rel_err(outs[1], outs[0]) <= 1e-5


@pytest.mark.parametrize("m,k", [(240, 240), (120, 60), (30, 40), (20, 36), (12, 50), (8, 5)])
def test_native_fft_matches_numpy(m, k):
    """The kernels' own 2D FFT (radices 2, 3, 4, 5; sizes that are not multiples of 8 take the
    tail paths) against NumPy's, both directions, on a real photograph's spectrum."""
    from scatstore.transforms._torch_backend import fft_plan

    lib = native.load()
    if lib is None:
        pytest.skip("C kernels unavailable here")
    img = load_image("astronaut").astype(np.float64) / 255.0  # 512 x 512 x 3
    z = (img[:m, :k, 0] + 1j * img[100:100 + m, 50:50 + k, 1]) - 0.5
    batch = np.stack([z, np.fft.fft2(z) / (m * k) ** 0.5, z.T[:k, :m].T.copy()])
    work = torch.empty(2 * 16 * max(m, k))
    for inverse in (False, True):
        a = torch.from_numpy(batch.astype(np.complex64))
        rm, tm = fft_plan(m, inverse)
        rk, tk = fft_plan(k, inverse)
        lib.sc_fft2(a.data_ptr(), 3, m, k, rm.ctypes.data, len(rm), tm.ctypes.data,
                    rk.ctypes.data, len(rk), tk.ctypes.data, int(inverse), work.data_ptr())
        ref = np.fft.ifft2(batch) * (m * k) if inverse else np.fft.fft2(batch)
        err = np.abs(a.numpy() - ref).max() / np.abs(ref).max()
        assert err < 1e-6, (inverse, err)


def test_fft_plan_sizes():
    from scatstore.transforms._torch_backend import fft_plan

    assert fft_plan(17, False) is None and fft_plan(2 * 7, True) is None  # other primes: torch
    radix, tw = fft_plan(240, False)
    assert list(radix) == [4, 4, 3, 5] and np.prod(radix) == 240
    assert tw.dtype == np.float32 and len(tw) == 4 * (4 * 3 + 16 * 2 + 48 * 4)


def test_native_output_staging_for_half_precision():
    x, ref = _reference(56, 72, 3, 8, 1)
    y = Scattering2D(3, (56, 72), L=8, max_order=1, out_dtype=torch.float16)(x)
    assert y.dtype == torch.float16
    assert _rel_err(y.float(), ref) <= 1e-3  # float16 rounding


def test_band_rows_reconstruct_the_lowpass_matrices():
    for J, res in ((3, 0), (3, 1), (4, 0), (2, 1)):
        A, _ = filters.lowpass_matrices(240, 240, J, res)
        start, coef = filters.band_rows(A)
        n, W = A.shape[1], coef.shape[1]
        if res == 0:
            assert W < n // 2  # the full-resolution low-pass is a narrow band
        back = np.zeros_like(A)
        idx = (start[:, None].astype(np.int64) + np.arange(W)[None, :]) % n
        np.put_along_axis(back, idx, coef, axis=1)
        assert np.abs(back - A).max() <= 1e-10 * np.abs(A).max()


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


_NATIVE_PROBE = """
import warnings, json, numpy as np, torch
warnings.simplefilter("always")
from skimage import data
from scatstore import Scattering2D
from scatstore.transforms._native import native_info
x = torch.from_numpy(data.camera()[:64, :80].astype(np.float32)[None, None] / 255)
with warnings.catch_warnings(record=True) as w:
    y = Scattering2D(2, (64, 80))(x)
print(json.dumps({"info": native_info(), "warnings": [str(m.message) for m in w],
                  "sum": float(y.double().sum())}))
"""


def test_kernels_can_be_disabled_and_a_broken_compiler_falls_back(tmp_path):
    import json

    runs = {
        "default": {"SCATSTORE_CACHE": str(tmp_path / "a")},
        "disabled": {"SCATSTORE_NATIVE": "0", "SCATSTORE_CACHE": str(tmp_path / "b")},
        "broken": {"CC": "false", "SCATSTORE_CACHE": str(tmp_path / "c")},
    }
    res = {}
    for name, env in runs.items():
        proc = _run_python(_NATIVE_PROBE, env)
        assert proc.returncode == 0, proc.stderr
        res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not res["disabled"]["info"]["available"]
    assert "SCATSTORE_NATIVE" in res["disabled"]["info"]["reason"]
    assert not res["broken"]["info"]["available"]
    assert any("pure-torch" in m for m in res["broken"]["warnings"])
    if res["default"]["info"]["available"]:  # built into the given cache directory
        assert res["default"]["info"]["path"].startswith(str(tmp_path / "a"))
    sums = [r["sum"] for r in res.values()]
    assert max(sums) - min(sums) <= 1e-5 * abs(sums[0])


@pytest.mark.parametrize("H,W,J,L,order", GRID[::2])
def test_matches_kymatio_numpy_backend(H, W, J, L, order):
    x, ref = _reference(H, W, J, L, order)
    S = Scattering2D(J, (H, W), L=L, max_order=order, backend="numpy")
    y = S(x.numpy())
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y.shape == tuple(ref.shape)
    assert _rel_err(y, ref) <= TOL


def test_matches_kymatio_224_order1():
    img = load_image("coffee")[:224, 100:324]  # a 224 x 224 photograph
    x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32)[None] / 255.0)
    _, ref = _reference(224, 224, 3, 8, 1, x=x.contiguous())
    y = Scattering2D(3, (224, 224), L=8, max_order=1)(x)
    assert y.shape == (1, 3, 25, 28, 28)
    assert _rel_err(y, ref) <= TOL


def test_odd_minimal_size_matches_kymatio():
    # 2**J + 1 pixels is the smallest size accepted.
    x, ref = _reference(9, 12, 3, 8, 2)
    assert _rel_err(Scattering2D(3, (9, 12), max_order=2)(x), ref) <= TOL


def test_filters_match_kymatio_filter_bank():
    from kymatio.scattering2d.filter_bank import filter_bank as kymatio_filter_bank

    for M, N, J, L in [(24, 32, 2, 8), (32, 48, 3, 6)]:
        ref = kymatio_filter_bank(M, N, J, L)
        ours = filters.filter_bank(M, N, J, L)
        assert len(ref["psi"]) == len(ours["psi"]) == J * L
        for a, b in zip(ref["psi"], ours["psi"]):
            assert (a["j"], a["theta"]) == (b["j"], b["theta"])
            assert len(a["levels"]) == len(b["levels"])
            for fa, fb_ in zip(a["levels"], b["levels"]):
                assert np.abs(fa - fb_).max() <= 1e-6 * np.abs(fa).max()
        for fa, fb_ in zip(ref["phi"]["levels"], ours["phi"]["levels"]):
            assert np.abs(fa - fb_).max() <= 1e-6 * np.abs(fa).max()


def test_lowpass_matrices_equal_fourier_path():
    rng = np.random.default_rng(0)
    Mp, Np, J = 48, 40, 3
    for res in range(J):
        m, n = Mp // 2**res, Np // 2**res
        U = rng.standard_normal((m, n))
        phi = filters.lowpass_fft(Mp, Np, J, res)
        k = 2 ** (J - res)
        Y = (np.fft.fft2(U) * phi).reshape(k, m // k, k, n // k).mean(axis=(0, 2))
        ref = np.real(np.fft.ifft2(Y))[1:-1, 1:-1]
        A, B = filters.lowpass_matrices(Mp, Np, J, res)
        np.testing.assert_allclose(A @ U @ B.T, ref, rtol=0, atol=1e-12)


# ---- API -------------------------------------------------------------------------------------
def test_helpers_and_layout():
    assert scattering_channels(3, 8, 1) == 25
    assert scattering_channels(2, 8, 2) == 81
    assert scattering_channels(3, 8, 2) == 217
    assert scattering_channels(4, 6, 2) == 1 + 24 + 36 * 6
    assert scattering_output_size(224, 224, 3) == (28, 28)
    assert scattering_output_size(33, 40, 1) == (16, 20)
    paths = scattering_paths(3, 4, 2)
    assert len(paths) == scattering_channels(3, 4, 2)
    assert paths[0] == ((), ()) and paths[1] == ((0,), (0,)) and paths[4] == ((0,), (3,))
    assert paths[13] == ((0, 1), (0, 0)) and paths[17] == ((0, 2), (0, 0))
    assert scatstore.Scattering2D is Scattering2D
    S = Scattering2D(2, (32, 48), L=8, max_order=2)
    assert S.K == 81 and S.output_size == (8, 12) and S.padded_shape == (40, 56)
    assert S.output_shape(5, 3) == (5, 3, 81, 8, 12)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, "float16"])
def test_out_dtype(out_dtype):
    x, _ = _reference(40, 56, 2, 8, 2)
    full = Scattering2D(2, (40, 56), max_order=2)(x)
    y = Scattering2D(2, (40, 56), max_order=2, out_dtype=out_dtype)(x)
    want = getattr(torch, out_dtype) if isinstance(out_dtype, str) else out_dtype
    assert y.dtype == want and y.shape == full.shape
    assert torch.equal(y, full.to(want))  # computed in float32, cast once at the end


def test_out_dtype_numpy_backend():
    x, _ = _reference(40, 56, 2, 8, 2)
    y = Scattering2D(2, (40, 56), max_order=2, backend="numpy", out_dtype=np.float16)(x.numpy())
    assert y.dtype == np.float16
    with pytest.raises(ValueError):
        Scattering2D(2, (40, 56), backend="numpy", out_dtype="int32")


def test_float64_input_gives_float64():
    x, _ = _reference(64, 64, 3, 6, 2)
    y32 = Scattering2D(3, (64, 64), L=6, max_order=2)(x)
    y64 = Scattering2D(3, (64, 64), L=6, max_order=2)(x.double())
    assert y64.dtype == torch.float64
    assert _rel_err(y32, y64) <= 1e-5


def test_float16_input_computed_in_float32():
    x, _ = _reference(40, 56, 2, 8, 2)
    y = Scattering2D(2, (40, 56), max_order=2)(x.half())
    assert y.dtype == torch.float32
    ref = Scattering2D(2, (40, 56), max_order=2)(x.half().float())
    assert torch.equal(y, ref)


@pytest.mark.parametrize("order", [1, 2])
def test_chunking_gives_identical_output(order):
    x, _ = _reference(96, 80, 3, 4, 2) if order == 2 else _reference(56, 72, 3, 8, 1)
    H, W = x.shape[-2:]
    L = 4 if order == 2 else 8
    big = Scattering2D(3, (H, W), L=L, max_order=order)
    tiny = Scattering2D(3, (H, W), L=L, max_order=order, max_memory_bytes=1)
    assert tiny.chunk_size() == 1 and tiny.theta_block() == (1 if order == 2 else L)
    assert big.chunk_size() >= 6 and big.theta_block() == L
    a, b = big(x), tiny(x)
    assert _rel_err(a, b) <= 1e-6  # same arithmetic, only BLAS/FFT blocking may differ


def test_large_batch_is_chunked_under_the_bound():
    for budget in (8 * 2**20, 64 * 2**20, 2**30):
        S = Scattering2D(3, (224, 224), max_order=2, max_memory_bytes=budget)
        per_map, per_theta = S.working_set_bytes(4)
        n, tb = S.chunk_size(), S.theta_block()
        assert 1 <= tb <= 8 and n >= 1
        assert n * (per_map + tb * per_theta) <= budget or (n == 1 and tb == 1)
    S = Scattering2D(3, (224, 224), max_order=1)  # default bound on CPU
    assert S.chunk_size() * S.working_set_bytes(4)[0] <= 64 * 2**20


def test_deterministic_and_channels_independent():
    x, _ = _reference(40, 56, 2, 8, 2)
    S = Scattering2D(2, (40, 56), max_order=2)
    y1, y2 = S(x), S(x)
    assert torch.equal(y1, y2)
    for c in range(3):
        yc = S(x[:, c:c + 1].contiguous())
        assert _rel_err(yc[:, 0], y1[:, c]) <= 1e-6
    # a batch item does not depend on its neighbours
    assert _rel_err(S(x[1:].contiguous())[0], y1[1]) <= 1e-6


def test_non_contiguous_input():
    x, _ = _reference(40, 56, 2, 8, 2)
    S = Scattering2D(2, (40, 56), max_order=2)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not xt.is_contiguous()
    assert _rel_err(S(xt), S(x)) <= 1e-6


def test_filters_are_cached_per_shape_device_dtype():
    _torch_backend.clear_plan_cache()
    x, _ = _reference(40, 56, 2, 8, 2)
    S = Scattering2D(2, (40, 56), max_order=2)
    S(x)
    keys = _torch_backend.plan_cache_info()
    assert len(keys) == 1
    plan = _torch_backend.get_plan(S._geo, x.device, torch.float32)
    S(x)
    Scattering2D(2, (40, 56), max_order=2)(x)  # another instance, same geometry
    assert _torch_backend.plan_cache_info() == keys
    assert _torch_backend.get_plan(S._geo, x.device, torch.float32) is plan
    S(x.double())
    assert len(_torch_backend.plan_cache_info()) == 2


def test_empty_batch():
    S = Scattering2D(2, (40, 56), max_order=2)
    assert S(torch.zeros(0, 3, 40, 56)).shape == (0, 3, 81, 10, 14)


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc", [
    (dict(J=0, shape=(32, 32)), ValueError),
    (dict(J=9, shape=(1024, 1024)), ValueError),
    (dict(J=2.0, shape=(32, 32)), TypeError),
    (dict(J=2, shape=(32, 32), L=0), ValueError),
    (dict(J=2, shape=(32, 32), L=17), ValueError),
    (dict(J=2, shape=(32, 32), max_order=3), ValueError),
    (dict(J=2, shape=(32, 32), max_order=0), ValueError),
    (dict(J=3, shape=(7, 32)), ValueError),
    (dict(J=3, shape=(32, 7)), ValueError),
    (dict(J=2, shape=(3, 3)), ValueError),
    (dict(J=2, shape=32), TypeError),
    (dict(J=2, shape=(32, 32), backend="jax"), ValueError),
    (dict(J=2, shape=(32, 32), out_dtype=torch.int32), ValueError),
    (dict(J=2, shape=(32, 32), max_memory_bytes=0), ValueError),
])
def test_bad_parameters(kwargs, exc):
    with pytest.raises(exc):
        Scattering2D(**kwargs)


def test_bad_inputs():
    S = Scattering2D(2, (32, 32))
    with pytest.raises(ValueError, match="rank 4"):
        S(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="rank 4"):
        S(torch.zeros(1, 1, 1, 32, 32))
    with pytest.raises(ValueError, match="does not match"):
        S(torch.zeros(1, 1, 32, 33))  # no silent broadcasting or cropping
    with pytest.raises(ValueError, match="does not match"):
        S(torch.zeros(1, 1, 1, 32))
    with pytest.raises(TypeError, match="floating"):
        S(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="floating"):
        S(torch.zeros(1, 1, 32, 32, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        S(np.zeros((1, 1, 32, 32), np.float32))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(2, 1, 32, 32)
        x[1, 0, 5, 7] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            S(x)
    # finite values whose sum overflows float32 are accepted (the one-reduction check falls
    # back to the element-wise test), a single NaN among them is not
    big = torch.full((2, 1, 32, 32), 3e38)
    assert torch.isinf(big.sum())
    assert torch.isfinite(S(big)).any()
    big[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        S(big)
    Sn = Scattering2D(2, (32, 32), backend="numpy")
    with pytest.raises(TypeError, match="numpy.ndarray"):
        Sn(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        Sn(np.zeros((1, 1, 32, 32), np.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Sn(np.full((1, 1, 32, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="rank 4"):
        Sn(np.zeros((32, 32), np.float32))


def test_cupy_backend_without_cupy():
    from scatstore.transforms import _xp_backend

    if _xp_backend.cupy_available():
        pytest.skip("CuPy is installed")
    with pytest.raises(ImportError, match="gpu"):
        Scattering2D(2, (32, 32), backend="cupy")


# ---- GPU -------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("H,W,J,L,order", [GRID[2], GRID[7]])
def test_cuda_matches_kymatio(H, W, J, L, order):
    x, ref = _reference(H, W, J, L, order)
    y = Scattering2D(J, (H, W), L=L, max_order=order)(x.cuda())
    assert y.is_cuda
    assert _rel_err(y.cpu(), ref) <= TOL
    y16 = Scattering2D(J, (H, W), L=L, max_order=order, out_dtype=torch.float16)(x.cuda())
    assert y16.dtype == torch.float16 and y16.is_cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cupy_matches_kymatio():
    cp = pytest.importorskip("cupy")
    x, ref = _reference(*GRID[7])
    H, W, J, L, order = GRID[7]
    y = Scattering2D(J, (H, W), L=L, max_order=order, backend="cupy")(cp.asarray(x.numpy()))
    assert isinstance(y, cp.ndarray)
    assert _rel_err(cp.asnumpy(y), ref) <= TOL


def test_cpu_pipelines_leave_other_threads_thread_count_alone():
    """The transform's single-threaded pool must not turn threads created later into one-core
    threads (torch.set_num_threads in a pool thread changes the process default)."""
    import threading

    x, _ = _reference(40, 56, 2, 8, 2)
    before = torch.get_num_threads()
    Scattering2D(2, (40, 56), max_order=2)(x)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [before] and torch.get_num_threads() == before


# ---- autograd ------------------------------------------------------------------------------
def _kymatio_with_filters(J, shape, L, order):
    """kymatio's transform in float64 with the float64 filter bank of ``filters`` (kymatio builds
    its own in float32, whose rounding the modulus' gradient z/|z| amplifies near zeros: the
    comparison is then of the two cascades and their gradients, not of filter roundings)."""
    k = kymatio_frontend.ScatteringTorch2D(J=J, shape=shape, L=L, max_order=order)
    Mp, Np = filters.compute_padding(*shape, J)
    fbank = filters.filter_bank(Mp, Np, J, L)
    levels = list(fbank["phi"]["levels"]) + [lv for p in fbank["psi"] for lv in p["levels"]]
    assert len(dict(k.named_buffers())) == len(levels)
    for n, lv in enumerate(levels):
        k._buffers[f"tensor{n}"] = torch.from_numpy(np.real(lv).astype(np.float64))[..., None]
    return k


@pytest.mark.parametrize("H,W,J,L,order", [(32, 40, 2, 4, 2), (40, 36, 3, 4, 1)])
def test_gradients_equal_kymatios(H, W, J, L, order):
    img = load_image("astronaut")
    x0 = torch.from_numpy(np.ascontiguousarray(img[100:100 + H, 120:120 + W].transpose(2, 0, 1))
                          .astype(np.float64) / 255)[None]
    x, xk = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    y = Scattering2D(J, (H, W), L=L, max_order=order)(x)
    yk = _kymatio_with_filters(J, (H, W), L, order)(xk)
    assert y.requires_grad and _rel_err(y.detach(), yk.detach()) <= 1e-10
    w = torch.from_numpy(np.random.default_rng(0).standard_normal(y.shape))
    (y * w).sum().backward()
    (yk * w).sum().backward()
    assert (x.grad - xk.grad).abs().max() <= 1e-5 * xk.grad.abs().max()


def test_gradcheck_float64_both_orders():
    img = load_image("camera")
    x = torch.from_numpy(img[200:218, 240:260, 0].astype(np.float64) / 255)[None, None]
    for J, order in ((1, 1), (2, 2)):
        S = Scattering2D(J, (18, 20), L=2, max_order=order)
        # a small step: the modulus has curvature ~1/|z|, and a photograph's wavelet responses
        # come within 1e-5 of zero at some pixels (finite differences across that are wrong)
        assert torch.autograd.gradcheck(S, (x.clone().requires_grad_(),), eps=1e-9, atol=1e-5)


def test_float32_input_requiring_grad_takes_the_differentiable_path_and_agrees():
    """The C kernels have no backward: a float32 input that requires grad goes through the
    differentiable torch path automatically, with the same values as the fast path."""
    x, _ = _reference(56, 72, 3, 8, 2)
    S = Scattering2D(3, (56, 72), L=8, max_order=2)
    fast = S(x)
    xg = x.clone().requires_grad_()
    y = S(xg)
    assert y.requires_grad and y.grad_fn is not None
    assert _rel_err(y.detach(), fast) <= 1e-5
    y.square().sum().backward()
    assert xg.grad.shape == x.shape and bool(torch.isfinite(xg.grad).all())
    assert float(xg.grad.abs().max()) > 0
    with torch.no_grad():  # no graph wanted: the fast path
        assert not S(xg).requires_grad


def test_modulus_gradient_is_zero_at_zero():
    from scatstore.transforms._torch_backend import _StableModulus

    z = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    _StableModulus.apply(z).sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
