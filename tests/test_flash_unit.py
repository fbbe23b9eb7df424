"""The pieces of ``harmony flash`` that need no board: the unit's ``ExecStart`` as systemd reads it
(quoting, ``%`` specifiers) and the options' checks."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from testbed.flash import FlashError, FlashOptions, SshTarget, agent_command, unit_exec, unit_text


def _opts(**kw) -> FlashOptions:
    base = dict(target=SshTarget.parse("pi@board.local"), device_id="pi4-01", broker="10.0.0.2:8883",
                credentials_dir=Path("credentials"))
    return FlashOptions(**{**base, **kw})


def test_the_unit_runs_the_agent_exactly_as_built():
    opts = _opts(board_data="/srv/data%50", profile="pi-zero2")
    argv = agent_command(opts, opts.board_data)
    text = unit_text(opts, argv, "pi")
    assert "ExecStart=" in text and "%%50" in text  # a literal % is doubled for systemd
    back, env = unit_exec(text)
    assert back == argv and env == {"PYTHONUNBUFFERED": "1"}
    assert argv[argv.index("--device-class") + 1] == "pi_zero_2"  # the profiles.yaml name
    assert argv[argv.index("--certfile") + 1] == "/opt/harmony/credentials/client.crt"


def test_options_are_checked_before_anything_runs():
    with pytest.raises(FlashError, match="USER@HOST"):
        SshTarget.parse("board.local")
    with pytest.raises(FlashError, match="--device-id"):
        _opts(device_id="pi 4").check()
    with pytest.raises(FlashError, match="--broker"):
        _opts(broker="10.0.0.2").check()
    with pytest.raises(FlashError, match="--profile 'pi7'"):
        _opts(profile="pi7").check()
    with pytest.raises(FlashError, match="board paths"):
        _opts(root=PurePosixPath("/tmp/my board")).check()
    _opts(profile="jetson-nano").check()
