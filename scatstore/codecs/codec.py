"""A trained, frozen codec: network weights + integer entropy tables + content hash."""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .bitstream import BITSTREAM_VERSION, CODER, EntropyTables
from .fileformat import FORMAT_VERSION, CodecFileError, read_codec, write_codec
from .hyper import HYPER_BITSTREAM_VERSION, HyperTables
from .model import CAE, build_model, rate_bits

STRIDE = 8


class CodecMismatchError(ValueError):
    """A dataset was encoded with another codec (or with none) than the one offered."""


def _as_images(images) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, S, S), got {tuple(t.shape)} {t.dtype}")
    if t.shape[2] % STRIDE or t.shape[3] % STRIDE:
        raise ValueError(f"image size {tuple(t.shape[2:])} is not a multiple of {STRIDE}")
    return t


def _find_key(obj, key: str):
    """First value of ``key`` anywhere in a nested dict/list (the manifest layout is the stores')."""
    if isinstance(obj, Mapping):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


@torch.no_grad()
def prepare_symbols(model, tables, symbols: np.ndarray, device, batch_size: int = 32):
    """Integer latents -> ``(symbols in range, side information, #clamped)`` under frozen
    ``tables``; the side information of the hyperprior is ``(z, scale indices)``, ``z`` the
    rounded hyper-analysis of the integer latents (so that encoding images and encoding their
    symbols agree)."""
    if isinstance(tables, HyperTables):
        outs = []
        for i in range(0, len(symbols), batch_size):
            yb = torch.from_numpy(np.asarray(symbols[i:i + batch_size], dtype=np.float32)).to(device)
            outs.append(torch.round(model.hyper_analysis(yb)).to(torch.int64).cpu().numpy())
        return tables.clamp(symbols, np.concatenate(outs))
    out, n = tables.clamp(symbols)
    return out, None, n


def ideal_bits(model, tables, symbols: np.ndarray, device, batch_size: int = 32) -> np.ndarray:
    """Ideal code length (bits per image) of integer latents under frozen ``tables``, after
    clamping, side information included."""
    symbols, side, _ = prepare_symbols(model, tables, symbols, device, batch_size)
    return tables.ideal_bits(symbols, *side) if side is not None else tables.ideal_bits(symbols)


