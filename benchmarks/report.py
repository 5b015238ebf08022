"""Regenerate the measured figures in README.md and docs/: each table lives in a generated block of a doc page.

    python benchmarks/report.py                  # every block (hours: run it on an idle machine)
    python benchmarks/report.py decode serving   # some blocks
    python benchmarks/report.py --list           # the blocks, their pages and commands
    python benchmarks/report.py --quick          # every generator at toy size, to check it still runs; writes nothing

A block sits between two marker lines in its page:

    <!-- BEGIN report.py NAME -->
    ...
    <!-- END report.py NAME -->

and everything between them is rewritten: a header (the commit and whether the tree was clean, the CPU and the
flags that matter, threads, load average before and after, the date, the exact command), then what the benchmark
produced. Findings written by hand live outside the blocks, so a rerun keeps them. Only blocks measured on a clean
tree may be committed (tests/test_docs_figures.py checks the headers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSEEK_SHARED_DATA") or REPO.parent / "shared" / "data")
BEGIN, END = "<!-- BEGIN report.py {} -->", "<!-- END report.py {} -->"
BLOCK_PATTERN = re.compile(r"<!-- BEGIN report\.py (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- END report\.py (?P=name) -->",
                           re.S)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


# The quality side-by-side: the preset and the reference, the reference also with each lever of the preset's recipe
# that helped it in the screens (a lever that helps the reference too is a lever it gets: docs/quality.md compares
# with the best), every run on the mixture of the three textbook corpora that the screen chose.
QUALITY_RUNS = "reference,reference-muon,reference-muon-wsd,cpu-15min"
MIXTURE = ("--mixture", "gpt35_wiki=1,gpt35_synth=0.5")
# The budget family against the reference with the levers that help it too. Each budget is its own block (the whole
# family at once, about three hours, is longer than an idle machine is often available), and quality-15min is the
# 15-minute one; quality-budgets draws the family from their quality_<budget>.json files.
FAMILY_REFERENCE = ("--reference", "reference-muon")


@dataclass(frozen=True)
class Block:
    """One generated block: the page it lives in, the command that measures it, and how to read the result.

    `command` and `quick` may use `{out}`, a fresh temporary folder. The block's body is `{out}/<body_file>` when the
    command writes one (markdown), else the command's standard output, as a text block or, with
    `stdout_format="markdown"`, as it is. `artifacts` are files the
    command writes into `{out}` that go beside the page (plots, samples)."""

    name: str
    page: str
    command: tuple[str, ...]
    quick: tuple[str, ...]
    threads: int
    body_file: str | None = None
    stdout_format: str = "text"
    artifacts: tuple[str, ...] = ()
    needs_shared_data: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, quick: bool, out: Path) -> list[str]:
        return [part.replace("{out}", str(out)) for part in (self.quick if quick else self.command)]

    def shown_command(self) -> str:
        env = " ".join(f"{key}={value}" for key, value in self.env.items())
        return (env + " " if env else "") + shlex.join(self.command).replace("'{out}'", "{out}")


PY = "python"


def budget_block(minutes: int) -> Block:
    budget = ("--budgets", f"{minutes}m", *FAMILY_REFERENCE, *MIXTURE, "--threads", "2", "--out", "{out}")
    return Block(f"quality-{minutes}min", "docs/quality.md", (PY, "benchmarks/quality.py", *budget),
                 (PY, "benchmarks/quality.py", *budget, "--quick"), threads=2, body_file=f"quality_{minutes}m.md",
                 artifacts=(f"quality_{minutes}m.json",), needs_shared_data=True)


BLOCKS = [
    Block("cli-startup", "docs/benchmarks.md",
          (PY, "benchmarks/cli_startup.py"), (PY, "benchmarks/cli_startup.py", "--quick"), threads=1),
    Block("first-step", "docs/benchmarks.md",
          (PY, "benchmarks/first_step.py", "--install"), (PY, "benchmarks/first_step.py", "--quick"), threads=2,
          env={"HF_HUB_OFFLINE": "1"}),
    Block("train-recipe", "docs/benchmarks.md",
          (PY, "benchmarks/train_speed.py", "--recipe", "--compare-ref", "1bb59f4", "--checkpointing", "--threads", "1",
           "--rounds", "5", "--recipe-steps", "3"),
          (PY, "benchmarks/train_speed.py", "--recipe", "--threads", "1", "--rounds", "1", "--recipe-steps", "1"),
          threads=1),
    Block("train-1x32", "docs/benchmarks.md",
          (PY, "benchmarks/train_speed.py", "--threads", "1", "--shapes", "1x32", "--dtypes", "fp32"),
          (PY, "benchmarks/train_speed.py", "--threads", "1", "--quick"), threads=1),
    Block("train-8x256", "docs/benchmarks.md",
          (PY, "benchmarks/train_speed.py", "--threads", "1", "--shapes", "8x256", "--dtypes", "fp32", "--steps", "3"),
          (PY, "benchmarks/train_speed.py", "--threads", "1", "--quick", "--shapes", "2x64"), threads=1),
    Block("prepare", "docs/data.md",
          (PY, "benchmarks/prepare_time.py"), (PY, "benchmarks/prepare_time.py", "--quick"), threads=2,
          needs_shared_data=True),
    Block("data-parallel", "docs/training.md",
          ("bash", "benchmarks/data_parallel_cpu.sh"), ("bash", "benchmarks/data_parallel_cpu.sh", "--quick"),
          threads=2, needs_shared_data=True),
    Block("decode", "docs/decode.md",
          (PY, "benchmarks/decode_speed.py", "--threads", "1", "--repeats", "2", "--llama-cpp", "--out-dir", "{out}"),
          (PY, "benchmarks/decode_speed.py", "--quick", "--threads", "1", "--llama-cpp", "--out-dir", "{out}"),
          threads=1, body_file="decode.md", artifacts=("decode_speed.png",)),
    Block("decode-bf16", "docs/decode.md",
          (PY, "benchmarks/decode_speed.py", "--weights", "--threads", "1", "--repeats", "2", "--out-dir", "{out}"),
          (PY, "benchmarks/decode_speed.py", "--weights", "--quick", "--threads", "1", "--out-dir", "{out}"),
          threads=1, body_file="decode_bf16.md"),
    Block("serving", "docs/serving.md",
          (PY, "benchmarks/serve_load.py", "--threads", "1"),
          (PY, "benchmarks/serve_load.py", "--threads", "1", "--quick"), threads=1),
    Block("serving-hostile", "docs/serving.md",
          (PY, "benchmarks/serve_load.py", "--hostile", "--threads", "1"),
          (PY, "benchmarks/serve_load.py", "--hostile", "--threads", "1", "--quick"), threads=1),
    Block("crash-resume", "docs/reliability.md",
          (PY, "benchmarks/crash_resume.py"), (PY, "benchmarks/crash_resume.py", "--quick"), threads=1,
          stdout_format="markdown"),
    Block("fuzz-inputs", "docs/reliability.md",
          (PY, "benchmarks/fuzz_inputs.py"),
          (PY, "benchmarks/fuzz_inputs.py", "--quick"), threads=1, stdout_format="markdown"),
    Block("gguf-parity", "docs/export.md",
          (PY, "benchmarks/gguf_parity.py"), (PY, "benchmarks/gguf_parity.py", "--quick"), threads=1),
    Block("install", "docs/export.md",
          (PY, "benchmarks/install_time.py"), (PY, "benchmarks/install_time.py", "--quick"), threads=2),
    Block("quality-15min", "docs/quality.md",
          (PY, "benchmarks/quality.py", "--runs", QUALITY_RUNS, *MIXTURE, "--time-budget", "15m", "--threads", "2",
           "--out", "{out}"),
          (PY, "benchmarks/quality.py", "--runs", QUALITY_RUNS, *MIXTURE, "--quick", "--threads", "2",
           "--out", "{out}"),
          threads=2, body_file="quality.md", artifacts=("quality.png", "quality_samples.json", "quality_15m.json"),
          needs_shared_data=True),
    budget_block(5),
    budget_block(60),
    Block("quality-budgets", "docs/quality.md",
          (PY, "benchmarks/quality.py", "--family", "docs", *FAMILY_REFERENCE, "--out", "{out}"),
          (PY, "benchmarks/quality.py", "--family", "docs", *FAMILY_REFERENCE, "--out", "{out}"),
          threads=1, body_file="quality_budgets.md", artifacts=("quality_budgets.png",)),
    Block("chat", "docs/chat.md",
          (PY, "benchmarks/chat.py", "--threads", "2"), (PY, "benchmarks/chat.py", "--quick", "--threads", "2"),
          threads=2, stdout_format="markdown", env={"HF_HUB_OFFLINE": "1"}),
]
BY_NAME = {block.name: block for block in BLOCKS}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def tree_state() -> str:
    """The commit, and whether tracked files differ from it (a block measured on a dirty tree must not be committed).
    The pages and pictures that blocks write are left out: no benchmark reads them, and one block's rewrite must not
    mark the next block's measurement dirty."""
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs", ":(exclude)README.md")
    return f"commit `{git('rev-parse', '--short=10', 'HEAD')}` ({'DIRTY tree: do not commit' if dirty else 'clean tree'})"


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    has = [flag for flag in CPU_FLAGS if flag in flags]
    lacks = [flag for flag in CPU_FLAGS if flag not in flags]
    return f"{model or 'unknown CPU'}, {os.cpu_count()} cores ({', '.join(has) or 'none of ' + ', '.join(CPU_FLAGS)}" + (
        f"; no {', '.join(lacks)})" if lacks else ")")


