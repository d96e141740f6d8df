"""The compressive autoencoders: stride-8 encoders, decoders, factorized density, hyperprior.

Version 1 (architecture "cae-sgdn-v1", the default transform; :class:`CAE`) is described here;
version 2 (the larger "cae-gdn-v2" transform, and the scale hyperprior on either) further down.
``build_model(config)`` builds what a codec file's config names.

Architecture (``N`` hidden channels, ``C`` latent channels)::

    encoder: conv5x5/2 3->N, SGDN, conv5x5/2 N->N, SGDN, conv5x5/2 N->C       (stride 8)
    decoder: deconv5x5/2 C->N, ISGDN, deconv5x5/2 N->N, ISGDN, deconv5x5/2 N->3

SGDN is the simplified generalized divisive normalization of Johnston et al. (2019),
``x / (beta + gamma |x|)`` with a 1x1 ``gamma``; ISGDN its inverse ``x * (beta + gamma |x|)``.
Images enter as ``x/255 - 0.5``. Latents are quantized by rounding (step 1).

The density is Ballé et al.'s (2018, appendix 6.1) non-parametric factorized model: per
channel a monotone function ``f_c`` (a small MLP with positive weights) gives the cumulative
``F_c = sigmoid(f_c)``; the probability of a quantized value ``k`` is ``F_c(k+½) − F_c(k−½)``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class SGDN(nn.Module):
    def __init__(self, ch: int, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(ch))
        self.gamma = nn.Parameter(0.1 * torch.eye(ch).reshape(ch, ch, 1, 1))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.abs(), self.gamma.abs(), self.beta.abs() + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm(x)
        return x * norm if self.inverse else x / norm


def _deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1)


class Encoder(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, hidden, 5, stride=2, padding=2), SGDN(hidden),
            nn.Conv2d(hidden, hidden, 5, stride=2, padding=2), SGDN(hidden),
            nn.Conv2d(hidden, channels, 5, stride=2, padding=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            _deconv(channels, hidden), SGDN(hidden, inverse=True),
            _deconv(hidden, hidden), SGDN(hidden, inverse=True),
            _deconv(hidden, 3),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class FactorizedDensity(nn.Module):
    """Per-channel learned univariate density (Ballé et al. 2018), evaluated via its CDF."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def logits_cdf(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (C, 1, N) -> logits of the CDF, (C, 1, N)."""
        logits = x
        for i in range(len(self.matrices)):
            m = F.softplus(self.matrices[i]).to(x.dtype)
            logits = torch.matmul(m, logits) + self.biases[i].to(x.dtype)
            if i < len(self.factors):
                logits = logits + torch.tanh(self.factors[i].to(x.dtype)) * torch.tanh(logits)
        return logits

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Probability mass of the unit interval around each value of ``y`` (B, C, h, w)."""
        B, C, h, w = y.shape
        v = y.permute(1, 0, 2, 3).reshape(C, 1, -1)
        lower = self.logits_cdf(v - 0.5)
        upper = self.logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper).detach()
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return p.reshape(C, B, h, w).permute(1, 0, 2, 3)

    @torch.no_grad()
    def pmfs(self, lo: int = -512, hi: int = 512, tail: float = 1e-7
             ) -> tuple[list[np.ndarray], np.ndarray]:
        """Per-channel PMFs over a trimmed symbol range, tails folded into the end symbols.

        Computed in float64 once, when the codec is frozen; the result is turned into integer
        tables and the density is never consulted by the entropy coder again.
        """
        grid = torch.arange(lo, hi + 1, dtype=torch.float64)
        v = grid.reshape(1, 1, -1).expand(self.channels, 1, -1)
        cdf_hi = torch.sigmoid(self.logits_cdf(v + 0.5))[:, 0].numpy()  # F(k + 1/2)
        pmfs, offsets = [], []
        for c in range(self.channels):
            F_up = cdf_hi[c]
            F_low = np.concatenate([[0.0], F_up[:-1]])
            # trimmed range: drop symbols whose cumulative tails are below `tail`
            ok_lo = np.nonzero(F_up >= tail)[0]
            ok_hi = np.nonzero(F_low <= 1.0 - tail)[0]
            a = int(ok_lo[0]) if ok_lo.size else 0
            b = int(ok_hi[-1]) if ok_hi.size else len(grid) - 1
            if b <= a:
                b = min(a + 1, len(grid) - 1)
                a = b - 1
            p = np.clip(F_up[a:b + 1] - F_low[a:b + 1], 0.0, None)
            p[0] = F_up[a]                  # fold the lower tail into the first symbol
            p[-1] = 1.0 - F_low[b]          # and the upper tail into the last
            pmfs.append(np.clip(p, 0.0, None))
            offsets.append(int(grid[a]))
        return pmfs, np.array(offsets, dtype=np.int32)


class CAE(nn.Module):
    def __init__(self, channels: int, hidden: int = 64, density_init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        self.hidden = hidden
        self.encoder = Encoder(channels, hidden)
        self.decoder = Decoder(channels, hidden)
        self.density = FactorizedDensity(channels, init_scale=density_init_scale)

    @staticmethod
    def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.float() / 255.0 - 0.5

    @staticmethod
    def postprocess(x: torch.Tensor) -> torch.Tensor:
        """Decoder output -> uint8 images (round half to even on the 0..255 scale)."""
        return torch.clamp((x + 0.5) * 255.0, 0.0, 255.0).round().to(torch.uint8)


# ---------------------------------------------------------------------------- version 2
#
# Architecture "cae-gdn-v2": the stride-8 contract of v1 with four layers a side and full GDN
# (Ballé et al. 2016): encoder conv5x5/2 3->N, GDN, conv5x5/2, GDN, conv5x5/2, GDN, conv3x3/1 N->C;
# decoder conv3x3/1 C->N, IGDN, deconv5x5/2, IGDN, deconv5x5/2, IGDN, deconv5x5/2 N->3.
# With ``prior="hyper"`` a scale hyperprior (Ballé et al. 2018) rides on the latent:
# hyper-analysis conv3x3/1 C->M, ReLU, conv5x5/2 M->M, ReLU, conv5x5/2 M->Cz (stride 4 on the
# latent, 7x7 for 28x28), hyper-synthesis deconv5x5/2 Cz->M, ReLU, deconv5x5/2 M->M, ReLU,
# conv3x3/1 M->C giving, per latent element, a continuous index ``t`` into a fixed table of
# Gaussian scales ``sigma(t) = SCALE_MIN * exp(t * log(SCALE_MAX / SCALE_MIN) / (LEVELS - 1))``.
# At freeze time the hyper-synthesis becomes an integer network (hyper.py): the index is then
# computed exactly, the same on every machine.

SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 64.0, 64
SCALE_STEP = math.log(SCALE_MAX / SCALE_MIN) / (SCALE_LEVELS - 1)


class GDN(SGDN):
    """Generalized divisive normalization ``x / sqrt(beta + gamma x^2)`` (inverse: times)."""

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(F.conv2d(x * x, self.gamma.abs(), self.beta.abs() + 1e-6))


def _conv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class EncoderV2(nn.Module):
    """``gain``: a constant factor on the output. PyTorch's default init gives latents of std
    ~0.05: every one rounds to 0 and the decoder starts blind (it can learn only the mean colour
    until the encoder's outputs cross ±1/2). A constant (not a re-initialisation, which Adam's
    per-weight step sizes would undo) moves the start to latents of order 1."""

    def __init__(self, channels: int, hidden: int, gain: float = 1.0):
        super().__init__()
        self.gain = float(gain)
        self.net = nn.Sequential(_conv(3, hidden), GDN(hidden), _conv(hidden, hidden), GDN(hidden),
                                 _conv(hidden, hidden), GDN(hidden), _conv(hidden, channels, 3, 1))

    def forward(self, x):
        y = self.net(x)
        return y * self.gain if self.gain != 1.0 else y


class DecoderV2(nn.Module):
    def __init__(self, channels: int, hidden: int, gain: float = 1.0):
        super().__init__()
        self.gain = float(gain)
        self.net = nn.Sequential(_conv(channels, hidden, 3, 1), GDN(hidden, True),
                                 _deconv(hidden, hidden), GDN(hidden, True),
                                 _deconv(hidden, hidden), GDN(hidden, True), _deconv(hidden, 3))

    def forward(self, y):
        return self.net(y / self.gain if self.gain != 1.0 else y)


class HyperAnalysis(nn.Module):
    def __init__(self, channels: int, hyper_channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(_conv(channels, hidden, 3, 1), nn.ReLU(), _conv(hidden, hidden),
                                 nn.ReLU(), _conv(hidden, hyper_channels))

    def forward(self, y):
        return self.net(torch.abs(y))


class HyperSynthesis(nn.Module):
    """z -> continuous scale index t (B, C, h, w); layers are read by the integer freezer."""

    def __init__(self, channels: int, hyper_channels: int, hidden: int):
        super().__init__()
        self.l0 = _deconv(hyper_channels, hidden)
        self.l1 = _deconv(hidden, hidden)
        self.l2 = _conv(hidden, channels, 3, 1)
        with torch.no_grad():  # start in the middle of the scale table (sigma ~ 3)
            self.l2.bias.fill_(math.log(3.0 / SCALE_MIN) / SCALE_STEP)

    def forward(self, z, shape):
        h = F.relu(self.l0(z))
        h = F.relu(self.l1(h))
        return self.l2(h)[..., :shape[0], :shape[1]]


def gaussian_likelihood(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mass of [y - 1/2, y + 1/2] under N(0, scale^2) (computed on the lower tail, stable)."""
    v = torch.abs(y)
    s = scale * math.sqrt(2.0)
    return 0.5 * (torch.erfc((v - 0.5) / s) - torch.erfc((v + 0.5) / s))


