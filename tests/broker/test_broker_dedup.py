"""Per-device seq de-duplication for QoS 1 redeliveries."""

from __future__ import annotations

from broker.dedup import REPLAY, STALE_ROUND, TOO_OLD, SeqDeduplicator


def test_replayed_seq_is_refused_with_a_reason() -> None:
    dedup = SeqDeduplicator(window=8)
    assert dedup.check("a", "features", 1, 1).accepted
    verdict = dedup.check("a", "features", 1, 1)
    assert not verdict and verdict.code == REPLAY and "replayed seq 1" in verdict.reason
    assert dedup.check("b", "features", 1, 1)  # other device
    assert dedup.check("a", "logit_grad", 1, 1)  # other kind


def test_out_of_order_within_the_window_and_too_old() -> None:
    dedup = SeqDeduplicator(window=4)
    for seq in (5, 3, 4):
        assert dedup.check("a", "features", 0, seq)
    assert dedup.check("a", "features", 0, 3).code == REPLAY
    assert dedup.check("a", "features", 0, 1).code == TOO_OLD
    assert dedup.check("a", "features", 0, 9)
    assert dedup.check("a", "features", 0, 5).code == TOO_OLD


def test_stale_rounds() -> None:
    dedup = SeqDeduplicator()
    assert dedup.check("a", "features", 3, 10)
    assert dedup.check("a", "features", 2, 11).code == STALE_ROUND
    assert dedup.check("a", "features", 4, 1)  # a new round starts a fresh window (seq may restart)
    assert dedup.check("a", "features", 3, 12).code == STALE_ROUND
    dedup.set_min_round(6)
    assert dedup.check("b", "hello", 5, 1).code == STALE_ROUND
    dedup.set_min_round(8, dev="c")
    assert dedup.check("c", "features", 7, 1).code == STALE_ROUND and dedup.check("b", "features", 7, 1)


def test_memory_is_bounded() -> None:
    dedup = SeqDeduplicator(window=16, max_keys=3)
    for seq in range(1000):
        assert dedup.check("a", "features", 0, seq)
    assert len(dedup._windows[("a", "features")].seen) <= 17
    for dev in "bcde":
        dedup.check(dev, "features", 0, 1)
    assert len(dedup) == 3
    dedup.forget("e")
    assert len(dedup) == 2 and dedup.check("e", "features", 0, 1)
