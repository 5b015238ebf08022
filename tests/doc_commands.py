"""The shell commands of a Markdown page, as a user would type them, and how the docs test runs each one.

A hand-written extractor rather than mktestdocs or pytest-examples: those run a block as it stands, and these
commands need placeholders filled (`books.jsonl`, `DATA`), a step limit appended to training, `--quick` appended to
benchmarks, servers started, probed and stopped, and a visible skip marker honoured.

A command that cannot run in a test carries the marker in the page itself, as a comment on its line or on a comment
line of its own just above it:

    torchrun --nnodes 2 ... train.py   # (not run by tests: needs several machines)

and a whole block carries it as an HTML comment on the line before its fence (the README's first block, which sets
up a virtual environment and runs this very test suite):

    <!-- (not run by tests: REASON) -->

The command inside a block that `benchmarks/report.py` generates (between its BEGIN and END markers) is skipped with
its reason: `.ci/run` runs every generator at toy size (`python benchmarks/report.py --quick`), with the same
arguments and `--quick`, so running it here as well would only repeat minutes of work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
SHELL_LANGUAGES = {"bash", "sh", "shell"}
SKIP_MARKER = re.compile(r"\(not run by tests: (?P<reason>[^)]+)\)")
SHARED_VARIABLE = "$TINYSEEK_SHARED_DATA"
REPORT_BLOCK = re.compile(r"^<!-- (?P<edge>BEGIN|END) report\.py \S+ -->$")
REPORT_BLOCK_REASON = "a report block's own command; .ci/run runs its generator with `benchmarks/report.py --quick`"
TRAINING = re.compile(r"(?:^|\s)(?:train\.py|tinyseek\s+train)(?:\s|$)")
BENCHMARK = re.compile(r"(?:^|\s)(?:python\s+benchmarks/\S+\.py|bash\s+benchmarks/\S+\.sh)(?:\s|$)")
SERVER = re.compile(r"(?:^|\s)tinyseek\s+serve(?:\s|$)")
SKIPPED: list[str] = []  # "page:line: command  ->  reason", filled by the docs test, printed at the end of the session


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str  # as written, continuation lines joined, without its trailing comment
    skip_reason: str | None

    @property
    def kind(self) -> str:
        if SERVER.search(self.text):
            return "server"
        if BENCHMARK.search(self.text):
            return "benchmark"
        if TRAINING.search(self.text):
            return "training"
        return "plain"

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def strip_comment(line: str) -> tuple[str, str]:
    """Split a shell line into its command and its trailing `# comment` (a `#` outside quotes after a blank)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index:]
    return line.rstrip(), ""


def page_commands(path: Path, root: Path) -> list[Command]:
    """Every command of the page's bash blocks, in order."""
    commands, language, pending, start, comments, previous, block_marker = [], None, "", 0, "", "", None
    in_report_block = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        edge = REPORT_BLOCK.match(line.strip()) if language is None else None
        if edge:
            in_report_block = edge.group("edge") == "BEGIN"
        fence = FENCE.match(line)
        if fence:
            opening = language is None
            language = fence.group("lang") if opening else None
            block_marker = SKIP_MARKER.search(previous) if opening and previous.startswith("<!--") else None
            continue
        if language is None:
            previous = line.strip()
        if language not in SHELL_LANGUAGES:
            continue
        command, comment = strip_comment(line)
        if not pending:
            start = number
        comments += comment
        if command.endswith("\\"):
            pending += command[:-1].strip() + " "
            continue
        text = (pending + command.strip()).strip()
        pending = ""
        if text:
            marker = SKIP_MARKER.search(comments) or block_marker
            reason = REPORT_BLOCK_REASON if in_report_block else marker and marker.group("reason")
            commands.append(Command(str(path.relative_to(root)), start, text, reason))
            comments = ""  # a comment line above a command belongs to it
    return commands
