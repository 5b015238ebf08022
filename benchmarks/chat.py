"""Instruction following before and after the chat stage, in one invocation: the base (pre-trained) model and the
fine-tuned model of a two-stage run, on the held-out instructions (`tinyseek.data.instruction_rules`), which come from
stories that no training set of tinyseek's built-in data contains.

    python benchmarks/chat.py                           # trains configs/cpu-chat.yaml (15 minutes, 2 threads), then
                                                        # evaluates it: the figures in docs/chat.md
    python benchmarks/chat.py --run-dir runs/cpu-chat   # evaluates a run made by `tinyseek train --config cpu-chat`
    python benchmarks/chat.py --quick                   # a tiny model trained for a few steps, a few instructions

Each instruction is rendered with the chat template as the user's turn and answered greedily through the generation
engine, stopping at the end of the turn (`end_of_turn_ids`), up to --max-new-tokens. Reported for both models:
- each rule's pass rate (`score`: the name appears; the share of the required words used; "tinyseek" in a "who are
  you" answer; a story counts only from 50 words on, with the instruction's own text removed);
- the share of answers that stop at the end of the turn, and that are long enough;
- distinct 4-grams of the answers (1.0: nothing repeats);
- validation bits per byte on the pre-training split, before and after the chat stage (what the stage costs);
then the issue's targets (name rule >= 80% and >= 40 points above the base model; stops at end-of-turn >= 90%),
met or not, and three unedited exchanges with the fine-tuned model. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils.logging import disable_progress_bar

from tinyseek.data import TokenDataset
from tinyseek.data.chat import CHAT_TOKENS, end_of_turn_ids, render_chat
from tinyseek.data.instruct import ABOUT_KIND, SELF_KIND, WORDS_KIND
from tinyseek.data.instruction_rules import Instruction, distinct_ngrams, held_out_instructions, score
from tinyseek.evaluation import score_split
from tinyseek.generate.engine import GenerationEngine
from tinyseek.generate.sampling import Sampling
from tinyseek.loading import load_model_and_tokenizer, resolve_checkpoint
from tinyseek.runs import read_trainer_state
from tinyseek.testing import TINY_TRAINED_MODEL, set_flags

REPO = Path(__file__).resolve().parents[1]
RULES = ((ABOUT_KIND, "name rule: the story is about the named character"),
         (WORDS_KIND, "words rule: share of the required words used"),
         (SELF_KIND, "who are you: says it is tinyseek"))
NAME_TARGET, NAME_MARGIN, STOP_TARGET = 0.80, 0.40, 0.90
EXCHANGES = ("Write a story about a dog named Max.", 'Write a story that uses the words "sun", "boat" and "happy".',
             "Who are you?")
EVAL_SEQ_LEN = 512


@dataclass(frozen=True)
class Answer:
    instruction: Instruction
    text: str
    stopped: bool


def train_cpu_chat(out_dir: Path, quick: bool) -> None:
    """`tinyseek train --config cpu-chat` into `out_dir` (with --quick: a tiny model, 3 steps per stage)."""
    command = [sys.executable, "-m", "tinyseek", "train", "--config", "cpu-chat", "--out-dir", str(out_dir)]
    if quick:
        command += ["--max-steps", "3", *set_flags("model", TINY_TRAINED_MODEL), "--set", "logging.progress_bar=false",
                    "--set", "logging.eval_batches=1", "--set", "sample.prompts=[]"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"training: {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env=env, stdout=sys.stderr)


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[tuple[str, bool]]:
    """Greedy replies to single-turn prompts, and whether each stopped at the end of its turn."""
    engine = GenerationEngine(model, tokenizer, eos_token_ids=end_of_turn_ids(tokenizer))
    rendered = [render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
                for prompt in prompts]
    markers = [token for token in (*CHAT_TOKENS, tokenizer.eos_token) if token]
    replies = []
    for start in range(0, len(rendered), batch_size):
        for completion in engine.generate(rendered[start:start + batch_size], Sampling(temperature=0.0), max_new_tokens):
            text = completion.text
            for marker in markers:
                text = text.replace(marker, "")
            replies.append((text.strip(), completion.finish_reason == "stop"))
    return replies


def evaluate(folder: Path, instructions: list[Instruction], args) -> dict:
    model, tokenizer = load_model_and_tokenizer(folder, "cpu")
    replies = answer(model, tokenizer, [instruction.prompt for instruction in instructions], args.max_new_tokens,
                     args.batch_size)
    answers = [Answer(instruction, text, stopped) for instruction, (text, stopped) in zip(instructions, replies)]
    passed, long_enough = defaultdict(list), []
    for one in answers:
        result = score(one.instruction, one.text, one.stopped)
        passed[one.instruction.kind].append(result.passed)
        long_enough.append(result.long_enough)
    data_dir = read_trainer_state(folder)["data_dir"]
    bits = score_split(model, TokenDataset(data_dir, "val"), EVAL_SEQ_LEN).bits_per_byte
    exchanges = answer(model, tokenizer, list(EXCHANGES), args.max_new_tokens, args.batch_size)
    return {
        "rules": {kind: sum(values) / len(values) for kind, values in passed.items()},
        "stopped": sum(one.stopped for one in answers) / len(answers),
        "long_enough": sum(long_enough) / len(long_enough),
        "distinct_4grams": distinct_ngrams([one.text for one in answers]),
        "bits_per_byte": bits,
        "exchanges": exchanges,
        "step": read_trainer_state(folder)["step"],
    }


def percent(value: float | None, decimals: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{decimals}f}%"


def report(base: dict, chat: dict, counts: dict[str, int], source: str) -> str:
    lines = [
        f"{source}: the base model after {base['step']} pre-training steps, the chat model after "
        f"{chat['step']} fine-tuning steps. Greedy answers to {sum(counts.values())} held-out instructions "
        f"({', '.join(f'{counts[kind]} {kind}' for kind, _ in RULES if kind in counts)}).",
        "",
        "| | base model | chat model |",
        "|---|---|---|",
    ]
    for kind, title in RULES:
        if kind in counts:
            lines.append(f"| {title} | {percent(base['rules'].get(kind))} | {percent(chat['rules'].get(kind))} |")
    lines += [
        f"| stops at end-of-turn | {percent(base['stopped'])} | {percent(chat['stopped'])} |",
        f"| answers long enough to score (a story: 50 words) | {percent(base['long_enough'])} | "
        f"{percent(chat['long_enough'])} |",
        f"| distinct 4-grams of the answers | {base['distinct_4grams']:.2f} | {chat['distinct_4grams']:.2f} |",
        f"| validation bits per byte, pre-training split | {base['bits_per_byte']:.4f} | {chat['bits_per_byte']:.4f} |",
        "",
    ]
    name_chat, name_base = chat["rules"].get(ABOUT_KIND, 0.0), base["rules"].get(ABOUT_KIND, 0.0)
    targets = [
        # One decimal where a rate is held against its target: 79.8% must not read as 80%, NOT met.
        (f"name rule >= {percent(NAME_TARGET)} for the chat model", name_chat >= NAME_TARGET, percent(name_chat, 1)),
        (f"name rule >= {100 * NAME_MARGIN:.0f} points above the base model", name_chat - name_base >= NAME_MARGIN,
         f"{100 * (name_chat - name_base):+.0f} points"),
        (f"stops at end-of-turn >= {percent(STOP_TARGET)}", chat["stopped"] >= STOP_TARGET,
         percent(chat["stopped"], 1)),
    ]
    lines += [f"- target {what}: {'met' if met else 'NOT met'} ({measured})" for what, met, measured in targets]
    lines += ["", "Three exchanges with the chat model (greedy, unedited):", ""]
    for prompt, (text, stopped) in zip(EXCHANGES, chat["exchanges"]):
        lines += [f"> **User:** {prompt}", ">", f"> **tinyseek:** {text}" + ("" if stopped else " [...]"), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path,
                        help="a run of `tinyseek train --config cpu-chat` (base model in RUN/pretrain); default: train "
                             "one in a temporary folder")
    parser.add_argument("--max-new-tokens", type=int, default=768,
                        help="room for the longest stories: a reply cut short counts as not stopping")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny model for 3 steps a stage; 2 instructions a rule")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    disable_progress_bar()  # transformers' weight-loading bars, one per model loaded
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.quick:
        args.max_new_tokens = min(args.max_new_tokens, 12)
    instructions = held_out_instructions()
    if args.quick:
        instructions = [one for kind, _ in RULES for one in [i for i in instructions if i.kind == kind][:2]]
    with tempfile.TemporaryDirectory(prefix="tinyseek-chat-") as scratch:
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = Path(scratch) / "cpu-chat"
            train_cpu_chat(run_dir, args.quick)
        base, chat = (evaluate(resolve_checkpoint(folder), instructions, args)
                      for folder in (run_dir / "pretrain", run_dir))
        counts = {kind: sum(one.kind == kind for one in instructions) for kind, _ in RULES}
        source = f"Run `{args.run_dir}`" if args.run_dir else "configs/cpu-chat.yaml, trained by this benchmark"
        print(report(base, chat, {kind: count for kind, count in counts.items() if count}, source), end="")
        if args.json:
            args.json.write_text(json.dumps({"base": base, "chat": chat}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
