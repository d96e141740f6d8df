"""The C kernels (scattering, and the coefficient codec's) built for aarch64 (NEON, and SVE)
with Debian's cross compiler and run under qemu-user, against references computed on the host
with NumPy (correctness only: timings under an emulator mean nothing). Skipped when
``aarch64-linux-gnu-gcc`` or ``qemu-aarch64`` is absent (``apt-get install
gcc-aarch64-linux-gnu qemu-user``)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scatstore.sample_data import load_image
from scatstore.transforms import _native
from scatstore.transforms import filters as fb

CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
HARNESS = Path(__file__).with_name("native") / "kernel_harness.c"
pytestmark = pytest.mark.skipif(not (shutil.which(CC) and shutil.which(QEMU)),
                                reason=f"needs {CC} and {QEMU} (apt-get install "
                                       f"gcc-aarch64-linux-gnu qemu-user)")
LEVELS = ("aarch64-neon", "aarch64-sve")


def _cross_build(d: Path, name: str, source: Path, flags) -> dict:
    """``source`` cross-compiled (static) for every level of LEVELS with ``flags(level)``."""
    out = {}
    for level in LEVELS:
        exe = d / f"{name}-{level}"
        proc = subprocess.run([CC, *flags(level), "-static", str(source), "-o", str(exe), "-lm"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[level] = exe
    return out


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory):
    return _cross_build(tmp_path_factory.mktemp("cross"), "harness", HARNESS,
                        lambda lv: [f for f in _native.build_flags(lv) if f != "-fopenmp-simd"])


def _run(exe: Path, kernel: str, arrays: list[np.ndarray], tmp_path: Path) -> np.ndarray:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        for a in arrays:
            code = {np.dtype(np.float32): 0, np.dtype(np.int32): 1, np.dtype(np.int64): 2}[a.dtype]
            f.write(np.array([code, a.size], dtype="<i8").tobytes())
            f.write(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())
    proc = subprocess.run([QEMU, str(exe), kernel, str(src), str(dst)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.fromfile(dst, dtype="<f4")


def _photo_maps(n: int, m: int, k: int) -> np.ndarray:
    img = load_image("astronaut").astype(np.float64) / 255  # 512 x 512 x 3
    return np.stack([img[20 * i:20 * i + m, 30 * i:30 * i + k, i % 3] for i in range(n)])


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("level", LEVELS)
def test_vector_width(harnesses, level):
    proc = subprocess.run([QEMU, str(harnesses[level]), "vf"], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "4"  # 128-bit NEON vectors


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("m,k", [(240, 240), (120, 60), (30, 40), (12, 50), (8, 5)])
def test_fft(harnesses, level, m, k, tmp_path):
    x = _photo_maps(3, m, k)
    z = (x + 1j * x[::-1, ::-1]) - 0.5
    for inverse in (False, True):
        rm, tm = _native.fft_plan(m, inverse)
        rk, tk = _native.fft_plan(k, inverse)
        data = np.stack([z.real, z.imag], axis=-1).astype(np.float32).ravel()
        got = _run(harnesses[level], "fft",
                   [np.array([3, m, k, int(inverse)], np.int64), data, rm, tm, rk, tk], tmp_path)
        got = got.reshape(3, m, k, 2)
        got = got[..., 0] + 1j * got[..., 1]
        ref = np.fft.ifft2(z) * (m * k) if inverse else np.fft.fft2(z)
        assert _rel(got, ref) < 1e-6, (inverse, _rel(got, ref))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("j", [0, 1, 2])
def test_prod_periodize(harnesses, level, j, tmp_path):
    M, N, L, s = 120, 144, 4, 2**j
    psi = fb.wavelet_bank(M, N, 3, L)[j] / 4.0**j  # (L, M, N)
    U = np.fft.fft2(_photo_maps(2, M, N))
    boxes = fb.significant_boxes(psi, s)
    Ui = np.stack([U.real, U.imag], axis=-1).astype(np.float32)
    u_off = np.arange(2, dtype=np.int64) * (2 * M * N)
    got = _run(harnesses[level], "prod",
               [np.array([2, L, M, N, s, boxes.shape[1]], np.int64), Ui.ravel(), u_off,
                psi.astype(np.float32).ravel(), boxes.ravel()], tmp_path)
    got = got.reshape(2, L, M // s, N // s, 2)
    ref = (U[:, None] * psi[None]).reshape(2, L, s, M // s, s, N // s).sum((2, 4))
    assert _rel(got[..., 0] + 1j * got[..., 1], ref) < 1e-5


@pytest.mark.parametrize("level", LEVELS)
def test_modulus(harnesses, level, tmp_path):
    z = np.fft.fft2(_photo_maps(3, 30, 40)).reshape(3, -1)
    Zi = np.stack([z.real, z.imag], axis=-1).astype(np.float32)
    off = np.array([2400, 0, 1200], np.int64)  # scattered output positions
    got = _run(harnesses[level], "modulus",
               [np.array([3, 1200, 3600], np.int64), Zi.ravel(), off,
                np.array([0.25], np.float32)], tmp_path)
    ref = np.zeros(3600)
    for i in range(3):
        ref[off[i]:off[i] + 1200] = 0.25 * np.abs(z[i])
    assert _rel(got, ref) < 1e-6


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("res", [0, 1, 2])
def test_lowpass(harnesses, level, res, tmp_path):
    Mp, Np, J = 240, 240, 3
    m, k = Mp >> res, Np >> res
    U = _photo_maps(3, m, k)
    A, B = fb.lowpass_matrices(Mp, Np, J, res)
    ra, ca, wa = _native._band(A)
    rb, cb, wb = _native._band(B)
    Mo, No = A.shape[0], B.shape[0]
    off = np.arange(3, dtype=np.int64)[::-1].copy() * (Mo * No)
    got = _run(harnesses[level], "lowpass",
               [np.array([3, m, k, Mo, wa, No, wb, 3 * Mo * No], np.int64),
                U.astype(np.float32).ravel(), ra, ca, rb, cb, off], tmp_path)
    ref = (A @ U @ B.T)[::-1]
    assert _rel(got.reshape(3, Mo, No), ref) < 1e-5


# ------------------------------------------------------------------ coefficient codec kernels

TC_HARNESS = Path(__file__).with_name("native") / "tc_harness.c"


@pytest.fixture(scope="module")
def tc_harnesses(tmp_path_factory):
    from scatstore.transforms.coefcodec import kernel_flags

    return _cross_build(tmp_path_factory.mktemp("cross-tc"), "tc", TC_HARNESS, kernel_flags)


@pytest.fixture(scope="module")
def tc_case():
    """scat1 J=2 coefficients of three photographs at 64², a codec fitted on them (quality 50)."""
    import scatstore
    from scatstore.transforms.coefcodec import CoefficientCodec

    imgs = [load_image(n)[:256, :256] for n in ("astronaut", "coffee", "chelsea")]
    x = np.stack([im[::4, ::4].transpose(2, 0, 1) for im in imgs]).astype(np.float32) / 255
    import torch

    S = scatstore.Scattering2D(J=2, shape=(64, 64), L=8, max_order=1)
    c = S(torch.from_numpy(x)).numpy().astype(np.float32)  # (3, 3, 17, 16, 16)
    return c, CoefficientCodec.fit(c, quality=50)


def _qemu(exe: Path, mode: str, payload: bytes, tmp_path: Path) -> bytes:
    src, dst = tmp_path / "tc-in.bin", tmp_path / "tc-out.bin"
    src.write_bytes(payload)
    proc = subprocess.run([QEMU, str(exe), mode, str(src), str(dst)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return dst.read_bytes()


@pytest.mark.parametrize("level", LEVELS)
def test_tc_quantize_gives_the_exact_codes(tc_harnesses, tc_case, level, tmp_path):
    """The encoder's codes are exact integers: the aarch64 kernel gives numpy's, bit for bit."""
    from scatstore.transforms import coefcodec as cc

    c, codec = tc_case
    n, (C, K, H, W) = len(c), codec.shape
    D, N = C * K, H * W
    payload = (np.array([n, D, N], "<i8").tobytes() + np.float32(codec.eps).tobytes()
               + c.astype("<f4").tobytes() + cc._LOG2_TABLE.astype("<i4").tobytes()
               + codec._m32.astype("<i4").tobytes() + codec._a64.astype("<f8").tobytes()
               + codec._s64.astype("<f8").tobytes())
    raw = _qemu(tc_harnesses[level], "quantize", payload, tmp_path)
    u = np.frombuffer(raw[:2 * n * D * N], "<u2").reshape(n, D * N)
    umax = np.frombuffer(raw[2 * n * D * N:], "<i4")
    want = cc._zigzag(codec.quantize(c).reshape(n, -1))
    np.testing.assert_array_equal(u, want)
    np.testing.assert_array_equal(umax, want.max(axis=1))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("finer", [1, 16])
def test_tc_reconstruct_matches_numpy(tc_harnesses, tc_case, level, finer, tmp_path):
    """Format-v2 samples (only the live components stored; 8-bit codes, or 16-bit with steps 16x
    finer) reconstructed on aarch64 agree with the numpy reconstruction to float32 rounding, in
    both domains."""
    from scatstore.transforms.coefcodec import CoefficientCodec

    c, codec = tc_case
    if finer > 1:
        rec = {k: v for k, v in codec.to_json().items() if k != "fingerprint"}
        codec = CoefficientCodec.from_json({**rec, "steps": [max(1, v // finer) for v in rec["steps"]]})
    blobs = codec.encode(c)
    q = codec.decode_codes(blobs).astype(np.int32).reshape(len(c), -1)
    n, (C, K, H, W) = len(c), codec.shape
    D, N = C * K, H * W
    zz = ((q << 1) ^ (q >> 31)).reshape(n, D, N)
    width = np.array([b[3] for b in blobs], "<i4")
    assert set(width.tolist()) == ({2} if finer > 1 else {1})
    live = (zz != 0).any(axis=2)
    stride = 2 * D * N
    packed = np.zeros((n, stride), np.uint8)
    comps = np.zeros((n, D), "<i4")
    for i in range(n):
        k = np.flatnonzero(live[i])
        rows = zz[i, k].astype(np.uint8 if width[i] == 1 else "<u2").tobytes()
        packed[i, :len(rows)] = np.frombuffer(rows, np.uint8)
        comps[i, :len(k)] = k
    At, mu = codec._decoder_constants()
    assert finer > 1 or live.sum() < live.size  # some left out: the packed path is exercised
    for domain, linear in (("linear", 1), ("log", 0)):
        payload = (np.array([n, D, N, linear, stride], "<i8").tobytes()
                   + np.float32(codec.eps).tobytes() + packed.tobytes() + width.tobytes()
                   + live.sum(axis=1).astype("<i4").tobytes() + comps.tobytes()
                   + At.astype("<f4").tobytes() + mu.astype("<f4").ravel().tobytes())
        got = np.frombuffer(_qemu(tc_harnesses[level], "reconstruct", payload, tmp_path), "<f4")
        want = codec.reconstruct(q.reshape(n, D, H, W), domain=domain).reshape(-1)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 if domain == "linear" else 1e-5)
