"""Corpus and tokenizer pipeline: sources -> tokenizer -> prepared token files -> memory-mapped, resumable batches."""

from tinyseek.data.dataset import TokenDataset, WindowSampler, iter_eval_batches
from tinyseek.data.prepare import prepare_corpus, read_meta, resolve_data
from tinyseek.data.sources import DEFAULT_DATASET, open_source
from tinyseek.data.tokenizer import (
    DEFAULT_TOKENIZER,
    check_tokenizer_fits,
    load_tokenizer,
    tokenizer_identity,
    train_bpe_tokenizer,
)

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_TOKENIZER",
    "TokenDataset",
    "WindowSampler",
    "check_tokenizer_fits",
    "iter_eval_batches",
    "load_tokenizer",
    "open_source",
    "prepare_corpus",
    "read_meta",
    "resolve_data",
    "tokenizer_identity",
    "train_bpe_tokenizer",
]
