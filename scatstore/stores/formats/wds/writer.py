"""webdataset store writer: ``OUT/shard-NNNNNN.tar`` (layout ``scatstore-wds-v1``, docs/format.md).

Each sample is a run of ustar members sharing the key: ``KEY.x.npy`` (array samples) or
``KEY.bits`` (bitstreams), ``KEY.q.npy`` (quantized stores: float32 (2, C, K), qscale then
qoffset), ``KEY.cls`` (ASCII integer; array samples only) and ``KEY.json``. Headers are fixed
(mtime 0, uid/gid 0, empty user/group names, mode 0644), so the bytes depend on the samples only.
Member data offsets are kept in the shard records and, at finalize, in ``OUT/index.npy``, so a
sample can be read at random with one ``pread``; its header is re-read and checked against the
expected member name first.

Reading never unpickles: ``.npy`` members are loaded with ``allow_pickle=False``, any member whose
name is not ``KEY.<known extension>`` (``.pyd``, ``.pickle``, a path with ``/`` or ``..``, a link)
is refused.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from ...base import ShardBatch, StoreWriter, records_arrays, shard_name
from ...files import atomic_write_bytes, atomic_writer
from ...index_npy import build_index, npy_bytes
from .tar import BLOCK, INDEX, member_exts

LAYOUT = "scatstore-wds-v1"


def sample_json(key: str, slot: int, y: int, meta: dict, hw=None) -> bytes:
    d = {"key": key, "slot": int(slot), "cls": int(y), "meta": meta}
    if hw is not None:
        d["hw"] = [int(v) for v in hw]
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class WdsWriter(StoreWriter):
    layout = LAYOUT

    def tar_path(self, index: int) -> Path:
        return self.out / f"{shard_name(index)}.tar"

    def _write_files(self, index: int, batch: ShardBatch):
        spec = self.spec
        exts = member_exts(spec)
        path = self.tar_path(index)
        offsets = []
        with atomic_writer(path) as sink:
            with tarfile.open(fileobj=sink.file, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for j, key in enumerate(batch.keys):
                    slot = int(batch.slots[j])
                    y = int(batch.y[j])
                    hw = batch.hw[j] if spec.has_hw else None
                    payload = {}
                    if spec.dtype == "bytes":
                        payload["bits"] = bytes(batch.x[j])
                    else:
                        payload["x.npy"] = npy_bytes(batch.x[j])
                    if spec.quantized:
                        payload["q.npy"] = npy_bytes(np.stack([batch.qscale[j], batch.qoffset[j]]).astype(np.float32))
                    payload["cls"] = str(y).encode()
                    payload["json"] = sample_json(key, slot, y, batch.meta[j], hw)
                    row = []
                    for ext in exts:
                        data = payload[ext]
                        start = tf.offset
                        tf.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
                        row += [start + BLOCK, len(data)]
                    offsets.append(row)
        rel = path.name
        files = {rel: sink.info}
        return files, {"members": exts, "offsets": offsets}

    def _finalize_index(self, records: list):
        spec = self.spec
        exts = member_exts(spec)
        ga = records_arrays(spec, records)
        idx = build_index(ga, exts, [row for r in records for row in r.extra["offsets"]])
        info = atomic_write_bytes(self.out / INDEX, npy_bytes(idx))
        extra = {"index": INDEX, "members": exts,
                 "member_names": {e: f"KEY.{e}" for e in exts}, "compression": None}
        return {INDEX: info}, extra
