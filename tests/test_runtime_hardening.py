"""Hostile messages on a running stack (docs/design.md §15): every inbound message is screened
against its sender and session, every refusal is answered on ``dev/{id}/err`` and recorded as a
``message_rejected`` event, and nothing refused changes the run — its weights and accuracy table
equal the clean local run bit for bit; a second, clean run leaves Redis with the same keys.

During a training session of device emu-0 an attacker on the (open) broker sends on emu-0's ``up``
topic: features of the right shape naming another device (``foreign_dev``; these used to be
consumed and changed 252 result fields), and naming no device of the run (``unknown_device``),
garbage bytes (``bad_schema``), features of another round (``stale_round``) and of a step never
expected (``wrong_step``), and a captured message sent again (``replay``); on emu-2's ``cmd`` topic
garbage and a ``stop`` naming another device. During the evaluation it sends a captured ``infer``
of emu-1 again: answered once, the copy refused as a ``replay``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import pytest

from broker.client import BrokerClient
from broker.codec import decode, encode, make_envelope
from broker.errors import WireError
from broker.schemas import Stop
from broker.topics import Topics
from harmony.engine import LocalEngine
from orchestrator.engine import DistributedEngine
from server import state
from tests.conftest import tiny_config
from tests.runtime_fixtures import local_stack, same_weights  # noqa: F401  (fixture)

TRAINING_CODES = {"foreign_dev", "unknown_device", "bad_schema", "stale_round", "wrong_step", "replay"}


class Attacker:
    """An anonymous client that watches every device's ``up``, ``down`` and ``err`` topics and sends
    hostile messages once the messages it waits for go by."""

    def __init__(self, mqtt: tuple[str, int], eval_round: int) -> None:
        self.topics = Topics()
        self.client = BrokerClient("attacker", *mqtt, clean_start=True, session_expiry_s=0)
        self.client.connect()
        self.ups = self.client.subscribe(self.topics.all_devices("up"))
        self.errs = self.client.subscribe(self.topics.all_devices("err"))
        self.downs = self.client.subscribe(self.topics.all_devices("down"))
        self.eval_round = eval_round
        self.replayed_infer: int | None = None
        self.sent_training = False
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.stopped = threading.Event()

    def _watch(self) -> None:
        try:
            while not self.stopped.is_set() and (not self.sent_training or self.replayed_infer is None):
                try:
                    message = self.ups.get(timeout=0.5)
                except TimeoutError:
                    continue
                try:
                    env = decode(message.payload)
                except WireError:
                    continue
                if not self.sent_training and env.kind == "features" and env.dev == "emu-0" and env.round == 1:
                    self._training_attack(message.payload, env)
                    self.sent_training = True
                elif self.replayed_infer is None and env.kind == "infer" and env.dev == "emu-1" \
                        and env.round == self.eval_round:
                    self.client.publish_raw(message.topic, message.payload)  # the same message again
                    self.replayed_infer = env.seq
        except BaseException as err:  # noqa: BLE001 — reported by the test
            self.failure = err

    def _training_attack(self, captured: bytes, env: Any) -> None:
        up = self.topics.up("emu-0")

        def forged(dev: str = "emu-0", round_: int = 1, step: int | None = None) -> bytes:
            body = env.body if step is None else dataclasses.replace(env.body, step=step)
            return encode(make_envelope(body, dev=dev, seq=self.client.next_seq() + 10_000, round=round_))

        for step in range(8):  # the right shape, every step the session may still wait for
            self.client.publish_raw(up, forged(dev="emu-1", step=step))
        self.client.publish_raw(up, forged(dev="ghost-9"))
        self.client.publish_raw(up, b"\x92garbage")
        self.client.publish_raw(up, forged(round_=0))
        self.client.publish_raw(up, forged(step=10**6))
        self.client.publish_raw(up, captured)  # a replay: same dev, round, step and seq
        cmd = self.topics.cmd("emu-2")
        self.client.publish_raw(cmd, b"\xc1not a command")
        self.client.publish_message(cmd, make_envelope(Stop(reason="forged"), dev="emu-3", seq=1))

    def answers(self, settle_s: float = 1.0) -> list[tuple[str, Any]]:
        """(topic, error body) of everything answered on the err topics so far."""
        time.sleep(settle_s)
        out = []
        while (message := self.errs.get_nowait()) is not None:
            out.append((message.topic, decode(message.payload).body))
        return out

    def infer_replies(self, dev: str, ref_seq: int) -> int:
        count = 0
        while (message := self.downs.get_nowait()) is not None:
            env = decode(message.payload)
            if env.kind == "infer_reply" and env.dev == dev and env.body.ref_seq == ref_seq:
                count += 1
        return count


def _run_keys(r: Any) -> set[bytes]:
    """Redis keys but Celery's task results (they expire: ``result_expires``) and its queue bindings."""
    return {k for k in r.keys("*") if not k.startswith((b"celery-task-meta-", b"_kombu", b"unacked"))}


