"""A board's own data: only the rows of one client's share of a dataset, as one file.

``harmony flash --config CONFIG --client I`` writes ``<dataset>.rows.npz`` (numpy's zip of arrays,
read without pickle) holding the training rows and test-pool rows of client ``I`` under that
config — raw uint8 images, int64 labels and each row's index in the full split — and nothing else.
On the board the agent's ``--data-dir`` names the directory holding it; :func:`load_rows
<harmony.data.datasets.load_rows>` then serves the rows a run's share asks for from that file (same
floats as from the full dataset: the normalisation constants are the dataset's, not the file's)
and refuses a share that asks for rows the file lacks (another client, another partition), naming
the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harmony.data.arrays import ImageArrays

__all__ = ["DeviceRows", "MissingRowsError", "board_data_share", "cut_device_rows", "device_rows_path",
           "read_device_rows", "select_rows", "write_device_rows"]

SUFFIX = ".rows.npz"


class MissingRowsError(ValueError):
    """A run asks for rows a board's data file does not hold."""


@dataclass(frozen=True, eq=False)
class DeviceRows:
    """One client's rows of a dataset: ``*_index`` are row numbers in the full split (sorted, unique)."""

    dataset: str
    client: int
    train_index: np.ndarray
    train_images: np.ndarray
    train_labels: np.ndarray
    test_index: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: str = ""
    """What the rows were cut for (the config file and client), for error messages."""
    share_sha256: str = ""
    """sha256 of the client's ``ClientShare`` bytes (its index lists under that config): the agent
    reports it in ``hello.data_share`` and the round driver gives the device exactly that client."""


def device_rows_path(directory: str | os.PathLike[str], dataset: str) -> Path:
    """Where a board's data file for ``dataset`` (canonical name) lies in ``directory``."""
    return Path(directory).expanduser() / f"{dataset}{SUFFIX}"


def write_device_rows(path: Path, rows: DeviceRows) -> None:
    """Write ``rows`` to ``path`` (a ``.rows.npz`` file); bytes depend only on the rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, dataset=np.array(rows.dataset), client=np.array(rows.client, dtype=np.int64),
                 origin=np.array(rows.origin), share_sha256=np.array(rows.share_sha256),
                 train_index=rows.train_index.astype(np.int64), train_images=rows.train_images,
                 train_labels=rows.train_labels.astype(np.int64),
                 test_index=rows.test_index.astype(np.int64), test_images=rows.test_images,
                 test_labels=rows.test_labels.astype(np.int64))
    os.replace(tmp, path)


def read_device_rows(path: Path) -> DeviceRows:
    with np.load(path, allow_pickle=False) as doc:
        return DeviceRows(str(doc["dataset"]), int(doc["client"]), doc["train_index"], doc["train_images"],
                          doc["train_labels"], doc["test_index"], doc["test_images"], doc["test_labels"],
                          str(doc["origin"]), str(doc["share_sha256"]) if "share_sha256" in doc else "")


def board_data_share(directory: str | os.PathLike[str] | None) -> str | None:
    """The share digest of the (one) board data file in ``directory``, None when there is none."""
    if directory is None:
        return None
    files = sorted(Path(directory).expanduser().glob(f"*{SUFFIX}"))
    if len(files) != 1:
        return None
    with np.load(files[0], allow_pickle=False) as doc:
        return (str(doc["share_sha256"]) or None) if "share_sha256" in doc else None


def _positions(index: np.ndarray, wanted: np.ndarray, split: str, rows: DeviceRows, path: Path) -> np.ndarray:
    pos = np.searchsorted(index, wanted)
    pos = np.clip(pos, 0, max(index.size - 1, 0))
    missing = wanted[(index.size == 0) | (index[pos] != wanted)] if wanted.size else wanted
    if missing.size:
        raise MissingRowsError(
            f"{path} holds only the rows of client {rows.client} ({rows.origin or 'origin unknown'}); this run "
            f"asks for {missing.size} {split} row(s) it lacks (e.g. {int(missing[0])}): another client, partition "
            f"or config. Flash the board again with this run's --config and --client "
            f"(`harmony flash USER@HOST --device-id ID --config CONFIG --client I`), or give it the full dataset "
            f"(`--board-data DIR`)")
    return pos


def select_rows(path: Path, train_rows: np.ndarray, test_rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_images, train_labels, test_images, test_labels)`` of the given full-split row
    numbers, in their order, from the data file at ``path``."""
    rows = read_device_rows(path)
    tr = _positions(rows.train_index, np.asarray(train_rows, dtype=np.int64), "train", rows, path)
    te = _positions(rows.test_index, np.asarray(test_rows, dtype=np.int64), "test", rows, path)
    return rows.train_images[tr], rows.train_labels[tr], rows.test_images[te], rows.test_labels[te]


def cut_device_rows(dataset: str, client: int, raw: ImageArrays, train_rows: np.ndarray, test_rows: np.ndarray,
                    origin: str = "", share_sha256: str = "") -> DeviceRows:
    """Client ``client``'s rows (``train_rows``/``test_rows``: indices into the full splits) of ``raw``."""
    tr = np.unique(np.asarray(train_rows, dtype=np.int64))
    te = np.unique(np.asarray(test_rows, dtype=np.int64))
    return DeviceRows(dataset, int(client), tr, np.ascontiguousarray(raw.train_images[tr]),
                      np.ascontiguousarray(raw.train_labels[tr]), te, np.ascontiguousarray(raw.test_images[te]),
                      np.ascontiguousarray(raw.test_labels[te]), origin, share_sha256)
