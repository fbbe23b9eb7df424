"""testbed/wheelhouse.py: what goes into a wheelhouse for another architecture, and bad arguments."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed import wheelhouse
from testbed.wheelhouse import (
    BASE_DEPS,
    EXTRA_DEPS,
    WheelhouseError,
    build_wheelhouse,
    platform_tags,
    torch_requirement,
    wheelhouse_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_extras_named_here_are_pyprojects_without_torch():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra, deps in EXTRA_DEPS.items():
        wanted = sorted(d for d in extras[extra] if not re.match(r"torch\b", d))
        assert sorted(deps) == wanted, f"wheelhouse.EXTRA_DEPS[{extra!r}] differs from pyproject.toml's extra"
    assert sorted(BASE_DEPS) == sorted(d for d in project["dependencies"] if not re.match(r"torch\b", d))


@pytest.mark.parametrize(("spec", "requirement"), [
    ("2.9.1", "torch==2.9.1"), (" torch==2.13.0+cpu", "torch==2.13.0+cpu"), (">=2.8,<2.10", "torch>=2.8,<2.10"),
    ("Torch>=2.8", "Torch>=2.8"),
])
def test_torch_spec_forms(spec, requirement):
    assert torch_requirement(spec) == requirement


@pytest.mark.parametrize("spec", ["", "latest", "numpy==2"])
def test_a_bad_torch_spec_is_named(spec):
    with pytest.raises(WheelhouseError, match="torch_spec"):
        torch_requirement(spec)


def test_platform_tags_cover_older_manylinux_down_to_2014():
    tags = platform_tags("aarch64", "2.31")
    assert tags[0] == "manylinux_2_31_aarch64" and "manylinux_2_28_aarch64" in tags
    assert tags[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert all(t.endswith("_aarch64") for t in tags)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"machine": "armv7l"}, "machine"), ({"glibc": "2.5"}, "glibc"), ({"extras": ("agnet",)}, "extras"),
    ({"python": "311"}, "python"),
])
def test_bad_arguments_are_refused_before_anything_is_made(tmp_path, kwargs, field, monkeypatch):
    calls = []
    monkeypatch.setattr(wheelhouse, "_pip", lambda args, what: calls.append(args))
    args = {"machine": "aarch64", "torch_spec": "2.9.1", **kwargs}
    with pytest.raises(WheelhouseError, match=field):
        build_wheelhouse(tmp_path / "wh", **args)
    assert calls == [] and not (tmp_path / "wh").exists()


def test_cache_dir_names_machine_python_torch_and_extras(monkeypatch, tmp_path):
    monkeypatch.setenv("HARMONY_CACHE", str(tmp_path))
    path = wheelhouse_dir(machine="aarch64", torch_spec="2.9.1", extras=("server", "agent"))
    assert path == tmp_path / "wheelhouse" / "aarch64-py3.11-torch2.9.1-agent+server"
    x86 = wheelhouse_dir(machine="x86_64", torch_spec="torch==2.13.0+cpu")
    assert x86.name == "x86_64-py3.11-torch2.13.0+cpu-agent"


def test_base_dependencies_are_pyprojects_without_torch():
    """Every extra installs the project's own dependencies too: an offline install needs their wheels."""
    import tomllib

    from testbed.wheelhouse import BASE_DEPS, BUILD_DEPS

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    wanted = sorted(d for d in project["project"]["dependencies"] if not d.startswith("torch"))
    assert sorted(BASE_DEPS) == wanted
    assert sorted(BUILD_DEPS) == sorted(project["build-system"]["requires"])
