"""Learning-rate schedules as multipliers of the peak rate, for `torch.optim.lr_scheduler.LambdaLR`."""

from __future__ import annotations

import math
import torch

from tinyseek.train.budget import Horizon
from tinyseek.train.config import ScheduleConfig


def lr_multiplier(step: int, schedule: ScheduleConfig, max_steps: int,
                  decay_from: tuple[int, float] | None = None) -> float:
    """The multiplier for optimizer step `step` (0-based): linear warmup to 1, then the schedule's decay to the floor."""
    floor = schedule.min_lr_ratio
    if decay_from is not None and step >= decay_from[0] and schedule.kind != "constant":
        start, level = decay_from
        progress = min(1.0, (step - start) / max(1, max_steps - start))
        if schedule.kind == "cosine":
            return floor + (level - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return level - (level - floor) * progress
    warmup = min(schedule.warmup_steps, max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(schedule.decay_fraction * max_steps))
    decay_start = max(warmup, max_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1 - floor) * progress


def moved_horizon(schedule: ScheduleConfig, current: Horizon, step: int, max_steps: int) -> Horizon:
    """The horizon that ends at `max_steps` instead, from optimizer step `step` on, with the rate continuous there:
    in warmup or before the decay the plain schedule for the new end gives the same rate, and is kept; inside the
    decay, the rest of it is stretched or squeezed from the current rate to the floor."""
    level = lr_multiplier(step, schedule, *current)
    if current.decay_from is None and lr_multiplier(step, schedule, max_steps) == level:
        return Horizon(max_steps)
    return Horizon(max_steps, (step, level))


def schedule_function(schedule: ScheduleConfig, horizon: Horizon):
    def multiplier(step: int) -> float:
        return lr_multiplier(step, schedule, *horizon)

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, max_steps: int):
    """LambdaLR saves only its step for a plain function, so a resumed run recomputes the rate from the current
    config: raising max_steps stretches the remaining decay instead of restoring the old horizon."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_function(schedule, Horizon(max_steps)))


def set_horizon(scheduler, schedule: ScheduleConfig, horizon: Horizon) -> None:
    """Give a scheduler a new horizon from its next step on (a time budget fixing or moving max_steps)."""
    scheduler.lr_lambdas = [schedule_function(schedule, horizon) for _ in scheduler.lr_lambdas]
