"""Agent version admission: an agent reports its installed package version in ``hello``; the
orchestrator's registry (the ``python -m orchestrator`` process and the round driver's) refuses a
device whose version is not its own, naming the fix ``harmony flash … --upgrade``, in Redis (the
device's hash and a ``device_refused`` event), in the driver's error and in ``harmony fleet plan``.
Real mosquitto, redis-server and orchestrator processes; the devices are MQTT clients announcing a
``hello`` as an agent does (an agent of another version is flashed for real in tests/test_flash.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from broker.client import BrokerClient
from broker.topics import Topics
from edge_agent.probe import AGENT_VERSION
from harmony.version import installed_version
from orchestrator.registry import Registry
from server import state
from testbed.cli import app
from tests.broker.broker_samples import sample_messages

ROOT = Path(__file__).resolve().parents[1]
OLD = "0.0.9"


def test_the_agent_reports_the_installed_package_version():
    from importlib import metadata

    assert AGENT_VERSION == installed_version() == metadata.version("harmony-testbed")


def _announce(port: int, device: str, version: str) -> BrokerClient:
    client = BrokerClient(f"agent-{device}", "127.0.0.1", port, topics=Topics(), device_id=device, clean_start=True,
                          session_expiry_s=0)
    client.connect()
    hello = dataclasses.replace(sample_messages()["hello"], agent_version=version)
    client.announce(client.topics.hello(device), hello).wait(10)
    client.publish_status("idle").wait(10)
    return client


@pytest.mark.slow
def test_a_device_of_another_version_is_refused_naming_the_fix(broker_and_redis, tmp_path):
    port, url = broker_and_redis
    orchestrator = subprocess.Popen([sys.executable, "-m", "orchestrator", "--broker", f"127.0.0.1:{port}",
                                     "--redis", url], cwd=ROOT, stdout=open(tmp_path / "orch.log", "wb"),
                                    stderr=subprocess.STDOUT)
    devices = [_announce(port, "old-1", OLD), _announce(port, "new-1", installed_version())]
    try:
        r = state.connect(url)
        deadline = time.monotonic() + 60

        def refusals() -> list[dict[str, str]]:
            events = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(state.events_key())]
            return [e for e in events if e["name"] == "device_refused"]

        # the registry records the refusal in the device's hash, then as an event: wait for both
        while time.monotonic() < deadline and not (r.hget(state.dev_key("old-1"), "refused") and refusals()):
            time.sleep(0.1)
        refused = (r.hget(state.dev_key("old-1"), "refused") or b"").decode()
        assert f"runs agent {OLD}" in refused and installed_version() in refused
        assert "harmony flash USER@HOST --device-id old-1 --upgrade" in refused
        assert r.hget(state.dev_key("new-1"), "refused") is None
        mine = refusals()
        assert len(mine) == 1 and json.loads(mine[0]["device"]) == "old-1"
        assert json.loads(mine[0]["agent_version"]) == OLD
        assert "--upgrade" in (tmp_path / "orch.log").read_text()

        # the round driver's registry admits only the matching device, and says why it waits
        watcher = BrokerClient("driver-probe", "127.0.0.1", port, clean_start=True, session_expiry_s=0)
        watcher.connect()
        try:
            registry = Registry(watcher, None)
            assert registry.wait_for(1, timeout=10) == ["new-1"]
            with pytest.raises(TimeoutError, match=r"refused: device old-1 runs agent 0\.0\.9.*--upgrade"):
                registry.wait_for(2, timeout=1)
        finally:
            watcher.close()

        # harmony fleet plan shows the refusal as a warning line
        cfg = tmp_path / "one.yaml"
        cfg.write_text(yaml.safe_dump({"data": {"num_shards": 4, "train_fraction": 0.02},
                                       "model": {"family": "cnn8", "width": 0.25},
                                       "fleet": {"num_clients": 1, "assignment": "measured"}}))
        result = CliRunner().invoke(app, ["fleet", "plan", str(cfg), "--broker", f"127.0.0.1:{port}", "--wait", "5"])
        assert result.exit_code == 0, result.output
        assert "new-1" in result.output
        warning = [line for line in result.output.splitlines() if line.startswith("warning: refused")]
        assert len(warning) == 1 and "old-1" in warning[0] and "--upgrade" in warning[0], result.output
    finally:
        for d in devices:
            d.close()
        orchestrator.terminate()
        orchestrator.wait(10)
