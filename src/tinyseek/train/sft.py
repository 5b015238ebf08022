"""The chat fine-tuning stage (`tinyseek train --stage sft`): conversations rendered with the chat template, packed
whole into windows, and a loss on the assistant's tokens only.

A window holds several conversations side by side, each a document of its own (`document_ids`): no token attends
across a boundary, positions restart at each conversation, and the targets outside the assistant's tokens
(`tinyseek.data.chat.assistant_mask`: each reply and its `<|EOT|>`) are ignored, so the model learns to answer, not to
ask. The order of the windows is a pure function of (seed, index), as pre-training's is, so a resumed run gets
exactly the batches an uninterrupted one gets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from tinyseek.data.chat import assistant_mask, mark_chat_trained
from tinyseek.data.conversations import read_conversations
from tinyseek.errors import ConfigError, InputError
from tinyseek.loading import resolve_checkpoint
from tinyseek.ops import IGNORE_INDEX, StepMemory
from tinyseek.train.stage import Stage, StepLoss

if TYPE_CHECKING:
    from tinyseek.distributed import World
    from tinyseek.train.config import TrainConfig
    from tinyseek.train.data import TrainingData


@dataclass(frozen=True)
class TokenizedConversation:
    ids: np.ndarray  # int64, the rendered conversation
    trained: np.ndarray  # bool, per id: whether the model learns to write it (assistant_mask)


@dataclass(frozen=True)
class PackedWindows:
    """A micro-batch of packed windows, each [micro_batch_size, seq_len]."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # the next token where it is the assistant's, IGNORE_INDEX elsewhere
    document_ids: torch.Tensor  # equal within one conversation; the padding at a window's end is a document too

    def to(self, device: torch.device, non_blocking: bool = False) -> PackedWindows:
        return PackedWindows(*(tensor.to(device, non_blocking=non_blocking)
                               for tensor in (self.input_ids, self.labels, self.document_ids)))


def tokenize_conversations(spec: str, tokenizer, window: int, progress: bool = True) -> list[TokenizedConversation]:
    """Every conversation of `spec` rendered and masked; a bad row (or one longer than `window`) is an InputError
    naming its file and row."""
    conversations = read_conversations(spec, tokenizer=tokenizer, window=window)
    tokenized = [
        TokenizedConversation(np.array(conversation.ids, dtype=np.int64),
                              np.array(assistant_mask(tokenizer, conversation.ids), dtype=bool))
        for conversation in tqdm(conversations, desc=f"tokenizing {spec}", unit=" conversations", disable=not progress)
    ]
    if not tokenized:
        raise InputError(f"{spec} holds no conversations")
    return tokenized


def pack(lengths: np.ndarray, order: np.ndarray, window: int) -> list[list[int]]:
    """The conversations in `order`, as rows of whole conversations that fit in `window` tokens: each row takes the
    next conversation while it fits (next fit: the order stays the drawn one)."""
    rows, row, used = [], [], 0
    for index in order.tolist():
        if row and used + lengths[index] > window:
            rows.append(row)
            row, used = [], 0
        row.append(index)
        used += lengths[index]
    rows.append(row)
    return rows


def packed_row(conversations: list[TokenizedConversation], members: list[int], seq_len: int,
               pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, document ids) of one window holding `members`, padded at the end."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    trained = np.zeros(seq_len, dtype=bool)
    documents = np.full(seq_len, len(members), dtype=np.int64)
    start = 0
    for document, index in enumerate(members):
        conversation = conversations[index]
        end = start + len(conversation.ids)
        ids[start:end], trained[start:end], documents[start:end] = conversation.ids, conversation.trained, document
        start = end
    # A position's target is the next id; it counts where that id is the assistant's. Every conversation begins with
    # BOS, which is never, so no target crosses into the next conversation.
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
    return ids, labels, documents


