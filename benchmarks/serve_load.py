"""Load on `tinyseek serve`: many concurrent streaming completions against one server on a loopback port.

Starts the server in this process (its generation thread and the HTTP event loop) and fires `--streams` streamed
completions at once from an asynchronous client, each asking for exactly `--max-tokens` tokens (sampled with its
own seed; EOS can end one early, and the count says so). Prints time to first token (p50/p99), total generated
tokens per second over the whole run, and errors; then runs the same generations through the engine alone (no
HTTP) in the same process, so the ratio shows what serving costs on top of decoding.

    python benchmarks/serve_load.py [--run-dir DIR | --model DIR] [--streams 32] [--max-tokens 64] [--threads 2]
    python benchmarks/serve_load.py --hostile    # the same streams beside hostile clients (hostile_clients.py)

Without a run or model it serves a randomly initialised `seed` preset with the built-in tokenizer (speed does not
depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx
import torch

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.data.tokenizer import encode_prompt, load_tokenizer
from tinyseek.generate.engine import GenerationEngine
from tinyseek.generate.sampling import Sampling
from tinyseek.loading import load_from_arguments
from tinyseek.serve.app import Limits, create_app
from tinyseek.serve.background import BackgroundServer
from tinyseek.testing import streamed_chunks

PROMPT = "Once upon a time there was a little dog who"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", type=Path)
    source.add_argument("--model", type=Path)
    parser.add_argument("--streams", type=int, default=32, help="concurrent streaming requests")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request asks for")
    parser.add_argument("--max-streams", type=int, default=32, help="the server's --max-streams")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    parser.add_argument("--quick", action="store_true", help="2 streams of 4 tokens (to check the script runs)")
    parser.add_argument("--hostile", action="store_true",
                        help="three rounds of the streams beside slow, disconnecting, malformed and idle clients, "
                             "with the server's resident memory after each (benchmarks/hostile_clients.py)")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.max_tokens = 2, 4
    return args


async def one_stream(client: httpx.AsyncClient, url: str, seed: int, max_tokens: int) -> dict:
    """Time to first token, tokens received and the error (None when all went well) of one streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "temperature": 0.8, "seed": seed,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return {"ttft": None, "tokens": 0, "error": f"HTTP {response.status_code}"}
            async for chunk in streamed_chunks(response.aiter_lines()):
                if "error" in chunk:
                    return {"ttft": first, "tokens": tokens, "error": chunk["error"]["message"]}
                if chunk["choices"] and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return {"ttft": first, "tokens": tokens, "error": repr(error)}
    return {"ttft": first, "tokens": tokens, "error": None}


async def load_test(url: str, streams: int, max_tokens: int) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, seed, max_tokens) for seed in range(streams)))
        return results, time.perf_counter() - start


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def engine_alone(model, tokenizer, streams: int, max_tokens: int) -> tuple[int, float]:
    """(tokens, seconds) of the same generations advanced in turn by the engine in this thread: no HTTP, no JSON,
    no event loop. The server's rate divided by this one is what serving costs on top of decoding."""
    engine = GenerationEngine(model, tokenizer)
    prompt = encode_prompt(tokenizer, PROMPT)
    start = time.perf_counter()
    running = [engine.stream([prompt], Sampling(temperature=0.8, top_k=0, seed=seed), max_tokens)
               for seed in range(streams)]
    tokens = 0
    while running:
        for steps in list(running):
            events = next(steps, None)
            if events is None:
                running.remove(steps)
            else:
                tokens += len(events)
    return tokens, time.perf_counter() - start


def load_model(args: argparse.Namespace):
    """(model, tokenizer): the run or model given, else a randomly initialised `seed` preset."""
    if args.run_dir or args.model:
        return load_from_arguments(args, "cpu")
    torch.manual_seed(0)
    return TinySeekForCausalLM(TinySeekConfig.from_preset("seed")).eval(), load_tokenizer("builtin")


def main() -> None:
    args = parse_args()
    if args.hostile:
        import hostile_clients

        raise SystemExit(hostile_clients.run(args, load_model, one_stream))
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args)
    limits = Limits(max_streams=args.max_streams, max_waiting=args.streams, max_tokens=args.max_tokens)
    with BackgroundServer(create_app(model, tokenizer, limits=limits)) as server:
        # One request first, so the first measured one pays no one-off costs.
        httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=args.timeout)
        results, seconds = asyncio.run(asyncio.wait_for(
            load_test(f"{server.url}/v1/completions", args.streams, args.max_tokens), args.timeout))
    first_tokens = [r["ttft"] for r in results if r["ttft"] is not None]
    errors = [r["error"] for r in results if r["error"]]
    tokens = sum(r["tokens"] for r in results)
    print(f"{args.streams} concurrent streams x {args.max_tokens} tokens, server --max-streams {args.max_streams}, "
          f"{args.threads} torch threads, model {model.config.attention_type}/{model.config.ffn_type} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")
    print(f"time to first token: p50 {percentile(first_tokens, 0.5):.3f} s, p99 {percentile(first_tokens, 0.99):.3f} s")
    print(f"generated {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s in total")
    print(f"errors: {len(errors)}" + (f" ({errors[0]})" if errors else ""))
    alone_tokens, alone_seconds = engine_alone(model, tokenizer, args.streams, args.max_tokens)
    print(f"the engine alone, same generations in turn in one thread: {alone_tokens / alone_seconds:.1f} tokens/s; "
          f"the server reaches {(tokens / seconds) / (alone_tokens / alone_seconds):.0%} of it")


if __name__ == "__main__":
    main()
