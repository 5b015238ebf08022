"""Training for a wall-clock budget: measure the step time over the first steps, then fix `max_steps` once.

The step count, not the clock, ends the run: the learning-rate schedule needs its horizon, and a resumed run must
follow the same schedule to stay bitwise exact, so the number is decided once, written into the run's config and
checkpoints, and reused on resume.
"""

from __future__ import annotations

import re

from tinyseek.errors import ConfigError

DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")
# Until the budget fixes max_steps, the schedule is computed for this horizon; the first steps are in warmup (or at
# the start of the decay), where the horizon makes no difference.
CALIBRATION_HORIZON = 10**9


def parse_duration(text: str) -> float:
    """Seconds in "15m", "90s", "1h30m", "2.5m" or a bare number of seconds."""
    match = DURATION.match(str(text))
    if not match or not any(match.groups()):
        raise ConfigError(f"time_budget: expected a duration such as 15m, 90s or 1h30m, got {text!r}")
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"time_budget: must be positive, got {text!r}")
    return total


class BudgetCalibration:
    """Watches the first steps of a run with a time budget and says how many steps fit.

    Steps that begin in the first `warmup_s` seconds are not timed: a process's first steps run slower (allocator
    growth, kernel and cache warm-up; the reference loop in benchmarks/quality.py takes its first six steps 30% slower
    than the rest, and timing all but two of them ended its 15-minute budget at 93%). Then steps are timed until
    `measure_s` seconds and at least `min_steps` steps have passed. The answer: the steps done so far plus as many
    more as fit in what is left of the budget at the measured rate.
    """

    def __init__(self, budget_s: float, min_steps: int = 3, measure_s: float | None = None,
                 warmup_s: float | None = None):
        self.budget_s = budget_s
        self.min_steps = min_steps
        self.measure_s = measure_s if measure_s is not None else min(30.0, 0.03 * budget_s)
        self.warmup_s = warmup_s if warmup_s is not None else self.measure_s
        self.timed_steps = 0
        self.timed_s = 0.0

    def observe(self, step: int, step_seconds: float, elapsed_s: float) -> int | None:
        """After optimizer step `step` (1-based) that took `step_seconds`, with `elapsed_s` of the budget spent:
        the fixed max_steps once measured, else None."""
        if elapsed_s - step_seconds < self.warmup_s:
            return None
        self.timed_steps += 1
        self.timed_s += step_seconds
        if self.timed_steps < self.min_steps or self.timed_s < self.measure_s:
            return None
        seconds_per_step = self.timed_s / self.timed_steps
        return step + max(0, int((self.budget_s - elapsed_s) / seconds_per_step))

    @property
    def seconds_per_step(self) -> float:
        return self.timed_s / max(1, self.timed_steps)
