"""Training a compressive autoencoder: loss ``MSE + β·rate`` with the rate steered to a target.

* MSE is measured on images scaled to [0, 1]; rate in bits per pixel (bits / (H·W)), side
  information (the hyper-latent) included.
* Quantization proxy (``quant_proxy``): ``"ste"`` (default) — the decoder sees rounded latents
  with a straight-through gradient, the rate is the density's code length of the latents plus
  uniform noise U(−½, ½) (the "mixed" proxy of Minnen & Singh 2020); ``"noise"`` — both see the
  noisy latents (Ballé et al. 2017).
* Rate control with ``target_bpp`` H_t (``rate_control``):
  ``"dual"`` (default) — ``MSE + β·rate`` with β adapted every step after the warm-up,
  ``log β += η·clip((bpp − H_t)/H_t, ±1)`` on the smoothed rate, η = 0.02 (a Lagrange multiplier
  found by dual ascent): the operating point lands on H_t and the loss
  stays a smooth rate–distortion Lagrangian throughout. The rate it steers is the training
  crops' estimate times a calibration ratio (``rate_size``): every ``rate_every`` steps the
  model is frozen (integer tables, ~20 ms) and the ideal code length of a fixed set of training
  images at the size they are encoded at (224² centre crops; headers included) is divided by
  the crops' smoothed estimate. Without it the scale hyperprior landed 1.5–1.7× above H_t:
  64² crops give 2×2 hyper-latents, all border, and its scale predictions do not carry over to
  the 7×7 of a 224² image (docs/codec.md);
  ``"hinge"`` — Torfason et al.'s ``MSE + β·max(bpp − H_t, 0)`` with β fixed. With β far above
  the distortion's scale the hinge acts as a wall: every step above H_t the rate gradient is
  ~100x the MSE gradient, Adam's second moments fill with it, and the transform barely learns
  (docs/codec.md, "Why quality fell as rate rose"). Without a target: ``MSE + β·rate``, β fixed.
* The density always keeps fitting the (detached) latents by maximum likelihood.
* After training the density is frozen into integer tables (16 bits); with the hyperprior the
  hyper-synthesis network is frozen into an integer network and the Gaussian conditionals into
  one integer table per quantized scale (hyper.py).
* Training can stop on ``steps`` or ``minutes`` (whichever comes first; the learning-rate
  schedule follows the larger of the two fractions done), and resumes from ``checkpoint``.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .bitstream import EntropyTables
from .codec import Codec, ideal_bits
from .model import build_model, rate_bits


def resize_short_side(img: np.ndarray, short: int) -> np.ndarray:
    """uint8 (H, W, 3) -> resized so that min(H, W) == short (PIL bicubic with antialiasing)."""
    from PIL import Image

    h, w = img.shape[:2]
    s = short / min(h, w)
    nh, nw = max(short, round(h * s)), max(short, round(w * s))
    if (nh, nw) == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (3, size, size) center crop (after resizing the short side to size·8/7)."""
    img = resize_short_side(img, round(size * 256 / 224))
    h, w = img.shape[:2]
    t, l = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[t:t + size, l:l + size].transpose(2, 0, 1))


