"""One worker thread that owns the model: it runs every admitted generation in one continuous batch.

Requests join the batch (`tinyseek.generate.batch.ContinuousBatch`) at step boundaries and leave it as they finish
or as their clients go away; every running request advances by one token in each batched decode step, and a new
prompt is prefilled in chunks between two steps. Each request's rows keep their own sampling settings and seeded
`torch.Generator`, and only this thread ever touches the batch; the event loop only ever waits on queues. Where the
thread runs is the server's choice: in the server's process, or in a process of its own (tinyseek.serve.worker).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from tinyseek.generate.batch import ContinuousBatch
from tinyseek.generate.sampling import Sampling


class QueueFull(Exception):
    """Every stream slot and every waiting place is taken."""


class End(Enum):
    FINISHED = "finished"


# Put on a job's queue after its last events (an enum member: it stays itself through a pipe).
FINISHED = End.FINISHED


class Places:
    """The requests a server holds (running or waiting), at most `max_streams + max_waiting`; each job's place is
    freed once, whether it finishes or is cancelled first."""

    def __init__(self, max_streams: int, max_waiting: int):
        self.max_streams, self.max_waiting = max_streams, max_waiting
        self.held = 0
        self.lock = threading.Lock()

    def take(self) -> None:
        with self.lock:
            if self.held >= self.max_streams + self.max_waiting:
                raise QueueFull(
                    f"the server is busy: {self.max_streams} generations running and {self.max_waiting} waiting"
                )
            self.held += 1

    def free(self, job: Job) -> None:
        with self.lock:
            if not job.released:
                job.released = True
                self.held -= 1


def to_event_loop(job: Job, item) -> None:
    """Hand a job's events (or its end) to the event loop that waits on its queue."""
    try:
        job.loop.call_soon_threadsafe(job.events.put_nowait, item)
    except RuntimeError:  # the event loop has closed: the server is shutting down
        job.cancelled = True


def announce_compiled(rows: int, seconds: float) -> None:
    print(f"  compiled the decode step for {rows} row{'s' if rows > 1 else ''} in {seconds:.1f} s", file=sys.stderr,
          flush=True)


@dataclass(eq=False)
class Job:
    """One request's generation (``n`` rows of one prompt), as the worker thread sees it; lists of its rows' token
    events arrive on `events` in the event loop."""

    prompt_ids: list[int]
    sampling: Sampling
    max_new_tokens: int
    stop: list[str]
    capture: bool
    loop: asyncio.AbstractEventLoop | None  # None in a generation process (and `events` too): they go down a pipe
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs; k: the token's and k alternatives'
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    released: bool = False
    rows_left: int = 0  # rows still generating, once admitted
    id: int = 0  # names the job between a server and its generation process

    def __getstate__(self) -> dict:
        # A job crosses to a generation process without its event loop and queue: its events come back down a pipe.
        return {**self.__dict__, "loop": None, "events": None}


def ends_job(item) -> bool:
    """Whether a delivered item is a job's last: its end marker, or the error it failed with."""
    return item is FINISHED or isinstance(item, Exception)


class Scheduler:
    """Admits generations while `max_streams` rows are free, and keeps up to `max_waiting` more in line; each job's
    events go to `deliver(job, item)` (to its event loop, or down a generation process's pipe)."""

    def __init__(self, engine, device: torch.device, *, max_streams: int, max_waiting: int, compile: bool = False,
                 deliver: Callable[[Job, object], None] = to_event_loop):
        self.engine, self.device = engine, device
        self.places = Places(max_streams, max_waiting)
        self.batch = ContinuousBatch(engine, max_streams, compiled=compile)
        self.deliver = deliver
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []  # admitted to the batch: prefilling or decoding
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="tinyseek-generation", daemon=True)

    def start(self) -> None:
        """Compile the step for every batch size first, where asked (no request waits seconds for a compile), then
        start the generation thread."""
        if self.batch.compiled:
            print(f"compiling the decode step for {', '.join(map(str, self.batch.batch_sizes()))} rows before "
                  "serving", file=sys.stderr, flush=True)
            self.batch.compile_steps(announce_compiled)
        self.thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.places.take()
        with self.wakeup:
            self.waiting.append(job)
            self.wakeup.notify()

    def cancel(self, job: Job) -> None:
        """Free the job's place now (its client went away); the worker drops its rows before its next step."""
        self.places.free(job)
        with self.wakeup:
            job.cancelled = True
            self.wakeup.notify()

    def requests_held(self) -> int:
        """Requests accepted and not yet finished or cancelled."""
        return self.places.held

    def streams(self) -> tuple[int, int]:
        """Requests (active, waiting) now: generating, or waiting for rows."""
        return len(self.active), len(self.waiting)

    def rows_running(self) -> int:
        """Rows in the batch now (decoding, or prefilling to join it); safe to ask from any thread."""
        prefills = list(self.batch.prefills)  # one copy under the GIL: the worker may change the queue meanwhile
        return len(self.batch.running) + sum(prefill.copies for prefill in prefills)

    def run(self) -> None:
        while True:
            with self.wakeup:
                while not self.stopping and not self.waiting and not self.active:
                    self.wakeup.wait()
                if self.stopping:
                    return
                cancelled = [job for job in self.active if job.cancelled]
                self.active = [job for job in self.active if not job.cancelled]
            for job in cancelled:  # their rows leave the batch before this step
                self.batch.cancel(job)
            with self.wakeup:
                admitted = []
                room = self.batch.room()
                while self.waiting and (self.waiting[0].cancelled or self.waiting[0].n <= room):
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        admitted.append(job)
                        room -= job.n
            for job in admitted:
                self.admit(job)
            if self.active:
                self.advance()

    def admit(self, job: Job) -> None:
        try:
            self.batch.add(job, job.prompt_ids, job.sampling, job.max_new_tokens, stop=job.stop, capture=job.capture,
                           top_logprobs=job.top_logprobs, copies=job.n)
        except Exception as error:  # a request the batch cannot generate fails alone
            self.finish(job, error)
            return
        job.rows_left = job.n
        self.active.append(job)

    def advance(self) -> None:
        """One prefill chunk and one decode step; each job gets its rows' events of each as one list."""
        try:
            for events in self.batch.phases():
                self.deliver_all(events)
        except Exception as error:  # a bug in generation: the batch's requests fail, the server keeps serving
            for job in self.active:
                self.batch.cancel(job)
                self.finish(job, error)
            self.active = []

    def deliver_all(self, events: list) -> None:
        by_job: dict[Job, list] = {}
        for job, event in events:
            by_job.setdefault(job, []).append(event)
        for job, job_events in by_job.items():
            self.deliver(job, job_events)
            job.rows_left -= sum(event.finish_reason is not None for event in job_events)
            if job.rows_left == 0:
                self.active.remove(job)
                self.finish(job, FINISHED)

    def finish(self, job: Job, last) -> None:
        self.places.free(job)
        self.deliver(job, last)
