"""Starting a run from saved weights (`init_from`) instead of a random initialisation: a pre-training run that a chat
stage fine-tunes, or any checkpoint or exported model (either export format) that training continues."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyseek import TinySeekConfig
from tinyseek.data import tokenizer_identity
from tinyseek.loading import load_model_and_tokenizer, resolve_checkpoint
from tinyseek.runs import TRAINER_STATE, read_trainer_state
from tinyseek.train.checkpoint import quiet_progress_bars
from tinyseek.train.config import TrainConfig, model_section


@dataclass
class InitialModel:
    folder: Path  # the checkpoint or model folder the weights come from
    config: TinySeekConfig
    weights: dict[str, torch.Tensor]
    tokenizer_id: str


def load_initial_model(config: TrainConfig) -> InitialModel:
    """The model at config.init_from. A training checkpoint's (a run directory's latest) data and tokenizer become
    config.data's where it names none, and config.model becomes the saved architecture (so the run's config.yaml
    says what it trains)."""
    folder = resolve_checkpoint(Path(config.init_from).expanduser())
    state = read_trainer_state(folder) if (folder / TRAINER_STATE).is_file() else {}
    config.data.source = config.data.source or state.get("config", {}).get("data", {}).get("source")
    config.data.tokenizer = config.data.tokenizer or state.get("tokenizer_spec") or str(folder)
    with quiet_progress_bars():
        model, tokenizer = load_model_and_tokenizer(folder)
    saved = json.loads(model.config.to_json_string(use_diff=False))  # plain values, as config.yaml holds them
    config.model = {"preset": None, **{name: saved[name] for name in model_section().model_fields if name in saved}}
    # A checkpoint records the identity of the tokenizer its run named (a saved copy may serialise differently).
    identity = state.get("tokenizer") or tokenizer_identity(tokenizer)
    return InitialModel(folder, model.config, model.state_dict(), identity)
