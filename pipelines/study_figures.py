"""The study's PNG figures (matplotlib, Agg backend, no display needed).

* :func:`accuracy_figure` — accuracy vs bytes per sample, one point per representation, the Pareto
  front (no other row is both smaller and more accurate) drawn as a step line.
* :func:`loader_figure` — loader samples/s vs bytes per sample.
* :func:`reconstruction_sheet` — a few held-out images next to what each representation keeps:
  scat1 J=1…4 inverted by gradient descent (:mod:`scatstore.evaluation.reconstruct`), the learned
  codecs' decodes and the JPEG baselines, with the PSNR under each.

Every figure has labelled axes with units, one legend and a title naming the dataset and the CPU.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

FIG_DPI = 100
ACCURACY_SIZE_IN = (10.0, 6.5)   # inches at FIG_DPI: 1000×650 pixels
LOADER_SIZE_IN = (10.0, 6.5)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict, what: str) -> str:
    d, m = result["dataset"], result["machine"]
    return (f"{what}\n{d['name']}: {d['n_train']} training / {d['n_val']} held-out images, "
            f"{len(d['classes'])} classes — {m['cpu']} ({m['cores']} cores)")


def _colours(groups: list[str]) -> dict[str, tuple]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {g: cmap(i % 10) for i, g in enumerate(dict.fromkeys(groups))}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, value) that no other point beats on both (lower cost, higher
    value), sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _scatter_rows(ax, rows, ykey, colours, marker="o", filled=True, annotate=True):
    # labels cycle over four heights (two above, two below their point) in order of size, so
    # that neighbours on a log axis do not overlap
    order = sorted(range(len(rows)), key=lambda i: rows[i]["bytes_per_sample"])
    for rank, i in enumerate(order):
        r = rows[i]
        y = r[ykey]
        if y is None:
            continue
        c = colours[r["group"]]
        ax.scatter(r["bytes_per_sample"] / 1000, y, s=70, marker=marker, zorder=3,
                   facecolors=c if filled else "none", edgecolors=c, linewidths=1.5)
        if annotate:
            ax.annotate(r["label"], (r["bytes_per_sample"] / 1000, y), textcoords="offset points",
                        xytext=(6, (7, -13, 17, -23)[rank % 4]), fontsize=8)


def _plain_log_ticks(axis) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _legend(ax, colours, extra=()):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=c, markersize=8, label=g)
               for g, c in colours.items()]
    handles += list(extra)
    ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.9)


def accuracy_figure(path: Path, result: dict) -> None:
    from matplotlib.lines import Line2D

    plt = _plt()
    rows = result["representations"]
    colours = _colours([r["group"] for r in rows])
    fig, ax = plt.subplots(figsize=ACCURACY_SIZE_IN, dpi=FIG_DPI)
    for r in rows:
        r["_probe_pct"] = 100 * r["probe_top1"]
        r["_train_pct"] = None if r["train_top1"] is None else 100 * r["train_top1"]
    _scatter_rows(ax, rows, "_probe_pct", colours)
    extra = [Line2D([], [], marker="o", linestyle="", color="0.3", label="linear probe")]
    pts = [(r["bytes_per_sample"] / 1000, r["_probe_pct"]) for r in rows]
    front = pareto_front(pts)
    # the front as a staircase, carried on to the largest row: the best accuracy at each budget
    xs = [pts[i][0] for i in front] + [max(p[0] for p in pts)]
    ys = [pts[i][1] for i in front] + [pts[front[-1]][1]]
    ax.step(xs, ys, where="post", color="0.35", linestyle="--", linewidth=1.2, zorder=2)
    extra.append(Line2D([], [], color="0.35", linestyle="--", label="Pareto front (probe)"))
    if any(r["_train_pct"] is not None for r in rows):
        _scatter_rows(ax, rows, "_train_pct", colours, marker="s", filled=False, annotate=False)
        archs = sorted({r["model"] for r in rows if r["_train_pct"] is not None})
        extra.append(Line2D([], [], marker="s", linestyle="", markerfacecolor="none", color="0.3",
                            label=f"trained model ({', '.join(archs)})"))
    for r in rows:
        r.pop("_probe_pct", None)
        r.pop("_train_pct", None)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("bytes per sample on disk (kB, log scale)")
    ax.set_ylabel("held-out top-1 accuracy (%)")
    lo = min([p[1] for p in pts] + [100.0])
    ax.set_ylim(max(0.0, lo - 10), 101.5)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, colours, extra)
    ax.set_title(_title(result, "Accuracy vs storage"), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def loader_figure(path: Path, result: dict) -> None:
    plt = _plt()
    rows = result["representations"]
    colours = _colours([r["group"] for r in rows])
    fig, ax = plt.subplots(figsize=LOADER_SIZE_IN, dpi=FIG_DPI)
    _scatter_rows(ax, rows, "loader_samples_per_s", colours)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.xaxis)
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("bytes per sample on disk (kB, log scale)")
    ax.set_ylabel("training loader throughput (samples/s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, colours)
    s = result["settings"]
    ax.set_title(_title(result, f"Loader speed vs storage (page cache, {s['num_workers']} workers, "
                                f"batch {s['batch_size']})"), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# reconstruction sheet


def _sheet_images(index, n: int, size: int) -> tuple[list[str], np.ndarray]:
    """The first decodable image of each class in turn (then the next of each...), framed as the
    stores frame them: (n, 3, size, size) uint8."""
    from scatstore.sources import DecodeError, decode_for_frame, resize_center_crop

    by_class: dict[int, list] = {}
    for it in index.items:
        by_class.setdefault(it.label, []).append(it)
    order, k = [], 0
    while len(order) < len(index.items):
        for c in sorted(by_class):
            if k < len(by_class[c]):
                order.append(by_class[c][k])
        k += 1
    keys, imgs = [], []
    for it in order:
        if len(imgs) == n:
            break
        try:
            img, _ = decode_for_frame(index.abspath(it), size)
        except (DecodeError, OSError):
            continue
        imgs.append(resize_center_crop(img, size)[0])
        keys.append(it.key)
    return keys, np.stack(imgs) if imgs else np.zeros((0, 3, size, size), np.uint8)


def _jpeg_roundtrip(images: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1))
    return np.stack(out)


def reconstruction_columns(images: np.ndarray, reps, codecs: dict[str, str], steps: int,
                           log=None) -> dict[str, np.ndarray]:
    """``{column label: (n, 3, H, W) uint8}``: what each representation keeps of ``images``."""
    import torch

    from scatstore.evaluation.reconstruct import invert_scattering

    cols: dict[str, np.ndarray] = {"original": images}
    x = torch.from_numpy(images).float().div_(255.0)
    for J in (1, 2, 3, 4):
        if log:
            log(f"  reconstruction: inverting scat1 J={J} ({steps} gradient steps)")
        xr, _ = invert_scattering(x, J, steps=steps)
        cols[f"scat1 J={J}"] = (xr.numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    for name, path in codecs.items():
        from scatstore.codecs import load_codec

        codec = load_codec(path)
        sym, _ = codec.quantize(images)
        cols[name] = codec.decode_images(sym)
    for r in reps:
        if r.family == "jpeg":
            cols[r.label] = _jpeg_roundtrip(images, int(r.options["quality"]))
    return cols


def reconstruction_sheet(path: Path, index, reps, codecs: dict[str, str], cfg, result: dict,
                         log=None) -> list[dict]:
    """Draw the sheet to ``path``; returns ``[{"image": key, "psnr_db": {column: dB}}]``."""
    from scatstore.evaluation.reconstruct import psnr_db

    keys, images = _sheet_images(index, cfg.recon_images, cfg.size)
    if not len(images):
        return []
    cols = reconstruction_columns(images, reps, codecs, cfg.recon_steps, log=log)
    plt = _plt()
    names = list(cols)
    n, m = len(images), len(names)
    cell = 1.9
    fig, axes = plt.subplots(n, m, figsize=(cell * m, cell * n + 1.1), dpi=FIG_DPI, squeeze=False)
    out = []
    for i in range(n):
        rec = {"image": keys[i], "psnr_db": {}}
        for j, name in enumerate(names):
            ax = axes[i][j]
            im = cols[name][i]
            ax.imshow(im.transpose(1, 2, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if name != "original":
                p = psnr_db(im.astype(np.float64) / 255, images[i].astype(np.float64) / 255)
                rec["psnr_db"][name] = p
                ax.set_xlabel(f"{p:.1f} dB", fontsize=9)
            else:
                ax.set_xlabel(keys[i][:18], fontsize=7)
        out.append(rec)
    fig.suptitle(_title(result, f"What each representation keeps ({cfg.size}² frames; PSNR vs "
                                f"the original; scat1 inverted by {cfg.recon_steps} steps of "
                                "gradient descent on ‖S(x̃)−S(x)‖²)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)
    if log:
        log(f"reconstruction sheet → {path}")
    return out
