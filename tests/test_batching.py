"""Continuous batching (`tinyseek.generate.batch`) and the OpenAI fields that live in the generation path (`n`,
`logprobs`/`top_logprobs`, `presence_penalty`, `frequency_penalty`, `logit_bias`), each checked against a
reference computed separately: every prompt decoded alone, or the model's logits over the whole sequence."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
import torch

from tinyseek.testing import EQUALITY_TIE, greedy_by_recomputation

from tinyseek.data.chat import mark_chat_trained, render_chat
from tinyseek.data.tokenizer import encode_prompt
from tinyseek.generate import GenerationEngine, Sampling
from tinyseek.generate.batch import ContinuousBatch
from tinyseek.loading import load_model_and_tokenizer
from tinyseek.testing import streamed_chunks

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from tinyseek.serve.app import Limits, create_app  # noqa: E402  (needs fastapi, from the serve extra)
from tinyseek.serve.background import BackgroundServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 99], [40, 41, 42, 43, 44, 45, 46, 47], [200, 3, 3, 150, 7], [9, 8]]
TIE = EQUALITY_TIE
TIMEOUT = 60
LIMITS = Limits(max_body_bytes=1 << 20, max_streams=32, max_waiting=8, max_tokens=400)
LONG = 400  # tokens of the streams that must still be running while another request comes and goes
# A logit_bias that keeps sampled text to letters (the byte tokenizer's ids are the bytes), so that each token's text
# names its id.
LETTERS = {letter: 20.0 for letter in b"abcdefghijklmnopqrstuvwxyz"}


# --- the batch itself, for every attention type ---------------------------------------------------------------



def run_schedule(batch: ContinuousBatch, schedule: dict[int, list[tuple]]) -> dict[object, list[int]]:
    """Advance the batch, adding (owner, prompt, sampling, max_new_tokens) entries from the steps the schedule names
    on, as soon as a row is free, until every row has finished; each owner's tokens."""
    tokens: dict[object, list[int]] = {}
    waiting: list[tuple] = []
    step = 0
    while step <= max(schedule) or waiting or batch.running or batch.prefills:
        waiting += schedule.get(step, [])
        while waiting and batch.room():
            owner, prompt, sampling, new_tokens = waiting.pop(0)
            batch.add(owner, prompt, sampling, new_tokens)
        for owner, event in batch.advance():
            tokens.setdefault(owner, []).append(event.token_id)
        step += 1
    return tokens


@pytest.mark.parametrize("join_by_steps", [0, 8], ids=["prefilled-in-chunks", "joining-by-decode-steps"])
def test_rows_that_join_and_leave_a_running_batch_each_decode_as_their_prompt_alone(
    attention_type, join_by_steps, tiny_model
):
    model = tiny_model(2, attention_type=attention_type)
    lengths = [10, 6, 8, 7]
    expected = {owner: greedy_by_recomputation(model, PROMPTS[owner], lengths[owner]) for owner in range(4)}
    engine, greedy = GenerationEngine(model, eos_token_ids=[]), Sampling(temperature=0)
    # Three rows at most: prompt 3 waits for a free row; the prompts that come while others decode are prefilled in
    # chunks of 3 between the steps, or feed their tokens through the steps; rows leave at different steps, so rows
    # move between slots.
    batch = ContinuousBatch(engine, rows=3, prefill_chunk=3, join_by_steps=join_by_steps)
    tokens = run_schedule(batch, {
        0: [(0, PROMPTS[0], greedy, lengths[0])],
        2: [(1, PROMPTS[1], greedy, lengths[1]), (2, PROMPTS[2], greedy, lengths[2])],
        3: [(3, PROMPTS[3], greedy, lengths[3])],
    })
    assert tokens == expected
    assert batch.room() == 3 and not batch.running
    # Prompts that arrive together are prefilled left-padded in one chunk, then decode from their own columns.
    batch = ContinuousBatch(engine, rows=3)
    assert run_schedule(batch, {0: [(owner, PROMPTS[owner], greedy, lengths[owner]) for owner in range(4)]}) == expected


