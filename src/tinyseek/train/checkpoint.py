"""Checkpoints: atomic, verifiable, and loaded without unpickling arbitrary objects.

Layout of one checkpoint, RUN_DIR/checkpoints/step_XXXXXXXX/:
    config.json, model.safetensors     the Hugging Face `save_pretrained` folder (MoE biases are buffers in it)
    tokenizer files                    `tokenizer.save_pretrained`, so AutoTokenizer.from_pretrained(dir) works
    optimizer.pt                       optimizer, scheduler and grad-scaler state (torch.load(weights_only=True))
    trainer_state.json                 step, tokens, sampler and RNG state, tokenizer identity, resolved config,
                                       and a manifest (size and sha256 of every other file)

A checkpoint is written into a hidden temporary directory, fsynced, and renamed into place, so a crash at any
instant leaves either the old set of checkpoints or the new one. trainer_state.json is written last and carries the
manifest, so a checkpoint whose files were truncated or altered afterwards is detected and skipped.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from tinyseek import distributed, faults
from tinyseek.durable import fsync_path, fsync_tree
from tinyseek.config import TinySeekConfig
from tinyseek.errors import FileError
# Reading a run directory needs no trainer (tinyseek.loading reads it too), so it lives in tinyseek.runs; its names
# stay importable from here, where the trainer and the tools find them.
from tinyseek.runs import (  # noqa: F401
    CHECKPOINTS,
    OPTIMIZER_STATE,
    STEP_DIR,
    TOKENIZER_FILES,
    TRAINER_STATE,
    WEIGHTS,
    checkpoint_problem,
    checkpoint_root,
    file_digest,
    has_tokenizer,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    valid_checkpoints,
)

# The special-token ids follow the tokenizer, which is checked on its own; the training knobs may change on resume;
# every other field shapes the network or the function it computes.
ARCHITECTURE_FIELDS = sorted(
    set(inspect.signature(TinySeekConfig.__init__).parameters)
    - {"self", "kwargs", "bos_token_id", "eos_token_id", "pad_token_id"}
    - set(TinySeekConfig.TRAINING_KNOBS)
)

log = logging.getLogger("tinyseek.train")


class CheckpointWriteError(FileError):
    """A checkpoint could not be written (disk full, I/O error); the earlier checkpoints are intact."""


def check_writable(run_dir: Path) -> None:
    """Fail before any work when the run directory (or, before it exists, the folder it would be made in) cannot
    take new files. Creating one is the only test that also holds for root, whom permission bits do not stop."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        faults.point("run_dir.write")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise FileError(
            f"run directory {run_dir} is not writable ({error.strerror or error}); choose another --out-dir"
        ) from None


@contextmanager
def quiet_progress_bars():
    """transformers draws a progress bar per save; between the trainer's own bar and log lines it is noise."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` valid checkpoints.

    `model_state`, when given, is the full state dict gathered from a data-parallel run, which `model` (the unwrapped
    model) saves in its own format."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    staging = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        faults.point("checkpoint.staging")
        with quiet_progress_bars():
            model.save_pretrained(staging, state_dict=model_state)
        tokenizer.save_pretrained(staging)
        faults.point("checkpoint.weights")
        torch.save(optimizer_state, staging / OPTIMIZER_STATE)
        faults.point("checkpoint.optimizer")
        manifest = {
            str(path.relative_to(staging)): {"bytes": path.stat().st_size, "sha256": file_digest(path)}
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        with open(staging / TRAINER_STATE, "w") as handle:
            json.dump({**trainer_state, "manifest": manifest}, handle, indent=1)
        fsync_tree(staging)
        faults.point("checkpoint.state")
        if final.exists():
            # An older attempt at this step (e.g. a corrupt one that was skipped): move it aside, never half-replace.
            displaced = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, displaced)
            os.replace(staging, final)
            shutil.rmtree(displaced)
        else:
            os.replace(staging, final)
        fsync_path(root)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)  # a partial write is never trusted; this only frees its space
        earlier = latest_checkpoint(run_dir, report=lambda path, problem: None)
        raise CheckpointWriteError(
            f"cannot write checkpoint {final} ({error.strerror or error}); "
            + (f"the last checkpoint, {earlier.name}, is intact" if earlier else "there is no earlier checkpoint")
        ) from None
    faults.point("checkpoint.renamed")
    prune_checkpoints(run_dir, keep, newest=final)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int, newest: Path) -> None:
    """Keep the `keep` newest valid checkpoints up to `newest`; delete older ones. Newer ones (left by a run that
    fell back past a corrupt checkpoint) are overwritten when training reaches their step."""
    older = [path for path in list_checkpoints(run_dir) if path.name <= newest.name]
    kept = 0
    for checkpoint in reversed(older):
        if kept < keep and (checkpoint == newest or checkpoint_problem(checkpoint) is None):
            kept += 1
        else:
            shutil.rmtree(checkpoint)


def remove_stale_staging(run_dir: str | Path) -> None:
    """Delete temporary directories left by a process killed while saving."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in root.glob(".old-step_*"):
            shutil.rmtree(path, ignore_errors=True)


def config_differences(saved: dict[str, Any], current: TinySeekConfig, fields) -> list[str]:
    """`field: checkpoint has X, this run has Y` for every one of `fields` that differs."""
    saved_config = TinySeekConfig.from_dict(saved)
    return [
        f"{name}: checkpoint has {getattr(saved_config, name)!r}, this run has {getattr(current, name)!r}"
        for name in fields
        if getattr(saved_config, name) != getattr(current, name)
    ]


def load_training_state(model: torch.nn.Module, optimizer, checkpoint: Path, optimizer_state: dict[str, Any]) -> None:
    """Load model.safetensors and the optimizer state into a plain or data-parallel model, strictly. Tied weights are
    saved once; their other name is filled in from the saved one."""
    weights = load_file(checkpoint / WEIGHTS)
    for tied, source in getattr(model, "_tied_weights_keys", {}).items():
        if model.config.tie_word_embeddings and tied not in weights and source in weights:
            weights[tied] = weights[source]
    try:
        distributed.load_full_state(model, optimizer, weights, optimizer_state)
    except (RuntimeError, KeyError, ValueError) as error:
        raise FileError(f"checkpoint {checkpoint}: its state does not fit the model ({error})") from None


def load_optimizer_state(checkpoint: Path) -> dict[str, Any]:
    """The optimizer, scheduler and scaler state, read as tensors and plain data only: a file that holds anything
    else (a pickle that would run code) is refused before any of it runs, even when the manifest matches it."""
    path = checkpoint / OPTIMIZER_STATE
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or "not tensors"
        raise FileError(f"{path} holds more than tensors and plain data ({reason}); refused without running it") from None
    except (RuntimeError, EOFError) as error:
        raise FileError(f"{path} is not a readable optimizer state ({str(error).splitlines()[0]})") from None
