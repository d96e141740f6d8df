"""The scattering-coefficient transform coder (scatstore.transforms.coefcodec) on real images."""
from __future__ import annotations

import json
import re
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import scatstore
from scatstore.sample_data import load_image
from scatstore.transforms.coefcodec import (
    ENTROPY,
    FORMAT_VERSION,
    CoefficientCodec,
    CorruptCoefficientsError,
    quality_to_step,
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")
FIT = ("immunohistochemistry", "stereo_motorcycle", "grass", "gravel", "coins", "retina")


def _frame(name: str, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    img = load_image(name)
    H, W = img.shape[:2]
    s = min(H, W)
    if rng is None:
        y, x = (H - s) // 2, (W - s) // 2
    else:
        s = int(rng.integers(s // 2, s + 1))
        y, x = int(rng.integers(0, H - s + 1)), int(rng.integers(0, W - s + 1))
    return np.asarray(Image.fromarray(img[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC))


def _scat(frames: np.ndarray, J: int, size: int) -> np.ndarray:
    S = scatstore.Scattering2D(J=J, shape=(size, size), L=8, max_order=1)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    return S(x).numpy()


@pytest.fixture(scope="module")
def coeffs():
    """scat1 J=3 at 224² of six held-out photos, and a fitting sample from other images."""
    rng = np.random.default_rng(0)
    test = np.stack([_frame(n, 224) for n in PHOTOS])
    fit = np.stack([_frame(n, 224, rng) for n in FIT for _ in range(2)])
    return _scat(test, 3, 224), _scat(fit, 3, 224)


@pytest.fixture(scope="module")
def codec50(coeffs):
    return CoefficientCodec.fit(coeffs[1], quality=50)


def _log2v(x, eps):
    return np.log2(np.maximum(x.astype(np.float64), 0) + np.float32(eps))


@pytest.mark.parametrize("quality", [30, 50, 70])
@pytest.mark.parametrize("transform", ["pca", "fixed"])
def test_round_trip_within_documented_bounds(coeffs, quality, transform):
    test, fit = coeffs
    codec = CoefficientCodec.fit(fit, quality=quality, transform=transform)
    step = quality_to_step(quality)
    assert codec.step == pytest.approx(step, rel=1e-4)
    x = codec.decode(codec.encode(test))
    assert x.shape == test.shape and x.dtype == np.float32 and (x >= 0).all()
    # hard bound: per spatial position, the L2 norm over the D channels in the log2 domain
    B, C, K, H, W = test.shape
    err = (np.log2(x.astype(np.float64) + np.float32(codec.eps)) - _log2v(test, codec.eps))
    per_pos = np.sqrt((err.reshape(B, C * K, H * W) ** 2).sum(axis=1))
    bound = codec.error_bound()
    assert per_pos.max() <= bound
    assert bound < 0.6 * np.sqrt(C * K) * step + 0.05  # the bound is not vacuous
    # typical bound (docs): relative L2 error <= 0.25 * step on real images, and close to
    # ln(2) * step / sqrt(12) (uniform quantization noise)
    rel = np.linalg.norm(x - test) / np.linalg.norm(test)
    assert rel <= 0.25 * step
    assert rel >= 0.1 * step  # the knob really sets the error


def test_bytes_deterministic_across_runs_splits_threads_and_refits(coeffs, codec50):
    test, fit = coeffs
    ref = codec50.encode(test)
    assert codec50.encode(test) == ref
    assert codec50.encode(test[:1]) + codec50.encode(test[1:4]) + codec50.encode(test[4:]) == ref
    assert [codec50.encode(t)[0] for t in test] == ref  # one (C, K, H, W) sample at a time
    out = [None, None]

    def work(k):
        out[k] = codec50.encode(test[k::2])
    ths = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    assert out[0] == ref[0::2] and out[1] == ref[1::2]
    # the parameters round-trip through JSON (the manifest) and a refit is identical
    rec = json.loads(json.dumps(codec50.to_json()))
    assert CoefficientCodec.from_json(rec).encode(test) == ref
    assert CoefficientCodec.fit(fit, quality=50).to_json() == codec50.to_json()
    import pickle  # DataLoader workers receive the codec pickled
    assert pickle.loads(pickle.dumps(codec50)).encode(test) == ref
    # torch input and float64 input give the same bytes as float32 numpy
    assert codec50.encode(torch.from_numpy(test)) == ref
    assert codec50.encode(test.astype(np.float64)) == ref


def test_quantization_is_exact_integer_arithmetic(coeffs, codec50):
    """The float64 projection equals an int64 computation (no BLAS), so BLAS order, threads
    and FMA cannot change a code; the fixed-point log2 is within its stated error."""
    test = coeffs[0][:2]
    q = codec50.quantize(test)
    rec = codec50.to_json()
    eps = np.float32(rec["eps"])
    v = np.maximum(test, 0).astype(np.float32) + eps
    from scatstore.transforms.coefcodec import _fixed_log2
    Y = _fixed_log2(test, rec["eps"]).astype(np.int64)
    assert np.abs(Y / 4096 - np.log2(v.astype(np.float64))).max() <= 2 ** -13 + 2 ** -14 / np.log(2) + 1e-12
    B, C, K, H, W = test.shape
    A = np.array(rec["matrix"], dtype=np.int64)
    M = np.array(rec["mean"], dtype=np.int64)
    s = np.array(rec["steps"], dtype=np.int64)[:, None]
    Z = np.einsum("dc,bcn->bdn", A, Y.reshape(B, C * K, H * W) - M[:, None], optimize=False)
    q_ref = np.clip(np.floor_divide(2 * Z + s, 2 * s), -32767, 32767)
    assert np.array_equal(q.reshape(B, C * K, H * W), q_ref)


def _independent_decode(blob: bytes, rec: dict) -> np.ndarray:
    """A reader written from docs/coefficient_codec.md: struct + numcodecs' blosc + numpy."""
    from numcodecs import blosc

    magic, version, width, D, H, W, fingerprint = struct.unpack_from("<2sBBHHHI", blob, 0)
    assert magic == b"TC" and version == rec["version"] and fingerprint == rec["fingerprint"]
    assert zlib.crc32(blob[:-4]) == int.from_bytes(blob[-4:], "little")
    start, live = 14, np.ones(D, dtype=bool)
    if version >= 2:  # the bitmap of the components the chunk holds (bit k of byte k // 8)
        nmap = (D + 7) // 8
        bits = np.frombuffer(blob[14:14 + nmap], dtype=np.uint8)
        live = ((bits[np.arange(D) // 8] >> (np.arange(D) % 8)) & 1).astype(bool)
        start += nmap
    raw = blosc.decompress(blob[start:-4]) if live.any() else b""
    u = np.frombuffer(raw, dtype=np.uint8 if width == 1 else "<u2").astype(np.int64)
    q = np.zeros((D, H * W), dtype=np.int64)
    q[live] = np.where(u % 2 == 0, u // 2, -(u + 1) // 2).reshape(-1, H * W)
    A = np.array(rec["matrix"], dtype=np.float64) / 2 ** rec["matrix_bits"]
    step = np.array(rec["steps"], dtype=np.float64) / 2 ** (rec["log_bits"] + rec["matrix_bits"])
    mean = np.array(rec["mean"], dtype=np.float64) / 2 ** rec["log_bits"]
    y = mean[:, None] + A.T @ (q * step[:, None])
    x = np.maximum(2.0 ** y - rec["eps"], 0)
    C, K = rec["shape"][:2]
    return x.reshape(C, K, H, W)


def test_format_version_1_blobs_still_decode_and_a_v1_record_encodes_v1():
    """tests/data/tc_v1_tiny.*: blobs and record written by the version-1 encoder (scatstore
    7ef0104, real images). Today's reader decodes them to what the documented formulas give,
    and a codec built from the v1 record still writes v1 bytes (a resumed v1 job stays
    byte-identical)."""
    import base64
    from pathlib import Path

    here = Path(__file__).parent / "data"
    fix = json.loads((here / "tc_v1_tiny.json").read_text())
    rec = fix["record"]
    assert rec["version"] == 1 and rec["entropy"] == {"coder": "blosc", "cname": "zstd",
                                                      "clevel": 1, "shuffle": "bit"}
    blobs = [base64.b64decode(b) for b in fix["blobs"]]
    codec = CoefficientCodec.from_json(rec)
    assert codec.version == 1 and codec.fingerprint == rec["fingerprint"]
    got = codec.decode(blobs)
    assert got.shape == (3, 3, 17, 8, 8) and np.isfinite(got).all() and got.max() > 0
    np.testing.assert_allclose(got, np.stack([_independent_decode(b, rec) for b in blobs]),
                               rtol=2e-5, atol=1e-7)
    # the v1 encoder path: version byte 1, bit-shuffled as 8-bit elements, and decoding the
    # re-encoded values gives them back (to within the quantization)
    again = codec.encode(got)
    assert all(b[2] == 1 for b in again)
    assert [b[14 + 3] for b in again] == [1] * len(again)  # blosc header byte 3: typesize
    back = codec.decode(again)
    assert np.linalg.norm(back - got) <= 0.02 * np.linalg.norm(got)
    # a version-2 blob is refused by the v1 record (and the reverse) with a clear error
    v2 = CoefficientCodec.from_json({**{k: v for k, v in rec.items() if k != "fingerprint"},
                                     "version": 2, "entropy": ENTROPY[2]})
    with pytest.raises(CorruptCoefficientsError, match="format version 1, the store's codec record is version 2"):
        v2.decode(blobs)


def test_version_2_bit_shuffles_pairs_of_codes(coeffs, codec50):
    assert codec50.version == FORMAT_VERSION == 2 and codec50.to_json()["entropy"] == ENTROPY[2]
    blobs = codec50.encode(coeffs[0])
    D = codec50.shape[0] * codec50.shape[1]
    nmap = (D + 7) // 8
    codes = codec50.decode_codes(blobs).reshape(len(blobs), D, -1)
    n_live = []
    for b, c in zip(blobs, codes):  # header byte 2: version; the live-component bitmap; blosc
        # header after it: flags (0x4 bit-shuffle), typesize, then nbytes = live codes only
        assert b[2] == 2
        live = np.unpackbits(np.frombuffer(b[14:14 + nmap], np.uint8), count=D, bitorder="little")
        np.testing.assert_array_equal(live.astype(bool), (c != 0).any(axis=1))
        assert 0 < live.sum() <= D
        n_live.append(int(live.sum()))
        assert (b[14 + nmap + 2] & 0x4, b[14 + nmap + 3]) == (0x4, 2)
        assert int.from_bytes(b[14 + nmap + 4:14 + nmap + 8], "little") == live.sum() * c.shape[1]
    assert min(n_live) < D, n_live  # on these photos some samples leave components out
    # a sample whose codes are all zero (coefficients at the decoded mean) has an empty chunk
    at_mean = codec50.reconstruct(np.zeros((1, D, *codec50.shape[2:]), np.int8))
    b0 = codec50.encode(at_mean)[0]
    assert b0[14:14 + nmap] == bytes(nmap)
    np.testing.assert_allclose(codec50.decode([b0]), at_mean, rtol=1e-6)
    np.testing.assert_allclose(_independent_decode(b0, codec50.to_json())[None], at_mean, rtol=1e-6)
    # decoding into a caller's buffer (the loader's recycled batches) gives the same values
    buf = np.full((len(blobs), *codec50.shape), np.nan, dtype=np.float32)
    res = codec50.decode(blobs, out=buf)
    assert res.base is buf or res is buf
    np.testing.assert_array_equal(buf, codec50.decode(blobs))
    with pytest.raises(ValueError, match="out must be"):
        codec50.decode(blobs, out=np.empty(3, np.float32))


def test_documented_format_decodes_with_numpy_and_blosc(coeffs, codec50):
    test = coeffs[0]
    blobs = codec50.encode(test)
    rec = json.loads(json.dumps(codec50.to_json()))
    ours = codec50.decode(blobs)
    theirs = np.stack([_independent_decode(b, rec) for b in blobs])
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-7)
    # the other output forms agree with it
    np.testing.assert_allclose(codec50.decode(blobs, dtype="float16").astype(np.float32), ours,
                               rtol=2e-3, atol=1e-6)
    log = codec50.decode(blobs, domain="log")
    np.testing.assert_allclose(np.maximum(2.0 ** log.astype(np.float64) - rec["eps"], 0), ours,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(codec50.decode(blobs, threads=2), ours)
    # a batch decodes to exactly what the samples decode to one by one (map-style reader)
    np.testing.assert_array_equal(np.concatenate([codec50.decode([b]) for b in blobs]), ours)
    many = blobs * 3  # 18 samples: chunks of 8, 8, 2
    np.testing.assert_array_equal(codec50.decode(many, threads=2)[12:], ours)
    on_device = codec50.decode(blobs, device="cpu")  # the torch path (GPU-capable)
    assert isinstance(on_device, torch.Tensor)
    np.testing.assert_allclose(on_device.numpy(), ours, rtol=1e-5, atol=1e-7)
    t = codec50.decode(blobs, out_format="torch")
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), ours)


def test_j4_and_grey_shapes_and_bytes(coeffs):
    rng = np.random.default_rng(1)
    frames = np.stack([_frame(n, 224) for n in PHOTOS[:3]])
    fit = np.stack([_frame(n, 224, rng) for n in FIT[:4]])
    c4, f4 = _scat(frames, 4, 224), _scat(fit, 4, 224)
    codec = CoefficientCodec.fit(f4, quality=50)
    blobs = codec.encode(c4)
    assert np.mean([len(b) for b in blobs]) < 0.4 * 3 * 33 * 14 * 14  # < 0.4 bytes / coefficient
    x = codec.decode(blobs)
    assert np.linalg.norm(x - c4) / np.linalg.norm(c4) <= 0.25 * codec.step
    # one colour channel (grey), J=2 at 64², fixed transform
    grey = _scat(np.stack([_frame(n, 64) for n in PHOTOS]), 2, 64)[:, :1]
    g = CoefficientCodec.fit(grey, quality=60, transform="fixed")
    y = g.decode(g.encode(grey))
    assert y.shape == grey.shape
    assert np.linalg.norm(y - grey) / np.linalg.norm(grey) <= 0.25 * g.step


def test_hostile_inputs(coeffs, codec50):
    test = coeffs[0][:2].copy()
    bad = test.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        codec50.encode(bad)
    with pytest.raises(ValueError, match="expected a batch"):
        codec50.encode(test[:, :, :5])
    with pytest.raises(ValueError, match="float"):
        codec50.encode(test.astype(np.int32))
    # negative values are clamped to 0; zeros and huge values code without error
    neg = test.copy()
    neg[:, :, 1:] *= -1
    x = codec50.decode(codec50.encode(neg))
    assert (x >= 0).all() and x[:, :, 1:].max() <= 2 * codec50.eps
    extreme = np.zeros_like(test)
    extreme[1] = 1e30
    x = codec50.decode(codec50.encode(extreme))
    assert np.all(np.isfinite(x)) and x[0].max() <= 2 * codec50.eps and x[1].min() > 1e29
    assert codec50.decode([]).shape == (0,) + test.shape[1:]
    # a batch mixing 8-bit and 16-bit samples decodes each as it decodes alone
    blobs = codec50.encode(np.concatenate([test[:1], extreme[1:]]))
    assert blobs[0][3] == 1 and blobs[1][3] == 2  # width byte
    assert codec50.decode_codes(blobs).dtype == np.int16
    np.testing.assert_array_equal(codec50.decode(blobs)[0], codec50.decode(blobs[:1])[0])
    assert codec50.decode_codes(blobs[:1]).dtype == np.int8


def test_16_bit_codes_decode_in_the_kernel_as_numpy_does(coeffs):
    """At a high quality real photos need 16-bit codes (|q| > 127): the C kernel reads them
    (no per-sample numpy fallback) and agrees with the numpy reconstruction, also in a batch
    that mixes 8- and 16-bit samples."""
    test, fit = coeffs
    hi = CoefficientCodec.fit(fit, quality=80)
    lo = CoefficientCodec.from_json({**{k: v for k, v in hi.to_json().items() if k != "fingerprint"},
                                     "steps": (hi.steps * 16).tolist()})  # same basis, coarser
    wide = hi.encode(test)
    assert all(b[3] == 2 for b in wide)
    ref = hi.reconstruct(hi.decode_codes(wide))
    np.testing.assert_allclose(hi.decode(wide), ref, rtol=2e-5, atol=1e-7)
    assert [b[3] for b in lo.encode(test)] == [1] * len(test)
    mixed = [*hi.encode(test[:2]), *hi.encode(np.zeros_like(test[:2]))]
    got = hi.decode(mixed, threads=2)
    np.testing.assert_allclose(got, hi.reconstruct(hi.decode_codes(mixed)), rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(got[0], hi.decode(mixed[:1])[0])


def test_damaged_or_foreign_blobs_are_refused(coeffs, codec50):
    test, fit = coeffs
    blob = codec50.encode(test[:1])[0]
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    for damaged, msg in ((bytes(flipped), "CRC32"), (blob[:-9], "CRC32|shorter"), (b"xx" + blob[2:], "magic"),
                         (blob[:10], "shorter")):
        with pytest.raises(CorruptCoefficientsError, match=msg):
            codec50.decode([blob, damaged])
        # check: every bad blob of a list, by index, without decoding
        bad = codec50.check([blob, damaged, blob, damaged])
        assert sorted(bad) == [1, 3] and re.search(msg, bad[1]) and not bad[1].startswith("sample")
    assert codec50.check([blob, blob]) == {}
    other = CoefficientCodec.fit(fit, quality=40)
    with pytest.raises(CorruptCoefficientsError, match="other parameters"):
        other.decode([blob])
    assert list(other.check([blob])) == [0] and "other parameters" in other.check([blob])[0]
    rec = codec50.to_json()
    with pytest.raises(ValueError, match="fingerprint"):
        CoefficientCodec.from_json({**rec, "eps": rec["eps"] * 2})
    with pytest.raises(ValueError, match="version"):
        CoefficientCodec.from_json({**rec, "version": 99})
    with pytest.raises(ValueError, match="quality"):
        CoefficientCodec.fit(fit, quality=101)


def test_bytes_identical_on_the_avx2_paths(coeffs, codec50, tmp_path):
    """Encoding in a process restricted to x86-64-v3 SIMD (numpy), the Haswell (AVX2)
    OpenBLAS kernels and the x86-64-v3 build of the C encoder, with 2 BLAS threads, gives the
    same bytes as this process; so does the numpy-only path (SCATSTORE_NATIVE=0)."""
    import os
    import subprocess
    import sys

    test = coeffs[0][:3]
    np.save(tmp_path / "x.npy", test)
    (tmp_path / "rec.json").write_text(json.dumps(codec50.to_json()))
    script = (
        "import json, sys, numpy as np\n"
        "from scatstore.transforms.coefcodec import CoefficientCodec\n"
        f"c = CoefficientCodec.from_json(json.load(open({str(tmp_path / 'rec.json')!r})))\n"
        f"sys.stdout.write(b''.join(c.encode(np.load({str(tmp_path / 'x.npy')!r}))).hex())\n")
    from scatstore import _cbuild

    v3 = "x86-64-v3" in _cbuild.isa_levels()
    for extra in ({"SCATSTORE_ISA": "x86-64-v3"} if v3 else {}, {"SCATSTORE_NATIVE": "0"}):
        env = dict(os.environ, NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR",
                   OPENBLAS_CORETYPE="Haswell", OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2",
                   **extra)
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env,
                             capture_output=True, text=True, check=True, timeout=120)
        assert bytes.fromhex(out.stdout) == b"".join(codec50.encode(test)), extra


# ------------------------------------------------------------------ stores (encode --dtype tc)

STORE_SIZE = 64  # small frames keep the encode jobs fast; J=2 gives (3, 17, 16, 16) samples


@pytest.fixture(scope="module")
def tc_src(tmp_path_factory):
    from scatstore.sources.demo_data import make_imagenet_layout

    return make_imagenet_layout(tmp_path_factory.mktemp("tcsrc") / "imagenet", n_per_class=4, seed=0)


def _encode_tc(src, out, **kw):
    from scatstore.pipelines.encode import EncodeConfig, encode

    kw = {"method": "scat1", "J": 2, "size": STORE_SIZE, "shard_size": 5, "dtype": "tc",
          "quality": 50, "progress": False, **kw}
    return encode(EncodeConfig(src=src, out=out, **kw), log=lambda m: None)


def _digest(out):
    import hashlib

    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()
            and not p.relative_to(out).as_posix().startswith(".scatstore/lock")}


def _plain_blobs(out, fmt, m):
    """Every stored blob, read with the format's plain library (no scatstore code)."""
    if fmt == "zarr":
        import zarr

        g = zarr.open_group(str(out / "data.zarr"), mode="r")
        valid, off = np.asarray(g["valid"][:]), np.asarray(g["bits_offsets"][:])
        S = m["store"]["shard_size"]
        blobs = []
        for slot in np.flatnonzero(valid):
            s, base = slot // S, off[(slot // S) * S]
            bits = np.asarray(g[f"bits/{s:06d}"][:])
            blobs.append(bits[off[slot] - base:off[slot + 1] - base].tobytes())
        return blobs
    if fmt == "wds":
        import tarfile

        blobs = []
        for tar in sorted(out.glob("shard-*.tar")):
            with tarfile.open(tar) as tf:
                blobs += [tf.extractfile(mm).read() for mm in tf.getmembers() if mm.name.endswith(".bits")]
        return blobs
    import h5py

    blobs = []
    for f5 in sorted(out.glob("shard-*.h5")):
        with h5py.File(f5, "r") as f:
            bits, off = f["bits"][:], f["bits_offsets"][:]
            blobs += [bits[a:b].tobytes() for a, b in zip(off[:-1], off[1:])]
    return blobs


@pytest.fixture(scope="module")
def f32_store(tc_src, tmp_path_factory):
    from scatstore.pipelines.encode import EncodeConfig, encode

    out = tmp_path_factory.mktemp("f32") / "out"
    encode(EncodeConfig(src=tc_src, out=out, method="scat1", J=2, size=STORE_SIZE, shard_size=5,
                        dtype="float32", progress=False), log=lambda m: None)
    return out


@pytest.mark.parametrize("fmt", ["zarr", "wds", "h5"])
def test_tc_store_reads_back_with_numpy_and_matches_loader(tc_src, f32_store, tmp_path, fmt):
    from scatstore.loaders.stream import loader
    from scatstore.pipelines.report import report
    from scatstore.stores import open_dataset, verify

    out = tmp_path / "out"
    m = _encode_tc(tc_src, out, format=fmt)
    assert m["dtype"] == "bytes" and m["coefficient_codec"]["codec"] == "scatstore-tc"
    assert m["job"]["params"]["coefficient_codec"]["quality"] == 50.0
    assert verify(out).ok
    rec = json.loads((out / "manifest.json").read_text())["coefficient_codec"]
    ds = open_dataset(out)
    assert ds.decoded_shape == (3, 17, 16, 16) and len(ds) == 12
    ref = open_dataset(f32_store)
    # numpy + the plain library + the documented formulas == open_dataset
    plain = [_independent_decode(b, rec) for b in _plain_blobs(out, fmt, m)]
    ours = np.stack([ds[i][0] for i in range(len(ds))])
    assert ours.dtype == np.float32 and ours.shape == (12, 3, 17, 16, 16)
    streamed = [x for s in range(ds.n_shards) for x, _, _ in ds.iter_shard(s)]
    np.testing.assert_array_equal(np.stack(streamed), ours)  # wds streams its tars
    np.testing.assert_allclose(ours, np.stack(plain), rtol=2e-5, atol=1e-7)
    # within the documented error against the float32 store of the same images
    exact = np.stack([ref[i][0] for i in range(len(ref))])
    codec = CoefficientCodec.from_json(rec)
    y_err = np.log2(ours.astype(np.float64) + codec.eps) - np.log2(exact.astype(np.float64) + codec.eps)
    per_pos = np.sqrt((y_err.reshape(12, -1, 16 * 16) ** 2).sum(axis=1))
    assert per_pos.max() <= codec.error_bound()
    rel = np.linalg.norm(ours - exact) / np.linalg.norm(exact)
    assert rel < 0.05, rel
    # the loader (threads, shuffled windows, batch decode) gives the map-style reader's samples
    L = loader(out, 5, shuffle=True, seed=3, num_workers=2, drop_last=False)
    seen = {}
    for xb, yb in L(0):
        assert xb.shape[1:] == (51, 16, 16) and xb.dtype == torch.float32
        for row, lab in zip(xb.numpy(), yb.tolist()):
            seen[len(seen)] = (row, lab)
    order = L(0).plan.order
    assert len(seen) == len(order)
    for k, i in enumerate(order.tolist()):
        np.testing.assert_array_equal(seen[k][0], ours[i].reshape(51, 16, 16))
        assert seen[k][1] == ds.labels[i]
    # report: bytes per sample against the sources and against the q90 JPEG of the frame
    r = report(out)
    assert r["dtype"] == "tc" and r["coefficient_codec"]["quality"] == 50.0
    # every file counts, the manifest (with the codec record) included
    assert r["bytes_per_sample"] == pytest.approx(r["bytes_stored"] / 12)
    assert r["bytes_stored"] > m["bytes_stored"] + len(json.dumps(rec))
    assert r["jpeg_q90_bytes_per_sample"] > 0
    assert r["ratio_vs_jpeg_q90"] == pytest.approx(r["bytes_per_sample"] / r["jpeg_q90_bytes_per_sample"])


def test_tc_bytes_identical_across_runs_workers_and_resume(tc_src, tmp_path, monkeypatch):
    from scatstore.pipelines.encode import tcfit
    from scatstore.stores import read_manifest

    a = tmp_path / "a"
    _encode_tc(tc_src, a)
    b = tmp_path / "b"
    _encode_tc(tc_src, b, workers=2)
    da, db = _digest(a), _digest(b)
    assert da == db and any(k.startswith("data.zarr/bits/") for k in da)
    # resume: a lost shard is redone with the recorded codec, never refitted
    (a / "_store" / "shard-000001.json").unlink()
    for p in (a / "data.zarr" / "bits" / "000001").rglob("c/*"):
        p.unlink()

    def no_refit(*args, **kw):
        raise AssertionError("a resumed job refitted its codec")
    monkeypatch.setattr(tcfit, "fit_codec", no_refit)
    _encode_tc(tc_src, a)
    assert _digest(a) == da
    assert read_manifest(a)["coefficient_codec"] == json.loads(
        (a / ".scatstore" / "coefficient_codec.json").read_text())


def test_tc_options_are_checked(tc_src, tmp_path):
    from scatstore.pipelines.encode import EncodeConfig, OptionError

    with pytest.raises(OptionError, match="quality"):
        EncodeConfig(src=tc_src, out=tmp_path / "o", dtype="float16", quality=50)
    with pytest.raises(OptionError, match="quality"):
        EncodeConfig(src=tc_src, out=tmp_path / "o", dtype="tc", quality=150)
    with pytest.raises(OptionError, match="dtype"):
        EncodeConfig(src=tc_src, out=tmp_path / "o", method="raw", dtype="tc")
    # a different quality is a different job: refused in the same OUT
    from scatstore.pipelines.encode import EncodeError

    out = tmp_path / "q"
    _encode_tc(tc_src, out, quality=40)
    with pytest.raises(EncodeError, match="different job"):
        _encode_tc(tc_src, out, quality=60)


def test_decode_kernel_agrees_with_numpy_and_the_avx2_build(coeffs, codec50):
    from scatstore import _cbuild
    from scatstore.transforms import coefcodec

    blobs = codec50.encode(coeffs[0]) * 2
    info = coefcodec.kernel_info()
    if _cbuild.find_compiler() is not None and not _cbuild.native_disabled():
        assert info["available"], info
    fast = codec50.decode(blobs, threads=2)
    fast_log = codec50.decode(blobs, domain="log")
    try:
        coefcodec.select_kernel(use_numpy=True)
        assert coefcodec.kernel_info()["kernel"] == "numpy"
        ref = codec50.decode(blobs)
        ref_log = codec50.decode(blobs, domain="log")
        others = []
        if "x86-64-v3" in _cbuild.isa_levels() and _cbuild.isa_level() != "x86-64-v3":
            coefcodec.select_kernel("x86-64-v3")
            others.append(codec50.decode(blobs))
    finally:
        coefcodec.select_kernel()
    np.testing.assert_allclose(fast_log, ref_log, rtol=0, atol=2e-5)
    np.testing.assert_allclose(fast, ref, rtol=2e-5, atol=1e-7)
    for o in others:
        np.testing.assert_allclose(o, ref, rtol=2e-5, atol=1e-7)


def test_encode_kernel_gives_the_numpy_codes_and_bytes(coeffs, codec50):
    from scatstore.transforms import coefcodec

    test = coeffs[0]
    hostile = test[:3].copy()
    hostile[0] *= -1                      # clamped to 0
    hostile[1] = 1e30                     # 16-bit codes, clamped codes
    hostile[2, :, :3] = 0.0
    batch = np.concatenate([test, hostile]).astype(np.float32)
    fast = codec50.encode(batch)
    u_fast, m_fast = codec50._zigzag_codes(batch)
    try:
        coefcodec.select_kernel(use_numpy=True)
        slow = codec50.encode(batch)
        u_slow, m_slow = codec50._zigzag_codes(batch)
    finally:
        coefcodec.select_kernel()
    assert np.array_equal(u_fast.astype(np.int64), u_slow.astype(np.int64))
    assert np.array_equal(m_fast, m_slow) and m_fast.max() > 255
    assert fast == slow
    # float64 input is rounded to float32 first on both paths
    assert codec50.encode(batch.astype(np.float64)) == fast


def test_tc_store_damage_is_a_store_error(tc_src, tmp_path):
    from scatstore.loaders.stream import loader
    from scatstore.stores import StoreError, open_dataset

    out = tmp_path / "out"
    _encode_tc(tc_src, out)
    f = out / "data.zarr" / "bits" / "000001" / "c" / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x40
    f.write_bytes(bytes(data))
    ds = open_dataset(out)
    assert ds[0][0].shape == (3, 17, 16, 16)  # other shards read
    with pytest.raises(StoreError, match="crc32c"):
        ds[int(ds.shard_indices(1)[0])]
    with pytest.raises(StoreError):
        for _ in loader(out, 4, shuffle=False, num_workers=2)(0):
            pass
    # an edited codec record is refused when the store opens
    m = json.loads((out / "manifest.json").read_text())
    m["coefficient_codec"]["steps"][0] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="coefficient_codec"):
        open_dataset(out)


# ------------------------------------------------------------------ damage: skip_damaged, verify


def _zarr_shard_chunks(adir):
    """``(chunk size, [(offset, nbytes)])`` of the inner chunks of ``adir/c/0`` (the zarr
    sharding index at the end of the file: n x (offset, nbytes) little-endian uint64, crc32c)."""
    meta = json.loads((adir / "zarr.json").read_text())
    (shard,) = meta["chunk_grid"]["configuration"]["chunk_shape"]
    (chunk,) = meta["codecs"][0]["configuration"]["chunk_shape"]
    n = shard // chunk
    data = (adir / "c" / "0").read_bytes()
    idx = np.frombuffer(data[-(16 * n + 4):-4], "<u8").reshape(n, 2)
    return chunk, [(int(a), int(b)) for a, b in idx]


def _refresh_checksums(out, rel):
    """The manifest's sha256 and size of ``rel`` recomputed (damage that verify's re-hash of
    the files would not see: only the format's and the codec's checks can)."""
    import hashlib

    m = json.loads((out / "manifest.json").read_text())
    for s in m["store"]["shards"]:
        if rel in s["files"]:
            s["files"][rel]["sha256"] = hashlib.sha256((out / rel).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def damaged_tc(tc_src, tmp_path_factory):
    """A zarr tc store (3 shards of 5, 5, 2 samples; bits inner chunks of <= 4 kB, so a shard
    has several) and an intact copy; then in shard 1 one blob damaged with its chunk's crc32c
    recomputed (only the codec's CRC32 sees it), in shard 0 one inner chunk failing its crc32c.
    Returns (store, intact copy, {damaged dataset index: kind})."""
    import shutil

    import google_crc32c
    import zarr

    from scatstore.stores.formats.zarr import writer

    base = tmp_path_factory.mktemp("damaged")
    out, intact = base / "out", base / "intact"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer, "BITS_CHUNK_MAX", 4096)
        _encode_tc(tc_src, out)
    shutil.copytree(out, intact)
    g = zarr.open_group(str(out / "data.zarr"), mode="r")
    off = np.asarray(g["bits_offsets"][:], dtype=np.int64)
    S = 5
    damaged = {}
    # blob level: sample 6 (second of shard 1), a payload byte; the chunk's crc32c made right
    adir = out / "data.zarr" / "bits" / "000001"
    chunk, chunks = _zarr_shard_chunks(adir)
    assert len(chunks) >= 3
    p = int((off[6] + off[7]) // 2 - off[S])
    f = adir / "c" / "0"
    data = bytearray(f.read_bytes())
    c_off = chunks[p // chunk][0]
    data[c_off + p % chunk] ^= 0x21
    data[c_off + chunk:c_off + chunk + 4] = google_crc32c.value(
        bytes(data[c_off:c_off + chunk])).to_bytes(4, "little")
    f.write_bytes(bytes(data))
    _refresh_checksums(out, "data.zarr/bits/000001/c/0")
    damaged[6] = "blob"
    # chunk level: shard 0's inner chunk 1; its samples are those whose bytes overlap it
    adir = out / "data.zarr" / "bits" / "000000"
    chunk, chunks = _zarr_shard_chunks(adir)
    f = adir / "c" / "0"
    data = bytearray(f.read_bytes())
    data[chunks[1][0] + 7] ^= 0x40
    f.write_bytes(bytes(data))
    for i in range(S):
        if off[i] < 2 * chunk and off[i + 1] > chunk:
            damaged[i] = "chunk"
    assert 0 < sum(v == "chunk" for v in damaged.values()) < S  # healthy samples share the shard
    return out, intact, damaged


def test_tc_loader_skip_damaged_leaves_out_exactly_the_damaged_samples(damaged_tc, caplog):
    import logging

    from scatstore.loaders.stream import loader
    from scatstore.stores import StoreError, open_dataset

    out, intact, damaged = damaged_tc
    ds, ref = open_dataset(out), open_dataset(intact)
    # without skip_damaged: one line naming the store, the sample and its shard
    for shuffle in (False, True):
        with pytest.raises(StoreError) as ei:
            for _ in loader(out, 4, shuffle=shuffle, num_workers=2)(0):
                pass
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith(f"{out}: sample ")
        i = int(re.search(r"\(index (\d+)\) of shard (\d{6})", msg).group(1))
        assert i in damaged and f"of shard {int(ds._shard_of[i]):06d} is damaged" in msg
        assert ("crc32c" if damaged[i] == "chunk" else "CRC32") in msg
    # with it: counted, logged once per chunk / blob, left out of their batches
    caplog.set_level(logging.WARNING, logger="scatstore")
    L = loader(out, 4, shuffle=True, seed=1, num_workers=2, drop_last=False, skip_damaged=True)
    for epoch in (0, 1):
        order = L(epoch).plan.order
        kept = [int(i) for i in order if int(i) not in damaged]
        rows, labels = [], []
        for xb, yb in L(epoch):
            assert xb.shape[1:] == (51, 16, 16) and len(xb) == len(yb) > 0
            rows += list(xb.numpy())
            labels += yb.tolist()
        assert len(rows) == len(kept) == len(ds) - len(damaged)
        for r, lab, i in zip(rows, labels, kept):
            want = ds[i][0].reshape(51, 16, 16)  # the map-style reader of the damaged store
            np.testing.assert_array_equal(r, want)
            np.testing.assert_array_equal(r, ref[i][0].reshape(51, 16, 16))  # = intact store's
            assert lab == ds.labels[i]
        assert L.reader.damaged == set(damaged)
        assert L.reader.damaged_chunks == 2
        warnings = [r.getMessage() for r in caplog.records if "skip_damaged" in r.getMessage()]
        assert len(warnings) == 2, warnings  # the second epoch logs nothing new
    assert any("inner chunk 1 fails its crc32c" in w for w in warnings)
    key6 = ds.keys[6]
    assert any(f"sample {key6!r} (index 6) of shard 000001: CRC32 mismatch" in w for w in warnings)
    # the map-style reader refuses the damaged samples and reads their shard-mates
    for i, kind in damaged.items():
        with pytest.raises(StoreError, match="crc32c" if kind == "chunk" else "CRC32"):
            ds[i]


def test_tc_verify_checks_every_blob(damaged_tc):
    from scatstore.stores import open_dataset, verify

    out, intact, damaged = damaged_tc
    assert verify(intact).ok
    rep = verify(out)
    assert not rep.ok and rep.exit_code == 1
    by_file = {}
    for s, rel, why in rep.damaged:
        by_file.setdefault(rel, []).append((s, why))
    # shard 0: its bits fail their crc32c (and its sha256); shard 1: only the codec sees sample 6
    assert by_file["data.zarr/bits/000001"] == [
        (1, f"sample 6 ({open_dataset(intact).keys[6]!r}): CRC32 mismatch (damaged bytes)")]
    assert "data.zarr/bits/000001/c/0" not in by_file  # its checksums were refreshed
    assert [s for s, _ in by_file["data.zarr/bits/000000"]] == [0]
    assert "crc32c" in by_file["data.zarr/bits/000000"][0][1].lower() or \
        "checksum" in by_file["data.zarr/bits/000000"][0][1].lower()
    assert rep.damaged_shards == [0, 1]
    assert "shard 000001: data.zarr/bits/000001: sample 6 (" in rep.format()


@pytest.mark.parametrize("fmt", ["wds", "h5"])
def test_tc_damaged_blob_in_wds_and_h5(tc_src, tmp_path, fmt):
    """A flipped byte inside one stored blob (no chunk checksums in these formats: the blob's
    CRC32 is the check): verify names the sample, the loader skips exactly it."""
    from scatstore.loaders.stream import loader
    from scatstore.stores import StoreError, open_dataset, verify

    out = tmp_path / "out"
    m = _encode_tc(tc_src, out, format=fmt)
    ds = open_dataset(out)
    victim = 7
    blob = ds.get(victim, raw=True)[0]
    sh = int(ds._shard_of[victim])
    rel = next(r for r in m["store"]["shards"][sh]["files"] if r.endswith((".tar", ".h5")))
    data = bytearray((out / rel).read_bytes())
    at = bytes(data).find(blob)
    assert at > 0 and bytes(data).find(blob, at + 1) < 0
    data[at + len(blob) // 2] ^= 0x08
    (out / rel).write_bytes(bytes(data))
    _refresh_checksums(out, rel)
    rep = verify(out)
    assert not rep.ok
    assert rep.damaged == [(sh, rel, f"sample {victim} ({ds.keys[victim]!r}): CRC32 mismatch "
                                     "(damaged bytes)")]
    ref = open_dataset(out)
    with pytest.raises(StoreError, match=rf"sample {ds.keys[victim]!r} \(index {victim}\) of "
                                         rf"shard {sh:06d} is damaged: CRC32"):
        for _ in loader(out, 4, shuffle=False)(0):
            pass
    L = loader(out, 4, shuffle=True, seed=2, drop_last=False, skip_damaged=True)
    kept = [int(i) for i in L(0).plan.order if int(i) != victim]
    rows = [r for xb, _ in L(0) for r in xb.numpy()]
    assert len(rows) == len(kept) == len(ds) - 1 and L.reader.damaged == {victim}
    for r, i in zip(rows, kept):
        np.testing.assert_array_equal(r, ref[i][0].reshape(51, 16, 16))
