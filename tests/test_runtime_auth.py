"""``harmony up --auth``: the broker refuses anonymous and wrong logins, every device is confined to its
own topics by the generated ACL, and a distributed run still works with each process on its own login
(agents via ``--credentials``, the worker as ``server``, ``harmony run --stack`` as ``orchestrator``,
the services on the broker's certificate-only service listener). ``harmony fleet add ID --stack``
adds a device to the running stack (its broker reloads the password file)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from broker.client import BrokerClient, read_login
from broker.errors import ConnectRefused, PublishDenied
from broker.topics import Topics
from testbed.cli import app
from testbed.stack import load_stack
from tests.test_runtime_cli import TINY

NOT_AUTHORIZED = 0x87


def _device_passwords(path: Path) -> dict[str, str]:
    return dict(line.split(":", 1) for line in path.read_text().splitlines() if line)


@pytest.mark.slow
def test_up_with_auth_confines_each_device(tmp_path):
    runner = CliRunner()
    stack_dir, cfg_path, out = tmp_path / "stack", tmp_path / "tiny.yaml", tmp_path / "out"
    cfg_path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["up", "--agents", "1", "--devices-per-agent", "4", "--auth", "--run-dir",
                                 str(stack_dir)])
    assert result.exit_code == 0, result.output
    info = load_stack(stack_dir)
    topics = Topics()
    try:
        creds = Path(info.credentials["agent-0"])
        assert oct(creds.stat().st_mode & 0o777) == "0o600"
        passwords = _device_passwords(creds)
        assert sorted(passwords) == ["emu-0", "emu-1", "emu-2", "emu-3"]
        assert read_login(info.credentials["orchestrator"])[0] == "orchestrator"

        with pytest.raises(ConnectRefused):
            BrokerClient("anonymous-probe", *info.mqtt, clean_start=True, session_expiry_s=0).connect(timeout=5)
        with pytest.raises(ConnectRefused):
            BrokerClient("wrong-password-probe", *info.mqtt, username="emu-0", password="guess", clean_start=True,
                         session_expiry_s=0).connect(timeout=5)

        # a device of its own (logging in as emu-0 would take emu-0's client id: the broker ties client
        # ids to user names), added while the stack runs
        result = runner.invoke(app, ["fleet", "add", "probe-0", "--stack", str(stack_dir)])
        assert result.exit_code == 0, result.output
        probe_password = (Path(info.store) / "devices" / "probe-0" / "password").read_text().strip()
        assert probe_password not in result.output
        device = BrokerClient("probe-0", *info.mqtt, username="probe-0", password=probe_password,
                              clean_start=True, session_expiry_s=0)
        user, password = read_login(info.credentials["orchestrator"])
        orchestrator = BrokerClient("orchestrator-probe", *info.service_mqtt, username=user, password=password,
                                    tls=info.service_tls("orchestrator"), clean_start=True, session_expiry_s=0)
        device.connect()
        orchestrator.connect()
        try:
            assert device.publish_raw(topics.up("probe-0"), b"probe").reason_code < 0x80  # its own uplink
            for topic in (topics.up("emu-1"), topics.cmd("emu-1"), topics.hello("emu-1"), topics.status("emu-1"),
                          topics.down("probe-0"), topics.cmd("probe-0")):  # nor may it forge the server's messages
                with pytest.raises(PublishDenied) as denied:
                    device.publish_raw(topic, b"forged")
                assert denied.value.reason_code == NOT_AUTHORIZED, topic
            # mosquitto grants any SUBACK but delivers only what the ACL lets the device read
            own, other = device.subscribe(topics.down("probe-0")), device.subscribe(topics.up("emu-1"))
            orchestrator.publish_raw(topics.up("emu-1"), b"another device's features")
            orchestrator.publish_raw(topics.down("probe-0"), b"a reply for probe-0")
            assert own.get(timeout=10).payload == b"a reply for probe-0"
            time.sleep(0.5)
            assert len(other) == 0, "a device read another device's uplink"
        finally:
            device.close()
            orchestrator.close()
        online = BrokerClient("probe-0", *info.mqtt, username="probe-0", password=probe_password,
                              clean_start=True, session_expiry_s=0)
        online.connect()
        result = runner.invoke(app, ["fleet", "remove", "probe-0", "--stack", str(stack_dir)])
        assert result.exit_code == 0, result.output
        try:  # withdrawn: the reloaded broker drops its open connection and refuses it from then on
            deadline = time.monotonic() + 10
            while online.is_connected:
                assert time.monotonic() < deadline, "a removed device stayed connected"
                time.sleep(0.05)
        finally:
            online.close()
        with pytest.raises(ConnectRefused):
            BrokerClient("probe-0", *info.mqtt, username="probe-0", password=probe_password, clean_start=True,
                         session_expiry_s=0).connect(timeout=5)

        result = runner.invoke(app, ["run", str(cfg_path), "--runtime", "distributed", "--stack", str(stack_dir),
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
        doc = json.loads((out / "results.json").read_text())
        assert doc["runtime"] == "distributed" and len(doc["rounds"]) == 1
        assert doc["devices"] == ["emu-0", "emu-1", "emu-2", "emu-3"]
    finally:
        result = runner.invoke(app, ["down", "--run-dir", str(stack_dir)])
    assert result.exit_code == 0, result.output
    assert "Not authorized" not in (stack_dir / "worker.log").read_text()
    assert os.path.isfile(stack_dir / "credentials" / "mosquitto.acl")
