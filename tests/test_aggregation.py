"""FedAvg, depth-aware partial aggregation and the λ mix against hand-computed values."""

import pytest
import torch

from harmony.aggregation import WeightedSum, fedavg, partial_average, personalise_mix


def test_fedavg_weighted_by_data_size():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor(3.0)}
    out = fedavg([a, b], [100, 300])
    # (100·1 + 300·4)/400 = 3.25; (100·2 + 300·8)/400 = 6.5; (0 + 900)/400 = 2.25
    assert torch.equal(out["w"], torch.tensor([3.25, 6.5]))
    assert out["b"].item() == 2.25
    assert out["w"].dtype == torch.float32


def test_partial_average_over_holders_only_and_unheld_keep_previous():
    previous = {"blocks.0.w": torch.tensor([0.0]), "blocks.1.w": torch.tensor([5.0]),
                "blocks.2.w": torch.tensor([7.0]), "exit_heads.2.w": torch.tensor([9.0])}
    shallow = {"blocks.0.w": torch.tensor([2.0]), "exit_heads.2.w": torch.tensor([1.0])}
    deep = {"blocks.0.w": torch.tensor([6.0]), "blocks.1.w": torch.tensor([3.0])}
    out = partial_average(previous, [shallow, deep], [1, 3])
    assert out["blocks.0.w"].item() == (1 * 2 + 3 * 6) / 4  # both hold it
    assert out["blocks.1.w"].item() == 3.0  # only the deep client holds it
    assert out["exit_heads.2.w"].item() == 1.0  # only the shallow client
    assert out["blocks.2.w"].item() == 7.0  # nobody: previous value kept


def test_weighted_sum_merge_equals_single_accumulator():
    states = [{"w": torch.randn(5, generator=torch.Generator().manual_seed(i))} for i in range(6)]
    weights = [3, 1, 4, 1, 5, 9]
    one = WeightedSum()
    for s, w in zip(states, weights, strict=True):
        one.add(s, w)
    left, right = WeightedSum(), WeightedSum()
    for s, w in zip(states[:2], weights[:2], strict=True):
        left.add(s, w)
    for s, w in zip(states[2:][::-1], weights[2:][::-1], strict=True):  # other worker, other order
        right.add(s, w)
    right.merge(left)
    prev = {"w": torch.zeros(5)}
    assert torch.equal(one.average(prev)["w"], right.average(prev)["w"])


def test_integer_buffers_are_rounded_means():
    out = fedavg([{"n": torch.tensor(10)}, {"n": torch.tensor(13)}], [1, 1])
    assert out["n"].dtype == torch.int64 and out["n"].item() == 12  # 11.5 rounds half to even


def test_weights_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        WeightedSum().add({"w": torch.zeros(1)}, 0)


def test_unknown_name_is_rejected():
    acc = WeightedSum()
    acc.add({"stray": torch.zeros(1)}, 1)
    with pytest.raises(KeyError, match="stray"):
        acc.average({"w": torch.zeros(1)})


def test_personalise_mix():
    local = {"w": torch.tensor([1.0, 3.0])}
    avg = {"w": torch.tensor([5.0, -1.0]), "other": torch.tensor([0.0])}
    mixed = personalise_mix(local, avg, 0.2)
    # 0.2·1 + 0.8·5 = 4.2; 0.2·3 + 0.8·(−1) = −0.2
    assert torch.allclose(mixed["w"], torch.tensor([4.2, -0.2]))
    assert set(mixed) == {"w"}
    assert torch.equal(personalise_mix(local, avg, 0.0)["w"], avg["w"])
    assert torch.equal(personalise_mix(local, avg, 1.0)["w"], local["w"])
    with pytest.raises(ValueError, match="lam"):
        personalise_mix(local, avg, 1.5)
