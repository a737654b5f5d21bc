"""Benchmark building blocks: offline datasets and the seeds' models (registry and runner to
come)."""

from natgrad.bench import models
from natgrad.bench.datasets import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset", "models"]
