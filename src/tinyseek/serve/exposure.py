"""What makes the server safe to expose: the API key, CORS, a wall-clock deadline per request, the access log and
/metrics. Each is an ASGI middleware (or a route) around the OpenAI endpoints, which know nothing of them.

The middlewares are plain ASGI rather than Starlette's BaseHTTPMiddleware, so a streamed response passes through
untouched and the deadline sees the moment it starts: 504 before it, an error event after it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware

from tinyseek.serve.limits import Exposure, Limits
from tinyseek.serve.metrics import CURRENT_REQUEST, RequestRecord, ServerMetrics
from tinyseek.serve.protocol import APIError

ACCESS_LOG = logging.getLogger("tinyseek.serve.access")
# Paths served without the API key: the health check, and the playground's page and files (which hold no data and
# ask for the key when the API refuses them).
OPEN_PATHS = ("/health", "/")
OPEN_PREFIXES = ("/static/",)
# How long a timed-out stream's client gets to take its error event (a client reading one byte a second would
# otherwise hold the connection past the deadline).
LAST_WORD_SECONDS = 5.0


def install(app: FastAPI, limits: Limits, exposure: Exposure, metrics: ServerMetrics) -> None:
    """Add /metrics and the middlewares; outermost first: access log, CORS, API key, deadline."""

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.add_middleware(Deadline, seconds=limits.request_timeout)
    if exposure.api_key is not None:
        app.add_middleware(RequireAPIKey, key=exposure.api_key)
    if exposure.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(exposure.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    if exposure.access_log:
        app.add_middleware(AccessLog)


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class RequireAPIKey:
    """Every request outside OPEN_PATHS must carry `Authorization: Bearer KEY`; others get 401 in OpenAI's shape."""

    def __init__(self, app, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.is_open(scope["path"]):
            return await self.app(scope, receive, send)
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        # Constant time, so the answer's timing says nothing of how much of a guess was right.
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = ("this server asks for an API key: send it as `Authorization: Bearer KEY`" if not given
                   else "the API key is not this server's")
        error = APIError(401, message, code="invalid_api_key")
        await error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class Deadline:
    """Ends each request `seconds` after it arrived: with 504 if no response has started, else (a stream) with an
    error event and [DONE]. Ending it cancels the endpoint, whose own cleanup cancels the generation."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        response = {"started": False, "finished": False, "streaming": False}

        async def watched_send(message) -> None:
            if message["type"] == "http.response.start":
                response["started"] = True
                response["streaming"] = any(name == b"content-type" and value.startswith(b"text/event-stream")
                                            for name, value in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response["finished"] = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, watched_send), self.seconds)
        except asyncio.TimeoutError:
            error = APIError(504, f"the request took longer than this server's limit of {self.seconds:g} s "
                                  "(--request-timeout); its generation was stopped", type="timeout",
                             code="request_timeout")
            if not response["started"]:
                await error_response(error)(scope, receive, send)
            elif not response["finished"]:
                last = f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n" if response["streaming"] else ""
                try:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": last.encode()}),
                                           LAST_WORD_SECONDS)
                except asyncio.TimeoutError:
                    pass  # the client does not read: the server closes the connection as the request ends


class AccessLog:
    """One line per request on the `tinyseek.serve.access` logger, once it has ended: client, method, path, status,
    duration and the tokens generated for it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record, status, started = RequestRecord(), None, time.perf_counter()

        async def watched_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        current = CURRENT_REQUEST.set(record)
        try:
            await self.app(scope, receive, watched_send)
        finally:
            CURRENT_REQUEST.reset(current)
            client = scope.get("client") or ("-", 0)
            ACCESS_LOG.info('%s "%s %s" %s %.3f s %d tokens', client[0], scope["method"], scope["path"],
                            status if status is not None else "-", time.perf_counter() - started, record.tokens)
