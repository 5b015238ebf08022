"""`tinyseek info`: a model's architecture and parameter counts, from whatever names one: a model preset, a run
directory, a checkpoint or exported folder (its config.json), or a training preset or config file."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("info"), as the `tinyseek` dispatcher passes it."""
    parser = argparse.ArgumentParser(prog="tinyseek info", description="Print a model's architecture and parameter counts.")
    parser.add_argument(
        "config",
        help="a model preset (seed, deepseek-v3-tiny, llama-tiny, ...), a run directory, a config.json file or a folder "
        "holding one, or a training preset (cpu-quick, cpu-15min, ...) or config file",
    )
    args = parser.parse_args(argv[1:])
    # After parsing, so that --help and argument errors answer without torch or transformers.
    from tinyseek.report import format_parameter_report, meta_model, parameter_report

    config, source = model_config(args.config)
    model = meta_model(config)  # any size prints: nothing is allocated
    print(f"# {source}")
    print(model)
    print(format_parameter_report(parameter_report(model)))
    return 0


def model_config(spec: str):
    """The TinySeekConfig that `spec` names, and a line saying where it came from. A run directory gives its latest
    valid checkpoint's model; a training config gives the model it would train."""
    from tinyseek.config import PRESETS
    from tinyseek.errors import FileError
    from tinyseek.report import load_config as load_model_config
    from tinyseek.runs import checkpoint_root, latest_checkpoint
    from tinyseek.train.config import load_config as load_train_config, resolve_config_path

    path = Path(spec).expanduser()
    if spec in PRESETS:
        return load_model_config(spec), f"model preset {spec}"
    if path.is_dir() and checkpoint_root(path).is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise FileError(f"run directory {path} has no valid checkpoint yet; pass its config.yaml for the model "
                            "it trains")
        return load_model_config(str(checkpoint)), f"run directory {path}: {checkpoint.name}"
    if path.is_dir() or path.suffix == ".json":
        return load_model_config(spec), f"model config {path}"
    try:
        config_file = resolve_config_path(spec)
    except FileError as error:
        raise FileError(
            f"{spec!r} is neither a model preset ({', '.join(PRESETS)}), a run directory, a config.json nor a "
            f"training config ({error})"
        ) from None
    train_config = load_train_config(str(config_file), look_up_tokenizer=False)
    return train_config.build_model_config(), f"training config {config_file}: model {train_config.model}"
