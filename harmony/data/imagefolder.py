"""Readers for datasets shipped as folders of image files: CINIC-10 and Tiny-ImageNet.

Layouts:

* CINIC-10: ``root/{train,valid,test}/{class}/*.png``; class order is the sorted class
  folder names of ``root/train``.
* Tiny-ImageNet: ``root/wnids.txt`` (class order), ``root/train/{wnid}/images/*.JPEG`` and
  ``root/val/images/*.JPEG`` labelled by ``root/val/val_annotations.txt`` (tab-separated
  ``file, wnid, bbox...``). The official ``test/`` split has no labels, so ``val`` serves as
  the test split.

Images are decoded with Pillow, imported lazily so that the rest of the package works
without it, and converted to RGB (both datasets contain a few greyscale images).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from harmony.data.arrays import ImageArrays

__all__ = ["decode_images", "read_cinic10", "read_tiny_imagenet"]

logger = logging.getLogger(__name__)


def _pillow_image_module() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading image-folder datasets (CINIC-10, Tiny-ImageNet) needs Pillow: pip install pillow"
        ) from exc
    return Image


def _decode_rgb(path: Path) -> np.ndarray:
    image_module = _pillow_image_module()
    try:
        with image_module.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc


def decode_images(paths: Sequence[Path], num_workers: int | None = None) -> np.ndarray:
    """Decode image files into one uint8 N x 3 x H x W array; every image must share H x W.

    Decoding runs in a thread pool (Pillow releases the GIL while decoding).
    """
    if not paths:
        raise ValueError("no image files to decode")
    _pillow_image_module()
    workers = num_workers or min(8, os.cpu_count() or 1)
    out: np.ndarray | None = None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (path, chw) in enumerate(zip(paths, pool.map(_decode_rgb, paths), strict=True)):
            if out is None:
                out = np.empty((len(paths), *chw.shape), dtype=np.uint8)
            if chw.shape != out.shape[1:]:
                raise ValueError(f"{path}: image is {chw.shape[1:]} but earlier images are {out.shape[2:]}")
            out[i] = chw
    assert out is not None
    return out


def _require_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"missing directory {path}")


def _class_folder_split(
    split_dir: Path, class_names: tuple[str, ...], pattern: str
) -> tuple[list[Path], np.ndarray]:
    _require_dir(split_dir)
    index = {name: i for i, name in enumerate(class_names)}
    paths: list[Path] = []
    labels: list[int] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_dir.name not in index:
            raise ValueError(f"{class_dir}: class folder not among the train classes {list(class_names)}")
        files = sorted(class_dir.glob(pattern))
        paths.extend(files)
        labels.extend([index[class_dir.name]] * len(files))
    if not paths:
        raise ValueError(f"{split_dir}: no files matching {pattern!r} in its class folders")
    return paths, np.asarray(labels, dtype=np.int64)


def read_cinic10(
    root: str | os.PathLike[str], *, include_valid: bool = False, num_workers: int | None = None
) -> ImageArrays:
    """Read CINIC-10 from ``root``; ``include_valid`` appends the ``valid`` split to train."""
    root = Path(root)
    _require_dir(root / "train")
    class_names = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    train_paths, train_labels = _class_folder_split(root / "train", class_names, "*.png")
    if include_valid:
        valid_paths, valid_labels = _class_folder_split(root / "valid", class_names, "*.png")
        train_paths += valid_paths
        train_labels = np.concatenate([train_labels, valid_labels])
    test_paths, test_labels = _class_folder_split(root / "test", class_names, "*.png")
    logger.debug("read cinic10 dir=%s train=%d test=%d", root, len(train_paths), len(test_paths))
    return ImageArrays(
        train_images=decode_images(train_paths, num_workers),
        train_labels=train_labels,
        test_images=decode_images(test_paths, num_workers),
        test_labels=test_labels,
        class_names=class_names,
    )


def _read_wnids(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"missing Tiny-ImageNet class list {path}")
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path}: duplicate wnids")
    return wnids


def _tiny_imagenet_val(root: Path, wnids: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"missing Tiny-ImageNet validation labels {annotations}")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    rows = []
    for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(
                f"{annotations}:{line_no}: expected 'file<TAB>wnid...' with a wnid from wnids.txt"
            )
        rows.append((fields[0], index[fields[1]]))
    rows.sort()
    paths = [root / "val" / "images" / name for name, _ in rows]
    return paths, np.asarray([label for _, label in rows], dtype=np.int64)


def read_tiny_imagenet(root: str | os.PathLike[str], *, num_workers: int | None = None) -> ImageArrays:
    """Read Tiny-ImageNet-200 from ``root``: train images per wnid, ``val`` as the test split."""
    root = Path(root)
    wnids = _read_wnids(root / "wnids.txt")
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for label, wnid in enumerate(wnids):
        image_dir = root / "train" / wnid / "images"
        _require_dir(image_dir)
        files = sorted(image_dir.glob("*.JPEG"))
        train_paths.extend(files)
        train_labels.extend([label] * len(files))
    test_paths, test_labels = _tiny_imagenet_val(root, wnids)
    logger.debug("read tiny_imagenet dir=%s train=%d test=%d", root, len(train_paths), len(test_paths))
    return ImageArrays(
        train_images=decode_images(train_paths, num_workers),
        train_labels=np.asarray(train_labels, dtype=np.int64),
        test_images=decode_images(test_paths, num_workers),
        test_labels=test_labels,
        class_names=wnids,
    )