@pytest.mark.slow
def test_hostile_messages_are_refused_answered_and_change_nothing(local_stack, tmp_path):  # noqa: F811
    cfg = tiny_config(**{"train.rounds": 1})
    local = LocalEngine(cfg)
    expected = local.run()
    r = state.connect(local_stack.redis_url)
    first_event = (r.xrevrange(state.events_key(), count=1) or [(b"0-0", {})])[0][0]
    attacker = Attacker(local_stack.mqtt, eval_round=cfg.train.rounds + 1)
    attacker.thread.start()
    engine = DistributedEngine(cfg, tmp_path, mqtt=local_stack.mqtt, redis_url=local_stack.redis_url,
                               devices_timeout_s=60, round_timeout_s=120)
    try:
        got = engine.run()
    finally:
        engine.close()
        attacker.stopped.set()
        attacker.thread.join(5)
    try:
        assert attacker.failure is None, attacker.failure
        assert attacker.sent_training and attacker.replayed_infer is not None, "the attack never went out"
        assert same_weights(local.model_state(), engine.model_state()), "a refused message changed the weights"
        assert got["evaluation"]["accuracy"] == expected["evaluation"]["accuracy"]
        assert got["evaluation"]["accuracy_fixed_tau"] == expected["evaluation"]["accuracy_fixed_tau"]
        answers = attacker.answers()
        codes = {body.code for topic, body in answers if topic == Topics().err("emu-0")}
        assert TRAINING_CODES <= codes, f"not answered: {TRAINING_CODES - codes}"
        assert all(body.field for _, body in answers), "an answer without the field"
        replays = [body for topic, body in answers
                   if topic == Topics().err("emu-1") and body.ref_seq == attacker.replayed_infer]
        assert [b.code for b in replays] == ["replay"]
        assert attacker.infer_replies("emu-1", attacker.replayed_infer) == 1, "a replayed infer was answered twice"
    finally:
        attacker.client.close()
    events = [{k.decode(): json.loads(v) for k, v in fields.items() if k != b"name"}
              for _, fields in r.xrange(state.events_key(), min=f"({first_event.decode()}")
              if fields[b"name"] == b"message_rejected"]
    assert TRAINING_CODES | {"replay"} <= {e["code"] for e in events}
    assert all(set(e) == {"device", "code", "field", "kind", "topic"} for e in events)
    assert {e["device"] for e in events if e["code"] == "foreign_dev"} == {"emu-0"}

    # Redis does not grow across runs: a finished run removes its per-run keys (session buffers,
    # round working keys, every model but the final two, task results); a clean second run of the
    # same config leaves exactly the same keys, and its weights are the same
    after_first = _run_keys(r)
    again = DistributedEngine(cfg, tmp_path / "again", mqtt=local_stack.mqtt, redis_url=local_stack.redis_url,
                              devices_timeout_s=60, round_timeout_s=120)
    try:
        again.run()
    finally:
        again.close()
    after_second = _run_keys(r)
    assert after_first == after_second, f"keys differ: {sorted(after_first ^ after_second)[:10]}"
    assert same_weights(engine.model_state(), again.model_state())
    final = r.hgetall(state.round_key(1))
    assert {k for k in after_second if k.startswith(b"hsfl:model:")} == {
        b"hsfl:model:" + final[b"client_sha"], b"hsfl:model:" + final[b"server_sha"]}
    assert not [k for k in after_second if k.startswith((b"hsfl:agg:", b"hsfl:round:1:"))]
    assert state.eval_key(2).encode() in after_second  # the final evaluation's reports stay
    assert {state.devices_key().encode(), state.events_key().encode(), state.run_key().encode()} <= after_second
    assert not r.keys("celery-task-meta-*"), "the run's task results were kept"
