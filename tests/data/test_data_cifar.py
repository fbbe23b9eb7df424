"""CIFAR-10/100 pickle readers on tiny batch files written in the official layout."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from harmony.data.cifar import load_cifar_pickle, read_cifar10, read_cifar100
from harmony.data.datasets import clear_dataset_cache, load_dataset


def _dump(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for i in range(1, 6):
        _dump(directory / f"data_batch_{i}", {b"data": _rows(2, i), b"labels": [i % 10, (i + 3) % 10]})
    _dump(directory / "test_batch", {b"data": _rows(3, 0), b"labels": [0, 9, 5]})
    names = [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer"]]
    names += [n.encode() for n in ["dog", "frog", "horse", "ship", "truck"]]
    _dump(directory / "batches.meta", {b"label_names": names})
    return directory


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    _dump(
        directory / "train", {b"data": _rows(4, 1), b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [1] * 4}
    )
    _dump(directory / "test", {b"data": _rows(2, 2), b"fine_labels": [3, 98], b"coarse_labels": [0, 0]})
    return directory


def test_cifar10_reads_all_batches_in_order(cifar10_dir: Path) -> None:
    arrays = read_cifar10(cifar10_dir)
    assert arrays.train_images.shape == (10, 3, 32, 32) and arrays.train_images.dtype == np.uint8
    assert arrays.test_images.shape == (3, 3, 32, 32)
    assert arrays.train_labels.dtype == np.int64
    np.testing.assert_array_equal(arrays.train_labels, [1, 4, 2, 5, 3, 6, 4, 7, 5, 8])
    np.testing.assert_array_equal(arrays.test_labels, [0, 9, 5])
    first_row = _rows(2, 1)[0]  # row layout: 1024 red, 1024 green, 1024 blue, each row-major 32 x 32
    np.testing.assert_array_equal(arrays.train_images[0, 1], first_row[1024:2048].reshape(32, 32))
    assert arrays.class_names[0] == "airplane" and arrays.class_names[9] == "truck"


def test_cifar100_reads_fine_labels(cifar100_dir: Path) -> None:
    arrays = read_cifar100(cifar100_dir)
    assert arrays.train_images.shape == (4, 3, 32, 32) and arrays.test_images.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(arrays.train_labels, [99, 0, 42, 7])
    np.testing.assert_array_equal(arrays.test_labels, [3, 98])
    assert len(arrays.class_names) == 100


def test_missing_batch_is_named(cifar10_dir: Path) -> None:
    (cifar10_dir / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        read_cifar10(cifar10_dir)


def test_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    _dump(path, {b"data": os.getcwd})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar_pickle(path)


def test_load_dataset_finds_cifar_under_a_parent_dir(cifar10_dir: Path, cifar100_dir: Path) -> None:
    try:
        cifar10 = load_dataset("cifar10", data_dir=cifar10_dir.parent)
        cifar100 = load_dataset("cifar100", data_dir=cifar100_dir)
    finally:
        clear_dataset_cache()
    assert cifar10.train_x.shape == (10, 3, 32, 32) and cifar10.train_x.dtype == torch.float32
    assert cifar10.input_shape == (3, 32, 32) and cifar10.num_classes == 10
    assert cifar10.train_y.dtype == torch.int64
    red = read_cifar10(cifar10_dir).train_images[0, 0, 0, 0] / 255.0
    assert cifar10.train_x[0, 0, 0, 0].item() == pytest.approx((red - 0.4914) / 0.2470, rel=1e-5)
    assert cifar100.num_classes == 100 and cifar100.test_y.tolist() == [3, 98]
