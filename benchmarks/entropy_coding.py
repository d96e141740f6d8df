"""Entropy coding throughput of CAE latents (C=32, 28x28), one core, batched calls.

Factorized prior: symbols come from per-channel discretized Laplace tables whose scales are
spread so that the average rate is about 0.64 bpp at 224² (≈ 4 kB per image, Torfason's highest
operating point), or, with --codec FILE, from that codec's own tables. Each image is one ANS
bitstream (header + CRC included); every constriction call codes one channel of one image (784
symbols), so an image costs C calls each way and no Python runs per symbol.

Scale hyperprior: the hyper-latent z (7x7xCz) is drawn over its tables, the integer
hyper-synthesis computes each symbol's scale index, and the symbols are drawn from those
Gaussian tables; a bitstream costs Cz calls for z plus one call per scale index present. Both
columns include the integer hyper-synthesis (part of encoding and of decoding), which is also
timed alone.

``--baseline REV`` (default 8a87dc7, the code before the batched hyperprior coder) loads
``scatstore/codecs/hyper.py`` as it was at REV (``git show``) and times it on the same tables and
symbols in the same rounds, alternating; its bitstreams must equal the current ones byte for byte
and decode to the same symbols (checked). Rounds alternate the paths; the table gives medians
over rounds and the ratio current / baseline.

    python benchmarks/entropy_coding.py [--prior factorized,hyper] [--codec FILE]
        [--images 1000] [--rounds 5] [--baseline REV|none]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_points import machine_header  # noqa: E402

from scatstore.codecs import EntropyTables, load_codec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def baseline_hyper(rev: str, tables):
    """The hyperprior coder of commit ``rev``, built from the same arrays as ``tables``."""
    src = subprocess.run(["git", "show", f"{rev}:scatstore/codecs/hyper.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"scatstore.codecs._hyper_at_{rev}")
    mod.__package__ = "scatstore.codecs"
    exec(compile(src, f"{rev}:scatstore/codecs/hyper.py", "exec"), mod.__dict__)  # noqa: S102
    return mod.HyperTables.from_arrays(tables.meta(), tables.arrays())


def setup(prior: str, codec: str | None, n: int, rng: np.random.Generator):
    """(tables, symbols, side information or None, description)."""
    h = w = 28
    tables = load_codec(codec).tables if codec else \
        (laplace_tables(32, rng) if prior == "factorized" else synthetic_hyper(32, rng))
    if isinstance(tables, EntropyTables):
        return tables, sample(tables, n, h, w, rng), None, \
            ("codec " + codec) if codec else "synthetic Laplace"
    zt = tables.z_tables
    zrows = np.ascontiguousarray(np.broadcast_to(np.arange(zt.channels).reshape(1, -1, 1, 1),
                                                 (n, zt.channels, -(-h // 4), -(-w // 4))))
    z = _draw(zt, zrows, rng)
    idx = tables.indices(z, (h, w))
    return tables, _draw(tables.y_tables, idx, rng), z, \
        ("codec " + codec) if codec else "synthetic hyperprior"


def measure(tables, symbols, side, batch: int):
    """Seconds to encode and to decode all images in batches; the blobs and decoded symbols."""
    starts = range(0, len(symbols), batch)
    args = (lambda i: (symbols[i:i + batch], side[i:i + batch])) if side is not None else \
        (lambda i: (symbols[i:i + batch],))
    t0 = time.perf_counter()
    blobs = [b for i in starts for b in tables.encode(*args(i))]
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = np.concatenate([tables.decode(blobs[i:i + batch]) for i in starts])
    return t_enc, time.perf_counter() - t0, blobs, decoded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", help="use this codec's tables (default: synthetic C=32 tables)")
    ap.add_argument("--prior", default="factorized,hyper",
                    help="comma-separated: factorized, hyper (ignored with --codec)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians reported")
    ap.add_argument("--baseline", default="8a87dc7",
                    help="git revision whose hyperprior coder runs side by side ('none': skip)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    print(machine_header())
    print(f"C=32 latents 28x28 (224² images), {args.images} images per round, batches of "
          f"{args.batch}, one thread, {args.rounds} alternating rounds, medians; constriction "
          f"{_ver()}, torch {torch.__version__}")
    print()
    print("| tables | code | bytes/image (bpp) | actual/ideal | encode img/s | decode img/s "
          "| encode µs/img | decode µs/img | ×encode | ×decode |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    priors = [None] if args.codec else [p.strip() for p in args.prior.split(",") if p.strip()]
    notes = []
    for prior in priors:
        rng = np.random.default_rng(0)
        tables, symbols, side, what = setup(prior, args.codec, args.images, rng)
        paths = {"current": tables}
        if side is not None and args.baseline != "none":
            try:
                paths[f"at {args.baseline}"] = baseline_hyper(args.baseline, tables)
            except (subprocess.CalledProcessError, OSError, AttributeError, KeyError) as exc:
                notes.append(f"baseline {args.baseline} not loaded: {exc}")
        times = {k: ([], []) for k in paths}
        ref_blobs = None
        for t in paths.values():  # warm-up: native library, channels-last weights, allocator
            measure(t, symbols[:args.batch], None if side is None else side[:args.batch], args.batch)
        for r in range(args.rounds):
            for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                t_enc, t_dec, blobs, decoded = measure(paths[name], symbols, side, args.batch)
                if not np.array_equal(decoded, symbols):
                    raise SystemExit(f"{name}: round trip failed")
                if ref_blobs is None:
                    ref_blobs = blobs
                elif blobs != ref_blobs:
                    raise SystemExit(f"{name}: bitstreams differ from the other path's")
                times[name][0].append(t_enc)
                times[name][1].append(t_dec)
        nbytes = np.array([len(b) for b in ref_blobs])
        ideal = tables.ideal_bits(symbols, side) if side is not None else tables.ideal_bits(symbols)
        med = {k: (float(np.median(e)), float(np.median(d))) for k, (e, d) in times.items()}
        base = med.get(f"at {args.baseline}")
        for name, (te, td) in med.items():
            ratio = (f"{base[0] / te:.2f}", f"{base[1] / td:.2f}") if base else ("", "")
            print(f"| {what} | {name} | {nbytes.mean():,.0f} ({nbytes.mean() * 8 / (224 * 224):.3f}) | "
                  f"{nbytes.sum() * 8 / ideal.sum():.4f} | {args.images / te:,.0f} | "
                  f"{args.images / td:,.0f} | {1e6 * te / args.images:.0f} | "
                  f"{1e6 * td / args.images:.0f} | {ratio[0]} | {ratio[1]} |")
        if side is not None:
            n_idx = np.mean([len(np.unique(tables.indices(side[i:i + 1], (28, 28)))) for i in range(50)])
            syn = {}
            for name, t in paths.items():
                runs = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    for i in range(0, args.images, args.batch):
                        t.indices(side[i:i + args.batch], (28, 28))
                    runs.append(time.perf_counter() - t0)
                syn[name] = args.images / float(np.median(runs))
            notes.append(f"{what}: {n_idx:.1f} scale indices per image; integer hyper-synthesis "
                         "alone: " + ", ".join(f"{k} {v:,.0f} images/s" for k, v in syn.items()))
    print()
    for n in notes:
        print(n)
    print("load average after: " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))


def _ver() -> str:
    try:
        from importlib.metadata import version
        return version("constriction")
    except Exception:  # noqa: BLE001  pragma: no cover
        return "?"


if __name__ == "__main__":
    main()
