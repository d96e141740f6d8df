"""`scatstore fit-codec` and `scatstore decode`: train a compressive autoencoder, and turn a
``cae`` store back into PNGs with their PSNR / MS-SSIM."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import click

from .common import DeviceParam, fail


def _load_training_images(src: str, layout: str, max_images: int, seed: int, log) -> list:
    """Decode up to ``max_images`` source images (a seeded random subset) into memory."""
    import numpy as np

    from scatstore.sources import DecodeError, decode_image, discover

    index = discover(src, layout=layout)
    items = list(index.items)
    if not items:
        fail(f"SRC {src} holds no images (layout {index.layout})")
    if len(items) > max_images:
        pick = np.random.default_rng(seed).choice(len(items), size=max_images, replace=False)
        items = [items[i] for i in sorted(pick)]
    images, bad = [], 0
    for item in items:
        try:
            images.append(decode_image(os.path.join(index.root, item.path)))
        except DecodeError:
            bad += 1
    log(f"training on {len(images)} images from {src} ({index.layout} layout"
        + (f", {bad} undecodable skipped" if bad else "") + ")")
    if not images:
        fail("no decodable training images")
    return images


@click.command("fit-codec")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("codec", type=click.Path(dir_okay=False, path_type=str))
@click.option("--channels", "-C", type=int, default=16, show_default=True,
              help="Latent channels C (the paper: 8 / 16 / 32 for 0.098 / 0.33 / 0.64 bpp).")
@click.option("--prior", type=click.Choice(["factorized", "hyper"]), default="factorized",
              show_default=True, help="Entropy model: per-channel factorized, or a scale hyperprior "
              "(side information counted in the rate; exact integer decoding).")
@click.option("--architecture", type=click.Choice(["v1", "v2"]), default="v1", show_default=True,
              help="v1: 3 layers a side with simplified GDN (learns fastest at CPU budgets, "
              "docs/codec.md); v2: the larger 4-layer GDN transform (cae-gdn-v2).")
@click.option("--beta", type=float, default=0.003, show_default=True,
              help="Rate weight β in MSE + β·rate (MSE on [0,1] pixels, rate in bits per pixel); "
              "with --target-bpp the starting value of the adapted β.")
@click.option("--target-bpp", type=float, default=None,
              help="Steer the rate (side information included) to H_t bpp: measured on the training "
              "crops and calibrated on training images at --rate-size.")
@click.option("--rate-control", type=click.Choice(["dual", "hinge"]), default="dual", show_default=True,
              help="With --target-bpp: adapt β to land on H_t (dual), or Torfason's β·max(rate − H_t, 0).")
@click.option("--rate-size", type=int, default=224, show_default=True,
              help="With the dual control: every 50 steps the frozen codec's rate on 8 training images "
              "at this size (centre crops) calibrates the crops' estimate; 0 steers the crops' rate.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default 2000 unless --minutes).")
@click.option("--minutes", type=float, default=None,
              help="Train for this many minutes (wall clock; with --steps: whichever ends first).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Adam learning rate, cosine decay (default 2e-3 for v1, 1e-3 for v2: GDN diverges above).")
@click.option("--size", type=int, default=64, show_default=True,
              help="Training crop size (a multiple of 8); crops of images whose short side is 256.")
@click.option("--hidden", type=int, default=None, help="Hidden channels N (default 96 for v2, 64 for v1).")
@click.option("--layout", default="auto", show_default=True, help="Source layout (auto, imagenet, coco, folder).")
@click.option("--max-images", type=int, default=2000, show_default=True,
              help="From a source folder: decode at most this many images (random subset) into memory.")
@click.option("--workers", type=int, default=None, help="From a raw store: loader reader threads.")
@click.option("--device", type=DeviceParam(), default="cpu", show_default=True, help="torch device for training (cpu, cuda).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from CODEC.ckpt when it exists (written every minute and on Ctrl-C).")
@click.option("--seed", type=int, default=0, show_default=True)
def fit_codec_cmd(src, codec, channels, prior, architecture, beta, target_bpp, rate_control, rate_size, steps,
                  minutes, batch_size, lr, size, hidden, layout, max_images, workers, device, resume, seed):
    """Train a compressive autoencoder on SRC and write the codec file CODEC.

    SRC is a source folder (any layout `encode` reads) or a `raw` store (uint8 pixels, streamed
    by the loader). The codec (stride-8 encoder, rounding quantizer, factorized or hyperprior
    entropy model frozen into 16-bit integer tables, decoder) is one file holding the weights,
    the tables, the format version and a content hash; `scatstore encode --method cae --codec
    CODEC` records that hash. Training checkpoints to CODEC.ckpt (removed when the codec is written).
    """
    from scatstore.codecs import fit_codec
    from scatstore.codecs.train import StoreCropSampler

    if channels < 1 or channels > 1024:
        fail("--channels must be in 1..1024")
    if size % 8 or size < 16:
        fail("--size must be a multiple of 8, at least 16")
    if steps is None and minutes is None:
        steps = 2000
    if (steps is not None and steps < 1) or batch_size < 1 or (minutes is not None and minutes <= 0):
        fail("--steps, --batch-size and --minutes must be positive")
    if beta <= 0:
        fail("--beta must be positive")
    if rate_size < 0 or (rate_size and rate_size % 8):
        fail("--rate-size must be 0 or a positive multiple of 8")
    log = lambda m: click.echo(m, err=True)
    ckpt = Path(codec).with_name(Path(codec).name + ".ckpt")
    if ckpt.exists() and not resume:
        ckpt.unlink()
    if os.path.exists(os.path.join(src, "manifest.json")):
        try:
            data = StoreCropSampler(src, size, batch_size, seed, num_workers=workers)
        except (ValueError, OSError) as exc:
            fail(str(exc))
        log(f"training on crops streamed from the raw store {src}")
    else:
        data = _load_training_images(src, layout, max_images, seed, log)
    if ckpt.exists():
        log(f"resuming from {ckpt}")
    try:
        model = fit_codec(data, channels=channels, beta=beta, steps=steps, minutes=minutes,
                          target_bpp=target_bpp, rate_control=rate_control, prior=prior,
                          architecture="cae-sgdn-v1" if architecture == "v1" else "cae-gdn-v2",
                          batch_size=batch_size, size=size, hidden=hidden, lr=lr, device=device,
                          seed=seed, progress=True, checkpoint=ckpt, rate_size=rate_size or None)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    digest = model.save(codec)
    if "stopped_at_step" in model.info:
        click.echo(f"stopped by Ctrl-C after {model.info['stopped_at_step']} steps: the codec holds "
                   f"the weights so far; run the same command again to continue from {ckpt}", err=True)
    else:
        ckpt.unlink(missing_ok=True)
    final = model.info.get("final") or {}
    click.echo(f"codec written to {codec}: C={channels}, {prior} prior, "
               f"{Path(codec).stat().st_size:,} bytes, {digest}; training estimate "
               f"{final.get('bpp', float('nan')):.4f} bpp, {final.get('psnr', float('nan')):.2f} dB "
               f"on {size}x{size} crops ({model.info.get('steps_done')} steps, "
               f"{model.info.get('train_seconds')} s)")


# ----------------------------------------------------------------------------- decode


def _reference_image(manifest: dict, meta: dict, size: int, src_root: str | None):
    """The preprocessed source image a sample was encoded from, or None if it cannot be rebuilt."""
    import numpy as np

    from scatstore.sources import (
        decode_image,
        random_resized_crop,
        resize_center_crop,
        resize_keep_aspect,
    )

    root = src_root or (manifest.get("source") or {}).get("root")
    path = meta.get("path")
    if not root or not path:
        return None
    from scatstore.stores import StoreError
    from scatstore.stores.safepath import inside

    try:  # meta.path comes from the store: only ever a file below the source root
        full = inside(root, path, "sample path")
    except StoreError:
        return None
    if not full.is_file():
        return None
    img = decode_image(full)
    pre = manifest.get("preprocess") or {}
    if "variant" in meta:
        key = meta.get("source_key", "")
        rng = np.random.default_rng([int(pre.get("seed", 0)), zlib.crc32(key.encode("utf-8")),
                                     int(meta["variant"])])
        return random_resized_crop(img, size, rng)[0]
    if "hw" in meta or str(pre.get("resize", "")).startswith("keep-aspect"):
        return resize_keep_aspect(img, size)[0]
    return resize_center_crop(img, size)[0]


@click.command("decode")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--out", "dest", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Directory for the reconstructed PNGs.")
@click.option("--codec", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Codec file (default: the path recorded in the store's manifest).")
@click.option("--src", "src_root", type=click.Path(exists=True, file_okay=False, path_type=str),
              default=None, help="Source root for the quality metrics (default: the manifest's).")
@click.option("--limit", type=int, default=None, help="Decode only the first N samples.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", type=DeviceParam(), default="cpu", show_default=True, help="torch device for the decoder network.")
@click.option("--no-metrics", is_flag=True, help="Only write PNGs, skip PSNR / MS-SSIM.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def decode_cmd(out, dest, codec, src_root, limit, batch_size, device, no_metrics, as_json):
    """Decode the bitstreams of the `cae` store OUT into PNGs and report PSNR / MS-SSIM.

    Quality is measured on 8-bit images against the source images preprocessed as the encoder
    saw them (re-read from the source root recorded in the manifest, or --src).
    """
    import numpy as np
    from PIL import Image

    import scatstore
    from scatstore.codecs import (
        CodecMismatchError,
        CorruptBitstreamError,
        load_codec,
        ms_ssim,
        psnr,
    )

    from scatstore.stores import StoreError
    from scatstore.stores.safepath import safe_name

    if batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        fail(f"--limit must be >= 0, got {limit}")
    try:
        ds = scatstore.open_dataset(out)
    except StoreError as exc:
        fail(str(exc))
    manifest = ds.manifest
    method = manifest.get("method") or {}
    if method.get("name") != "cae":
        fail(f"{out} holds method {method.get('name')!r}, not 'cae': nothing to decode")
    params = method.get("params") or {}
    codec_path = codec or params.get("codec_path")
    if not codec_path or not os.path.exists(codec_path):
        fail(f"codec file not found ({codec_path!r}): pass --codec PATH")
    model = load_codec(codec_path, device=device)
    try:
        model.check_compatible(manifest)
    except CodecMismatchError as exc:
        fail(str(exc))
    size = int((manifest.get("preprocess") or {}).get("size", 0)) or None
    n = len(ds) if limit is None else min(limit, len(ds))
    Path(dest).mkdir(parents=True, exist_ok=True)
    p_list, m_list, nbytes, missing_ref = [], [], 0, 0
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, batch_size), desc="decode", unit="batch", disable=as_json):
        blobs, names, metas = [], [], []
        for i in range(start, min(n, start + batch_size)):
            try:
                x, _label, meta = ds[i]
                # the PNG is named by the sample's store key (unique, checked when the store
                # was opened), never by a free-form meta field
                key = safe_name(ds.keys[i], "sample key")
            except StoreError as exc:
                fail(str(exc), code=1)
            meta = meta or {}
            blobs.append(bytes(x))
            names.append(key)
            metas.append(meta)
            nbytes += len(x)
        try:
            symbols = model.decode_symbols(blobs, names)
        except CorruptBitstreamError as exc:
            fail(str(exc), code=1)
        images = model.decode_images(symbols)
        for img, name, meta in zip(images, names, metas):
            hw = meta.get("hw")
            shown = img[:, :hw[0], :hw[1]] if hw else img
            Image.fromarray(np.ascontiguousarray(shown.transpose(1, 2, 0))).save(
                Path(dest) / f"{name}.png")
            if no_metrics:
                continue
            ref = _reference_image(manifest, meta, size or img.shape[1], src_root)
            if ref is None:
                missing_ref += 1
                continue
            if hw:
                ref, img = ref[:, :hw[0], :hw[1]], img[:, :hw[0], :hw[1]]
            p_list.append(psnr(ref, img))
            if min(img.shape[1:]) >= 176:
                m_list.append(ms_ssim(ref, img))
    pixels = n * (size or 0) ** 2
    summary = {
        "store": out, "decoded": n, "png_dir": dest, "codec_hash": model.hash,
        "bitstream_bytes": nbytes, "bytes_per_image": nbytes / n if n else 0.0,
        "bpp": 8 * nbytes / pixels if pixels else None,
        "psnr_db": float(np.mean(p_list)) if p_list else None,
        "ms_ssim": float(np.mean(m_list)) if m_list else None,
        "measured": len(p_list), "no_reference": missing_ref,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"decoded {n:,} samples into {dest}: {summary['bytes_per_image']:.0f} bytes/image"
               + (f", {summary['bpp']:.4f} bpp (bitstreams)" if summary["bpp"] else ""))
    if p_list:
        click.echo(f"PSNR {summary['psnr_db']:.2f} dB"
                   + (f", MS-SSIM {summary['ms_ssim']:.4f}" if m_list else "")
                   + f" over {len(p_list):,} images (8-bit, against the preprocessed sources)")
    if missing_ref:
        click.echo(f"{missing_ref:,} samples without a readable source image: no metrics for them")