def test_the_compiled_batch_decodes_as_each_prompt_alone(tiny_model):
    # Sliding-window MHA: a per-row mask, per-row window and left-padded rows in the compiled step (batch sizes 1
    # and 8, each compiled once).
    model = tiny_model(2, attention_type="sliding-window-mha")
    lengths = [10, 6, 8, 7]
    expected = {owner: greedy_by_recomputation(model, PROMPTS[owner], lengths[owner]) for owner in range(4)}
    batch = ContinuousBatch(GenerationEngine(model, eos_token_ids=[]), rows=3, compiled=True)
    greedy = Sampling(temperature=0)
    assert run_schedule(batch, {0: [(owner, PROMPTS[owner], greedy, lengths[owner]) for owner in range(4)]}) == expected
    assert batch.compiled  # not fallen back to the eager step


def test_a_compiled_server_compiles_each_batch_size_before_it_opens_and_never_while_serving(
    tiny_model, letters_only, byte_tokenizer, monkeypatch
):
    from tinyseek.generate import batch as batch_module

    first_calls = []  # batch sizes in the order their compiled step first ran: when it compiled
    compile_step = batch_module.compiled_lean_step

    def recording(*key):
        step = compile_step(*key)

        def call(*args):
            if key not in [seen for seen, _ in first_calls]:
                first_calls.append((key, key[2]))
            return step(*args)
        return call

    monkeypatch.setattr(batch_module, "compiled_lean_step", recording)
    model = letters_model(tiny_model, letters_only)
    limits = Limits(max_body_bytes=1 << 20, max_streams=3, max_waiting=2, max_tokens=40)
    app = create_app(model, byte_tokenizer, limits=limits, compile=True)
    with LoopbackServer(app, start_timeout=600) as server:
        assert [size for _, size in first_calls] == [1, 8]  # a batch of 3 rows runs on the 8-row step
        before = list(first_calls)
        choices = server.client().completions.create(model="tinyseek", prompt="ab", max_tokens=6, n=3,
                                                     temperature=0).choices
        assert first_calls == before and app.state.scheduler.batch.compiled
    expected = bytes(greedy_by_recomputation(model, list(b"ab"), 6)).decode()
    assert [choice.text for choice in choices] == [expected] * 3


def test_a_seeded_row_draws_as_the_engine_alone_does_whatever_else_runs(tiny_model):
    model = tiny_model(3, attention_type="mla")
    engine = GenerationEngine(model, eos_token_ids=[])
    sampling = Sampling(temperature=0.9, top_k=0, top_p=0.9, seed=11)
    alone = engine.generate([PROMPTS[2]], sampling, 12)[0].token_ids
    batch = ContinuousBatch(engine, rows=8)
    others = [(f"other {index}", PROMPTS[index % 4], Sampling(temperature=1.0, seed=index), 20) for index in range(7)]
    tokens = run_schedule(batch, {0: others[:4], 3: [("seeded", PROMPTS[2], sampling, 12)], 5: others[4:]})
    assert tokens["seeded"] == alone


def test_copies_of_a_prompt_that_joins_by_decode_steps_start_from_its_cache_when_its_prompt_is_read(tiny_model):
    model = tiny_model(4, attention_type="linear")  # a recurrent state: copied, not recomputed, for each copy
    batch = ContinuousBatch(GenerationEngine(model, eos_token_ids=[]), rows=4)
    greedy = Sampling(temperature=0)
    tokens: dict[tuple, list[int]] = {}

    def advance() -> None:
        for owner, event in batch.advance():
            tokens.setdefault((owner, event.row), []).append(event.token_id)

    batch.add("running", PROMPTS[0], greedy, 12)
    advance()
    batch.add("copies", PROMPTS[1], greedy, 6, copies=3)
    advance()
    assert len(batch.running) == 2 and batch.room() == 0  # the copies' rows are held while the first reads the prompt
    while batch.running or batch.prefills:
        advance()
    expected = greedy_by_recomputation(model, PROMPTS[1], 6)
    assert [tokens[("copies", row)] for row in range(3)] == [expected] * 3
    assert tokens[("running", 0)] == greedy_by_recomputation(model, PROMPTS[0], 12)


