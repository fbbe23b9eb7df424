"""Build-time check of an image: torch is a version the project's extra accepts and has no CUDA.

Run by docker/Dockerfile.agent and docker/Dockerfile.server after ``pip install .[EXTRA]``; a
mismatch fails the build with what to change instead of shipping a CUDA (GB-sized) or an unpinned
torch. Usage: ``python check_torch.py EXTRA``.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

DISTRIBUTION = "harmony-testbed"


def torch_specifiers(extra: str) -> list[tuple[str, str]]:
    """The ``(operator, version)`` pairs ``harmony-testbed[extra]`` bounds torch by (``torch==X`` on the
    server, a range such as ``torch>=2.8,<2.14`` for the agent)."""
    found: list[tuple[str, str]] = []
    for requirement in importlib.metadata.requires(DISTRIBUTION) or []:
        spec, _, marker = requirement.partition(";")
        if marker and f'extra == "{extra}"' not in marker.replace("'", '"'):
            continue
        match = re.fullmatch(r"torch\s*((?:[<>=!]=?\s*[0-9][0-9A-Za-z.]*\s*,?\s*)+)", spec.strip())
        if match:
            found = re.findall(r"([<>=!]=?)\s*([0-9][0-9A-Za-z.]*)", match.group(1))
    if not found:
        raise SystemExit(f"{DISTRIBUTION}[{extra}] does not bound torch; give it a version in pyproject.toml")
    return found


def pinned_torch(extra: str) -> str:
    """The exact version ``harmony-testbed[extra]`` pins torch to (``torch==X``); exits if it gives a range."""
    specs = torch_specifiers(extra)
    if len(specs) != 1 or specs[0][0] != "==":
        raise SystemExit(f"{DISTRIBUTION}[{extra}] does not pin torch with '=='; pin it in pyproject.toml")
    return specs[0][1]


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+", 1)[0])[:3])


def accepts(specs: list[tuple[str, str]], version: str) -> bool:
    """Whether ``version`` (local label ignored) meets every ``(operator, version)`` of ``specs``."""
    have = _release(version)
    ops = {"==": have.__eq__, "!=": have.__ne__, ">=": have.__ge__, "<=": have.__le__, ">": have.__gt__,
           "<": have.__lt__}
    return all(ops[op](_release(want)) for op, want in specs)


def check(extra: str) -> str:
    """Raise ``SystemExit`` unless the installed torch meets the extra's bounds and was built without CUDA."""
    import torch

    specs = torch_specifiers(extra)
    wanted = ",".join(op + v for op, v in specs)
    if not accepts(specs, torch.__version__):
        raise SystemExit(f"torch {torch.__version__} is installed but {DISTRIBUTION}[{extra}] wants torch{wanted}; "
                         f"build with --build-arg TORCH_REQUIREMENT=torch==VERSION within it")
    if torch.version.cuda is not None:
        raise SystemExit(f"torch {torch.__version__} is a CUDA build ({torch.version.cuda}); pass a CPU-only "
                         "index with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    return torch.__version__


if __name__ == "__main__":
    print(f"torch {check(sys.argv[1] if len(sys.argv) > 1 else 'agent')}: an accepted version, CPU only")
