"""`scatstore study`: what each stored representation saves and what it costs, side by side.

For every representation of a registry (:data:`REPRESENTATIONS`): build it from SRC (and VAL) —
an encode job, or JPEG re-encoding for the pixel baselines — reusing what OUT already holds, then
measure on this machine: bytes on disk, bytes read per epoch, loader samples/s and CPU time, the
matching model's input shape and MACs, a linear probe's accuracy and, with ``train_archs``, the
accuracy of the real model trained through the loader. Writes ``OUT/study.json`` (keys:
:data:`ROW_KEYS`, :data:`STUDY_KEYS`), ``OUT/study.md`` and the figures of
:mod:`scatstore.pipelines.study_figures`. Every number is measured in the run that writes it.

Adding a representation is one entry in :data:`REPRESENTATIONS`: a name, the kind of tensor
(``pixels`` | ``scattering`` | ``latent``), a label and legend group, and either the options of
the encode job (any :class:`~scatstore.pipelines.encode.EncodeConfig` field) or, for the family
``jpeg``, a quality. See docs/study.md.
"""
from __future__ import annotations

import fnmatch
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

STUDY_FORMAT = "scatstore-study/1"
KINDS = ("pixels", "scattering", "latent")
FAMILIES = ("store", "jpeg")  # how a representation is built: _FAMILIES below


class StudyError(RuntimeError):
    """A study that cannot run as asked (bad arguments, unusable SRC / VAL / OUT)."""


# --------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Representation:
    """One row of the study. ``family``: ``store`` (an encode job with ``options``) or ``jpeg``
    (the source images re-encoded as JPEG at ``options["quality"]``)."""

    name: str
    kind: str
    label: str
    group: str
    family: str = "store"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}")
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}")


def _rep(name: str, kind: str, label: str, group: str, family: str = "store", **options) -> Representation:
    return Representation(name, kind, label, group, family, options)


# One line per representation; the order is the table's.
REPRESENTATIONS: dict[str, Representation] = {r.name: r for r in (
    _rep("jpeg-q50", "pixels", "JPEG q50", "JPEG (FFCV-style)", "jpeg", quality=50),
    _rep("jpeg-q75", "pixels", "JPEG q75", "JPEG (FFCV-style)", "jpeg", quality=75),
    _rep("jpeg-q90", "pixels", "JPEG q90", "JPEG (FFCV-style)", "jpeg", quality=90),
    _rep("raw", "pixels", "raw uint8", "raw pixels", method="raw"),
    _rep("scat1-J2-float16", "scattering", "scat1 J=2 float16", "scat1 float16", method="scat1", J=2, dtype="float16"),
    _rep("scat1-J3-float16", "scattering", "scat1 J=3 float16", "scat1 float16", method="scat1", J=3, dtype="float16"),
    _rep("scat1-J4-float16", "scattering", "scat1 J=4 float16", "scat1 float16", method="scat1", J=4, dtype="float16"),
    _rep("scat1-J2-uint8", "scattering", "scat1 J=2 uint8", "scat1 uint8", method="scat1", J=2, dtype="uint8"),
    _rep("scat1-J3-uint8", "scattering", "scat1 J=3 uint8", "scat1 uint8", method="scat1", J=3, dtype="uint8"),
    _rep("scat1-J4-uint8", "scattering", "scat1 J=4 uint8", "scat1 uint8", method="scat1", J=4, dtype="uint8"),
    _rep("scat1-J3-tc-q40", "scattering", "scat1 J=3 tc q40", "scat1 tc", method="scat1", J=3, dtype="tc", quality=40),
    _rep("scat1-J3-tc-q50", "scattering", "scat1 J=3 tc q50", "scat1 tc", method="scat1", J=3, dtype="tc", quality=50),
    _rep("scat1-J3-tc-q60", "scattering", "scat1 J=3 tc q60", "scat1 tc", method="scat1", J=3, dtype="tc", quality=60),
    _rep("scat1-J4-tc-q40", "scattering", "scat1 J=4 tc q40", "scat1 tc", method="scat1", J=4, dtype="tc", quality=40),
    _rep("scat1-J4-tc-q50", "scattering", "scat1 J=4 tc q50", "scat1 tc", method="scat1", J=4, dtype="tc", quality=50),
    _rep("scat1-J4-tc-q60", "scattering", "scat1 J=4 tc q60", "scat1 tc", method="scat1", J=4, dtype="tc", quality=60),
    _rep("scat2-J3-float16", "scattering", "scat2 J=3 float16", "scat2 float16", method="scat2", J=3, dtype="float16"),
)}

