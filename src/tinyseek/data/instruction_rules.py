"""Instruction following that a rule can check, on held-out instructions: what `benchmarks/chat.py` scores.

The instructions come from the built-in sample's held-out stories (`tinyseek.data.instruct.held_out_stories`), which
no training set contains, and from questions about tinyseek phrased differently from the training set's. An answer is
scored with the instruction's own text removed, so that echoing the instruction passes nothing, and a story counts
only if it is at least MIN_STORY_WORDS words long:

- `about`: the story is about the named character (the name appears);
- `words`: the share of the required words it uses;
- `self`: it says it is tinyseek;
- every answer: whether it stopped at the end of its turn (given by whoever generated it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tinyseek.data.instruct import ABOUT_KIND, SELF_KIND, WORDS_KIND, held_out_stories, story_conversations

MIN_STORY_WORDS = 50
DISTINCT_NGRAM = 4
# Not among the training set's phrasings (tinyseek.data.instruct.TINYSEEK_FACTS).
HELD_OUT_SELF_QUESTIONS = ("Who are you, exactly?", "What is your name, please?", "Which model am I talking to?",
                           "Tell me who you are.", "Who am I chatting with?")
SELF_NAME = "tinyseek"
WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Instruction:
    kind: str
    prompt: str
    name: str | None = None  # `about`: the character the story must be about
    words: tuple[str, ...] = ()  # `words`: the words the story must use


@dataclass(frozen=True)
class Score:
    passed: float  # 1.0 or 0.0, or for `words` the share of the required words used
    long_enough: bool
    stopped: bool


def held_out_instructions() -> list[Instruction]:
    """The held-out stories' "about" and "words" instructions, then the held-out questions about tinyseek."""
    instructions = []
    for story in held_out_stories():
        for made in story_conversations(story):
            if made["kind"] in (ABOUT_KIND, WORDS_KIND):
                instructions.append(Instruction(made["kind"], made["messages"][0]["content"], made.get("name"),
                                                tuple(made.get("words", ()))))
    return instructions + [Instruction(SELF_KIND, question) for question in HELD_OUT_SELF_QUESTIONS]


def words_of(text: str) -> list[str]:
    return WORD.findall(text.lower())


def score(instruction: Instruction, answer: str, stopped: bool) -> Score:
    """How an answer does on its instruction's rule (0 where a story is shorter than MIN_STORY_WORDS)."""
    answer = answer.replace(instruction.prompt, " ")
    words = words_of(answer)
    long_enough = instruction.kind == SELF_KIND or len(words) >= MIN_STORY_WORDS
    if not long_enough:
        return Score(0.0, False, stopped)
    if instruction.kind == ABOUT_KIND:
        passed = float(instruction.name.lower() in words)
    elif instruction.kind == WORDS_KIND:
        passed = sum(word in words for word in instruction.words) / len(instruction.words)
    else:
        passed = float(SELF_NAME in words)
    return Score(passed, long_enough, stopped)


def distinct_ngrams(answers: Sequence[str], n: int = DISTINCT_NGRAM) -> float:
    """Distinct word n-grams over all n-grams of the answers (1.0: nothing repeats; near 0: loops)."""
    grams = [tuple(words[i: i + n]) for words in map(words_of, answers) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
