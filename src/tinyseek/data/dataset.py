"""Reading prepared token files: a memory-mapped dataset and a resumable, rank-sharded window sampler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tinyseek.data.prepare import META_FILE, SPLITS, read_meta
from tinyseek.errors import ConfigError, FileError, InputError


class TokenDataset:
    """One split of a prepared folder as a flat, memory-mapped token array."""

    def __init__(self, prepared_dir: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.prepared_dir = Path(prepared_dir)
        meta = read_meta(self.prepared_dir)
        if meta is None:
            raise FileError(
                f"{self.prepared_dir} is not a complete prepared corpus (no valid {META_FILE}); run `tinyseek prepare`"
            )
        self.meta = meta
        self.split = split
        dtype = np.dtype(meta["dtype"])
        num_tokens = meta[split]["tokens"]
        path = self.prepared_dir / f"{split}.bin"
        # numpy cannot map an empty file; an empty split (val fraction 0) is a plain empty array.
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,)) if num_tokens else np.empty(0, dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return self.meta[self.split]["documents"]

    @property
    def eos_token_id(self) -> int:
        return self.meta["tokenizer"]["eos_token_id"]

    @property
    def bos_token_id(self) -> int | None:
        """The token each document starts with (see `tinyseek.data.tokenizer.document_start_id`), or None."""
        return self.meta["tokenizer"]["bos_token_id"]

    @property
    def identity(self) -> str:
        return self.meta["cache_key"]


class WindowSampler:
    """Batches of `seq_len + 1`-token windows whose order is a pure function of (seed, index).

    Each epoch cuts the tokens into non-overlapping windows of stride `seq_len` (consecutive windows share the one
    token that is a target of the first and an input of the second) starting at a random offset, and visits them in
    a random permutation; offset and permutation are seeded by (seed, epoch). Micro-batch `index` (optimizer_step *
    grad_accum + micro_step) is global window positions [index * B, (index + 1) * B) with B = micro_batch_size *
    world_size, and rank r takes its own micro_batch_size of them, so ranks are disjoint and a resumed run at index
    N gets exactly what an uninterrupted one gets.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(dataset) < 2 * seq_len:
            raise InputError(
                f"the {dataset.split} split has {len(dataset)} tokens, too few for windows of seq_len {seq_len} "
                f"(needs at least {2 * seq_len}); prepare more data or lower seq_len"
            )
        self.dataset = dataset
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # Where micro-batch 0 starts in the endless sequence of windows; only a resume that changes the global batch
        # (a new world size, micro-batch or accumulation) moves it, so the order continues at the first unread window.
        self.first_window = 0
        # One window of slack leaves room for the random offset while every epoch has the same number of windows.
        self.windows_per_epoch = (len(dataset) - seq_len) // seq_len
        self._max_offset = min(seq_len - 1, len(dataset) - 1 - self.windows_per_epoch * seq_len)

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, seed: int) -> None:
        """Another seed is another order: the epoch layouts drawn from the old one go."""
        self._seed = seed
        self._layouts: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    def epoch_of(self, index: int) -> int:
        return (self.first_window + index * self.global_batch_size) // self.windows_per_epoch

    def _layout(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch not in self._layouts:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self._max_offset + 1))
            if len(self._layouts) >= 2:  # a batch spans at most two epochs
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = (offset, rng.permutation(self.windows_per_epoch))
        return self._layouts[epoch]

    def window_starts(self, index: int) -> np.ndarray:
        """Token positions where this rank's windows of micro-batch `index` begin."""
        return self.starts_at(self.positions(index))

    def positions(self, index: int) -> np.ndarray:
        """This rank's places in the endless window order for micro-batch `index`."""
        first = self.first_window + index * self.global_batch_size + self.rank * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size)

    def starts_at(self, positions: np.ndarray) -> np.ndarray:
        """Token positions where the windows at `positions` of the endless order begin (at most two epochs)."""
        starts = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(positions // self.windows_per_epoch):
            offset, permutation = self._layout(int(epoch))
            in_epoch = positions // self.windows_per_epoch == epoch
            starts[in_epoch] = offset + permutation[positions[in_epoch] % self.windows_per_epoch] * self.seq_len
        return starts

    def batch(self, index: int) -> torch.Tensor:
        """This rank's micro-batch `index`: a LongTensor [micro_batch_size, seq_len + 1]."""
        columns = np.arange(self.seq_len + 1)
        windows = self.dataset.tokens[self.window_starts(index)[:, None] + columns]
        return torch.from_numpy(windows.astype(np.int64))

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "first_window": self.first_window,
            "num_tokens": len(self.dataset),
            "data_identity": self.dataset.identity,
        }

    def mixture_identity(self) -> dict | None:
        """The sources and weights of a mixture (tinyseek.data.mixture); None for a single source."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Adopt a checkpoint's seed after checking that the data and batch shape would give the same order."""
        self._check_same_data(state, global_batch_size=self.global_batch_size)
        self.seed = state["seed"]
        self.first_window = state.get("first_window", 0)

    def continue_after(self, state: dict, consumed_windows: int, next_index: int) -> None:
        """Continue a checkpoint's order whose run had read `consumed_windows` windows, with micro-batch
        `next_index` next, even if the global batch changed: no window is repeated or skipped."""
        self._check_same_data(state)
        self.seed = state["seed"]
        self.first_window = consumed_windows - next_index * self.global_batch_size

    def _check_same_data(self, state: dict, **expected_batch) -> None:
        expected = {
            "seq_len": self.seq_len,
            "num_tokens": len(self.dataset),
            "data_identity": self.dataset.identity,
            "mixture": self.mixture_identity(),
            **expected_batch,
        }
        mismatched = [
            f"{name} {state.get(name)} -> {value}" for name, value in expected.items() if state.get(name) != value
        ]
        if mismatched:
            raise ConfigError(
                "cannot resume the data order: the checkpoint's sampler differs in " + ", ".join(mismatched)
            )

    @classmethod
    def from_state_dict(
        cls, dataset: TokenDataset, state: dict, rank: int = 0, world_size: int | None = None
    ) -> WindowSampler:
        """A sampler continuing a checkpoint's order; a new world_size keeps the global batch and splits it anew."""
        world_size = world_size or state["world_size"]
        if state["global_batch_size"] % world_size:
            raise ConfigError(
                f"the checkpoint's global batch of {state['global_batch_size']} windows "
                f"does not divide among {world_size} ranks"
            )
        sampler = cls(
            dataset, state["seq_len"], state["global_batch_size"] // world_size, state["seed"], rank, world_size
        )
        sampler.load_state_dict(state)
        return sampler


def iter_eval_batches(
    dataset: TokenDataset,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """The same validation windows every time: non-overlapping, spread evenly over the split, batched.

    With several ranks, batch b goes to rank b % world_size; the last batch may be smaller.
    """
    available = (len(dataset) - 1) // seq_len
    if available == 0:
        raise InputError(f"the {dataset.split} split has {len(dataset)} tokens, fewer than one window of {seq_len + 1}")
    count = available if max_batches is None else min(available, max_batches * batch_size)
    window_ids = np.unique(np.linspace(0, available - 1, num=count).round().astype(np.int64))
    columns = np.arange(seq_len + 1)
    for batch_number, first in enumerate(range(0, len(window_ids), batch_size)):
        if batch_number % world_size == rank:
            starts = window_ids[first : first + batch_size] * seq_len
            yield torch.from_numpy(dataset.tokens[starts[:, None] + columns].astype(np.int64))
