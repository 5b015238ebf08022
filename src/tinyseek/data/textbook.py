"""A textbook tutor, as a recipe: conversations made from markdown textbooks with one chapter per row and a
`course_name` column, such as the library-of-phi corpus in $TINYSEEK_SHARED_DATA/corpus/library_of_phi_*.

    python -m tinyseek.data.textbook --data "$TINYSEEK_SHARED_DATA"/corpus/library_of_phi_* --out tutor.jsonl.gz

Each section heading becomes a question ("Explain the Crusades.") and the section's text its answer; the course's
front and back matter (foreword, introduction, conclusion, exercises) is left out. Whole courses, chosen by a hash
of their name (`is_held_out_course`), are held out for evaluation. The result is not shipped with tinyseek: that
corpus states no licence.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from tinyseek.data.instruct import conversation, text_hash, write_conversations
from tinyseek.data.sources import open_source

HELD_OUT_COURSES_PER_THOUSAND = 100  # a tenth of the courses: about 5 of library-of-phi's 49 GPT-4 books
COURSE_COLUMN = "course_name"
MIN_ANSWER_WORDS = 40
HEADING = re.compile(r"^#{2,6} +(.+?) *$", re.MULTILINE)
# "Chapter: Chapter 1: ", "Section: 2.1 ", "2.2a ", "Subsection: 3.1b: " before a heading's topic.
NUMBERING = re.compile(r"^(?:(?:Chapter|Section|Subsection):\s*)*(?:Chapter\s+\d+:\s*)?(?:\d+(?:\.\d+)*[a-z]?:?\s+)?")
FRONT_AND_BACK_MATTER = re.compile(
    r"^(foreword|foreward|introduction|conclusion|exercises?( \d+)?|summary|chapter summary|references|"
    r"further reading|course overview|key terms)$",
    re.IGNORECASE,
)
TUTOR_KIND = "textbook"
QUESTIONS = ("Explain {topic}.", "What should I know about {topic}?", "Teach me about {topic}, from {course}.")


def is_held_out_course(course_name: str) -> bool:
    return text_hash(course_name) % 1000 < HELD_OUT_COURSES_PER_THOUSAND


def topic(heading: str) -> str | None:
    """A heading without its numbering and trailing colon, or None for front and back matter."""
    name = NUMBERING.sub("", heading).strip().rstrip(":").strip()
    return None if not name or FRONT_AND_BACK_MATTER.match(name) else name


def chapter_conversations(text: str, course: str) -> Iterator[dict]:
    """One conversation per section of a chapter whose text is long enough to teach from."""
    headings = list(HEADING.finditer(text))
    for index, heading in enumerate(headings):
        name = topic(heading.group(1))
        end = headings[index + 1].start() if index + 1 < len(headings) else len(text)
        answer = text[heading.end():end].strip()
        if name is None or len(answer.split()) < MIN_ANSWER_WORDS:
            continue
        question = QUESTIONS[text_hash(course + name) % len(QUESTIONS)]
        yield conversation(TUTOR_KIND, question.format(topic=name, course=course), answer)


def textbook_conversations(spec: str | Path | Sequence[str | Path]) -> Iterator[dict]:
    """The conversations of every course that is not held out, in source order."""
    for chapter in open_source(spec, group_column=COURSE_COLUMN).documents():
        if not is_held_out_course(chapter.group):
            yield from chapter_conversations(chapter.text, chapter.group)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyseek.data.textbook", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="textbook files (.jsonl, .jsonl.gz, ...), folders or globs")
    parser.add_argument("--out", type=Path, required=True, help="the .jsonl.gz file to write")
    args = parser.parse_args(argv)
    count = write_conversations(textbook_conversations(args.data), args.out)
    print(f"wrote {count} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
