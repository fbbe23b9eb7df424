"""Device profiles: the compute rate, uplink, memory and cores a device class is assumed to have.

The latency model (docs/design.md §6) reads ``P_i``/``R_i`` for clients and ``P_s`` for the main
server (profile ``server``) from here. Defaults ship in ``harmony/profiles.yaml``, each with a
``source`` saying how its numbers were reasoned; a user YAML file with the same layout adds
profiles or overrides single fields of shipped ones::

    pi4:                       # override one field of a shipped profile
      uplink_bps: 940_000_000
      source: "Pi 4 on Gigabit Ethernet, measured with iperf3"
    my_board:                  # a new profile needs every field
      compute_flops: 5_000_000_000
      uplink_bps: 50_000_000
      memory_bytes: 2_147_483_648
      cores: 4
      source: "..."

What emulating a class needs (``harmony fleet emulate``, docs/emulation.md) is there too:
``downlink_bps`` (server→device; default: the uplink), ``latency_ms`` (one-way link latency;
default 0) and ``availability`` (``always``, or ``{on_s: S, off_s: S}``: on for ``on_s`` seconds,
then off for ``off_s``, repeating); a new profile may leave these three out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PACKAGED_PROFILES = "profiles.yaml"


@dataclass(frozen=True)
class DeviceProfile:
    """One device class. Rates are sustained figures, not peaks; see ``source``."""

    name: str
    compute_flops: float  # sustained FLOP/s for fp32 CNN work as PyTorch runs it there
    uplink_bps: float  # effective device→server throughput, bits/s
    memory_bytes: int
    cores: int
    source: str  # where the numbers come from, and what was assumed
    downlink_bps: float | None = None  # server→device throughput, bits/s; None: as the uplink
    latency_ms: float = 0.0  # one-way link latency, milliseconds
    availability: Availability | None = None  # None: always on
    agent_memory_bytes: int | None = None
    """Optional: the memory an agent may use on this class (what the OS leaves of ``memory_bytes``);
    unset, the whole of ``memory_bytes`` (``testbed.footprint`` compares the agent's measured peak)."""

    @property
    def downlink(self) -> float:
        """Server→device bits/s (the uplink's figure when the profile gives none)."""
        return self.uplink_bps if self.downlink_bps is None else self.downlink_bps


@dataclass(frozen=True)
class Availability:
    """On/off periods of a device class: on for ``on_s`` seconds, then off for ``off_s``, repeating
    (from the moment the device starts)."""

    on_s: float
    off_s: float

    def is_on(self, elapsed_s: float) -> bool:
        """Whether a device that started ``elapsed_s`` seconds ago is on."""
        return elapsed_s % (self.on_s + self.off_s) < self.on_s


_FIELDS = tuple(f.name for f in fields(DeviceProfile) if f.name != "name")
_REQUIRED = ("compute_flops", "uplink_bps", "memory_bytes", "cores", "source")
_FLOAT_FIELDS = ("compute_flops", "uplink_bps", "downlink_bps")
_INT_FIELDS = ("memory_bytes", "cores", "agent_memory_bytes")


class ProfileError(ValueError):
    """A profile file or entry is invalid; the message names the profile and the field."""


class UnknownProfileError(KeyError):
    """No profile has the requested name; the message lists the available ones."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(f"unknown device profile {name!r}; available: {', '.join(available)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _as_number(value: Any) -> float | None:
    """``value`` as a finite float, or None. Numeric strings count: PyYAML reads ``3e9`` as one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _positive_float(profile: str, key: str, value: Any, where: str) -> float:
    number = _as_number(value)
    if number is None or number <= 0:
        raise ProfileError(
            f"profile {profile!r}: field {key!r} must be a positive number, got {value!r}{where}"
        )
    return number


def _positive_int(profile: str, key: str, value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value  # exact, however large
    number = _as_number(value)
    if number is None or number <= 0 or not number.is_integer():
        raise ProfileError(
            f"profile {profile!r}: field {key!r} must be a positive integer, got {value!r}{where}"
        )
    return int(number)


def _availability(profile: str, value: Any, where: str) -> Availability | None:
    if value == "always":
        return None
    if isinstance(value, Mapping) and set(value) == {"on_s", "off_s"}:
        return Availability(_positive_float(profile, "availability.on_s", value["on_s"], where),
                            _positive_float(profile, "availability.off_s", value["off_s"], where))
    raise ProfileError(f"profile {profile!r}: field 'availability' must be 'always' or a mapping "
                       f"{{on_s: SECONDS, off_s: SECONDS}}, got {value!r}{where}")


def _check_fields(profile: str, entry: Any, where: str) -> dict[str, Any]:
    """Validate one entry's fields (any subset); return them converted."""
    if not isinstance(entry, Mapping):
        raise ProfileError(f"profile {profile!r}: expected a mapping of fields, got {entry!r}{where}")
    unknown = [k for k in entry if k not in _FIELDS]
    if unknown:
        raise ProfileError(
            f"profile {profile!r}: unknown field {unknown[0]!r}{where}; allowed: {', '.join(_FIELDS)}"
        )
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _FLOAT_FIELDS:
            out[key] = _positive_float(profile, key, value, where)
        elif key in _INT_FIELDS:
            out[key] = _positive_int(profile, key, value, where)
        elif key == "latency_ms":
            number = _as_number(value)
            if number is None or number < 0:
                raise ProfileError(f"profile {profile!r}: field 'latency_ms' must be a number >= 0, got {value!r}"
                                   f"{where}")
            out[key] = number
        elif key == "availability":
            out[key] = _availability(profile, value, where)
        else:  # source
            if not isinstance(value, str) or not value.strip():
                raise ProfileError(f"profile {profile!r}: field 'source' must be a non-empty string{where}")
            out[key] = " ".join(value.split())
    return out


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"cannot parse profile YAML{where}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ProfileError(f"profile YAML{where} must be a mapping of profile name to fields")
    for name in data:
        if not isinstance(name, str) or not name:
            raise ProfileError(f"profile name {name!r}{where} must be a non-empty string")
    return dict(data)


def _merge(
    base: dict[str, DeviceProfile], data: Mapping[str, Any], where: str
) -> dict[str, DeviceProfile]:
    merged = dict(base)
    for name, entry in data.items():
        given = _check_fields(name, entry, where)
        if name in merged:  # partial override of an existing profile
            if "source" not in given:
                changed = ", ".join(k for k in _FIELDS if k in given)
                given["source"] = f"{merged[name].source} [{changed} overridden{where}]"
            merged[name] = replace(merged[name], **given)
        else:
            missing = [k for k in _REQUIRED if k not in given]
            if missing:
                raise ProfileError(
                    f"profile {name!r}: missing field {missing[0]!r}{where} "
                    f"(a new profile needs {', '.join(_REQUIRED)})"
                )
            merged[name] = DeviceProfile(name=name, **given)
    return merged


@lru_cache(maxsize=1)
def _packaged() -> dict[str, DeviceProfile]:
    text = resources.files("harmony").joinpath(PACKAGED_PROFILES).read_text(encoding="utf-8")
    return _merge({}, _parse(text, " (packaged profiles.yaml)"), " (packaged profiles.yaml)")


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """The shipped profiles, plus (if ``path`` is given) that file's additions and overrides.

    Raises :class:`ProfileError` naming the profile and field for any invalid value, and
    ``FileNotFoundError`` if ``path`` does not exist.
    """
    profiles = dict(_packaged())
    if path is None:
        return profiles
    where = f" (in {path})"
    return _merge(profiles, _parse(Path(path).read_text(encoding="utf-8"), where), where)


def get_profile(name: str, profiles: Mapping[str, DeviceProfile] | None = None) -> DeviceProfile:
    """The profile called ``name`` from ``profiles`` (default: the shipped ones).

    Raises :class:`UnknownProfileError` (a ``KeyError``) listing the available names.
    """
    table = _packaged() if profiles is None else profiles
    try:
        return table[name]
    except KeyError:
        raise UnknownProfileError(name, sorted(table)) from None


def _spelling_key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


def resolve_class(name: str, profiles: Mapping[str, DeviceProfile] | None = None) -> str:
    """The profile name a command-line class spelling means: the name itself, or the same letters
    and digits with hyphens/underscores anywhere (``pi-zero2`` → ``pi_zero_2``, ``jetson-nano`` →
    ``jetson_nano``). Raises :class:`UnknownProfileError` listing the names."""
    table = _packaged() if profiles is None else profiles
    if name in table:
        return name
    matches = [n for n in table if _spelling_key(n) == _spelling_key(name)]
    if len(matches) == 1:
        return matches[0]
    raise UnknownProfileError(name, sorted(table))
