"""The trainer's checkpoint component: the run's progress counters, every random generator's state, the trainer
state a checkpoint carries, and finding the checkpoint a run resumes from (files on disk: train/checkpoint.py)."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyseek import TinySeekConfig
from tinyseek.errors import ConfigError, FileError
from tinyseek.train import checkpoint as ckpt
from tinyseek.train.metrics import log


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator's state as JSON (large integer arrays as base64 of their uint32 words)."""
    version, mt_words, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, encode_words(np.array(mt_words, dtype=np.uint32)), gauss],
        "numpy": [np_name, encode_words(np_keys), np_pos, np_has_gauss, np_gauss],
        "torch": encode_words(torch.get_rng_state().numpy()),
    }
    if device.type == "cuda":
        state["cuda"] = [encode_words(s.numpy()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, mt_words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in decode_words(mt_words, np.uint32)), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, decode_words(np_keys, np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(torch.from_numpy(decode_words(state["torch"], np.uint8)))
    if device.type == "cuda" and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.from_numpy(decode_words(s, np.uint8)) for s in state["cuda"]])


def encode_words(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def decode_words(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


@dataclass
class Progress:
    """How far the run is: what the loop advances and a checkpoint carries."""

    step: int = 0
    tokens: int = 0
    non_finite_steps: int = 0
    non_finite_in_a_row: int = 0
    train_seconds: float = 0.0

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        non_finite_steps, non_finite_in_a_row = state.get("non_finite_steps", [0, 0])
        return cls(state["step"], state["tokens"], non_finite_steps, non_finite_in_a_row,
                   state.get("train_seconds", 0.0))

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step, "tokens": self.tokens,
            "non_finite_steps": [self.non_finite_steps, self.non_finite_in_a_row], "train_seconds": self.train_seconds,
        }


@dataclass
class Resumable:
    """The checkpoint a run resumes from: its path, trainer state and optimizer-side blobs."""

    path: Path
    state: dict[str, Any]
    blobs: dict[str, Any]


@dataclass
class Checkpointer:
    run_dir: Path
    keep: int
    skipped: list[str] = field(default_factory=list)  # "name: problem" of every checkpoint passed over on resume
    changed_on_resume: list[str] = field(default_factory=list)  # the training knobs the resumed checkpoint had else

    def latest_usable(self) -> Resumable | None:
        """The latest checkpoint whose files match their manifest and whose optimizer state is only tensors; the
        ones passed over are logged and kept in `skipped`."""
        found = None
        for checkpoint in ckpt.valid_checkpoints(self.run_dir, report=self.note_skipped):
            try:
                found = Resumable(checkpoint, {}, ckpt.load_optimizer_state(checkpoint))
                break
            except FileError as error:
                self.note_skipped(checkpoint, str(error))
        for skipped in self.skipped:
            log.warning("skipping unusable checkpoint %s", skipped)
        if found is not None:
            found.state = ckpt.read_trainer_state(found.path)
        return found

    def note_skipped(self, checkpoint: Path, problem: str) -> None:
        self.skipped.append(f"{checkpoint.name}: {problem}")

    def check_fits(self, found: Resumable, model_config: TinySeekConfig, tokenizer_id: str) -> None:
        """Refuse a checkpoint of another architecture or tokenizer; note the training knobs that changed."""
        saved_architecture = json.loads((found.path / "config.json").read_text())
        differences = ckpt.config_differences(saved_architecture, model_config, ckpt.ARCHITECTURE_FIELDS)
        if differences:
            raise ConfigError(
                f"checkpoint {found.path} is a different architecture from this run's model ("
                + "; ".join(differences)
                + "); use another --out-dir or the checkpoint's configuration"
            )
        changed = ckpt.config_differences(saved_architecture, model_config, TinySeekConfig.TRAINING_KNOBS)
        if found.state["tokenizer"] != tokenizer_id:
            raise ConfigError(
                f"checkpoint {found.path} was trained with tokenizer {found.state['tokenizer']}, this run uses "
                f"{tokenizer_id}; use another --out-dir or the same tokenizer"
            )
        self.changed_on_resume = changed

    def describe_resume(self, resumed_from: Path | None, progress: Progress) -> list[str]:
        """The announcement's lines about the checkpoint the run resumed from (none for a new run)."""
        if resumed_from is None:
            return []
        lines = [f"resumed from {resumed_from} at step {progress.step} ({progress.tokens:,} tokens)"]
        if self.changed_on_resume:
            lines.append(f"model settings changed on resume: {'; '.join(self.changed_on_resume)}")
        return lines

    def save(self, step: int, model: torch.nn.Module, model_state: dict, tokenizer, blobs: dict[str, Any],
             trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` (the main process only; every rank gathered `model_state` and `blobs`)."""
        path = ckpt.save_checkpoint(self.run_dir, step, model, tokenizer, blobs, trainer_state, self.keep,
                                    model_state=model_state)
        log.info("saved checkpoint %s", path)
        return path
