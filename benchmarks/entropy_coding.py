"""Entropy coding throughput of CAE latents (C=32, 28x28), one core, batched calls.

Factorized prior (default): symbols come from per-channel discretized Laplace tables whose
scales are spread so that the average rate is about 0.64 bpp at 224² (≈ 4 kB per image,
Torfason's highest operating point), or, with --codec FILE, from that codec's own tables. Each
image is one ANS bitstream (header + CRC included); every constriction call codes one channel of
one image (784 symbols), so an image costs C calls each way and no Python runs per symbol.

Scale hyperprior (--prior hyper, or a hyperprior --codec): the hyper-latent z (7x7xCz) is drawn
over its tables, the integer hyper-synthesis computes each symbol's scale index, and the symbols
are drawn from those Gaussian tables; a bitstream costs Cz calls for z plus one call per scale
index present. The decode column includes the integer hyper-synthesis (it is part of decoding),
which is also timed alone.

    python benchmarks/entropy_coding.py [--prior factorized|hyper] [--codec FILE] [--images 2000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from scatstore.codecs import EntropyTables, load_codec


def laplace_tables(channels: int, rng: np.random.Generator, lo: int = -40, hi: int = 40) -> EntropyTables:
    k = np.arange(lo, hi + 1, dtype=np.float64)
    pmfs = []
    for c in range(channels):
        b = 0.1 + 0.7 * c / max(1, channels - 1)  # from nearly constant to ~2 bits/symbol
        cdf = lambda x: np.where(x < 0, 0.5 * np.exp(x / b), 1 - 0.5 * np.exp(-x / b))  # noqa: E731
        p = cdf(k + 0.5) - cdf(k - 0.5)
        p[0] += cdf(k[0] - 0.5)
        p[-1] += 1 - cdf(k[-1] + 0.5)
        pmfs.append(p)
    return EntropyTables.from_pmfs(pmfs, [lo] * channels)


def _draw(tables: EntropyTables, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One symbol per entry of ``rows`` (table indices), drawn from that table."""
    out = np.empty(rows.shape, dtype=np.int32)
    for t in np.unique(rows):
        cnt = tables.counts[t, :tables.length[t]].astype(np.float64)
        sel = rows == t
        out[sel] = rng.choice(np.arange(tables.length[t]) + tables.offset[t], size=int(sel.sum()),
                              p=cnt / cnt.sum())
    return out


def sample(tables: EntropyTables, n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.broadcast_to(np.arange(tables.channels).reshape(1, -1, 1, 1), (n, tables.channels, h, w))
    return _draw(tables, np.ascontiguousarray(rows), rng)


def synthetic_hyper(channels: int, rng: np.random.Generator):
    """A hyperprior entropy model from a freshly built C=32 hyperprior CAE whose hyper-synthesis
    output is spread over the scale table (untrained weights, biases around sigma ~1)."""
    from scatstore.codecs.hyper import HyperTables, IntegerHyperSynthesis
    from scatstore.codecs.model import CAE2
    from scatstore.codecs.train import freeze_density

    torch.manual_seed(0)
    model = CAE2(channels, 64, "hyper")  # hyper-latent 16 channels, hyper-synthesis width 32
    with torch.no_grad():
        model.hyper_synthesis.l2.weight.mul_(8.0)
        model.hyper_synthesis.l2.bias.fill_(22.0)  # sigma(22) ~ 1
    z_tables = freeze_density(model.density)
    return HyperTables(z_tables, IntegerHyperSynthesis.from_module(model.hyper_synthesis, z_tables))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", help="use this codec's tables (default: synthetic C=32 tables)")
    ap.add_argument("--prior", choices=["factorized", "hyper"], default="factorized")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    args = ap.parse_args()

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    h = w = 28
    if args.codec:
        tables = load_codec(args.codec).tables
    else:
        tables = laplace_tables(32, rng) if args.prior == "factorized" else synthetic_hyper(32, rng)
    hyper = not isinstance(tables, EntropyTables)
    C = tables.channels
    t_syn = None
    if hyper:
        zt = tables.z_tables
        zrows = np.ascontiguousarray(np.broadcast_to(
            np.arange(zt.channels).reshape(1, -1, 1, 1), (args.images, zt.channels, 7, 7)))
        z = _draw(zt, zrows, rng)
        t0 = time.perf_counter()
        idx = np.concatenate([tables.indices(z[i:i + args.batch], (h, w))
                              for i in range(0, args.images, args.batch)])
        t_syn = time.perf_counter() - t0
        symbols = _draw(tables.y_tables, idx, rng)
        side = z
    else:
        symbols = sample(tables, args.images, h, w, rng)
        side = None
    starts = range(0, args.images, args.batch)

    def run_encode():
        if hyper:
            return [b for i in starts for b in tables.encode(symbols[i:i + args.batch], side[i:i + args.batch])]
        return [b for i in starts for b in tables.encode(symbols[i:i + args.batch])]

    enc_t, blobs = float("inf"), None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        blobs = run_encode()
        enc_t = min(enc_t, time.perf_counter() - t0)
    blob_batches = [blobs[i:i + args.batch] for i in starts]
    dec_t, decoded = float("inf"), None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        decoded = np.concatenate([tables.decode(bb) for bb in blob_batches])
        dec_t = min(dec_t, time.perf_counter() - t0)
    assert np.array_equal(decoded, symbols), "round trip failed"

    nbytes = np.array([len(b) for b in blobs])
    ideal = tables.ideal_bits(symbols, side) if hyper else tables.ideal_bits(symbols)
    n_sym = C * h * w
    what = ("codec " + args.codec) if args.codec else ("synthetic " + ("hyperprior" if hyper else "Laplace"))
    print(f"tables: {what}; C={C}, {h}x{w}, {args.images} images, batches of {args.batch}, one core "
          f"(constriction {_ver()})")
    print(f"rate: {nbytes.mean():.0f} bytes/image = {nbytes.mean() * 8 / (8 * h * 8 * w):.3f} bpp at "
          f"{8 * h}², actual/ideal = {nbytes.sum() * 8 / ideal.sum():.4f} (headers"
          + (", side information" if hyper else "") + " included)")
    if hyper:
        print(f"scale indices used per image: {np.mean([len(np.unique(i)) for i in idx[:100]]):.1f}; "
              f"integer hyper-synthesis alone: {args.images / t_syn:,.0f} images/s")
    print("| direction | images/s | Msymbols/s | MB/s (bitstream) | µs/image |")
    print("|---|---|---|---|---|")
    for name, t in (("encode", enc_t), ("decode", dec_t)):
        ips = args.images / t
        print(f"| {name} | {ips:,.0f} | {ips * n_sym / 1e6:.1f} | {nbytes.sum() / t / 1e6:.1f} | "
              f"{1e6 / ips:.0f} |")


def _ver() -> str:
    try:
        from importlib.metadata import version
        return version("constriction")
    except Exception:  # noqa: BLE001  pragma: no cover
        return "?"


if __name__ == "__main__":
    main()
