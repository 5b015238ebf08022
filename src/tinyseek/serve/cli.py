"""`tinyseek serve`: one model behind OpenAI's completions and chat API, with a playground page at `/`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tinyseek.errors import ConfigError
from tinyseek.generate.cli import add_weights_argument
from tinyseek.loading import add_source_arguments, load_from_arguments
from tinyseek.serve.limits import Exposure, Limits

API_KEY_VARIABLE = "TINYSEEK_API_KEY"


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
        help="decode with the step compiled by torch.compile: faster tokens, after a startup that compiles the step "
             "once per batch size (1, 8, 32, 64 rows; seconds each) before it opens the port",
    )
    add_weights_argument(parser)
    parser.add_argument(
        "--worker", choices=("auto", "process", "thread"), default="auto",
        help="where generation runs: 'process', a process of its own, so that HTTP work never holds the interpreter "
             "lock the decode step needs (steadier token timing under load); 'thread', a thread of the server's "
             "process; 'auto' (default): process on a CPU, thread on other devices",
    )
    parser.add_argument(
        "--chat-template-for-base-model", action="store_true",
        help="answer /v1/chat/completions with the tokenizer's chat template even when the model was not "
             "chat-trained (by default a base model's chat requests are refused)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body accepted (413 beyond)")
    parser.add_argument("--max-streams", type=int, default=defaults.max_streams,
                        help="rows decoded together in one batch (a request with n takes n)")
    parser.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                        help="requests waiting for a generation slot (503 beyond)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                        help="most new tokens one request may ask for (400 beyond)")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout, metavar="SECONDS",
                        help="wall-clock limit of one request, queueing included: then 504, or an error event "
                             "ending a stream, and its generation stops (default %(default)g)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                        help="every endpoint but /health asks for `Authorization: Bearer KEY` (default: the "
                             f"{API_KEY_VARIABLE} environment variable; unset: no key); the playground asks for it")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let browser pages from ORIGIN (e.g. https://app.example.com, or *) call the API; "
                             "repeat for several (default: none, CORS off)")
    parser.add_argument("--access-log", action="store_true",
                        help="log one line per request to stderr: client, method, path, status, seconds, tokens")
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
        limits = Limits(args.max_body_bytes, args.max_streams, args.max_waiting, args.max_tokens,
                        args.request_timeout)
        exposure = Exposure(args.api_key, tuple(args.cors_origin), args.access_log)
    except ConfigError as error:  # named after the flag that set it
        raise ConfigError(f"--{str(error).replace('_', '-')}") from None
    if args.access_log:
        log_access_to_stderr()
    from tinyseek.device import choose_device  # here, not at the top: `--help` answers without torch

    model, tokenizer = load_from_arguments(args, choose_device(args.device))
    name = args.model_name or (args.run_dir or args.model).resolve().name
    generation_process = args.worker == "process" or (args.worker == "auto" and model.device.type == "cpu")
    app = create_app(model, tokenizer, model_name=name, limits=limits, exposure=exposure, compile=args.compile,
                     weights=args.weights, chat_template_for_base_model=args.chat_template_for_base_model,
                     generation_process=generation_process)
    print(f"serving {name} on http://{args.host}:{args.port}/ (playground) and /v1 (OpenAI API)", file=sys.stderr)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {args.host} is reachable from other machines and no --api-key (or {API_KEY_VARIABLE}) "
              "is set: anyone who reaches it can use it", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def log_access_to_stderr() -> None:
    access = logging.getLogger("tinyseek.serve.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
