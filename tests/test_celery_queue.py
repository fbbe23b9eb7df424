"""One name for the Celery queue: every Python file that routes tasks to it or starts a worker on it
uses ``server.app.QUEUE`` rather than spelling the string again (docker/compose.yaml, which cannot
import it, is checked against it in test_docker_files.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from server.app import QUEUE

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "runs", "build", "dist", ".git"}
QUEUE_KEYWORDS = {"task_default_queue", "queue", "queues", "task_default_routing_key"}

def queue_literals(source: str) -> list[int]:
    """Lines where ``source`` names the queue by a literal: ``task_default_queue="…"`` (or ``queue=``,
    ``queues=[…]``, the same keys in a dict) and ``"-Q", "…"`` / ``"--queues", "…"`` in an argv list."""

    def is_queue(node: ast.AST | None) -> bool:
        if isinstance(node, ast.Constant):
            return node.value == QUEUE
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return any(is_queue(e) for e in node.elts)
        return False

    lines: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg in QUEUE_KEYWORDS and is_queue(node.value):
            lines.append(node.value.lineno)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in QUEUE_KEYWORDS and is_queue(value):
                    lines.append(value.lineno)
        elif isinstance(node, (ast.List, ast.Tuple)):
            for flag, value in zip(node.elts, node.elts[1:], strict=False):
                if isinstance(flag, ast.Constant) and flag.value in ("-Q", "--queues") and is_queue(value):
                    lines.append(value.lineno)
    return sorted(lines)


def _project_files() -> list[str]:
    files = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if not SKIP_DIRS & set(rel.parts) and not any(p.endswith(".egg-info") for p in rel.parts):
            files.append(rel.as_posix())
    return sorted(files)


def test_the_scan_finds_each_spelling() -> None:
    q = repr(QUEUE)
    source = (f"app.conf.update(task_default_queue={q})\n"
              f"argv = ['celery', 'worker', '-Q', {q}]\n"
              f"conf = {{'task_default_queue': {q}}}\n"
              f"t.apply_async(queue={q})\n"
              f"w = ('--queues', {q})\n"
              "ok = dict(task_default_queue=QUEUE, queue='other'); argv2 = ['-Q', QUEUE]\n"
              f"Celery({q}, broker=url)\n")  # the app's main name, not the queue
    assert queue_literals(source) == [1, 2, 3, 4, 5]


def test_no_file_spells_the_queue() -> None:
    found = {rel: lines for rel in _project_files() if (lines := queue_literals((ROOT / rel).read_text()))}
    assert not found, f"these name the Celery queue {QUEUE!r} (file: lines); use server.app.QUEUE: {found}"
