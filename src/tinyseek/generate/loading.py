"""Where `tinyseek generate` and `tinyseek export` get a model: a run's latest checkpoint or a model folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tinyseek.errors import InputError, UserError

if TYPE_CHECKING:
    import torch

TRANSFORMERS_TWIN_TYPES = ("deepseek_v3", "llama")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a training run: its latest valid checkpoint is used")
    source.add_argument("--model", type=Path, help="a checkpoint or an exported folder (tinyseek or transformers format)")


def load(args: argparse.Namespace, device: str | torch.device | None = None, *, tokenizer_required: bool = True):
    """(model in eval mode, tokenizer) from ``--run-dir`` or ``--model``; the tokenizer is None for a model folder
    without one unless `tokenizer_required` (then that is an InputError)."""
    # Here, not at the top: the commands' parsers (add_source_arguments) answer --help without torch.
    from transformers.utils.logging import disable_progress_bar

    from tinyseek.train.checkpoint import has_tokenizer, latest_checkpoint, load_model_and_tokenizer

    # A command's stderr carries its own messages; transformers' weight-loading bar would bury them.
    disable_progress_bar()
    if args.run_dir is not None:
        if not args.run_dir.is_dir():
            raise UserError(f"run directory {args.run_dir} does not exist")
        checkpoint = latest_checkpoint(args.run_dir)
        if checkpoint is None:
            raise UserError(f"run directory {args.run_dir} has no valid checkpoint under {args.run_dir / 'checkpoints'}")
        return load_model_and_tokenizer(checkpoint, device, tokenizer_required=tokenizer_required)
    if model_type(args.model) in TRANSFORMERS_TWIN_TYPES:
        if tokenizer_required and not has_tokenizer(args.model):
            raise InputError(f"{args.model} has no tokenizer files; copy a tokenizer in")
        return load_transformers_twin(args.model, device)
    return load_model_and_tokenizer(args.model, device, tokenizer_required=tokenizer_required)


def model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def load_transformers_twin(folder: Path, device):
    """A `--format transformers` export, converted back to tinyseek (whose cache decodes MLA from the latent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyseek.hf import from_transformers
    from tinyseek.train.checkpoint import has_tokenizer

    try:
        model = from_transformers(AutoModelForCausalLM.from_pretrained(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load {folder}: {error}") from None
    return model.to(device or "cpu").eval(), tokenizer
