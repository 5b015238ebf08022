"""`tinyseek serve`: one model behind OpenAI's completions and chat API, with a playground page at `/`."""

from __future__ import annotations

import argparse
import sys

from tinyseek.errors import ConfigError
from tinyseek.generate.cli import add_weights_argument
from tinyseek.loading import add_source_arguments, load_from_arguments
from tinyseek.serve.limits import Limits


def build_parser() -> argparse.ArgumentParser:
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="tinyseek serve", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add_source_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the model id clients see (default: the run or model folder's name)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    parser.add_argument(
        "--compile", action="store_true",
        help="decode with the step compiled by torch.compile: faster tokens, but the first request of each size "
             "(cache lengths go in powers of two) waits a few seconds while it compiles",
    )
    add_weights_argument(parser)
    parser.add_argument(
        "--chat-template-for-base-model", action="store_true",
        help="answer /v1/chat/completions with the tokenizer's chat template even when the model was not "
             "chat-trained (by default a base model's chat requests are refused)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body accepted (413 beyond)")
    parser.add_argument("--max-streams", type=int, default=defaults.max_streams,
                        help="generations advanced together, a token each in turn")
    parser.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                        help="requests waiting for a generation slot (503 beyond)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                        help="most new tokens one request may ask for (422 beyond)")
    return parser


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("serve"), as the `tinyseek` dispatcher passes it."""
    args = build_parser().parse_args(argv[1:])
    try:
        import uvicorn

        from tinyseek.serve.app import create_app
    except ImportError as error:
        raise ConfigError(f"tinyseek serve needs the serve extra: pip install 'tinyseek[serve]' ({error})") from None
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    try:
        limits = Limits(args.max_body_bytes, args.max_streams, args.max_waiting, args.max_tokens)
    except ConfigError as error:  # named after the flag that set it
        raise ConfigError(f"--{str(error).replace('_', '-')}") from None
    from tinyseek.device import choose_device  # here, not at the top: `--help` answers without torch

    model, tokenizer = load_from_arguments(args, choose_device(args.device))
    name = args.model_name or (args.run_dir or args.model).resolve().name
    app = create_app(model, tokenizer, model_name=name, limits=limits, compile=args.compile, weights=args.weights,
                     chat_template_for_base_model=args.chat_template_for_base_model)
    print(f"serving {name} on http://{args.host}:{args.port}/ (playground) and /v1 (OpenAI API)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
