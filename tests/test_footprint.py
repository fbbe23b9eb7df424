"""The agent's measured footprint against a board's memory: the Pi Zero 2's agent budget in
profiles.yaml, the warning line in ``harmony fleet plan`` and in ``harmony flash --profile``."""

from __future__ import annotations

from typer.testing import CliRunner

from broker.mosquitto import free_port
from harmony.profiles import get_profile, load_profiles
from testbed.cli import app
from testbed.credentials import CredentialStore
from testbed.footprint import AGENT_FOOTPRINT, footprint_warning


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
    assert len(warnings) == 1 and "client 0 (pi_zero_2)" in warnings[0] and "measured peak" in warnings[0]


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
