"""The OpenAI wire format that `tinyseek serve` speaks: request bodies, response objects, errors.

Requests are validated strictly (a number sent as a string is an error, as with OpenAI) but unknown fields are
ignored, as OpenAI-compatible servers do: clients such as Open WebUI send fields of their own. Fields of OpenAI's
schema that the server does not implement are refused by name unless their value asks for nothing it lacks
(`Unsupported`); the ones it ignores on purpose are listed, with the reason, in docs/serving.md.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4
# OpenAI's own limits.
MAX_CHOICES = 128
MAX_LOGIT_BIAS = 300
# torch.Generator.manual_seed takes any 64-bit integer, signed or not.
SEED_RANGE = Field(ge=-(1 << 63), lt=1 << 64)
TokenId = Annotated[int, Field(ge=0)]


@dataclass(frozen=True)
class Unsupported:
    """A field of OpenAI's schema this server does not implement: refused with 400 naming it, unless its value asks
    for nothing the server lacks (`serves`, e.g. `tools: []` or `response_format: {"type": "text"}`)."""

    serves: Callable[[Any], bool]
    why: str


def refusal(param: str, why: str) -> PydanticCustomError:
    """The validation error `parse_request` answers as 400 with code unsupported_parameter, naming `param`."""
    return PydanticCustomError("unsupported_parameter", "{param}: {why}", {"param": param, "why": why})


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: StrictBool = False


class Request(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    unsupported: ClassVar[dict[str, Unsupported]] = {}

    model: StrictStr | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Not in OpenAI's API but accepted by vLLM and others; 0 keeps OpenAI's meaning (no top-k cut).
    top_k: Annotated[int, Field(ge=0)] = 0
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, SEED_RANGE] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    # Token ids (as strings, JSON's keys) to a bias added to their logits; checked against the vocabulary by
    # `token_biases`.
    logit_bias: dict[StrictStr, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # tinyseek's own: per token, the routed experts of each MoE layer and the top alternatives (an extra field
    # of the response, so OpenAI clients are unaffected).
    routing: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, body):
        # OpenAI accepts null for any optional field, and some clients send it rather than leave the field out.
        return {key: value for key, value in body.items() if value is not None} if isinstance(body, dict) else body

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, body):
        if isinstance(body, dict):
            for name, field in cls.unsupported.items():
                if body.get(name) is not None and not field.serves(body[name]):
                    raise refusal(name, field.why)
        return body

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_biases(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs; APIError 400 naming the field for more entries than OpenAI allows
        or a key that is not a token id of this model (never silently ignored)."""
        biases = self.logit_bias or {}
        if len(biases) > MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias has {len(biases)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                           param="logit_bias", code="invalid_value")
        pairs = []
        for key, bias in biases.items():
            if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
                raise APIError(400, f"logit_bias: {key[:40]!r} is not a token id of this model (0 to {vocab_size - 1})",
                               param="logit_bias", code="invalid_value")
            pairs.append((int(key), bias))
        return tuple(pairs)

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives each token's logprobs list, or None when logprobs are not asked for."""
        raise NotImplementedError


class CompletionRequest(Request):
    unsupported: ClassVar[dict[str, Unsupported]] = {
        "suffix": Unsupported(lambda value: value == "", "inserting text before a suffix is not implemented: the "
                              "models are trained left to right only"),
        "echo": Unsupported(lambda value: value is False, "echoing the prompt is not implemented"),
    }

    # Text or token ids, as OpenAI takes them; one prompt per request.
    prompt: (StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)])
    max_tokens: Annotated[int, Field(ge=1)] = 16
    # The legacy endpoint's logprobs: how many alternatives per token (OpenAI allows 0 to 5).
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    # With n candidates returned, the best of n is all of them; picking the likeliest of more is not implemented.
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise refusal("best_of", f"best_of must equal n ({self.n}): returning the likeliest of more candidates "
                                     "than n is not implemented")
        return self

    def prompt_ids(self, encode: Callable[[str], list[int]]) -> list[int]:
        """The prompt's token ids: `encode`d when it is text."""
        prompt = self.prompt if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else self.prompt[0]
        return encode(prompt) if isinstance(prompt, str) else list(prompt)

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    # The roles of tinyseek's chat template (tinyseek.data.chat); tool calls are not part of it.
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Request):
    unsupported: ClassVar[dict[str, Unsupported]] = {
        "tools": Unsupported(lambda value: value == [], "tool calls are not implemented: the chat template has no "
                             "tool role"),
        "functions": Unsupported(lambda value: value == [], "function calls are not implemented"),
        "tool_choice": Unsupported(lambda value: value in ("none", "auto"), "tool calls are not implemented"),
        "function_call": Unsupported(lambda value: value in ("none", "auto"), "function calls are not implemented"),
        "response_format": Unsupported(lambda value: isinstance(value, dict) and value.get("type") == "text",
                                       "only {\"type\": \"text\"} is served: constrained JSON output is not "
                                       "implemented"),
        "modalities": Unsupported(lambda value: value == ["text"], "the models write text only"),
        "audio": Unsupported(lambda value: False, "the models write text only"),
        "web_search_options": Unsupported(lambda value: False, "this server has no web search"),
    }

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    # OpenAI's newer name for max_tokens.
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as `tinyseek.data.chat.render_chat` takes them."""
        return [{"role": message.role, "content": message.text()} for message in self.messages]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_request(model_class: type[Request], body: bytes) -> Request:
    """The validated request, or APIError 400 as OpenAI answers it: malformed JSON, a field of OpenAI's that is not
    implemented (code unsupported_parameter), or the first invalid value (invalid_value), naming the field."""
    try:
        return model_class.model_validate_json(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        if first["type"] == "json_invalid" or (first["type"] == "model_type" and not first["loc"]):
            raise APIError(400, f"the request body is not a JSON object: {first['msg']}", code="invalid_json") from None
        if first["type"] == "unsupported_parameter":
            raise APIError(400, first["msg"], param=first["ctx"]["param"], code="unsupported_parameter") from None
        param = parameter_name(first["loc"])
        raise APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None


def parameter_name(location: tuple) -> str:
    """OpenAI's `param` for a validation error's location: the field, or messages[i].field (pydantic also puts
    the names of union members in the location, which are not parameters)."""
    if len(location) >= 3 and location[0] == "messages" and isinstance(location[1], int):
        return f"messages[{location[1]}].{location[2]}"
    return str(location[0])


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

