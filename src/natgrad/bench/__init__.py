"""Benchmarks: offline datasets, the seeds' models, an optimiser registry, the runner and the
``natgrad`` command line."""

from natgrad.bench import models, registry, runner
from natgrad.bench.datasets import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset", "models", "registry", "runner"]
