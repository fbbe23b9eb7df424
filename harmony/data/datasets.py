"""Load a named dataset from local files into normalised float32 tensors.

Nothing is downloaded. ``load_dataset(name, data_dir)`` looks for the standard release
files of the dataset in, in order of precedence:

1. an explicit ``data_dir`` (the dataset directory itself, or a parent holding the
   standard sub-directory such as ``fashion-mnist/``); when given, nothing else is searched;
2. otherwise ``$HARMONY_DATA_DIR/<sub-directory>``;
3. then ``/usr/share/datasets/<sub-directory>`` (where the Debian package
   ``dataset-fashion-mnist`` installs Fashion-MNIST).

Pixels are scaled to [0, 1] and normalised per channel with the mean/std constants in
``_SPECS`` below: they are the statistics of each dataset's *training* split (computed on
the full train set, population std over all pixels of a channel), so train and test use
the same transform and nothing depends on the partition.

Loaded datasets are memoised in-process by (name, resolved directory): a second call
returns the very same tensors. Callers must treat them as read-only (no in-place ops);
index or ``clone()`` them instead. ``clear_dataset_cache()`` drops the memo.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harmony.data.arrays import ImageArrays
from harmony.data.cifar import CIFAR10_FILES, CIFAR100_FILES, read_cifar10, read_cifar100
from harmony.data.device_rows import DeviceRows, cut_device_rows, device_rows_path, select_rows
from harmony.data.idx import read_idx
from harmony.data.imagefolder import read_cinic10, read_tiny_imagenet

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "SYSTEM_DATA_DIR",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetLabels",
    "clear_dataset_cache",
    "load_dataset",
    "load_labels",
    "load_rows",
    "cut_client_rows",
    "normalise_images",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "HARMONY_DATA_DIR"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are in none of the searched directories."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset ready for training: normalised float32 images and int64 labels.

    ``train_x``/``test_x`` are N x C x H x W float32, ``train_y``/``test_y`` int64 of shape N.
    The tensors may be shared with other callers through the load cache: do not mutate them.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...] = ()
    source_dir: Path | None = None


@dataclass(frozen=True)
class _DatasetSpec:
    subdirs: tuple[str, ...]
    required: Callable[[Path], bool]
    read: Callable[[Path], ImageArrays]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fix: str
    labels: Callable[[Path], tuple[np.ndarray, np.ndarray, tuple[int, int, int], tuple[str, ...]]] | None = None
    """Reads (train labels, test labels, input shape, class names) without the images, where the
    format allows; ``None``: read the whole dataset and keep the labels."""


def _has_idx_files(directory: Path) -> bool:
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    return all(_idx_file(directory, stem) is not None for stem in stems)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_dataset(directory: Path, class_names: tuple[str, ...]) -> ImageArrays:
    def part(stem: str) -> np.ndarray:
        path = _idx_file(directory, stem)
        if path is None:
            raise FileNotFoundError(f"missing {stem}[.gz] in {directory}")
        return read_idx(path)

    def images(stem: str) -> np.ndarray:
        array = part(stem)
        if array.dtype != np.uint8 or array.ndim != 3:
            raise ValueError(
                f"{directory}/{stem}: expected uint8 N x H x W images, got {array.dtype} {array.shape}"
            )
        return array[:, None]

    return ImageArrays(
        train_images=images("train-images-idx3-ubyte"),
        train_labels=part("train-labels-idx1-ubyte").astype(np.int64),
        test_images=images("t10k-images-idx3-ubyte"),
        test_labels=part("t10k-labels-idx1-ubyte").astype(np.int64),
        class_names=class_names,
    )


def _idx_image_shape(path: Path) -> tuple[int, int, int]:
    """``(1, H, W)`` from an IDX image file's header, reading only its first bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        header = f.read(16)
    if len(header) < 16 or header[:2] != b"\0\0" or header[3] != 3:
        raise ValueError(f"{path}: not an IDX file of N x H x W images")
    _, h, w = struct.unpack(">3I", header[4:16])
    return (1, int(h), int(w))


def _read_idx_labels(directory: Path, class_names: tuple[str, ...]
                     ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], tuple[str, ...]]:
    def part(stem: str) -> Path:
        path = _idx_file(directory, stem)
        if path is None:
            raise FileNotFoundError(f"missing {stem}[.gz] in {directory}")
        return path

    return (read_idx(part("train-labels-idx1-ubyte")).astype(np.int64),
            read_idx(part("t10k-labels-idx1-ubyte")).astype(np.int64),
            _idx_image_shape(part("train-images-idx3-ubyte")), class_names)


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_DOWNLOAD_HINT = "download {url} and unpack it under data.data_dir (or ${env}) so that {sub}/ holds {what}"

