"""The open-stack case (issue 17): `harmony up` without flags starts with per-device authentication
and the ACL, so nobody on the broker can derail a run — an anonymous client is refused; a device's
own login can neither forge another device's ``eval_report`` nor stop a device (only the
orchestrator account writes ``cmd``); and a retained announcement of a device the stack does not
know (one an earlier, open broker kept) is ignored, answered and cleared instead of becoming
client 0 and failing every later run. `harmony run --stack` uses the stack's credentials itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from broker.client import BrokerClient, read_login
from broker.codec import encode, make_envelope
from broker.errors import ConnectRefused, PublishDenied
from broker.schemas import EvalReport, Hello, Status, Stop
from broker.topics import Topics
from harmony.version import installed_version
from server import state
from testbed.cli import app
from testbed.stack import load_stack
from tests.test_runtime_cli import TINY

NOT_AUTHORIZED = 0x87


@pytest.mark.slow
def test_up_is_secure_by_default_and_unknown_retained_devices_are_cleared(tmp_path):
    runner = CliRunner()
    stack_dir, cfg_path, out = tmp_path / "stack", tmp_path / "tiny.yaml", tmp_path / "out"
    cfg_path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["up", "--agents", "1", "--devices-per-agent", "4", "--run-dir", str(stack_dir)])
    assert result.exit_code == 0, result.output
    info = load_stack(stack_dir)
    topics = Topics()
    try:
        assert info.store is not None and "is open" not in result.output
        with pytest.raises(ConnectRefused):
            BrokerClient("anonymous", *info.mqtt, clean_start=True, session_expiry_s=0).connect(timeout=5)

        result = runner.invoke(app, ["fleet", "add", "probe-0", "--stack", str(stack_dir)])
        assert result.exit_code == 0, result.output
        password = (Path(info.store) / "devices" / "probe-0" / "password").read_text().strip()
        device = BrokerClient("probe-0", *info.mqtt, username="probe-0", password=password, clean_start=True,
                              session_expiry_s=0)
        device.connect()
        try:
            report = EvalReport(rhos=[0.0], accuracy=[0.99], tau=[0.4], offload_probability=[0.0],
                                accuracy_fixed_tau=[0.99], offload_probability_fixed_tau=[0.0], fixed_tau=0.5,
                                samples=40)
            forged = [(topics.up("emu-0"), make_envelope(report, dev="emu-0", seq=1, round=2)),
                      (topics.cmd("emu-0"), make_envelope(Stop(reason="forged"), dev="emu-0", seq=2)),
                      (topics.cmd("probe-0"), make_envelope(Stop(reason="forged"), dev="probe-0", seq=3))]
            for topic, envelope in forged:
                with pytest.raises(PublishDenied) as denied:
                    device.publish_message(topic, envelope)
                assert denied.value.reason_code == NOT_AUTHORIZED, topic
        finally:
            device.close()

        # a retained announcement of a device the stack does not know, sorting before emu-0
        user, secret = read_login(info.credentials["orchestrator"])
        service = BrokerClient("stale-retained", *info.service_mqtt, username=user, password=secret,
                               tls=info.service_tls("orchestrator"), clean_start=True, session_expiry_s=0)
        service.connect()
        hello = Hello(agent_version=installed_version(), cores=4, freq_mhz=2000.0, memory_bytes=1 << 30, load=0.0,
                      gflops=50.0, rtt_ms=1.0, uplink_bps=1e9, started_at=1.0)
        service.publish_raw(topics.hello("a-ghost"), encode(make_envelope(hello, dev="a-ghost", seq=1)), retain=True)
        service.publish_raw(topics.status("a-ghost"), encode(make_envelope(Status("online"), dev="a-ghost", seq=2)),
                            retain=True)
        service.close()

        result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--stack", str(stack_dir),
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "is open" not in result.output
        doc = json.loads((out / "results.json").read_text())
        assert doc["devices"] == ["emu-0", "emu-1", "emu-2", "emu-3"]

        r = state.connect(info.redis_url)
        events = [{k.decode(): json.loads(v) for k, v in fields.items() if k != b"name"}
                  for _, fields in r.xrange(state.events_key()) if fields[b"name"] == b"message_rejected"]
        assert {"device": "a-ghost", "code": "unknown_device", "field": "dev", "kind": "hello",
                "topic": topics.hello("a-ghost")} in events
        assert not r.sismember(state.devices_key(), "a-ghost")
        watcher = BrokerClient("watcher", *info.service_mqtt, username=user, password=secret,
                               tls=info.service_tls("orchestrator"), clean_start=True, session_expiry_s=0)
        watcher.connect()
        try:
            retained = watcher.subscribe(topics.hello("a-ghost"))
            time.sleep(1.0)
            assert len(retained) == 0, "the unknown device's retained hello is still on the broker"
        finally:
            watcher.close()
    finally:
        runner.invoke(app, ["down", "--run-dir", str(stack_dir)])
