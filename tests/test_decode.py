"""decode_image against PIL (an independent decoder front-end) and on the real-ImageNet traps."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from scatstore.sources import DecodeError, decode_image, decode_image_reduced, make_trap_files
from scatstore.sample_data import load_image
from scatstore.sources.decode import read_jpeg_info


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", **{"quality": 90, **kw})
    return buf.getvalue()


def _png(img, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", **kw)
    return buf.getvalue()


def _pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.fixture(scope="module")
def traps(tmp_path_factory):
    d = tmp_path_factory.mktemp("traps")
    return d, make_trap_files(d)


# --------------------------------------------------------------------------------------------
# agreement with PIL


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_jpeg_matches_pil(astronaut, subsampling):
    data = _jpeg(astronaut, subsampling=subsampling)
    ours = decode_image(data)
    ref = _pil_rgb(data)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == astronaut.shape
    assert ours.flags["C_CONTIGUOUS"]
    diff = np.abs(ours.astype(int) - ref.astype(int))
    # Both are libjpeg-turbo with the accurate integer IDCT and fancy upsampling: measured
    # max 0 / mean 0 here. Allow 1 grey level for a different libjpeg-turbo build.
    assert diff.max() <= 1 and diff.mean() <= 0.01
    # and the JPEG itself is close to the original pixels
    assert np.abs(ours.astype(int) - astronaut.astype(int)).mean() < 4


def test_progressive_jpeg_matches_pil(astronaut):
    data = _jpeg(astronaut, progressive=True)
    diff = np.abs(decode_image(data).astype(int) - _pil_rgb(data).astype(int))
    assert diff.max() <= 1


def test_png_exact(astronaut):
    data = _png(astronaut)
    out = decode_image(data)
    np.testing.assert_array_equal(out, astronaut)
    np.testing.assert_array_equal(out, _pil_rgb(data))


def test_png_named_jpeg_from_path(tmp_path, astronaut):
    p = tmp_path / "n01440764_1.JPEG"
    p.write_bytes(_png(astronaut))
    np.testing.assert_array_equal(decode_image(p), astronaut)
    np.testing.assert_array_equal(decode_image(str(p)), astronaut)


def test_grayscale_and_modes(astronaut):
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    out = decode_image(_png(gray))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    gj = _jpeg(gray)
    out = decode_image(gj)
    assert out.shape == astronaut.shape
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out.astype(int) - _pil_rgb(gj).astype(int)).max() <= 1
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 77, np.uint8)])
    np.testing.assert_array_equal(decode_image(_png(rgba)), astronaut)   # alpha dropped
    pal = Image.fromarray(astronaut).convert("P", palette=Image.ADAPTIVE, colors=32)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue()), np.asarray(pal.convert("RGB")))


def test_16bit_png_scaled_to_8bit():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    out = decode_image(_png(ramp))
    expected = np.round(ramp / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.shape == (64, 64, 3)


@pytest.mark.parametrize("adobe", [True, False], ids=["adobe-inverted", "plain"])
def test_cmyk_matches_pil_exactly(astronaut, adobe):
    # was: libjpeg-turbo's own CMYK -> RGB, +1 grey level on 99.6 % of pixels
    buf = io.BytesIO()
    Image.fromarray(astronaut).convert("CMYK").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    if not adobe:  # without its APP14 Adobe segment: Pillow still reads it inverted, as we do
        i = data.find(b"Adobe") - 4
        assert data[i:i + 2] == b"\xff\xee"
        n = int.from_bytes(data[i + 2:i + 4], "big")
        data = data[:i] + data[i + 2 + n:]
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    ours = decode_image(data)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(ours, ref)
    assert np.abs(ours.astype(int) - astronaut.astype(int)).mean() < 4
    # the DCT-reduced decode too, against PIL's draft mode (the same libjpeg scaling)
    reduced, f = decode_image_reduced(data, min_short=128)
    im = Image.open(io.BytesIO(data))
    im.draft("CMYK", (reduced.shape[1], reduced.shape[0]))
    assert f == 4 and im.size == (reduced.shape[1], reduced.shape[0])
    np.testing.assert_array_equal(reduced, np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("mode", ["F", "I;16", "I"])
def test_one_channel_float_and_wide_integer_images_keep_their_range(mode):
    # was: mode F in [0, 1] decoded almost black (values taken as 0..255)
    camera = np.asarray(Image.fromarray(load_image("camera")).convert("L"))
    if mode == "F":
        arr, expect = camera.astype(np.float32) / 255.0, camera          # [0, 1] convention
    elif mode == "I;16":
        arr = camera.astype(np.uint16) * 257                              # full 16-bit range
        expect = camera
    else:
        arr, expect = camera.astype(np.int32), camera                     # 8-bit values in I
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode if mode != "I;16" else None).save(buf, "TIFF")
    out = decode_image(buf.getvalue())
    assert out.shape == (*camera.shape, 3)
    np.testing.assert_array_equal(out[..., 0], expect)
    # a binary mask stored as 0/1 comes out black and white, not black
    buf = io.BytesIO()
    Image.fromarray((camera > 128).astype(np.float32), mode="F").save(buf, "TIFF")
    np.testing.assert_array_equal(decode_image(buf.getvalue())[..., 0],
                                  np.where(camera > 128, 255, 0))


def test_float_image_with_nan_is_refused():
    arr = np.ones((16, 16), np.float32)
    arr[3, 4] = np.nan
    buf = io.BytesIO()
    Image.fromarray(arr, mode="F").save(buf, "TIFF")
    with pytest.raises(DecodeError, match="corrupt"):
        decode_image(buf.getvalue())


# --------------------------------------------------------------------------------------------
# EXIF orientation


def _exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(astronaut, orientation):
    img = np.ascontiguousarray(astronaut[:200, :320])   # non-square, to catch transposes
    data = _jpeg(img, exif=_exif(orientation))
    assert read_jpeg_info(data)["orientation"] == orientation
    ours = decode_image(data)
    ref = _pil_rgb(data)
    assert ours.shape == ref.shape
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert ours.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_png(astronaut, orientation):
    img = np.ascontiguousarray(astronaut[:200, :320])
    data = _png(img, exif=_exif(orientation))
    np.testing.assert_array_equal(decode_image(data), _pil_rgb(data))


# --------------------------------------------------------------------------------------------
# failures


@pytest.mark.parametrize("progressive", [False, True])
def test_truncation_never_yields_an_image(astronaut, progressive):
    data = _jpeg(astronaut, progressive=progressive)
    sos = read_jpeg_info(data)["sos"]
    cuts = [3, 10, 100, sos - 5, sos + 20] + [int(len(data) * f) for f in
                                               (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)] + [len(data) - 1]
    for cut in cuts:
        for tail in (b"", b"\x00" * 2000, b"\xff\xd9"):   # cut, zero-padded, fake EOI appended
            # (len - 1 keeps the 0xFF of the EOI: "FF FF D9" is a legal, complete file)
            if tail == b"\xff\xd9" and cut == len(data) - 1:
                continue
            with pytest.raises(DecodeError) as ei:
                decode_image(data[:cut] + tail)
            assert ei.value.code in ("truncated", "corrupt"), (cut, tail[:2], ei.value)
            if cut > sos:
                assert ei.value.code == "truncated", (cut, tail[:2], ei.value)


def test_truncated_png(astronaut):
    data = _png(astronaut)
    # (cutting only the IEND chunk / last CRC leaves every pixel: PIL then decodes it whole)
    for cut in (20, 100, len(data) // 2, len(data) - 30):
        with pytest.raises(DecodeError) as ei:
            decode_image(data[:cut])
        assert ei.value.code == "truncated", (cut, ei.value)


def test_bomb_refused_before_decoding(astronaut):
    data = _jpeg(astronaut)   # 512 x 512
    assert decode_image(data, max_pixels=512 * 512).shape == (512, 512, 3)
    with pytest.raises(DecodeError) as ei:
        decode_image(data, max_pixels=512 * 512 - 1)
    assert ei.value.code == "too_large"
    with pytest.raises(DecodeError) as ei:
        decode_image(_png(astronaut), max_pixels=1000)
    assert ei.value.code == "too_large"


def test_empty_missing_and_not_an_image(tmp_path):
    for data, code in [(b"", "empty"), (b"hello world, not a picture\n" * 10, "not_an_image"),
                       (b"\xff\xd8", "not_an_image"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 30,
                                                       "corrupt")]:
        with pytest.raises(DecodeError) as ei:
            decode_image(data)
        assert ei.value.code == code, (data[:10], ei.value)
        assert isinstance(ei.value, ValueError)
    with pytest.raises(DecodeError) as ei:
        decode_image(tmp_path / "nope.JPEG")
    assert ei.value.code == "io_error"


def test_extraneous_bytes_tolerated(astronaut):
    data = _jpeg(astronaut)
    bad = data[:20] + b"\x00junk" + data[20:]
    np.testing.assert_array_equal(decode_image(bad), decode_image(data))


def test_trap_files(traps):
    d, expected = traps
    assert {"cmyk.JPEG", "png_named.JPEG", "gray.JPEG", "exif_rotated.JPEG", "tiny.JPEG",
            "bomb.JPEG", "truncated.JPEG", "empty.JPEG", "text.JPEG"} <= set(expected)
    for name, outcome in expected.items():
        if outcome == "ok":
            img = decode_image(d / name)
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
            assert img.flags["C_CONTIGUOUS"]
        else:
            with pytest.raises(DecodeError) as ei:
                decode_image(d / name)
            assert ei.value.code == outcome, (name, ei.value)
    assert decode_image(d / "tiny.JPEG").shape == (6, 8, 3)
    raw = (d / "exif_rotated.JPEG").read_bytes()
    assert Image.open(io.BytesIO(raw)).size == (226, 150)
    assert decode_image(raw).shape == (226, 150, 3)     # orientation 6: rotated upright
    assert (d / "bomb.JPEG").stat().st_size < 2000       # a tiny file claiming 40000 x 40000


def test_trap_files_deterministic(tmp_path):
    a = make_trap_files(tmp_path / "a")
    b = make_trap_files(tmp_path / "b")
    assert a == b
    for name in a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --------------------------------------------------------------------------------------------
# reduced (DCT-scaled) decoding


@pytest.fixture(scope="module")
def retina_jpeg() -> bytes:
    from scatstore.sample_data import load_image

    return _jpeg(load_image("retina"))    # a real 1411 x 1411 photograph


def test_reduced_decode_matches_pil_draft(retina_jpeg):
    # PIL's draft mode asks libjpeg for the same DCT scaling: an independent front-end
    for min_short, f in [(0, 1), (300, 4), (353, 4), (354, 2), (706, 2), (707, 1), (100, 8)]:
        img, got = decode_image_reduced(retina_jpeg, min_short=min_short)
        assert got == f, (min_short, got)
        side = -(-1411 // f)
        assert img.shape == (side, side, 3) and img.flags["C_CONTIGUOUS"]
        im = Image.open(io.BytesIO(retina_jpeg))
        im.draft("RGB", (1411 // f, 1411 // f))   # PIL picks the scale by floor division
        ref = np.asarray(im.convert("RGB"))
        assert ref.shape == img.shape
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1, min_short
    np.testing.assert_array_equal(decode_image_reduced(retina_jpeg)[0], decode_image(retina_jpeg))


def test_reduced_decode_longer_side_orientation_and_other_formats(astronaut):
    img = np.ascontiguousarray(astronaut[:200, :512])
    data = _jpeg(img, exif=_exif(6))                       # stored 512 wide, upright 200 x 512
    out, f = decode_image_reduced(data, min_long=120)
    assert f == 4 and out.shape == (128, 50, 3)             # ceil(512/4) x ceil(200/4), turned
    full = decode_image(data)
    assert full.shape == (512, 200, 3)
    # the reduced image is the full one, smaller (block averages, up to JPEG's own error)
    small = full.reshape(128, 4, 50, 4, 3).mean(axis=(1, 3))
    assert np.abs(out.astype(float) - small).mean() < 3
    # other formats are never reduced
    png, f = decode_image_reduced(_png(astronaut), min_short=10)
    assert f == 1
    np.testing.assert_array_equal(png, astronaut)


def test_reduced_decode_keeps_the_checks(astronaut):
    data = _jpeg(astronaut)
    with pytest.raises(DecodeError) as ei:
        decode_image_reduced(data[:len(data) // 2], min_short=64)
    assert ei.value.code == "truncated"
    with pytest.raises(DecodeError) as ei:     # the pixel limit is on the full size
        decode_image_reduced(data, min_short=64, max_pixels=512 * 512 - 1)
    assert ei.value.code == "too_large"
