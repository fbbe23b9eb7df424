"""The pieces of ``harmony flash`` that need no board: the unit's ``ExecStart`` as systemd reads it
(quoting, ``%`` specifiers) and the options' checks."""

from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath

import pytest

from testbed.flash import (
    Bundle,
    FlashError,
    FlashOptions,
    SshTarget,
    _changed,
    agent_command,
    flash_command,
    unit_exec,
    unit_text,
)


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


def test_the_suggested_command_keeps_every_option_the_user_gave(tmp_path):
    """What a refusal or a failed self-check tells the user to run next: the same flash, every option kept
    (``--ssh-port``, ``--identity``, ``--root``, …), with ``--upgrade``/``--torch`` as the fix needs."""
    key = tmp_path / "id_ed25519"
    key.write_text("k")
    config = tmp_path / "run.yaml"
    config.write_text("name: x\n")
    target = SshTarget.parse("pi@127.0.0.1", port=2222, identity=key, options=("UserKnownHostsFile=/tmp/kh",))
    opts = _opts(target=target, root=PurePosixPath("/srv/board"), prefix=PurePosixPath("/opt/h"), python="python3.11",
                 config=config, client=2, overrides=["train.rounds=3"], tls=False, pip_args=["--find-links", "/w"],
                 site_packages=["/usr/lib/python3/dist-packages"], run_as="pi", service="none",
                 wheelhouse=tmp_path / "wh", torch="2.9.1")
    command = flash_command(opts, upgrade=True)
    assert shlex.split(command) == [
        "harmony", "flash", "pi@127.0.0.1", "--device-id", "pi4-01", "--broker", "10.0.0.2:8883", "--ssh-port", "2222",
        "--identity", str(key), "--ssh-option", "UserKnownHostsFile=/tmp/kh", "--credentials-dir", "credentials",
        "--no-tls", "--config", str(config), "--client", "2", "--set", "train.rounds=3", "--root", "/srv/board",
        "--prefix", "/opt/h", "--python", "python3.11", "--service", "none", "--pip-args", "--find-links /w",
        "--site-packages", "/usr/lib/python3/dist-packages", "--run-as", "pi", "--wheelhouse", str(tmp_path / "wh"),
        "--torch", "2.9.1", "--upgrade"]
    assert "--torch 2.10.0" in flash_command(opts, torch="2.10.0") and "--upgrade" not in flash_command(opts)
    # the refusal of a different agent names that command
    bundle = Bundle(tmp_path, tmp_path / "h.whl", "0.2.0", {}, {"agent": "new", "credentials": "", "data": "",
                                                               "unit": ""}, "", None)
    with pytest.raises(FlashError) as refused:
        _changed(opts, bundle, {"device_id": "pi4-01", "agent_version": "0.1.0", "components": {"agent": "old"}})
    assert f"`{command}`" in str(refused.value) and "nothing was changed" in str(refused.value)


def test_bad_torch_or_wheelhouse_options_are_named(tmp_path):
    with pytest.raises(FlashError, match="--torch 'latest'"):
        _opts(torch="latest").check()
    (tmp_path / "numpy-2.whl").write_text("")
    with pytest.raises(FlashError, match="--wheelhouse .*: no torch-\\*.whl there"):
        _opts(wheelhouse=tmp_path).check()
