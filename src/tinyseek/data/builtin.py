"""The corpus and tokenizer installed inside the package, so training works with no Hub and no downloads.

Users name them `builtin` (`--data builtin --tokenizer builtin`); the name always means these files, even when a
file or folder called `builtin` exists in the current directory.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN = "builtin"
BUILTIN_ROOT = Path(__file__).resolve().parents[1] / "builtin"
BUILTIN_CORPUS = BUILTIN_ROOT / "tinystories" / "tinystories_sample.jsonl.gz"
BUILTIN_TOKENIZER = BUILTIN_ROOT / "deepseek-coder"
BUILTIN_DESCRIPTION = "the built-in TinyStories sample (2,316 stories) with the built-in DeepSeek-Coder tokenizer"


def is_builtin(spec) -> bool:
    return isinstance(spec, str) and spec == BUILTIN
