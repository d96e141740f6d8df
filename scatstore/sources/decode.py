"""Robust image decoding: whole, sane RGB images or a :class:`DecodeError` with a reason.

Rules (see ``docs/sources.md``):

* The format is sniffed from the magic bytes, never from the file name (ImageNet has PNGs and
  CMYK JPEGs named ``.JPEG``).
* JPEG (the fast path) is decoded by libjpeg-turbo through ``simplejpeg`` in strict mode. Before
  decoding, a small pure-Python marker walk reads the frame size (decompression-bomb check), the
  EXIF orientation and the position of the first scan; the file must hold an EOI marker after
  that scan. A truncated JPEG is therefore rejected twice over: no EOI, and libjpeg's
  "premature end" warning, which strict mode turns into an error. It is never half-decoded.
* Everything else, and JPEGs that libjpeg-turbo/simplejpeg refuses for a reason other than
  truncation (odd sampling factors, harmless "extraneous bytes" warnings, 12-bit), goes through
  PIL, whose loader raises on truncated data (``LOAD_TRUNCATED_IMAGES`` is left ``False``).
* EXIF orientation is applied (both paths); CMYK (Adobe inverted convention, as PIL and
  libjpeg-turbo assume for JPEG), YCCK, grayscale, LA, P, RGBA (alpha dropped, like PIL's
  ``convert("RGB")``) become RGB; 16-bit images are scaled to 8 bits (``round(v / 257)``).
* The pixel count is read from the header and checked against ``max_pixels`` before any pixel is
  decoded. For non-JPEG files PIL's own limit (``Image.MAX_IMAGE_PIXELS`` × 2) applies as well.
* :func:`decode_image_reduced` may decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling:
  each 8×8 block's coefficients are inverse-transformed straight to 4×4, 2×2 or 1×1 pixels, a
  coarse antialiased reduction that saves the inverse transforms, upsampling and colour
  conversion of the detail dropped; entropy decoding remains: 1.3-1.6× faster) when the caller
  says how large the result must stay; the encode engine uses it for images ≥ 6× the frame.
"""
from __future__ import annotations

import io
import os
import struct

import numpy as np

__all__ = ["DecodeError", "decode_image", "decode_image_reduced", "DEFAULT_MAX_PIXELS",
           "sniff_format", "read_jpeg_info", "jpeg_reduction", "jpeg_size"]

# PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS): about 13,377 x 13,377.
DEFAULT_MAX_PIXELS = 178_956_970

DECODE_ERROR_CODES = ("empty", "truncated", "not_an_image", "too_large", "corrupt", "io_error")


class DecodeError(ValueError):
    """An input that is not a whole, sane image. ``code`` is short and machine-readable."""

    def __init__(self, code: str, detail: str = ""):
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


# --------------------------------------------------------------------------------------------
# format sniffing


def sniff_format(data: bytes) -> str | None:
    """Return ``"jpeg"``, ``"png"``, ``"gif"``, ``"bmp"``, ``"webp"``, ``"tiff"``, ``"pnm"``,
    ``"jpeg2000"`` or None (not an image this module accepts)."""
    head = bytes(data[:16])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "pnm"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return "jpeg2000"
    return None


# --------------------------------------------------------------------------------------------
# JPEG marker walk