def test_cancel_frees_the_rows_of_a_prefilling_or_running_owner_at_once(tiny_model):
    batch = ContinuousBatch(GenerationEngine(tiny_model(attention_type="mha"), eos_token_ids=[]), rows=4)
    batch.add("running", PROMPTS[0], Sampling(temperature=0), 20, copies=2)
    batch.advance()
    batch.add("waiting", PROMPTS[1], Sampling(temperature=0), 20)
    assert batch.room() == 1
    batch.cancel("running")
    batch.cancel("waiting")
    assert batch.room() == 4 and not batch.running and not batch.prefills
    assert batch.advance() == []


# --- through the server, with the official client ---------------------------------------------------------------


class LoopbackServer(BackgroundServer):
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def letters_model(tiny_model, letters_only, **overrides):
    model = letters_only(tiny_model(attention_type="linear", max_position_embeddings=512, **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # letters far above every other token, so sampled text is letters too
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, letters_only, byte_tokenizer, write_run):
    run = write_run(tmp_path_factory.mktemp("batching") / "run", letters_model(tiny_model, letters_only),
                    byte_tokenizer).parent.parent
    model, tokenizer = load_model_and_tokenizer(run, "cpu")
    app = create_app(model, tokenizer, model_name="letters", limits=LIMITS)
    with LoopbackServer(app) as server:
        server.scheduler = app.state.scheduler
        yield server, model, tokenizer


@pytest.fixture(scope="module")
def served_chat(tmp_path_factory, tiny_model, letters_only, chat_byte_tokenizer, write_run):
    model = letters_model(tiny_model, letters_only, vocab_size=len(chat_byte_tokenizer))
    mark_chat_trained(model.config)
    run = write_run(tmp_path_factory.mktemp("batching") / "chat", model, chat_byte_tokenizer).parent.parent
    model, tokenizer = load_model_and_tokenizer(run, "cpu")
    app = create_app(model, tokenizer, model_name="letters", limits=LIMITS)
    with LoopbackServer(app) as server:
        server.scheduler = app.state.scheduler
        yield server, model, tokenizer


def rows_running(server) -> int:
    return server.scheduler.rows_running()


def wait_for(condition, message: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


async def open_streams(url: str, count: int, max_tokens: int, ready: asyncio.Event, release: asyncio.Event) -> list:
    """`count` streams that each wait, once they have a first token, until `release` is set, then read to the end."""
    started = []

    async def one(client: httpx.AsyncClient, seed: int) -> int:
        body = {"prompt": "xy", "max_tokens": max_tokens, "stream": True, "seed": seed}
        chunks = 0
        async with client.stream("POST", url, json=body) as response:
            async for chunk in streamed_chunks(response.aiter_lines()):
                chunks += 1
                if chunks == 1:
                    started.append(seed)
                    if len(started) == count:
                        ready.set()
                    await release.wait()
        return chunks

    async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=count + 4)) as client:
        return await asyncio.gather(*(one(client, seed) for seed in range(count)))


def test_a_seeded_request_gets_the_same_text_alone_and_among_31_others(served):
    server, _, _ = served
    client = server.client()
    request = dict(model="letters", prompt="the cat", max_tokens=12, temperature=0.9, top_p=0.8, seed=7)
    alone = client.completions.create(**request).choices[0].text
    assert len(alone) == 12

    async def among_others() -> str:
        ready, release = asyncio.Event(), asyncio.Event()
        others = asyncio.ensure_future(open_streams(f"{server.url}/v1/completions", 31, LONG, ready, release))
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        assert rows_running(server) == 31
        text = await asyncio.to_thread(lambda: client.completions.create(**request).choices[0].text)
        release.set()
        await others
        return text

    assert asyncio.run(among_others()) == alone
    wait_for(lambda: rows_running(server) == 0, "rows still running after every request finished")