def header(block: Block, load_before: float, load_after: float, seconds: float) -> str:
    threads = f"{block.threads} thread{'s' if block.threads > 1 else ''}"
    return (
        f"<a name=\"report-{block.name}\"></a>\n"
        f"> Generated by `python benchmarks/report.py {block.name}`, do not edit by hand: {tree_state()}, "
        f"{datetime.date.today().isoformat()}, {cpu_description()}, {threads}, load average {load_before:.2f} before "
        f"and {load_after:.2f} after, {seconds / 60:.1f} min. Command: `{block.shown_command()}`\n"
    )


def measure(block: Block, quick: bool) -> str:
    """Run the block's command and return the block's new text (header and body)."""
    with tempfile.TemporaryDirectory(prefix=f"report-{block.name}-") as out_dir:
        out = Path(out_dir)
        env = {**os.environ, "OMP_NUM_THREADS": str(block.threads), **block.env}
        load_before, started = os.getloadavg()[0], time.perf_counter()
        print(f"== {block.name}: {shlex.join(block.argv(quick, out))}", file=sys.stderr, flush=True)
        result = subprocess.run(block.argv(quick, out), cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(f"report.py: block {block.name!r} failed (exit {result.returncode}); its page is unchanged")
        seconds, load_after = time.perf_counter() - started, os.getloadavg()[0]
        if block.body_file:
            body = strip_title((out / block.body_file).read_text())
        elif block.stdout_format == "markdown":
            body = result.stdout
        else:
            body = "```text\n" + result.stdout.strip("\n") + "\n```\n"
        if not quick:
            for artifact in block.artifacts:
                shutil.copyfile(out / artifact, REPO / Path(block.page).parent / artifact)
        return header(block, load_before, load_after, seconds) + "\n" + body.strip("\n") + "\n"


def strip_title(markdown: str) -> str:
    """A generator's own page title: the page that holds the block has its own."""
    lines = markdown.splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines)


