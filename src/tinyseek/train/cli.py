"""`tinyseek train` and `python train.py`: one program. A config file (a path, or a preset name under configs/),
then the named flags, then `--set KEY=VALUE` overrides in order."""

from __future__ import annotations

import argparse
from typing import get_args

from tinyseek.train.config import CheckpointingMode, DType, ParallelStrategy

# Flag name -> the config key it sets.
FLAG_KEYS = {
    "data": "data.source",
    "tokenizer": "data.tokenizer",
    "out_dir": "out_dir",
    "stages": "stages",
    "init_from": "init_from",
    "conversations": "sft.conversations",
    "checkpoint_every": "checkpoint.every",
    "keep": "checkpoint.keep",
    "seed": "seed",
    "device": "device",
    "dtype": "dtype",
    "compile": "compile",
    "gradient_checkpointing": "gradient_checkpointing",
    "parallel": "parallel",
    "tensorboard": "logging.tensorboard",
    "peak_flops": "logging.peak_flops",
}
# Flags that set every stage's own key: a run of several stages takes each one's steps or budget from them.
STAGE_FLAG_KEYS = {"max_steps": ("max_steps", "sft.max_steps"), "time_budget": ("time_budget", "sft.time_budget")}


def stage_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyseek train",
        description="Train a TinySeek model. A run resumes by itself from the latest valid checkpoint in --out-dir.",
    )
    parser.add_argument("--config", default="seed", help="YAML/TOML file or preset name in configs/ (default: seed)")
    parser.add_argument("--data", help="Hub dataset name, local file(s)/directory, or a `tinyseek prepare` directory")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json")
    parser.add_argument("--out-dir", help="run directory: checkpoints, metrics.jsonl, train.log, config.yaml")
    parser.add_argument(
        "--stage", dest="stages", type=stage_names, metavar="NAME[,NAME]",
        help="pretrain (default), sft (chat fine-tuning on conversations, from --init-from), or pretrain,sft",
    )
    parser.add_argument("--init-from", metavar="PATH",
                        help="start from these weights: a pre-training run directory, a checkpoint or an exported model")
    parser.add_argument("--conversations", metavar="SPEC",
                        help="chat data for --stage sft: builtin-chat (default), local JSONL/Parquet, or a Hub dataset")
    parser.add_argument("--max-steps", type=int,
                        help="optimizer steps of each stage (raise it to continue a finished run)")
    parser.add_argument(
        "--time-budget", metavar="DURATION",
        help="train each stage for a wall-clock budget (15m, 90s, 1h30m): max_steps is fixed from the first steps' "
             "speed",
    )
    parser.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N optimizer steps")
    parser.add_argument("--keep", type=int, help="how many of the latest checkpoints to keep")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps, or auto (default)")
    parser.add_argument("--dtype", choices=get_args(DType), help="training precision")
    parser.add_argument("--parallel", choices=get_args(ParallelStrategy), help="data parallelism under torchrun (default ddp)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each decoder layer for training (eager if no compiler works)")
    parser.add_argument("--gradient-checkpointing", choices=get_args(CheckpointingMode),
                        help="recompute activations in the backward pass: none, full, or selective (cheap ops only)")
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU (default: measured)")
    parser.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
        help="override any config field, e.g. --set model.hidden_size=256 --set optim.lr=3e-4",
    )
    return parser


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("train"), as the `tinyseek` dispatcher passes it."""
    args = build_parser().parse_args(argv[1:])
    from tinyseek.train.config import load_config, parse_assignment

    overrides = [
        (key.split("."), getattr(args, flag)) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None
    ]
    overrides += [(key.split("."), getattr(args, flag)) for flag, keys in STAGE_FLAG_KEYS.items()
                  if getattr(args, flag) is not None for key in keys]
    overrides += [parse_assignment(assignment) for assignment in args.assignments]
    config = load_config(args.config, overrides)

    # torch and the model load only once the config is known to be good
    from tinyseek.train.stages import stage_runs
    from tinyseek.train.trainer import Trainer

    for settings, stage in stage_runs(config):
        status = Trainer(settings, stage).train()
        if status != 0:
            return status
    return 0

