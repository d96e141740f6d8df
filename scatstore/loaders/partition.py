"""An epoch's sample order and its split over ranks: pure functions, no I/O, no state.

The order of an epoch is built in two stages (docs/loading.md, "How an epoch is planned"):

1. :func:`global_order` — a function of ``(seed, epoch)`` and the epoch's samples only (their
   dataset indices, slots and the store's read-unit size): the units (zarr inner chunks, ~1 MiB
   runs) in a seeded random order, or slot order without shuffling. It does not depend on the
   number of ranks, reader threads or anything of the machine.
2. :func:`rank_plan` — the split of a global order over ``world_size`` ranks: contiguous blocks
   (ranks read disjoint units), equal batch counts on every rank (``drop_last`` trims, otherwise
   wrap-around padding), then a seeded permutation inside windows of whole batches.

**The resume rule** (:func:`remaining`). After ``k`` steps of an epoch with ``W`` ranks and batch
size ``B``, the samples consumed are the first ``k·B`` of every rank's plan: a pure function of
``(seed, epoch, W, B, k)``. A run resumed from that checkpoint, with any world size ``W'`` and
batch size ``B'``, plans the rest of the epoch as :func:`rank_plan` of the *remaining* global order
(the global order with the consumed samples removed, order kept) over ``W'``: no sample of the
epoch is seen twice, none is skipped except what ``drop_last`` trims from the remainder (fewer
than ``W'·B'`` samples; none when ``W'·B'`` divides it). Resumed segments chain: a checkpoint
carries the ``(W, B, k, buffer_size)`` of every earlier segment of its epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHUFFLE_TAG = 0x5EED
WINDOW_TAG = 0xB0F


@dataclass
class RankPlan:
    """One rank's sample order for (the rest of) one epoch and its windows."""

    order: np.ndarray          # dataset indices, length = n_batches·B (or less, last batch short)
    windows: np.ndarray        # window start positions in ``order`` (plus the end)
    n_batches: int


def global_order(sel: np.ndarray, slots: np.ndarray, unit_size: int, seed: int, epoch: int,
                 shuffle: bool) -> np.ndarray:
    """The epoch's samples (dataset indices ``sel``, sorted) in their global order: units of
    ``unit_size`` consecutive slots permuted by ``rng(seed, epoch)``, or kept in slot order."""
    if not shuffle or not len(sel):
        return sel
    units = slots[sel] // unit_size
    first = np.concatenate([[True], np.diff(units) != 0])
    uid = np.cumsum(first) - 1
    n_units = int(uid[-1]) + 1
    rng = np.random.default_rng([seed, epoch, SHUFFLE_TAG])
    rank_of = np.empty(n_units, dtype=np.int64)
    rank_of[rng.permutation(n_units)] = np.arange(n_units)
    return sel[np.argsort(rank_of[uid], kind="stable")]


def rank_plan(order: np.ndarray, rank: int, world_size: int, batch_size: int, drop_last: bool,
              buffer_size: int, seed: int, epoch: int, shuffle: bool, segment: int = 0) -> RankPlan:
    """Rank ``rank``'s part of the global ``order`` (see the module docstring). ``segment`` > 0
    (a resumed part of an epoch) gives its windows their own permutations."""
    B, W, r = int(batch_size), int(world_size), int(rank)
    N = len(order)
    mine = order[r * N // W:(r + 1) * N // W]
    if drop_last:
        T = (N // W) // B * B
        mine = mine[:T]
    else:
        T = -(-N // W) if W > 1 else N
        if len(mine) < T:
            pool = mine if len(mine) else order
            mine = np.resize(pool, T) if len(pool) else mine
            if len(mine) < T:  # empty store
                T = len(mine)
    n_batches = T // B if drop_last else -(-T // B)
    wsize = max(1, int(buffer_size) // B) * B  # windows of whole batches
    wins = np.arange(0, T, wsize, dtype=np.int64)
    if shuffle:
        mine = mine.copy()
        for w, a in enumerate(wins.tolist()):
            b = min(a + wsize, T)
            key = [seed, epoch, r, w, WINDOW_TAG] + ([segment] if segment else [])
            rng = np.random.default_rng(key)
            mine[a:b] = mine[a:b][rng.permutation(b - a)]
    return RankPlan(order=mine, windows=np.concatenate([wins, [T]]).astype(np.int64),
                    n_batches=int(n_batches))


def consumed(order: np.ndarray, world_size: int, batch_size: int, steps: int, drop_last: bool,
             buffer_size: int, seed: int, epoch: int, shuffle: bool, segment: int = 0) -> np.ndarray:
    """Dataset indices (sorted, distinct) that all ``world_size`` ranks have consumed after
    ``steps`` steps of their plans over ``order``."""
    B = int(batch_size)
    parts = [rank_plan(order, r, world_size, B, drop_last, buffer_size, seed, epoch, shuffle,
                       segment).order[:int(steps) * B] for r in range(int(world_size))]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def remaining(order: np.ndarray, segments, drop_last: bool, seed: int, epoch: int,
              shuffle: bool) -> np.ndarray:
    """The global ``order`` with the samples of the done ``segments`` (``[(world_size,
    batch_size, steps, buffer_size), ...]``, oldest first) removed, order kept: what a resumed
    run plans."""
    rest = order
    for k, (W, B, steps, buf) in enumerate(segments):
        done = consumed(rest, W, B, steps, drop_last, buf, seed, epoch, shuffle, k)
        rest = rest[~np.isin(rest, done)]
    return rest


def check_segments(segments) -> list:
    """``segments`` as a list of ``[world_size, batch_size, steps, buffer_size]`` of integers
    (``ValueError`` otherwise): they come from a checkpoint."""
    out = []
    for s in segments or ():
        try:
            W, B, k, buf = (int(v) for v in s)
        except (TypeError, ValueError):
            raise ValueError(f"bad resume segment {s!r}: expected [world_size, batch_size, "
                             "steps, buffer_size]") from None
        if W < 1 or B < 1 or k < 0 or buf < 1:
            raise ValueError(f"bad resume segment {s!r}")
        out.append([W, B, k, buf])
    return out
