"""One tinyseek server in a child process, for the load benchmarks: the clients measure it as a deployed server
meets them, sharing neither its interpreter lock (in one process, parsing 32 streams slows the server's generation
thread, and a stream's gaps with it) nor its memory."""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import torch

from tinyseek.serve.app import Limits, create_app


def serve(args, load_model: Callable, limits: Limits, port: int, compile: bool) -> None:
    """The server process: the model and uvicorn, on `port` of the loopback interface, until terminated."""
    import uvicorn

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args)
    # Generation in a process of its own, as `tinyseek serve` runs on a CPU.
    app = create_app(model, tokenizer, limits=limits, compile=compile, generation_process=True)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server_process(args, load_model: Callable, limits: Limits, *, compile: bool = False
                   ) -> Iterator[tuple[int, multiprocessing.Process]]:
    """(port, process) of a server serving `load_model(args)` on `args.threads` torch threads, once it has answered
    one completion (a compiled server compiles before it opens its port: up to `args.timeout` seconds)."""
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(args, load_model, limits, port, compile))
    server.start()
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                           timeout=args.timeout).raise_for_status()
                break
            except httpx.TransportError:
                if not server.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        yield port, server
    finally:
        server.terminate()
        server.join(30)
        if server.is_alive():
            server.kill()
