"""The default timeouts of the distributed runtime fit together (docs/design.md §5): a Celery task
lost with its worker is redelivered (visibility timeout + restore interval) well within the
default round timeout, a started session comes back through its heartbeat sooner still, and every
entry point (``harmony run``, ``DistributedEngine``, ``MqttCeleryFleet``) uses the same round timeout."""

from __future__ import annotations

import inspect

import pytest

from orchestrator.engine import DistributedEngine
from orchestrator.fleet import ROUND_TIMEOUT_S, MqttCeleryFleet
from server import app, state
from testbed import cli


@pytest.fixture
def default_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HSFL_VISIBILITY_S", raising=False)
    monkeypatch.delenv("HSFL_RESTORE_INTERVAL_S", raising=False)


def test_the_default_redelivery_bound_sits_well_inside_a_round(default_env) -> None:
    assert app.redelivery_bound_s() == app.VISIBILITY_S + app.RESTORE_INTERVAL_S
    assert app.redelivery_bound_s() <= ROUND_TIMEOUT_S / 4
    assert state.ALIVE_TTL_S + state.HEARTBEAT_S < app.redelivery_bound_s() / 4
    options = app.celery_app("redis://127.0.0.1:1/0").conf.broker_transport_options
    assert options["visibility_timeout"] == app.VISIBILITY_S
    assert options["unacked_restore_interval"] == app.RESTORE_INTERVAL_S
    assert options["unacked_restore_throttle"] == 1


def test_the_environment_overrides_the_redelivery_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSFL_VISIBILITY_S", "30")
    monkeypatch.setenv("HSFL_RESTORE_INTERVAL_S", "2")
    assert app.redelivery_bound_s() == 32
    assert app.celery_app("redis://127.0.0.1:1/0").conf.broker_transport_options["visibility_timeout"] == 30


def test_every_entry_point_has_the_same_round_timeout() -> None:
    assert inspect.signature(MqttCeleryFleet).parameters["round_timeout_s"].default == ROUND_TIMEOUT_S
    assert inspect.signature(DistributedEngine).parameters["round_timeout_s"].default == ROUND_TIMEOUT_S
    assert inspect.signature(cli.run).parameters["round_timeout"].default == ROUND_TIMEOUT_S


@pytest.mark.parametrize("value", ["15m", "0", "-3", ""])
def test_a_bad_redelivery_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("HSFL_VISIBILITY_S", value)
    with pytest.raises(ValueError, match="HSFL_VISIBILITY_S=.*whole number of seconds >= 1"):
        app.celery_app("redis://127.0.0.1:1/0")
