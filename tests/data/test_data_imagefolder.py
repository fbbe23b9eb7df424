"""Image-folder readers (CINIC-10, Tiny-ImageNet) on tiny trees of PNG/JPEG files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harmony.data.datasets import clear_dataset_cache, load_dataset
from harmony.data.imagefolder import read_cinic10, read_tiny_imagenet

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install pillow)")


def _save(path: Path, colour: tuple[int, int, int], size: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), colour)
    image.convert(mode).save(path)


@pytest.fixture
def cinic_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cinic-10"
    colours = {"cat": (200, 10, 10), "airplane": (10, 200, 10)}
    for split, count in (("train", 2), ("valid", 1), ("test", 1)):
        for name, colour in colours.items():
            for i in range(count):
                _save(root / split / name / f"{split}-{name}-{i}.png", colour, 32)
    _save(root / "train" / "cat" / "grey.png", (90, 90, 90), 32, mode="L")
    return root


@pytest.fixture
def tiny_imagenet_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # deliberately not sorted: class order must follow wnids.txt
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colours = {"n02": (250, 0, 0), "n01": (0, 0, 250)}
    for wnid in wnids:
        for i in range(2):
            _save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colours[wnid], 64)
    rows = [("val_0.JPEG", "n01"), ("val_1.JPEG", "n02"), ("val_2.JPEG", "n01")]
    for name, wnid in rows:
        _save(root / "val" / "images" / name, colours[wnid], 64)
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in rows))
    return root


def test_cinic_classes_are_sorted_folder_names(cinic_dir: Path) -> None:
    arrays = read_cinic10(cinic_dir)
    assert arrays.class_names == ("airplane", "cat")
    assert arrays.train_images.shape == (5, 3, 32, 32) and arrays.train_images.dtype == np.uint8
    np.testing.assert_array_equal(arrays.train_labels, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(arrays.test_labels, [0, 1])
    assert arrays.train_images[0, :, 0, 0].tolist() == [10, 200, 10]
    grey = arrays.train_images[2]  # "grey.png" sorts before "train-cat-*.png"
    assert grey[:, 5, 5].tolist() == [90, 90, 90]
    assert len(read_cinic10(cinic_dir, include_valid=True).train_labels) == 7


def test_tiny_imagenet_uses_wnids_order_and_val_annotations(tiny_imagenet_dir: Path) -> None:
    arrays = read_tiny_imagenet(tiny_imagenet_dir)
    assert arrays.class_names == ("n02", "n01")
    assert arrays.train_images.shape == (4, 3, 64, 64)
    np.testing.assert_array_equal(arrays.train_labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(arrays.test_labels, [1, 0, 1])
    red, blue = arrays.test_images[1, :, 10, 10].astype(int), arrays.test_images[0, :, 10, 10].astype(int)
    assert red[0] > 200 and red[2] < 50 and blue[2] > 200 and blue[0] < 50  # JPEG is lossy


def test_mixed_image_sizes_are_reported(cinic_dir: Path) -> None:
    _save(cinic_dir / "test" / "cat" / "zz-big.png", (1, 2, 3), 40)
    with pytest.raises(ValueError, match="zz-big.png"):
        read_cinic10(cinic_dir)


def test_load_dataset_reads_image_folders(cinic_dir: Path, tiny_imagenet_dir: Path) -> None:
    try:
        cinic = load_dataset("cinic10", data_dir=cinic_dir.parent)
        tiny = load_dataset("tiny-imagenet", data_dir=tiny_imagenet_dir)
    finally:
        clear_dataset_cache()
    assert cinic.input_shape == (3, 32, 32) and cinic.num_classes == 2
    assert tiny.input_shape == (3, 64, 64) and tiny.num_classes == 2 and tiny.test_x.shape[0] == 3