# learned-codec operating points fitted by --fit-codec: (latent channels, target bits per pixel),
# Torfason et al.'s three (seed 003)
CAE_OPERATING_POINTS = ((8, 0.0983), (16, 0.330), (32, 0.635))


def cae_representation(codec_path: str | os.PathLike) -> Representation:
    """The row of a learned codec (one operating point): ``cae-<codec file stem>``."""
    stem = Path(codec_path).stem.replace(".", "-")
    name = stem if stem.startswith("cae") else f"cae-{stem}"
    return _rep(name, "latent", name, "cae latents", method="cae",
                codec=str(Path(codec_path).resolve()))


def select(patterns: list[str] | None, extra: list[Representation] = ()) -> list[Representation]:
    """The representations named by ``patterns`` (names or shell globs, e.g. ``scat1-*``), in
    registry order; all of them (and ``extra``, the codec rows) when ``patterns`` is empty."""
    pool = [*REPRESENTATIONS.values(), *extra]
    if not patterns:
        return pool
    chosen, unmatched = [], []
    for p in patterns:
        hits = [r for r in pool if fnmatch.fnmatchcase(r.name, p)]
        if not hits:
            unmatched.append(p)
        chosen += [r for r in hits if r not in chosen]
    if unmatched:
        raise StudyError(f"--methods: no representation matches {', '.join(unmatched)}; "
                         f"choose from {', '.join(r.name for r in pool)}")
    return [r for r in pool if r in chosen]


# --------------------------------------------------------------------------------------------
# families: how a representation is built, sized, loaded and benchmarked


def _source_index(src: Path):
    from scatstore.sources import discover

    try:
        index = discover(src)
    except (ValueError, FileNotFoundError) as exc:
        raise StudyError(f"cannot read {src}: {exc}") from exc
    if not index.items:
        raise StudyError(f"{src} holds no images")
    if any(it.label < 0 for it in index.items):
        raise StudyError(f"{src}: the study needs class labels (class folders, layout imagenet); "
                         f"found layout {index.layout!r} with unlabeled images")
    return index


class _StoreFamily:
    """Representations stored by the encode job (scattering, raw pixels, learned codec)."""

    @staticmethod
    def build(rep: Representation, src: Path, out: Path, size: int, progress: bool, log,
              device: str = "cpu") -> None:
        from scatstore.pipelines.encode import EncodeError, config_from_kwargs, encode

        try:
            cfg = config_from_kwargs(src=src, out=out, size=size, shard_size=256,
                                     progress=progress, **{"device": device, **rep.options})
            manifest = encode(cfg, log=log)
        except EncodeError as exc:
            raise StudyError(f"{rep.name}: {exc}") from exc
        if not manifest["count"]:
            raise StudyError(f"{rep.name}: no image of {src} could be encoded (see {out}/rejected.jsonl)")

    @staticmethod
    def stored_bytes(path: Path) -> tuple[int, int]:
        from scatstore.pipelines.report import report

        r = report(path)
        return int(r["bytes_stored"]), int(r["count"])

    @staticmethod
    def batches(path: Path, batch_size: int, train: bool, seed: int, num_workers: int,
                device: str = "cpu", raw_pixels: bool = False):
        from scatstore import loader

        return loader(path, batch_size, shuffle=train, seed=seed, num_workers=num_workers,
                      drop_last=train, device=device, normalize_pixels=not raw_pixels)

    @staticmethod
    def bench(path: Path, batch_size: int, num_workers: int, seconds: float, repeats: int) -> dict:
        from scatstore.loaders import bench

        bench.warm_files([path])
        return bench.measure_loader(path, batch_size, num_workers, seconds, repeats)


