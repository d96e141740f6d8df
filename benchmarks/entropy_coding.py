"""Entropy coding throughput of CAE latents (C=32, 28x28), one core, batched calls.

Symbols come from per-channel discretized Laplace tables whose scales are spread so that the
average rate is about 0.64 bpp at 224² (≈ 4 kB per image, Torfason's highest operating point),
or, with --codec FILE, from that codec's own integer tables. Each image is one ANS bitstream
(header + CRC included); every constriction call codes one channel of one image (784 symbols),
so an image costs C calls each way and no Python runs per symbol.

    python benchmarks/entropy_coding.py [--codec FILE] [--images 2000] [--batch 64]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

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


def sample(tables: EntropyTables, n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, tables.channels, h, w), dtype=np.int32)
    for c in range(tables.channels):
        cnt = tables.counts[c, :tables.length[c]].astype(np.float64)
        out[:, c] = rng.choice(np.arange(tables.length[c]) + tables.offset[c], size=(n, h, w),
                               p=cnt / cnt.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", help="use this codec's tables (default: synthetic C=32 tables)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    tables = load_codec(args.codec).tables if args.codec else laplace_tables(32, rng)
    C, h, w = tables.channels, 28, 28
    symbols = sample(tables, args.images, h, w, rng)
    batches = [symbols[i:i + args.batch] for i in range(0, args.images, args.batch)]

    def run_encode():
        return [b for batch in batches for b in tables.encode(batch)]

    enc_t, blobs = float("inf"), None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        blobs = run_encode()
        enc_t = min(enc_t, time.perf_counter() - t0)
    blob_batches = [blobs[i:i + args.batch] for i in range(0, args.images, args.batch)]
    dec_t, decoded = float("inf"), None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        decoded = np.concatenate([tables.decode(bb) for bb in blob_batches])
        dec_t = min(dec_t, time.perf_counter() - t0)
    assert np.array_equal(decoded, symbols), "round trip failed"

    nbytes = np.array([len(b) for b in blobs])
    ideal = tables.ideal_bits(symbols)
    n_sym = C * h * w
    print(f"tables: {'codec ' + args.codec if args.codec else 'synthetic Laplace'}; C={C}, {h}x{w}, "
          f"{args.images} images, batches of {args.batch}, one core (constriction {_ver()})")
    print(f"rate: {nbytes.mean():.0f} bytes/image = {nbytes.mean() * 8 / (8 * h * 8 * w):.3f} bpp at "
          f"{8 * h}², actual/ideal = {nbytes.sum() * 8 / ideal.sum():.4f} (headers included)")
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
    except Exception:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    main()
