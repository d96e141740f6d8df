"""Batch jobs: the encode engine that turns a source dataset into a sharded store."""
