"""`tinyseek COMMAND ...`: one entry point that hands each command to the module that owns it.

Commands are imported lazily so that `tinyseek info` does not pay for the trainer's imports, and each component
keeps its own argument parser next to its code. A command module imports torch, transformers and datasets only
once its arguments parse, so `--help` and argument errors answer at once (tests/test_offline.py checks this).
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import version

from tinyseek.errors import TinySeekError

COMMANDS = {
    "info": ("tinyseek.info", "print a preset's or config file's architecture and parameter report"),
    "prepare": ("tinyseek.data.cli", "tokenize a corpus into training-ready token files"),
    "tokenizer": ("tinyseek.data.cli", "train a byte-level BPE tokenizer (`tinyseek tokenizer train ...`)"),
    "train": ("tinyseek.train.cli", "train a model (the same program as `python train.py`)"),
    "plot": ("tinyseek.train.plot", "plot a run's training and validation loss"),
    "generate": ("tinyseek.generate.cli", "continue a prompt with a trained model"),
    "chat": ("tinyseek.chat", "talk to a chat-trained model in the terminal"),
    "export": ("tinyseek.generate.export", "write a Hugging Face folder or a GGUF file from a run or model"),
    "serve": ("tinyseek.serve.cli", "serve a model over OpenAI's API, with a playground page"),
    "route": ("tinyseek.route", "draw which expert each token of a text is routed to, as a PNG"),
}


def usage() -> str:
    lines = ["usage: tinyseek COMMAND [options]", "       tinyseek --version", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"tinyseek {version('tinyseek')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tinyseek: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main([command, *rest]) or 0
    except TinySeekError as error:
        print(f"tinyseek {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinyseek {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
