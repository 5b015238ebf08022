"""A training stage: what the loop draws its batches from and what it minimises, which of the run's settings it
trains with, and what it records in the model it trains. The loop, checkpoints, logging and the rest are the same for
every stage; pre-training is one, chat fine-tuning (tinyseek.train.sft: conversations, a loss on the replies only) the
other. A stage needs no subclass of the trainer: it is these functions, registered by name in STAGES."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Protocol

import torch

from tinyseek.data import WindowSampler
from tinyseek.data.mixture import MixtureSampler
from tinyseek.ops import StepMemory

if TYPE_CHECKING:
    from tinyseek.config import TinySeekConfig
    from tinyseek.distributed import World
    from tinyseek.train.config import TrainConfig
    from tinyseek.train.data import TrainingData


class Batch(Protocol):
    """What a stage's loss takes: a tensor of windows, or the stage's own tensors that move together."""

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch: ...


class BatchSource(Protocol):
    """This process's micro-batches, by index over the whole run; its state travels in checkpoints."""

    global_batch_size: int

    def batch(self, index: int) -> Batch: ...

    def state_dict(self) -> dict: ...

    def continue_after(self, saved: dict, consumed: int, next_index: int) -> None: ...


class StepLoss(NamedTuple):
    loss: torch.Tensor  # what backward minimises
    reported: torch.Tensor  # what the log calls the loss (pre-training: next-token loss without the auxiliary terms)


def run_settings(config: TrainConfig) -> TrainConfig:
    """Pre-training trains with the run's top-level settings as they are."""
    return config


def no_lines(source: BatchSource) -> list[str]:
    return []


def leave_unmarked(model_config: TinySeekConfig) -> None:
    pass


@dataclass(frozen=True)
class Stage:
    name: str
    batches: Callable[[TrainingData, TrainConfig, World], BatchSource]
    loss: Callable[[torch.nn.Module, Batch, StepMemory], StepLoss]
    settings: Callable[[TrainConfig], TrainConfig] = run_settings
    """The run's configuration as this stage trains with it (its steps, learning rate and schedule)."""
    mark: Callable[[TinySeekConfig], None] = leave_unmarked
    """Records in the model's configuration (and so in every checkpoint and export) what the stage taught it."""
    describe: Callable[[BatchSource], list[str]] = no_lines
    """The announcement's lines about the stage's data, beside the corpus's."""


def token_windows(data: TrainingData, config: TrainConfig, world: World) -> BatchSource:
    """Windows of seq_len + 1 tokens of the corpus (and, with a mixture, of its other sources by weight)."""
    settings = data.settings
    if settings.mixture:
        return MixtureSampler(
            [data.train_set, *data.extra_train_sets], [settings.weight, *settings.mixture.values()],
            settings.seq_len, settings.micro_batch_size, config.seed, world.rank, world.size,
        )
    return WindowSampler(
        data.train_set, settings.seq_len, settings.micro_batch_size, config.seed, world.rank, world.size
    )


def next_token_loss(model: torch.nn.Module, window: torch.Tensor, memory: StepMemory) -> StepLoss:
    """Every position predicts the next token; the model adds its load-balancing and multi-token terms."""
    out = model(input_ids=window[:, :-1], shift_labels=window[:, 1:], step_memory=memory)
    return StepLoss(out.loss, out.lm_loss)


PRETRAINING = Stage("pre-training", token_windows, next_token_loss)