def _random_crop(rng: np.random.Generator, im_hwc: np.ndarray, size: int) -> np.ndarray:
    h, w = im_hwc.shape[:2]
    t = rng.integers(h - size + 1)
    l = rng.integers(w - size + 1)
    crop = im_hwc[t:t + size, l:l + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop.transpose(2, 0, 1)


def _calibration_crops(images_hwc: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Centre crops of a common size (``size``, or less when an image is smaller; a multiple of 8)."""
    side = min([size, *(min(im.shape[:2]) for im in images_hwc)]) // 8 * 8
    out = []
    for im in images_hwc:
        t, l = (im.shape[0] - side) // 2, (im.shape[1] - side) // 2
        out.append(im[t:t + side, l:l + side].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


class CropSampler:
    """Random ``size``² crops (and horizontal flips) of images resized to a short side of
    ``short`` pixels, the scale at which they are encoded (256 for 224² center crops)."""

    def __init__(self, images: Sequence[np.ndarray], size: int, short: int = 256, seed: int = 0):
        self.size = size
        self.images = [resize_short_side(np.asarray(im, dtype=np.uint8), max(short, size)) for im in images]
        if not self.images:
            raise ValueError("no training images")
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> np.ndarray:
        out = np.empty((n, 3, self.size, self.size), dtype=np.uint8)
        for i in range(n):
            out[i] = _random_crop(self.rng, self.images[self.rng.integers(len(self.images))], self.size)
        return out

    def calibration(self, n: int, size: int) -> np.ndarray:
        """``n`` fixed centre crops (evenly spaced over the images) for the rate calibration."""
        return _calibration_crops([self.images[int(i)] for i in
                                   np.linspace(0, len(self.images) - 1, min(n, len(self.images)))], size)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class StoreCropSampler:
    """Random ``size``² crops of the images of a ``raw`` store, streamed by :func:`scatstore.loader`
    (shuffled, epoch after epoch; one crop per stored image)."""

    def __init__(self, path, size: int, batch_size: int, seed: int = 0, num_workers: int | None = None):
        import scatstore

        self.path, self.size, self.batch_size, self.seed = str(path), size, batch_size, seed
        self.num_workers = num_workers
        self.epoch, self.step = 0, 0
        self.rng = np.random.default_rng(seed)
        self._it = None
        self._pending: list[np.ndarray] = []
        probe = scatstore.loader(self.path, batch_size=1, shuffle=False, normalize_pixels=False)
        if probe.method != "raw":
            raise ValueError(f"{path}: a {probe.method!r} store; fit-codec streams 'raw' stores "
                             "(uint8 pixels) or reads a source folder")
        shape = tuple(getattr(probe.spec, "sample_shape", None) or ())
        if len(shape) >= 2 and min(shape[-2:]) < size:
            raise ValueError(f"{path}: stored images are {shape[-2:]}, smaller than the crop size {size}")

    def _next_batch(self) -> np.ndarray:
        import scatstore

        while True:
            if self._it is None:
                ld = scatstore.loader(self.path, batch_size=self.batch_size, shuffle=True,
                                      seed=self.seed, epoch=self.epoch, start_step=self.step,
                                      normalize_pixels=False, drop_last=False,
                                      num_workers=self.num_workers)
                self._it = iter(ld)
            try:
                x, _ = next(self._it)
                self.step += 1
                return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
            except StopIteration:
                self._it, self.epoch, self.step = None, self.epoch + 1, 0

    def batch(self, n: int) -> np.ndarray:
        out = np.empty((n, 3, self.size, self.size), dtype=np.uint8)
        for i in range(n):
            if not self._pending:
                self._pending = list(self._next_batch())
            im = self._pending.pop(0)
            out[i] = _random_crop(self.rng, im.transpose(1, 2, 0), self.size)
        return out

    def calibration(self, n: int, size: int) -> np.ndarray:
        """The first ``n`` stored images (unshuffled), centre-cropped, for the rate calibration."""
        import scatstore

        ld = scatstore.loader(self.path, batch_size=n, shuffle=False, normalize_pixels=False,
                              drop_last=False, num_workers=0)
        x, _ = next(iter(ld))
        ims = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy().transpose(0, 2, 3, 1)
        return _calibration_crops(list(ims), size)

    def state(self) -> dict:
        # resuming restarts the current epoch at the next unread batch (the buffered rest of the
        # current batch is dropped: a few crops, not worth a format)
        return {"rng": self.rng.bit_generator.state, "epoch": self.epoch, "step": self.step}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch, self.step, self._it, self._pending = int(state["epoch"]), int(state["step"]), None, []


def freeze_density(density, precision: int = 16, tail: float = 1e-7) -> EntropyTables:
    """Integer tables of a density (a float64 copy on the CPU; ``density`` is left as it is,
    so that training can go on)."""
    import copy

    pmfs, offsets = copy.deepcopy(density).to("cpu").double().pmfs(tail=tail)
    return EntropyTables.from_pmfs(pmfs, offsets, precision)


STREAM_OVERHEAD_BYTES = 13  # per bitstream: header and CRC (~11 bytes at 224²), ANS termination (~2)


@torch.no_grad()
def deployed_bpp(model, images: np.ndarray, device, batch_size: int = 4) -> float:
    """The rate a codec frozen from ``model`` now would give on uint8 ``images`` (B, 3, S, S):
    ideal code length under its integer tables, side information and stream overhead included."""
    tables = freeze_tables(model)
    ys = [torch.round(model.encoder(model.preprocess(torch.from_numpy(images[i:i + batch_size]).to(device))))
          .to(torch.int64).cpu().numpy() for i in range(0, len(images), batch_size)]
    bits = ideal_bits(model, tables, np.concatenate(ys), device, batch_size) + 8 * STREAM_OVERHEAD_BYTES
    return float(bits.sum()) / (images.shape[0] * images.shape[2] * images.shape[3])


def freeze_tables(model, precision: int = 16, tail: float = 1e-7):
    """The frozen entropy coder of a trained model: :class:`EntropyTables` (factorized prior) or
    :class:`~scatstore.codecs.hyper.HyperTables` (scale hyperprior)."""
    tables = freeze_density(model.density, precision, tail)
    if getattr(model, "prior", "factorized") == "hyper":
        from .hyper import HyperTables, IntegerHyperSynthesis

        return HyperTables(tables, IntegerHyperSynthesis.from_module(model.hyper_synthesis, tables),
                           precision=precision)
    return tables


_CKPT_VERSION = 1


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def fit_codec(images, channels: int, beta: float, steps: int | None = None,
              *, target_bpp: float | None = None, batch_size: int = 16, size: int = 64,
              hidden: int | None = None, lr: float | None = None, device: str = "cpu", seed: int = 0,
              progress: bool | Callable[[int, dict], None] = True,
              sampler_short: int = 256, density_lr_scale: float = 10.0,
              density_init_scale: float = 10.0, architecture: str = "cae-sgdn-v1",
              prior: str = "factorized", rate_control: str = "dual", dual_rate: float = 0.02,
              quant_proxy: str = "ste", hyper_channels: int = 16, hyper_hidden: int = 32,
              minutes: float | None = None, checkpoint: str | os.PathLike | None = None,
              checkpoint_every: float = 60.0, latent_gain: float = 1.0,
              rate_size: int | None = 224, rate_every: int = 50, rate_images: int = 8) -> Codec:
    """Train a CAE on random crops and return the frozen :class:`Codec`.

    ``images``: uint8 HWC arrays, or a sampler with ``batch(n)`` (:class:`CropSampler`,
    :class:`StoreCropSampler`). ``steps`` and/or ``minutes`` bound the training.
    ``checkpoint``: a file written every ``checkpoint_every`` seconds and at the end; when it
    exists and was written for the same configuration, training resumes from it.
    ``progress``: True shows a tqdm bar (loss, PSNR, bpp); a callable gets ``(step, stats)``.
    Ctrl-C after the first step stops the training early: the codec is frozen from the weights
    so far (``info["stopped_at_step"]``) instead of losing them; before it, it is raised.
    ``rate_size``: with the dual rate control, the rate is calibrated every ``rate_every`` steps
    on ``rate_images`` fixed centre crops of this size (module doc); ``None``, or a sampler
    without ``calibration``, steers the training crops' estimate itself.
    """
    if size % 8:
        raise ValueError("training crop size must be a multiple of 8")
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes (or both)")
    if rate_control not in ("dual", "hinge"):
        raise ValueError("rate_control is 'dual' or 'hinge'")
    if quant_proxy not in ("ste", "noise"):
        raise ValueError("quant_proxy is 'ste' or 'noise'")
    if hidden is None:
        hidden = 64 if architecture == "cae-sgdn-v1" else 96
    if lr is None:  # GDN's inverse grows as x·|x| and diverges at 2e-3 (docs/codec.md)
        lr = 2e-3 if architecture == "cae-sgdn-v1" else 1e-3
    torch.manual_seed(seed)
    sampler = images if hasattr(images, "batch") else CropSampler(images, size, sampler_short, seed)
    dev = torch.device(device)
    config = {"channels": channels, "hidden": hidden, "stride": 8, "architecture": architecture,
              "beta": beta, "target_bpp": target_bpp, "steps": steps, "minutes": minutes,
              "batch_size": batch_size, "crop_size": size, "lr": lr,
              "density_lr_scale": density_lr_scale, "seed": seed, "quantization": "round, step 1",
              "training_quantization": ("straight-through rounding (decoder), uniform noise (rate)"
                                        if quant_proxy == "ste" else "uniform noise"),
              "rate_control": rate_control if target_bpp is not None else "fixed"}
    calib = None
    if target_bpp is not None and rate_control == "dual" and rate_size and hasattr(sampler, "calibration"):
        calib = sampler.calibration(rate_images, rate_size)
        config.update(rate_calibration={"size": int(calib.shape[-1]), "images": int(len(calib)),
                                        "every": int(rate_every)})
    if architecture != "cae-sgdn-v1" or prior != "factorized":
        config["prior"] = prior
        if architecture != "cae-sgdn-v1":
            config["latent_gain"] = latent_gain
        if prior == "hyper":
            config.update(hyper_channels=hyper_channels, hyper_hidden=hyper_hidden)
    model = build_model(config).to(dev)
    dens = list(model.density.parameters())
    nets = [p for n, p in model.named_parameters() if not n.startswith("density.")]
    opt = torch.optim.Adam([{"params": nets, "lr_scale": 1.0},
                            {"params": dens, "lr_scale": density_lr_scale}], lr=lr)
    warm = 100 if steps is None else max(1, min(100, steps // 20))
    budget_s = None if minutes is None else 60.0 * minutes

    def frac(step: int, elapsed: float) -> float:
        f = 0.0 if steps is None else step / max(1, steps)
        return max(f, 0.0 if budget_s is None else elapsed / budget_s)

    def lr_at(step: int, elapsed: float) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        t = min(1.0, frac(step, elapsed))
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    log_beta = math.log(beta)
    rate_ratio = None  # deployed rate / training crops' estimate (calibration)
    history: list[dict] = []
    ema: dict[str, float] = {}
    start, spent = 0, 0.0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        same = {k: v for k, v in config.items() if k not in ("steps", "minutes")}
        theirs = {k: v for k, v in (state.get("config") or {}).items() if k not in ("steps", "minutes")}
        if state.get("version") != _CKPT_VERSION or theirs != same:
            raise ValueError(f"{ckpt}: checkpoint of another training configuration; delete it or "
                             "train with the settings it was written with")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, spent, log_beta = int(state["step"]), float(state["seconds"]), float(state["log_beta"])
        rate_ratio = state.get("rate_ratio")
        history, ema = list(state["history"]), dict(state["ema"])
        if hasattr(sampler, "restore"):
            sampler.restore(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)

    def write_ckpt(step: int, seconds: float) -> None:
        if ckpt is None:
            return
        _save_checkpoint(ckpt, {
            "version": _CKPT_VERSION, "config": config, "model": model.state_dict(),
            "opt": opt.state_dict(), "step": step, "seconds": seconds, "log_beta": log_beta,
            "rate_ratio": rate_ratio,
            "history": history, "ema": ema, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "sampler": sampler.state() if hasattr(sampler, "state") else {}})

    total = steps if steps is not None else None
    bar = None
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=f"fit-codec C={channels}", unit="step")
    t0 = time.perf_counter() - spent
    last_ckpt = time.perf_counter()
    model.train()
    stopped_at, step = None, start
    hyper = getattr(model, "prior", "factorized") == "hyper"
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if (steps is not None and step >= steps) or (budget_s is not None and elapsed >= budget_s):
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, elapsed) * g["lr_scale"]
            x = model.preprocess(torch.from_numpy(sampler.batch(batch_size)).to(dev))
            y = model.encoder(x)
            noise = torch.empty_like(y).uniform_(-0.5, 0.5)
            y_noisy = y + noise
            y_dec = y + (torch.round(y) - y).detach() if quant_proxy == "ste" else y_noisy
            x_hat = model.decoder(y_dec)
            mse = torch.mean((x_hat - x) ** 2)
            pixels = x.shape[0] * x.shape[2] * x.shape[3]
            if hyper:
                z = model.hyper_analysis(y_dec)  # at encode time it sees the rounded latents
                z_noisy = z + torch.empty_like(z).uniform_(-0.5, 0.5)
                bits_y, bits_z = rate_bits(model, y_noisy, z_noisy)
                _, aux_z = rate_bits(model, y_noisy.detach(), z_noisy.detach(), detach_density=True)
                aux = aux_z.sum() / pixels
            else:
                bits_y, bits_z = rate_bits(model, y_noisy)
                aux = rate_bits(model, y_noisy.detach())[0].sum() / pixels
            bpp = (bits_y.sum() + bits_z.sum()) / pixels
            b = math.exp(log_beta)
            if target_bpp is not None and rate_control == "hinge":
                rate = torch.relu(bpp - target_bpp)
            else:
                rate = bpp
            loss = mse + b * rate + 1e-3 * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1  # from here on this step's update is in the weights (and in a checkpoint)
            bpp_v = bpp.item()
            if calib is not None and step > warm and (step - warm - 1) % rate_every == 0:
                dep = deployed_bpp(model, calib, dev)
                r = dep / max(ema.get("bpp", bpp_v), 1e-9)
                rate_ratio = r if rate_ratio is None else 0.5 * rate_ratio + 0.5 * r
                ema["bpp_deployed"] = dep
            if target_bpp is not None and rate_control == "dual" and step > warm:
                # after the warm-up (the density is still far from the latents before it), on the
                # smoothed rate, with the relative error clipped: beta moves at most e^(eta) per step
                err = (ema.get("bpp", bpp_v) * (rate_ratio or 1.0) - target_bpp) / target_bpp
                log_beta += dual_rate * min(1.0, max(-1.0, err))
                log_beta = min(max(log_beta, math.log(1e-6)), math.log(1e2))
            stats = {"loss": loss.item(), "mse": mse.item(), "bpp": bpp_v,
                     "bpp_side": bits_z.sum().item() / pixels, "beta": b}
            for k, v in stats.items():
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
            ema_psnr = 10 * math.log10(1.0 / max(ema["mse"], 1e-12))
            if step % 10 == 1 or (steps is not None and step == steps):
                history.append({"step": step - 1, **{k: round(v, 6) for k, v in ema.items()},
                                "psnr": round(ema_psnr, 3)})
                history = history[-200:]
            if bar is not None:
                bar.update(1)
                if step % 10 == 1:
                    bar.set_postfix(psnr=f"{ema_psnr:.2f}", bpp=f"{ema['bpp']:.3f}", beta=f"{b:.2g}")
            elif callable(progress):
                progress(step - 1, {**ema, "psnr": ema_psnr})
            if ckpt is not None and time.perf_counter() - last_ckpt >= checkpoint_every:
                write_ckpt(step, time.perf_counter() - t0)
                last_ckpt = time.perf_counter()
    except KeyboardInterrupt:
        if step == start:
            raise
        stopped_at = step
    train_s = time.perf_counter() - t0
    write_ckpt(step, train_s)
    if bar is not None:
        bar.close()
    model.eval()
    model.to("cpu")
    tables = freeze_tables(model)
    info = {"train_seconds": round(train_s, 2), "device": str(dev), "steps_done": step,
            "rate_ratio": None if rate_ratio is None else round(rate_ratio, 4),
            "final": history[-1] if history else None, "history": history[-50:]}
    if start:
        info["resumed_at_step"] = start
    if stopped_at is not None:
        info["stopped_at_step"] = stopped_at
    return Codec(model, tables, config, None, info, "cpu")
