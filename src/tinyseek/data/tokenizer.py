"""Tokenizers: load one (Hub name, local directory or tokenizer.json), identify it, check it fits a model, train one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from tinyseek.data.builtin import builtin_tokenizer
from tinyseek.data.hub import first_line, require_hub
from tinyseek.data.sources import open_source
from tinyseek.durable import staging_directory
from tinyseek.errors import ConfigError, FileError, InputError, TinySeekError

LOCAL_TOKENIZER_HINT = (
    "for a local tokenizer pass --tokenizer PATH (a tokenizer directory or tokenizer.json), or --tokenizer builtin "
    "(or builtin-tinystories-bpe)"
)
# A bare tokenizer.json names no EOS token; these are the usual ones, in order of preference.
EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
TRAINED_METADATA = "tinyseek_tokenizer.json"
BYTE_ALPHABET_SIZE = 256


@contextlib.contextmanager
def _quiet_transformers():
    """transformers warns about harmless class-name mismatches in tokenizer configs; users cannot act on that."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") > 1


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer with an EOS token, from a Hub name, a local directory, a tokenizer.json file or a built-in
    name (`builtin`, `builtin-tinystories-bpe`)."""
    spec = str(spec)
    path = builtin_tokenizer(spec) or Path(spec).expanduser()
    if path.is_file() and path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").is_file():
        path = path.parent
    try:
        with _quiet_transformers():
            if path.is_file():
                tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
            elif path.is_dir():
                tokenizer = AutoTokenizer.from_pretrained(path)
            elif _looks_like_path(spec):
                raise FileError(f"no such tokenizer file or directory: {spec}")
            else:
                require_hub(f"tokenizer {spec!r}", LOCAL_TOKENIZER_HINT)
                tokenizer = AutoTokenizer.from_pretrained(spec)
    except TinySeekError:
        raise
    except Exception as error:  # transformers and tokenizers raise many types for one cause: unusable input
        raise InputError(f"cannot load tokenizer {spec!r}: {first_line(error)}; {LOCAL_TOKENIZER_HINT}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"tokenizer {spec!r} has no fast (Rust) implementation; tinyseek needs a tokenizer.json")
    if tokenizer.eos_token_id is None:
        vocab = tokenizer.get_vocab()
        eos = next((token for token in EOS_CANDIDATES if token in vocab), None)
        if eos is None:
            raise InputError(f"tokenizer {spec!r} has no EOS token (looked for {', '.join(EOS_CANDIDATES)})")
        tokenizer.eos_token = eos
    return tokenizer


def document_start_id(tokenizer: PreTrainedTokenizerFast) -> int | None:
    """The token every training document begins with in the prepared files: BOS where the tokenizer has one, else
    none (each document then follows the EOS that ends the one before)."""
    return tokenizer.bos_token_id


def encode_prompt(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The ids of a prompt, begun the way training documents begin: the ONE place that decides it.

    BOS + text where the tokenizer has a BOS (DeepSeek-Coder's own default, so plain transformers agrees), else
    EOS + text: without a BOS, what a document follows in training is the previous document's EOS.
    """
    start = document_start_id(tokenizer)
    if start is None:
        start = tokenizer.eos_token_id
    return [start] + tokenizer(text, add_special_tokens=False).input_ids


def match_prompt_convention(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Make the tokenizer's default call (`tokenizer(text)`) give `encode_prompt`'s ids, so that a client that knows
    nothing of tinyseek conditions the model as training did; a tokenizer that already does is left as it is."""
    from tokenizers.processors import TemplateProcessing

    probe = "Hello world"
    if tokenizer(probe).input_ids == encode_prompt(tokenizer, probe):
        return tokenizer
    start_id = encode_prompt(tokenizer, "")[0]
    start = tokenizer.convert_ids_to_tokens(start_id)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{start} $A", pair=f"{start} $A {start} $B:1", special_tokens=[(start, start_id)]
    )
    return tokenizer


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> None:
    """Refuse a tokenizer that can emit ids the model's embedding has no row for."""
    largest_id = len(tokenizer) - 1
    if largest_id >= vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens (largest id {largest_id}) but the model's vocab_size is "
            f"{vocab_size}; use a model with vocab_size >= {len(tokenizer)} or a smaller tokenizer"
        )


def tokenizer_identity(tokenizer: str | Path | PreTrainedTokenizerFast) -> str:
    """A hash of what the tokenizer does (vocabulary, merges, rules, special ids), not of where it was loaded from."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        tokenizer = load_tokenizer(tokenizer)
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    # Padding and truncation are call-time settings that transformers writes into the backend; they do not change ids.
    definition.pop("padding", None)
    definition.pop("truncation", None)
    definition["special_ids"] = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"sha256:{digest[:16]}"


def train_bpe_tokenizer(
    files_or_source: str | Path | Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    *,
    text_column: str = "text",
    split: str = "train",
    max_documents: int | None = None,
    min_frequency: int = 2,
    bos_token: str = "<|bos|>",
    eos_token: str = "<|eos|>",
    pad_token: str = "<|pad|>",
) -> Path:
    """Train a byte-level BPE on a corpus and save a directory that `load_tokenizer` loads.

    The special tokens take ids 0, 1 and 2 (BOS, EOS, PAD), then 3, 4 and 5 for the chat template's user, assistant
    and end-of-turn tokens, and the directory carries that template (`tinyseek.data.chat`);
    `tinyseek_tokenizer.json` records them with the vocabulary size and the corpus identity. Its default call puts
    BOS first, as `encode_prompt` does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tinyseek.data.chat import CHAT_TEMPLATE, CHAT_TOKENS

    special_tokens = [bos_token, eos_token, pad_token, *CHAT_TOKENS]
    smallest = BYTE_ALPHABET_SIZE + len(special_tokens)
    if vocab_size <= smallest:
        raise ConfigError(
            f"--vocab-size must exceed {smallest} (256 byte tokens and {len(special_tokens)} special tokens), "
            f"got {vocab_size}"
        )
    source = open_source(files_or_source, text_column=text_column, split=split)
    documents = source.documents(max_documents)
    first = next(documents, None)
    if first is None:
        raise InputError(f"the corpus {files_or_source} has no non-blank documents")

    def texts():
        yield first.text
        for document in documents:
            yield document.text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts(), trainer=trainer)
    tokenizer = match_prompt_convention(
        PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    out_dir = Path(out_dir)
    staging = staging_directory(out_dir.parent, out_dir.name)
    try:
        tokenizer.save_pretrained(staging)
        metadata = {
            "type": "byte-level BPE",
            "vocab_size": len(tokenizer),
            "special_tokens": {
                role: {"token": token, "id": tokenizer.convert_tokens_to_ids(token)}
                for role, token in zip(("bos", "eos", "pad"), special_tokens)
            },
            "chat_tokens": {token: tokenizer.convert_tokens_to_ids(token) for token in CHAT_TOKENS},
            "source": source.identity,
            "max_documents": max_documents,
            "min_frequency": min_frequency,
        }
        (staging / TRAINED_METADATA).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
