"""`tinyseek serve`: the official OpenAI client against a server on a loopback port, compared with `tinyseek generate`;
every error case; concurrent streams; a client that goes away; the routing capture; the playground in Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from tinyseek.cli import main as tinyseek_main
from tinyseek.data.chat import END_OF_TURN_TOKEN, end_of_turn_ids, mark_chat_trained, render_chat
from tinyseek.generate.engine import GenerationEngine
from tinyseek.generate.sampling import Sampling
from tinyseek.loading import load_model_and_tokenizer
from tinyseek.testing import streamed_chunks

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from tinyseek.serve.app import Limits, create_app  # noqa: E402  (needs fastapi, from the serve extra)
from tinyseek.serve.limits import Exposure  # noqa: E402
from tinyseek.serve.background import BackgroundServer  # noqa: E402

LIMITS = Limits(max_body_bytes=4096, max_streams=4, max_waiting=6, max_tokens=40)
# Bounds every network wait of these tests.
TIMEOUT = 60


class LoopbackServer(BackgroundServer):
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model, letters_only, byte_tokenizer, write_run):
    """A run whose MoE model writes readable lowercase letters with the byte-level tokenizer."""
    torch.set_num_threads(1)
    model = letters_only(tiny_model(attention_type="linear", max_position_embeddings=64))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # letters far above every other token, so sampled text is letters too
    return write_run(tmp_path_factory.mktemp("serve") / "run", model, byte_tokenizer).parent.parent


@pytest.fixture(scope="module")
def chat_run_dir(tmp_path_factory, tiny_model, letters_only, chat_byte_tokenizer, write_run):
    """The same kind of letter-writing model, marked chat-trained, with the chat template's tokens."""
    model = letters_only(tiny_model(attention_type="linear", max_position_embeddings=64,
                                    vocab_size=len(chat_byte_tokenizer)))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    mark_chat_trained(model.config)
    return write_run(tmp_path_factory.mktemp("serve") / "chat", model, chat_byte_tokenizer).parent.parent


@pytest.fixture(scope="module")
def chat_server(chat_run_dir):
    model, tokenizer = load_model_and_tokenizer(chat_run_dir, "cpu")
    with LoopbackServer(create_app(model, tokenizer, model_name="letters", limits=LIMITS)) as running:
        yield running


@pytest.fixture(scope="module")
def server(run_dir):
    model, tokenizer = load_model_and_tokenizer(run_dir, "cpu")
    with LoopbackServer(create_app(model, tokenizer, model_name="letters", limits=LIMITS)) as running:
        yield running


def generate_command(run_dir, capsys, prompt: str, *options: str) -> str:
    """What `tinyseek generate` prints for this prompt (its trailing newline removed)."""
    capsys.readouterr()
    assert tinyseek_main(["generate", "--run-dir", str(run_dir), "--prompt", prompt, "--device", "cpu", *options]) == 0
    return capsys.readouterr().out.removesuffix("\n")


SAMPLED = dict(temperature=0.9, top_p=0.8, seed=7, max_tokens=12)
SAMPLED_FLAGS = ("--temperature", "0.9", "--top-p", "0.8", "--top-k", "0", "--seed", "7", "--max-new-tokens", "12")


def completion_texts(client, **request) -> tuple[str, str]:
    whole = client.completions.create(model="letters", **request)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(model="letters", stream=True,
                                                                                    **request) if chunk.choices)
    assert whole.usage.completion_tokens == request["max_tokens"] and whole.choices[0].finish_reason == "length"
    return whole.choices[0].text, streamed