def write_block(block: Block, text: str) -> None:
    page = REPO / block.page
    source = page.read_text()
    begin, end = BEGIN.format(block.name), END.format(block.name)
    if begin not in source or end not in source:
        raise SystemExit(f"report.py: {block.page} has no markers for block {block.name!r} ({begin} ... {end})")
    before, rest = source.split(begin, 1)
    _, after = rest.split(end, 1)
    page.write_text(f"{before}{begin}\n{text}{end}{after}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("blocks", nargs="*", help=f"blocks to regenerate (default: all): {', '.join(BY_NAME)}")
    parser.add_argument("--quick", action="store_true", help="run every generator at toy size; write nothing")
    parser.add_argument("--list", action="store_true", help="list the blocks and their commands")
    args = parser.parse_args()
    unknown = [name for name in args.blocks if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown block {unknown[0]!r}; choose from {', '.join(BY_NAME)}")
    chosen = [BY_NAME[name] for name in args.blocks] or BLOCKS
    if args.list:
        for block in chosen:
            print(f"{block.name:<14} {block.page:<20} {block.shown_command()}")
        return 0
    skipped = []
    for block in chosen:
        if block.needs_shared_data and not SHARED.is_dir():
            skipped.append(f"{block.name} (needs the developers' corpora: set TINYSEEK_SHARED_DATA)")
            continue
        text = measure(block, args.quick)
        if args.quick:
            print(f"{block.name}: ran ({len(text.splitlines())} lines; --quick writes nothing)", file=sys.stderr)
        else:
            write_block(block, text)
            print(f"{block.name}: wrote {block.page}", file=sys.stderr)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
