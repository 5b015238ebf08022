"""One worker thread that owns the model: it advances every admitted generation by one token in turn.

Each request gets its own `GenerationEngine.stream` (its own cache) and its own `torch.Generator`, and only this
thread ever runs the model, so no two generations touch one cache at once and a seeded request samples the same
tokens whatever else is running. Interleaving the streams step by step (rather than finishing one before starting
the next) gives every client its first token soon; the event loop only ever waits on queues.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tinyseek.generate.sampling import Sampling


class QueueFull(Exception):
    """Every stream slot and every waiting place is taken."""


# Put on a job's queue after its last events.
FINISHED = object()


@dataclass(eq=False)
class Job:
    """One request's generation, as the worker thread sees it; events arrive on `events` in the event loop."""

    prompt_ids: list[int]
    sampling: Sampling
    max_new_tokens: int
    stop: list[str]
    capture: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    released: bool = False
    steps: Iterator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The request's own random stream: seeded as `tinyseek generate --seed` seeds it, else from the OS."""
        generator = torch.Generator(device=device)
        if self.sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.sampling.seed)
        return generator


class Scheduler:
    """Admits up to `max_streams` generations at a time and keeps up to `max_waiting` more in line."""

    def __init__(self, engine, device: torch.device, *, max_streams: int, max_waiting: int):
        self.engine, self.device = engine, device
        self.max_streams, self.max_waiting = max_streams, max_waiting
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.held = 0  # jobs admitted or waiting and not yet released
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="tinyseek-generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.wakeup:
            if self.held >= self.max_streams + self.max_waiting:
                raise QueueFull(
                    f"the server is busy: {self.max_streams} generations running and {self.max_waiting} waiting"
                )
            self.held += 1
            self.waiting.append(job)
            self.wakeup.notify()

    def cancel(self, job: Job) -> None:
        """Free the job's slot now (its client went away); the worker drops it before its next step."""
        with self.wakeup:
            job.cancelled = True
            self.release(job)

    def release(self, job: Job) -> None:
        # Called with the lock held; a job finishing and being cancelled at once must free one slot, not two.
        if not job.released:
            job.released = True
            self.held -= 1

    def requests_held(self) -> int:
        """Requests accepted and not yet finished or cancelled."""
        with self.wakeup:
            return self.held

    def run(self) -> None:
        while True:
            with self.wakeup:
                while not self.stopping and not self.waiting and not self.active:
                    self.wakeup.wait()
                if self.stopping:
                    return
                while self.waiting and len(self.active) < self.max_streams:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        self.active.append(job)
            for job in list(self.active):
                if not self.advance(job):
                    self.active.remove(job)

    def advance(self, job: Job) -> bool:
        """Run one step of the job; False once it is over (finished, failed or cancelled)."""
        if job.cancelled:
            if job.steps is not None:
                job.steps.close()
            return False
        try:
            if job.steps is None:
                job.steps = self.engine.stream(
                    [job.prompt_ids], job.sampling, job.max_new_tokens, stop=job.stop, capture=job.capture,
                    generator=job.generator(self.device),
                )
            events = next(job.steps)
        except StopIteration:
            self.finish(job, FINISHED)
            return False
        except Exception as error:  # a bug in generation: the request fails, the server keeps serving
            self.finish(job, error)
            return False
        self.deliver(job, events)
        if any(event.finish_reason is not None for event in events):
            job.steps.close()
            self.finish(job, FINISHED)
            return False
        return True

    def finish(self, job: Job, last) -> None:
        with self.wakeup:
            self.release(job)
        self.deliver(job, last)

    @staticmethod
    def deliver(job: Job, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            job.cancelled = True
