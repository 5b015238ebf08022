"""Token ids to printable text, one token at a time."""

from __future__ import annotations

from collections.abc import Sequence

# Prompt tokens decoded along with the first new ones, so that tokenizers which drop a leading space at the start
# of a decode (SentencePiece-style) still print the continuation's first space.
PROMPT_CONTEXT_TOKENS = 5


class TextStream:
    """The text of one sequence's continuation, released as soon as it is final.

    A character made of several byte tokens is released only once complete (never as U+FFFD); text that could be
    the beginning of a stop string is held back until it is known not to be one; the text ends just before the
    first stop string. Decoding re-reads only a small window of tokens, so each step costs the same.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = [stop for stop in stop_strings if stop]
        self.tokens = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset, self.read_offset = 0, len(self.tokens)
        self.text = ""
        self.released = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final."""
        if self.stopped:
            return ""
        self.tokens.append(int(token_id))
        self.take_new_text(complete_only=True)
        return self.release(final=False)

    def finish(self) -> str:
        """The text still held back once generation is over, with an unfinished character as the tokenizer shows
        it (so the whole text equals ``tokenizer.decode`` of the continuation)."""
        if not self.stopped:
            self.take_new_text(complete_only=False)
        return self.release(final=True)

    def take_new_text(self, complete_only: bool) -> None:
        known = self.decode(self.tokens[self.prefix_offset : self.read_offset])
        extended = self.decode(self.tokens[self.prefix_offset :])
        if len(extended) > len(known) and not (complete_only and extended.endswith("\ufffd")):
            self.text += extended[len(known) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def release(self, final: bool) -> str:
        if self.stopped:
            return ""
        longest = max((len(stop) for stop in self.stop_strings), default=0)
        search_from = max(0, self.released - longest + 1)
        hits = [index for stop in self.stop_strings if (index := self.text.find(stop, search_from)) >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self.possible_stop_start()
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece

    def possible_stop_start(self) -> int:
        """Length of the longest unreleased tail of the text that a stop string starts with."""
        tail = self.text[self.released :]
        for length in range(min(len(tail), max((len(s) for s in self.stop_strings), default=0)), 0, -1):
            if any(stop.startswith(tail[-length:]) for stop in self.stop_strings):
                return length
        return 0
