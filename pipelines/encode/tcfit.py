"""The coefficient codec of a ``dtype tc`` job: fitted once per store, before any shard.

The fit sample is a fixed set of slots spread evenly over the job (``FIT_PARAMS["fit_images"]``
of them: slot ``i * n_slots // n``, so a class-sorted source contributes every class), decoded,
framed and transformed exactly as the shard tasks do it, in this process. It depends on the job's
parameters only, never on the worker count or the scheduler, and the record it gives is written
to the job directory (``jobdir.write_codec_record``) before any shard is encoded: a resumed job
reads that record back and never refits, so every shard of a store is coded with the same
parameters. The record then goes into the manifest (``coefficient_codec``, docs/format.md).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import jobdir
from .options import EncodeConfig, EncodeError

# Part of the job's parameters (a resume must match them): how the codec is fitted.
FIT_PARAMS = {"fit_images": 128, "transform": "pca", "eps": 0.01}


def fit_slots(n_slots: int, n: int) -> list[int]:
    """``min(n, n_slots)`` slots spread evenly over ``[0, n_slots)``, sorted and unique."""
    n = min(int(n), int(n_slots))
    return sorted({i * n_slots // n for i in range(n)}) if n else []


def fit_codec(cfg: EncodeConfig, index, method, spec, frame):
    """Fit a :class:`~scatstore.transforms.coefcodec.CoefficientCodec` on the job's fit sample."""
    from scatstore.transforms.coefcodec import CoefficientCodec

    from .prefetch import prepared
    from .shards import ShardTask

    variants = cfg.variants
    slots = fit_slots(spec.n_slots, FIT_PARAMS["fit_images"])
    task = ShardTask(index=-1, out=str(cfg.out), src_root=str(index.root), spec=spec.to_dict(),
                     method=method, slots=slots, items=[index.items[i // variants] for i in slots],
                     variants=[i % variants for i in slots], frame=frame, dtype="float32",
                     batch_size=cfg.batch_size)
    pixels = [r[0] for *_, r in prepared([task], max(2 * cfg.batch_size, 4))
              if not isinstance(r, Exception)]
    if not pixels:
        raise EncodeError(f"none of the {len(slots)} source images sampled to fit the "
                          "coefficient codec could be decoded (see the rejected files)")
    coeffs = np.concatenate([method.encode(np.stack(pixels[a:a + cfg.batch_size]))
                             for a in range(0, len(pixels), cfg.batch_size)])
    try:
        return CoefficientCodec.fit(coeffs, quality=float(cfg.value("quality")),
                                    eps=FIT_PARAMS["eps"], transform=FIT_PARAMS["transform"])
    except ValueError as exc:
        raise EncodeError(f"cannot fit the coefficient codec: {exc}") from None


def codec_for_job(cfg: EncodeConfig, index, method, spec, frame,
                  log: Callable[[str], None]):
    """The job's codec: the record of the job directory (a resumed job), else a new fit, written
    there before it is used."""
    from scatstore.transforms.coefcodec import CoefficientCodec

    rec = jobdir.read_codec_record(cfg.out)
    if rec is not None:
        try:
            return CoefficientCodec.from_json(rec)
        except (ValueError, KeyError, TypeError) as exc:
            raise EncodeError(f"{jobdir.codec_record_path(cfg.out)} is damaged ({exc}); "
                              "delete OUT to start over") from None
    log(f"fitting the coefficient codec (quality {cfg.value('quality')}) on "
        f"{len(fit_slots(spec.n_slots, FIT_PARAMS['fit_images']))} images")
    codec = fit_codec(cfg, index, method, spec, frame)
    jobdir.write_codec_record(cfg.out, codec.to_json())
    return codec
