"""A run directory's checkpoints as they are read: where they are, whether each one's files match its manifest, and
the latest valid one. Loading a model for generation or serving needs this and nothing of the trainer, which writes
checkpoints (tinyseek.train.checkpoint describes their layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
WEIGHTS = "model.safetensors"
STEP_DIR = re.compile(r"^step_(\d{8,})$")

log = logging.getLogger("tinyseek.train")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first, valid or not (temporary directories are not listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and STEP_DIR.match(path.name)]
    return sorted(found, key=lambda path: int(STEP_DIR.match(path.name).group(1)))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    with open(Path(checkpoint) / TRAINER_STATE) as handle:
        return json.load(handle)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` is unusable, or None when every file matches its manifest."""
    try:
        state = read_trainer_state(checkpoint)
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing (the write was interrupted)"
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE} is unreadable ({error})"
    manifest = state.get("manifest")
    if not isinstance(manifest, dict) or WEIGHTS not in manifest or OPTIMIZER_STATE not in manifest:
        return f"{TRAINER_STATE} has no manifest of the checkpoint's files"
    for name, expected in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if file_digest(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def valid_checkpoints(run_dir: str | Path, report: Callable[[Path, str], None] | None = None) -> Iterator[Path]:
    """The run's checkpoints whose files match their manifest, newest first. Invalid ones are passed to `report`
    (default: a warning on the `tinyseek.train` logger) and skipped."""
    report = report or (lambda path, problem: log.warning("skipping checkpoint %s: %s", path, problem))
    for checkpoint in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            yield checkpoint
        else:
            report(checkpoint, problem)


def latest_checkpoint(
    run_dir: str | Path, report: Callable[[Path, str], None] | None = None
) -> Path | None:
    """The newest valid checkpoint of a run, or None (see `valid_checkpoints`)."""
    return next(valid_checkpoints(run_dir, report), None)


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder carries tokenizer files (a `save_pretrained` of the model alone does not)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)
