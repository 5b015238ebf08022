"""`tinyseek serve`'s HTTP layer: OpenAI's request schema field by field (honoured, refused by name, or ignored as
docs/serving.md lists), the API key, CORS, the request deadline, /metrics and the access log."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import httpx
import pytest
import torch

from tinyseek.cli import main as tinyseek_main
from tinyseek.data.chat import mark_chat_trained

openai = pytest.importorskip("openai")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from tinyseek.serve.app import create_app  # noqa: E402
from tinyseek.serve.background import BackgroundServer  # noqa: E402
from tinyseek.serve.limits import Exposure, Limits  # noqa: E402

LIMITS = Limits(max_body_bytes=4096, max_streams=4, max_waiting=6, max_tokens=40)
TIMEOUT = 60
KEY = "sk-tinyseek-test"


@pytest.fixture(scope="module")
def letters_model(tiny_model, letters_only, one_thread):
    """Writes lowercase letters only, greedy or sampled (never EOS), so every request gets max_tokens tokens."""
    def build(**overrides):
        model = letters_only(tiny_model(attention_type="linear", max_position_embeddings=64, **overrides))
        with torch.no_grad():
            model.lm_head.weight.mul_(20)
        return model
    return build


@pytest.fixture(scope="module")
def server(letters_model, byte_tokenizer):
    with BackgroundServer(create_app(letters_model(), byte_tokenizer, model_name="letters", limits=LIMITS)) as running:
        yield running


@pytest.fixture(scope="module")
def chat_server(letters_model, chat_byte_tokenizer):
    model = letters_model(vocab_size=len(chat_byte_tokenizer))
    mark_chat_trained(model.config)
    with BackgroundServer(create_app(model, chat_byte_tokenizer, model_name="letters", limits=LIMITS)) as running:
        yield running


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


GREEDY = {"max_tokens": 2, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], **GREEDY}
COMPLETION = {"prompt": "hi", **GREEDY}

# (body, the field a 400 names and its code; None: answered 200). Every field of OpenAI's CreateCompletionRequest
# and CreateChatCompletionRequest outside the five continuous batching brings (n, logprobs/top_logprobs,
# presence_penalty, frequency_penalty, logit_bias) appears here.
COMPLETION_FIELDS = [
    ({"model": "anything"}, None),
    ({"prompt": ["hi"]}, None),
    ({"prompt": [104, 105]}, None),  # token ids: "hi" in the byte tokenizer
    ({"prompt": [[104, 105]]}, None),
    ({"prompt": [104, 10**6]}, ("prompt", "invalid_value")),
    ({"prompt": [[104], [105]]}, ("prompt", "invalid_value")),
    ({"prompt": ["a", "b"]}, ("prompt", "invalid_value")),
    ({"prompt": []}, ("prompt", "invalid_value")),
    ({"suffix": ""}, None),
    ({"suffix": "the end"}, ("suffix", "unsupported_parameter")),
    ({"echo": False}, None),
    ({"echo": True}, ("echo", "unsupported_parameter")),
    ({"best_of": 1}, None),
    ({"best_of": 3}, ("best_of", "unsupported_parameter")),
    ({"best_of": 0}, ("best_of", "invalid_value")),
    ({"seed": (1 << 64) - 1}, None),
    ({"seed": -(1 << 63)}, None),
    ({"seed": 1 << 64}, ("seed", "invalid_value")),
    ({"seed": -(1 << 63) - 1}, ("seed", "invalid_value")),
    ({"seed": 10**40}, ("seed", "invalid_value")),
    ({"seed": 1.5}, ("seed", "invalid_value")),
    ({"max_tokens": 0}, ("max_tokens", "invalid_value")),
    ({"max_tokens": 41}, ("max_tokens", "max_tokens_exceeded")),
    ({"temperature": -0.1}, ("temperature", "invalid_value")),
    ({"top_p": 1.5}, ("top_p", "invalid_value")),
    ({"stop": "zz", "stream": False, "stream_options": {"include_usage": True, "include_obfuscation": False}}, None),
    ({"user": "u-1"}, None),
]
CHAT_FIELDS = [
    ({"max_completion_tokens": 2}, None),
    ({"tools": []}, None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     ("tools", "unsupported_parameter")),
    ({"tool_choice": "none"}, None),
    ({"tool_choice": "required"}, ("tool_choice", "unsupported_parameter")),
    ({"parallel_tool_calls": False}, None),
    ({"functions": [{"name": "f"}]}, ("functions", "unsupported_parameter")),
    ({"function_call": {"name": "f"}}, ("function_call", "unsupported_parameter")),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, ("response_format", "unsupported_parameter")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     ("response_format", "unsupported_parameter")),
    ({"modalities": ["text"]}, None),
    ({"modalities": ["text", "audio"]}, ("modalities", "unsupported_parameter")),
    ({"audio": {"voice": "alloy", "format": "wav"}}, ("audio", "unsupported_parameter")),
    ({"web_search_options": {}}, ("web_search_options", "unsupported_parameter")),
    # Ignored, as docs/serving.md says why.
    ({"store": True, "metadata": {"k": "v"}, "user": "u", "safety_identifier": "s", "prompt_cache_key": "p",
      "service_tier": "auto", "reasoning_effort": "low", "verbosity": "low",
      "prediction": {"type": "content", "content": "hello"}}, None),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": "1"}]},
     ("messages[1].role", "invalid_value")),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     ("messages[0].content", "invalid_value")),
    ({"seed": 1 << 64}, ("seed", "invalid_value")),
]


def check_answer(response: httpx.Response, refused: tuple[str, str] | None) -> None:
    if refused is None:
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (*refused, "invalid_request_error")
    assert error["message"].startswith(refused[0].split("[")[0])


@pytest.mark.parametrize(("fields", "refused"), COMPLETION_FIELDS, ids=lambda v: json.dumps(v)[:60])
def test_each_completions_field_is_honoured_or_refused_by_name(server, fields, refused):
    check_answer(httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, **fields}, timeout=TIMEOUT), refused)


@pytest.mark.parametrize(("fields", "refused"), CHAT_FIELDS, ids=lambda v: json.dumps(v)[:60])
def test_each_chat_field_is_honoured_refused_by_name_or_ignored(chat_server, fields, refused):
    body = {**CHAT, **fields}
    check_answer(httpx.post(f"{chat_server.url}/v1/chat/completions", json=body, timeout=TIMEOUT), refused)


def test_token_id_prompts_are_taken_as_they_are(server):
    """A text prompt begins as training documents do (here EOS, id 256, then the bytes); ids are used unchanged."""
    as_text = client(server).completions.create(model="m", prompt="hi", max_tokens=6, temperature=0)
    as_ids = client(server).completions.create(model="m", prompt=[256, 104, 105], max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text and as_ids.usage == as_text.usage
    bare = client(server).completions.create(model="m", prompt=[[104, 105]], max_tokens=6, temperature=0)
    assert bare.usage.prompt_tokens == 2


def test_non_numbers_and_values_beyond_64_bits_are_400_not_500(server):
    for raw in (b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": Infinity}',
                b'{"prompt": "hi", "seed": 123456789012345678901234567890}'):
        response = httpx.post(f"{server.url}/v1/completions", content=raw, timeout=TIMEOUT,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["param"] in ("temperature", "top_p", "seed")


def test_the_openai_client_sees_refusals_as_bad_requests_naming_the_field(server, chat_server):
    with pytest.raises(openai.BadRequestError) as suffix:
        client(server).completions.create(model="m", prompt="hi", suffix="end", max_tokens=2)
    assert suffix.value.body["param"] == "suffix" and suffix.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as seed:
        client(server).completions.create(model="m", prompt="hi", seed=1 << 70, max_tokens=2)
    assert seed.value.body["param"] == "seed"
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as refused:
        client(chat_server).chat.completions.create(model="m", messages=CHAT["messages"], tools=tools, max_tokens=2)
    assert refused.value.body["param"] == "tools" and refused.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as json_mode:
        client(chat_server).chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=2,
                                                    response_format={"type": "json_object"})
    assert json_mode.value.body["param"] == "response_format"
    reply = client(chat_server).chat.completions.create(
        model="m", messages=CHAT["messages"], max_tokens=2, temperature=0, response_format={"type": "text"},
        store=False, user="u", metadata={"a": "b"}, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)


# --- the API key ----------------------------------------------------------------------------------------------


def test_an_api_key_guards_every_endpoint_but_health_and_the_playground_files(letters_model, byte_tokenizer):
    app = create_app(letters_model(), byte_tokenizer, limits=LIMITS, exposure=Exposure(api_key=KEY))
    with BackgroundServer(app) as running:
        def get(path: str, **headers) -> httpx.Response:
            return httpx.get(running.url + path, headers=headers, timeout=TIMEOUT)

        assert get("/health").status_code == 200
        assert get("/").status_code == 200 and get("/static/playground.js").status_code == 200
        for path in ("/v1/models", "/v1/models/tinyseek", "/metrics"):
            missing, wrong = get(path), get(path, Authorization=f"Bearer {KEY}x")
            for answer in (missing, wrong):
                assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
                assert answer.json()["error"]["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in missing.json()["error"]["message"]
            assert get(path, Authorization=f"Bearer {KEY}").status_code == 200
        assert get("/v1/models", Authorization=KEY).status_code == 401  # the scheme is part of the header
        posted = httpx.post(f"{running.url}/v1/completions", json=COMPLETION, timeout=TIMEOUT)
        assert posted.status_code == 401

        with pytest.raises(openai.AuthenticationError):
            client(running, "wrong").completions.create(model="m", prompt="hi", max_tokens=2)
        reply = client(running, KEY).completions.create(model="m", prompt="hi", max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens == 2


def test_the_api_key_comes_from_the_flag_or_the_environment_and_an_empty_one_is_refused(monkeypatch, capsys, tmp_path):
    from tinyseek.serve.cli import build_parser

    monkeypatch.setenv("TINYSEEK_API_KEY", "from-env")
    assert build_parser().parse_args(["--run-dir", "r"]).api_key == "from-env"
    assert build_parser().parse_args(["--run-dir", "r", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.setenv("TINYSEEK_API_KEY", " ")
    # Refused before any model is loaded: the run directory need not exist.
    assert tinyseek_main(["serve", "--run-dir", str(tmp_path / "none")]) == 2
    assert "--api-key is empty" in capsys.readouterr().err
    monkeypatch.delenv("TINYSEEK_API_KEY")
    assert tinyseek_main(["serve", "--run-dir", str(tmp_path / "none"), "--request-timeout", "0"]) == 2
    assert "--request-timeout must be at least 1" in capsys.readouterr().err


# --- CORS -----------------------------------------------------------------------------------------------------


def preflight(app, origin: str) -> httpx.Response:
    return TestClient(app).options("/v1/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_is_off_unless_origins_are_named(letters_model, byte_tokenizer):
    model = letters_model()
    closed = create_app(model, byte_tokenizer, limits=LIMITS)
    assert "access-control-allow-origin" not in preflight(closed, "https://app.example").headers
    assert "access-control-allow-origin" not in TestClient(closed).get(
        "/health", headers={"Origin": "https://app.example"}).headers

    exposure = Exposure(api_key=KEY, cors_origins=("https://app.example",))
    opened = create_app(model, byte_tokenizer, limits=LIMITS, exposure=exposure)
    allowed = preflight(opened, "https://app.example")  # a preflight carries no key, and needs none
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in preflight(opened, "https://evil.example").headers
    health = TestClient(opened).get("/health", headers={"Origin": "https://app.example"})
    assert health.headers["access-control-allow-origin"] == "https://app.example"


# --- the deadline ---------------------------------------------------------------------------------------------


def test_a_request_past_its_deadline_ends_with_504_or_an_error_event_and_its_generation_is_cancelled(
    letters_model, byte_tokenizer
):
    model = letters_model()
    gate = threading.Event()
    step = model.forward

    def forward(*args, **kwargs):  # every step waits for the test: the generation outlives the deadline
        gate.wait(TIMEOUT)
        return step(*args, **kwargs)

    model.forward = forward
    limits = Limits(max_streams=2, max_waiting=2, max_tokens=40, request_timeout=1)
    with BackgroundServer(create_app(model, byte_tokenizer, limits=limits)) as running:
        def requests_held() -> int:
            return httpx.get(f"{running.url}/health", timeout=TIMEOUT).json()["requests"]

        try:
            whole = httpx.post(f"{running.url}/v1/completions", json={"prompt": "a", "max_tokens": 40},
                               timeout=TIMEOUT)
            assert whole.status_code == 504
            assert whole.json()["error"]["code"] == "request_timeout" and "--request-timeout" in \
                whole.json()["error"]["message"]
            assert requests_held() == 0

            with httpx.stream("POST", f"{running.url}/v1/completions", timeout=TIMEOUT,
                              json={"prompt": "a", "max_tokens": 40, "stream": True}) as streamed:
                assert streamed.status_code == 200
                lines = [line for line in streamed.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
            assert requests_held() == 0
        finally:
            gate.set()
        reply = client(running).completions.create(model="m", prompt="b", max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens == 2


# --- /metrics and the access log -------------------------------------------------------------------------------


def scrape(url: str, **headers) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=TIMEOUT).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if not sample.labels or sample.labels.get("le") in (None, "+Inf")}


def test_metrics_count_tokens_time_them_and_show_active_and_waiting_streams(letters_model, byte_tokenizer):
    model = letters_model()
    gate = threading.Event()
    gate.set()
    step = model.forward

    def forward(*args, **kwargs):
        gate.wait(TIMEOUT)
        return step(*args, **kwargs)

    model.forward = forward
    limits = Limits(max_streams=1, max_waiting=2, max_tokens=40)
    with BackgroundServer(create_app(model, byte_tokenizer, limits=limits)) as running:
        assert scrape(running.url)["tinyseek_generated_tokens_total"] == 0
        client(running).completions.create(model="m", prompt="hi", max_tokens=5, temperature=0)
        streamed = client(running).completions.create(model="m", prompt="hi", max_tokens=7, stream=True, temperature=0)
        assert sum(len(chunk.choices[0].text) for chunk in streamed) == 7
        metrics = scrape(running.url)
        assert metrics["tinyseek_generated_tokens_total"] == 12
        assert metrics["tinyseek_time_to_first_token_seconds_count"] == 2
        assert metrics["tinyseek_inter_token_latency_seconds_count"] == 4 + 6  # one per step after the first
        assert metrics["tinyseek_inter_token_latency_seconds_sum"] > 0
        assert (metrics["tinyseek_active_streams"], metrics["tinyseek_waiting_streams"]) == (0, 0)

        gate.clear()
        try:
            held = [client(running).completions.create(model="m", prompt="a", max_tokens=3, stream=True, temperature=0)
                    for _ in range(2)]
            deadline = time.monotonic() + TIMEOUT
            while (scrape(running.url)["tinyseek_active_streams"], scrape(running.url)["tinyseek_waiting_streams"]) \
                    != (1, 1):
                assert time.monotonic() < deadline, "one stream should run and one wait"
                time.sleep(0.02)
        finally:
            gate.set()
        assert [sum(len(chunk.choices[0].text) for chunk in stream) for stream in held] == [3, 3]


def test_the_access_log_is_off_by_default_and_says_one_line_per_request(letters_model, byte_tokenizer, caplog):
    model = letters_model()
    with caplog.at_level(logging.INFO, logger="tinyseek.serve.access"):
        with BackgroundServer(create_app(model, byte_tokenizer, limits=LIMITS)) as quiet:
            client(quiet).completions.create(model="m", prompt="hi", max_tokens=2)
        assert not [record for record in caplog.records if record.name == "tinyseek.serve.access"]

        app = create_app(model, byte_tokenizer, limits=LIMITS, exposure=Exposure(access_log=True))
        with BackgroundServer(app) as logged:
            client(logged).completions.create(model="m", prompt="hi", max_tokens=3, temperature=0)
            stream = client(logged).completions.create(model="m", prompt="hi", max_tokens=4, stream=True, temperature=0)
            assert sum(len(chunk.choices[0].text) for chunk in stream) == 4
            assert httpx.post(f"{logged.url}/v1/completions", content=b"{", timeout=TIMEOUT).status_code == 400
            httpx.get(f"{logged.url}/health", timeout=TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while len([r for r in caplog.records if r.name == "tinyseek.serve.access"]) < 4:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    lines = [record.getMessage() for record in caplog.records if record.name == "tinyseek.serve.access"]
    assert len(lines) == 4
    pattern = re.compile(r'127\.0\.0\.1 "(?P<request>[A-Z]+ \S+)" (?P<status>\d+) \d+\.\d{3} s (?P<tokens>\d+) tokens')
    assert sorted(pattern.fullmatch(line).groups() for line in lines) == [
        ("GET /health", "200", "0"), ("POST /v1/completions", "200", "3"), ("POST /v1/completions", "200", "4"),
        ("POST /v1/completions", "400", "0")]
