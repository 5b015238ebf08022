"""Corpus and tokenizer pipeline: sources -> tokenizer -> prepared token files -> memory-mapped, resumable batches."""

from tinyseek.lazy import lazy_exports

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

# Imported on first use, so that the command-line parsers in this package load without torch or transformers.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "TokenDataset": "tinyseek.data.dataset",
        "WindowSampler": "tinyseek.data.dataset",
        "iter_eval_batches": "tinyseek.data.dataset",
        "prepare_corpus": "tinyseek.data.prepare",
        "read_meta": "tinyseek.data.prepare",
        "resolve_data": "tinyseek.data.prepare",
        "DEFAULT_DATASET": "tinyseek.data.builtin",
        "open_source": "tinyseek.data.sources",
        "DEFAULT_TOKENIZER": "tinyseek.data.builtin",
        "check_tokenizer_fits": "tinyseek.data.tokenizer",
        "load_tokenizer": "tinyseek.data.tokenizer",
        "tokenizer_identity": "tinyseek.data.tokenizer",
        "train_bpe_tokenizer": "tinyseek.data.tokenizer",
    },
)