def scale_of_index(t: torch.Tensor) -> torch.Tensor:
    return SCALE_MIN * torch.exp(SCALE_STEP * torch.clamp(t, 0.0, SCALE_LEVELS - 1.0))


class CAE2(nn.Module):
    """An autoencoder with a factorized (``prior="factorized"``) or scale-hyperprior model;
    ``transform`` "gdn4" (architecture cae-gdn-v2) or "sgdn3" (the v1 transform)."""

    def __init__(self, channels: int, hidden: int = 128, prior: str = "factorized",
                 hyper_channels: int = 16, hyper_hidden: int = 32, density_init_scale: float = 10.0,
                 latent_gain: float = 1.0, transform: str = "gdn4"):
        super().__init__()
        if prior not in ("factorized", "hyper"):
            raise ValueError(f"prior is 'factorized' or 'hyper', not {prior!r}")
        self.channels, self.hidden, self.prior = channels, hidden, prior
        if transform == "sgdn3":  # the v1 transform: same modules, same state-dict keys
            self.encoder, self.decoder = Encoder(channels, hidden), Decoder(channels, hidden)
        elif transform == "gdn4":
            self.encoder = EncoderV2(channels, hidden, latent_gain)
            self.decoder = DecoderV2(channels, hidden, latent_gain)
        else:
            raise ValueError(f"unknown transform {transform!r}")
        if prior == "hyper":
            self.hyper_analysis = HyperAnalysis(channels, hyper_channels, hyper_hidden)
            self.hyper_synthesis = HyperSynthesis(channels, hyper_channels, hyper_hidden)
            self.density = FactorizedDensity(hyper_channels, init_scale=density_init_scale)
        else:
            self.density = FactorizedDensity(channels, init_scale=density_init_scale)

    preprocess = staticmethod(CAE.preprocess)
    postprocess = staticmethod(CAE.postprocess)


