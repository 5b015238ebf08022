"""What the benchmarks' `--compare-ref REV` share: REV's tree in a temporary git worktree, and worker processes that
import one tree's `src/` and answer one line per request, so that trees take turns on the same machine."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def git_worktree(revision: str, scratch: Path):
    """The tree of `revision` checked out in a temporary git worktree, removed afterwards."""
    path = scratch / "ref-tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(path), revision], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


class TreeWorker:
    """`script --worker-flag SPEC` in a child process with PYTHONPATH at `tree`/src; one request line in, one answer
    line out."""

    def __init__(self, label: str, tree: Path, script: Path, worker_flag: str, spec: dict, env: dict | None = None):
        self.label = label
        self.process = subprocess.Popen(
            [sys.executable, str(script), worker_flag, json.dumps(spec)],
            env={**os.environ, **(env or {}), "PYTHONPATH": str(tree / "src")}, cwd=tree,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def read(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker ended (exit {self.process.wait()}); its output is above")
        return line.strip()

    def ask(self, command: str) -> float:
        self.process.stdin.write(command + "\n")
        return float(self.read())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
