"""The FastAPI application: OpenAI-compatible endpoints, health, and the playground page, over one loaded model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from tinyseek.data.chat import chat_refusal, end_of_turn_ids, render_chat
from tinyseek.data.tokenizer import encode_prompt
from tinyseek.generate.engine import GenerationEngine, TokenLogprobs
from tinyseek.generate.sampling import Sampling
from tinyseek.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Request as GenerationRequest,
    new_id,
    now,
    parse_request,
    usage,
)
from tinyseek.serve.exposure import install as install_exposure
from tinyseek.serve.limits import Exposure, Limits
from tinyseek.serve.metrics import ServerMetrics
from tinyseek.serve.scheduler import FINISHED, Job, QueueFull, Scheduler
from tinyseek.serve.worker import GenerationProcess

STATIC = resources.files("tinyseek.serve") / "static"
ERROR_TYPES = {404: "not_found_error", 503: "server_overloaded"}


def create_app(model, tokenizer, *, model_name: str = "tinyseek", limits: Limits = Limits(),
               exposure: Exposure = Exposure(), compile: bool = False, weights: str = "fp32",
               chat_template_for_base_model: bool = False, generation_process: bool = False) -> FastAPI:
    """The server for one model. The generation thread starts and stops with the application's lifespan, in this
    process or, with `generation_process`, in a process of its own (tinyseek.serve.worker: what `tinyseek serve`
    runs on a CPU); `exposure` says who may call it and what it logs (tinyseek.serve.exposure).

    Chat requests are rendered with the tokenizer's chat template when the model is chat-trained (or
    `chat_template_for_base_model` says to use it anyway) and refused otherwise; where chat is served, every
    generation stops at the end of a turn."""
    chat_refused = chat_refusal(model.config, tokenizer, base_model_allowed=chat_template_for_base_model)
    stop_ids = end_of_turn_ids(tokenizer) if chat_refused is None else None
    engine_options = {"decoder": "compiled" if compile else "lean", "weights": weights, "eos_token_ids": stop_ids}
    engine = GenerationEngine(model, tokenizer, **engine_options)
    room = {"max_streams": limits.max_streams, "max_waiting": limits.max_waiting, "compile": compile}
    if generation_process:
        scheduler = GenerationProcess(model, tokenizer, engine_options, **room)
    else:
        scheduler = Scheduler(engine, model.device, **room)
    metrics = ServerMetrics(scheduler)
    config = model.config
    moe_layers = [index for index, layer in enumerate(model.model.layers) if layer.feed_forward_spec.routes]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(scheduler.start)  # it compiles first where asked, before the socket opens
        yield
        scheduler.stop()

    app = FastAPI(title="tinyseek", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = ERROR_TYPES.get(error.status_code, "invalid_request_error")
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind).body(),
                            status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "requests": scheduler.requests_held()}

    def model_description() -> dict:
        return {
            "id": model_name, "object": "model", "created": now(), "owned_by": "tinyseek",
            # tinyseek's own: what the playground needs to draw the routing (OpenAI clients ignore it).
            "tinyseek": {
                "attention_type": config.attention_type, "moe_layers": moe_layers,
                "n_routed_experts": config.n_routed_experts if moe_layers else 0,
                "num_experts_per_tok": config.num_experts_per_tok if moe_layers else 0,
                "max_position_embeddings": config.max_position_embeddings, "max_tokens": limits.max_tokens,
                # Whether /v1/chat/completions answers, and why not.
                "chat": chat_refused is None, "chat_refused": chat_refused,
            },
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_description()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found", type="not_found_error")
        return model_description()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_request(CompletionRequest, await read_body(request, limits.max_body_bytes))
        prompt_ids = body.prompt_ids(lambda text: encode_prompt(tokenizer, text))
        job = submit(body, prompt_ids, "prompt", body.max_tokens)
        reply = CompletionReply(new_id("cmpl"), model_name, job, routing=body.routing)
        return await respond(request, body, job, reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_request(ChatRequest, await read_body(request, limits.max_body_bytes))
        if chat_refused is not None:
            raise APIError(400, f"this server does not answer chat requests for {model_name!r}: {chat_refused}; "
                           "/v1/completions continues plain text", param="messages", code="model_not_chat_trained")
        try:
            prompt_ids = render_chat(tokenizer, body.conversation(), add_generation_prompt=True)
        except TemplateError as error:
            raise APIError(400, f"messages: {error}", param="messages", code="invalid_value") from None
        requested = body.max_completion_tokens or body.max_tokens
        job = submit(body, prompt_ids, "messages", requested)
        reply = ChatReply(new_id("chatcmpl"), model_name, job, routing=body.routing)
        return await respond(request, body, job, reply)

    def submit(body: GenerationRequest, prompt_ids: list[int], prompt_param: str, requested_tokens: int | None) -> Job:
        """Check the request, then queue its generation (APIError when it cannot be served)."""
        if requested_tokens is not None and requested_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {requested_tokens}; this server allows at most {limits.max_tokens}",
                           param="max_tokens", code="max_tokens_exceeded")
        if prompt_ids and max(prompt_ids) >= config.vocab_size:
            raise APIError(400, f"{prompt_param}: token id {max(prompt_ids)} is not in the model's vocabulary of "
                           f"{config.vocab_size}", param=prompt_param, code="invalid_value")
        positions = config.max_position_embeddings
        if len(prompt_ids) >= positions:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens long; the model has {positions} positions",
                           param=prompt_param, code="context_length_exceeded")
        if body.n > limits.max_streams:
            raise APIError(400, f"n is {body.n}; this server generates at most {limits.max_streams} rows at once",
                           param="n", code="invalid_value")
        if body.routing and body.n > 1:
            raise APIError(400, "routing describes one choice: ask for it with n=1", param="routing",
                           code="invalid_value")
        max_new_tokens = min(requested_tokens or limits.max_tokens, engine.room(len(prompt_ids)))
        sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                            logit_bias=body.token_biases(config.vocab_size))
        job = Job(prompt_ids, sampling, max_new_tokens, body.stop_strings(), body.routing, asyncio.get_running_loop(),
                  n=body.n, top_logprobs=body.top_logprobs_asked())
        metrics.watch(job)
        try:
            scheduler.submit(job)
        except QueueFull as error:
            raise APIError(503, str(error), type="server_overloaded", code="queue_full") from None
        return job

    async def respond(request: Request, body: GenerationRequest, job: Job, reply: Reply):
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(reply.chunks(include_usage), release=lambda: scheduler.cancel(job))
        collect = asyncio.ensure_future(reply.collect())
        disconnect = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait((collect, disconnect), return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not collect.done():  # the client went away (or the server is stopping)
                collect.cancel()
                scheduler.cancel(job)
        if collect.cancelled():
            return Response(status_code=499)
        return JSONResponse(collect.result())

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    install_exposure(app, limits, exposure, metrics)
    return app


class EventStream(StreamingResponse):
    """Server-sent events of OpenAI chunks, ending with [DONE]. However the response ends (finished, or the client
    went away, even before the first event) `release` runs at once, so a departed client's slot is freed."""

    def __init__(self, chunks: AsyncIterator[dict], release: Callable[[], None]):
        super().__init__(self.events(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.release = release

    @staticmethod
    async def events(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def finite(logprob: float) -> float:
    """A log-probability for JSON: OpenAI's floor of -9999 for a token the sampling settings rule out (-inf)."""
    return max(logprob, -9999.0)


class Reply:
    """Turns a job's token events into OpenAI response objects: whole, or as stream chunks; one choice per row."""

    object_name: str
    chunk_object_name: str

    def __init__(self, reply_id: str, model_name: str, job: Job, *, routing: bool):
        self.id, self.model_name, self.job, self.routing = reply_id, model_name, job, routing
        self.created = now()
        self.completion_tokens = 0

    async def events(self) -> AsyncIterator:
        """The job's token events (each step's events of its rows), until it finishes."""
        while True:
            item = await self.job.events.get()
            if item is FINISHED:
                # Rows that end together (a step's last tokens) hand over their last chunks first, then end their
                # responses: ending one takes longer than a chunk, and the others' last tokens would wait for it.
                await asyncio.sleep(0)
                return
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item!r}", type="server_error")
            for event in item:
                self.completion_tokens += 1
                yield event

    def token_routing(self, event) -> dict:
        return {
            "text": event.text, "experts": event.experts,
            "alternatives": [[text, round(probability, 5)] for _, text, probability in event.alternatives],
        }

    def head(self, chunk: bool) -> dict:
        return {"id": self.id, "object": self.chunk_object_name if chunk else self.object_name,
                "created": self.created, "model": self.model_name}

    def usage(self) -> dict:
        return usage(len(self.job.prompt_ids), self.completion_tokens)

    async def collect(self) -> dict:
        choices = range(self.job.n)
        pieces, tokens, reasons, routing = [[] for _ in choices], [[] for _ in choices], [None for _ in choices], []
        async for event in self.events():
            pieces[event.row].append(event.text)
            reasons[event.row] = event.finish_reason or reasons[event.row]
            if event.logprobs is not None:
                tokens[event.row].append(event.logprobs)
            if self.routing:
                routing.append(self.token_routing(event))
        response = {**self.head(chunk=False), "usage": self.usage(), "choices": [
            self.choice(index, "".join(pieces[index]), reasons[index], self.logprobs(index, tokens[index]))
            for index in choices
        ]}
        if self.routing:
            response["tinyseek"] = {"tokens": routing}
        return response

    async def chunks(self, include_usage: bool) -> AsyncIterator[dict]:
        for first in self.first_chunks():
            yield first
        try:
            # One chunk per token, even one whose text is held back (half a UTF-8 character, or what may begin a
            # stop string), as vLLM streams: a client's inter-token gaps then measure the steps, not the text.
            async for event in self.events():
                logprobs = self.logprobs(event.row, [event.logprobs] if event.logprobs is not None else [])
                chunk = {**self.head(chunk=True),
                         "choices": [self.delta(event.row, event.text, event.finish_reason, logprobs)]}
                if self.routing:
                    chunk["tinyseek"] = {"tokens": [self.token_routing(event)]}
                yield chunk
        except APIError as error:
            yield error.body()
            return
        if include_usage:
            yield {**self.head(chunk=True), "choices": [], "usage": self.usage()}

    def first_chunks(self) -> list[dict]:
        return []

    def logprobs(self, index: int, tokens: list[TokenLogprobs]) -> dict | None:
        """The choice's `logprobs` object for these tokens (None when the request did not ask for logprobs)."""
        raise NotImplementedError

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        raise NotImplementedError

    def delta(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        raise NotImplementedError


class CompletionReply(Reply):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_offsets = [0] * self.job.n  # where each choice's next token starts in its text

    def logprobs(self, index: int, tokens: list[TokenLogprobs]) -> dict | None:
        if self.job.top_logprobs is None:
            return None
        offsets = []
        for token in tokens:
            offsets.append(self.text_offsets[index])
            self.text_offsets[index] += len(token.text)
        return {
            "tokens": [token.text for token in tokens], "token_logprobs": [finite(token.logprob) for token in tokens],
            "top_logprobs": [{text: finite(logprob) for _, text, logprob in token.top} for token in tokens],
            "text_offset": offsets,
        }

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    delta = choice


class ChatReply(Reply):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"

    def first_chunks(self) -> list[dict]:
        return [{**self.head(chunk=True),
                 "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]}
                for index in range(self.job.n)]

    def logprobs(self, index: int, tokens: list[TokenLogprobs]) -> dict | None:
        if self.job.top_logprobs is None:
            return None
        return {"content": [
            {**self.token(token.text, token.logprob),
             "top_logprobs": [self.token(text, logprob) for _, text, logprob in token.top]}
            for token in tokens
        ], "refusal": None}

    @staticmethod
    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode())}

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def delta(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish_reason}