# Mean/std per channel of each training split, pixels scaled to [0, 1]:
# Fashion-MNIST and MNIST computed on the IDX train files; CIFAR-10/100 the population
# statistics of the train sets; CINIC-10 from the CINIC-10 README (train split);
# Tiny-ImageNet the usual train-set statistics.
_SPECS: dict[str, _DatasetSpec] = {
    "fashion_mnist": _DatasetSpec(
        subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        required=_has_idx_files,
        read=lambda d: _read_idx_dataset(d, FASHION_MNIST_CLASSES),
        labels=lambda d: _read_idx_labels(d, FASHION_MNIST_CLASSES),
        mean=(0.2860,),
        std=(0.3530,),
        fix="install the Debian package: sudo apt-get install dataset-fashion-mnist "
        "(it installs /usr/share/datasets/fashion-mnist), or set data.data_dir (or "
        f"${DATA_DIR_ENV}) to a directory holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz",
    ),
    "mnist": _DatasetSpec(
        subdirs=("mnist", "MNIST/raw"),
        required=_has_idx_files,
        read=lambda d: _read_idx_dataset(d, tuple(str(i) for i in range(10))),
        labels=lambda d: _read_idx_labels(d, tuple(str(i) for i in range(10))),
        mean=(0.1307,),
        std=(0.3081,),
        fix=_DOWNLOAD_HINT.format(
            url="the four IDX files of https://yann.lecun.com/exdb/mnist/",
            env=DATA_DIR_ENV,
            sub="mnist",
            what="train-images-idx3-ubyte.gz etc.",
        ),
    ),
    "cifar10": _DatasetSpec(
        subdirs=("cifar-10-batches-py",),
        required=lambda d: all((d / f).is_file() for f in CIFAR10_FILES),
        read=read_cifar10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        fix=_DOWNLOAD_HINT.format(
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            env=DATA_DIR_ENV,
            sub="cifar-10-batches-py",
            what="data_batch_1..5 and test_batch",
        ),
    ),
    "cifar100": _DatasetSpec(
        subdirs=("cifar-100-python",),
        required=lambda d: all((d / f).is_file() for f in CIFAR100_FILES),
        read=read_cifar100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        fix=_DOWNLOAD_HINT.format(
            url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            env=DATA_DIR_ENV,
            sub="cifar-100-python",
            what="train and test",
        ),
    ),
    "cinic10": _DatasetSpec(
        subdirs=("cinic-10", "CINIC-10", "cinic10"),
        required=lambda d: (d / "train").is_dir() and (d / "test").is_dir(),
        read=read_cinic10,
        mean=(0.47889522, 0.47227842, 0.43047404),
        std=(0.24205776, 0.23828046, 0.25874835),
        fix=_DOWNLOAD_HINT.format(
            url="CINIC-10.tar.gz from https://datashare.ed.ac.uk/handle/10283/3192",
            env=DATA_DIR_ENV,
            sub="cinic-10",
            what="train/, valid/ and test/",
        ),
    ),
    "tiny_imagenet": _DatasetSpec(
        subdirs=("tiny-imagenet-200",),
        required=lambda d: (d / "wnids.txt").is_file() and (d / "val" / "val_annotations.txt").is_file(),
        read=read_tiny_imagenet,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2770, 0.2691, 0.2821),
        fix=_DOWNLOAD_HINT.format(
            url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            env=DATA_DIR_ENV,
            sub="tiny-imagenet-200",
            what="wnids.txt, train/ and val/",
        ),
    ),
}

DATASET_NAMES: tuple[str, ...] = tuple(_SPECS)


def _canonical_name(name: str) -> str:
    canonical = name.strip().lower().replace("-", "_")
    if canonical not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return canonical


