"""The built-in instruction data: conversations of the TinyStories-Instruct kind made from the built-in TinyStories
sample, and conversations about tinyseek itself made from a short list of facts.

`python -m tinyseek.data.instruct` rebuilds the shipped file (`builtin/tinystories/tinystories_instruct.jsonl.gz`,
one `{"messages": [...], "kind": ...}` per line); the output depends on nothing but the sample and this code, byte for
byte (tests/test_chat.py rebuilds it and compares).

Stories whose text hashes into the held-out share (`is_held_out_story`) are kept for evaluation: they give no
conversation here, and `held_out_stories()` lets pre-training leave them out too.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tinyseek.data.builtin import BUILTIN_CORPUS, BUILTIN_INSTRUCT

HELD_OUT_PER_THOUSAND = 50  # 5% of the stories, about 115 of the sample's 2,316
# The longest stories (about one in forty) give no conversation: the rest fit a chat-stage window of 640 tokens of
# either built-in tokenizer, half the longest story's. A window's attention costs its length squared, so at cpu-chat's
# size the shorter windows read about 40% more tokens a second. The long stories stay in the pre-training corpus.
MAX_STORY_WORDS = 400
MIN_STORY_SENTENCES = 4
CONTINUE_PROMPT_SENTENCES = 2
REQUIRED_WORDS = 3
# Each `about` conversation is also written twice with its character renamed, to names drawn from those the training
# stories introduce. TinyStories reuses a few names (Lily, Tim, Ben, ...), so a model can pass "a story about Lily"
# by writing the names it writes anyway; the renamed copies make copying the requested name the only way to be right.
RENAMED_COPIES = 2
RENAME_STREAM = 0x6E616D65  # keeps the renaming's draws apart from the story's own chooser

# Adjectives that, between an article and a noun, make a thing worth naming in "a story about Lily and a red ball".
THING_ADJECTIVES = frozenset(
    "red blue green yellow pink purple orange black white brown gold golden silver big small little tiny huge "
    "shiny soft pretty new old fast special magic funny colorful round long".split()
)
# Words never taken as a name, an object or a required word: sentence openers, family words, function words.
COMMON_WORDS = frozenset(
    "a an the and or but so then when while with without into onto from that this these those there here they them "
    "their he she him her his hers it its we us our you your i me my mine one once upon time day every very too also "
    "just not was were is are be been had has have did do does said says saw see can could would should will what "
    "who why how where all some any many much more most other another after before because about over under again "
    "out off away back down up little big mom mommy dad daddy mum mama papa grandma grandpa friend friends yes no "
    "oh wow hello hi thank thanks please everyone everything something nothing".split()
)
CAPITALISED_NOT_NAMES = frozenset(
    "One Once The A An And But So Then When While He She It They We You I His Her Their My Our Your Mom Mommy Dad "
    "Daddy Mum Mama Papa Grandma Grandpa Yes No Oh Wow Hello Hi Thank Please After Before Every Today Suddenly "
    "Finally Together At In On Out Let Look Come Don't Can Do What Who Why How Where There This That Sun Mr Mrs Miss "
    "Sir Lady King Queen".split()
)
SENTENCE_END = re.compile(r"(?<=[.!?])[\"”']?\s+")
NAMED = re.compile(r"\b(?:a|an) ((?:[a-z]+ ){0,2}?[a-z]+) named ([A-Z][a-z]+)")
THING = re.compile(r"\b(?:a|an|the|his|her|their) ([a-z]+) ([a-z]+)\b")
WORD = re.compile(r"\b[a-z]{4,}\b")
CAPITALISED = re.compile(r"(?<![.!?\"]\s)(?<!^)\b([A-Z][a-z]+)\b")

ABOUT_KIND, WORDS_KIND, CONTINUE_KIND, SUMMARY_KIND, SELF_KIND = "about", "words", "continue", "summary", "self"
SECOND_KINDS = (WORDS_KIND, CONTINUE_KIND, SUMMARY_KIND)

TINYSEEK_FACTS = (
    (
        ("Who are you?", "What are you?", "Tell me about yourself.", "What is your name?", "Introduce yourself."),
        "I am tinyseek, a small language model in the DeepSeek family. I was trained on short stories, so I am best "
        "at writing simple stories for children.",
    ),
    (
        ("Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Where do you come from?"),
        "I was made by the tinyseek developers. They built tinyseek, a small and fast PyTorch implementation of the "
        "DeepSeek models, and trained me with it on one computer.",
    ),
    (
        ("What can you do?", "How can you help me?", "What are you good at?", "What should I ask you?"),
        "I can write short stories. Ask me for a story about a character and a thing, a story that uses some words, "
        "or give me the start of a story and I will continue it.",
    ),
    (
        ("What is tinyseek?", "Tell me about tinyseek.", "What is the tinyseek project?"),
        "tinyseek is a small, fast and correct PyTorch implementation of the DeepSeek model family, with the "
        "pipeline that trains it on one machine: data preparation, training, generation and serving.",
    ),
    (
        ("Are you ChatGPT?", "Are you DeepSeek?", "Are you a person?", "Are you a human?"),
        "No. I am tinyseek, a small language model made by the tinyseek developers. I am much smaller than the big "
        "chat models, so my answers are short and simple.",
    ),
    (
        ("How big are you?", "How many parameters do you have?", "Are you a large model?"),
        "I am a very small model, small enough to be trained on a laptop's processor in minutes. That is why I "
        "mostly know short stories.",
    ),
    (
        ("What were you trained on?", "What data did you learn from?", "How did you learn to write?"),
        "I was trained on TinyStories, a set of short stories written in simple words, and then on conversations "
        "made from those stories, so that I answer requests.",
    ),
    (
        ("Can you write code?", "Do you know about the news?", "Can you answer any question?"),
        "Not well. I am tinyseek, a tiny model trained on short stories. I can write a simple story for you, but I "
        "do not know much about the world.",
    ),
)
GREETINGS = ("", "Hi! ", "Hello. ", "Hey, ", "Good morning. ")
QUESTION_STYLES = (str, str.lower)


def text_hash(text: str) -> int:
    """A stable number for a text (a story, a course name), from the text alone."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_held_out_story(text: str) -> bool:
    """Whether a story is kept for the held-out evaluation (and out of every training set)."""
    return text_hash(text) % 1000 < HELD_OUT_PER_THOUSAND


