"""The installed version of this project: what an agent reports in ``hello.agent_version`` and what
the orchestrator compares it with (a board runs the wheel ``harmony flash`` installed on it)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "harmony-testbed"
UNINSTALLED = "0+unknown"


def installed_version() -> str:
    """The version of the installed ``harmony-testbed`` distribution (package metadata, as pip
    installed it); ``0+unknown`` when the code runs from a source tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNINSTALLED
