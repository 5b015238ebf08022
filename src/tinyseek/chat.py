"""`tinyseek chat`: talk to a chat-trained model in the terminal.

Each reply streams to stdout as it is generated and ends at the end of the model's turn; notes go to stderr. The
conversation is rendered with the model's chat template (tinyseek.data.chat) every turn, so the model sees exactly
what the trainer and the server would give it; when it no longer fits the model's positions, the oldest exchanges
are dropped, with a note. Ctrl-C stops a reply (what was written stays in the conversation); Ctrl-C at the prompt,
Ctrl-D or /quit ends the session.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import TextIO

from tinyseek.errors import ConfigError
from tinyseek.generate.cli import add_weights_argument
from tinyseek.generate.sampling import Sampling
from tinyseek.loading import add_source_arguments, load_from_arguments

HELP = """commands:
  /reset            forget the conversation (the system message stays)
  /system TEXT      set the system message (/system alone removes it)
  /temperature X    sample at temperature X (0: greedy)
  /experts [LAYER]  toggle the per-token expert view (LAYER: a MoE layer's index; default the first)
  /help             this list
  /quit             end the session (as Ctrl-D does)"""
ANSI_RESET = "\x1b[0m"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyseek chat", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add_source_arguments(parser)
    parser.add_argument("--system", default="", help="a system message to begin the conversation with")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply, in tokens")
    defaults = Sampling()
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy decoding")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 switches top-k off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--seed", type=int, help="make sampling reproducible")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    add_weights_argument(parser)
    parser.add_argument(
        "--chat-template-for-base-model", action="store_true",
        help="talk to a model that was not chat-trained, with the tokenizer's chat template anyway",
    )
    return parser


class ChatSession:
    """One conversation with a loaded model: its messages, its settings and the terminal it talks to."""

    def __init__(self, model, tokenizer, args: argparse.Namespace, out: TextIO, log: TextIO):
        from tinyseek.data.chat import end_of_turn_ids
        from tinyseek.generate.engine import GenerationEngine  # torch: imported once the arguments parse

        self.tokenizer, self.out, self.log = tokenizer, out, log
        self.engine = GenerationEngine(model, tokenizer, weights=args.weights)
        self.stop_ids = frozenset(end_of_turn_ids(tokenizer))
        self.sampling = Sampling(args.temperature, args.top_k, args.top_p, seed=args.seed)
        self.max_new_tokens = args.max_new_tokens
        self.system = args.system
        self.messages: list[dict[str, str]] = []
        config = model.config
        self.positions = config.max_position_embeddings
        # A prompt leaves this much room for the reply; older exchanges are dropped to keep it.
        self.reply_room = min(self.max_new_tokens, self.positions // 4)
        self.moe_layers = [index for index, layer in enumerate(model.model.layers) if layer.feed_forward_spec.routes]
        self.expert_layer: int | None = None  # the MoE layer whose experts colour the reply; None: view off
        self.colour = out.isatty()

    def note(self, text: str) -> None:
        print(f"({text})", file=self.log, flush=True)

    def conversation(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def prompt_ids(self) -> list[int] | None:
        """The conversation's ids ending where the reply begins, after dropping the oldest exchanges that do not
        fit; None (and the new message forgotten) when the new message alone does not fit."""
        from tinyseek.data.chat import render_chat

        dropped = 0
        while True:
            ids = render_chat(self.tokenizer, self.conversation(), add_generation_prompt=True)
            if len(ids) <= self.positions - self.reply_room:
                break
            if len(self.messages) <= 1:
                self.messages.clear()
                self.note(f"your message is {len(ids)} tokens with the template; the model has {self.positions} "
                          f"positions and keeps {self.reply_room} for the reply: write a shorter one")
                return None
            del self.messages[:2]  # the oldest user message and the reply to it
            dropped += 1
        if dropped:
            self.note(f"dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''} to fit the model's "
                      f"{self.positions} positions")
        return ids

    def reply(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        prompt_ids = self.prompt_ids()
        if prompt_ids is None:
            return
        capture = self.expert_layer is not None
        steps = self.engine.stream([prompt_ids], self.sampling, self.max_new_tokens, capture=capture)
        pieces = []
        try:
            for (event,) in steps:
                if event.token_id in self.stop_ids:
                    break
                pieces.append(event.text)
                self.out.write(self.expert_view(event) if capture else event.text)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(ANSI_RESET if self.colour else "")
            self.note("reply stopped")
        finally:
            steps.close()
        self.out.write("\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def expert_view(self, event) -> str:
        """The token's text coloured by the expert it was routed to first in the chosen layer (tagged [expert]
        where stdout is not a terminal)."""
        if not event.text:
            return ""
        expert = event.experts[self.moe_layers.index(self.expert_layer)][0]
        if not self.colour:
            return f"[{expert}]{event.text}"
        from tinyseek.route import expert_colour

        red, green, blue = (int(expert_colour(expert)[i: i + 2], 16) for i in (1, 3, 5))
        return f"\x1b[38;2;{red};{green};{blue}m{event.text}{ANSI_RESET}"

    def command(self, line: str) -> bool:
        """Carry out a /command; False when the session should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name == "/quit":
            return False
        if name == "/reset":
            self.messages.clear()
            self.note("conversation cleared")
        elif name == "/system":
            self.system = argument
            self.note(f"system message set: {argument}" if argument else "system message removed")
        elif name == "/temperature":
            self.set_temperature(argument)
        elif name == "/experts":
            self.toggle_experts(argument)
        else:
            if name != "/help":
                self.note(f"unknown command {name}")
            print(HELP, file=self.log, flush=True)
        return True

    def set_temperature(self, argument: str) -> None:
        try:
            self.sampling = replace(self.sampling, temperature=float(argument))
        except ValueError:
            self.note(f"/temperature takes a number >= 0, got {argument!r}")
            return
        self.note(f"temperature {self.sampling.temperature:g}")

    def toggle_experts(self, argument: str) -> None:
        if not self.moe_layers:
            self.note("this model has no MoE layers: there are no experts to show")
            return
        if not argument:
            self.expert_layer = None if self.expert_layer is not None else self.moe_layers[0]
        elif argument.isdigit() and int(argument) in self.moe_layers:
            self.expert_layer = int(argument)
        else:
            self.note(f"/experts takes a MoE layer's index: one of {self.moe_layers}")
            return
        if self.expert_layer is None:
            self.note("expert view off")
        else:
            how = "coloured" if self.colour else "tagged [expert]"
            self.note(f"expert view on: each token {how} by the first expert that layer {self.expert_layer} routed it to")

    def run(self, stdin: TextIO) -> int:
        while True:
            print("you> ", end="", file=self.log, flush=True)
            try:
                line = stdin.readline()
            except KeyboardInterrupt:
                print(file=self.log)
                return 0
            if not line:
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.reply(line)


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("chat"), as the `tinyseek` dispatcher passes it."""
    args = build_parser().parse_args(argv[1:])
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    Sampling(args.temperature, args.top_k, args.top_p)  # refuses bad settings before the model loads
    from tinyseek.data.chat import chat_refusal
    from tinyseek.device import choose_device  # here, not at the top: `--help` answers without torch

    model, tokenizer = load_from_arguments(args, choose_device(args.device))
    refusal = chat_refusal(model.config, tokenizer, base_model_allowed=args.chat_template_for_base_model)
    if refusal is not None:
        raise ConfigError(f"cannot chat with {args.run_dir or args.model}: {refusal}")
    session = ChatSession(model, tokenizer, args, sys.stdout, sys.stderr)
    print("(type a message; /help lists the commands; Ctrl-C stops a reply, Ctrl-D ends)", file=sys.stderr)
    return session.run(sys.stdin)