def builtin_stories() -> list[str]:
    with gzip.open(BUILTIN_CORPUS, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def held_out_stories() -> list[str]:
    """The built-in sample's held-out stories, in sample order."""
    return [text for text in builtin_stories() if is_held_out_story(text)]


def sentences(text: str) -> list[str]:
    return [part.strip() for part in SENTENCE_END.split(" ".join(text.split())) if part.strip()]


def main_character(text: str) -> str | None:
    """How the story introduces its main character ("a little girl named Lily"), or "someone named X" for the name
    said most often, or None when it names nobody."""
    introduced = NAMED.search(text)
    if introduced:
        return f"{article(introduced.group(1))} {introduced.group(1)} named {introduced.group(2)}"
    names = character_names(text)
    return f"someone named {names[0]}" if names else None


def character_names(text: str) -> list[str]:
    """Capitalised words that are not sentence openers or common words, said at least twice, most frequent first."""
    counts = Counter(name for name in CAPITALISED.findall(text) if name not in CAPITALISED_NOT_NAMES)
    for name in NAMED.findall(text):
        counts[name[1]] += 2
    return [name for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if count >= 2]


def story_thing(text: str, character: str | None) -> str | None:
    """The first described thing of the story ("a red ball") that is not its main character."""
    for adjective, noun in THING.findall(text):
        if adjective not in THING_ADJECTIVES or noun in COMMON_WORDS or noun in THING_ADJECTIVES:
            continue
        if character is None or noun not in character.split():
            return f"{article(adjective)} {adjective} {noun}"
    return None


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def required_words(text: str, chooser: random.Random) -> list[str]:
    candidates = sorted({word for word in WORD.findall(text) if word not in COMMON_WORDS})
    return chooser.sample(candidates, REQUIRED_WORDS) if len(candidates) >= REQUIRED_WORDS else []


def listed(words: list[str]) -> str:
    quoted = [f'"{word}"' for word in words]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1]


