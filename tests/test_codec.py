"""The learned codec (method ``cae``): training, integer entropy tables, bitstreams, file format,
quality metrics and the CLI commands."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from scatstore.sample_data import PHOTOS, TEXTURES, load_image

codecs = pytest.importorskip("scatstore.codecs")
torch = pytest.importorskip("torch")

from scatstore.codecs import (  # noqa: E402
    CaeMethod,
    CodecFileError,
    CodecMismatchError,
    CorruptBitstreamError,
    EntropyTables,
    bitstream,  # noqa: E402
    center_crop,
    fit_codec,
    load_codec,
    ms_ssim,
    psnr,
    ssim,
)

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "coins")


@pytest.fixture(scope="session")
def train_images():
    return [load_image(n) for n in (*PHOTOS[:8], *TEXTURES)]


@pytest.fixture(scope="session")
def eval_images():
    return np.stack([center_crop(load_image(n), 64) for n in NAMES])


@pytest.fixture(scope="session")
def codec_file(tmp_path_factory, train_images):
    torch.set_num_threads(1)  # one thread: two are slower on a shared 2-core machine
    codec = fit_codec(train_images, channels=4, beta=0.01, steps=25, batch_size=4, size=32,
                      hidden=16, lr=3e-3, seed=0, progress=False)
    path = tmp_path_factory.mktemp("codec") / "tiny.cae"
    codec.save(path)
    return path


@pytest.fixture(scope="session")
def codec(codec_file):
    return load_codec(codec_file)


# ------------------------------------------------------------------ round trips


def test_symbols_round_trip_exactly_for_any_batch_size(codec, eval_images):
    symbols, clamped = codec.quantize(eval_images)
    assert symbols.dtype == np.int32 and symbols.shape == (8, 4, 8, 8)
    blobs = codec.encode(eval_images)
    assert len(blobs) == 8 and all(isinstance(b, bytes) for b in blobs)
    full = codec.decode_symbols(blobs)
    assert full.dtype == np.int32
    np.testing.assert_array_equal(full, symbols)
    for bs in (1, 3, 8):
        parts = [codec.decode_symbols(blobs[i:i + bs]) for i in range(0, 8, bs)]
        np.testing.assert_array_equal(np.concatenate(parts), symbols)
    # encoding in different batch sizes gives the same bytes
    again = codec.encode(eval_images[:3]) + codec.encode(eval_images[3:])
    assert again == blobs


def test_decode_images_and_dequantize(codec, eval_images):
    symbols = codec.decode_symbols(codec.encode(eval_images))
    lat = codec.dequantize(symbols)
    assert lat.dtype == torch.float32 and tuple(lat.shape) == (8, 4, 8, 8)
    assert torch.equal(lat, torch.from_numpy(symbols).float())
    rec = codec.decode_images(symbols)
    assert rec.dtype == np.uint8 and rec.shape == eval_images.shape
    assert np.isfinite(psnr(eval_images, rec)).all()


def test_other_sizes_multiple_of_8(codec):
    img = center_crop(load_image("astronaut"), 224)[None]
    blobs = codec.encode(img)
    sym = codec.decode_symbols(blobs)
    assert sym.shape == (1, 4, 28, 28)
    np.testing.assert_array_equal(sym, codec.quantize(img)[0])
    assert codec.decode_images(sym).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError):
        codec.encode(np.zeros((1, 3, 60, 60), np.uint8))
    with pytest.raises(ValueError, match="latent shape"):
        codec.decode_symbols(blobs + codec.encode(center_crop(load_image("coffee"), 64)[None]))


def test_entropy_tables_exact_on_random_symbols():
    rng = np.random.default_rng(0)
    pmfs = [rng.dirichlet(np.full(n, 0.3)) for n in (2, 5, 40, 200)]
    tables = EntropyTables.from_pmfs(pmfs, [-1, -2, -20, -100])
    assert all(int(tables.counts[c, :tables.length[c]].sum()) == 1 << 16 for c in range(4))
    sym = np.stack([rng.integers(tables.lo[c], tables.hi[c] + 1, size=(5, 7, 9)) for c in range(4)],
                   axis=1).astype(np.int32)
    sym[0, :, 0, 0] = tables.lo  # the extremes of every range, rare symbols included
    sym[0, :, 0, 1] = tables.hi
    blobs = tables.encode(sym)
    np.testing.assert_array_equal(tables.decode(blobs), sym)
    # tables rebuilt from the stored integers code identically (what load_codec does)
    clone = EntropyTables(tables.counts.copy(), tables.offset.copy(), tables.length.copy())
    assert clone.encode(sym) == blobs
    # out-of-range symbols are clamped, and counted
    wide = sym.copy()
    wide[1, 2, 3, 4] = tables.hi[2] + 50
    clamped, n = tables.clamp(wide)
    assert n == 1 and clamped[1, 2, 3, 4] == tables.hi[2]
    with pytest.raises(ValueError, match="clamp"):
        tables.encode(wide)


# ------------------------------------------------------------------ sizes and rates


def test_bitstream_bytes_match_header_and_method(codec_file, codec, eval_images):
    method = CaeMethod(codec_file)
    assert method.name == "cae" and method.dtype == "bytes" and method.sample_shape(224) is None
    assert method.params["codec_hash"] == codec.hash
    assert method.params["channels"] == 4
    blobs = method.encode(eval_images)
    for b in blobs:
        shape, payload = bitstream.unpack(b)
        assert shape == (4, 8, 8)
        # self-delimiting: the header announces exactly the bytes there are
        header = len(b) - len(payload) - 4
        assert 2 + 3 + 1 <= header <= 2 + 3 + 3
        assert len(b) == header + len(payload) + 4
    assert blobs == codec.encode(eval_images)
    # the method pickles (process workers) without its loaded codec, and reloads it
    clone = pickle.loads(pickle.dumps(method))
    assert clone.encode(eval_images[:2]) == blobs[:2]


def test_actual_bytes_within_3_percent_of_estimate(codec, train_images):
    images = np.stack([center_crop(im, 224) for im in train_images])
    blobs = codec.encode(images)
    actual = 8 * sum(len(b) for b in blobs)
    est_tables = codec.estimated_bits(images, source="tables").sum()
    est_model = codec.estimated_bits(images, source="model").sum()
    assert actual <= 1.03 * est_tables, (actual, est_tables)
    assert actual <= 1.03 * est_model, (actual, est_model)
    assert actual >= est_tables  # an entropy coder cannot beat the ideal code length


# ------------------------------------------------------------------ corruption


def test_corrupt_bitstreams_are_refused_naming_the_sample(codec, eval_images):
    blobs = codec.encode(eval_images[:2])
    names = ["n01440764_10026", "n01440764_10027"]
    good = blobs[1]
    cases = {
        "flipped payload byte": good[:8] + bytes([good[8] ^ 0x40]) + good[9:],
        "flipped crc byte": good[:-1] + bytes([good[-1] ^ 1]),
        "flipped shape byte": good[:2] + bytes([good[2] ^ 2]) + good[3:],
        "truncated": good[:-5],
        "trailing bytes": good + b"\0",
        "empty": b"",
        "wrong magic": b"\x00" + good[1:],
    }
    for what, bad in cases.items():
        with pytest.raises(CorruptBitstreamError) as info:
            codec.decode_symbols([blobs[0], bad], names)
        assert info.value.sample == names[1], what
        assert names[1] in str(info.value), what
    # every single-byte change anywhere is caught (CRC32 over header and payload)
    for pos in range(len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0xA5
        with pytest.raises(CorruptBitstreamError):
            codec.decode_symbols([bytes(bad)], ["x"])


# ------------------------------------------------------------------ codec file, hash


def test_codec_hash_mismatch_is_refused(codec):
    manifest = {"method": {"name": "cae", "params": {"codec_hash": codec.hash, "channels": 4}}}
    codec.check_compatible(manifest)  # fine
    other = {"method": {"name": "cae", "params": {"codec_hash": "sha256:" + "0" * 64}}}
    with pytest.raises(CodecMismatchError, match="hash mismatch"):
        codec.check_compatible(other)
    with pytest.raises(CodecMismatchError, match="no codec hash"):
        codec.check_compatible({"method": {"name": "scat1", "params": {"J": 3}}})


def test_codec_file_round_trip_without_pickle(codec_file, codec, eval_images, monkeypatch, tmp_path):
    raw = codec_file.read_bytes()
    assert raw[:8] == b"SSCAE\x00\x01\n"
    # nothing in loading may unpickle
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    again = load_codec(codec_file)
    monkeypatch.undo()
    assert again.hash == codec.hash and again.hash.startswith("sha256:")
    sym = codec.quantize(eval_images)[0]
    assert again.encode(eval_images) == codec.encode(eval_images)
    np.testing.assert_array_equal(again.decode_images(sym), codec.decode_images(sym))
    # saving again gives the same bytes and hash
    copy_path = tmp_path / "copy.cae"
    assert again.save(copy_path) == codec.hash
    assert copy_path.read_bytes() == raw
    # a damaged codec file is refused
    bad = bytearray(raw)
    bad[-10] ^= 1
    (tmp_path / "bad.cae").write_bytes(bytes(bad))
    with pytest.raises(CodecFileError, match="hash"):
        load_codec(tmp_path / "bad.cae")
    (tmp_path / "junk.cae").write_bytes(b"PK\x03\x04 not a codec")
    with pytest.raises(CodecFileError, match="magic"):
        load_codec(tmp_path / "junk.cae")


def test_training_reduces_loss_and_reports_bpp(train_images):
    seen = []
    codec = fit_codec(train_images, channels=2, beta=0.01, steps=12, batch_size=2, size=24,
                      hidden=8, seed=1, progress=lambda step, s: seen.append(s))
    assert len(seen) == 12 and all(np.isfinite(s["bpp"]) and s["bpp"] > 0 for s in seen)
    assert codec.info["final"]["bpp"] > 0 and codec.hash is None  # hash on save
    with pytest.raises(ValueError):
        fit_codec(train_images, channels=2, beta=0.01, steps=1, size=30, progress=False)


def test_ctrl_c_during_training_keeps_the_weights_so_far(train_images, tmp_path):
    def interrupt_at(n):
        def progress(step, stats):
            if step == n:
                raise KeyboardInterrupt
        return progress

    # interrupted in step 5's report: steps 0-5 done and kept, frozen into a working codec
    codec = fit_codec(train_images, channels=2, beta=0.01, steps=50, batch_size=2, size=24,
                      hidden=8, seed=1, progress=interrupt_at(5))
    # the update of step 5 was applied before its report raised: 6 steps are in the weights
    assert codec.info["stopped_at_step"] == 6 and codec.config["steps"] == 50
    codec.save(tmp_path / "early.cae")
    loaded = load_codec(tmp_path / "early.cae")
    assert loaded.info["stopped_at_step"] == 6
    x = np.stack([center_crop(train_images[0], 24)])  # the saved weights and tables are these
    assert loaded.encode(x) == codec.encode(x)
    assert np.array_equal(loaded.decode_images(loaded.decode_symbols(loaded.encode(x))),
                          codec.decode_images(codec.decode_symbols(codec.encode(x))))
    class Interrupted:  # Ctrl-C while the first batch is read: nothing worth keeping
        def batch(self, n):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_codec(Interrupted(), channels=2, beta=0.01, steps=50, batch_size=2, size=24, hidden=8,
                  seed=1, progress=False)


# ------------------------------------------------------------------ metrics


def test_ssim_matches_skimage_and_ms_ssim_sanity():
    from skimage.metrics import structural_similarity

    a = center_crop(load_image("astronaut"), 224)
    rng = np.random.default_rng(0)
    b = np.clip(a.astype(int) + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    ref = np.mean([structural_similarity(a[c], b[c], gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255)
                   for c in range(3)])
    assert ssim(a, b) == pytest.approx(ref, abs=1e-6)
    # HWC input and batches agree
    assert ssim(a.transpose(1, 2, 0), b.transpose(1, 2, 0)) == pytest.approx(ref, abs=1e-6)
    assert ms_ssim(a, a) == pytest.approx(1.0)
    noisy = [np.clip(a.astype(int) + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8)
             for s in (4, 12, 30)]
    vals = [ms_ssim(a, n) for n in noisy]
    assert 1.0 > vals[0] > vals[1] > vals[2] > 0.0
    batch = ms_ssim(np.stack([a, a]), np.stack(noisy[:2]))
    np.testing.assert_allclose(batch, vals[:2], rtol=1e-12)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(a[:, :100, :100], a[:, :100, :100])
    # PSNR: a known value
    c = a.copy()
    c[0, 0, 0] ^= 1  # one unit of error in 150,528 values
    assert psnr(a, c) == pytest.approx(10 * np.log10(255 ** 2 * a.size), rel=1e-9)
    assert psnr(a, a) == float("inf")


# ------------------------------------------------------------------ CLI


def test_fit_codec_cli(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    pytest.importorskip("scatstore.sources")
    from scatstore.cli.codec import fit_codec_cmd

    src = tmp_path / "src"
    src.mkdir()
    for n in ("astronaut", "brick", "coffee"):
        Image.fromarray(load_image(n)).save(src / f"{n}.png")
    out = tmp_path / "c.cae"
    res = CliRunner().invoke(fit_codec_cmd, [str(src), str(out), "--channels", "3", "--steps", "3",
                                             "--batch-size", "2", "--size", "24", "--hidden", "8"])
    assert res.exit_code == 0, res.output
    assert "sha256:" in res.output and "bpp" in res.output
    codec = load_codec(out)
    assert codec.channels == 3


def test_encode_store_decode_end_to_end(tmp_path, codec_file, codec):
    """Through the encode engine, every store format, the report and `scatstore decode`."""
    import json

    from click.testing import CliRunner
    from PIL import Image
    from scatstore.cli.codec import decode_cmd
    from scatstore.pipelines.encode import EncodeConfig, encode
    from scatstore.pipelines.report import report

    from scatstore import open_dataset

    src = tmp_path / "src"
    src.mkdir()
    for n in NAMES[:4]:
        Image.fromarray(load_image(n)).save(src / f"{n}.png")
    out = tmp_path / "store"
    results = {}
    for fmt in ("zarr", "wds", "h5"):
        encode(EncodeConfig(src=src, out=out / fmt, method="cae", codec=str(codec_file),
                            format=fmt, shard_size=2, size=64, progress=False),
               log=lambda m: None)
        ds = open_dataset(out / fmt)
        codec.check_compatible(ds.manifest)
        blobs = [bytes(ds[i][0]) for i in range(len(ds))]
        payload = sum(int(s.get("payload_bytes", 0)) for s in ds.manifest["store"]["shards"])
        assert payload == sum(len(b) for b in blobs)
        results[fmt] = codec.decode_symbols(blobs)
        quality = ds.manifest["quality"]
        assert quality["measured_samples"] == 4
        assert quality["rate_actual_over_estimate"] <= 1.2  # tiny 64² samples: headers weigh more
        r = report(out / fmt)
        assert r["quality"]["psnr_db"] == quality["psnr_db"]
        assert r["payload_bits_per_pixel"] == pytest.approx(8 * payload / (4 * 64 * 64))
    for fmt in ("wds", "h5"):
        np.testing.assert_array_equal(results[fmt], results["zarr"])
    res = CliRunner().invoke(decode_cmd, [str(out / "zarr"), "--out", str(tmp_path / "png"),
                                          "--codec", str(codec_file), "--json"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "png").glob("*.png"))) == 4
    decoded = json.loads(res.output[res.output.index("{"):])
    # the manifest's PSNR (all 4 samples measured at encode time) is what decode finds again
    assert decoded["psnr_db"] == pytest.approx(quality["psnr_db"], abs=1e-6)


# ------------------------------------------------------------------ rate-distortion, v2


def test_lower_beta_buys_rate_and_quality_on_held_out_photos(train_images, eval_images):
    """Fixed β, no target: the smaller rate weight must give a higher rate AND a higher PSNR."""
    torch.set_num_threads(1)
    out = {}
    for beta in (0.2, 0.002):
        codec = fit_codec(train_images, channels=4, beta=beta, steps=200, batch_size=8, size=32,
                          hidden=16, lr=3e-3, seed=0, progress=False)
        bits = codec.estimated_bits(eval_images, source="tables").mean()
        rec = codec.decode_images(codec.decode_symbols(codec.encode(eval_images)))
        out[beta] = (bits, float(np.mean(psnr(eval_images, rec))))
    (bits_hi_beta, psnr_hi_beta), (bits_lo_beta, psnr_lo_beta) = out[0.2], out[0.002]
    assert bits_lo_beta > 1.5 * bits_hi_beta, out
    assert psnr_lo_beta > psnr_hi_beta + 0.5, out


@pytest.fixture(scope="session")
def hyper_codec(train_images, tmp_path_factory):
    torch.set_num_threads(1)
    codec = fit_codec(train_images, channels=4, beta=0.01, steps=15, batch_size=4, size=32,
                      hidden=8, prior="hyper", hyper_channels=3, hyper_hidden=8, lr=3e-3, seed=0,
                      progress=False)
    path = tmp_path_factory.mktemp("hyper") / "hyper.cae"
    codec.save(path)
    return load_codec(path)


def _reference_index(hs, z):
    """The integer hyper-synthesis in plain int64 numpy, loops over taps (independent of torch)."""
    from scatstore.codecs import hyper

    def deconv(a, w, b):  # stride 2, padding 2, output_padding 1, kernel 5
        B, _, h, wd = a.shape
        co = w.shape[1]
        full = np.zeros((B, co, 2 * h + 4, 2 * wd + 4), dtype=np.int64)
        for i in range(5):
            for j in range(5):
                full[:, :, i:i + 2 * h:2, j:j + 2 * wd:2] += np.einsum("bchw,co->bohw", a, w[:, :, i, j])
        return full[:, :, 2:2 + 2 * h, 2:2 + 2 * wd] + b.reshape(1, -1, 1, 1)

    def conv3(a, w, b):
        B, ci, h, wd = a.shape
        pad = np.zeros((B, ci, h + 2, wd + 2), dtype=np.int64)
        pad[:, :, 1:-1, 1:-1] = a
        out = np.zeros((B, w.shape[0], h, wd), dtype=np.int64)
        for i in range(3):
            for j in range(3):
                out += np.einsum("bchw,oc->bohw", pad[:, :, i:i + h, j:j + wd], w[:, :, i, j])
        return out + b.reshape(1, -1, 1, 1)

    def shift(acc, k):  # acc·2^k, floored, per output channel (>> floors on int64)
        out = np.empty_like(acc)
        for o, kk in enumerate(k):
            out[:, o] = acc[:, o] << kk if kk >= 0 else acc[:, o] >> -kk
        return out

    a, f = z.astype(np.int64), 0
    for i, (w, b) in enumerate(zip(hs.weights, hs.biases)):
        acc = (deconv if i < 2 else conv3)(a, w.astype(np.int64), b)
        s = [int(v) + f for v in hs.shifts[i]]
        if i < 2:
            a = np.clip(shift(acc, [hyper.ACT_BITS - v for v in s]), 0, hyper.ACT_MAX)
            f = hyper.ACT_BITS
        else:  # floor(acc·2^-s + 1/2) per output channel
            t = np.empty_like(acc)
            for o, v in enumerate(s):
                t[:, o] = acc[:, o] << -v if v <= 0 else (acc[:, o] + (1 << (v - 1))) >> v
            return np.clip(t, 0, hyper.SCALE_LEVELS - 1)


def test_hyperprior_round_trips_exactly_for_batch_sizes_1_and_7(hyper_codec, train_images):
    codec = hyper_codec
    assert codec.prior == "hyper" and codec.params["bitstream_version"] == 2
    images = np.stack([center_crop(im, 64) for im in train_images[:7]])
    symbols, _ = codec.quantize(images)
    blobs = codec.encode(images)
    full = codec.decode_symbols(blobs)
    np.testing.assert_array_equal(full, symbols)
    ones = np.concatenate([codec.decode_symbols([b]) for b in blobs])
    np.testing.assert_array_equal(ones, full)
    assert codec.encode(images[:1]) + codec.encode(images[1:]) == blobs
    # the scale indices: the torch float64 integer network equals an int64 numpy reference,
    # whatever the thread count
    _, z = codec.tables.decode(blobs, return_z=True)
    np.testing.assert_array_equal(codec.tables.indices(z, (8, 8)),
                                  _reference_index(codec.tables.synthesis, z)[..., :8, :8])
    # ... and on hyper-latents spanning the whole table range (many scale indices), whatever the
    # thread count and batch split
    zt = codec.tables.z_tables
    rng = np.random.default_rng(0)
    zr = np.stack([rng.integers(zt.lo[c], zt.hi[c] + 1, size=(7, 5, 5)) for c in range(zt.channels)],
                  axis=1).astype(np.int32)
    ref = _reference_index(codec.tables.synthesis, zr)
    assert len(np.unique(ref)) > 3
    for threads in (1, 2):
        torch.set_num_threads(threads)
        np.testing.assert_array_equal(codec.tables.indices(zr, (20, 20)), ref)
        np.testing.assert_array_equal(codec.tables.indices(zr[3:4], (20, 20)), ref[3:4])
    torch.set_num_threads(1)
    # side information is in the rate: actual bytes vs the tables' ideal code length (y and z)
    ideal = codec.estimated_bits(images, source="tables")
    actual = 8 * np.array([len(b) for b in blobs])
    assert np.all(actual >= ideal) and actual.sum() <= 1.05 * ideal.sum() + 8 * 20 * len(blobs)
    # damage is caught, and a factorized-prior stream is refused with a clear reason
    bad = bytearray(blobs[0])
    bad[len(bad) // 2] ^= 0x10
    with pytest.raises(CorruptBitstreamError):
        codec.decode_symbols([bytes(bad)], ["s0"])


def test_bitstream_kinds_are_not_mixed(codec, hyper_codec, eval_images):
    with pytest.raises(CorruptBitstreamError, match="scale hyperprior"):
        codec.decode_symbols(hyper_codec.encode(eval_images[:1]))
    with pytest.raises(CorruptBitstreamError, match="factorized"):
        hyper_codec.decode_symbols(codec.encode(eval_images[:1]))


def test_codec_files_from_before_still_load_and_decode():
    """tests/data/codec_v1_tiny.cae and its bitstream were written by the code before the v2
    change (commit d4818c6): they load, decode, and encode to the same bytes."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    old = load_codec(data / "codec_v1_tiny.cae")
    assert old.format_version == 1 and old.config["architecture"] == "cae-sgdn-v1"
    assert old.prior == "factorized"
    blob = (data / "codec_v1_tiny.astronaut64.bits").read_bytes()
    x = center_crop(load_image("astronaut"), 64)[None]
    np.testing.assert_array_equal(old.decode_symbols([blob]), old.quantize(x)[0])
    assert old.encode(x) == [blob]