class Codec:
    """Encoder/decoder network and frozen integer CDF tables, identified by ``hash``."""

    def __init__(self, model: CAE, tables: EntropyTables, config: dict, hash: str | None = None,
                 info: dict | None = None, device: str | torch.device = "cpu", path: str | None = None):
        self.model = model.eval()
        self.tables = tables
        self.config = dict(config)
        self.info = dict(info or {})
        self.hash = hash
        self.path = path
        self.device = torch.device(device)
        self.model.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ facts

    @property
    def channels(self) -> int:
        return self.tables.channels

    @property
    def format_version(self) -> int:
        """Codec file format version: 1 for the v1 architecture with the factorized prior (files as
        scatstore always wrote them), 2 for anything newer (an older scatstore refuses those with
        a clear message)."""
        v1 = self.config.get("architecture", "cae-sgdn-v1") == "cae-sgdn-v1" and self.prior == "factorized"
        return 1 if v1 else FORMAT_VERSION

    stride = STRIDE

    def latent_shape(self, size: int | tuple[int, int]) -> tuple[int, int, int]:
        h, w = (size, size) if isinstance(size, int) else size
        return (self.channels, h // STRIDE, w // STRIDE)

    @property
    def params(self) -> dict:
        """What a dataset manifest records about this codec."""
        return {
            "codec_hash": self.hash,
            "codec_format_version": self.format_version,
            "bitstream_version": HYPER_BITSTREAM_VERSION if self.prior == "hyper" else BITSTREAM_VERSION,
            "architecture": self.config.get("architecture", "cae-sgdn-v1"),
            "prior": self.prior,
            "entropy_coder": CODER,
            "table_precision": self.tables.precision,
            "channels": self.channels,
            "hidden": int(self.config.get("hidden", 0)),
            "stride": STRIDE,
            "codec_path": str(Path(self.path).resolve()) if self.path else None,
        }

    def check_compatible(self, manifest: Mapping) -> None:
        """Refuse a dataset whose recorded codec hash differs from ours (or that records none)."""
        stored = _find_key(manifest, "codec_hash")
        if stored is None:
            raise CodecMismatchError("the dataset manifest records no codec hash: it was not "
                                     "encoded with method 'cae', or the manifest is damaged")
        if stored != self.hash:
            raise CodecMismatchError(f"codec hash mismatch: the dataset was encoded with {stored}, "
                                     f"this codec ({self.path or 'in memory'}) is {self.hash}; "
                                     "decode it with the codec file it was encoded with")

    # ------------------------------------------------------------------ network

    @torch.no_grad()
    def latents(self, images, batch_size: int = 32) -> torch.Tensor:
        """Unquantized encoder output (B, C, S/8, S/8), float32 on CPU."""
        x = _as_images(images)
        outs = []
        for i in range(0, x.shape[0], batch_size):
            xb = CAE.preprocess(x[i:i + batch_size].to(self.device))
            outs.append(self.model.encoder(xb).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0, self.channels, x.shape[2] // 8, x.shape[3] // 8)

    @property
    def prior(self) -> str:
        return "hyper" if isinstance(self.tables, HyperTables) else "factorized"

    def _prepare(self, symbols: np.ndarray, batch_size: int = 32):
        return prepare_symbols(self.model, self.tables, symbols, self.device, batch_size)

    def _code(self, symbols: np.ndarray, side) -> list[bytes]:
        return self.tables.encode(symbols, *side) if side is not None else self.tables.encode(symbols)

    def quantize(self, images, batch_size: int = 32) -> tuple[np.ndarray, int]:
        """Integer symbols (B, C, h, w) as stored (clamped into the tables' range) and the
        clamp count. With the hyperprior, the side information is derived from them."""
        symbols, _, n = self._quantize(images, batch_size)
        return symbols, n

    def _quantize(self, images, batch_size: int = 32):
        y = self.latents(images, batch_size)
        return self._prepare(torch.round(y).to(torch.int64).numpy(), batch_size)

    def encode(self, images, batch_size: int = 32) -> list[bytes]:
        return self.encode_counted(images, batch_size)[0]

    def encode_counted(self, images, batch_size: int = 32) -> tuple[list[bytes], int]:
        """Bitstreams of ``images`` and the number of symbols clamped into the tables."""
        symbols, side, n = self._quantize(images, batch_size)
        return self._code(symbols, side), n

    def encode_symbols(self, symbols: np.ndarray) -> list[bytes]:
        symbols, side, _ = self._prepare(np.asarray(symbols))
        return self._code(symbols, side)

    def decode_symbols(self, blobs: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """Bitstreams -> int32 symbols (B, C, h, w); CorruptBitstreamError on damage."""
        return self.tables.decode(blobs, names)

    def dequantize(self, symbols, device: str | torch.device | None = None) -> torch.Tensor:
        """Symbols -> the exact float32 latents (B, C, h, w) the decoder and cResNet consume.

        Quantization step is 1 with no offset, so latents are the integers themselves:
        exact on every device.
        """
        t = torch.as_tensor(np.asarray(symbols) if not isinstance(symbols, torch.Tensor) else symbols)
        return t.to(device if device is not None else "cpu", dtype=torch.float32)

    @torch.no_grad()
    def decode_images(self, symbols, batch_size: int = 16) -> np.ndarray:
        """Symbols -> reconstructed uint8 images (B, 3, 8h, 8w)."""
        y = self.dequantize(symbols)
        outs = []
        for i in range(0, y.shape[0], batch_size):
            xb = self.model.decoder(y[i:i + batch_size].to(self.device))
            outs.append(CAE.postprocess(xb).cpu())
        if not outs:
            return np.zeros((0, 3, y.shape[2] * 8, y.shape[3] * 8), dtype=np.uint8)
        return torch.cat(outs).numpy()

    @torch.no_grad()
    def estimated_bits(self, images, source: str = "model", batch_size: int = 32) -> np.ndarray:
        """Estimated bits per image.

        ``source="model"``: the learned density's code length of the rounded latents (the rate
        term of the training loss, evaluated on what is actually coded, tails included);
        ``source="tables"``: the ideal code length under the frozen integer tables, after
        clamping (what an ideal entropy coder would spend).
        """
        if source not in ("model", "tables"):
            raise ValueError("source is 'model' or 'tables'")
        symbols, side, _ = self._quantize(images, batch_size)
        if source == "tables":
            return self.tables.ideal_bits(symbols, *side) if side is not None \
                else self.tables.ideal_bits(symbols)
        if getattr(self, "_model64", None) is None:
            self._model64 = copy.deepcopy(self.model).to("cpu", torch.float64)
        y = torch.from_numpy(symbols).double()
        z = torch.from_numpy(side[0]).double() if side is not None else None
        bits_y, bits_z = rate_bits(self._model64, y, z)
        return (bits_y + bits_z).numpy()

    # ------------------------------------------------------------------ file

    def save(self, path: str | os.PathLike) -> str:
        arrays = {f"weights.{k}": v.detach().cpu().float().numpy()
                  for k, v in self.model.state_dict().items()}
        if self.prior == "hyper":
            arrays.update(self.tables.arrays())
            tables_meta = {**self.tables.meta(), "coder": CODER}
        else:
            arrays["tables.counts"] = self.tables.counts
            arrays["tables.offset"] = self.tables.offset
            arrays["tables.length"] = self.tables.length
            tables_meta = {"precision": self.tables.precision, "kind": "per-channel categorical",
                           "coder": CODER, "arrays": ["tables.counts", "tables.offset", "tables.length"]}
        self.hash = write_codec(path, self.config, tables_meta, arrays, self.info, self.format_version)
        self.path = str(path)
        return self.hash


def load_codec(path: str | os.PathLike, device: str | torch.device = "cpu") -> Codec:
    """Read a codec file (verifying its hash) and return a ready :class:`Codec`."""
    header, arrays = read_codec(path)
    cfg = header["config"]
    try:
        model = build_model(cfg)
    except (KeyError, ValueError) as exc:
        raise CodecFileError(f"{path}: {exc}") from None
    state = {k[len("weights."):]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
             if k.startswith("weights.")}
    model.load_state_dict(state, strict=True)
    kind = header["tables"].get("kind", "per-channel categorical")
    try:
        if kind == HyperTables.kind:
            tables = HyperTables.from_arrays(header["tables"], arrays)
        elif kind == "per-channel categorical":
            tables = EntropyTables(arrays["tables.counts"], arrays["tables.offset"],
                                   arrays["tables.length"], int(header["tables"]["precision"]))
        else:
            raise ValueError(f"unknown entropy model {kind!r}")
    except (KeyError, ValueError) as exc:
        raise CodecFileError(f"{path}: {exc}") from None
    return Codec(model, tables, cfg, header["hash"], header.get("info"), device, str(path))


class CaeMethod:
    """The ``cae`` encode method: uint8 images -> one self-delimiting bitstream per image.

    Picklable (for process workers): the codec is re-read from ``codec_path`` in each process.
    """

    name = "cae"
    dtype = "bytes"
    output_kind = "bytes"

    def __init__(self, codec_path: str | os.PathLike, device: str = "cpu"):
        self.codec_path = str(codec_path)
        self.device = device
        self._codec: Codec | None = None
        self.clamped_symbols = 0  # symbols clamped into the table range by this process
        self.params = dict(self.codec.params)

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            self._codec = load_codec(self.codec_path, self.device)
        return self._codec

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_codec"] = None
        return state

    def validate(self, size: int) -> None:
        if size % 8:
            raise ValueError(f"method 'cae' needs an image size divisible by 8 (encoder stride 8), "
                             f"got {size}")

    def sample_shape(self, size) -> None:
        return None  # variable-length bitstreams

    def latent_shape(self, size) -> tuple[int, int, int]:
        return self.codec.latent_shape(size)

    def encode(self, images, out_dtype: str | None = None) -> list[bytes]:
        blobs, n = self.codec.encode_counted(images)
        self.clamped_symbols += n
        return blobs

    def estimated_bits(self, images, source: str = "model") -> np.ndarray:
        return self.codec.estimated_bits(images, source=source)

    def measure(self, images, blobs: Sequence[bytes]) -> dict[str, float]:
        """Quality and rate sums over a batch, for the manifest's ``quality`` block.

        Decodes the stored bitstreams themselves (not the encoder's latents), so what is measured
        is what a reader of the store gets. Returns sums, so shards can be added up.
        """
        from .metrics import ms_ssim, psnr

        images = np.asarray(images)
        recon = self.codec.decode_images(self.codec.decode_symbols(list(blobs)))
        est = self.codec.estimated_bits(images, source="model")
        # MS-SSIM's five scales need ≥ 176 px; smaller test images report PSNR only.
        ms = ms_ssim(images, recon) if min(images.shape[-2:]) >= 176 else None
        sums = {
            "n": float(len(images)),
            "psnr_db_sum": float(np.sum(psnr(images, recon))),
            "bits_actual_sum": float(8 * sum(len(b) for b in blobs)),
            "bits_estimated_sum": float(np.sum(est)),
        }
        if ms is not None:
            sums["ms_ssim_sum"] = float(np.sum(ms))
        return sums
