"""Training on a weighted mixture of sources, each with its own held-out books.

The first source is split into train and validation as usual (whole books with `split_by`). Every other source puts
the books it shares with the first where the first put them, so no held-out book is ever trained on, whichever
source repeats it; its other books are held out by a hash of their title, so sources that share a book the first
lacks decide it alike too. The trainer validates on the first source; each source's held-out books can be scored on
their own (benchmarks/quality.py does). Windows are drawn from each source in proportion to its weight, in an order
that is a pure function of (seed, window position), so resumed runs read exactly what uninterrupted ones do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tinyseek.data.dataset import TokenDataset, WindowSampler
from tinyseek.data.prepare import prepare_corpus, read_meta
from tinyseek.errors import ConfigError

# Every block of this many consecutive windows holds each source's exact share (largest remainder), shuffled.
MIX_BLOCK = 1024
MIX_STREAM = 0x6D6978  # keeps the mixture's random stream apart from the window layouts of the same seed


def prepare_extra_sources(
    primary_dir: Path, sources: list[str], tokenizer: str, cache_root: Path, *, split_by: str | None,
    val_fraction: float, **prepare_kwargs
) -> list[Path]:
    """Prepare each extra source, split as the primary was: its groups where the primary put them, others held out
    by name at `val_fraction`."""
    meta = read_meta(primary_dir)
    if split_by is None or "group_names" not in meta["train"]:
        raise ConfigError("data.mixture: the sources can only be split alike by a column that names the books "
                          "(data.split_by)")
    pinned = {group: False for group in meta["train"]["group_names"]}
    pinned |= {group: True for group in meta["val"]["group_names"]}
    return [
        prepare_corpus(
            source, tokenizer, cache_root, split_by=split_by, val_fraction=val_fraction, pinned_groups=pinned,
            **prepare_kwargs,
        )
        for source in sources
    ]


def block_quota(weights: list[float]) -> np.ndarray:
    """How many windows of each MIX_BLOCK go to each source: proportional to the weights, summing to the block."""
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * MIX_BLOCK
    quota = np.floor(shares).astype(np.int64)
    quota[np.argsort(quota - shares, kind="stable")[: MIX_BLOCK - quota.sum()]] += 1
    return quota


class MixtureSampler(WindowSampler):
    """A WindowSampler over several training sets. Window position p of the endless order belongs to one source,
    chosen by a seeded shuffle of its block's quota, and is that source's k-th window, k counting the earlier
    positions that source got; each source then lays its windows out as a WindowSampler of its own does."""

    def __init__(
        self,
        datasets: list[TokenDataset],
        weights: list[float],
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(datasets) != len(weights) or not all(weight > 0 for weight in weights):
            raise ConfigError(f"data.mixture: every source needs a positive weight, got {weights}")
        super().__init__(datasets[0], seq_len, micro_batch_size, seed, rank, world_size)
        self.sources = [WindowSampler(dataset, seq_len, 1, seed) for dataset in datasets]
        self.weights = list(weights)
        self.quota = block_quota(weights)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The source of each position in the block, and how many of that source's windows precede it there."""
        if block not in self._blocks:
            rng = np.random.default_rng([self.seed, MIX_STREAM, block])
            owner = rng.permutation(np.repeat(np.arange(len(self.sources)), self.quota))
            is_owner = owner[:, None] == np.arange(len(self.sources))
            before = (np.cumsum(is_owner, axis=0) - is_owner)[np.arange(MIX_BLOCK), owner]
            if len(self._blocks) >= 2:
                self._blocks.pop(min(self._blocks))
            self._blocks[block] = (owner, before)
        return self._blocks[block]

    def sources_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For window positions: the source index and the window's place in that source's own order."""
        source = np.empty(len(positions), dtype=np.int64)
        ordinal = np.empty(len(positions), dtype=np.int64)
        for block in np.unique(positions // MIX_BLOCK):
            owner, before = self._block(int(block))
            here = positions // MIX_BLOCK == block
            within = positions[here] % MIX_BLOCK
            source[here] = owner[within]
            ordinal[here] = block * self.quota[owner[within]] + before[within]
        return source, ordinal

    def batch(self, index: int) -> torch.Tensor:
        source, ordinal = self.sources_of(self.positions(index))
        columns = np.arange(self.seq_len + 1)
        windows = np.empty((len(source), self.seq_len + 1), dtype=np.int64)
        for number, sampler in enumerate(self.sources):
            mine = source == number
            if mine.any():
                windows[mine] = sampler.dataset.tokens[sampler.starts_at(ordinal[mine])[:, None] + columns]
        return torch.from_numpy(windows)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mixture": self.mixture_identity()}

    def mixture_identity(self) -> dict:
        return {"sources": [sampler.dataset.identity for sampler in self.sources], "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._adopt_seed()

    def continue_after(self, state: dict, consumed_windows: int, next_index: int) -> None:
        super().continue_after(state, consumed_windows, next_index)
        self._adopt_seed()

    def _adopt_seed(self) -> None:
        self._blocks.clear()
        for sampler in self.sources:
            sampler.seed = self.seed