GOLDEN_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass")


@pytest.fixture(scope="session")
def spread_hyper(hyper_codec, tmp_path_factory):
    """The tiny hyperprior codec with its hyper networks rescaled so that its seven 64²
    bitstreams use 14 scale indices (the trained one uses one or two), saved and reloaded, with
    those bitstreams and their symbols. That the coder writes the same bytes as the coder before
    the batched decoder (commit 8a87dc7) is checked by benchmarks/entropy_coding.py, which runs
    both side by side."""
    import copy

    from scatstore.codecs.codec import Codec
    from scatstore.codecs.train import freeze_tables

    model = copy.deepcopy(hyper_codec.model)
    hs = model.hyper_synthesis
    with torch.no_grad():
        weights = [p for n, p in model.named_parameters()
                   if n.startswith("hyper_analysis") and n.endswith("weight")]
        weights[-1].mul_(32)
        hs.l2.weight.mul_(32)
        hs.l2.bias.copy_(torch.linspace(-12.0, 12.0, hs.l2.bias.numel()))
    path = tmp_path_factory.mktemp("spread") / "hyper.cae"
    Codec(model, freeze_tables(model), hyper_codec.config, None, hyper_codec.info, "cpu").save(path)
    codec = load_codec(path)
    x = np.stack([center_crop(load_image(n), 64) for n in GOLDEN_NAMES])
    return codec, codec.encode(x), codec.quantize(x)[0]


