"""Learning-rate schedules as multipliers of the peak rate, for `torch.optim.lr_scheduler.LambdaLR`."""

from __future__ import annotations

import math
import torch

from tinyseek.train.config import ScheduleConfig


def lr_multiplier(step: int, schedule: ScheduleConfig, max_steps: int) -> float:
    """The multiplier for optimizer step `step` (0-based): linear warmup to 1, then the schedule's decay to the floor."""
    warmup = min(schedule.warmup_steps, max_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = schedule.min_lr_ratio
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


def schedule_function(schedule: ScheduleConfig, max_steps: int):
    def multiplier(step: int) -> float:
        return lr_multiplier(step, schedule, max_steps)

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, max_steps: int):
    """LambdaLR saves only its step for a plain function, so a resumed run recomputes the rate from the current
    config: raising max_steps stretches the remaining decay instead of restoring the old horizon."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_function(schedule, max_steps))


def set_horizon(scheduler, schedule: ScheduleConfig, max_steps: int) -> None:
    """Give a scheduler a new horizon from its next step on (a time budget fixing max_steps)."""
    scheduler.lr_lambdas = [schedule_function(schedule, max_steps) for _ in scheduler.lr_lambdas]
