"""The encode job: a source dataset -> a sharded, verified store of compact tensors.

One module per concern (docs/architecture.md, "Encode"):

- :mod:`.options`: :class:`EncodeConfig` and every check of the options alone;
- :mod:`.jobdir`: ``OUT/.scatstore/`` (lock, ``job.json``, shard notes, cancel files), the only
  module that touches it;
- :mod:`.prefetch`: decode threads a window ahead (framing itself: ``scatstore.sources``);
- :mod:`.shards`: shard assembly, batches through the method contract
  (``scatstore.transforms.methods.EncodeMethod``), the store's commit;
- :mod:`.executors`: in-process, process pool, dask, one signature, chosen from a table;
- :mod:`.signals`: stop signals, and pool workers that die with their run;
- :mod:`.manifest`: job parameters, manifest, ``rejected.jsonl`` / ``skipped.jsonl``;
- :mod:`.summary`: the console summary;
- :mod:`.job`: :func:`encode`, the driver.

The job has ``n_slots = n_items × max(1, augment)`` slots; slot ``i`` is source item
``i // variants``, variant ``i % variants``. Shard ``s`` holds slots
``[s·shard_size, (s+1)·shard_size)``. A shard's content depends only on its slots, so the output
bytes are the same whatever the number of workers or the scheduler. A re-run keeps every shard
whose store record exists and whose files still hash to it, and redoes the others: a job killed
at any moment resumes to the same bytes. The manifest is written last, atomically.
"""
from __future__ import annotations

from .executors import EXECUTORS, local_cluster
from .job import encode
from .manifest import job_params
from .options import EncodeConfig, EncodeError, OptionError, config_from_kwargs
from .shards import ShardCancelled, ShardResult, ShardTask, encode_shard
from .signals import JobTerminated

__all__ = ["encode", "EncodeConfig", "EncodeError", "OptionError", "JobTerminated",
           "ShardCancelled", "ShardTask", "ShardResult", "encode_shard", "config_from_kwargs",
           "local_cluster", "job_params", "EXECUTORS"]
