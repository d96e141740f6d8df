"""``verify(OUT)``: re-hash every file the manifest lists and check the counts.

Returns a ``VerifyReport``; ``report.exit_code`` is 0 when the store is intact, 1 otherwise, and
``report.damaged`` names each damaged shard as ``(shard index, file, reason)`` (``-1`` for the
global files written at finalize: index arrays, zarr metadata).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import StoreError
from .files import sha256_file
from .manifest import read_manifest
from .registry import get_format


@dataclass
class VerifyReport:
    path: str
    ok: bool = True
    damaged: list = field(default_factory=list)   # (shard index, relative file, reason)
    problems: list = field(default_factory=list)  # store-level problems (counts, manifest)
    count: int = 0
    n_shards: int = 0
    files_checked: int = 0
    bytes_checked: int = 0

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def damaged_shards(self) -> list:
        return sorted({d[0] for d in self.damaged if d[0] >= 0})

    def compare_counts(self, counts: list, manifest: dict, what: str = "index") -> None:
        """Record a problem for each shard whose sample count in ``counts`` (read from the store's
        index) differs from the manifest's."""
        shards = manifest["store"]["shards"]
        if len(counts) != len(shards):
            self.problems.append(f"{what} covers {len(counts)} shards, manifest lists {len(shards)}")
        for s, c in zip(shards, counts):
            if c != s["count"]:
                self.problems.append(f"shard {s['index']:06d}: {what} counts {c}, manifest says "
                                     f"{s['count']}")

    def format(self) -> str:
        lines = [f"{self.path}: {'OK' if self.ok else 'DAMAGED'} ({self.count} samples, "
                 f"{self.n_shards} shards, {self.files_checked} files, {self.bytes_checked} bytes checked)"]
        for s, f, why in self.damaged:
            lines.append(f"  {'global' if s < 0 else f'shard {s:06d}'}: {f}: {why}")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def _check_file(root: Path, rel: str, info: dict) -> str | None:
    p = root / rel
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if size != info["bytes"]:
        return f"size {size} != {info['bytes']}"
    if sha256_file(p) != info["sha256"]:
        return "sha256 mismatch"
    return None


def verify(path) -> VerifyReport:
    root = Path(path)
    rep = VerifyReport(path=str(root))
    try:
        m = read_manifest(root)
    except StoreError as e:
        rep.ok = False
        rep.problems.append(str(e))
        return rep
    store = m["store"]
    rep.count, rep.n_shards = m["count"], store["n_shards"]
    for rel, info in store["global_files"].items():
        why = _check_file(root, rel, info)
        rep.files_checked += 1
        rep.bytes_checked += info["bytes"]
        if why:
            rep.damaged.append((-1, rel, why))
    expect_shards = -(-m["n_slots"] // store["shard_size"])
    if expect_shards != store["n_shards"]:
        rep.problems.append(f"n_shards {store['n_shards']} != ceil(n_slots / shard_size) = {expect_shards}")
    per_shard = []
    for s in store["shards"]:
        if s["count"] > store["shard_size"]:
            rep.problems.append(f"shard {s['index']:06d}: count {s['count']} > shard_size")
        per_shard.append(s["count"])
        for rel, info in s["files"].items():
            why = _check_file(root, rel, info)
            rep.files_checked += 1
            rep.bytes_checked += info["bytes"]
            if why:
                rep.damaged.append((s["index"], rel, why))
    if m["count"] + 0 != sum(per_shard):
        rep.problems.append(f"shard counts sum to {sum(per_shard)}, manifest count is {m['count']}")
    if not any(d[0] < 0 for d in rep.damaged):  # the index is intact: the format's own checks
        try:
            get_format(store["format"]).verify(root, m, rep)
        except Exception as e:  # noqa: BLE001 - any failure to read the index is damage
            rep.problems.append(f"index unreadable: {e}")
    rep.ok = not rep.damaged and not rep.problems
    return rep
