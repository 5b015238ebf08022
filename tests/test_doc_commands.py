"""Every shell command of README.md and docs/*.md runs, in order, in one temporary copy of the repository per page,
offline: placeholders come from fixtures, training gets a step limit, benchmarks run with --quick, servers are
started, probed and stopped. Commands marked `(not run by tests: ...)` in the page are listed, with their reasons,
at the end of the run."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from doc_commands import REPORT_BLOCK_REASON, SHARED_VARIABLE, SKIPPED, Command, page_commands

from tinyseek.testing import write_jsonl

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md"))]
SHARED = os.environ.get("TINYSEEK_SHARED_DATA", "")
HAS_SHARED = bool(SHARED) and Path(SHARED).is_dir()
COMMAND_TIMEOUT_S = 900
# What the docs' placeholder names stand for in the test: whole words only.
PLACEHOLDERS = {"DATA": "books.jsonl", "TOK": "builtin"}
TRAINING_LIMIT = " --max-steps 2 --set logging.eval_batches=1"
# Commands marked with this reason still run: offline, each must end with one line that says what it needs.
NEEDS_HUB = "needs the Hugging Face Hub"


def tracked_copy(destination: Path) -> Path:
    """The working tree's tracked files (with their uncommitted edits), as a fresh clone would have them."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        source, target = REPO / name, destination / name
        if source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def write_fixtures(root: Path) -> None:
    """The files the docs name as the user's own: books with titles, a corpus, a tokenizer folder, a config."""
    with gzip.open(REPO / "src/tinyseek/builtin/tinystories/tinystories_sample.jsonl.gz", "rt", encoding="utf-8") as f:
        stories = [json.loads(line)["text"] for line in f][:600]
    rows = [{"text": text, "title": f"Book {index % 12}"} for index, text in enumerate(stories)]
    for name in ("books.jsonl", "my_corpus.jsonl"):
        write_jsonl(root / name, rows)
    shutil.copytree(REPO / "src/tinyseek/builtin/deepseek-coder", root / "path/to/tokenizer")
    (root / "my.yaml").write_text(
        "out_dir: runs/my-config\nmodel:\n  preset: seed\ndata:\n  source: books.jsonl\n  tokenizer: builtin\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shell_text(command: Command) -> str:
    text = command.text
    for placeholder, value in PLACEHOLDERS.items():
        text = re.sub(rf"(?<![\w/.$-]){placeholder}(?![\w/.-])", value, text)
    if command.kind == "benchmark":
        text += " --quick"
    elif command.kind == "training":
        text += TRAINING_LIMIT
    return text


def environment(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    bin_dir = str(Path(sys.executable).parent)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HOME=str(root / ".home"), MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_server(command: Command, text: str, root: Path, env: dict[str, str]) -> None:
    """Start it on a free port, wait for /health, ask one completion, stop it."""
    port = free_port()
    process = subprocess.Popen(f"exec {text} --port {port}", shell=True, cwd=root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command}\nexited {process.returncode} before serving:\n{process.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{command}\nnot serving after 180 s")
            time.sleep(0.5)
        answer = httpx.post(f"{base}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4},
                            timeout=120)
        assert answer.status_code == 200, f"{command}\n{answer.text}"
        assert answer.json()["choices"][0]["text"] is not None
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_shell(text: str, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -eo pipefail; {text}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)


def check_says_what_it_needs(command: Command, root: Path, env: dict[str, str]) -> None:
    """Offline, a command that needs the Hub fails with one error line (no traceback) that names the Hub."""
    result = run_shell(shell_text(command), root, env)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
    assert len(errors) == 1 and ("huggingface" in errors[0].lower() or "hub" in errors[0].lower()), (
        f"{command}\nexpected one error line naming the Hub, got:\n{result.stderr[-3000:]}")


def run_command(command: Command, root: Path, env: dict[str, str]) -> None:
    text = shell_text(command)
    if command.kind == "server":
        run_server(command, text, root, env)
        return
    result = run_shell(text, root, env)
    if result.returncode != 0:
        pytest.fail(f"{command}\nran as: {text}\nexit {result.returncode}\n"
                    f"stdout (end):\n{result.stdout[-2000:]}\nstderr (end):\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("page", PAGES)
def test_page_commands_run(page, tmp_path):
    commands = page_commands(REPO / page, REPO)
    root = tracked_copy(tmp_path / "repo")
    write_fixtures(root)
    env = environment(root)
    for command in commands:
        if command.skip_reason and command.skip_reason.startswith(NEEDS_HUB):
            check_says_what_it_needs(command, root, env)
            SKIPPED.append(f"{command}  ->  {command.skip_reason} (offline, it says so in one line)")
        elif command.skip_reason:
            SKIPPED.append(f"{command}  ->  {command.skip_reason}")
        elif SHARED_VARIABLE in command.text and not HAS_SHARED:
            SKIPPED.append(f"{command}  ->  needs $TINYSEEK_SHARED_DATA, which names no folder here")
        else:
            run_command(command, root, env)


def test_the_checker_fails_on_a_broken_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n```bash\ntinyseek info seed\ntinyseek no-such-command --really\n```\n")
    working, broken = page_commands(page, tmp_path)
    env = environment(tmp_path)
    run_command(working, tmp_path, env)
    with pytest.raises(pytest.fail.Exception, match="no-such-command"):
        run_command(broken, tmp_path, env)


def test_extractor_reads_continuations_comments_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "python train.py --config cpu-quick \\\n"
        "    --data DATA   # a comment with a # inside\n"
        "# (not run by tests: needs GPUs)\n"
        "torchrun --nproc_per_node gpu train.py\n"
        "echo '# not a comment'  # (not run by tests: just an example)\n"
        "```\n\n```python\nprint('not shell')\n```\n"
        "<!-- BEGIN report.py quality-15min -->\n```bash\npython benchmarks/quality.py --out /tmp/x\n```\n"
        "<!-- END report.py quality-15min -->\n```bash\npython benchmarks/quality.py --quick\n```\n"
    )
    training, gpu, echo, in_report_block, after_report_block = page_commands(page, tmp_path)
    assert (training.text, training.line, training.kind, training.skip_reason) == (
        "python train.py --config cpu-quick --data DATA", 2, "training", None)
    assert shell_text(training).startswith("python train.py --config cpu-quick --data books.jsonl --max-steps 2")
    assert (gpu.kind, gpu.skip_reason) == ("training", "needs GPUs")
    assert (echo.text, echo.skip_reason) == ("echo '# not a comment'", "just an example")
    assert in_report_block.skip_reason == REPORT_BLOCK_REASON and after_report_block.skip_reason is None