def test_a_client_that_disconnects_frees_its_row_at_the_next_step(served):
    server, _, _ = served
    batch = server.scheduler.batch
    steps = []
    step = batch.step

    def paced_step():  # a few milliseconds each, so that the row's 400 tokens take far longer than a disconnect
        steps.append(len(batch.running))
        time.sleep(0.005)
        return step()

    batch.step = paced_step
    try:
        stream = server.client().completions.create(model="letters", prompt="a", max_tokens=LONG, stream=True)
        next(iter(stream))
        assert rows_running(server) == 1
        stream.close()  # the server sees it at its next send: the row leaves before the step after that
        wait_for(lambda: rows_running(server) == 0, "the row of a client that went away was not freed")
        assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()["requests"] == 0
        assert len(steps) < LONG / 4
    finally:
        del batch.step


def streamed_choices(chunks, field: str = "text") -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.text if field == "text" else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
    return texts


def test_n_choices_are_n_rows_with_their_own_draws_whole_and_streamed(served, served_chat):
    server, _, _ = served
    client = server.client()
    request = dict(model="letters", prompt="on", max_tokens=10, temperature=1.5)
    # Choice i draws as a request alone seeded with seed + i (so choice 0 as the same request with n=1).
    alone = [client.completions.create(seed=3 + index, **request).choices[0].text for index in range(3)]
    request["seed"] = 3
    whole = client.completions.create(n=3, **request)
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    texts = [choice.text for choice in whole.choices]
    assert texts == alone
    assert whole.usage.completion_tokens == 30
    streamed = streamed_choices(client.completions.create(n=3, stream=True, **request))
    assert streamed == dict(enumerate(texts))

    chat = served_chat[0].client()
    messages = [{"role": "user", "content": "hi"}]
    replies = chat.chat.completions.create(model="letters", messages=messages, n=2, max_tokens=6, seed=4)
    texts = [choice.message.content for choice in replies.choices]
    chunks = chat.chat.completions.create(model="letters", messages=messages, n=2, max_tokens=6, seed=4, stream=True)
    assert streamed_choices(chunks, field="content") == dict(enumerate(texts))

    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(n=33, **request)
    assert refused.value.body["param"] == "n"


def token_id(tokenizer, text: str) -> int:
    """The id of a one-token text (the byte tokenizer has one token per byte)."""
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    return token


