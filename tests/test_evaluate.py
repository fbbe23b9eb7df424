"""Entropy early exit, the τ sweep and the oracle threshold on hand-made outputs; the fallback
as a ``ServerPredict`` (what the distributed runtime's ``infer`` exchange plugs into)."""

import math

import numpy as np
import pytest
import torch

from broker.limits import ENVELOPE_OVERHEAD_BYTES, MAX_MESSAGE_BYTES
from harmony.evaluate import (
    MAX_OFFLOAD_BYTES,
    ClientOutputs,
    client_outputs,
    entropy_nats,
    offload_chunks,
    oracle_threshold,
    score_client,
    score_threshold,
    server_predictor,
)
from harmony.models import build_model


def test_entropy_in_nats():
    uniform = torch.zeros(1, 10)
    assert entropy_nats(uniform).item() == pytest.approx(math.log(10), rel=1e-6)
    confident = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy_nats(confident).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.tensor([[0.0, 0.0]])
    assert entropy_nats(two).item() == pytest.approx(math.log(2), rel=1e-6)


def _outputs():
    # 4 ID samples (low entropy, exit right except #2) then 2 OOD (high entropy, exit wrong)
    return ClientOutputs(
        exit_entropy=np.array([0.1, 0.2, 0.3, 1.5, 2.0, 2.2]),
        exit_correct=np.array([True, True, False, True, False, False]),
        server_correct=np.array([False, True, True, True, True, False]),
    )


def test_score_threshold_by_hand():
    out = _outputs()
    sel = np.arange(6)
    s = score_threshold(out, sel, 0.25)  # samples 0,1 exit (both right); 2..5 offload: T,T,T,F
    assert s.accuracy == pytest.approx(5 / 6)
    assert s.offload_probability == pytest.approx(4 / 6)
    everything_offloads = score_threshold(out, sel, 0.01)
    assert everything_offloads.accuracy == pytest.approx(4 / 6)
    assert everything_offloads.offload_probability == 1.0


def test_oracle_picks_best_tau_and_prefers_less_offload_on_ties():
    out = _outputs()
    best = oracle_threshold(out, np.arange(6), [0.05, 0.25, 0.35, 2.3])
    # τ=0.05: 4/6; τ=0.25: 5/6; τ=0.35: #2 exits wrong → 4/6; τ=2.3: exits 0,1,3 right → 3/6
    assert best.tau == 0.25 and best.accuracy == pytest.approx(5 / 6)
    tie = ClientOutputs(np.array([0.1, 0.1]), np.array([True, True]), np.array([True, True]))
    assert oracle_threshold(tie, np.arange(2), [0.05, 0.5, 1.0]).tau == 1.0


def test_score_client_slices_nested_pools_per_rho():
    out = _outputs()
    # pools: 4 ID then 2 OOD; ρ=0 → 4 ID; ρ=0.5 → first 2 ID + first 2 OOD
    scores = score_client(out, 4, 2, [4, 2], [0, 2], [0.0, 0.5], [0.25], 0.25)
    assert scores[0].fixed.accuracy == 1.0  # 0,1 exit right; 2,3 offload, server right on both
    # ρ=0.5 set = samples 0,1 (exit, right) and 4,5 (offload: right, wrong)
    assert scores[1].fixed.accuracy == pytest.approx(3 / 4)
    assert scores[1].fixed.offload_probability == pytest.approx(0.5)


def test_no_exit_means_always_offload():
    out = ClientOutputs(np.full(3, np.inf), np.zeros(3, bool), np.array([True, False, True]))
    s = score_threshold(out, np.arange(3), 2.3)
    assert s.offload_probability == 1.0 and s.accuracy == pytest.approx(2 / 3)


def test_offload_chunks_cover_the_batch_within_one_wire_message():
    assert offload_chunks(10, 3, max_bytes=7) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]
    assert offload_chunks(3, 100, max_bytes=10) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # ≥ 1 sample each
    assert offload_chunks(500, 1000) == [slice(0, 500)]
    assert MAX_OFFLOAD_BYTES + ENVELOPE_OVERHEAD_BYTES <= MAX_MESSAGE_BYTES


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_server_predict_sees_the_offloaded_features_in_wire_sized_requests(channels_last):
    net = build_model("cnn8", 0.25, 10, (1, 28, 28))
    client, server = net.client_model(2), net.server_model()
    if channels_last:
        client, server = client.to(memory_format=torch.channels_last), server.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 1, 28, 28, generator=g), torch.randint(0, 10, (37,), generator=g)
    with torch.no_grad():
        sample_bytes = client.features(x[:1]).numel() * 2  # fp16
    direct = server_predictor(server)
    calls = []

    def remote(features: torch.Tensor, depth: int) -> torch.Tensor:
        calls.append((features.dtype, features.shape[0], depth, features.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)))
        return direct(features, depth)

    limit = 5 * sample_bytes
    got = client_outputs(client, remote, x, y, True, torch.float16, 16, channels_last, max_offload_bytes=limit)
    want = client_outputs(client, server, x, y, True, torch.float16, 16, channels_last, max_offload_bytes=limit)
    assert [c[1] for c in calls] == [5, 5, 5, 1, 5, 5, 5, 1, 5]  # batches of 16, 16, 5 split at 5 samples
    assert all(c[0] == torch.float16 and c[2] == 2 and c[3] for c in calls)
    for field in ("exit_entropy", "exit_correct", "server_correct"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
