"""The detection part of ``scatstore study`` (``--detection COCO_SRC``): one row per input.

A COCO source (``annotations/instances_*.json`` + ``images/``, the layout ``scatstore demo``
builds) is encoded as scat1 J=3 on keep-aspect canvases (the study's store family, reused when
OUT already holds it), then Faster R-CNN + FPN is trained from the stored coefficients
(``fasterrcnn_scatresnet50``) and from the source JPEGs (``fasterrcnn_resnet18``, the pixel
baseline), each with the same epochs, batch, RoI sampling and proposals, through the engine of
``scatstore train --task detection`` (:func:`scatstore.pipelines.detect.train_detector`), and
scored with pycocotools on ``--detection-val`` or, without it, on the training images themselves
(the row's ``split`` says which). Settings: :data:`DEFAULTS` (the CPU overfit recipe of
docs/models.md); row keys: :data:`DETECTION_ROW_KEYS` (docs/study.md).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable



class DetectionStudyError(ValueError):
    """A detection study that cannot run as asked (``scatstore.pipelines.study`` turns it into
    its ``StudyError``)."""

# the CPU recipe of docs/models.md (benchmarks/detection_overfit.py); lr per input: the pixel
# detector from scratch diverged once at 0.01
DEFAULTS = {
    "J": 3, "batch_size": 2, "box_batch_size_per_image": 64, "proposals": 200,
    "scat_arch": "fasterrcnn_scatresnet50", "width": 64, "layers": (2, 2, 2), "fpn_channels": 128,
    "scat_lr": 0.01, "pixel_arch": "fasterrcnn_resnet18", "pixel_lr": 0.005, "seed": 0,
}

DETECTION_ROW_KEYS = {
    "name": "scat1-J3 (stored coefficients) or pixels (the source JPEGs)",
    "label": "the table's label",
    "kind": "scattering | pixels",
    "arch": "the detector trained",
    "path": "what the loader reads: the store, or the COCO source",
    "count": "training images",
    "bytes_per_image": "stored bytes / images (store: every file of it; pixels: the source JPEGs)",
    "ratio_vs_source": "bytes_per_image / the source JPEGs' mean size",
    "split": "what AP is scored on: 'val' (--detection-val) or 'train' (the training images)",
    "ap": "COCO AP@[.5:.95] after the last epoch (pycocotools)",
    "ap50": "AP at IoU 0.5",
    "ap75": "AP at IoU 0.75",
    "epochs": "epochs trained",
    "lr": "base learning rate",
    "samples_per_s": "training images / wall time of the training loops",
    "data_wait_frac": "time blocked on the next batch / wall time of the training loops",
    "train_cpu_s": "process CPU seconds of the epochs (training, BN recalibration, scoring)",
    "train_s": "wall seconds of the epochs",
    "build_s": "seconds spent encoding the store in this run (0 when reused; pixels: 0)",
}


def check_source(src: Path, what: str = "--detection"):
    """The COCO index of ``src``; a :class:`DetectionStudyError` naming ``what`` when it is not
    one."""
    from scatstore.sources import discover

    src = Path(src)
    if not (src / "annotations").is_dir() or not list((src / "annotations").glob("instances_*.json")):
        raise DetectionStudyError(f"{what} {src} is not a COCO source (needs "
                                  "annotations/instances_*.json and its images, the layout "
                                  "`scatstore demo` builds)")
    try:
        index = discover(src, layout="coco")
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise DetectionStudyError(f"{what} {src}: {exc}") from exc
    if not index.items:
        raise DetectionStudyError(f"{what} {src} holds no annotated images")
    return index


def _train_one(name, label, kind, arch, train_ds, val_ds, path, *, epochs, lr, opts, device,
               progress) -> dict:
    import torch

    from scatstore.loaders.detection import detection_batches
    from scatstore.models import build_detector

    from .detect import coco_evaluator, train_detector

    kw = {"box_batch_size_per_image": opts["box_batch_size_per_image"],
          "rpn_post_nms_top_n_train": opts["proposals"], "rpn_post_nms_top_n_test": opts["proposals"],
          "rpn_pre_nms_top_n_train": max(opts["proposals"], 1000),
          "rpn_pre_nms_top_n_test": max(opts["proposals"], 1000)}
    if kind == "scattering":
        kw.update(J=int(train_ds.params["J"]), width=opts["width"], layers=tuple(opts["layers"]),
                  fpn_channels=opts["fpn_channels"])
    torch.manual_seed(opts["seed"])
    model = build_detector(arch, train_ds.in_channels, train_ds.num_classes, **kw)
    bs, seed = opts["batch_size"], opts["seed"]
    history = train_detector(
        model, detection_batches(train_ds, bs, shuffle=True, seed=seed),
        detection_batches(val_ds, bs, shuffle=False, seed=seed), coco_evaluator(val_ds),
        epochs=epochs, lr=lr, device=device, log=None, progress=progress, eval_every=epochs)
    last = history[-1]
    loop_s = sum(r["train_samples"] / max(r["samples_per_s"], 1e-9) for r in history)
    return {"name": name, "label": label, "kind": kind, "arch": arch, "path": str(path),
            "count": len(train_ds), "ap": last["val_map"], "ap50": last["val_map50"],
            "ap75": last["val_map75"], "epochs": len(history), "lr": lr,
            "samples_per_s": sum(r["train_samples"] for r in history) / max(loop_s, 1e-9),
            "data_wait_frac": sum(r["data_wait_frac"] * r["train_samples"] / max(r["samples_per_s"], 1e-9)
                                  for r in history) / max(loop_s, 1e-9),
            "train_cpu_s": sum(r["cpu_time_s"] for r in history),
            "train_s": sum(r["epoch_time_s"] for r in history)}


def run_detection_study(src, out, *, family, make_rep, val=None, size: int = 128,
                        epochs: int = 20, device: str = "cpu", progress: bool = False,
                        log: Callable[[str], None] = lambda m: None, **options) -> dict:
    """Encode ``src`` (and ``val``) under ``out``, train both detectors, return
    ``{"src", "val", "split", "size", "settings", "rows"}`` (rows: :data:`DETECTION_ROW_KEYS`).
    ``family`` builds and measures the store (the study's store family, with ``build`` and
    ``stored_bytes``) and ``make_rep`` makes its representation, both handed in by
    ``scatstore.pipelines.study`` (this module does not import it). ``options`` override
    :data:`DEFAULTS`."""
    from scatstore.loaders.detection import PixelDetection, StoreDetection

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise DetectionStudyError(f"detection study: unknown options {sorted(unknown)}")
    opts = {**DEFAULTS, **options}
    if epochs < 1 or size < 16:
        raise DetectionStudyError("--detection-epochs must be ≥ 1 and --detection-size ≥ 16")
    src, out = Path(src), Path(out)
    index = check_source(src)
    if val is not None:
        check_source(Path(val), "--detection-val")
    source_per_image = index.total_bytes / len(index.items)
    split = "val" if val is not None else "train"
    rep = make_rep(f"scat1-J{opts['J']}", "scattering", f"scat1 J={opts['J']} float16 (stored)",
               "detection", method="scat1", J=opts["J"], dtype="float16")
    store = out / rep.name / "train"
    t0 = time.perf_counter()
    family.build(rep, src, store, size, progress, log, device)
    val_store = None
    if val is not None:
        val_store = out / rep.name / "val"
        family.build(rep, Path(val), val_store, size, progress, log, device)
    build_s = time.perf_counter() - t0
    stored, count = family.stored_bytes(store)

    rows = []
    common = {"epochs": epochs, "opts": opts, "device": device, "progress": progress}
    tr = StoreDetection(store)
    va = StoreDetection(val_store) if val_store else tr
    if va.category_ids != tr.category_ids:
        raise DetectionStudyError(f"--detection-val {val} has category ids {va.category_ids}, "
                         f"--detection {src} has {tr.category_ids}: they must be the same")
    log(f"detection: {rep.name} ({count} images, {epochs} epochs)")
    row = _train_one(rep.name, rep.label, "scattering", opts["scat_arch"], tr, va, store,
                     lr=opts["scat_lr"], **common)
    row.update(bytes_per_image=stored / count, build_s=build_s)
    rows.append(row)
    tr = PixelDetection(src, size)
    log(f"detection: pixels ({len(tr)} images, {epochs} epochs)")
    row = _train_one("pixels", f"source JPEG (decoded, {size}-px canvas)", "pixels",
                     opts["pixel_arch"], tr, PixelDetection(val, size) if val is not None else tr,
                     src, lr=opts["pixel_lr"], **common)
    row.update(bytes_per_image=source_per_image, build_s=0.0)
    rows.append(row)
    for r in rows:
        r["ratio_vs_source"] = r["bytes_per_image"] / source_per_image
        r["split"] = split
        log(f"  {r['name']}: {r['bytes_per_image'] / 1000:.1f} kB/image, AP {r['ap']:.3f} "
            f"AP50 {r['ap50']:.3f}, {r['samples_per_s']:.2f} images/s")
    return {"src": str(src.resolve()), "val": str(Path(val).resolve()) if val is not None else None,
            "split": split, "size": size,
            "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
                         "epochs": epochs},
            "rows": rows}


def format_detection_markdown(det: dict) -> list[str]:
    """The lines of study.md's detection table."""
    scored = "held-out images (--detection-val)" if det["split"] == "val" else \
        "the training images (no --detection-val given)"
    s = det["settings"]
    head = ["input", "detector", "kB / image", "× source", "AP", "AP50", "AP75", "train images/s",
            "data wait %", "train CPU s"]
    lines = ["", f"Detection ({det['src']}, {det['size']}-px canvases, {s['epochs']} epochs, "
             f"batch {s['batch_size']}; AP scored on {scored}):", "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    for r in det["rows"]:
        lines.append("| " + " | ".join([
            r["label"], r["arch"], f"{r['bytes_per_image'] / 1000:,.1f}", f"{r['ratio_vs_source']:.2f}",
            f"{r['ap']:.3f}", f"{r['ap50']:.3f}", f"{r['ap75']:.3f}", f"{r['samples_per_s']:.2f}",
            f"{100 * r['data_wait_frac']:.1f}", f"{r['train_cpu_s']:.0f}"]) + " |")
    return lines
