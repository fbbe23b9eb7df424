"""Readers for the python-pickle releases of CIFAR-10 and CIFAR-100.

Expected layouts (as unpacked from the official tarballs):

* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` (dicts with
  ``b'data'`` N x 3072 uint8 and ``b'labels'``), optional ``batches.meta`` (``b'label_names'``).
* ``cifar-100-python/``: ``train``, ``test`` (``b'data'``, ``b'fine_labels'``,
  ``b'coarse_labels'``), optional ``meta`` (``b'fine_label_names'``).

Security: these files are pickles, and unpickling runs code chosen by whoever wrote the
file. They are only ever read from a local directory the user points at, never from the
network, and through an unpickler that resolves nothing but the few numpy names an array
pickle needs, so a tampered file fails with :class:`pickle.UnpicklingError` instead of
executing arbitrary callables. ``encoding='bytes'`` keeps the Python 2 strings of the
original release as ``bytes``.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from harmony.data.arrays import ImageArrays

__all__ = ["CIFAR10_FILES", "CIFAR100_FILES", "read_cifar10", "read_cifar100", "load_cifar_pickle"]

logger = logging.getLogger(__name__)

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR100_FILES = ("train", "test")

_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a dataset pickle")
        return super().find_class(module, name)


def load_cifar_pickle(path: str | os.PathLike[str]) -> dict[bytes, Any]:
    """Unpickle one local CIFAR batch file (``encoding='bytes'``, numpy globals only)."""
    path = Path(path)
    with open(path, "rb") as f:
        obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in a CIFAR batch file, got {type(obj).__name__}")
    return obj


def _images_and_labels(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = load_cifar_pickle(path)
    for key in (b"data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: missing key {key!r}; found {sorted(batch)}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected data N x 3072 and N labels, got data {data.shape} and {labels.shape[0]} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _label_names(meta_path: Path, key: bytes, num_classes: int) -> tuple[str, ...]:
    if meta_path.is_file():
        names = load_cifar_pickle(meta_path).get(key)
        if names is not None and len(names) == num_classes:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return tuple(str(i) for i in range(num_classes))


def _require_files(directory: Path, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing CIFAR file(s) {', '.join(missing)}")


def read_cifar10(directory: str | os.PathLike[str]) -> ImageArrays:
    """Read a ``cifar-10-batches-py`` directory: 5 train batches and the test batch."""
    directory = Path(directory)
    _require_files(directory, CIFAR10_FILES)
    train = [_images_and_labels(directory / name, b"labels") for name in CIFAR10_FILES[:-1]]
    test_images, test_labels = _images_and_labels(directory / "test_batch", b"labels")
    logger.debug(
        "read cifar10 dir=%s train=%d test=%d", directory, sum(len(y) for _, y in train), len(test_labels)
    )
    return ImageArrays(
        train_images=np.concatenate([x for x, _ in train]),
        train_labels=np.concatenate([y for _, y in train]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=_label_names(directory / "batches.meta", b"label_names", 10),
    )


def read_cifar100(directory: str | os.PathLike[str]) -> ImageArrays:
    """Read a ``cifar-100-python`` directory with its 100 fine labels."""
    directory = Path(directory)
    _require_files(directory, CIFAR100_FILES)
    train_images, train_labels = _images_and_labels(directory / "train", b"fine_labels")
    test_images, test_labels = _images_and_labels(directory / "test", b"fine_labels")
    logger.debug("read cifar100 dir=%s train=%d test=%d", directory, len(train_labels), len(test_labels))
    return ImageArrays(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=_label_names(directory / "meta", b"fine_label_names", 100),
    )
