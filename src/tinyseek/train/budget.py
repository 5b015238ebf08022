"""Training for a wall-clock budget: measure the step time over the first steps and fix `max_steps`, then keep
watching the pace and move `max_steps` when the run would miss its budget.

The step count, not the clock, ends the run: the learning-rate schedule needs its horizon, so the count (and where a
move inside the decay left the rate) is written into the run's config and checkpoints, and a resumed run follows the
same schedule. Later steps often run slower than the first ones (on a 2-core machine, 0.56 s per step at calibration
and 0.70 s by step 1,000 of a `cpu-15min` run), and evaluations, samples and checkpoints take time between steps:
fixed once, that run trained for 114% of its budget.

What counts: the training loop's wall clock from its first step to the end of its last one, evaluations, samples and
checkpoints during the run included; the final evaluation and checkpoint after the last step are not.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from typing import Any, Callable, NamedTuple

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


class Horizon(NamedTuple):
    """Where the schedule ends: `max_steps`, and, once a time budget has moved that end after the decay began,
    `decay_from` = (step, multiplier): from that step on the decay runs from that multiplier to the floor at
    `max_steps`, so the rate never jumps when the end moves."""

    max_steps: int
    decay_from: tuple[int, float] | None = None


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


class BudgetPace:
    """Once max_steps is fixed: every `check_every` steps, projects when the run will end and, when that misses the
    budget by more than `tolerance` of it, proposes the step count that meets it.

    The projection: the recent seconds per step (the last `window` steps) plus the time spent between steps so far
    (evaluations, samples, checkpoints), spread over the steps so far, for every step still to go. Checks fall on
    step numbers, not on the clock, so every process of a distributed run takes part in the same ones.
    """

    def __init__(self, budget_s: float, tolerance: float = 0.005, window: int = 50, check_every: int = 10):
        self.budget_s, self.tolerance, self.check_every = budget_s, tolerance, check_every
        self.recent: deque[float] = deque(maxlen=window)
        self.first_step_began: float | None = None
        self.steps, self.step_seconds = 0, 0.0

    def record(self, step_seconds: float, elapsed_s: float) -> None:
        if self.first_step_began is None:
            self.first_step_began = elapsed_s - step_seconds
        self.recent.append(step_seconds)
        self.steps += 1
        self.step_seconds += step_seconds

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.check_every == 0 and len(self.recent) == self.recent.maxlen and step < max_steps

    def proposal(self, step: int, elapsed_s: float, max_steps: int) -> int | None:
        """A new max_steps, or None while the current one ends within the tolerance."""
        between_steps = max(0.0, elapsed_s - self.first_step_began - self.step_seconds) / self.steps
        seconds_per_step = sum(self.recent) / len(self.recent) + between_steps
        if abs(elapsed_s + (max_steps - step) * seconds_per_step - self.budget_s) <= self.tolerance * self.budget_s:
            return None
        steps = step + max(1, round((self.budget_s - elapsed_s) / seconds_per_step))
        return steps if steps != max_steps else None


class TimeBudget:
    """A run's time budget (none: `seconds` is None): calibrated from the first steps, unless a checkpoint of the
    same budget already says how many steps fit, then kept by moving max_steps as the pace changes."""

    def __init__(self, time_budget: str | None):
        self.time_budget = time_budget
        self.seconds = parse_duration(time_budget) if time_budget is not None else None
        self.horizon: Horizon | None = None  # set once max_steps is fixed
        self.calibration: BudgetCalibration | None = None
        self.pace: BudgetPace | None = None

    @property
    def fixed(self) -> bool:
        return self.horizon is not None

    def initial_max_steps(self, max_steps: int) -> int:
        """The run's max_steps until calibrated: the schedule's horizon then, the configured count without a budget."""
        return CALIBRATION_HORIZON if self.seconds is not None else max_steps

    def start(self) -> None:
        """Called as the loop starts: steps are timed from here."""
        self.calibration = BudgetCalibration(self.seconds) if self.seconds and not self.fixed else None
        self.pace = BudgetPace(self.seconds) if self.seconds else None

    def observe(self, step: int, step_seconds: float, elapsed_s: float, max_steps: int,
                agree: Callable[[int], int] = lambda steps: steps) -> int | None:
        """After optimizer step `step`: a new max_steps when calibrated or when the pace has moved, else None.
        `agree` makes every process adopt the largest decision taken anywhere (they must stop at the same step)."""
        log = logging.getLogger("tinyseek.train")
        if self.seconds is None:
            return None
        if not self.fixed:
            fixed = agree(self.calibration.observe(step, step_seconds, elapsed_s) or 0) or None
            if fixed is not None:
                log.info("time budget %s: %.3f s per step over %d timed steps -> max_steps %d", self.time_budget,
                         self.calibration.seconds_per_step, self.calibration.timed_steps, fixed)
            return fixed
        self.pace.record(step_seconds, elapsed_s)
        if not self.pace.due(step, max_steps):
            return None
        moved = agree(self.pace.proposal(step, elapsed_s, max_steps) or 0) or None
        if moved is not None:
            log.info("time budget %s: at step %d, %.0f s in, the pace ends the run at step %d instead of %d",
                     self.time_budget, step, elapsed_s, moved, max_steps)
        return moved

    def saved_horizon(self, trainer_state: dict[str, Any]) -> Horizon | None:
        """The horizon a checkpoint fixed for this same budget, if any."""
        saved = trainer_state.get("budget")
        if saved is None or saved["time_budget"] != self.time_budget:
            return None
        decay_from = saved.get("decay_from")
        return Horizon(saved["max_steps"], tuple(decay_from) if decay_from is not None else None)

    def state(self) -> dict[str, Any] | None:
        if not self.fixed:
            return None
        decay_from = list(self.horizon.decay_from) if self.horizon.decay_from is not None else None
        return {"time_budget": self.time_budget, "max_steps": self.horizon.max_steps, "decay_from": decay_from}

    def summary(self, steps: int, train_seconds: float) -> str:
        return (f"time budget {self.time_budget}: trained {steps} steps in {train_seconds:.0f} s, "
                f"{100 * train_seconds / self.seconds:.1f}% of the budget")
