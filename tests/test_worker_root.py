"""Celery's superuser warning: a worker started as root (``harmony up`` as root, a container's
default) used to open its log with "You're running the worker with superuser privileges: this is
absolutely not recommended!". The danger it names is pickle; the app accepts JSON only, so the
warning is silenced for exactly that configuration (``server.app``) and comes back with pickle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, os, warnings
from celery import platforms, signals
from server.app import celery_app
app = celery_app("redis://127.0.0.1:1/0")
{configure}
for name in ("getuid", "geteuid", "getgid", "getegid"):  # as root, whoever runs the test
    setattr(os, name, lambda: 0)
with warnings.catch_warnings(record=True) as caught:
    try:  # what a starting worker does (celery.apps.worker.Worker.on_before_init)
        signals.celeryd_init.send(sender="hsfl@test", instance=None, conf=app.conf, options={{}})
        platforms.check_privileges(app.conf.accept_content)
    except Exception as err:
        caught.append(err)
print(json.dumps([str(getattr(w, "message", w)) for w in caught]))
"""


def _root_check(configure: str = "") -> list[str]:
    """What Celery's start-up privilege check says, as root, about the project's app (configured by
    the ``configure`` statement), in a fresh interpreter as a worker would be."""
    proc = subprocess.run([sys.executable, "-c", CHECK.format(configure=configure)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_root_worker_of_the_json_only_app_starts_without_the_superuser_warning() -> None:
    assert _root_check() == []


def test_an_app_that_accepts_pickle_gets_the_warning_back() -> None:
    said = _root_check('app.conf.accept_content = ["json", "pickle"]\nimport os; os.environ["C_FORCE_ROOT"] = "1"')
    assert any("superuser privileges" in s for s in said), said
