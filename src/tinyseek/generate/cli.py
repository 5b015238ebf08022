"""`tinyseek generate`: continue a prompt with a trained model, optionally streaming, and report tokens/s."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tinyseek.errors import ConfigError, FileError, TinySeekError
from tinyseek.generate.sampling import Sampling
from tinyseek.loading import add_source_arguments, load_from_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyseek generate",
        description="Continue a prompt with a trained model. The continuation goes to stdout, timings to stderr.",
    )
    add_source_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    prompt.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    defaults = Sampling()
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 means greedy decoding")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 switches top-k off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--min-p", type=float, default=defaults.min_p)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, help="make sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    parser.add_argument("--stream", action="store_true", help="print the continuation token by token")
    parser.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    parser.add_argument(
        "--compile", action="store_true",
        help="compile the decode step with torch.compile: seconds once, then faster tokens (long outputs)",
    )
    add_weights_argument(parser)
    return parser


WEIGHT_CHOICES = ("auto", "fp32", "bf16")  # tinyseek.device.WEIGHT_CHOICES, named here without importing torch
# bf16 meets the agreement rule (docs/decode.md, decode-bf16 block) and speeds up the compiled step, but the default
# eager step decodes a single row slower with bf16 weights (the same block's eager columns), so it stays opt-in:
# `--compile --weights auto` is the fast pair on CPUs with bf16 units.
DEFAULT_WEIGHTS = "fp32"


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """`--weights`, for every command that decodes (generate, chat, serve)."""
    parser.add_argument(
        "--weights", choices=WEIGHT_CHOICES, default=DEFAULT_WEIGHTS,
        help="the dtype the decode step keeps its weights in: bf16 reads half the bytes per token (fp32 accumulation; "
             "docs/decode.md gives its agreement with fp32); auto picks bf16 on CPUs with avx512_bf16 or amx_bf16 "
             "and GPUs with bf16, fp32 elsewhere (default: %(default)s)",
    )


class Session:
    """A loaded model and the settings every prompt is continued with."""

    def __init__(self, model, tokenizer, sampling: Sampling, args: argparse.Namespace):
        from tinyseek.generate.engine import GenerationEngine  # torch: imported once the arguments parse

        self.tokenizer, self.sampling, self.args = tokenizer, sampling, args
        decoder = "compiled" if args.compile else "lean"
        self.engine = GenerationEngine(model, tokenizer, decoder=decoder, weights=args.weights)
        self.positions = model.config.max_position_embeddings

    def continue_prompt(self, prompt: str) -> str:
        """Write the continuation (after the prompt with --echo) to stdout, as it comes with --stream, and the
        timings to stderr; return the continuation."""
        out, log = sys.stdout, sys.stderr
        from tinyseek.data.tokenizer import encode_prompt

        prompt_ids = encode_prompt(self.tokenizer, prompt)
        room = self.engine.room(len(prompt_ids))
        if 0 < room < self.args.max_new_tokens:
            print(f"note: at most {room} new tokens fit in the model's {self.positions} positions", file=log)
        if self.args.echo:
            out.write(prompt)
            out.flush()
        start = first_token_at = time.perf_counter()
        steps = self.engine.stream([prompt_ids], self.sampling, self.args.max_new_tokens, stop=self.args.stop)
        pieces = []
        new_tokens = 0
        for new_tokens, (event,) in enumerate(steps, start=1):
            if new_tokens == 1:
                first_token_at = time.perf_counter()
            pieces.append(event.text)
            if self.args.stream and event.text:
                out.write(event.text)
                out.flush()
        end = time.perf_counter()
        text = "".join(pieces)
        out.write(("" if self.args.stream else text) + "\n")
        out.flush()
        decode_rate = (new_tokens - 1) / (end - first_token_at) if new_tokens > 1 else float("nan")
        print(
            f"{new_tokens} tokens in {end - start:.2f} s: {new_tokens / (end - start):.1f} tokens/s "
            f"(prompt {len(prompt_ids)} tokens, first token after {first_token_at - start:.3f} s, "
            f"then {decode_rate:.1f} tokens/s; {self.engine.path})",
            file=log,
        )
        return text


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("generate"), as the `tinyseek` dispatcher passes it."""
    args = build_parser().parse_args(argv[1:])
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.prompt_file is not None:
        try:
            args.prompt = args.prompt_file.read_text()
        except OSError as error:
            raise FileError(f"--prompt-file: {error}") from None
    from tinyseek.device import choose_device  # here, not at the top: `--help` answers without torch

    model, tokenizer = load_from_arguments(args, choose_device(args.device))
    session = Session(model, tokenizer, sampling, args)
    if not args.interactive:
        session.continue_prompt(args.prompt)
        return 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            try:
                session.continue_prompt(line.rstrip("\n"))
            except TinySeekError as error:
                print(f"error: {error}", file=sys.stderr)
