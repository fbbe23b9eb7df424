"""The agent's measured footprint against a board's memory: the Pi Zero 2's agent budget in
profiles.yaml, the warning line in ``harmony fleet plan`` and in ``harmony flash --profile``."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from broker.client import BrokerClient
from broker.mosquitto import MosquittoConfig, MosquittoProcess, free_port
from broker.topics import Topics
from harmony.profiles import get_profile, load_profiles
from harmony.version import installed_version
from testbed.cli import app
from testbed.credentials import CredentialStore
from testbed.footprint import AGENT_FOOTPRINT, footprint_warning
from tests.broker.broker_samples import sample_messages


def test_the_smallest_board_has_an_agent_budget_and_the_agent_does_not_fit_it():
    zero = get_profile("pi_zero_2")
    assert zero.memory_bytes == 512 * 2**20 and zero.agent_memory_bytes is not None
    assert zero.agent_memory_bytes < zero.memory_bytes
    assert zero.agent_memory_bytes < AGENT_FOOTPRINT.peak_rss_bytes
    warning = footprint_warning("pi_zero_2")
    assert warning is not None and "300 MiB" in warning and "README" in warning
    assert footprint_warning("pi4") is None  # 4 GiB and no separate budget: it fits


def test_a_user_profile_may_set_or_omit_the_agent_budget(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("my_board:\n  compute_flops: 5_000_000_000\n  uplink_bps: 50_000_000\n"
                    "  memory_bytes: 2_147_483_648\n  cores: 2\n  source: measured\n"
                    "pi4:\n  agent_memory_bytes: 1_000_000_000\n")
    profiles = load_profiles(path)
    assert profiles["my_board"].agent_memory_bytes is None
    assert profiles["pi4"].agent_memory_bytes == 1_000_000_000


def test_fleet_plan_warns_where_the_agent_does_not_fit():
    result = CliRunner().invoke(app, ["fleet", "plan", "examples/quickstart.yaml", "--set", "fleet.num_clients=3",
                                      "--set", "fleet.split_depths=null", "--set",
                                      "fleet.profiles=[pi_zero_2,pi4,laptop]"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "client 0 (pi_zero_2)" in warnings[0] and "estimated peak" in warnings[0]
    assert "for cnn8 width 0.5 at depth" in warnings[0]  # the model that device would train


def test_the_peak_is_scaled_from_the_measured_model_by_what_a_step_needs():
    """The measured peak for the measured model (full-width cnn8 at depth 4, batch 64, HARMONY), the
    idle memory plus a share of the training increment for smaller ones."""
    from harmony.assignment import step_needs
    from harmony.models import build_model, cost_table

    cost = cost_table(build_model("cnn8", 1.0, 10, (1, 28, 28)))[4]
    reference = step_needs(cost, batch_size=64, batches_per_step=2, momentum=0.9, bits_per_element=16,
                           compute_flops=1e9, uplink_bps=1e6).memory_bytes
    assert AGENT_FOOTPRINT.reference_step_bytes == reference
    assert AGENT_FOOTPRINT.peak_bytes(reference) == AGENT_FOOTPRINT.peak_rss_bytes
    assert AGENT_FOOTPRINT.peak_bytes(None) == AGENT_FOOTPRINT.peak_rss_bytes
    idle, peak = AGENT_FOOTPRINT.idle_rss_bytes, AGENT_FOOTPRINT.peak_rss_bytes
    assert AGENT_FOOTPRINT.peak_bytes(reference // 2) == idle + (peak - idle) // 2


def _announce_hello(port: int, device: str, memory_bytes: int) -> BrokerClient:
    """An MQTT client announcing a Pi Zero 2 W's retained hello as its agent would (512 MiB cgroup)."""
    client = BrokerClient(f"agent-{device}", "127.0.0.1", port, topics=Topics(), device_id=device, clean_start=True,
                          session_expiry_s=0)
    client.connect()
    hello = dataclasses.replace(sample_messages()["hello"], agent_version=installed_version(),
                                memory_bytes=memory_bytes, cpus=0.1, device_class="pi_zero_2",
                                rates={"conv": 3e9, "depthwise": 1e9, "attention": 1e9}, uplink_bps=20e6)
    client.announce(client.topics.hello(device), hello).wait(10)
    client.publish_status("idle").wait(10)
    return client


@pytest.mark.slow
def test_fleet_plan_warns_from_the_peak_of_the_model_the_device_would_train(tmp_path):
    """A Pi Zero 2 W whose hello reports its 512 MiB cgroup: the quick start's half-width cnn8 fits
    it (an emulated one trains in that cgroup), so `fleet plan` must not say it "will swap or be
    killed" from the full-width model's peak; full width at batch 64 under HARMONY does not fit."""
    mosquitto = MosquittoProcess(tmp_path / "mosquitto", MosquittoConfig(port=free_port())).start()
    device = _announce_hello(mosquitto.port, "zero-0", 512 * 2**20)
    try:
        def plan(*overrides: str) -> tuple[list[dict], list[str]]:
            args = ["fleet", "plan", "examples/quickstart.yaml", "--broker", f"127.0.0.1:{mosquitto.port}",
                    "--set", "fleet.num_clients=1", "--set", "fleet.split_depths=null", "--set",
                    "fleet.assignment=measured", "--wait", "10"]
            for o in overrides:
                args += ["--set", o]
            result = CliRunner().invoke(app, [*args, "--json"])
            assert result.exit_code == 0, result.output
            rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
            text = CliRunner().invoke(app, args, env={"COLUMNS": "300"}).output
            return rows, [line for line in text.splitlines() if line.startswith("warning:")]

        (row,), warnings = plan()
        assert row["device"] == "zero-0" and "warning" not in row, row
        assert warnings == []
        (row,), warnings = plan("model.width=1.0", "train.algorithm=harmony", "train.batch_size=64",
                                "fleet.step_budget_s=100")
        assert row["depth"] == 4 and "will swap or be killed" in row["warning"], row
        assert f"estimated peak of {AGENT_FOOTPRINT.peak_bytes(row['memory_bytes']) / 2**20:.0f} MiB" in row["warning"]
        assert "for cnn8 width 1 at depth 4, batch 64" in row["warning"] and len(warnings) == 1
    finally:
        device.close()
        mosquitto.stop()


def test_flash_dry_run_of_an_unreachable_board_warns_and_changes_nothing(tmp_path):
    store = CredentialStore(tmp_path / "credentials")
    store.ensure_ca()
    store.add_device("zero-1", tls=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["flash", "pi@127.0.0.1", "--device-id", "zero-1", "--broker",
                                      "192.168.1.10:8883", "--profile", "pi-zero2", "--credentials-dir",
                                      str(tmp_path / "credentials"), "--ssh-port", str(free_port()), "--dry-run",
                                      "--wheel", str(_wheel(tmp_path))])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "warning: device class pi_zero_2" in out and "not reachable" in out
    assert "[dry-run] would run the install script" in out and "enable and (re)start harmony-agent.service" in out
    assert "--device-class pi_zero_2" in out and "dry run: nothing was changed" in out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _wheel(tmp_path):
    from testbed.flash import build_wheel

    return build_wheel(tmp_path.parent / f"{tmp_path.name}-wheel")
