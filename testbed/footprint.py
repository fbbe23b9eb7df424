"""What an edge agent needs on a board, as measured (``benchmarks/agent_footprint.py``,
``benchmarks/RESULTS.md`` §8), and whether a device class or a registered device has room for it.

``harmony fleet plan`` prints a warning line for every device whose memory (its profile's
``agent_memory_bytes``, else ``memory_bytes``; or what its ``hello`` reported) is below the agent's
peak *for the model that device would train*: the measured idle memory plus the measured training
increment scaled by what a step of that model needs (``harmony.assignment.step_needs``: weights,
gradients, momentum, the activations kept for the backward pass) over what a step of the measured
model needs (:meth:`AgentFootprint.peak_bytes`; an estimate beside the one measured model).
``harmony flash --profile CLASS`` knows no model yet and warns against the measured peak.
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
    reference_step_bytes: int
    """``step_needs(...).memory_bytes`` of the measured model (full-width cnn8 at depth 4, batch 64,
    two batches per step, momentum 0.9): what the training increment ``peak − idle`` is scaled by."""

    def peak_bytes(self, step_bytes: int | None = None) -> int:
        """The agent's peak when it trains a model whose step needs ``step_bytes``: idle plus the
        measured increment × ``step_bytes`` / :attr:`reference_step_bytes` (the measured peak itself
        for the measured model, or when ``step_bytes`` is None)."""
        if step_bytes is None:
            return self.peak_rss_bytes
        increment = (self.peak_rss_bytes - self.idle_rss_bytes) * step_bytes / self.reference_step_bytes
        return int(self.idle_rss_bytes + increment)


AGENT_FOOTPRINT = AgentFootprint(
    idle_rss_bytes=int(432.3 * MIB),
    peak_rss_bytes=int(700.1 * MIB),
    installed_bytes=int(1000.3 * MIB),
    torch_installed_bytes=int(760.7 * MIB),
    measured="x86_64, torch 2.13.0+cpu, 2026-12-01 (benchmarks/agent_footprint.py; RESULTS §8)",
    reference_step_bytes=132_534_392,  # tests/test_footprint.py checks it against step_needs
)


def budget_bytes(profile: object) -> int:
    """What an agent may use on a device class: ``agent_memory_bytes`` where the profile sets it,
    else all of ``memory_bytes``."""
    budget = getattr(profile, "agent_memory_bytes", None)
    return int(budget if budget is not None else profile.memory_bytes)  # type: ignore[attr-defined]


def memory_warning(device: str, available_bytes: int, what: str, footprint: AgentFootprint = AGENT_FOOTPRINT,
                   step_bytes: int | None = None, model: str | None = None) -> str | None:
    """A warning when ``available_bytes`` cannot hold the agent's peak (None: it fits): the peak of
    the model the device would train where its step's memory ``step_bytes`` is known (``model``
    names it), else the measured peak."""
    peak = footprint.peak_bytes(step_bytes)
    if available_bytes >= peak:
        return None
    if step_bytes is None:
        whose = (f"the agent's measured peak of {peak / MIB:.0f} MiB (idle {footprint.idle_rss_bytes / MIB:.0f} MiB; "
                 f"one full-width cnn8 device, {footprint.measured})")
    else:
        whose = (f"the agent's estimated peak of {peak / MIB:.0f} MiB for {model or 'the model it would train'} "
                 f"(idle {footprint.idle_rss_bytes / MIB:.0f} MiB + its step's {step_bytes / MIB:.1f} MiB scaled as "
                 f"measured: {footprint.peak_rss_bytes / MIB:.0f} MiB peak for full-width cnn8 at depth 4, "
                 f"{footprint.measured})")
    return f"{device}: {what} {available_bytes / MIB:.0f} MiB is below {whose}: it will swap or be killed; see " \
           "README (Footprint on a board)"


def footprint_warning(profile_name: str) -> str | None:
    """The warning for a device class of ``harmony/profiles.yaml`` (None: it fits)."""
    from harmony.profiles import get_profile

    profile = get_profile(profile_name)
    what = "agent memory budget" if profile.agent_memory_bytes is not None else "memory"
    return memory_warning(f"device class {profile_name}", budget_bytes(profile), what)
