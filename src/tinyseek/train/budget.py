"""Training for a wall-clock budget: measure the step time over the first steps, then fix `max_steps` once.

The step count, not the clock, ends the run: the learning-rate schedule needs its horizon, and a resumed run must
follow the same schedule to stay bitwise exact, so the number is decided once, written into the run's config and
checkpoints, and reused on resume.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

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
    growth, kernel and cache warm-up; timed with the rest, they make the budget end well short of its length, as the
    reference loop of benchmarks/quality.py shows). Then steps are timed until
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


class TimeBudget:
    """A run's time budget (none: `seconds` is None): calibrated once from the first steps, unless a checkpoint of
    the same budget already says how many steps fit."""

    def __init__(self, time_budget: str | None):
        self.time_budget = time_budget
        self.seconds = parse_duration(time_budget) if time_budget is not None else None
        self.fixed = False
        self.calibration: BudgetCalibration | None = None

    def initial_max_steps(self, max_steps: int) -> int:
        """The run's max_steps until calibrated: the schedule's horizon then, the configured count without a budget."""
        return CALIBRATION_HORIZON if self.seconds is not None else max_steps

    def start(self) -> None:
        """Called as the loop starts: steps are timed from here unless the step count is already fixed."""
        self.calibration = BudgetCalibration(self.seconds) if self.seconds and not self.fixed else None

    def observe(self, step: int, step_seconds: float, elapsed_s: float,
                agree: Callable[[int], int] = lambda steps: steps) -> int | None:
        """After optimizer step `step`: the fixed max_steps once calibrated, else None. `agree` makes every process
        adopt the first decision taken anywhere (they must stop at the same step)."""
        if self.calibration is None or self.fixed:
            return None
        fixed = agree(self.calibration.observe(step, step_seconds, elapsed_s) or 0) or None
        if fixed is not None:
            logging.getLogger("tinyseek.train").info(
                "time budget %s: %.3f s per step over %d timed steps -> max_steps %d", self.time_budget,
                self.calibration.seconds_per_step, self.calibration.timed_steps, fixed,
            )
        return fixed

    def saved_steps(self, trainer_state: dict[str, Any]) -> int | None:
        """The step count a checkpoint fixed for this same budget, if any."""
        saved = trainer_state.get("budget")
        return saved["max_steps"] if saved is not None and saved["time_budget"] == self.time_budget else None

    def state(self, max_steps: int) -> dict[str, Any] | None:
        return {"time_budget": self.time_budget, "max_steps": max_steps} if self.fixed else None

    def summary(self, steps: int, train_seconds: float) -> str:
        return (f"time budget {self.time_budget}: trained {steps} steps in {train_seconds:.0f} s, "
                f"{100 * train_seconds / self.seconds:.1f}% of the budget")
