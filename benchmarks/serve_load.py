"""Load on `tinyseek serve`: 1, 8, 32 and 64 concurrent streaming completions against one server, eager and compiled.

For each path (the default eager step, and `--compile`'s compiled step) it starts one server in a child process, as
`tinyseek serve` runs on a CPU (the HTTP event loop, on a loopback port, and generation in a process of its own),
with `--max-streams 64`,
and fires each number of streams at it in turn from an asynchronous client in this process, each stream asking for
`--max-tokens` tokens (sampled with its own seed; EOS can end one early, and the count says so), `--rounds` times in
turn. Per number of streams it prints the total generated tokens per second (the median round's: one stream of 64
tokens lasts a quarter of a second, short enough for a shared host's noise to move one round's total visibly), time
to first token and inter-token latency (p50 and p99, over every round) and errors; per path, the total at 32 streams
over the total at 1 (target: at least 5x) and the p99 inter-token latency at 32 streams over the time of one batched
decode step of 32 rows, measured alone in this process (target: at most 1.5x, so no request stalls behind another's
prefill). The step alone is timed in windows right after each round of 32 streams, while the server idles, so that a
shared host's slow minutes weigh on both sides of the ratio alike.

    python benchmarks/serve_load.py [--run-dir DIR | --model DIR] [--paths eager,compiled] [--max-tokens 64]
                                    [--rounds 3] [--threads N] [--quick]
    python benchmarks/serve_load.py --hostile    # 32 streams beside hostile clients (hostile_clients.py)

Without a run or model it serves a randomly initialised `seed` preset with the built-in tokenizer (speed does not
depend on the weights). Each load kind is one function: `well_behaved_streams` here, the hostile clients in
benchmarks/hostile_clients.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.data.tokenizer import encode_prompt, load_tokenizer
from tinyseek.generate.batch import ContinuousBatch
from tinyseek.generate.engine import GenerationEngine
from tinyseek.generate.sampling import Sampling
from tinyseek.loading import load_from_arguments
from tinyseek.serve.app import Limits
from tinyseek.testing import streamed_chunks

from server_process import server_process  # benchmarks/, beside this script

PROMPT = "Once upon a time there was a little dog who"
MAX_STREAMS = 64
TEMPERATURE = 0.8
PATHS = {"eager": False, "compiled": True}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", type=Path)
    source.add_argument("--model", type=Path)
    parser.add_argument("--streams", default="1,8,32,64", help="numbers of concurrent streams, comma-separated")
    parser.add_argument("--paths", default="eager,compiled", help="decode paths, comma-separated: eager, compiled")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request asks for")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per number of streams: the median round's total, every round's latencies "
                             "(--hostile runs its own three rounds)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--timeout", type=float, default=600, help="give up on one load after this many seconds")
    parser.add_argument("--quick", action="store_true", help="1 and 2 streams of 4 tokens, eager (checks the script)")
    parser.add_argument("--hostile", action="store_true",
                        help="three rounds of 32 streams beside slow, disconnecting, malformed and idle clients, "
                             "with the server's resident memory after each (benchmarks/hostile_clients.py)")
    args = parser.parse_args()
    args.streams = [int(count) for count in args.streams.split(",")]
    args.paths = args.paths.split(",")
    if unknown := set(args.paths) - set(PATHS):
        parser.error(f"--paths: unknown {sorted(unknown)}; choose from {sorted(PATHS)}")
    if args.quick:
        args.streams, args.max_tokens, args.paths, args.rounds = [1, 2], 4, ["eager"], 1
    return args


@dataclass
class StreamResult:
    """One streamed completion: when its first token came, the gaps between the later ones, tokens and error."""

    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def one_stream(client: httpx.AsyncClient, url: str, seed: int, max_tokens: int) -> StreamResult:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "temperature": TEMPERATURE, "seed": seed,
            "stream_options": {"include_usage": True}}
    result = StreamResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
                return result
            async for chunk in streamed_chunks(response.aiter_lines()):
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk["choices"]:
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.gaps.append(now - last)
                    last = now
                    if chunk["choices"][0]["finish_reason"] is not None:
                        # The other streams' last tokens come with this one: they are timed before this stream
                        # spends the client's time on its end (32 clients would not wait for each other).
                        await asyncio.sleep(0)
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        result.error = repr(error)
    return result


async def well_behaved_streams(url: str, streams: int, max_tokens: int) -> tuple[list[StreamResult], float]:
    """`streams` streamed completions at once; their results and the seconds until the last one ended."""
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, seed, max_tokens) for seed in range(streams)))
        return results, time.perf_counter() - start


async def stream_record(client: httpx.AsyncClient, url: str, seed: int, max_tokens: int) -> dict:
    """One streamed completion as benchmarks/hostile_clients.py reads it."""
    result = await one_stream(client, url, seed, max_tokens)
    return {"ttft": result.ttft, "tokens": result.tokens, "error": result.error}


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class StepClock:
    """Times the decode step (sampling included) of `rows` running rows: the server's batch without HTTP."""

    def __init__(self, engine: GenerationEngine, tokenizer, rows: int, compiled: bool, windows: int, steps: int = 20):
        self.batch = ContinuousBatch(engine, rows, compiled=compiled)
        self.steps = steps
        prompt = encode_prompt(tokenizer, PROMPT)
        for seed in range(rows):
            self.batch.add(seed, prompt, Sampling(temperature=TEMPERATURE, top_k=0, seed=seed), windows * steps + 8)
        while self.batch.prefills:
            self.batch.advance()
        for _ in range(3):  # the first steps of a compiled size compile it
            self.batch.advance()
        self.seconds: list[float] = []

    def window(self) -> None:
        """Time one window of steps (their mean)."""
        start = time.perf_counter()
        for _ in range(self.steps):
            self.batch.advance()
        self.seconds.append((time.perf_counter() - start) / self.steps)

    def step(self) -> float:
        """Seconds per step: the median window."""
        return statistics.median(self.seconds)