class _JpegFamily:
    """The FFCV-style pixel baseline: every source image framed as the stores frame it (shorter
    side to ``size``, centre crop) and re-encoded as a baseline JPEG (PIL, 4:2:0) at a quality,
    in the source's class folders; trained on through the pixel loader (decode every epoch)."""

    DONE = "jpeg-study.json"

    @classmethod
    def build(cls, rep: Representation, src: Path, out: Path, size: int, progress: bool, log,
              device: str = "cpu") -> None:
        from PIL import Image

        from scatstore.sources import DecodeError, decode_for_frame, resize_center_crop

        index = _source_index(src)
        quality = int(rep.options["quality"])
        params = {"quality": quality, "size": size, "source": index.fingerprint(), "version": 1}
        done = out / cls.DONE
        if done.exists():
            try:
                if json.loads(done.read_text()).get("params") == params:
                    return
            except (OSError, ValueError):
                pass
        out.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        written, rejected, used = 0, 0, set()
        for item in tqdm(index.items, desc=f"jpeg q{quality}", unit="img", disable=not progress,
                         file=sys.stderr, leave=False):
            try:
                img, _ = decode_for_frame(index.abspath(item), size)
            except (DecodeError, OSError):
                rejected += 1
                continue
            pixels, _ = resize_center_crop(img, size)
            cls_dir = index.class_names[item.label]
            rel = f"{cls_dir}/{item.key}.jpg"  # keys are unique and hold no '/' or '.'
            if rel in used:
                raise StudyError(f"{rep.name}: two source images map to {rel}")
            used.add(rel)
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buf, "JPEG", quality=quality)
            tmp = dst.with_name(f".{dst.name}.tmp")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, dst)
            written += 1
        if not written:
            raise StudyError(f"{rep.name}: no image of {src} could be decoded")
        done.write_text(json.dumps({"params": params, "count": written, "rejected": rejected}))
        log(f"wrote {written} JPEGs at quality {quality} ({rejected} rejected) → {out}")

    @staticmethod
    def _files(path: Path) -> list[Path]:
        return sorted(p for p in path.rglob("*.jpg") if p.is_file() and not p.name.startswith("."))

    @classmethod
    def stored_bytes(cls, path: Path) -> tuple[int, int]:
        files = cls._files(path)
        return sum(f.stat().st_size for f in files), len(files)

    @staticmethod
    def batches(path: Path, batch_size: int, train: bool, seed: int, num_workers: int,
                device: str = "cpu", raw_pixels: bool = False):
        from scatstore.loaders.pixels import jpeg_batches

        if raw_pixels:
            return _DecodedFolder(path, batch_size)
        return jpeg_batches(path, batch_size, size=_jpeg_size(path), train=train, seed=seed,
                            num_workers=num_workers, drop_last=train)

    @staticmethod
    def bench(path: Path, batch_size: int, num_workers: int, seconds: float, repeats: int) -> dict:
        """The pixel loader's decode + RandomResizedCrop + flip + normalise in ``num_workers``
        DataLoader processes, in steady state: one long run over the folder repeated (a sampler
        that cycles), so that a small folder does not time the start of worker processes at
        every epoch (which :func:`scatstore.loaders.bench.measure_jpeg` does, being per epoch)."""
        import itertools

        import torch

        from scatstore.loaders import bench
        from scatstore.loaders.pixels import jpeg_batches

        bench.warm_files([path])
        jb = jpeg_batches(path, batch_size, size=_jpeg_size(path), train=True, seed=0,
                          num_workers=num_workers, drop_last=False)
        n = len(jb.dataset)
        counter = {"bytes": 0}

        def make(epoch):
            dl = torch.utils.data.DataLoader(
                jb.dataset, batch_size=batch_size, sampler=itertools.cycle(range(n)),
                num_workers=num_workers, prefetch_factor=4 if num_workers else None)

            def gen():
                for x, y, nbytes in dl:
                    counter["bytes"] += int(nbytes.sum())
                    yield x, y
            return gen()

        runs = [bench._timed(make, seconds, lambda: counter["bytes"], warmup_batches=2)
                for _ in range(repeats)]
        sps, mbs, cpu = bench._median(runs)
        return {"samples_per_s": sps, "mb_per_s": mbs, "cpu_us_per_sample": cpu, "runs": runs}


def _jpeg_size(path: Path) -> int:
    return int(json.loads((Path(path) / _JpegFamily.DONE).read_text())["params"]["size"])


class _DecodedFolder:
    """The re-encoded JPEGs decoded as they are (no crop, no normalisation): ``(x in [0, 1], y)``
    batches in the folder's sorted order, for the probe's features."""

    def __init__(self, path: Path, batch_size: int):
        from scatstore.sources import discover

        self.index = discover(path)
        self.batch_size = batch_size
        self.bytes_read = 0

    def __call__(self, epoch: int = 0):
        import torch

        from scatstore.sources import decode_image

        items = self.index.items
        for i in range(0, len(items), self.batch_size):
            xs, ys = [], []
            for it in items[i:i + self.batch_size]:
                data = Path(self.index.abspath(it)).read_bytes()
                self.bytes_read += len(data)
                xs.append(torch.from_numpy(np.ascontiguousarray(decode_image(data).transpose(2, 0, 1))))
                ys.append(it.label)
            yield torch.stack(xs).float().div_(255.0), torch.tensor(ys)


_FAMILIES: dict[str, Any] = {"store": _StoreFamily, "jpeg": _JpegFamily}



# --------------------------------------------------------------------------------------------
# the keys of study.json (docs/study.md explains each)

