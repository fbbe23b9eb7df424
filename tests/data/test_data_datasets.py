"""load_dataset: real Fashion-MNIST, directory search order, caching and the not-found message."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harmony.data.datasets import (
    DATA_DIR_ENV,
    Dataset,
    DatasetNotFoundError,
    clear_dataset_cache,
    load_dataset,
)
from harmony.data.idx import write_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} (sudo apt-get install dataset-fashion-mnist)",
)


def _write_tiny_idx_dataset(directory: Path, n_train: int = 6, n_test: int = 4) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        )
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@needs_fashion_mnist
def test_real_fashion_mnist_loads_fast_with_expected_shapes() -> None:
    clear_dataset_cache()
    # CPU seconds, not wall seconds: the verdict is about the loader's work, not about how busy the host is
    start = time.process_time()
    dataset = load_dataset("fashion_mnist")
    elapsed = time.process_time() - start
    assert elapsed < 3.0, f"loading Fashion-MNIST took {elapsed:.2f} s of CPU (target: well under 2 s)"
    assert dataset.train_x.shape == (60000, 1, 28, 28) and dataset.train_x.dtype == torch.float32
    assert dataset.test_x.shape == (10000, 1, 28, 28)
    assert dataset.train_y.shape == (60000,) and dataset.train_y.dtype == torch.int64
    assert dataset.test_y.shape == (10000,)
    assert dataset.num_classes == 10 and dataset.input_shape == (1, 28, 28)
    assert set(dataset.train_y.unique().tolist()) == set(range(10))
    assert abs(dataset.train_x.mean().item()) < 0.01 and abs(dataset.train_x.std().item() - 1) < 0.01
    again = load_dataset("Fashion-MNIST", str(FASHION_MNIST_DIR))
    assert again is dataset and again.train_x is dataset.train_x


def test_env_var_dir_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tiny_idx_dataset(tmp_path / "fashion-mnist")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    try:
        dataset = load_dataset("fashion_mnist")
    finally:
        clear_dataset_cache()
    assert isinstance(dataset, Dataset)
    assert dataset.source_dir == (tmp_path / "fashion-mnist").resolve()
    assert dataset.train_x.shape == (6, 1, 28, 28) and dataset.test_y.tolist() == [0, 1, 2, 3]


def test_explicit_dir_may_be_the_dataset_dir_itself(tmp_path: Path) -> None:
    _write_tiny_idx_dataset(tmp_path / "anything")
    try:
        dataset = load_dataset("mnist", data_dir=tmp_path / "anything")
    finally:
        clear_dataset_cache()
    assert dataset.name == "mnist" and dataset.num_classes == 10
    first_image = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)[0]
    expected = (torch.from_numpy(first_image).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(dataset.train_x[0, 0], expected)


def test_missing_dataset_message_names_dirs_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "nowhere" / "fashion-mnist") in message
    assert "data.data_dir" in message


def test_unknown_dataset_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("imagenet-1k")