def reference_logprobs(model, prompt_ids: list[int], generated: list[int], *, temperature: float = 1.0,
                       presence: float = 0.0, frequency: float = 0.0, bias: dict[int, float] | None = None):
    """[generated, V]: log_softmax of the model's logits for each generated token, from one forward over the whole
    sequence, after OpenAI's bias and penalties (counting the tokens generated before it) and the temperature."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1 : -1].float()
    rows = []
    for step, row in enumerate(logits):
        row = row.clone()
        for token, value in (bias or {}).items():
            row[token] += value
        for token, count in Counter(generated[:step]).items():
            row[token] -= count * frequency + presence
        rows.append((row / temperature if temperature else row).log_softmax(-1))
    return torch.stack(rows)


def assert_logprobs_match(reference: torch.Tensor, generated: list[int], chosen: list[float],
                          top: list[list[tuple[str, float]]], tokenizer) -> None:
    assert chosen == pytest.approx(reference[torch.arange(len(generated)), generated].tolist(), abs=1e-3)
    for row, alternatives in zip(reference, top, strict=True):
        best = row.topk(len(alternatives))
        assert [text for text, _ in alternatives] == [tokenizer.decode([token]) for token in best.indices.tolist()]
        assert [value for _, value in alternatives] == pytest.approx(best.values.tolist(), abs=1e-3)


def test_completion_logprobs_are_those_of_the_scores_each_token_was_drawn_from(served):
    server, model, tokenizer = served
    client = server.client()
    request = dict(model="letters", prompt="the", max_tokens=8, temperature=0.7, seed=5, logprobs=5,
                   logit_bias={str(token): bias for token, bias in LETTERS.items()})
    prompt_ids = encode_prompt(tokenizer, "the")
    for streamed in (False, True):
        if streamed:
            chunks = list(client.completions.create(stream=True, **request))
            logprobs = [chunk.choices[0].logprobs for chunk in chunks if chunk.choices and chunk.choices[0].logprobs]
            tokens = [token for entry in logprobs for token in entry.tokens]
            chosen = [value for entry in logprobs for value in entry.token_logprobs]
            top = [list(alternatives.items()) for entry in logprobs for alternatives in entry.top_logprobs]
            offsets = [offset for entry in logprobs for offset in entry.text_offset]
        else:
            choice = client.completions.create(**request).choices[0]
            tokens, chosen = choice.logprobs.tokens, choice.logprobs.token_logprobs
            top, offsets = [list(entry.items()) for entry in choice.logprobs.top_logprobs], choice.logprobs.text_offset
            assert "".join(tokens) == choice.text
        generated = [token_id(tokenizer, token) for token in tokens]
        assert len(generated) == 8 and offsets == list(range(8))
        reference = reference_logprobs(model, prompt_ids, generated, temperature=0.7, bias=LETTERS)
        assert_logprobs_match(reference, generated, chosen, top, tokenizer)


def chat_logprobs(chat, streamed: bool, **request) -> tuple[list[str], list[float], list[list[tuple[str, float]]]]:
    if streamed:
        content = [token for chunk in chat.chat.completions.create(stream=True, **request)
                   if chunk.choices and chunk.choices[0].logprobs for token in chunk.choices[0].logprobs.content]
    else:
        content = chat.chat.completions.create(**request).choices[0].logprobs.content
    for token in content:
        assert bytes(token.bytes).decode() == token.token
    return ([token.token for token in content], [token.logprob for token in content],
            [[(alternative.token, alternative.logprob) for alternative in token.top_logprobs] for token in content])


@pytest.mark.parametrize("streamed", [False, True])
def test_chat_top_logprobs_penalties_and_logit_bias_follow_openai_s_definitions(served_chat, streamed):
    server, model, tokenizer = served_chat
    chat = server.client()
    messages = [{"role": "user", "content": "hi"}]
    prompt_ids = render_chat(tokenizer, messages, add_generation_prompt=True)
    ids = lambda tokens: [token_id(tokenizer, token) for token in tokens]  # noqa: E731
    base = dict(model="letters", messages=messages, max_tokens=12, logprobs=True, top_logprobs=20)

    # Sampled, with both penalties: the logprobs are those of the penalised, tempered scores.
    penalised = dict(temperature=0.8, seed=9, presence_penalty=1.5, frequency_penalty=2.0,
                     logit_bias={str(token): bias for token, bias in LETTERS.items()})
    tokens, chosen, top = chat_logprobs(chat, streamed, **base, **penalised)
    assert len(tokens) == 12 and all(len(alternatives) == 20 for alternatives in top)
    reference = reference_logprobs(model, prompt_ids, ids(tokens), temperature=0.8, presence=1.5, frequency=2.0,
                                   bias=LETTERS)
    assert_logprobs_match(reference, ids(tokens), chosen, top, tokenizer)

    # Greedy, with a bias that makes 'q' win every step while the frequency penalty lowers it step by step (the
    # alternatives' logprobs rise by 2 a step against the unpenalised model's).
    q = token_id(tokenizer, "q")
    biased = dict(temperature=0, logit_bias={str(q): 100}, frequency_penalty=2.0)
    tokens, chosen, top = chat_logprobs(chat, streamed, **base, **biased)
    assert tokens == ["q"] * 12
    reference = reference_logprobs(model, prompt_ids, [q] * 12, temperature=0, frequency=2.0, bias={q: 100})
    assert_logprobs_match(reference, [q] * 12, chosen, top, tokenizer)

    plain = chat.chat.completions.create(model="letters", messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content != "q" * 12 and plain.choices[0].logprobs is None


def test_logit_bias_beyond_openai_s_limit_or_outside_the_vocabulary_is_refused_naming_it(served, served_chat):
    server, _, _ = served
    huge = {str(token): 1 for token in range(50_000)}
    for body in ({"prompt": "a", "logit_bias": huge}, {"prompt": "a", "logit_bias": {"300": 5}},
                 {"prompt": "a", "logit_bias": {"a": 5}}):
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=TIMEOUT)
        assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"
    refused = httpx.post(f"{served_chat[0].url}/v1/chat/completions", timeout=TIMEOUT,
                         json={"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"
