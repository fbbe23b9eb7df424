"""Build-time check of an image: torch is exactly the version the project pins and has no CUDA.

Run by docker/Dockerfile.agent and docker/Dockerfile.server after ``pip install .[EXTRA]``; a
mismatch fails the build with what to change instead of shipping a CUDA (GB-sized) or an unpinned
torch. Usage: ``python check_torch.py EXTRA``.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

DISTRIBUTION = "harmony-testbed"


def pinned_torch(extra: str) -> str:
    """The exact version ``harmony-testbed[extra]`` pins torch to (``torch==X`` in its metadata)."""
    pins = []
    for requirement in importlib.metadata.requires(DISTRIBUTION) or []:
        spec, _, marker = requirement.partition(";")
        if marker and f'extra == "{extra}"' not in marker.replace("'", '"'):
            continue
        match = re.fullmatch(r"torch\s*==\s*([0-9][0-9A-Za-z.]*)", spec.strip())
        if match:
            pins.append(match.group(1))
    if not pins:
        raise SystemExit(f"{DISTRIBUTION}[{extra}] does not pin torch with '=='; pin it in pyproject.toml")
    return pins[-1]


def check(extra: str) -> str:
    """Raise ``SystemExit`` unless the installed torch is the pinned version built without CUDA."""
    import torch

    want = pinned_torch(extra)
    have = torch.__version__.split("+", 1)[0]
    if have != want:
        raise SystemExit(f"torch {torch.__version__} is installed but {DISTRIBUTION}[{extra}] pins {want}; "
                         f"build with --build-arg TORCH_REQUIREMENT=torch=={want}")
    if torch.version.cuda is not None:
        raise SystemExit(f"torch {torch.__version__} is a CUDA build ({torch.version.cuda}); pass a CPU-only "
                         "index with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    return torch.__version__


if __name__ == "__main__":
    print(f"torch {check(sys.argv[1] if len(sys.argv) > 1 else 'agent')}: pinned version, CPU only")
