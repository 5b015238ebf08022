"""A server on a free loopback port in a background thread, for tests, benchmarks and notebooks."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class BackgroundServer:
    """Serves `app` on 127.0.0.1 (a free port) for the duration of a `with` block; `url` is its address."""

    def __init__(self, app, *, start_timeout: float = 60.0):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.start_timeout = start_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.start_timeout)
        self.socket.close()
