"""The one way to get a trained model and its tokenizer back: from a run directory (its latest valid checkpoint), a
checkpoint, a tinyseek model folder or a `--format transformers` export. Generation, export, serving and the
benchmarks all load through here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tinyseek.errors import FileError, InputError

if TYPE_CHECKING:
    import torch


def resolve_checkpoint(path_or_run_dir: str | Path) -> Path:
    """A checkpoint directory, the latest valid checkpoint of a run directory, or a model folder as it is."""
    from tinyseek.runs import STEP_DIR, TRAINER_STATE, checkpoint_problem, checkpoint_root, latest_checkpoint

    path = Path(path_or_run_dir)
    if not path.exists():
        raise FileError(f"{path}: no such file or directory")
    if (path / TRAINER_STATE).exists() or STEP_DIR.match(path.name):
        problem = checkpoint_problem(path)
        if problem:
            raise FileError(f"checkpoint {path} is unusable: {problem}")
        return path
    if checkpoint_root(path).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileError(f"run {path} has no valid checkpoint under {checkpoint_root(path)}")
        return latest
    if (path / "config.json").is_file():
        return path
    raise FileError(f"{path} is neither a checkpoint, a run directory, nor a Hugging Face model folder")


def load_model_and_tokenizer(
    path_or_run_dir: str | Path, device: str | torch.device | None = None, *, tokenizer_required: bool = True
):
    """(model in eval mode, tokenizer) from a run directory, a checkpoint, or an exported folder of either format.
    A folder without tokenizer files gives tokenizer None, or an InputError when `tokenizer_required`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyseek import TinySeekForCausalLM
    from tinyseek.data.chat import is_chat_trained, mark_chat_trained
    from tinyseek.hf import TWINS, from_transformers
    from tinyseek.runs import TOKENIZER_FILES, has_tokenizer

    folder = resolve_checkpoint(path_or_run_dir)
    if tokenizer_required and not has_tokenizer(folder):
        raise InputError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy a tokenizer in")
    try:
        if model_type(folder) in TWINS:  # a `--format transformers` export
            # Converted back to tinyseek, whose cache decodes MLA from the latent.
            exported = AutoModelForCausalLM.from_pretrained(folder)
            model = from_transformers(exported)
            if is_chat_trained(exported.config):
                mark_chat_trained(model.config)
        else:
            model = TinySeekForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
    except (OSError, ValueError) as error:
        raise FileError(f"cannot load {folder}: {error}") from None
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a training run: its latest valid checkpoint is used")
    source.add_argument("--model", type=Path, help="a checkpoint or an exported folder (tinyseek or transformers format)")


def load_from_arguments(
    args: argparse.Namespace, device: str | torch.device | None = None, *, tokenizer_required: bool = True
):
    """(model in eval mode, tokenizer) from a command's ``--run-dir`` or ``--model``."""
    # Here, not at the top: the commands' parsers (add_source_arguments) answer --help without torch.
    from transformers.utils.logging import disable_progress_bar

    # A command's stderr carries its own messages; transformers' weight-loading bar would bury them.
    disable_progress_bar()
    if args.run_dir is not None and not args.run_dir.is_dir():
        raise FileError(f"run directory {args.run_dir} does not exist")
    source = args.run_dir if args.run_dir is not None else args.model
    return load_model_and_tokenizer(source, device, tokenizer_required=tokenizer_required)
