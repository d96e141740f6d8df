"""Training a compressive autoencoder: loss ``MSE + β·rate`` (optionally ``β·max(rate − H_t, 0)``).

* MSE is measured on images scaled to [0, 1]; rate in bits per pixel (bits / (H·W)).
* The decoder sees rounded latents with a straight-through gradient; the rate is the
  density's code length of the latents plus uniform noise U(−½, ½) (Ballé et al.).
* With ``target_bpp`` the rate term is Torfason et al.'s hinge ``β·max(bpp − H_t, 0)``: the
  encoder is only pushed toward fewer bits above the target, so the operating point lands
  near it. The density always keeps fitting the (detached) latents by maximum likelihood.
* After training the density is frozen into integer tables (precision 16 bits) over a
  per-channel symbol range that drops tails below 1e-7 (tails are folded into the end
  symbols; the encoder clamps to that range).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .bitstream import EntropyTables
from .codec import Codec
from .model import CAE


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
            im = self.images[self.rng.integers(len(self.images))]
            h, w = im.shape[:2]
            t = self.rng.integers(h - self.size + 1)
            l = self.rng.integers(w - self.size + 1)
            crop = im[t:t + self.size, l:l + self.size]
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
            out[i] = crop.transpose(2, 0, 1)
        return out


def freeze_tables(model: CAE, precision: int = 16, tail: float = 1e-7) -> EntropyTables:
    pmfs, offsets = model.density.to("cpu").double().pmfs(tail=tail)
    model.density.float()
    return EntropyTables.from_pmfs(pmfs, offsets, precision)


def fit_codec(images: Sequence[np.ndarray] | CropSampler, channels: int, beta: float, steps: int,
              *, target_bpp: float | None = None, batch_size: int = 16, size: int = 64,
              hidden: int = 64, lr: float = 2e-3, device: str = "cpu", seed: int = 0,
              progress: bool | Callable[[int, dict], None] = True,
              sampler_short: int = 256, density_lr_scale: float = 10.0,
              density_init_scale: float = 10.0) -> Codec:
    """Train a CAE on random crops of ``images`` (uint8 HWC) and return the frozen :class:`Codec`.

    ``progress``: True shows a tqdm bar (loss, PSNR, bpp); a callable gets ``(step, stats)``.
    Ctrl-C after the first step stops the training early: the codec is frozen from the weights
    so far (``info["stopped_at_step"]``) instead of losing them; before it, it is raised.
    """
    if size % 8:
        raise ValueError("training crop size must be a multiple of 8")
    torch.manual_seed(seed)
    sampler = images if isinstance(images, CropSampler) else CropSampler(images, size, sampler_short, seed)
    dev = torch.device(device)
    model = CAE(channels, hidden, density_init_scale).to(dev)
    # The density learns 10x faster than the networks: the rate estimate is only as good as its
    # fit, and with a few hundred steps a slow density would leave the rate far above the target.
    dens = list(model.density.parameters())
    nets = [p for n, p in model.named_parameters() if not n.startswith("density.")]
    opt = torch.optim.Adam([{"params": nets, "lr_scale": 1.0},
                            {"params": dens, "lr_scale": density_lr_scale}], lr=lr)
    warm = max(1, min(100, steps // 20))

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    bar = None
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"fit-codec C={channels}", unit="step")
    history: list[dict] = []
    ema: dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    stopped_at, done = None, 0
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step) * g["lr_scale"]
            x = CAE.preprocess(torch.from_numpy(sampler.batch(batch_size)).to(dev))
            y = model.encoder(x)
            y_hat = y + (torch.round(y) - y).detach()
            x_hat = model.decoder(y_hat)
            mse = torch.mean((x_hat - x) ** 2)
            noise = torch.empty_like(y).uniform_(-0.5, 0.5)
            pixels = x.shape[0] * x.shape[2] * x.shape[3]
            bpp = -torch.log2(model.density.likelihood(y + noise).clamp_min(1e-9)).sum() / pixels
            bpp_aux = -torch.log2(model.density.likelihood(y.detach() + noise).clamp_min(1e-9)).sum() / pixels
            rate = torch.relu(bpp - target_bpp) if target_bpp is not None else bpp
            loss = mse + beta * rate + 1e-3 * bpp_aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            stats = {"loss": loss.item(), "mse": mse.item(), "bpp": bpp.item()}
            for k, v in stats.items():
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
            ema_psnr = 10 * math.log10(1.0 / max(ema["mse"], 1e-12))
            if step % 10 == 0 or step == steps - 1:
                history.append({"step": step, **{k: round(v, 6) for k, v in ema.items()},
                                "psnr": round(ema_psnr, 3)})
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{ema['loss']:.4g}", psnr=f"{ema_psnr:.2f}", bpp=f"{ema['bpp']:.3f}")
            elif callable(progress):
                progress(step, {**ema, "psnr": ema_psnr})
            done = step + 1
    except KeyboardInterrupt:
        if not done:
            raise
        stopped_at = done
    if bar is not None:
        bar.close()
    model.eval()
    model.to("cpu")
    tables = freeze_tables(model)
    config = {"channels": channels, "hidden": hidden, "stride": 8, "architecture": "cae-sgdn-v1",
              "beta": beta, "target_bpp": target_bpp, "steps": steps, "batch_size": batch_size,
              "crop_size": size, "lr": lr, "density_lr_scale": density_lr_scale, "seed": seed, "quantization": "round, step 1",
              "training_quantization": "straight-through rounding (decoder), uniform noise (rate)"}
    info = {"train_seconds": round(time.perf_counter() - t0, 2), "device": str(dev),
            "final": history[-1] if history else None, "history": history[-50:]}
    if stopped_at is not None:
        info["stopped_at_step"] = stopped_at
    return Codec(model, tables, config, None, info, "cpu")

