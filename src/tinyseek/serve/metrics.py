"""Prometheus metrics of `tinyseek serve` (prometheus_client), and the per-request token count the access log reads.

Token timings are taken as the generation thread hands each step's events to the event loop, so they measure the
server, not how fast a client reads: time to first token counts from the request's admission to its first token,
inter-token latency from one step's tokens to the next.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# From a few milliseconds (a small model's step) to the tens of seconds a long queue can add.
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class RequestRecord:
    """What the access log says of one request beyond its HTTP status: the tokens generated for it."""

    tokens: int = 0


# The record of the request being handled, set by the access log for the task (and the tasks it starts).
CURRENT_REQUEST: ContextVar[RequestRecord | None] = ContextVar("tinyseek_current_request", default=None)


class ServerMetrics:
    """The server's metrics in a registry of their own (several apps may live in one process, as in the tests).

    Active and waiting streams are the scheduler's `streams()` when scraped."""

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.tokens = Counter("tinyseek_generated_tokens", "Tokens generated (rate() gives tokens per second)",
                              registry=self.registry)
        Gauge("tinyseek_active_streams", "Generations advancing now", registry=self.registry).set_function(
            lambda: scheduler.streams()[0])
        Gauge("tinyseek_waiting_streams", "Accepted requests waiting for a stream slot",
              registry=self.registry).set_function(lambda: scheduler.streams()[1])
        self.time_to_first_token = Histogram(
            "tinyseek_time_to_first_token_seconds", "From a request's admission to its first generated token",
            buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "tinyseek_inter_token_latency_seconds", "Between one step's tokens of a request and its next",
            buckets=INTER_TOKEN_BUCKETS, registry=self.registry)

    def watch(self, job) -> None:
        """Time the job's tokens from now on; call it before the job is submitted (the generation thread may hand
        over events at once)."""
        job.events = TimedQueue(self, CURRENT_REQUEST.get())

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TimedQueue(asyncio.Queue):
    """A job's event queue that times and counts each step's tokens as the generation thread puts them in."""

    def __init__(self, metrics: ServerMetrics, record: RequestRecord | None):
        super().__init__()
        self.metrics, self.record = metrics, record
        self.last = time.perf_counter()
        self.first = True

    def put_nowait(self, item) -> None:
        if isinstance(item, list) and item:  # one step's token events (not the end marker or an error)
            now = time.perf_counter()
            histogram = self.metrics.time_to_first_token if self.first else self.metrics.inter_token_latency
            histogram.observe(now - self.last)
            self.last, self.first = now, False
            self.metrics.tokens.inc(len(item))
            if self.record is not None:
                self.record.tokens += len(item)
        super().put_nowait(item)
