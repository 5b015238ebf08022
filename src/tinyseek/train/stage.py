"""A training stage: what the loop draws its batches from and what it minimises. The loop, checkpoints, logging and
the rest are the same for every stage; pre-training is one, chat fine-tuning (conversations, a loss on the replies
only) is the next. A stage needs no subclass of the trainer: it is these two functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Protocol

import torch

from tinyseek.data import WindowSampler
from tinyseek.data.mixture import MixtureSampler
from tinyseek.ops import StepMemory

if TYPE_CHECKING:
    from tinyseek.distributed import World
    from tinyseek.train.config import TrainConfig
    from tinyseek.train.data import TrainingData


class BatchSource(Protocol):
    """This process's micro-batches, by index over the whole run; its state travels in checkpoints."""

    global_batch_size: int

    def batch(self, index: int) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def continue_after(self, saved: dict, consumed: int, next_index: int) -> None: ...


class StepLoss(NamedTuple):
    loss: torch.Tensor  # what backward minimises
    reported: torch.Tensor  # what the log calls the loss (pre-training: next-token loss without the auxiliary terms)


@dataclass(frozen=True)
class Stage:
    name: str
    batches: Callable[[TrainingData, TrainConfig, World], BatchSource]
    loss: Callable[[torch.nn.Module, torch.Tensor, StepMemory], StepLoss]


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
