"""The server's generation loop in a process of its own: what `tinyseek serve` runs on a CPU.

In one process, the HTTP event loop and the generation thread share one interpreter lock. The decode step gives the
lock up around each operator and must take it back to go on, so whatever the event loop does meanwhile (writing a
step's chunks to 32 streams, parsing new requests) lengthens the step, and its slowest steps most: on a 2-core CPU
that made a stream's p99 inter-token latency well over the step's time alone (docs/serving.md). vLLM runs its engine
core in a process of its own for the same reason.

Here the `Scheduler` runs unchanged in a spawned child that holds the model (its tensors shared with the server's,
not copied: torch.multiprocessing), and a `GenerationProcess` stands in for it in the server. It counts the places
itself, so a full server still answers 503 at once, sends each job's request and cancellation down a pipe, and a
reader thread hands each job's events to its event loop as the in-process scheduler does.
"""

from __future__ import annotations

import itertools
import pickle
import signal
import threading

import torch
import torch.multiprocessing

from tinyseek.generate.engine import GenerationEngine
from tinyseek.serve.scheduler import Job, Places, QueueFull, Scheduler, ends_job, to_event_loop


class GenerationProcess:
    """A `Scheduler` (start, stop, submit, cancel, requests_held, streams) whose generation runs in a child process
    over `model` and `tokenizer`, with a `GenerationEngine` made there with `engine_options`."""

    def __init__(self, model, tokenizer, engine_options: dict, *, max_streams: int, max_waiting: int,
                 compile: bool = False):
        self.places = Places(max_streams, max_waiting)
        self.jobs: dict[int, Job] = {}  # submitted and not yet finished or cancelled, by id
        self.ids = itertools.count(1)
        self.counts = (0, 0)  # the child's (active, waiting), as it last reported them
        context = torch.multiprocessing.get_context("spawn")
        self.connection, self.child_end = context.Pipe()
        options = {"max_streams": max_streams, "max_waiting": max_waiting, "compile": compile}
        self.process = context.Process(
            target=run_generation, name="tinyseek-generation", daemon=True,
            args=(model, tokenizer, engine_options, options, torch.get_num_threads(), self.child_end),
        )
        self.sending = threading.Lock()
        self.reader = threading.Thread(target=self.read, name="tinyseek-generation-reader", daemon=True)

    def start(self) -> None:
        """Start the child and wait until it serves (it compiles first, where asked)."""
        self.process.start()
        self.child_end.close()  # the child's end lives in the child only: its exit ends this end's reads
        try:
            self.connection.recv()
        except EOFError:
            raise RuntimeError(f"the generation process exited while starting (exit code {self.process.exitcode}); "
                               "`tinyseek serve --worker thread` generates in the server's process") from None
        self.reader.start()

    def stop(self) -> None:
        try:
            self.send(("stop", 0, None))
        except OSError:  # it has exited already
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
        self.reader.join(30)

    def submit(self, job: Job) -> None:
        if not self.process.is_alive():
            raise QueueFull(f"the generation process has exited (exit code {self.process.exitcode})")
        self.places.take()
        job.id = next(self.ids)
        self.jobs[job.id] = job
        self.send(("submit", job.id, job))

    def cancel(self, job: Job) -> None:
        self.places.free(job)
        if self.jobs.pop(job.id, None) is not None:
            self.send(("cancel", job.id, None))

    def requests_held(self) -> int:
        return self.places.held

    def streams(self) -> tuple[int, int]:
        return self.counts

    def send(self, message: tuple) -> None:
        with self.sending:
            self.connection.send(message)

    def read(self) -> None:
        """Each job's events, as the child sends them, to its event loop; when the child is gone, every job still
        running fails."""
        while True:
            try:
                job_id, item, self.counts = self.connection.recv()
            except (EOFError, OSError):
                break
            self.hand_over(job_id, item)
        gone = RuntimeError(f"the generation process exited (exit code {self.process.exitcode})")
        for job_id in list(self.jobs):
            self.hand_over(job_id, gone)

    def hand_over(self, job_id: int, item) -> None:
        """One of a job's items to its event loop; its last one frees its place."""
        job = self.jobs.get(job_id)
        if job is None:  # cancelled: nobody waits for its events
            return
        if ends_job(item):
            self.jobs.pop(job_id, None)
            self.places.free(job)
        to_event_loop(job, item)


def run_generation(model, tokenizer, engine_options: dict, options: dict, threads: int, connection) -> None:
    """The child: a `Scheduler` whose events go down `connection`, until the server says stop or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    torch.set_num_threads(threads)
    jobs: dict[int, Job] = {}
    sending = threading.Lock()

    def deliver(job: Job, item) -> None:
        if ends_job(item):
            jobs.pop(job.id, None)
        with sending:
            connection.send((job.id, picklable(item), scheduler.streams()))

    scheduler = Scheduler(GenerationEngine(model, tokenizer, **engine_options), model.device, deliver=deliver,
                          **options)
    scheduler.start()
    connection.send("ready")
    while True:
        try:
            kind, job_id, job = connection.recv()
        except EOFError:  # the server has gone
            break
        if kind == "stop":
            break
        if kind == "submit":
            jobs[job_id] = job
            try:
                scheduler.submit(job)
            except QueueFull as error:  # cannot happen while the server counts first; fails the job alone if it does
                deliver(job, error)
        elif (job := jobs.pop(job_id, None)) is not None:
            scheduler.cancel(job)
    scheduler.stop()


def picklable(item):
    """The item, or for an exception that cannot cross the pipe, a RuntimeError that says what it was."""
    if not isinstance(item, Exception):
        return item
    try:
        pickle.dumps(item)
    except Exception:  # noqa: BLE001 - whatever stops pickling it
        return RuntimeError(repr(item))
    return item
