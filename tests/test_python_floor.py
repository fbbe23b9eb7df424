"""``requires-python`` says what the code needs: the linters check against that same floor, and the
installable packages use no standard-library name newer than it.

Measured: every module of the six packages imports, and the agent, CLI and wire tests pass, on
CPython 3.10.13 (with pip's 3.10 picks: numpy 2.2, typer 0.29.1). ``tomllib`` (3.11) appears only in
tests/test_docker_files.py, behind ``pytest.importorskip``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harmony", "broker", "edge_agent", "server", "orchestrator", "testbed")

# Standard-library names by the version that added them (the ones code like this reaches for).
NEWER_STDLIB: dict[tuple[int, int], dict[str, set[str] | None]] = {
    (3, 11): {
        "tomllib": None, "wsgiref.types": None,  # None: the whole module is new
        "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "Required",
                   "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform", "get_overloads"},
        "enum": {"StrEnum", "ReprEnum", "EnumCheck", "verify", "member", "nonmember", "global_enum"},
        "datetime": {"UTC"}, "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner"},
        "hashlib": {"file_digest"}, "contextlib": {"chdir"}, "logging": {"getLevelNamesMapping"},
        "builtins": {"ExceptionGroup", "BaseExceptionGroup"},
    },
    (3, 12): {"typing": {"override", "TypeAliasType"}, "itertools": {"batched"}},
    (3, 13): {"warnings": {"deprecated"}, "copy": {"replace"}},
}


def _pyproject_value(section: str, key: str) -> str:
    """A string value of ``pyproject.toml`` (a regex: ``tomllib`` is 3.11+, and this test must run on 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    body = re.search(rf"^\[{re.escape(section)}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert body, f"pyproject.toml: no [{section}]"
    value = re.search(rf'^{re.escape(key)}\s*=\s*"([^"]*)"', body.group(1), re.M)
    assert value, f"pyproject.toml: no {key} in [{section}]"
    return value.group(1)


def python_floor() -> tuple[int, int]:
    spec = _pyproject_value("project", "requires-python")
    match = re.fullmatch(r">=\s*3\.(\d+)", spec)
    assert match, f"requires-python {spec!r}: expected '>=3.N'"
    return 3, int(match.group(1))


def newer_than(source: str, floor: tuple[int, int]) -> list[str]:
    """``line: name (version)`` for each use in ``source`` of a standard-library name newer than ``floor``."""
    new_modules: dict[str, tuple[int, int]] = {}
    new_names: dict[tuple[str, str], tuple[int, int]] = {}
    for version, modules in NEWER_STDLIB.items():
        for module, names in modules.items():
            if version <= floor:
                continue
            if names is None:
                new_modules[module] = version
            else:
                new_names.update({(module, name): version for name in names})
    found: list[str] = []

    def note(node: ast.stmt | ast.expr, name: str, version: tuple[int, int]) -> None:
        found.append(f"{node.lineno}: {name} ({version[0]}.{version[1]})")

    tree = ast.parse(source)
    imported: dict[str, str] = {}  # local name -> module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name] = alias.name
                if alias.name in new_modules:
                    note(node, alias.name, new_modules[alias.name])
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module in new_modules:
                note(node, node.module, new_modules[node.module])
            for alias in node.names:
                if (node.module, alias.name) in new_names:
                    note(node, f"{node.module}.{alias.name}", new_names[node.module, alias.name])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            key = (imported.get(node.value.id, ""), node.attr)
            if key in new_names:
                note(node, f"{key[0]}.{key[1]}", new_names[key])
        elif isinstance(node, ast.Name) and ("builtins", node.id) in new_names:
            note(node, node.id, new_names["builtins", node.id])
    return sorted(found)


def test_linters_check_against_the_declared_floor() -> None:
    major, minor = python_floor()
    assert _pyproject_value("tool.ruff", "target-version") == f"py{major}{minor}"
    assert _pyproject_value("tool.mypy", "python_version") == f"{major}.{minor}", (
        "mypy must type-check against requires-python's floor, or it accepts names that do not exist there")


def test_the_scan_finds_newer_names() -> None:
    source = ("import tomllib\nimport datetime\nfrom typing import Any, Self\nimport enum as e\n"
              "t = datetime.UTC\nclass C(e.StrEnum): pass\nraise ExceptionGroup('x', [])\n"
              "from itertools import batched\n")
    assert newer_than(source, (3, 10)) == sorted(["1: tomllib (3.11)", "3: typing.Self (3.11)",
                                                  "5: datetime.UTC (3.11)", "6: enum.StrEnum (3.11)",
                                                  "7: ExceptionGroup (3.11)", "8: itertools.batched (3.12)"])
    assert newer_than(source, (3, 11)) == ["8: itertools.batched (3.12)"]


def test_packages_use_nothing_newer_than_requires_python() -> None:
    floor = python_floor()
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if uses := newer_than(path.read_text(), floor):
                found[str(path.relative_to(ROOT))] = uses
    assert not found, (f"requires-python is >={floor[0]}.{floor[1]} but the packages use newer standard-library "
                       f"names: {found}; raise requires-python (and ruff/mypy targets) or avoid them")
