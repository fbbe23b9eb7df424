"""The raw, undecorated form every dataset reader returns: uint8 images and int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ImageArrays"]


@dataclass(frozen=True, eq=False)
class ImageArrays:
    """Train and test splits of an image-classification dataset as read from disk.

    Images are uint8 arrays of shape N x C x H x W, labels int64 arrays of shape N with
    values in ``range(len(class_names))``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images: np.ndarray = getattr(self, f"{split}_images")
            labels: np.ndarray = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(
                    f"{split}_images must be uint8 N x C x H x W, got {images.dtype} {images.shape}"
                )
            if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels must be int64 of shape ({images.shape[0]},), "
                    f"got {labels.dtype} {labels.shape}"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise ValueError(
                    f"{split}_labels must lie in [0, {len(self.class_names)}), "
                    f"got [{labels.min()}, {labels.max()}]"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {self.train_images.shape[1:]} vs "
                f"{self.test_images.shape[1:]}"
            )