def rate_bits(model: nn.Module, y: torch.Tensor, z: torch.Tensor | None = None,
              detach_density: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Code length in bits, per image, of ``y`` (and of the hyper-latent ``z``) under the model.

    ``y``/``z`` are rounded or noisy values. Returns ``(bits_y, bits_z)``; ``bits_z`` is zero for
    the factorized prior.
    """
    def nll(p):
        return -torch.log2(p.clamp_min(1e-9)).sum(dim=(1, 2, 3))

    if getattr(model, "prior", "factorized") == "hyper":
        t = model.hyper_synthesis(z, y.shape[-2:])
        bits_y = nll(gaussian_likelihood(y, scale_of_index(t)))
        zz = z.detach() if detach_density else z
        return bits_y, nll(model.density.likelihood(zz))
    yy = y.detach() if detach_density else y
    return nll(model.density.likelihood(yy)), torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)


def build_model(config: dict) -> nn.Module:
    """The network a codec file's ``config`` describes (architecture registry)."""
    arch = config.get("architecture", "cae-sgdn-v1")
    if arch == "cae-sgdn-v1" and config.get("prior", "factorized") == "factorized":
        return CAE(int(config["channels"]), int(config["hidden"]))
    if arch == "cae-sgdn-v1":  # the v1 transform under a scale hyperprior
        return CAE2(int(config["channels"]), int(config["hidden"]), "hyper",
                    int(config.get("hyper_channels", 16)), int(config.get("hyper_hidden", 32)),
                    transform="sgdn3")
    if arch == "cae-gdn-v2":
        return CAE2(int(config["channels"]), int(config["hidden"]), config.get("prior", "factorized"),
                    int(config.get("hyper_channels", 16)), int(config.get("hyper_hidden", 32)),
                    latent_gain=float(config.get("latent_gain", 1.0)))
    raise ValueError(f"unknown codec architecture {arch!r}")


ARCHITECTURES = ("cae-sgdn-v1", "cae-gdn-v2")