class ConversationSampler:
    """Micro-batches of packed windows. Each epoch draws a permutation of the conversations from (seed, epoch) and
    packs them in that order; micro-batch `index` is windows [index * B, (index + 1) * B) of the endless sequence of
    epochs (B = micro_batch_size * world_size), of which rank r takes its own micro_batch_size."""

    def __init__(self, conversations: list[TokenizedConversation], seq_len: int, micro_batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, source: str = ""):
        self.conversations, self.seq_len, self.pad_id, self.source = conversations, seq_len, pad_id, source
        self.micro_batch_size, self.seed, self.rank, self.world_size = micro_batch_size, seed, rank, world_size
        self.lengths = np.array([len(conversation.ids) for conversation in conversations])
        # Where micro-batch 0 starts in the endless sequence of windows (moved only by a resume with another batch).
        self.first_window = 0
        self.epoch_starts = [0]  # the window position where each packed epoch begins, as far as packed
        self.epochs: dict[int, list[list[int]]] = {}
        digest = hashlib.sha256()
        for conversation in conversations:
            digest.update(conversation.ids.tobytes() + conversation.trained.tobytes())
        self.identity = digest.hexdigest()

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self.epochs:
            if len(self.epochs) >= 2:  # a batch spans at most two epochs
                self.epochs.pop(min(self.epochs))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.conversations))
            self.epochs[epoch] = pack(self.lengths, order, self.seq_len)
        return self.epochs[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, row) of a window position in the endless sequence."""
        while position >= self.epoch_starts[-1]:
            epoch = len(self.epoch_starts) - 1
            self.epoch_starts.append(self.epoch_starts[-1] + len(self.epoch_rows(epoch)))
        epoch = int(np.searchsorted(self.epoch_starts, position, side="right")) - 1
        return epoch, position - self.epoch_starts[epoch]

    def batch(self, index: int) -> PackedWindows:
        first = self.first_window + index * self.global_batch_size + self.rank * self.micro_batch_size
        rows = []
        for position in range(first, first + self.micro_batch_size):
            epoch, row = self.locate(position)
            rows.append(packed_row(self.conversations, self.epoch_rows(epoch)[row], self.seq_len, self.pad_id))
        return PackedWindows(*(torch.from_numpy(np.stack(parts)) for parts in zip(*rows)))

    def state_dict(self) -> dict:
        return {
            "seed": self.seed, "seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size, "global_batch_size": self.global_batch_size,
            "first_window": self.first_window, "num_conversations": len(self.conversations),
            "data_identity": self.identity,
        }

    def continue_after(self, state: dict, consumed_windows: int, next_index: int) -> None:
        """Continue a checkpoint's order whose run had read `consumed_windows` windows, with micro-batch
        `next_index` next: the same conversations and window, or a clear error."""
        expected = {"seq_len": self.seq_len, "num_conversations": len(self.conversations),
                    "data_identity": self.identity}
        mismatched = [f"{name} {state.get(name)} -> {value}" for name, value in expected.items()
                      if state.get(name) != value]
        if mismatched:
            raise ConfigError("cannot resume the conversation order: the checkpoint's sampler differs in "
                              + ", ".join(mismatched))
        if state["seed"] != self.seed:
            self.seed, self.epochs, self.epoch_starts = state["seed"], {}, [0]
        self.first_window = consumed_windows - next_index * self.global_batch_size

    def describe(self) -> list[str]:
        tokens, trained = int(self.lengths.sum()), int(sum(c.trained.sum() for c in self.conversations))
        return [f"conversations {self.source}: {len(self.conversations):,}, {tokens:,} tokens ({trained:,} of them "
                f"the assistant's, trained on), packed into {len(self.epoch_rows(0)):,} windows of {self.seq_len} "
                "per epoch"]


def packed_conversations(data: TrainingData, config: TrainConfig, world: World) -> ConversationSampler:
    settings = config.data
    tokenizer = data.tokenizer
    conversations = tokenize_conversations(config.sft.conversations, tokenizer, settings.seq_len,
                                           progress=config.logging.progress_bar and world.is_main)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ConversationSampler(conversations, settings.seq_len, settings.micro_batch_size, pad_id, config.seed,
                               world.rank, world.size, source=config.sft.conversations)


def assistant_loss(model: torch.nn.Module, batch: PackedWindows, memory: StepMemory) -> StepLoss:
    """Mean cross-entropy over the assistant's tokens of the micro-batch, each conversation seeing only itself."""
    out = model(input_ids=batch.input_ids, shift_labels=batch.labels, document_ids=batch.document_ids,
                step_memory=memory)
    return StepLoss(out.loss, out.lm_loss)


def model_positions(config: TrainConfig) -> int:
    """The max_position_embeddings of the model the stage trains: the saved one it starts from, else the config's."""
    if config.init_from is None:
        return config.build_model_config().max_position_embeddings
    saved = resolve_checkpoint(Path(config.init_from).expanduser()) / "config.json"
    return json.loads(saved.read_text())["max_position_embeddings"]


def chat_settings(config: TrainConfig) -> TrainConfig:
    """The run's settings with the chat stage's window, steps, time budget, learning rate and schedule."""
    chat = config.sft
    return config.model_copy(deep=True, update={
        "max_steps": chat.max_steps, "time_budget": chat.time_budget, "schedule": chat.schedule.model_copy(),
        "optim": config.optim.model_copy(update={"lr": chat.lr}),
        "data": config.data.model_copy(update={"seq_len": chat.seq_len or model_positions(config)}),
    })


CHAT_FINE_TUNING = Stage(
    "chat fine-tuning", packed_conversations, assistant_loss, settings=chat_settings, mark=mark_chat_trained,
    describe=ConversationSampler.describe,
)
