"""The trainer's optimizer component: the optimizer, its learning-rate schedule and the fp16 loss scaler, one
optimizer step (clipping, the non-finite check, the skipped step), and their state in checkpoints."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tinyseek import distributed
from tinyseek.train import checkpoint as ckpt
from tinyseek.train import optim
from tinyseek.train.config import TrainConfig
from tinyseek.train.model import Placement
from tinyseek.train.budget import Horizon
from tinyseek.train.schedule import build_scheduler, set_horizon


class StepResult(NamedTuple):
    grad_norm: torch.Tensor
    non_finite: str | None  # "loss" or "gradient" when the step was skipped for that, else None


class Optimization:
    """Built after the model is wrapped: FSDP2 replaces parameters with sharded ones."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, forward_model: torch.nn.Module,
                 placement: Placement):
        self.config, self.model, self.forward_model = config, model, forward_model
        self.world, self.device = placement.world, placement.device
        self.optimizer = optim.build_optimizer(model, config.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if placement.precision == "fp16" else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, loss: torch.Tensor) -> StepResult:
        """Clip and step, or skip the step when `loss` (the step's, on any process) or the gradient is not finite.
        A skipped step makes no optimizer or bias update, but its learning rate is used up, so the schedule stays
        that of a run without the fault (and resume stays exact)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.forward_model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        non_finite = self.non_finite_part(loss, grad_norm)
        if non_finite is None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            # Every rank must make the same bias update, so each sees the load of the whole global batch.
            distributed.sum_across_ranks(self.model.expert_load_counts(), self.world)
            self.model.update_load_balance_bias()
        else:
            if self.scaler is not None:
                self.scaler.update()
            for counts in self.model.expert_load_counts():
                counts.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn that the optimizer never stepped
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return StepResult(grad_norm, non_finite)

    def non_finite_part(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> str | None:
        """"loss" or "gradient" when that is NaN or infinite on any process, else None. Under fp16 an infinite
        gradient is the GradScaler's business (it skips the step and lowers the scale), not a fault."""
        code = 0 if torch.isfinite(loss) else 1
        if code == 0 and self.scaler is None and not torch.isfinite(grad_norm):
            code = 2
        code = distributed.max_across_ranks(code, self.world, self.device)
        return (None, "loss", "gradient")[code]

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def set_horizon(self, horizon: Horizon) -> None:
        set_horizon(self.scheduler, self.config.schedule, horizon)

    def describe(self) -> str:
        return optim.describe(self.optimizer, self.config.optim)

    def checkpoint_blobs(self) -> dict[str, Any]:
        """Every rank takes part (FSDP gathers the full optimizer state)."""
        return {
            "optimizer": distributed.full_optimizer_state_dict(self.forward_model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load(self, checkpoint: Path, blobs: dict[str, Any]) -> None:
        """The model's weights and this component's state from `checkpoint`; the current config's hyperparameters
        win over the ones the loaded optimizer carries."""
        ckpt.load_training_state(self.model, self.optimizer, checkpoint, blobs["optimizer"])
        self.scheduler.load_state_dict(blobs["scheduler"])
        if self.scaler is not None and blobs.get("scaler"):
            self.scaler.load_state_dict(blobs["scaler"])

    def apply_current_hyperparameters(self) -> None:
        current = optim.build_optimizer(self.model, self.config.optim, self.device)
        optim.apply_current_hyperparameters(self.optimizer, current, self.scheduler)