def _candidate_dirs(spec: _DatasetSpec, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        return [root, *(root / sub for sub in spec.subdirs)]
    roots = [Path(env).expanduser()] if (env := os.environ.get(DATA_DIR_ENV)) else []
    roots.append(SYSTEM_DATA_DIR)
    return [root / sub for root in roots for sub in spec.subdirs]


def _resolve_dir(name: str, spec: _DatasetSpec, data_dir: str | os.PathLike[str] | None) -> Path:
    candidates = _candidate_dirs(spec, data_dir)
    for candidate in candidates:
        if candidate.is_dir() and spec.required(candidate):
            return candidate.resolve()
    searched = "\n".join(f"  - {c}" for c in candidates)
    raise DatasetNotFoundError(f"dataset {name!r} not found; searched:\n{searched}\nTo fix: {spec.fix}")


def normalise_images(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 ``(x / 255 - mean[c]) / std[c]``."""
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"images have {channels} channels but mean/std have {len(mean)}/{len(std)}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x.mul_(1.0 / 255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return x


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, directory: Path) -> Dataset:
    spec = _SPECS[name]
    start = time.perf_counter()
    raw = spec.read(directory)
    dataset = Dataset(
        name=name,
        train_x=normalise_images(raw.train_images, spec.mean, spec.std),
        train_y=torch.from_numpy(raw.train_labels),
        test_x=normalise_images(raw.test_images, spec.mean, spec.std),
        test_y=torch.from_numpy(raw.test_labels),
        num_classes=len(raw.class_names),
        input_shape=tuple(raw.train_images.shape[1:]),  # type: ignore[arg-type]
        class_names=raw.class_names,
        source_dir=directory,
    )
    logger.info(
        "dataset loaded name=%s dir=%s train=%d test=%d seconds=%.2f",
        name,
        directory,
        len(dataset.train_y),
        len(dataset.test_y),
        time.perf_counter() - start,
    )
    return dataset


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load dataset ``name`` (one of ``DATASET_NAMES``; ``-`` and case are ignored).

    Raises:
        ValueError: unknown name.
        DatasetNotFoundError: no searched directory holds the files; the message lists the
            directories searched and how to get the data.
    """
    canonical = _canonical_name(name)
    spec = _SPECS[canonical]
    return _load_cached(canonical, _resolve_dir(canonical, spec, data_dir))


def clear_dataset_cache() -> None:
    """Forget every memoised dataset (frees memory once callers drop their references)."""
    _load_cached.cache_clear()


@dataclass(frozen=True, eq=False)
class DatasetLabels:
    """A dataset's labels and shape, without its images: what planning a partition needs."""

    name: str
    train_y: np.ndarray  # int64
    test_y: np.ndarray  # int64
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...] = ()


def load_labels(name: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetLabels:
    """The labels of dataset ``name`` (searched like :func:`load_dataset`). For IDX datasets only
    the label files and the image files' headers are read; other formats are read whole and only
    their labels kept. Not memoised: a planner reads them once."""
    canonical = _canonical_name(name)
    spec = _SPECS[canonical]
    directory = _resolve_dir(canonical, spec, data_dir)
    if spec.labels is not None:
        train_y, test_y, shape, classes = spec.labels(directory)
    else:
        raw = spec.read(directory)
        train_y, test_y = raw.train_labels, raw.test_labels
        shape, classes = tuple(raw.train_images.shape[1:]), raw.class_names  # type: ignore[assignment]
    return DatasetLabels(canonical, train_y, test_y, len(classes), shape, classes)


def load_rows(name: str, data_dir: str | os.PathLike[str] | None, train_rows: np.ndarray, test_rows: np.ndarray
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Only the given rows of dataset ``name``: ``(train_x, train_y, test_x, test_y)`` normalised
    as :func:`load_dataset` does, in the order of the row arrays. The files are read and the other
    rows dropped at once (nothing is memoised), so a process that serves a few clients holds only
    their samples. Same floats as indexing :func:`load_dataset`'s tensors."""
    canonical = _canonical_name(name)
    spec = _SPECS[canonical]
    train_rows, test_rows = np.asarray(train_rows, dtype=np.int64), np.asarray(test_rows, dtype=np.int64)
    if data_dir is not None and (rows_file := device_rows_path(data_dir, canonical)).is_file():
        # a board's own data (harmony.data.device_rows): only its client's rows, nothing else to read
        train_images, train_labels, test_images, test_labels = select_rows(rows_file, train_rows, test_rows)
        return (normalise_images(train_images, spec.mean, spec.std), torch.from_numpy(train_labels),
                normalise_images(test_images, spec.mean, spec.std), torch.from_numpy(test_labels))
    raw = spec.read(_resolve_dir(canonical, spec, data_dir))
    out = (
        normalise_images(raw.train_images[train_rows], spec.mean, spec.std),
        torch.from_numpy(np.ascontiguousarray(raw.train_labels[train_rows])),
        normalise_images(raw.test_images[test_rows], spec.mean, spec.std),
        torch.from_numpy(np.ascontiguousarray(raw.test_labels[test_rows])),
    )
    del raw
    return out


def cut_client_rows(name: str, data_dir: str | os.PathLike[str] | None, client: int, train_rows: np.ndarray,
                    test_rows: np.ndarray, origin: str = "", share_sha256: str = "") -> DeviceRows:
    """Client ``client``'s rows of dataset ``name`` (raw, with their indices), for a board's data file."""
    canonical = _canonical_name(name)
    spec = _SPECS[canonical]
    return cut_device_rows(canonical, client, spec.read(_resolve_dir(canonical, spec, data_dir)), train_rows,
                           test_rows, origin, share_sha256)
