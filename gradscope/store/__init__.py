"""The run store: a directory holding one run, written by the Monitor and read by everything else."""

from gradscope.store.run import Run, load
from gradscope.store.sqlite import SCHEMA_VERSION, RunWriter

__all__ = ["SCHEMA_VERSION", "Run", "RunWriter", "load"]
