"""A board's own data file (harmony/data/device_rows.py): only one client's rows, served to the agent
as the full dataset would serve them (the same floats), and a clear refusal of another client's share."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from harmony.data.datasets import cut_client_rows, load_rows
from harmony.data.device_rows import (
    MissingRowsError,
    board_data_share,
    device_rows_path,
    read_device_rows,
    write_device_rows,
)
from harmony.experiment import Experiment
from orchestrator.registry import devices_for_clients
from tests.conftest import tiny_config


def _rows(share):
    return share.train_indices, np.concatenate([share.test.id_pool, share.test.ood_pool])


def test_a_board_file_holds_one_client_and_serves_its_rows_bit_identically(tmp_path):
    experiment = Experiment.plan(tiny_config())
    share = experiment.shares[1]
    train, test = _rows(share)
    digest = hashlib.sha256(share.to_bytes()).hexdigest()
    rows = cut_client_rows("fashion-mnist", None, 1, train, test, origin="client 1 of tiny", share_sha256=digest)
    path = device_rows_path(tmp_path, rows.dataset)
    write_device_rows(path, rows)
    back = read_device_rows(path)
    assert back.client == 1 and back.dataset == "fashion_mnist"
    assert board_data_share(tmp_path) == digest  # what the agent reports in hello.data_share
    assert back.train_index.size == np.unique(train).size and back.test_index.size == np.unique(test).size
    other = experiment.shares[0]
    assert not set(other.train_indices.tolist()) <= set(back.train_index.tolist())

    from_file = load_rows("fashion_mnist", tmp_path, train, test)
    from_full = load_rows("fashion_mnist", None, train, test)
    for a, b in zip(from_file, from_full, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # the agent's path: the plan built from the manifest with --data-dir pointing at the board's directory
    agent_side = Experiment.from_manifest(experiment.manifest(), {1: share}, data_dir=str(tmp_path)).device(1)
    local_side = experiment.device(1)
    assert torch.equal(agent_side.data.train_x, local_side.data.train_x)
    assert torch.equal(agent_side.data.test_y, local_side.data.test_y)

    with pytest.raises(MissingRowsError, match=r"only the rows of client 1 .*--config and --client"):
        load_rows("fashion_mnist", tmp_path, *_rows(other))


def test_a_board_holding_a_clients_rows_gets_that_client():
    shares = ["a" * 64, "b" * 64, "c" * 64]
    profiles = {"pi-1": {}, "pi-2": {"data_share": "c" * 64}, "pi-3": {}, "pi-4": {"data_share": "f" * 64}}
    # pi-2 holds client 2's rows; the others fill clients 0 and 1 in natural order; pi-4's rows serve no client
    assert devices_for_clients(["pi-1", "pi-2", "pi-3", "pi-4"], profiles, shares) == ["pi-1", "pi-3", "pi-2"]
    # no device with data files: the first devices in natural order, as before
    assert devices_for_clients(["e-0", "e-1", "e-2", "e-3"], {}, shares) == ["e-0", "e-1", "e-2"]
    with pytest.raises(RuntimeError, match=r"pi-4 hold\(s\) the rows of another client.*--config and --client"):
        devices_for_clients(["pi-2", "pi-3", "pi-4"], profiles, shares)
