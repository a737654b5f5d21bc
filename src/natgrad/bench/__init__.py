"""Benchmark building blocks: offline datasets (tasks, registry and runner to come)."""

from natgrad.bench.datasets import DATASETS, Dataset, load_dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]
