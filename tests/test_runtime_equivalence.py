"""The distributed runtime computes what the local engine computes (docs/design.md §1, §10).

One tiny config and seed, run by ``LocalEngine`` in-process and by ``DistributedEngine`` over real
mosquitto, redis-server and Celery worker processes with the devices in a separate agent process:
the final weights must agree (measured: bit-identical) and so must the accuracy table, which the
distributed run computes on the devices with the server's answers coming from ``hsfl.infer``
tasks over MQTT. A focused test checks that fallback path against the server model in-process.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from broker.blobs import sha256_hex
from broker.client import BrokerClient
from broker.codec import make_envelope
from broker.schemas import EvalReport, InferRequest
from broker.topics import Topics
from harmony.data import load_dataset
from harmony.engine import LocalEngine
from harmony.evaluate import offload_features, server_predictor
from harmony.experiment import Experiment
from orchestrator.engine import DistributedEngine
from server import state
from server.app import celery_app
from tests.conftest import same_bits, tiny_config
from tests.runtime_fixtures import local_stack  # noqa: F401  (fixture)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["splitgp", "harmony"])
def test_distributed_equals_local(local_stack, algorithm, tmp_path):  # noqa: F811
    cfg = tiny_config(**{"train.algorithm": algorithm, "eval.eval_every": 1})  # also a mid-training evaluation
    if algorithm == "harmony":  # with a validation split (splitgp: without): its τ policies come from the devices
        cfg = cfg.with_overrides(**{"data.val_per_client": 10})
    local = LocalEngine(cfg)
    expected = local.run()
    engine = DistributedEngine(cfg, tmp_path, mqtt=local_stack.mqtt, redis_url=local_stack.redis_url,
                               devices_timeout_s=60, round_timeout_s=120)
    try:
        got = engine.run()
    finally:
        engine.close()
    for side in ("client", "server"):
        diff = max_abs_diff(local.model_state()[side], engine.model_state()[side])
        assert diff <= 1e-5, f"{algorithm}: {side} weights differ by {diff}"
        assert diff == 0.0, f"{algorithm}: {side} weights not bit-identical ({diff})"
    assert got["runtime"] == "distributed"
    assert (tmp_path / "results.json").is_file()
    assert got["evaluation"]["accuracy"] == expected["evaluation"]["accuracy"]
    assert got["evaluation"]["accuracy_fixed_tau"] == expected["evaluation"]["accuracy_fixed_tau"]
    for a, b in zip(got["rounds"], expected["rounds"], strict=True):
        for key in ("samples", "train_loss_exit", "train_loss_server", "train_acc_exit", "train_acc_server"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
        assert a["eval_accuracy"] == b["eval_accuracy"]
    r = state.connect(local_stack.redis_url)
    assert r.hget(state.round_key(cfg.train.rounds), "state") == b"done"
    # each session reports where its time went; the phases fit in the session's wall time
    sessions = [f for _, f in r.xrange(state.events_key()) if f[b"name"] == b"session_done"]
    assert sessions
    for f in sessions:
        split, seconds = json.loads(f[b"split"]), json.loads(f[b"seconds"])
        assert set(split) == {"compute", "wait", "send", "upload_store"}
        assert split["compute"] > 0 and sum(split.values()) <= seconds + 1e-3
    # and each round where the orchestrator's time went, within the round's own wall time
    rounds = {json.loads(f[b"round"]): json.loads(f[b"split"])
              for _, f in r.xrange(state.events_key()) if f[b"name"] == b"round_done"}
    assert sorted(rounds) == list(range(1, cfg.train.rounds + 1))
    for k, split in rounds.items():
        assert set(split) == {"publish", "sessions", "aggregate", "load"}
        assert split["sessions"] > 0 and sum(split.values()) <= got["rounds"][k - 1]["seconds"] + 1e-3
    # the table came from the devices: every device's report went through its hsfl.infer task into Redis
    reports = r.hgetall(state.eval_key(cfg.train.rounds + 1))
    assert sorted(k.decode() for k in reports) == sorted(engine.device_ids)
    for client, (mine, theirs) in enumerate(zip(got["evaluation"]["per_client"], expected["evaluation"]["per_client"],
                                                strict=True)):
        for key in ("accuracy", "tau", "offload_probability", "accuracy_fixed_tau", "offload_probability_fixed_tau",
                    "policies"):
            assert [row[key] for row in mine["rho"]] == [row[key] for row in theirs["rho"]], (client, key)
    assert got["evaluation"]["policies"] == expected["evaluation"]["policies"]
    assert ("validation" in got["evaluation"]["policies"]) == (algorithm == "harmony")


def _perturbed(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Init weights plus seeded noise on conv/linear weights: an untrained server that still tells inputs apart."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) if k.endswith("weight") and v.dim() > 1 else v.clone()
            for k, v in state_dict.items()}


@pytest.mark.slow
def test_fallback_inference_answers_with_the_server_model(local_stack):  # noqa: F811
    """``hsfl.infer`` answers ``infer`` requests with exactly the predictions (and logits) the server
    model gives in-process on the same offloaded features, refuses a request it cannot run with an
    ``error`` naming its seq, and stores the device's ``eval_report`` where the orchestrator reads it."""
    cfg = tiny_config()
    experiment = Experiment.plan(cfg)
    server_model = experiment.server_model()
    server_state = _perturbed(experiment.initial_states()[1], seed=11)
    server_model.load_state_dict(server_state)
    predict = server_predictor(server_model)
    x = load_dataset(cfg.data.dataset).test_x[:64].contiguous(memory_format=torch.channels_last)
    requests = []
    for depth in (2, 3):
        client = experiment.client_model(depth)
        client.load_state_dict(_perturbed(client.state_dict(), seed=depth))
        client.eval()
        with torch.no_grad():
            features = offload_features(client.features(x), torch.float16, channels_last=True)
            logits = server_model(features.float(), depth)
        requests.append((depth, features, predict(features, depth), logits))
    assert len(torch.unique(requests[0][2])) >= 3, "the probe server predicts too few classes to tell anything"

    r = state.connect(local_stack.redis_url)
    # the task serves only a device of the run (broker.inbound: unknown_device otherwise)
    manifest = json.dumps({**experiment.manifest(), "clients": {"probe-0": 0}, "shares": {}}, sort_keys=True).encode()
    manifest_sha = sha256_hex(manifest)
    r.set(state.config_key(manifest_sha), manifest)
    server_sha, _ = state.put_model(r, server_state)
    dev, rnd, topics = "probe-0", 77, Topics()
    r.hdel(state.ready_key(rnd), f"infer:{dev}")
    r.hdel(state.eval_key(rnd), dev)
    task = celery_app(local_stack.redis_url).send_task("hsfl.infer", kwargs={
        "dev": dev, "manifest_sha": manifest_sha, "server_sha": server_sha, "idle_s": 60.0, "rnd": rnd})
    deadline = time.monotonic() + 90
    while r.hget(state.ready_key(rnd), f"infer:{dev}") is None:
        assert time.monotonic() < deadline, "the hsfl.infer task never subscribed"
        time.sleep(0.05)

    probe = BrokerClient("probe-0-test", *local_stack.mqtt, topics=topics, clean_start=True, session_expiry_s=0)
    probe.connect()
    try:
        down, err = probe.subscribe(topics.down(dev)), probe.subscribe(topics.err(dev))
        for depth, features, predictions, logits in requests:
            request = make_envelope(InferRequest(depth=depth, features=features, want_logits=True), dev=dev,
                                    seq=probe.next_seq(), round=rnd)
            probe.publish_message(topics.up(dev), request)
            reply = probe.wait_for("infer_reply", lambda e, s=request.seq: e.body.ref_seq == s, timeout=30,
                                   subscription=down).body
            assert torch.equal(reply.predictions, predictions), f"depth {depth}: predictions differ"
            assert same_bits(reply.logits, logits), f"depth {depth}: logits not bit-identical"
        bad = make_envelope(InferRequest(depth=2, features=torch.zeros(3, 5, dtype=torch.float16)), dev=dev,
                            seq=probe.next_seq(), round=rnd)
        probe.publish_message(topics.up(dev), bad)
        refusal = probe.wait_for("error", lambda e: e.body.ref_seq == bad.seq, timeout=30, subscription=err).body
        assert refusal.code == "bad_request" and refusal.field == "body.features"
        report = EvalReport(rhos=[0.0], accuracy=[0.75], tau=[0.4], offload_probability=[0.25],
                            accuracy_fixed_tau=[0.5], offload_probability_fixed_tau=[0.5], fixed_tau=0.5, samples=40)
        probe.send(topics.up(dev), report, round=rnd)
        assert task.get(timeout=60) == {"device": dev, "round": rnd, "served": 2, "reported": True}
    finally:
        probe.close()
    stored = json.loads(r.hget(state.eval_key(rnd), dev))
    assert EvalReport(**stored["report"]) == report
