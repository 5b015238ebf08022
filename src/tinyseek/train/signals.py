"""SIGINT/SIGTERM during training: the loop checkpoints and stops after the current optimizer step."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable


class StopRequest:
    """The signal that asked the run to stop, if any. While `listening()`, the first SIGINT/SIGTERM is recorded
    and the default handlers are put back, so a second one ends the process at once (the last checkpoint is still
    intact)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: signal.Signals | None = None

    @contextmanager
    def listening(self):
        previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}

        def request_stop(signum, frame):
            self.signal = signal.Signals(signum)
            for sig in self.SIGNALS:
                signal.signal(sig, previous[sig])

        for sig in self.SIGNALS:
            signal.signal(sig, request_stop)
        try:
            yield self
        finally:
            for sig in self.SIGNALS:
                signal.signal(sig, previous[sig])

    def agreed(self, across_processes: Callable[[int], int] = lambda value: value) -> bool:
        """Whether any process was asked to stop (`across_processes`: the largest value over all of them): all stop
        at the same step, or their collectives would hang."""
        requested = across_processes(self.signal.value if self.signal is not None else 0)
        if requested and self.signal is None:
            self.signal = signal.Signals(requested)
        return bool(requested)