def measure_path(compiled: bool, args, clock: StepClock | None
                 ) -> list[tuple[int, list[tuple[list[StreamResult], float]]]]:
    """Per number of streams, `args.rounds` rounds of (results, seconds until the last stream ended); after each
    round of 32 streams, two windows of `clock`."""
    limits = Limits(max_streams=MAX_STREAMS, max_waiting=max(args.streams), max_tokens=args.max_tokens)
    with server_process(args, load_model, limits, compile=compiled) as (port, _):
        url = f"http://127.0.0.1:{port}/v1/completions"
        # One round first, at the most streams: the measured ones pay no one-off costs (the first prefill of each
        # shape, the allocator's first growth).
        asyncio.run(asyncio.wait_for(well_behaved_streams(url, max(args.streams), 4), args.timeout))
        rows = []
        for streams in args.streams:
            rounds = []
            for _ in range(args.rounds):
                rounds.append(asyncio.run(asyncio.wait_for(well_behaved_streams(url, streams, args.max_tokens),
                                                           args.timeout)))
                if streams == 32 and clock is not None:
                    clock.window()
                    clock.window()
            rows.append((streams, rounds))
        return rows


def report_path(path: str, rows: list[tuple[int, list[tuple[list[StreamResult], float]]]],
                step_32: float | None) -> None:
    totals = {}
    p99_gaps = {}
    print(f"{path:9} {'streams':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'errors':>6}")
    for streams, rounds in rows:
        results = [result for round_results, _ in rounds for result in round_results]
        first = [result.ttft for result in results if result.ttft is not None]
        gaps = [gap for result in results for gap in result.gaps]
        errors = [result.error for result in results if result.error]
        totals[streams] = statistics.median(sum(result.tokens for result in round_results) / seconds
                                            for round_results, seconds in rounds)
        p99_gaps[streams] = percentile(gaps, 0.99)
        print(f"{'':9} {streams:7d} {totals[streams]:9.1f} {percentile(first, 0.5):9.3f} {percentile(first, 0.99):9.3f} "
              f"{percentile(gaps, 0.5):8.4f} {p99_gaps[streams]:8.4f} {len(errors):6d}"
              + (f"  ({errors[0][:80]})" if errors else ""))
    if 1 in totals and 32 in totals:
        print(f"{path}: 32 streams give {totals[32] / totals[1]:.1f}x the total of 1 stream (target: at least 5x)")
    if step_32 is not None and 32 in p99_gaps:
        print(f"{path}: p99 inter-token latency at 32 streams is {p99_gaps[32] / step_32:.2f}x the batch-32 decode "
              f"step of {step_32 * 1000:.1f} ms (target: at most 1.5x)")


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

        args.streams, args.max_streams = (2 if args.quick else 32), 32
        raise SystemExit(hostile_clients.run(args, load_model, stream_record))
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args)
    print(f"one server per path with --max-streams {MAX_STREAMS}; {args.max_tokens} tokens per stream (temperature "
          f"{TEMPERATURE}, seeds 0..N-1); {args.rounds} rounds per number of streams (tokens/s: the median round's; "
          f"latencies: every round's); {args.threads} torch threads; model {model.config.attention_type}/"
          f"{model.config.ffn_type} ({sum(p.numel() for p in model.parameters()):,} parameters); prompt "
          f"{len(encode_prompt(tokenizer, PROMPT))} tokens; latencies in seconds")
    engine = GenerationEngine(model, tokenizer)
    for path in args.paths:
        clock = StepClock(engine, tokenizer, 32, PATHS[path], windows=2 * args.rounds) if 32 in args.streams else None
        rows = measure_path(PATHS[path], args, clock)
        report_path(path, rows, clock.step() if clock is not None else None)


if __name__ == "__main__":
    main()
