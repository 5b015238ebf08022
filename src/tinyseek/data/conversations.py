"""Where conversations come from: chat data in the forms people publish it, read lazily and normalised to OpenAI's
`messages` form ([{"role": ..., "content": ...}, ...]).

Each row of a .jsonl, .jsonl.gz, .json or .parquet file (or of a Hub dataset, through `datasets`) is one
conversation, in any of these forms:

- OpenAI `messages`: [{"role": "system" | "user" | "assistant", "content": text}, ...] (HuggingFaceTB/smol-smoltalk);
- ShareGPT `conversations`: [{"from": "system" | "human" | "gpt", "value": text}, ...];
- a prompt/response pair: {"prompt": text, "response": text} ("completion" is accepted for "response").

`builtin-chat` names the instruction set installed with tinyseek (`tinyseek.data.instruct`). A row that is not a
usable conversation is an InputError of one line naming the file and row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tinyseek.data.builtin import BUILTIN_CHAT, BUILTIN_INSTRUCT
from tinyseek.data.chat import ROLES, SYSTEM_ROLES, render_chat
from tinyseek.data.sources import open_source
from tinyseek.errors import InputError

SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
}
PROMPT_KEY = "prompt"
RESPONSE_KEYS = ("response", "completion")
FORMS_HINT = "expected a 'messages' list (OpenAI), a 'conversations' list (ShareGPT) or 'prompt' and 'response'"


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]  # OpenAI form, roles among tinyseek.data.chat.ROLES
    where: str  # the file or Hub dataset and split
    row: int  # 1-based; in a .jsonl file, the line
    ids: list[int] | None = None  # rendered with the chat template, when read with a tokenizer


def read_conversations(
    spec: str | Path | Sequence[str | Path],
    *,
    split: str = "train",
    streaming: bool = False,
    tokenizer=None,
    window: int | None = None,
) -> Iterator[Conversation]:
    """The conversations of local files, `builtin-chat` or a Hub dataset, in source order. Given a tokenizer, each
    comes with its ids; given a window too, a conversation whose rendering is longer than the window is an
    InputError."""
    if window is not None and tokenizer is None:
        raise ValueError("the window check needs a tokenizer")
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    specs = [BUILTIN_INSTRUCT if isinstance(one, str) and one == BUILTIN_CHAT else one for one in specs]
    # No text column: a conversation is the whole row, whichever of the forms it takes.
    source = open_source(specs, text_column=None, split=split, streaming=streaming)
    for where, row_number, row in source.read_rows():
        messages = normalise_row(row, f"{where} row {row_number}")
        ids = render_chat(tokenizer, messages) if tokenizer is not None else None
        if window is not None and len(ids) > window:
            raise InputError(f"{where} row {row_number}: the conversation is {len(ids)} tokens long, longer than "
                             f"the window of {window}; shorten it or drop the row")
        yield Conversation(messages, where, row_number, ids)


def normalise_row(row: dict, where: str) -> list[dict[str, str]]:
    """One row in any supported form as checked OpenAI messages; InputError naming `where` otherwise."""
    if "messages" in row:
        turns = [_message(turn, "role", "content", None, where, index) for index, turn in
                 enumerate(_turn_list(row["messages"], "messages", where), 1)]
    elif "conversations" in row:
        turns = [_message(turn, "from", "value", SHAREGPT_ROLES, where, index) for index, turn in
                 enumerate(_turn_list(row["conversations"], "conversations", where), 1)]
    elif PROMPT_KEY in row and (response_key := next((key for key in RESPONSE_KEYS if key in row), None)):
        turns = [{"role": "user", "content": _text(row[PROMPT_KEY], PROMPT_KEY, where)},
                 {"role": "assistant", "content": _text(row[response_key], response_key, where)}]
    else:
        columns = ", ".join(map(repr, row)) or "none"
        raise InputError(f"{where} is not a conversation (columns: {columns}); {FORMS_HINT}")
    _check_turns(turns, where)
    return turns


def _turn_list(value, column: str, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: {column!r} must be a non-empty list of turns")
    return value


def _message(turn, role_key: str, content_key: str, role_names: dict | None, where: str, index: int) -> dict:
    if not isinstance(turn, dict):
        raise InputError(f"{where}: turn {index} is not an object")
    if not turn.get(role_key):
        raise InputError(f"{where}: turn {index} has no {role_key!r}")
    role = turn[role_key] if role_names is None else role_names.get(turn[role_key])
    if role not in ROLES:
        known = ", ".join(sorted(role_names or ROLES))
        raise InputError(f"{where}: turn {index} has the unknown {role_key} {turn[role_key]!r} (known: {known})")
    return {"role": role, "content": _text(turn.get(content_key), f"turn {index} {content_key!r}", where)}


def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: {what} holds {type(value).__name__}, not text")
    return value


def _check_turns(turns: list[dict[str, str]], where: str) -> None:
    for index, turn in enumerate(turns, 1):
        if turn["role"] in SYSTEM_ROLES and index > 1:
            raise InputError(f"{where}: turn {index} is a system message; only the first turn may be one")
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise InputError(f"{where}: turn {index} is an empty assistant turn")
    if not any(turn["role"] == "assistant" for turn in turns):
        raise InputError(f"{where} has no assistant turn: nothing to learn from")
