"""Hostile load for `benchmarks/serve_load.py --hostile`: well-behaved streams beside clients that misbehave.

Each round fires, at once, against one server in a child process:
    the well-behaved streams     serve_load.py's `--streams` streamed completions (they must all finish, no errors)
    slow readers                 stream a long completion (routing on: large events) and read one byte a second,
                                 each for at most 60 s, through a tiny receive buffer, so the server's writes back up
    disconnecting clients        stream a completion and hang up after the first event
    malformed and oversized      bodies that are not JSON, nest deeply, are not UTF-8, have wrong types or a seed
                                 beyond 64 bits, declare or send more than --max-body-bytes, or are not HTTP at all:
                                 each must be refused with a 4xx (or the connection closed), never a 5xx or a 200
    idle connections             opened, never used, closed at the end of the round
and then reads the server's resident memory (psutil: its process and its generation process, the model's shared
tensors counted in each), which must not grow from the first round to the last by more than RSS_TOLERANCE_MIB. The
server runs in its own process so that its memory is not the clients'.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable

import httpx
import psutil
import torch

from tinyseek.serve.app import Limits
from tinyseek.testing import streamed_chunks

from server_process import server_process  # benchmarks/, beside this script

ROUNDS = 3
RSS_TOLERANCE_MIB = 16
SLOW_BOUND_S, SLOW_TOKENS, SLOW_CLIENTS = 60.0, 256, 8
DISCONNECTING_CLIENTS = 8
IDLE_CONNECTIONS = 200
MAX_BODY_BYTES = 1 << 20
# Raw HTTP/1.1, so that a request can be as wrong as a hostile client makes it; the length or framing follows.
POST_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"


def bodies() -> list[tuple[str, bytes, Iterable[bytes]]]:
    """(name, request head, body chunks) of each malformed or oversized request."""
    def post(body: bytes) -> tuple[bytes, list[bytes]]:
        return POST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body), [body]

    piece = b"x" * 65536
    return [
        ("invalid JSON", *post(b'{"prompt": "hi", "max_tokens": ')),
        ("deep nesting", *post(b"[" * 100_000)),
        ("invalid UTF-8", *post(b'{"prompt": "caf\xe9 \xff\xfe"}')),
        ("wrong types", *post(b'{"prompt": 5, "max_tokens": "many", "stop": {"a": 1}}')),
        ("seed beyond 64 bits", *post(json.dumps({"prompt": "hi", "seed": 1 << 80}).encode())),
        ("NaN temperature", *post(b'{"prompt": "hi", "temperature": NaN}')),
        ("declared oversize", POST_HEAD + b"Content-Length: %d\r\n\r\n" % (4 * MAX_BODY_BYTES), [b'{"prompt": "']),
        ("chunked oversize", POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n",
         [b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(MAX_BODY_BYTES // len(piece) + 2)] + [b"0\r\n\r\n"]),
        ("not HTTP", b"\x16\x03\x01\x02\x00 hello\r\n\r\n", []),
    ]


async def slow_reader(port: int, bound: float, max_tokens: int) -> int:
    """Bytes read, one a second, from a long streamed completion, for at most `bound` seconds."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # so the server's writes back up at once
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
                       "routing": True}).encode()
    writer.write(POST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    read, end = 0, time.monotonic() + bound
    try:
        while time.monotonic() < end and await reader.read(1):
            read += 1
            await asyncio.sleep(1)
    finally:
        writer.close()
    return read


async def disconnecting(client: httpx.AsyncClient, url: str, max_tokens: int) -> bool:
    """Whether a streamed completion sent an event before this client hung up on it."""
    async with client.stream("POST", url, json={"prompt": "Once upon a time", "max_tokens": max_tokens,
                                                "stream": True}) as response:
        async for _ in streamed_chunks(response.aiter_lines()):
            return True
    return False


async def malformed(port: int, head: bytes, chunks: Iterable[bytes]) -> str:
    """The status the server answered ("closed" when it hung up without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 60)
        return status.split()[1].decode() if status else "closed"
    except (ConnectionError, asyncio.IncompleteReadError):
        return "closed"
    finally:
        writer.close()


async def one_round(port: int, args, well_behaved: Callable, plan: dict) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(plan["idle"])]
    limits = httpx.Limits(max_connections=args.streams + plan["disconnecting"] + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        tasks = [
            asyncio.gather(*(well_behaved(client, url, seed, args.max_tokens) for seed in range(args.streams))),
            asyncio.gather(*(slow_reader(port, plan["slow_bound"], plan["slow_tokens"])
                             for _ in range(plan["slow"]))),
            asyncio.gather(*(disconnecting(client, url, args.max_tokens) for _ in range(plan["disconnecting"]))),
            asyncio.gather(*(malformed(port, head, chunks) for _, head, chunks in bodies())),
        ]
        streams, slow, hung_up, statuses = await asyncio.gather(*tasks)
    still_open = sum(not reader.at_eof() for reader, _ in idle)
    for _, writer in idle:
        writer.close()
    return {"streams": streams, "slow": slow, "hung_up": hung_up, "statuses": statuses, "idle_open": still_open}


def describe(result: dict) -> tuple[str, bool]:
    """One round in a line, and whether it went as it must: no well-behaved stream failed, every hostile request
    was refused."""
    errors = [stream["error"] for stream in result["streams"] if stream["error"]]
    tokens = sum(stream["tokens"] for stream in result["streams"])
    statuses = result["statuses"]
    wrong = [f"{name}: {status}" for (name, _, _), status in zip(bodies(), statuses)
             if not (status.startswith("4") or status == "closed")]
    answers = ", ".join(f"{status} x{count}" for status, count in sorted(Counter(statuses).items()))
    line = (f"well-behaved {len(result['streams'])} streams, {tokens} tokens, {len(errors)} errors"
            + (f" ({errors[0]})" if errors else "")
            + f"; malformed refused {len(statuses) - len(wrong)}/{len(statuses)} ({answers})"
            + (f", not refused: {'; '.join(wrong)}" if wrong else "")
            + f"; slow readers read {min(result['slow'])}-{max(result['slow'])} bytes; {sum(result['hung_up'])} "
            f"hung up mid-stream; {result['idle_open']} idle connections still open at the end")
    return line, not (errors or wrong)


def resident_mib(server: psutil.Process) -> float:
    """Resident memory of the server's process and its children (the generation process), in MiB."""
    return sum(process.memory_info().rss for process in [server, *server.children(recursive=True)]) / 2**20


def run(args, load_model: Callable, well_behaved: Callable) -> int:
    """Three rounds of hostile load; prints one line per round and the memory verdict. Exit status 1 if a
    well-behaved stream failed, a hostile request got a 5xx or 200, or memory grew beyond the tolerance."""
    plan = {"slow": SLOW_CLIENTS, "slow_bound": SLOW_BOUND_S, "slow_tokens": SLOW_TOKENS,
            "disconnecting": DISCONNECTING_CLIENTS, "idle": IDLE_CONNECTIONS}
    if args.quick:
        plan = {"slow": 2, "slow_bound": 3.0, "slow_tokens": 16, "disconnecting": 2, "idle": 20}
    limits = Limits(max_body_bytes=MAX_BODY_BYTES, max_streams=args.max_streams,
                    max_waiting=args.streams + plan["slow"] + plan["disconnecting"],
                    max_tokens=max(args.max_tokens, plan["slow_tokens"]))
    with server_process(args, load_model, limits) as (port, server):
        memory = psutil.Process(server.pid)
        print(f"hostile load, {ROUNDS} rounds against one server process: --max-streams {args.max_streams}, "
              f"{args.threads} torch threads; each round at once: {args.streams} well-behaved streams x "
              f"{args.max_tokens} tokens, {plan['slow']} slow readers (1 byte/s for at most {plan['slow_bound']:g} s, "
              f"{plan['slow_tokens']} tokens with routing), {plan['disconnecting']} clients that hang up after the "
              f"first event, {len(bodies())} malformed or oversized requests, {plan['idle']} idle connections")
        print(f"server resident memory before the first round: {resident_mib(memory):.1f} MiB")
        failed, rss = False, []
        for number in range(1, ROUNDS + 1):
            started = time.perf_counter()
            result = asyncio.run(asyncio.wait_for(one_round(port, args, well_behaved, plan), args.timeout))
            rss.append(resident_mib(memory))
            line, ok = describe(result)
            failed |= not ok
            print(f"round {number} ({time.perf_counter() - started:.0f} s): {line}; server RSS {rss[-1]:.1f} MiB")
        growth = rss[-1] - rss[0]
        steady = growth <= RSS_TOLERANCE_MIB
        print(f"resident memory from round 1 to round {ROUNDS}: {rss[0]:.1f} -> {rss[-1]:.1f} MiB ({growth:+.1f} MiB; "
              f"tolerance {RSS_TOLERANCE_MIB} MiB): {'steady' if steady else 'GREW'}")
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=args.timeout).json()
        print(f"after the rounds the server holds {health['requests']} requests")
        return 1 if failed or not steady or health["requests"] else 0
