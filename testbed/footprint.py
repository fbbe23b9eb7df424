"""What an edge agent needs on a board, as measured (``benchmarks/agent_footprint.py``,
``benchmarks/RESULTS.md`` §8), and whether a device class or a registered device has room for it.

``harmony fleet plan`` prints a warning line for every device whose memory (its profile's
``agent_memory_bytes``, else ``memory_bytes``; or what its ``hello`` reported) is below the agent's
measured peak; ``harmony flash --profile CLASS`` warns the same way before flashing.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class AgentFootprint:
    """One agent process hosting one cnn8 device (full width, deepest split, HARMONY)."""

    idle_rss_bytes: int
    peak_rss_bytes: int
    installed_bytes: int
    torch_installed_bytes: int
    measured: str


AGENT_FOOTPRINT = AgentFootprint(
    idle_rss_bytes=int(432.3 * MIB),
    peak_rss_bytes=int(700.1 * MIB),
    installed_bytes=int(1000.3 * MIB),
    torch_installed_bytes=int(760.7 * MIB),
    measured="x86_64, torch 2.13.0+cpu, 2026-12-01 (benchmarks/agent_footprint.py; RESULTS §8)",
)


def budget_bytes(profile: object) -> int:
    """What an agent may use on a device class: ``agent_memory_bytes`` where the profile sets it,
    else all of ``memory_bytes``."""
    budget = getattr(profile, "agent_memory_bytes", None)
    return int(budget if budget is not None else profile.memory_bytes)  # type: ignore[attr-defined]


def memory_warning(device: str, available_bytes: int, what: str, footprint: AgentFootprint = AGENT_FOOTPRINT
                   ) -> str | None:
    """A warning when ``available_bytes`` cannot hold the agent's measured peak (None: it fits)."""
    if available_bytes >= footprint.peak_rss_bytes:
        return None
    return (f"{device}: {what} {available_bytes / MIB:.0f} MiB is below the agent's measured peak of "
            f"{footprint.peak_rss_bytes / MIB:.0f} MiB (idle {footprint.idle_rss_bytes / MIB:.0f} MiB; one cnn8 "
            f"device, {footprint.measured}): it will swap or be killed; see README (Footprint on a board)")


def footprint_warning(profile_name: str) -> str | None:
    """The warning for a device class of ``harmony/profiles.yaml`` (None: it fits)."""
    from harmony.profiles import get_profile

    profile = get_profile(profile_name)
    what = "agent memory budget" if profile.agent_memory_bytes is not None else "memory"
    return memory_warning(f"device class {profile_name}", budget_bytes(profile), what)
