"""The corpus and tokenizers installed inside the package, so training works with no Hub and no downloads, and the
choice between them and the seed's Hub defaults.

Users name them `builtin` (`--data builtin --tokenizer builtin`), and `builtin-tinystories-bpe` for the small BPE
made from the corpus; a name always means these files, even when a file or folder of that name exists in the current
directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tinyseek.errors import InputError

# The seed recipe's data and tokenizer, from the Hugging Face Hub; the built-in pair stands in for them without it.
DEFAULT_DATASET = "HuggingFaceTB/cosmopedia-100k"
DEFAULT_TOKENIZER = "deepseek-ai/deepseek-coder-1.3b-base"
BUILTIN = "builtin"
BUILTIN_ROOT = Path(__file__).resolve().parents[1] / "builtin"
BUILTIN_CORPUS = BUILTIN_ROOT / "tinystories" / "tinystories_sample.jsonl.gz"
# Conversations made from BUILTIN_CORPUS by `python -m tinyseek.data.instruct`; `--data builtin-chat` names them.
BUILTIN_INSTRUCT = BUILTIN_ROOT / "tinystories" / "tinystories_instruct.jsonl.gz"
BUILTIN_CHAT = "builtin-chat"
BUILTIN_TOKENIZER = BUILTIN_ROOT / "deepseek-coder"
# A 4,096-token byte-level BPE made from BUILTIN_CORPUS (less its held-out stories) by `tinyseek tokenizer train
# --data builtin --vocab-size 4096`, which rebuilds it byte for byte; `--tokenizer builtin-tinystories-bpe` names it.
# On those stories it needs fewer tokens per byte than DeepSeek-Coder's 32k vocabulary, with an LM head an eighth the
# size.
BUILTIN_STORIES_TOKENIZER_NAME = "builtin-tinystories-bpe"
BUILTIN_STORIES_TOKENIZER = BUILTIN_ROOT / "tinystories-bpe"
BUILTIN_TOKENIZERS = {BUILTIN: BUILTIN_TOKENIZER, BUILTIN_STORIES_TOKENIZER_NAME: BUILTIN_STORIES_TOKENIZER}


def is_builtin(spec) -> bool:
    return isinstance(spec, str) and spec == BUILTIN


def builtin_tokenizer(spec) -> Path | None:
    """The folder of the built-in tokenizer `spec` names, or None when it names none."""
    return BUILTIN_TOKENIZERS.get(spec) if isinstance(spec, str) else None


def is_builtin_corpus(file: Path) -> bool:
    return file.resolve() == BUILTIN_CORPUS


def without_held_out_stories(rows: Iterable[tuple[str, int, dict]]) -> Iterator[tuple[str, int, dict]]:
    """The built-in corpus's rows as training reads them: without the stories held out for measuring instruction
    following (`tinyseek.data.instruct.is_held_out_story`), which the chat data leaves out too, so that no model
    tinyseek trains on the built-in data has seen them."""
    from tinyseek.data.instruct import is_held_out_story  # which reads the corpus's path from here

    for where, number, row in rows:
        text = row.get("text")
        if not (isinstance(text, str) and is_held_out_story(text)):
            yield where, number, row


@dataclass(frozen=True)
class Sources:
    data: str
    tokenizer: str
    note: str | None
    """One line for the user when a default fell back to the built-in files or came from a run's pinned choice."""


def resolve_sources(data: str | None, tokenizer: str | None, pinned: dict | None = None) -> Sources:
    """The data and tokenizer a run uses. Given ones stay; a missing one is taken from `pinned` (what the run
    directory recorded on its first start), else the seed's Hub default where the Hub or the local Hugging Face
    cache can serve it, else the built-in one."""
    pinned = {key: value for key, value in (pinned or {}).items() if value is not None}
    for name, given in (("data", data), ("tokenizer", tokenizer)):
        if given is not None and name in pinned and not same_source(given, pinned[name]):
            raise InputError(
                f"this run directory was started with --{name} {pinned[name]}, not {given}: resume it without "
                f"--{name}, or pass --out-dir for a new run"
            )
    if (data is None and "data" in pinned) or (tokenizer is None and "tokenizer" in pinned):
        data = data if data is not None else pinned.get("data")
        tokenizer = tokenizer if tokenizer is not None else pinned.get("tokenizer")
        note = f"resuming with the run's pinned data {data or DEFAULT_DATASET} and tokenizer {tokenizer or DEFAULT_TOKENIZER}"
        return Sources(data or DEFAULT_DATASET, tokenizer or DEFAULT_TOKENIZER, note)
    fallen_back = []
    if data is None:
        data = DEFAULT_DATASET if _hub_serves(DEFAULT_DATASET, "dataset") else BUILTIN
        if data == BUILTIN:
            fallen_back.append(("the built-in TinyStories sample", "--data"))
    if tokenizer is None:
        tokenizer = DEFAULT_TOKENIZER if _hub_serves(DEFAULT_TOKENIZER, "model") else BUILTIN
        if tokenizer == BUILTIN:
            fallen_back.append(("the built-in DeepSeek-Coder tokenizer", "--tokenizer"))
    if not fallen_back:
        return Sources(data, tokenizer, None)
    from huggingface_hub import constants

    why = "Hub offline (HF_HUB_OFFLINE=1) and not in the local cache" if constants.HF_HUB_OFFLINE else "Hub unreachable"
    what = " with ".join(name for name, _ in fallen_back)
    flags = "/".join(flag for _, flag in fallen_back)
    return Sources(data, tokenizer, f"{why}: training on {what}; pass {flags} for your own")


def same_source(first: str, second: str) -> bool:
    """The same name, or two spellings of one local path."""
    return first == second or (Path(first).exists() and Path(first).resolve() == Path(second).resolve())


def _hub_serves(repo_id: str, repo_type: str) -> bool:
    """Whether loading `repo_id` will work: the Hub answers, or offline mode makes the local cache serve it."""
    from huggingface_hub import constants

    from tinyseek.data.hub import hub_answers

    if not constants.HF_HUB_OFFLINE:
        return hub_answers()
    cached = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if repo_type == "dataset":
        # `datasets` also keeps its own prepared copy, which it uses offline even without the Hub's files.
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
        if (datasets_cache / repo_id.replace("/", "___")).is_dir():
            return True
    return cached.is_dir() and any(cached.iterdir())