@pytest.mark.parametrize("native", [True, False], ids=["c-grouping", "numpy-grouping"])
def test_hyperprior_bitstreams_decode_identically_in_any_split(spread_hyper, monkeypatch, native):
    from scatstore.codecs import hyper

    if not native:
        monkeypatch.setattr(hyper, "_group_lib", lambda: None)
    codec, blobs, symbols = spread_hyper
    assert codec.prior == "hyper" and len(blobs) == 7
    _, z = codec.tables.decode(blobs, return_z=True)
    assert len(np.unique(codec.tables.indices(z, (8, 8)))) > 10
    for split in ([7], [1] * 7, [3, 4], [2, 5]):
        cuts = np.cumsum([0, *split])
        got = np.concatenate([codec.decode_symbols(blobs[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
        np.testing.assert_array_equal(got, symbols)
    # the integer path re-encodes the same bytes, in any batch split
    assert codec.encode_symbols(symbols) == blobs
    assert codec.encode_symbols(symbols[:1]) + codec.encode_symbols(symbols[1:]) == blobs
    # and the images encode to those bytes in another batch split too
    x = np.stack([center_crop(load_image(n), 64) for n in GOLDEN_NAMES])
    assert codec.encode(x[:3]) + codec.encode(x[3:]) == blobs


def test_grouping_kernels_equal_the_numpy_path(spread_hyper):
    """The C grouping kernels (hyper.py's stream order) give the NumPy path's integers: on the
    golden codec's real scale indices and on indices spread over the whole table."""
    from scatstore.codecs import hyper

    if hyper._group_lib() is None:
        pytest.skip(f"no native kernels: {hyper._GROUP_LIB.info()['reason']}")
    codec, blobs, symbols = spread_hyper
    t = codec.tables.y_tables
    _, z = codec.tables.decode(blobs, return_z=True)
    rng = np.random.default_rng(1)
    spread = rng.integers(0, hyper.SCALE_LEVELS, size=(5, 3000)).astype(np.uint8)
    for idx in (codec.tables.indices(z, (8, 8)).reshape(len(z), -1), spread):
        sym = rng.integers(t.lo[idx], t.hi[idx] + 1).astype(np.int32)
        got = hyper.group_symbols(idx, sym, t.lo, t.length, native=True)
        ref = hyper.group_symbols(idx, sym, t.lo, t.length, native=False)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        assert got[2] == ref[2] == 0
        np.testing.assert_array_equal(hyper.count_levels(idx, native=True), got[1])
        for native in (True, False):
            back = hyper.ungroup_symbols(idx, got[0], got[1], t.offset, native=native)
            np.testing.assert_array_equal(back, sym)
        bad = sym.copy()
        bad[0, :7] = t.hi[idx[0, :7]] + 1
        bad[-1, -3:] = t.lo[idx[-1, -3:]] - 2
        assert hyper.group_symbols(idx, bad, t.lo, t.length, native=True)[2] == 10
        assert hyper.group_symbols(idx, bad, t.lo, t.length, native=False)[2] == 10
    # the fused last step of the integer network (C) equals torch's, cropped maps included
    syn = codec.tables.synthesis
    zt = codec.tables.z_tables
    zr = np.stack([rng.integers(zt.lo[c], zt.hi[c] + 1, size=(11, 5, 5)) for c in range(zt.channels)],
                  axis=1).astype(np.int32)
    for zz, shape in ((z, (8, 8)), (zr, (20, 20)), (zr, (18, 19)), (zr[:1], (7, 20))):
        fused = syn(zz, shape)
        try:
            syn.native = False
            plain = syn(zz, shape)
        finally:
            syn.native = None
        np.testing.assert_array_equal(fused, plain)
        np.testing.assert_array_equal(fused, _reference_index(syn, zz)[..., :shape[0], :shape[1]])


def test_rate_calibration_measures_the_bitstreams(tmp_path, codec, hyper_codec, spread_hyper,
                                                  train_images):
    """What the dual rate control steers (``deployed_bpp``: ideal code length under the tables
    frozen now, plus the stream overhead) is what encoding gives, for either prior; and a
    training run records the calibration ratio and the calibration crops' size."""
    from scatstore.codecs.train import STREAM_OVERHEAD_BYTES, CropSampler, deployed_bpp

    golden, _, _ = spread_hyper
    x = np.stack([center_crop(im, 64) for im in train_images[:6]])
    for c in (codec, hyper_codec, golden):
        actual = 8 * sum(len(b) for b in c.encode(x)) / (len(x) * 64 * 64)
        est = deployed_bpp(c.model, x, "cpu")
        assert abs(est - actual) * len(x) * 64 * 64 / 8 <= 3.0 * len(x), (est, actual)
    assert 10 <= STREAM_OVERHEAD_BYTES <= 16
    calib = CropSampler(train_images, 32).calibration(4, 224)
    assert calib.shape == (4, 3, 224, 224) and calib.dtype == np.uint8
    c = fit_codec(train_images, channels=4, beta=0.01, steps=12, batch_size=4, size=32, hidden=8,
                  prior="hyper", hyper_channels=3, hyper_hidden=8, target_bpp=0.5, seed=0,
                  progress=False, rate_size=64, rate_every=5, rate_images=3)
    assert c.config["rate_calibration"] == {"size": 64, "images": 3, "every": 5}
    assert c.info["rate_ratio"] is not None and c.info["rate_ratio"] > 0
    assert "bpp_deployed" in c.info["final"]


def test_future_codec_format_is_refused_clearly(hyper_codec, tmp_path):
    from pathlib import Path

    raw = bytearray(Path(hyper_codec.path).read_bytes())
    assert raw[:8] == b"SSCAE\x00\x01\n"
    at = raw.index(b'"format_version": 2')
    raw[at:at + 19] = b'"format_version": 9'
    (tmp_path / "future.cae").write_bytes(bytes(raw))
    with pytest.raises(CodecFileError, match="format version 9 is not supported"):
        load_codec(tmp_path / "future.cae")


def test_resume_from_checkpoint_continues_the_same_run(train_images, tmp_path):
    torch.set_num_threads(1)
    kw = {"channels": 2, "beta": 0.01, "steps": 8, "batch_size": 2, "size": 24, "hidden": 8, "seed": 3}

    def stop_at(n):
        def progress(step, stats):
            if step == n:
                raise KeyboardInterrupt
        return progress

    straight = fit_codec(train_images, progress=False, **kw)
    ckpt = tmp_path / "c.cae.ckpt"
    first = fit_codec(train_images, progress=stop_at(3), checkpoint=ckpt, **kw)
    assert first.info["stopped_at_step"] == 4 and ckpt.exists()
    resumed = fit_codec(train_images, progress=False, checkpoint=ckpt, **kw)
    assert resumed.info["resumed_at_step"] == 4 and resumed.info["steps_done"] == 8
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another training configuration"):
        fit_codec(train_images, progress=False, checkpoint=ckpt, **{**kw, "hidden": 4})


def test_fit_codec_cli_streams_a_raw_store_and_resumes(tmp_path):
    from click.testing import CliRunner
    from PIL import Image
    from scatstore.cli.codec import fit_codec_cmd
    from scatstore.pipelines.encode import EncodeConfig, encode

    torch.set_num_threads(1)
    src = tmp_path / "src"
    src.mkdir()
    for n in ("astronaut", "brick", "coffee", "grass"):
        Image.fromarray(load_image(n)).save(src / f"{n}.png")
    store = tmp_path / "raw"
    encode(EncodeConfig(src=src, out=store, method="raw", format="zarr", shard_size=2, size=64,
                        progress=False), log=lambda m: None)
    out = tmp_path / "c.cae"
    args = [str(store), str(out), "--channels", "3", "--batch-size", "2", "--size", "24",
            "--hidden", "8", "--prior", "hyper"]
    res = CliRunner().invoke(fit_codec_cmd, [*args, "--steps", "4"])
    assert res.exit_code == 0, res.output
    assert "raw store" in res.output and "hyper prior" in res.output
    assert load_codec(out).prior == "hyper"
    assert not (tmp_path / "c.cae.ckpt").exists()  # removed once the codec is written
    # --minutes bounds the training by wall clock
    res = CliRunner().invoke(fit_codec_cmd, [*args, "--minutes", "0.02"])
    assert res.exit_code == 0, res.output
    # a store of another method is refused in one line
    res = CliRunner().invoke(fit_codec_cmd, [str(tmp_path / "nothing"), str(out)])
    assert res.exit_code != 0


def test_hyperprior_codec_through_encode_and_the_loader(tmp_path, hyper_codec):
    from PIL import Image
    from scatstore.pipelines.encode import EncodeConfig, encode

    import scatstore

    src = tmp_path / "src"
    src.mkdir()
    for n in NAMES[:3]:
        Image.fromarray(load_image(n)).save(src / f"{n}.png")
    encode(EncodeConfig(src=src, out=tmp_path / "s", method="cae", codec=hyper_codec.path,
                        format="zarr", shard_size=2, size=64, progress=False), log=lambda m: None)
    ds = scatstore.open_dataset(tmp_path / "s")
    assert ds.manifest["method"]["params"]["prior"] == "hyper"
    blobs = [bytes(ds[i][0]) for i in range(len(ds))]
    symbols = hyper_codec.decode_symbols(blobs)
    x, _ = next(iter(scatstore.loader(tmp_path / "s", batch_size=3, shuffle=False)))
    assert torch.equal(x, torch.from_numpy(symbols).float())
    assert ds.manifest["quality"]["rate_actual_over_estimate"] <= 1.25


def test_larger_v2_transform_saves_as_format_2_and_round_trips(train_images, eval_images, tmp_path):
    torch.set_num_threads(1)
    codec = fit_codec(train_images, channels=3, beta=0.01, steps=3, batch_size=2, size=32, hidden=8,
                      architecture="cae-gdn-v2", seed=0, progress=False)
    codec.save(tmp_path / "v2.cae")
    again = load_codec(tmp_path / "v2.cae")
    assert again.format_version == 2 and again.config["architecture"] == "cae-gdn-v2"
    blobs = again.encode(eval_images)
    assert blobs == codec.encode(eval_images)
    np.testing.assert_array_equal(again.decode_symbols(blobs), codec.quantize(eval_images)[0])
    assert again.decode_images(again.decode_symbols(blobs)).shape == eval_images.shape