# libjpeg warnings (turned into errors by simplejpeg's strict mode) that leave every pixel intact
_HARMLESS_WARNINGS = ("extraneous bytes before marker", "unknown jfif revision",
                      "jfif extension marker", "thumbnail image size does not match",
                      "adobe app14 marker")

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _exif_orientation(payload: bytes) -> int:
    """Orientation tag (0x0112) from an APP1 ``Exif\\0\\0`` payload; 1 when absent or malformed."""
    tiff = payload[6:]
    if len(tiff) < 8:
        return 1
    if tiff[:2] == b"II":
        e = "<"
    elif tiff[:2] == b"MM":
        e = ">"
    else:
        return 1
    try:
        (ifd,) = struct.unpack_from(e + "I", tiff, 4)
        (n,) = struct.unpack_from(e + "H", tiff, ifd)
        for k in range(min(n, 512)):
            tag, typ, _count = struct.unpack_from(e + "HHI", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                if typ == 3:  # SHORT
                    (v,) = struct.unpack_from(e + "H", tiff, ifd + 2 + 12 * k + 8)
                elif typ == 4:  # LONG (non-standard but seen)
                    (v,) = struct.unpack_from(e + "I", tiff, ifd + 2 + 12 * k + 8)
                else:
                    return 1
                return v if 1 <= v <= 8 else 1
    except struct.error:
        return 1
    return 1


def read_jpeg_info(data: bytes) -> dict:
    """Walk the JPEG markers up to the first scan.

    Returns ``{"height", "width", "components", "orientation", "sos", "complete", "junk"}`` where
    ``sos`` is the offset of the first SOS marker, ``complete`` tells whether an EOI marker follows
    it (0xFFD9 cannot occur inside entropy-coded data, whose 0xFF bytes are stuffed) and ``junk``
    lists the (start, end) byte ranges of extraneous bytes between header segments. Raises
    :class:`DecodeError` (``truncated`` / ``corrupt``) when the header itself is cut or broken.
    """
    n = len(data)
    pos = 2
    height = width = comps = None
    orientation = 1
    junk: list[tuple[int, int]] = []
    while True:
        # skip fill bytes before a marker
        if pos >= n:
            raise DecodeError("truncated", "JPEG header ends before the first scan")
        if data[pos] != 0xFF:
            # extraneous bytes between segments: libjpeg skips them with a warning
            nxt = data.find(b"\xff", pos)
            if nxt < 0:
                raise DecodeError("truncated", "JPEG header ends before the first scan")
            junk.append((pos, nxt))
            pos = nxt
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise DecodeError("truncated", "JPEG header ends before the first scan")
        marker = data[pos]
        pos += 1
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if marker == 0xD9:
            raise DecodeError("corrupt", "JPEG ends (EOI) before any scan")
        if pos + 2 > n:
            raise DecodeError("truncated", "JPEG header ends before the first scan")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise DecodeError("corrupt", "bad JPEG segment length")
        seg_end = pos + length
        if seg_end > n:
            raise DecodeError("truncated", "JPEG header ends inside a segment")
        if marker in _SOF_MARKERS and height is None:
            if length < 8:
                raise DecodeError("corrupt", "short JPEG frame header")
            _p, height, width, comps = struct.unpack_from(">BHHB", data, pos + 2)
        elif marker == 0xE1 and data[pos + 2:pos + 8] == b"Exif\x00\x00" and orientation == 1:
            orientation = _exif_orientation(bytes(data[pos + 2:seg_end]))
        elif marker == 0xDA:
            if height is None:
                raise DecodeError("corrupt", "JPEG scan before frame header")
            sos = pos - 2
            complete = data.rfind(b"\xff\xd9", seg_end) >= 0
            return {"height": height, "width": width, "components": comps,
                    "orientation": orientation, "sos": sos, "complete": complete,
                    "junk": junk}
        pos = seg_end


# --------------------------------------------------------------------------------------------
# orientation


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W, C) array, as ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return img[:, ::-1]
    if orientation == 3:
        return img[::-1, ::-1]
    if orientation == 4:
        return img[::-1]
    if orientation == 5:
        return img.transpose(1, 0, 2)
    if orientation == 6:
        return img.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return img.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return img.transpose(1, 0, 2)[::-1]
    return img


# --------------------------------------------------------------------------------------------
# decoders