def test_openai_client_gets_the_text_of_tinyseek_generate_alone_and_while_another_request_streams(
    server, run_dir, capsys
):
    client = server.client()
    assert [model.id for model in client.models.list()] == ["letters"]
    assert client.models.retrieve("letters").id == "letters"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    expected = generate_command(run_dir, capsys, "the cat", *SAMPLED_FLAGS)
    assert expected
    assert completion_texts(client, prompt="the cat", **SAMPLED) == (expected, expected)

    # A base model's chat requests are refused, not wrapped in a template it never learned.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="letters", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    error = refused.value.body
    assert error["code"] == "model_not_chat_trained" and error["param"] == "messages"
    assert "its tokenizer has no tinyseek chat template" in error["message"]
    assert httpx.get(f"{server.url}/v1/models/letters", timeout=TIMEOUT).json()["tinyseek"]["chat"] is False

    # Another request streams throughout: its tokens are interleaved with ours, our text must not change.
    with client.completions.create(model="letters", prompt="a dog", max_tokens=40, stream=True) as other:
        first = next(iter(other))
        assert first.choices[0].index == 0  # its first token has come: it is streaming
        assert completion_texts(client, prompt="the cat", **SAMPLED) == (expected, expected)
        assert server.client().with_options(timeout=TIMEOUT).models.list()  # still answering
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_stream_usage_and_stop_strings_follow_openai(server, run_dir, capsys):
    client = server.client()
    greedy = generate_command(run_dir, capsys, "on", "--temperature", "0", "--max-new-tokens", "20")
    stop = greedy[5:7]
    chunks = list(client.completions.create(model="letters", prompt="on", temperature=0, max_tokens=20, stop=[stop],
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == greedy[: greedy.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 3
    # One chunk per token, including those whose text waited to be told from the stop string.
    assert len([chunk for chunk in chunks if chunk.choices]) == chunks[-1].usage.completion_tokens


ERROR_CASES = [
    # (body, status, param)
    (b'{"prompt": "hi", "max_tokens": ', 400, None),
    (b'["a list"]', 400, None),
    (json.dumps({"prompt": "hi", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "temperature": 2.5}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "hi", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "hi", "n": 5}).encode(), 400, "n"),  # more choices than --max-streams rows
    (json.dumps({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"max_tokens": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "max_tokens": 41}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x" * 70}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x" * 5000}).encode(), 413, None),
]


@pytest.mark.parametrize(("body", "status", "param"), ERROR_CASES)
def test_each_bad_request_gets_its_status_and_an_openai_error_body_and_the_server_keeps_serving(
    server, body, status, param
):
    response = httpx.post(f"{server.url}/v1/completions", content=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    # Greedy: the letters-only head never prefers EOS (a sampled EOS would end the completion after one token).
    follow_up = server.client().completions.create(model="letters", prompt="hi", max_tokens=2, temperature=0)
    assert follow_up.usage.completion_tokens == 2


def test_a_chat_trained_model_answers_with_its_template_alone_and_while_another_request_streams(
    chat_server, chat_run_dir
):
    model, tokenizer = load_model_and_tokenizer(chat_run_dir, "cpu")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    prompt_ids = render_chat(tokenizer, messages, add_generation_prompt=True)
    sampling = Sampling(temperature=SAMPLED["temperature"], top_k=0, top_p=SAMPLED["top_p"], seed=SAMPLED["seed"])
    engine = GenerationEngine(model, tokenizer, eos_token_ids=end_of_turn_ids(tokenizer))
    (expected,) = engine.generate([prompt_ids], sampling, SAMPLED["max_tokens"])
    assert expected.text

    client = chat_server.client()
    assert httpx.get(f"{chat_server.url}/v1/models/letters", timeout=TIMEOUT).json()["tinyseek"]["chat"] is True
    chat = client.chat.completions.create(model="letters", messages=messages, **SAMPLED)
    assert chat.choices[0].message.content == expected.text
    assert chat.usage.prompt_tokens == len(prompt_ids)
    with client.completions.create(model="letters", prompt="a dog", max_tokens=40, stream=True) as other:
        assert next(iter(other)).choices[0].index == 0  # its first token has come: it is streaming
        streamed = client.chat.completions.create(model="letters", messages=messages, stream=True, **SAMPLED)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == expected.text


def test_a_base_model_served_with_the_explicit_flag_stops_at_the_end_of_its_turn(
    tiny_model, letters_only, chat_byte_tokenizer
):
    model = letters_only(tiny_model(attention_type="linear", max_position_embeddings=64,
                                    vocab_size=len(chat_byte_tokenizer)))
    end_of_turn = chat_byte_tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    with torch.no_grad():  # a large constant in the residual stream's first channel, read by <|EOT|>'s row alone
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight[end_of_turn] = 0.0
        model.lm_head.weight[end_of_turn, 0] = 10.0
    from starlette.testclient import TestClient

    without_flag = TestClient(create_app(model, chat_byte_tokenizer, limits=LIMITS)).post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert without_flag.status_code == 400 and "it is a base model" in without_flag.json()["error"]["message"]
    app = create_app(model, chat_byte_tokenizer, limits=LIMITS, chat_template_for_base_model=True)
    with LoopbackServer(app) as running:
        chat = running.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=10, temperature=0)
        assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == ("", "stop")
        assert chat.usage.completion_tokens == 1
        # Where chat is served, plain completions end at the end of a turn too.
        completion = running.client().completions.create(model="m", prompt="hi", max_tokens=10, temperature=0)
        assert completion.usage.completion_tokens == 1 and completion.choices[0].finish_reason == "stop"


def test_chat_errors_and_ignored_unknown_fields(chat_server):
    server = chat_server
    url = f"{server.url}/v1/chat/completions"
    bad_role = httpx.post(url, json={"messages": [{"role": "robot", "content": "hi"}]}, timeout=TIMEOUT)
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages[0].role"
    assert httpx.post(url, json={"messages": []}, timeout=TIMEOUT).status_code == 400
    late_system = httpx.post(url, timeout=TIMEOUT, json={"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "system", "content": "x"}]})
    assert late_system.status_code == 400 and "system message must come first" in late_system.json()["error"]["message"]
    # Open WebUI and others send fields of their own; they are ignored.
    # Null means the default, as with OpenAI.
    extra = {"messages": [{"role": "user", "content": "hi", "name": "x"}], "max_tokens": 3, "user": "u",
             "options": {"a": 1}, "session_id": "s", "temperature": None, "stop": None, "seed": None}
    reply = httpx.post(url, json=extra, timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


async def stream_tokens(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, int, str | None]:
    """(seconds to the first token, tokens streamed, finish reason) of one streamed completion."""
    start, first, tokens, finish = time.perf_counter(), None, 0, None
    body = {"prompt": "the", "max_tokens": max_tokens, "stream": True, "routing": True, "temperature": 0}
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        async for chunk in streamed_chunks(response.aiter_lines()):
            assert "error" not in chunk
            first = first or time.perf_counter()
            tokens += len(chunk["tinyseek"]["tokens"])
            finish = chunk["choices"][0]["finish_reason"] or finish
    return first - start, tokens, finish


def test_eight_concurrent_streams_all_finish_with_their_full_length(run_dir):
    model, tokenizer = load_model_and_tokenizer(run_dir, "cpu")
    limits = Limits(max_streams=8, max_waiting=0, max_tokens=40)

    async def eight(url: str):
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            return await asyncio.gather(*(stream_tokens(client, url, 24) for _ in range(8)))

    with LoopbackServer(create_app(model, tokenizer, limits=limits)) as server:
        results = asyncio.run(asyncio.wait_for(eight(f"{server.url}/v1/completions"), TIMEOUT))
        assert [(tokens, finish) for _, tokens, finish in results] == [(24, "length")] * 8
        # Every slot was freed: a full round again is admitted.
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json() == {
            "status": "ok", "model": "tinyseek", "requests": 0}


def test_a_full_server_answers_503_and_a_client_that_goes_away_frees_its_slot_at_once(run_dir):
    model, tokenizer = load_model_and_tokenizer(run_dir, "cpu")
    gate = threading.Event()
    slowed = model.forward

    def forward(*args, **kwargs):  # hold every step until the test lets it go: the slot stays taken
        gate.wait(TIMEOUT)
        return slowed(*args, **kwargs)

    model.forward = forward
    limits = Limits(max_streams=1, max_waiting=0, max_tokens=40)
    with LoopbackServer(create_app(model, tokenizer, limits=limits)) as server:
        def requests_held() -> int:
            return httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()["requests"]

        def wait_until_freed() -> None:
            deadline = time.monotonic() + TIMEOUT
            while requests_held():
                assert time.monotonic() < deadline, "the slot of a client that went away was not freed"
                time.sleep(0.02)

        try:
            first = server.client().completions.create(model="m", prompt="a", max_tokens=40, stream=True)
            busy = httpx.post(f"{server.url}/v1/completions", json={"prompt": "b"}, timeout=TIMEOUT)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
            assert requests_held() == 1
            first.close()  # the client goes away mid-stream while its step is still running
            wait_until_freed()
            gate.set()
            assert server.client().completions.create(model="m", prompt="b", max_tokens=2).usage.completion_tokens == 2

            gate.clear()  # the same for a client that gives up waiting for a whole (not streamed) response
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/v1/completions", json={"prompt": "c", "max_tokens": 40}, timeout=1)
            wait_until_freed()
        finally:
            gate.set()
        assert server.client().completions.create(model="m", prompt="d", max_tokens=2).usage.completion_tokens == 2


def test_a_generation_process_answers_as_the_generation_thread_does_and_its_loss_fails_requests_cleanly(
    server, run_dir
):
    model, tokenizer = load_model_and_tokenizer(run_dir, "cpu")
    requests = [
        {"prompt": "the cat", **SAMPLED},
        {"prompt": "a dog", "max_tokens": 9, "temperature": 0, "logprobs": 2},
        {"prompt": "x", "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2, "stop": ["q"]},
    ]

    def answers(running) -> list:
        replies = []
        for request in requests:
            whole = httpx.post(f"{running.url}/v1/completions", json=request, timeout=TIMEOUT).json()
            streamed = httpx.post(f"{running.url}/v1/completions", json={**request, "stream": True}, timeout=TIMEOUT)
            chunks = [json.loads(line.removeprefix("data: "))["choices"] for line in streamed.iter_lines()
                      if line.startswith("data: {")]
            replies.append(([(choice["text"], choice["logprobs"], choice["finish_reason"]) for choice in
                             whole["choices"]], whole["usage"], chunks))
        return replies

    app = create_app(model, tokenizer, model_name="letters", limits=LIMITS, generation_process=True)
    with LoopbackServer(app) as separate:
        assert answers(separate) == answers(server)
        metrics = httpx.get(f"{separate.url}/metrics", timeout=TIMEOUT).text
        assert "tinyseek_active_streams 0.0" in metrics and "tinyseek_waiting_streams 0.0" in metrics
        assert httpx.get(f"{separate.url}/health", timeout=TIMEOUT).json()["requests"] == 0

        worker = app.state.scheduler.process
        worker.kill()
        worker.join(TIMEOUT)
        gone = httpx.post(f"{separate.url}/v1/completions", json={"prompt": "a"}, timeout=TIMEOUT)
        assert gone.status_code == 503 and "the generation process has exited" in gone.json()["error"]["message"]
        assert httpx.get(f"{separate.url}/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_routing_names_the_experts_of_every_moe_layer_and_does_not_depend_on_what_else_runs(server):
    def routed(**extra):
        response = httpx.post(f"{server.url}/v1/completions", timeout=TIMEOUT,
                              json={"prompt": "the", "max_tokens": 6, "temperature": 0, "routing": True, **extra})
        return response.json()

    alone = routed()
    tokens = alone["tinyseek"]["tokens"]
    assert "".join(token["text"] for token in tokens) == alone["choices"][0]["text"]
    for token in tokens:
        assert len(token["experts"]) == 2 and all(len(set(layer)) == 2 for layer in token["experts"])
        assert all(0 <= expert < 4 for layer in token["experts"] for expert in layer)
        probabilities = [p for _, p in token["alternatives"]]
        assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
    with server.client().completions.create(model="m", prompt="xyz", max_tokens=40, stream=True,
                                            extra_body={"routing": True}) as other:
        next(iter(other))
        assert routed()["tinyseek"] == alone["tinyseek"]
    info = httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()["data"][0]["tinyseek"]
    assert info["moe_layers"] == [0, 1] and info["n_routed_experts"] == 4


# --- the playground, in a real browser ------------------------------------------------------------------------


def chromium_driver():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        message = "needs headless Chromium and its driver: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("TINYSEEK_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("selenium")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def test_playground_streams_tokens_coloured_by_expert_in_chromium(
    server, tmp_path, tiny_model, byte_tokenizer, letters_only
):
    driver = chromium_driver()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, TIMEOUT)
        wait.until(lambda d: "letters" in d.find_element(By.ID, "model-name").text)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("the cat")
        for field, value in (("max-tokens", "20"), ("temperature", "0")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done")
        expected = server.client().completions.create(model="letters", prompt="the cat", max_tokens=20, temperature=0)
        tokens = driver.find_elements(By.CSS_SELECTOR, "#output .token")
        assert len(tokens) == expected.usage.completion_tokens
        assert "".join(token.text for token in tokens) == expected.choices[0].text.strip()
        driver.find_element(By.ID, "colour-experts").click()
        coloured = driver.find_elements(By.CSS_SELECTOR, "#output .token[class*='expert-']")
        assert len(coloured) == len(tokens)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#histograms .histogram")) == 2
        screenshot = tmp_path / "playground.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        print(f"screenshot: {screenshot}")
        Select(driver.find_element(By.ID, "layer")).select_by_visible_text("all layers (strip)")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#output .token .layers i")) == 2 * len(tokens)

        dense = letters_only(tiny_model(ffn_type="dense"))
        with LoopbackServer(create_app(dense, byte_tokenizer, model_name="dense")) as dense_server:
            driver.get(dense_server.url + "/")
            wait.until(lambda d: "dense" in d.find_element(By.ID, "model-name").text)
            assert driver.find_element(By.ID, "dense-note").is_displayed()
            assert not driver.find_element(By.ID, "colour-experts").is_enabled()
    finally:
        driver.quit()


def test_playground_asks_for_the_api_key_once_and_streams_with_it(run_dir):
    model, tokenizer = load_model_and_tokenizer(run_dir, "cpu")
    app = create_app(model, tokenizer, model_name="letters", limits=LIMITS, exposure=Exposure(api_key="sk-play"))
    with LoopbackServer(app) as guarded:
        driver = chromium_driver()
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            driver.get(guarded.url + "/")
            wait = WebDriverWait(driver, TIMEOUT)
            asked = wait.until(expected_conditions.alert_is_present())
            assert "API key" in asked.text
            asked.send_keys("sk-play")
            asked.accept()
            wait.until(lambda d: "letters" in d.find_element(By.ID, "model-name").text)
            for field, value in (("max-tokens", "5"), ("temperature", "0")):
                driver.find_element(By.ID, field).clear()
                driver.find_element(By.ID, field).send_keys(value)
            driver.find_element(By.ID, "generate").click()  # the key is kept: no second question
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#output .token")) == 5
        finally:
            driver.quit()


def test_playground_chat_mode_streams_replies_with_the_template_and_the_expert_view_in_chromium(
    chat_server, chat_run_dir, monkeypatch, tiny_model, letters_only, chat_byte_tokenizer
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tinyseek.serve.scheduler import Scheduler

    queued = []  # the prompt ids the server queues, whoever asks
    submit = Scheduler.submit

    def recording(self, job):
        queued.append(job.prompt_ids)
        return submit(self, job)

    monkeypatch.setattr(Scheduler, "submit", recording)
    _, tokenizer = load_model_and_tokenizer(chat_run_dir, "cpu")
    driver = chromium_driver()

    def fill(field: str, value: str) -> None:
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)

    def turns() -> list:
        return driver.find_elements(By.CSS_SELECTOR, "#conversation .turn")

    try:
        driver.get(chat_server.url + "/")
        wait = WebDriverWait(driver, TIMEOUT)
        wait.until(lambda d: "letters" in d.find_element(By.ID, "model-name").text)
        driver.find_element(By.ID, "mode-chat").click()
        assert driver.find_element(By.ID, "send").is_displayed() and not driver.find_element(By.ID, "generate").is_displayed()
        assert not driver.find_element(By.ID, "chat-notice").is_displayed()
        for field, value in (("system", "Sé bref."), ("max-tokens", "8"), ("temperature", "0")):
            fill(field, value)
        messages = [{"role": "system", "content": "Sé bref."}]
        for said in ("hi there", "más, ça va?"):
            fill("message", said)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done"
                       and len(turns()) == len(messages) + 1)
            messages.append({"role": "user", "content": said})
            # The ids the playground's request became are the template's, as the trainer renders them.
            assert queued[-1] == render_chat(tokenizer, messages, add_generation_prompt=True)
            expected = chat_server.client().chat.completions.create(model="letters", messages=messages, max_tokens=8,
                                                                     temperature=0)
            reply = turns()[-1]
            assert reply.find_element(By.CSS_SELECTOR, ".role").text.lower() == "model"
            assert reply.find_element(By.CSS_SELECTOR, ".text").text == expected.choices[0].message.content
            assert len(reply.find_elements(By.CSS_SELECTOR, ".token")) == expected.usage.completion_tokens
            messages.append({"role": "assistant", "content": expected.choices[0].message.content})
        assert [turn.find_element(By.CSS_SELECTOR, ".text").text for turn in turns()] == [
            message["content"] for message in messages[1:]]

        driver.find_element(By.ID, "colour-experts").click()
        tokens = driver.find_elements(By.CSS_SELECTOR, "#conversation .token")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#conversation .token[class*='expert-']")) == len(tokens) == 16
        assert len(driver.find_elements(By.CSS_SELECTOR, "#histograms .histogram")) == 2
        driver.find_element(By.ID, "reset").click()
        assert not turns()

        # A base model's server refuses chat: the page says why, before and after a message is sent.
        base = letters_only(tiny_model(max_position_embeddings=64, vocab_size=len(chat_byte_tokenizer)))
        with LoopbackServer(create_app(base, chat_byte_tokenizer, model_name="base")) as base_server:
            driver.get(base_server.url + "/")
            wait.until(lambda d: "base" in d.find_element(By.ID, "model-name").text)
            driver.find_element(By.ID, "mode-chat").click()
            notice = driver.find_element(By.ID, "chat-notice")
            assert notice.is_displayed() and "it is a base model" in notice.text
            fill("message", "hello")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "error")
            assert "does not answer chat requests" in notice.text and "it is a base model" in notice.text
            assert not turns() and driver.find_element(By.ID, "message").get_attribute("value") == "hello"
    finally:
        driver.quit()


# --- `tinyseek route` ----------------------------------------------------------------------------------------


def test_route_command_draws_a_png_of_the_requested_size_for_a_seed_preset_model(tmp_path, capsys, write_run):
    from PIL import Image

    from tinyseek import TinySeekConfig, TinySeekForCausalLM
    from tinyseek.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = TinySeekForCausalLM(TinySeekConfig.from_preset("seed")).eval()
    run = write_run(tmp_path / "run", model, load_tokenizer("builtin")).parent.parent
    out = tmp_path / "figures" / "routes.png"
    argv = ["route", "--run-dir", str(run), "--text", "The cat sat on the mat.", "--out", str(out),
            "--width", "1000", "--height", "700"]
    assert tinyseek_main(argv) == 0
    assert "4 MoE layers" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (1000, 700)
        colours = set(image.convert("RGB").get_flattened_data())
    # Every expert's colour is in the picture (a load histogram bar each, whatever the routing).
    from tinyseek.route import expert_colour
    assert {tuple(int(expert_colour(e)[i:i + 2], 16) for i in (1, 3, 5)) for e in range(4)} <= colours


def test_route_command_refuses_a_dense_model(tmp_path, capsys, tiny_model, letters_only, byte_tokenizer, write_run):
    run = write_run(tmp_path / "run", letters_only(tiny_model(ffn_type="dense")), byte_tokenizer).parent.parent
    assert tinyseek_main(["route", "--run-dir", str(run), "--text", "hi", "--out", str(tmp_path / "r.png")]) == 2
    assert "dense" in capsys.readouterr().err


def test_serve_command_listens_on_loopback_by_default_and_refuses_bad_limits(run_dir, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tinyseek", "serve", "--run-dir", str(run_dir), "--port", str(port)]
    process = subprocess.Popen([*command, "--access-log"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 4 * TIMEOUT  # a fresh interpreter imports torch, transformers and FastAPI
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "tinyseek serve did not start"
                time.sleep(0.1)
        assert health == {"status": "ok", "model": "run", "requests": 0}
        # On a CPU it generates in a process of its own (--worker auto).
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "a", "max_tokens": 3},
                           timeout=TIMEOUT)
        assert reply.json()["usage"]["completion_tokens"] == 3
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=TIMEOUT)
        assert page.status_code == 200 and "playground.js" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/static/playground.js", timeout=TIMEOUT).status_code == 200
    finally:
        process.terminate()
        _, err = process.communicate(timeout=TIMEOUT)
    assert f"http://127.0.0.1:{port}/" in err
    assert '127.0.0.1 "GET /static/playground.js" 200 ' in err  # --access-log: a line per request
    assert "Traceback" not in err  # the generation process, too, stopped cleanly

    refused = subprocess.run([*command[:-2], "--max-streams", "0"], capture_output=True, text=True, timeout=TIMEOUT)
    assert refused.returncode == 2 and "--max-streams must be at least 1" in refused.stderr
    assert "Traceback" not in refused.stderr
