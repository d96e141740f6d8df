"""``verify(OUT)``: everything that can be checked about a finished store, every problem reported.

1. The manifest: readable, JSON, a supported version, and structurally sound (every problem of
   ``manifest_problems``: types, counts that do not add up, a shard size of 0, unsafe paths).
2. Every file it lists: a safe path inside the store, a regular file (no symlink), of the
   recorded size and sha256.
3. The format's own checks (``StoreFormat.verify``): files in the format's data area that the
   manifest does not list (a plain ``shard-*.tar`` glob would read them), archive members (names,
   extensions: nothing a plain reader would unpickle), chunk checksums, index counts.
4. The store opens (keys and index sizes checked).

Returns a ``VerifyReport``; ``report.exit_code`` is 0 when the store is intact, 1 otherwise.
``report.damaged`` names each damaged file as ``(shard index, file, reason)`` (``-1`` for the
global files written at finalize), ``report.problems`` everything else. Never raises.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import open_dataset
from .errors import StoreError
from .files import sha256_file
from .manifest import MANIFEST_NAME, load_manifest_json, manifest_problems
from .registry import get_format
from .safepath import inside, safe_relpath


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
    listed: set = field(default_factory=set)      # files the manifest lists (relative)
    # a store at a URL: every object under its prefix (relative), listed there; the format's
    # checks look for unlisted files among these instead of the local mirror's
    remote_names: list | None = None

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

    def unlisted(self, root: Path, rels, why: str) -> None:
        """Record a problem for each of ``rels`` (paths relative to ``root``) the manifest does
        not list."""
        for rel in sorted(rels):
            if rel not in self.listed:
                self.problems.append(f"unlisted file {rel}: not part of the store ({why})")

    def data_files(self, root: Path, sub: str = "", suffixes: tuple = ()) -> list:
        """:func:`data_files` of the store being verified: of ``root`` on disk, or of the
        objects of the remote store (``remote_names``) whose mirror ``root`` is."""
        if self.remote_names is None:
            return data_files(root, sub, suffixes)
        base = f"{sub}/" if sub else ""
        out = []
        for rel in self.remote_names:
            if not rel.startswith(base):
                continue
            if suffixes and ("/" in rel[len(base):] or not rel.endswith(suffixes)):
                continue
            out.append(rel)
        return out

    def lines(self) -> list:
        out = [f"damaged: {'global' if s < 0 else f'shard {s}'}: {f}: {why}"
               for s, f, why in self.damaged]
        return out + [f"problem: {p}" for p in self.problems]

    def format(self) -> str:
        lines = [f"{self.path}: {'OK' if self.ok else 'DAMAGED'} ({self.count} samples, "
                 f"{self.n_shards} shards, {self.files_checked} files, {self.bytes_checked} bytes checked)"]
        for s, f, why in self.damaged:
            lines.append(f"  {'global' if s < 0 else f'shard {s:06d}'}: {f}: {why}")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def _check_file(root: Path, rel: str, info: dict) -> str | None:
    try:
        p = inside(root, rel, "listed file")
    except StoreError as e:
        return str(e)
    if p.is_symlink():
        return "is a symbolic link (a store's files are regular files)"
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if size != info["bytes"]:
        return f"size {size} != {info['bytes']}"
    if sha256_file(p) != info["sha256"]:
        return "sha256 mismatch"
    return None


def _files(store: dict):
    """(shard index, rel, info) of every well-formed file entry of the manifest."""
    for rel, info in (store.get("global_files") or {}).items():
        yield -1, rel, info
    for i, s in enumerate(store.get("shards") or []):
        if isinstance(s, dict) and isinstance(s.get("files"), dict):
            for rel, info in s["files"].items():
                yield i, rel, info


def verify(path) -> VerifyReport:
    """A store at a URL is downloaded into a fresh temporary mirror (every object, sizes checked
    on the way, :mod:`scatstore.stores.cache`) and the mirror is verified, the unlisted files of
    the format's data area looked for among the objects under the URL: the report names the
    URL."""
    from .fs import RemotePath, as_path

    root = as_path(path)
    rep = VerifyReport(path=str(root))
    try:
        if isinstance(root, RemotePath):
            _verify_remote(root, rep)
        else:
            _verify(root, rep)
    except Exception as e:  # noqa: BLE001 - verify reports, it never crashes
        rep.problems.append(f"verify could not finish: {type(e).__name__}: {e}")
    rep.ok = not rep.damaged and not rep.problems
    return rep


def _verify_remote(url, rep: VerifyReport) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scatstore-verify-") as tmp:
        try:
            ds = open_dataset(url, cache_dir=tmp)
        except StoreError as e:
            rep.problems.append(str(e))
            return
        try:
            missing = []
            for s in sorted(ds.cache.shard_files):
                try:
                    ds.cache.ensure([s])
                except StoreError as e:
                    missing.append(str(e))
            rep.problems += missing
            root = ds.cache.root
        finally:
            ds.close()
        # objects under the prefix that the manifest does not name: the mirror holds only the
        # listed ones, so the format's checks look at the prefix's listing
        rep.remote_names = sorted(url.rglob_files())
        _verify(root, rep)


def _verify(root: Path, rep: VerifyReport) -> None:
    try:
        m = load_manifest_json(root / MANIFEST_NAME if root.is_dir() else root)
    except StoreError as e:
        rep.problems.append(str(e))
        return
    structural = manifest_problems(m)
    rep.problems += structural
    store = m.get("store") if isinstance(m.get("store"), dict) else {}
    rep.count = m.get("count", 0) if isinstance(m.get("count"), int) else 0
    rep.n_shards = len(store.get("shards") or []) if isinstance(store.get("shards"), list) else 0
    for shard, rel, info in _files(store):
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) \
                or not isinstance(info.get("sha256"), str):
            continue  # already a structural problem
        try:
            safe_relpath(rel)
        except StoreError:
            continue  # likewise
        rep.listed.add(rel)
        why = _check_file(root, rel, info)
        rep.files_checked += 1
        rep.bytes_checked += info["bytes"]
        if why:
            rep.damaged.append((shard, rel, why))
    try:
        fmt = get_format(store.get("format"))
    except StoreError:
        return  # an unknown format is a structural problem already
    if structural:
        return  # the format's checks read the store through the manifest: it must be sound
    try:
        fmt.verify(root, m, rep)
    except Exception as e:  # noqa: BLE001 - any failure to read the store is damage
        rep.problems.append(f"{fmt.name} checks failed: {type(e).__name__}: {e}")
    if not rep.damaged:
        try:
            open_dataset(root).close()
        except StoreError as e:
            rep.problems.append(f"the store does not open: {e}")


def data_files(root: Path, sub: str = "", suffixes: tuple = ()) -> list:
    """Relative paths of the files below ``root/sub`` (all of them, or those ending in one of
    ``suffixes`` at its top level), symlinks included, without following them."""
    base = root / sub if sub else root
    out = []
    if not base.is_dir():
        return out
    if suffixes:
        for e in os.scandir(base):
            if e.name.endswith(suffixes) and not e.is_dir(follow_symlinks=False):
                out.append(f"{sub}/{e.name}" if sub else e.name)
        return out
    for dirpath, dirnames, filenames in os.walk(base):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.append(Path(dirpath, name).relative_to(root).as_posix())
    return out


def row_blocks(lo: int, hi: int, row_nbytes: int, target: int = 1 << 26, multiple: int = 1):
    """``(a, b)`` ranges covering rows ``lo..hi`` of about ``target`` bytes each, a multiple of
    ``multiple`` rows (verify reads whole arrays in bounded pieces)."""
    step = max(1, target // max(1, row_nbytes)) // multiple * multiple or multiple
    for a in range(lo, hi, step):
        yield a, min(hi, a + step)


def coefficient_codec(m: dict, report):
    """The manifest's ``CoefficientCodec`` (``dtype tc`` stores), else ``None``; a record that
    does not load is a problem of the report (and ``None``)."""
    rec = m.get("coefficient_codec")
    if rec is None:
        return None
    from scatstore.transforms.coefcodec import CoefficientCodec

    try:
        return CoefficientCodec.from_json(rec)
    except (ValueError, KeyError, TypeError) as e:
        report.problems.append(f"bad coefficient_codec in the manifest: {e}")
        return None


def check_blobs(report, codec, shard: int, rel: str, blobs, indices, keys) -> None:
    """``dtype tc``: the blobs of one shard through the codec's own checks (header, CRC32,
    parameters fingerprint, blosc sizes; ``CoefficientCodec.check``), each bad one a damaged
    entry ``(shard, rel, "sample INDEX (KEY): reason")``, INDEX the dataset index
    (``open_dataset(OUT)[INDEX]``)."""
    for j, why in sorted(codec.check(blobs).items()):
        report.damaged.append((shard, rel, f"sample {int(indices[j])} ({keys[j]!r}): {why}"))