STUDY_KEYS = {
    "format": "format version of this file, 'scatstore-study/1'",
    "dataset": "src, val (null: held-out split of src), name, n_train, n_val, classes, split",
    "machine": "cpu model, ISA level, cores, torch threads, hostname",
    "settings": "the study's options (size, batch size, loader seconds, probe, train...)",
    "representations": "one row per representation, keys in ROW_KEYS",
    "reconstruction": "per sheet image and representation: PSNR in dB",
    "figures": "file names of the PNG figures in OUT",
    "detection": "with --detection: src, val, split, size, settings and one row per input "
                 "(keys in study_detection.DETECTION_ROW_KEYS); null without",
    "elapsed_s": "wall time of the whole study run",
}

ROW_KEYS = {
    "name": "registry name, e.g. scat1-J3-float16",
    "label": "human-readable label",
    "group": "legend group of the figures",
    "kind": "pixels | scattering | latent",
    "family": "store (an encode job) | jpeg (re-encoded source JPEGs)",
    "options": "the encode options (or the JPEG quality)",
    "path": "where the training data of this row is (OUT/<name>/train)",
    "count": "training samples stored",
    "bytes_per_sample": "bytes on disk / samples (every file of the store)",
    "ratio_vs_raw": "bytes_per_sample / raw uint8 pixels of the stored frame (3·size²)",
    "ratio_vs_source": "bytes_per_sample / mean size of the source files",
    "ratio_vs_jpeg_q90": "bytes_per_sample / that of the jpeg-q90 row (the q90 JPEG of the same "
                         "frames), else of the store's reference_jpeg; null when neither exists",
    "bytes_read_per_epoch": "bytes the training loader reads in one epoch (its own counter)",
    "loader_samples_per_s": "training loader throughput, from the page cache, median of repeats",
    "loader_cpu_ms_per_sample": "CPU time (all threads and workers) per sample loaded",
    "model": "the matching model (ResNet on pixels, ScatResNet on scattering, cResNet on latents)",
    "model_input_shape": "(C, H, W) the model reads",
    "model_macs": "multiply-accumulates of that model per sample (conv + linear)",
    "probe_top1": "linear-probe accuracy on the held-out samples",
    "probe_train_top1": "linear-probe accuracy on its own training samples",
    "probe_features": "length of the pooled feature vector",
    "probe_s": "seconds to extract the features and fit the probe",
    "train_top1": "held-out top-1 of the trained model after the last epoch (null without --train)",
    "train_epochs": "epochs trained (fewer than asked when --budget ran out)",
    "train_s": "wall time of that training",
    "build_s": "seconds spent building the store in this run (0 when reused)",
}

# pixels are probed through the scattering of the decoded image (order 1, J=3, L=8), so that the
# pixel rows show what JPEG coding loses under the same features as the scattering rows
PIXEL_PROBE_J = 3


# --------------------------------------------------------------------------------------------
# measurements