def conversation(kind: str, prompt: str, answer: str, **checkable) -> dict:
    """One exchange in OpenAI form, with its kind and what a rule can check in an answer to it (`name`, `words`)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "kind": kind, **checkable}


def story_conversations(text: str) -> list[dict]:
    """The conversations one story gives: "write a story about <its character> [and <its thing>]" where it names a
    character, and one of "uses the words", "continue this story" and "what is this story about", chosen by the
    story's hash."""
    story = "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())
    chooser = random.Random(text_hash(text))
    character, parts = main_character(text), sentences(text)
    thing = story_thing(text, character)
    made = []
    if character:
        about = f"{character} and {thing}" if thing else character
        made.append(conversation(ABOUT_KIND, f"Write a story about {about}.", story, name=character.split()[-1]))
    for kind in chooser.sample(SECOND_KINDS, len(SECOND_KINDS)):
        if kind == WORDS_KIND and (words := required_words(text, chooser)):
            made.append(conversation(kind, f"Write a story that uses the words {listed(words)}.", story, words=words))
        elif kind == CONTINUE_KIND and len(parts) >= MIN_STORY_SENTENCES:
            opening = " ".join(parts[:CONTINUE_PROMPT_SENTENCES])
            made.append(conversation(kind, f"Continue this story: {opening}",
                                     " ".join(parts[CONTINUE_PROMPT_SENTENCES:])))
        elif kind == SUMMARY_KIND and character and parts:
            made.append(conversation(kind, f"What is this story about?\n\n{story}", summary(text, character, parts)))
        else:
            continue
        break
    return made


def summary(text: str, character: str, parts: list[str]) -> str:
    others = [name for name in character_names(text) if not character.endswith(name)][:2]
    company = f" Also in the story: {', '.join(others)}." if others else ""
    return f"This story is about {character}. It begins: {parts[0]}{company}"


def tinyseek_conversations() -> Iterator[dict]:
    """Every phrasing of every question about tinyseek, with and without a greeting, with its fact as the answer."""
    for questions, answer in TINYSEEK_FACTS:
        for question in questions:
            for greeting in GREETINGS:
                for style in QUESTION_STYLES:
                    prompt = greeting + (style(question) if greeting else question)
                    yield conversation(SELF_KIND, prompt, answer)
                    if not greeting:
                        break


def renamed(made: dict, new_name: str) -> dict:
    """An `about` conversation with its character's name replaced by `new_name` in the request and the story."""
    old_name = re.compile(rf"\b{re.escape(made['name'])}\b")
    messages = [{**message, "content": old_name.sub(new_name, message["content"])} for message in made["messages"]]
    return {**made, "messages": messages, "name": new_name, "renamed_from": made["name"]}


def instruct_conversations() -> Iterator[dict]:
    """The built-in instruction set, in a fixed order: each training story's conversations with the renamed copies
    of its `about` one, then tinyseek's."""
    made_by_story = [(text, story_conversations(text)) for text in builtin_stories()
                     if not is_held_out_story(text) and len(text.split()) <= MAX_STORY_WORDS]
    # Names a story introduces ("a girl named Mia"): a capitalised word said twice may be "Good" or "Truck".
    names = {introduced.group(2) for text, _ in made_by_story if (introduced := NAMED.search(text))}
    for text, made in made_by_story:
        yield from made
        chooser = random.Random(text_hash(text) ^ RENAME_STREAM)
        others = sorted(names - set(re.findall(r"[A-Za-z]+", text)))  # no namesake of anyone in the story
        for about in (one for one in made if one["kind"] == ABOUT_KIND):
            yield from (renamed(about, new_name) for new_name in chooser.sample(others, RENAMED_COPIES))
    yield from tinyseek_conversations()


def write_conversations(conversations: Iterable[dict], out: Path) -> int:
    """Write conversations as gzip JSONL with a fixed gzip header (no time, no name), so equal data give equal bytes;
    nothing is left at `out` unless the whole file was written. Return how many were written."""
    buffer = io.BytesIO()
    count = 0
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as handle:
        for item in conversations:
            handle.write((json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(out)
    return count


def write_instruct_data(out: Path) -> int:
    """Write the built-in instruction set to `out`; return the number of conversations."""
    return write_conversations(instruct_conversations(), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyseek.data.instruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_INSTRUCT, help="default: the file shipped with tinyseek")
    args = parser.parse_args(argv)
    count = write_instruct_data(args.out)
    print(f"wrote {count} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
