"""What an encode job is asked to do, and every check of it that needs no file of OUT.

Errors are worded for the library, naming the :class:`EncodeConfig` field
(:class:`OptionError` ``.option``); the command line maps the field to its flag
(``shard_size`` -> ``--shard-size``). :func:`check_config` runs before OUT is created or locked,
so a bad parameter never leaves a job file behind that the corrected command would then refuse.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float16", "float32", "uint8", "tc")  # tc: transform-coded (docs/coefficient_codec.md)
LAYOUTS = ("auto", "imagenet", "coco", "folder")
DEFAULTS = {"J": 3, "L": 8, "dtype": "float16", "quality": 50}  # what None means for these fields



class EncodeError(RuntimeError):
    """A fatal problem with the job as a whole (bad arguments, unusable SRC or OUT)."""


class OptionError(EncodeError):
    """A bad value of the :class:`EncodeConfig` field ``option``: ``str()`` is
    ``"option: problem"``; the CLI prints ``"--option: problem"``."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(f"{option}: {problem}")


@dataclass
class EncodeConfig:
    """Everything that defines an encode job (``job_params`` picks the part that must match on
    resume). ``J``, ``L`` and ``dtype`` left at ``None`` take the method's default (3, 8,
    float16); set for a method that does not use them, they are refused. ``quality`` (0..100,
    default 50) is the knob of ``dtype="tc"`` (the transform coder of scattering coefficients,
    docs/coefficient_codec.md) and is refused with any other dtype."""

    src: Path
    out: Path
    method: str = "scat1"
    J: int | None = None
    L: int | None = None
    codec: str | None = None
    format: str = "zarr"
    shard_size: int = 512
    size: int = 224
    dtype: str | None = None
    quality: float | None = None
    compression: str = "default"
    layout: str = "auto"
    split: str | None = None
    augment: int = 0
    seed: int = 0
    workers: int = 1
    scheduler: str | None = None
    device: str = "cpu"
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        self.src = Path(self.src)
        from scatstore.stores.fs import as_path

        self.out = as_path(self.out)  # a local Path, or a RemotePath for s3://… (stores.fs)
        check_config(self)

    @property
    def variants(self) -> int:
        return max(1, self.augment)

    def value(self, name: str):
        """The field's value with ``None`` resolved to its default."""
        v = getattr(self, name)
        return DEFAULTS[name] if v is None else v


def _int(cfg: EncodeConfig, name: str, lo: int, hi: int | None = None) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise OptionError(name, f"must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise OptionError(name, f"must be ≥ {lo}, got {v}" if hi is None else
                          f"must be in {lo}..{hi}, got {v}")


def check_compression(text: str, fmt: str) -> None:
    from scatstore.stores import get_format

    try:
        get_format(fmt).check_compression(text)
    except ValueError as exc:
        raise OptionError("compression", str(exc)) from None


def check_config(cfg: EncodeConfig) -> None:
    """Every check of the options alone (no file read): types, ranges, choices, conflicts."""
    from scatstore.transforms.methods import METHOD_OPTIONS, METHODS

    if cfg.method not in METHODS:
        raise OptionError("method", f"must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    from scatstore.stores import format_names

    if cfg.format not in format_names():
        raise OptionError("format", f"must be one of {', '.join(format_names())}, "
                          f"got {cfg.format!r}")
    if cfg.layout not in LAYOUTS:
        raise OptionError("layout", f"must be one of {', '.join(LAYOUTS)}, got {cfg.layout!r}")
    for name in ("shard_size", "size", "workers", "batch_size"):
        _int(cfg, name, 1)
    _int(cfg, "augment", 0)
    _int(cfg, "seed", 0)
    # Options the method does not use: refused, not silently ignored.
    uses = METHOD_OPTIONS[cfg.method]
    for name in ("J", "L", "codec"):
        if getattr(cfg, name) is not None and name not in uses:
            raise OptionError(name, f"is not used by method {cfg.method} (it takes "
                              f"{', '.join(u for u in uses if u != 'device') or 'no parameter'})")
    if cfg.dtype is not None:
        if cfg.dtype not in DTYPES:
            raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
        if cfg.method in ("raw", "cae"):
            stored = "uint8 pixels" if cfg.method == "raw" else "bitstreams"
            raise OptionError("dtype", f"does not apply to method {cfg.method} (it stores "
                              f"{stored})")
    if cfg.quality is not None:
        q = cfg.quality
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 100:
            raise OptionError("quality", f"must be a number in 0..100, got {q!r}")
        if cfg.dtype != "tc":
            raise OptionError("quality", "is the knob of dtype tc (transform-coded "
                              "coefficients): set dtype tc or leave quality unset")
    check_compression(cfg.compression, cfg.format)
    if cfg.scheduler is not None and (not isinstance(cfg.scheduler, str) or not cfg.scheduler):
        raise OptionError("scheduler", f"must be 'local' or a scheduler address, got "
                          f"{cfg.scheduler!r}")


def config_warnings(cfg: EncodeConfig) -> list[str]:
    """Options that are valid but change nothing in this job (said, not refused: the job is
    well defined either way)."""
    out = []
    if cfg.seed and not cfg.augment:
        out.append(f"seed {cfg.seed} has no effect without augment (it seeds the augment "
                   "variants only)")
    if cfg.scheduler not in (None, "local") and cfg.workers != 1:
        out.append(f"workers {cfg.workers} has no effect on a running dask cluster (its own "
                   "workers run the shards)")
    return out


def config_from_kwargs(**kwargs) -> EncodeConfig:
    """Build an :class:`EncodeConfig`, turning unknown keys into a clear error."""
    names = {f.name for f in dataclasses.fields(EncodeConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise EncodeError(f"unknown encode option(s): {', '.join(unknown)}")
    return EncodeConfig(**kwargs)
