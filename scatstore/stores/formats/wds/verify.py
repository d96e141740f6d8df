"""The webdataset store's own checks for ``scatstore verify`` (after the files were re-hashed):
no unlisted ``.tar`` beside the shards (a plain ``shard-*.tar`` glob would read it), every member
of every shard a regular file named ``KEY.EXT`` with a valid key and one of this store's
extensions (no ``../`` paths, no ``.pyd``/``.pickle`` that ``webdataset``'s default decoders
would unpickle), each sample's members complete and in order, the keys those of ``index.npy``;
for ``dtype tc`` stores, every ``KEY.bits`` blob through the codec's own checks
(``verify.check_blobs``)."""
from __future__ import annotations

import tarfile
from pathlib import Path


from ...base import StoreSpec
from ...errors import StoreError
from ...index_npy import load_index_npy, verify_index_npy
from ...verify import check_blobs, coefficient_codec
from .tar import check_member_name, member_exts


def verify(root: Path, m: dict, report) -> None:
    report.unlisted(root, report.data_files(root, "", (".tar", ".tar.gz", ".tgz", ".tar.zst")),
                    "a plain shard-*.tar glob would read it")
    spec = StoreSpec.from_dict(m["store"]["spec"])
    exts = member_exts(spec)
    try:
        ix = load_index_npy(root, m)
    except StoreError as e:
        report.problems.append(str(e))
        ix = None
    codec = coefficient_codec(m, report)
    index = {} if ix is None else {k.decode("ascii"): i for i, k in enumerate(ix["key"])}
    for s in m["store"]["shards"]:
        keys = None if ix is None else [k.decode("ascii") for k in ix["key"][ix["shard"] == s["index"]]]
        for rel in sorted(s["files"]):
            if rel.endswith(".tar"):
                problems = member_problems(root / rel, exts, keys)
                for why in problems:
                    report.damaged.append((s["index"], rel, why))
                if codec is not None and not problems:
                    blobs = _member_bytes(root / rel, ".bits")
                    check_blobs(report, codec, s["index"], rel, [b for _, b in blobs],
                                [index.get(k, -1) for k, _ in blobs], [k for k, _ in blobs])
    if ix is not None:
        verify_index_npy(root, m, report)


def _member_bytes(path: Path, ext: str) -> list:
    """``(key, bytes)`` of the members ``KEY.ext`` of a tar whose members passed
    :func:`member_problems`."""
    out = []
    with tarfile.open(path, mode="r:") as tf:
        for ti in tf:
            key, e = check_member_name(ti.name)
            if e == ext.lstrip("."):
                out.append((key, tf.extractfile(ti).read()))
    return out


def member_problems(path: Path, exts: list, keys) -> list:
    """Every problem of the members of one shard tar (empty when it is sound)."""
    out, seen = [], []
    try:
        with tarfile.open(path, mode="r:") as tf:
            for ti in tf:
                if not ti.isreg():
                    out.append(f"member {ti.name!r} is not a regular file")
                    continue
                try:
                    key, ext = check_member_name(ti.name)
                except StoreError as e:
                    out.append(str(e))
                    continue
                if ext not in exts:
                    out.append(f"member {ti.name!r}: extension {ext!r} is not one of this store's "
                               f"{exts}")
                    continue
                seen.append((key, ext))
    except (tarfile.TarError, OSError, EOFError) as e:
        return out + [f"not a readable tar: {e}"]
    want_keys = [k for k, _ in seen[:: len(exts)]]
    if [e for _, e in seen] != exts * (len(seen) // len(exts)) or len(seen) % len(exts) or \
            any(seen[i][0] != want_keys[i // len(exts)] for i in range(len(seen))):
        out.append(f"members are not complete samples of {exts} in order")
    elif keys is not None and want_keys != keys:
        diff = next((i for i, (a, b) in enumerate(zip(want_keys, keys)) if a != b),
                    min(len(want_keys), len(keys)))
        out.append(f"samples {len(want_keys)} in the tar, {len(keys)} in index.npy; first "
                   f"difference at position {diff}")
    return out


__all__ = ["verify", "member_problems"]
