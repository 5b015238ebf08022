"""The trainer's data component: which corpus and tokenizer a run uses (pinned by its run directory), the corpus
prepared once under a file lock, its memory-mapped splits, and where a resumed run's data order picks up."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from tinyseek import distributed
from tinyseek.data import TokenDataset, load_tokenizer, resolve_data, tokenizer_identity
from tinyseek.data.builtin import resolve_sources
from tinyseek.data.mixture import MixtureSampler, prepare_extra_sources
from tinyseek.train.config import DataConfig, TrainConfig
from tinyseek.train.metrics import log

RESOLVED_CONFIG = "config.yaml"


def pinned_sources(run_dir: Path) -> dict[str, str | None]:
    """The data and tokenizer a run directory's config.yaml recorded on its first start (none for a new run)."""
    try:
        data = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text()).get("data") or {}
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    return {"data": data.get("source"), "tokenizer": data.get("tokenizer")}


def write_resolved_config(run_dir: Path, config: TrainConfig) -> None:
    """The run's config.yaml: the configuration as resolved (sources, and max_steps once a time budget fixed it)."""
    path = run_dir / RESOLVED_CONFIG
    staging = path.with_suffix(".yaml.tmp")
    staging.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    staging.replace(path)


@contextmanager
def preparation_lock(cache_dir: Path):
    """Held while preparing data into `cache_dir`: one process tokenizes, the others (other ranks, other runs) wait."""
    from filelock import FileLock  # huggingface_hub's own dependency; a cross-platform lock file

    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / ".prepare.lock")):
        yield


class TrainingData:
    """`TrainingData(settings, run_dir)` resolves the sources (a resumed run keeps the ones its config.yaml pinned;
    the resolved pair is written back into `settings`, so config.yaml pins it for every later resume) and loads the
    tokenizer; `prepare` tokenizes the corpus, before any process group exists; `open` maps its splits."""

    def __init__(self, settings: DataConfig, run_dir: Path):
        self.settings = settings
        sources = resolve_sources(settings.source, settings.tokenizer, pinned_sources(run_dir))
        settings.source, settings.tokenizer = sources.data, sources.tokenizer
        if distributed.process_rank() == 0 and sources.note:
            print(f"tinyseek train: {sources.note}", file=sys.stderr, flush=True)
        self.tokenizer_spec = settings.tokenizer
        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        self.tokenizer_id = tokenizer_identity(self.tokenizer)
        self.data_dir: Path | None = None
        self.extra_data_dirs: list[Path] = []

    def prepare(self, vocab_size: int, split_by_fallback: bool = False) -> None:
        """The prepared corpus (and the mixture's other sources): every rank asks for it under one file lock, so the
        first prepares it while the others wait (however long a large corpus takes, no collective is waiting with a
        timeout), then find it ready. `split_by_fallback`: a split column that the data lacks gives way to whole
        documents (when a preset, not the user, named it)."""
        settings = self.settings
        cache_dir = Path(settings.cache_dir).expanduser()
        with preparation_lock(cache_dir):
            self.data_dir = resolve_data(
                settings.source, self.tokenizer_spec, cache_dir, text_column=settings.text_column,
                split_by=settings.split_by, split_by_fallback=split_by_fallback, val_fraction=settings.val_fraction,
                val_documents=settings.val_documents, vocab_size=vocab_size,
            )
            self.extra_data_dirs = prepare_extra_sources(
                self.data_dir, list(settings.mixture), self.tokenizer_spec, cache_dir,
                split_by=settings.split_by, val_fraction=settings.val_fraction, text_column=settings.text_column,
                vocab_size=vocab_size,
            ) if settings.mixture else []

    def open(self) -> None:
        """The memory-mapped splits of the prepared corpus and of the mixture's other sources."""
        self.train_set = TokenDataset(self.data_dir, "train")
        self.val_set = TokenDataset(self.data_dir, "val")
        self.extra_train_sets = [TokenDataset(folder, "train") for folder in self.extra_data_dirs]

    def checkpoint_state(self) -> dict[str, str]:
        return {"tokenizer": self.tokenizer_id, "tokenizer_spec": self.tokenizer_spec, "data_dir": str(self.data_dir)}

    def tokens_per_step(self, world_size: int) -> int:
        settings = self.settings
        return settings.seq_len * settings.micro_batch_size * settings.grad_accum * world_size

    def describe_batch(self, world_size: int, max_steps: int) -> str:
        settings = self.settings
        return (
            f"batch {settings.micro_batch_size * settings.grad_accum * world_size} sequences x {settings.seq_len} "
            f"tokens = {self.tokens_per_step(world_size):,} tokens per step (micro-batch {settings.micro_batch_size} "
            f"x accumulation {settings.grad_accum} x {world_size} processes); {max_steps} steps"
        )

    def describe(self, sampler) -> list[str]:
        """The corpus and its splits, and the mixture's other sources if `sampler` draws from several."""
        train, val = self.train_set, self.val_set
        lines = [
            f"data {self.settings.source} ({self.data_dir}) | train {len(train):,} tokens, {train.num_documents:,} "
            f"documents | val {len(val):,} tokens, {val.num_documents:,} documents | tokenizer "
            f"{self.tokenizer_spec} ({self.tokenizer_id})"
        ]
        if isinstance(sampler, MixtureSampler):
            lines += [
                f"mixture: + {source.dataset.prepared_dir} | train {len(source.dataset):,} tokens | weight {weight:g} "
                f"(source weight {sampler.weights[0]:g})"
                for source, weight in zip(sampler.sources[1:], sampler.weights[1:])
            ]
        return lines


def continue_data_order(sampler, saved_state: dict, step: int, grad_accum: int, world_size: int) -> None:
    """Pick the sampler's order up at the first window the checkpoint (its trainer state `saved_state`, written at
    optimizer step `step`) had not read, also when the global batch changed (another world size, micro-batch or
    accumulation)."""
    saved = saved_state["sampler"]
    saved_accum = saved_state["config"]["data"]["grad_accum"]
    consumed = saved.get("first_window", 0) + step * saved_accum * saved["global_batch_size"]
    sampler.continue_after(saved, consumed, step * grad_accum)
    if (saved["global_batch_size"], saved_accum) != (sampler.global_batch_size, grad_accum):
        log.warning(
            "the global batch changed from %d x %d to %d x %d windows (%d -> %d processes): the data order "
            "continues at window %s of its stream, so no window repeats or is skipped, but batches differ from "
            "an uninterrupted run's", saved["global_batch_size"], saved_accum, sampler.global_batch_size,
            grad_accum, saved.get("world_size", 1), world_size, f"{consumed:,}",
        )
