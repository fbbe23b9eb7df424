"""Stack files you can trust: after a crash of part of a stack (mosquitto killed), `harmony up` and
`harmony run --stack` refuse to start over its directory — naming the processes that still run and
the fix — instead of overwriting ``stack.json`` and leaving them running (two redis-servers on one
data directory); `harmony down` then stops every recorded process that is alive."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml
from typer.testing import CliRunner

from testbed.cli import app
from testbed.stack import load_stack
from tests.test_runtime_cli import TINY, _alive


@pytest.mark.slow
def test_a_partly_alive_stack_is_refused_and_down_stops_the_rest(tmp_path):
    runner = CliRunner()
    stack_dir, cfg_path = tmp_path / "stack", tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["up", "--agents", "0", "--run-dir", str(stack_dir)])
    assert result.exit_code == 0, result.output
    pids = load_stack(stack_dir).pids
    assert {"mosquitto", "redis", "worker", "orchestrator"} <= set(pids)
    try:
        os.kill(pids["mosquitto"], signal.SIGKILL)  # the crash
        deadline = time.monotonic() + 10
        while _alive(pids["mosquitto"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for argv in (["run", str(cfg_path), "--runtime", "distributed", "--stack", str(stack_dir),
                      "--out", str(tmp_path / "out")],
                     ["up", "--agents", "0", "--run-dir", str(stack_dir)]):
            result = runner.invoke(app, argv)
            assert result.exit_code == 2, result.output
            flat = " ".join(result.output.split())
            assert f"redis (pid {pids['redis']})" in flat and f"worker (pid {pids['worker']})" in flat, flat
            assert "mosquitto is gone" in flat and f"harmony down --run-dir {stack_dir}" in flat, flat
            assert load_stack(stack_dir).pids == pids, "stack.json was overwritten"
        result = runner.invoke(app, ["down", "--run-dir", str(stack_dir)])
        assert result.exit_code == 0, result.output
        for name in ("redis", "worker", "orchestrator"):
            assert name in result.output
        assert not any(_alive(pid) for pid in pids.values())
        result = runner.invoke(app, ["up", "--agents", "0", "--run-dir", str(stack_dir)])  # and it starts again
        assert result.exit_code == 0, result.output
    finally:
        runner.invoke(app, ["down", "--run-dir", str(stack_dir)])