def jpeg_reduction(height: int, width: int, min_short: int = 0, min_long: int = 0) -> int:
    """The largest DCT reduction ``f`` in (8, 4, 2, 1) whose decoded image, ``ceil(height / f)`` ×
    ``ceil(width / f)``, keeps its shorter side ≥ ``min_short`` and its longer side ≥ ``min_long``."""
    for f in (8, 4, 2):
        h, w = -(-height // f), -(-width // f)
        if min(h, w) >= min_short and max(h, w) >= min_long:
            return f
    return 1


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 CMYK as libjpeg outputs it -> RGB exactly as Pillow's ``convert("RGB")``:
    Pillow reads every CMYK JPEG in the Adobe (inverted) convention, ``CMYK;I`` (255 - v), then
    ``R = (255 - K) - round((255 - K) * C / 255)`` (its ``MULDIV255``), likewise G, B."""
    v = 255 - cmyk.astype(np.int32)
    nk = 255 - v[..., 3:4]
    t = v[..., :3] * nk + 128
    rgb = nk - (((t >> 8) + t) >> 8)
    return np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8))


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of a JPEG as :func:`decode_image` returns it (EXIF orientation
    applied), from its header alone."""
    info = read_jpeg_info(data)
    w, h = info["width"], info["height"]
    return (h, w) if info["orientation"] in (5, 6, 7, 8) else (w, h)


def _decode_jpeg_fast(data: bytes, max_pixels: int, min_short: int = 0, min_long: int = 0
                      ) -> tuple[np.ndarray, int] | None:
    """simplejpeg path: ``(array, reduction)``. None when PIL should try instead (never for
    truncation). ``min_short`` / ``min_long`` > 0 allow a DCT-scaled decode (see
    :func:`jpeg_reduction`)."""
    info = read_jpeg_info(data)
    h, w = info["height"], info["width"]
    if h == 0 or w == 0:
        raise DecodeError("corrupt", "JPEG with a zero dimension (DNL) is not supported")
    if h * w > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    if not info["complete"]:
        raise DecodeError("truncated", "no EOI marker after the image data")
    f = jpeg_reduction(h, w, min_short, min_long) if (min_short or min_long) else 1
    # Asking for exactly ceil(h / f) x ceil(w / f) makes libjpeg-turbo pick the scale 1/f itself
    # (the largest reduction whose output is at least that large).
    scale = {} if f == 1 else {"min_height": -(-h // f), "min_width": -(-w // f)}
    h, w = -(-h // f), -(-w // f)
    try:
        import simplejpeg
    except ImportError:  # pragma: no cover - simplejpeg is a dependency
        return None
    if info["junk"]:
        # Extraneous bytes between header segments (seen in ImageNet): libjpeg skips them with a
        # warning, which simplejpeg raises even with strict=False. Cut them out.
        parts, last = [], 0
        for a, b in info["junk"]:
            parts.append(data[last:a])
            last = b
        parts.append(data[last:])
        data = b"".join(parts)
    # CMYK / YCCK: decoded to CMYK and converted here, as Pillow converts (libjpeg-turbo's own
    # CMYK -> RGB rounds otherwise: +1 grey level on almost every pixel)
    colorspace = "CMYK" if info["components"] == 4 else "RGB"
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True, **scale)
    except ValueError as exc:
        msg = str(exc).lower()
        if "premature end" in msg:
            # "Premature end of JPEG file" or "... of data segment" (a hole before the EOI):
            # libjpeg (and PIL, which ignores the warning) would fill the rest with grey.
            raise DecodeError("truncated", str(exc)) from None
        if any(warning in msg for warning in _HARMLESS_WARNINGS):
            try:
                arr = simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=False, **scale)
            except ValueError:
                return None
        elif "corrupt jpeg data" in msg:
            # bad Huffman code, missing RST marker...: damaged pixels, refused
            raise DecodeError("corrupt", str(exc)) from None
        else:
            return None  # unsupported variant (odd sampling factors, 12-bit...): PIL decides
    if arr.ndim != 3 or arr.shape[2] != len(colorspace) or arr.shape[:2] != (h, w):
        return None
    if colorspace == "CMYK":
        arr = cmyk_to_rgb(arr)
    if info["orientation"] != 1:
        arr = apply_orientation(arr, info["orientation"])
    return np.ascontiguousarray(arr), f


def _one_channel_to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """One-channel integer or float pixels -> uint8, by the data's range convention:

    * values all within [0, 1] (float images, binary masks): ``round(v * 255)``;
    * mode ``F`` otherwise, and mode ``I`` with values within [0, 255]: 8-bit values as they are
      (rounded, clipped to [0, 255]);
    * 16-bit modes (``I;16*``) and ``I`` beyond 255: ``round(v / 257)`` (clipped to [0, 65535]).

    Non-finite float values are refused (``corrupt``)."""
    if mode == "F" or a.dtype.kind == "f":
        a = a.astype(np.float64)
        if a.size and not np.isfinite(a).all():
            raise DecodeError("corrupt", "float image with NaN or infinite pixel values")
    if a.size and a.min() >= 0 and a.max() <= 1:
        return np.round(a.astype(np.float64) * 255.0).astype(np.uint8)
    if mode == "F" or (mode == "I" and a.size and a.max() <= 255):
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    return ((np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def _pil_to_rgb(im) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a8 = _one_channel_to_8bit(np.asarray(im), mode)
        return np.ascontiguousarray(np.repeat(a8[:, :, None], 3, axis=2))
    if mode != "RGB":
        if mode in ("P", "PA") or mode.startswith("RGBA") or mode in ("LA", "La", "RGBa"):
            im = im.convert("RGBA") if mode in ("P", "PA") else im
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def _decode_pil(data: bytes, max_pixels: int) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        # a known signature that PIL cannot parse is a damaged image, not a non-image
        code = "corrupt" if sniff_format(data) else "not_an_image"
        raise DecodeError(code, str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        msg = str(exc)
        code = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise DecodeError(code, msg) from None
    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise DecodeError("corrupt", f"bad image size {w}x{h}")
        if w * h > max_pixels:
            raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _pil_to_rgb(im)
        except Image.DecompressionBombError as exc:
            raise DecodeError("too_large", str(exc)) from None
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError,
                TypeError, KeyError, ZeroDivisionError) as exc:
            msg = str(exc)
            low = msg.lower()
            code = "truncated" if ("truncat" in low or "premature" in low or "ended" in low) \
                else "corrupt"
            raise DecodeError(code, msg) from None
    finally:
        im.close()


def _read(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    try:
        with open(os.fspath(src), "rb") as f:
            return f.read()
    except OSError as exc:
        raise DecodeError("io_error", f"{type(exc).__name__}: {exc}") from None


def decode_image(src: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> np.ndarray:
    """Decode a file path or encoded bytes into a uint8 (H, W, 3) C-contiguous RGB array.

    Raises :class:`DecodeError` with ``code`` in ``empty``, ``truncated``, ``not_an_image``,
    ``too_large``, ``corrupt``, ``io_error``; never returns a partially decoded image.
    """
    return decode_image_reduced(src, max_pixels=max_pixels)[0]


def decode_image_reduced(src: str | os.PathLike | bytes, *, min_short: int = 0, min_long: int = 0,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """:func:`decode_image`, except that a JPEG may come out reduced by ``f`` in (2, 4, 8).

    ``f`` is the largest reduction that keeps the decoded shorter side ≥ ``min_short`` and the
    longer side ≥ ``min_long`` (both 0: never reduced); the result is then ``ceil(H / f)`` ×
    ``ceil(W / f)`` and source pixel coordinates map to it by ``/ f``. Other formats, and JPEGs
    that only PIL can decode, come out full size (``f == 1``). Returns ``(array, f)``; same checks
    and errors as :func:`decode_image` (the pixel limit applies to the full size).
    """
    data = _read(src)
    if len(data) == 0:
        raise DecodeError("empty", "0 bytes")
    fmt = sniff_format(data)
    if fmt == "jpeg":
        res = _decode_jpeg_fast(data, max_pixels, int(min_short), int(min_long))
        if res is not None:
            return res
    elif fmt is None:
        # Formats without a signature (TGA, ...) are not accepted: PIL would guess on any bytes.
        raise DecodeError("not_an_image", f"no known image signature (starts {data[:8]!r})")
    return _decode_pil(data, max_pixels), 1