def _machine() -> dict:
    import platform

    import torch

    from scatstore import _cbuild

    return {"cpu": _cbuild.cpu_model(), "isa": _cbuild.isa_level(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "hostname": platform.node()}


def _features(family, path: Path, rep: Representation, batch_size: int, num_workers: int):
    """``(features (N, D), labels (N,))`` of every sample at ``path``, in stored order."""
    import torch

    from scatstore.evaluation.probe import pooled_features

    src = family.batches(path, batch_size, train=False, seed=0, num_workers=num_workers,
                         raw_pixels=True)
    scat = None
    zs, ys = [], []
    for x, y in src(0):
        if rep.kind == "pixels":
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
            if scat is None:
                from scatstore.transforms.scattering import Scattering2D

                scat = Scattering2D(J=PIXEL_PROBE_J, shape=tuple(x.shape[-2:]), L=8, max_order=1)
            with torch.no_grad():
                x = scat(x.float().contiguous())
            zs.append(pooled_features(x, "scattering"))
        else:
            zs.append(pooled_features(x, rep.kind))
        ys.append(y)
    return torch.cat(zs), torch.cat(ys)


def _epoch_bytes(family, path: Path, batch_size: int, num_workers: int) -> int:
    """Bytes the training loader reads in one shuffled epoch (its ``bytes_read`` counter)."""
    ld = family.batches(path, batch_size, train=True, seed=0, num_workers=num_workers)
    b0 = ld.bytes_read
    for _ in ld(0):
        pass
    return int(ld.bytes_read - b0)


def _model_cost(arch: str, in_channels: int, size: int, num_classes: int) -> tuple[list[int], int]:
    import torch

    from scatstore.models import build_model, count_macs

    with torch.device("meta"):
        model = build_model(arch, in_channels, num_classes, input_size=size)
    shape = (int(in_channels), int(size), int(size))
    return list(shape), int(count_macs(model, shape))


def _input_geometry(family, path: Path) -> tuple[int, int]:
    ld = family.batches(path, 1, train=False, seed=0, num_workers=1)
    return int(ld.in_channels), int(ld.input_size)


class _BudgetExhausted(Exception):
    pass


def _train_row(family, rep, train_path: Path, val_path: Path, arch: str, epochs: int,
               batch_size: int, budget_s: float | None, device: str, num_workers: int,
               num_classes: int, progress: bool, log) -> dict:
    import torch

    from scatstore.models import build_model
    from scatstore.pipelines.train import default_lr, train

    torch.manual_seed(0)
    train_f = family.batches(train_path, batch_size, train=True, seed=0, num_workers=num_workers,
                             device=device)
    val_f = family.batches(val_path, batch_size, train=False, seed=0, num_workers=num_workers,
                           device=device)
    model = build_model(arch, train_f.in_channels, num_classes, input_size=train_f.input_size)
    records: list[dict] = []
    t0 = time.perf_counter()

    def on_epoch(rec: dict) -> None:
        records.append(rec)
        log(f"  {rep.name} {arch} epoch {rec['epoch']}/{epochs}: train top-1 {rec['train_top1']:.3f}, "
            f"val top-1 {rec['val_top1']:.3f}")
        if budget_s is not None and time.perf_counter() - t0 >= budget_s and rec["epoch"] < epochs:
            raise _BudgetExhausted

    try:
        train(model, train_f, val_f, epochs=epochs, lr=default_lr(batch_size), device=device,
              log=on_epoch, progress=progress)
    except _BudgetExhausted:
        log(f"  {rep.name}: --budget reached after {len(records)} epochs")
    last = records[-1] if records else {}
    return {"train_top1": last.get("val_top1"), "train_epochs": len(records),
            "train_s": time.perf_counter() - t0, "train_arch": arch}


# --------------------------------------------------------------------------------------------
# the study


@dataclass
class StudyConfig:
    src: Path
    out: Path
    val: Path | None = None
    methods: list[str] | None = None
    codecs: list[str] = field(default_factory=list)
    fit_codec: bool = False
    codec_steps: int = 300
    size: int = 224
    batch_size: int = 64
    num_workers: int = 2
    loader_seconds: float = 1.0
    loader_repeats: int = 3
    holdout: float = 0.25
    probe_l2: float = 1e-3
    train_archs: list[str] | None = None   # None: no training; ["auto"]: models.default_arch
    epochs: int = 8
    train_batch_size: int = 32
    budget_s: float | None = None
    device: str = "cpu"
    recon_images: int = 3
    recon_steps: int = 60
    detection: Path | None = None       # a COCO source: the detection rows (study_detection)
    detection_val: Path | None = None
    detection_epochs: int = 20
    detection_size: int = 128
    detection_options: dict = field(default_factory=dict)  # study_detection.DEFAULTS overrides
    progress: bool = True

    def __post_init__(self):
        self.src, self.out = Path(self.src), Path(self.out)
        self.val = Path(self.val) if self.val is not None else None
        for name in ("size", "batch_size", "num_workers", "loader_repeats", "epochs",
                     "train_batch_size", "codec_steps"):
            if getattr(self, name) < 1:
                raise StudyError(f"--{name.replace('_', '-')} must be ≥ 1")
        if self.recon_images < 0 or self.recon_steps < 0:
            raise StudyError("--recon-images and --recon-steps must be ≥ 0")
        if not 0 < self.holdout < 1:
            raise StudyError("--holdout must be in (0, 1)")
        if self.loader_seconds <= 0:
            raise StudyError("--loader-seconds must be > 0")
        if self.budget_s is not None and self.budget_s <= 0:
            raise StudyError("--budget must be > 0 seconds")
        if self.train_archs is not None and self.val is None:
            raise StudyError("--train needs --val (a held-out set the trained model is scored on)")
        for p, what in ((self.src, "SRC"), (self.val, "--val")):
            if p is not None and not p.is_dir():
                raise StudyError(f"{what} {p} is not a directory")
            # the study writes JPEG folders into OUT: inside a source they would become samples
            if p is not None and self.out.resolve().is_relative_to(p.resolve()):
                raise StudyError(f"OUT {self.out} is inside {what} {p}: choose an OUT outside it")
        if self.detection is not None or self.detection_val is not None:
            from .study_detection import DetectionStudyError, check_source

            if self.detection is None:
                raise StudyError("--detection-val needs --detection COCO_SRC")
            if self.detection_epochs < 1 or self.detection_size < 16:
                raise StudyError("--detection-epochs must be ≥ 1 and --detection-size ≥ 16")
            self.detection = Path(self.detection)
            try:
                check_source(self.detection)
                if self.detection_val is not None:
                    self.detection_val = Path(self.detection_val)
                    check_source(self.detection_val, "--detection-val")
            except DetectionStudyError as exc:
                raise StudyError(str(exc)) from exc
        if self.val is not None and self.val.resolve() == self.src.resolve():
            raise StudyError("--val is SRC: the held-out images must be others (or leave --val "
                             "out for a held-out split of SRC)")


def _arch_for(rep: Representation, train_archs: list[str] | None) -> str:
    """The first of ``train_archs`` that reads this kind of tensor, else the default model of the
    store's method (``scatstore train``'s: :func:`scatstore.models.default_arch`)."""
    from scatstore.models import arch_info, canonical_arch, default_arch

    for a in train_archs or []:
        if a != "auto" and arch_info(a)["input"] == rep.kind:
            return canonical_arch(a)
    return default_arch(rep.options.get("method", "raw"))


def _fit_codecs(cfg: StudyConfig, log) -> list[str]:
    """Fit the operating points of :data:`CAE_OPERATING_POINTS` that ``--methods`` selects
    (``cae-C8``, ``cae-C16``, ``cae-C32``; all without ``--methods``) on SRC; a codec file
    already in ``OUT/codecs`` is reused."""
    from scatstore.codecs import fit_codec
    from scatstore.sources import DecodeError, decode_image

    index = _source_index(cfg.src)
    paths, images = [], None
    for channels, bpp in CAE_OPERATING_POINTS:
        path = cfg.out / "codecs" / f"cae-C{channels}.codec"
        if cfg.methods and not any(fnmatch.fnmatchcase(path.stem, p) for p in cfg.methods):
            continue
        if not path.exists():
            if images is None:
                images = []
                for it in index.items[:2000]:
                    try:
                        images.append(decode_image(index.abspath(it)))
                    except DecodeError:
                        pass
            log(f"fitting codec C={channels} (target {bpp} bpp, {cfg.codec_steps} steps) → {path}")
            codec = fit_codec(images, channels, beta=0.5, steps=cfg.codec_steps, target_bpp=bpp,
                              device=cfg.device, progress=cfg.progress)
            path.parent.mkdir(parents=True, exist_ok=True)
            codec.save(path)
        paths.append(str(path))
    return paths


def run_study(cfg: StudyConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the study (see the module docstring); returns what it writes to ``OUT/study.json``."""
    from scatstore.evaluation.probe import fit_and_score, holdout_split
    from scatstore.models import canonical_arch

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    if cfg.train_archs:
        for a in cfg.train_archs:
            if a != "auto":
                try:
                    canonical_arch(a)
                except ValueError as exc:
                    raise StudyError(f"--train: {exc}") from None
    src_index = _source_index(cfg.src)
    val_index = _source_index(cfg.val) if cfg.val is not None else None
    if val_index is not None and list(val_index.class_names) != list(src_index.class_names):
        raise StudyError(f"--val {cfg.val} has classes {val_index.class_names}, SRC has "
                         f"{src_index.class_names}: they must be the same")
    codecs = list(cfg.codecs)
    if cfg.fit_codec:
        codecs += _fit_codecs(cfg, log)
    reps = select(cfg.methods, [cae_representation(c) for c in codecs])
    cfg.out.mkdir(parents=True, exist_ok=True)
    num_classes = len(src_index.class_names)
    source_per_sample = src_index.total_bytes / len(src_index.items)
    raw_per_sample = 3 * cfg.size * cfg.size

    rows = []
    for i, rep in enumerate(reps, 1):
        fam = _FAMILIES[rep.family]
        log(f"[{i}/{len(reps)}] {rep.name}")
        train_path = cfg.out / rep.name / "train"
        val_path = cfg.out / rep.name / "val" if cfg.val is not None else None
        t0 = time.perf_counter()
        fam.build(rep, cfg.src, train_path, cfg.size, cfg.progress, log, cfg.device)
        if val_path is not None:
            fam.build(rep, cfg.val, val_path, cfg.size, cfg.progress, log, cfg.device)
        build_s = time.perf_counter() - t0
        stored, count = fam.stored_bytes(train_path)
        per_sample = stored / count
        b = fam.bench(train_path, min(cfg.batch_size, count), cfg.num_workers, cfg.loader_seconds,
                      cfg.loader_repeats)
        epoch_bytes = _epoch_bytes(fam, train_path, min(cfg.batch_size, count), cfg.num_workers)
        in_ch, in_size = _input_geometry(fam, train_path)
        arch = _arch_for(rep, cfg.train_archs)
        shape, macs = _model_cost(arch, in_ch, in_size, num_classes)

        t0 = time.perf_counter()
        z, y = _features(fam, train_path, rep, cfg.batch_size, cfg.num_workers)
        if val_path is not None:
            z_val, y_val = _features(fam, val_path, rep, cfg.batch_size, cfg.num_workers)
            z_tr, y_tr = z, y
        else:
            tr, held = holdout_split(y.numpy(), cfg.holdout, seed=0)
            z_tr, y_tr, z_val, y_val = z[tr], y[tr], z[held], y[held]
        probe = fit_and_score(z_tr, y_tr, z_val, y_val, num_classes, l2=cfg.probe_l2)
        probe_s = time.perf_counter() - t0

        row = {
            "name": rep.name, "label": rep.label, "group": rep.group, "kind": rep.kind,
            "family": rep.family, "options": dict(rep.options), "path": str(train_path),
            "count": count, "bytes_per_sample": per_sample,
            "ratio_vs_raw": per_sample / raw_per_sample,
            "ratio_vs_source": per_sample / source_per_sample,
            "bytes_read_per_epoch": epoch_bytes,
            "loader_samples_per_s": b["samples_per_s"],
            "loader_cpu_ms_per_sample": b["cpu_us_per_sample"] / 1000.0,
            "model": arch, "model_input_shape": shape, "model_macs": macs,
            "probe_top1": probe.val_top1, "probe_train_top1": probe.train_top1,
            "probe_features": probe.features, "probe_s": probe_s,
            "train_top1": None, "train_epochs": 0, "train_s": None, "build_s": build_s,
        }
        if cfg.train_archs is not None:
            row.update(_train_row(fam, rep, train_path, val_path, arch, cfg.epochs,
                                  cfg.train_batch_size, cfg.budget_s, cfg.device, cfg.num_workers,
                                  num_classes, cfg.progress, log))
            row.pop("train_arch", None)
        log(f"  {per_sample / 1000:.1f} kB/sample ({row['ratio_vs_raw']:.3f}× raw, "
            f"{row['ratio_vs_source']:.2f}× source), loader {b['samples_per_s']:,.0f} samples/s, "
            f"probe top-1 {probe.val_top1:.3f} ({probe_s:.1f} s)"
            + (f", trained top-1 {row['train_top1']:.3f}" if row["train_top1"] is not None else ""))
        rows.append(row)
    _jpeg_ratios(rows)

    result = {
        "format": STUDY_FORMAT,
        "dataset": {
            "src": str(cfg.src.resolve()), "val": str(cfg.val.resolve()) if cfg.val else None,
            "name": cfg.src.resolve().name if cfg.src.resolve().name not in ("train", "")
            else cfg.src.resolve().parent.name,
            "n_train": len(src_index.items) if cfg.val else None,
            "n_val": len(val_index.items) if val_index is not None else None,
            "classes": list(src_index.class_names),
            "split": "val" if cfg.val else f"holdout {cfg.holdout:g} of src (stratified, seed 0)",
        },
        "machine": _machine(),
        "settings": {
            "size": cfg.size, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
            "loader_seconds": cfg.loader_seconds, "loader_repeats": cfg.loader_repeats,
            "probe": {"l2": cfg.probe_l2, "pixel_features": f"scat1 J={PIXEL_PROBE_J} L=8 of the decoded pixels",
                      "log_eps": 1e-4, "pooling": "global average"},
            "train": cfg.train_archs, "epochs": cfg.epochs if cfg.train_archs else None,
            "train_batch_size": cfg.train_batch_size if cfg.train_archs else None,
            "budget_s": cfg.budget_s, "device": cfg.device,
            "recon_images": cfg.recon_images, "recon_steps": cfg.recon_steps,
        },
        "representations": rows,
        "reconstruction": [],
        "figures": {},
        "detection": None,
    }
    if cfg.detection is not None:
        result["detection"] = run_detection_rows(
            cfg.detection, cfg.out / "detection", val=cfg.detection_val, size=cfg.detection_size,
            epochs=cfg.detection_epochs, device=cfg.device, progress=cfg.progress, log=log,
            **cfg.detection_options)
    if cfg.val is None:
        held = holdout_split(np.array([it.label for it in src_index.items]), cfg.holdout, seed=0)[1]
        n_held = len(held)
        result["dataset"]["n_train"] = len(src_index.items) - n_held
        result["dataset"]["n_val"] = n_held
    from . import study_figures

    sheet_src = val_index or src_index
    if cfg.recon_images:
        result["reconstruction"] = study_figures.reconstruction_sheet(
            cfg.out / "study-reconstruction.png", sheet_src, reps, codecs_of(reps), cfg, result,
            log=log)
        result["figures"]["reconstruction"] = "study-reconstruction.png"
    study_figures.accuracy_figure(cfg.out / "study-accuracy.png", result)
    study_figures.loader_figure(cfg.out / "study-loader.png", result)
    result["figures"]["accuracy"] = "study-accuracy.png"
    result["figures"]["loader"] = "study-loader.png"
    result["elapsed_s"] = time.perf_counter() - t_start
    _write(cfg.out / "study.json", json.dumps(result, indent=2, default=_json_default) + "\n")
    _write(cfg.out / "study.md", format_markdown(result))
    return result


def run_detection_rows(src, out, **kw) -> dict:
    """The study's detection rows (``pipelines/study_detection.py``) built with this module's
    store family; their errors become :class:`StudyError`."""
    from .study_detection import DetectionStudyError, run_detection_study

    try:
        return run_detection_study(src, out, family=_StoreFamily, make_rep=_rep, **kw)
    except DetectionStudyError as exc:
        raise StudyError(str(exc)) from exc


def _jpeg_ratios(rows: list[dict]) -> None:
    """``ratio_vs_jpeg_q90`` of every row: against the study's own q90 JPEGs of the same frames
    when that row ran, else against the q90 JPEG the encode job measured (``reference_jpeg``)."""
    from scatstore.pipelines.report import report

    q90 = next((r["bytes_per_sample"] for r in rows if r["name"] == "jpeg-q90"), None)
    for r in rows:
        ref = q90
        if ref is None and r["family"] == "store":
            ref = report(r["path"])["jpeg_q90_bytes_per_sample"]
        r["ratio_vs_jpeg_q90"] = r["bytes_per_sample"] / ref if ref else None


def codecs_of(reps: list[Representation]) -> dict[str, str]:
    return {r.name: r.options["codec"] for r in reps if r.options.get("method") == "cae"}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# the table


def _kb(v: float) -> str:
    return f"{v / 1000:,.1f}"


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def format_markdown(result: dict) -> str:
    """``study.md``: the title line and one table row per representation."""
    d, m = result["dataset"], result["machine"]
    trained = any(r["train_top1"] is not None for r in result["representations"])
    head = ["representation", "kB / sample", "× raw", "× source", "× q90 JPEG", "MB read / epoch",
            "loader samples/s", "CPU ms / sample", "model", "input", "GMACs", "probe top-1 %"]
    if trained:
        head.append("trained top-1 %")
    lines = [f"# scatstore study: {d['name']}",
             "",
             f"{d['n_train']} training / {d['n_val']} held-out images ({d['split']}), "
             f"{len(d['classes'])} classes; {m['cpu']} ({m['isa']}, {m['cores']} cores, "
             f"{m['torch_threads']} torch threads). Every number measured in this run.",
             "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for r in result["representations"]:
        cells = [r["label"], _kb(r["bytes_per_sample"]), f"{r['ratio_vs_raw']:.3f}",
                 f"{r['ratio_vs_source']:.2f}",
                 "—" if r.get("ratio_vs_jpeg_q90") is None else f"{r['ratio_vs_jpeg_q90']:.2f}",
                 f"{r['bytes_read_per_epoch'] / 1e6:,.2f}",
                 f"{r['loader_samples_per_s']:,.0f}", f"{r['loader_cpu_ms_per_sample']:.3f}",
                 r["model"], "×".join(str(v) for v in r["model_input_shape"]),
                 f"{r['model_macs'] / 1e9:.2f}", _pct(r["probe_top1"])]
        if trained:
            cells.append(_pct(r["train_top1"]))
        lines.append("| " + " | ".join(cells) + " |")
    rec = result.get("reconstruction") or []
    if rec:
        lines += ["", "Reconstruction PSNR (dB) of the sheet's images, mean over images:", ""]
        names = list(rec[0]["psnr_db"])
        lines.append("| " + " | ".join(names) + " |")
        lines.append("|" + "|".join("---:" for _ in names) + "|")
        lines.append("| " + " | ".join(
            f"{np.mean([r['psnr_db'][n] for r in rec]):.1f}" for n in names) + " |")
    if result.get("detection"):
        from .study_detection import format_detection_markdown

        lines += format_detection_markdown(result["detection"])
    lines.append("")
    return "\n".join(lines)
