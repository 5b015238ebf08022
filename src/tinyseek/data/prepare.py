"""Turn a corpus into training-ready token files: `train.bin`, `val.bin` (flat token ids) and `meta.json`.

Each document is written as `encode_prompt` begins a prompt: BOS (where the tokenizer has one), its tokens, then
EOS, which separates it from the next; so a prompt is conditioned exactly as a document start was in training. `out` is a cache root: the files go to a
subfolder named after the source, the tokenizer and a hash of everything that determines them (source content,
tokenizer identity, split settings), so unchanged inputs reuse it at once and changed inputs get a new folder.
A folder is built under a `.partial-*` name, fsynced, given its `meta.json` last and renamed into place; a folder
without a valid `meta.json` is never used, so an interrupted run leaves nothing a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinyseek import faults
from tinyseek.data.builtin import DEFAULT_DATASET, DEFAULT_TOKENIZER
from tinyseek.data.sources import Document, open_source, slug
from tinyseek.data.tokenizer import (
    check_tokenizer_fits,
    document_start_id,
    load_tokenizer,
    tokenizer_identity,
)
from tinyseek.durable import fsync_path, staging_directory
from tinyseek.errors import ConfigError, FileError, InputError

# 2: UTF-8 bytes per split and the validation groups in meta.json; 3: BOS before each document; 4: the training
# groups too, so that a mixture's other sources can split alike (tinyseek.data.mixture)
FORMAT_VERSION = 4
META_FILE = "meta.json"
SPLITS = ("train", "val")
BATCH_CHARACTERS = 1 << 20  # per worker task: large enough to amortise pickling, small enough for a smooth bar
COPY_CHUNK_TOKENS = 1 << 24
LONG_TEXT_CHARACTERS = 1 << 20  # longer documents are tokenized in pieces (see _Encoder.encode_long)


def token_dtype(vocabulary_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocabulary_size <= 1 << 16 else np.uint32)


class _Encoder:
    """Tokenizes a batch of texts into one flat array: [start] + tokens + EOS for each text."""

    def __init__(self, tokenizer_json: str, start_token_id: int | None, eos_token_id: int, dtype: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # A document that contains the literal text of EOS must not split itself in two.
        self.tokenizer.encode_special_tokens = True
        self.start = np.array([] if start_token_id is None else [start_token_id], dtype=dtype)
        self.eos = np.array([eos_token_id], dtype=dtype)
        self.dtype = dtype

        self.splits_long_texts = _splits_exactly(self.tokenizer)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        long = {i for i, text in enumerate(texts) if len(text) > LONG_TEXT_CHARACTERS and self.splits_long_texts}
        short = iter(self.tokenizer.encode_batch_fast([t for i, t in enumerate(texts) if i not in long],
                                                      add_special_tokens=False))
        pieces, lengths = [], []
        for index, text in enumerate(texts):
            ids = self.encode_long(text) if index in long else np.asarray(next(short).ids, dtype=self.dtype)
            pieces += [self.start, ids, self.eos]
            lengths.append(len(self.start) + len(ids) + 1)
        return np.concatenate(pieces), np.array(lengths, dtype=np.int64)

    def encode_long(self, text: str) -> np.ndarray:
        """One very long text in pieces of about LONG_TEXT_CHARACTERS, so memory stays bounded: the tokenizer keeps
        per-byte alignments while it encodes (a 20 MB line took 2.7 GB at once). Pieces start at a space between two
        letters, where the pre-tokenizer always cuts, so the ids are those of the whole text."""
        ids, start = [], 0
        while start < len(text):
            end = _piece_end(text, start + LONG_TEXT_CHARACTERS)
            encoding = self.tokenizer.encode(text[start:end], add_special_tokens=False)
            ids.append(np.asarray(encoding.ids, dtype=self.dtype))
            start = end
        return np.concatenate(ids)


def _piece_end(text: str, at_least: int) -> int:
    """The first position from `at_least` on that holds a space between two letters, or the end."""
    position = at_least
    while 0 < position < len(text):
        position = text.find(" ", position)
        if position < 0 or position + 1 >= len(text):
            return len(text)
        if text[position - 1].isalpha() and text[position + 1].isalpha():
            return position
        position += 1
    return len(text)


def _splits_exactly(tokenizer) -> bool:
    """Whether cutting a text at a space between two letters gives the same ids as encoding it whole: true for
    byte-level BPE without a normalizer (GPT-2, Llama 3, DeepSeek, Qwen and tinyseek's own BPE), whose pre-tokenizer
    patterns end a run of letters at a space and start the next piece with " " + letters, and with no added token
    that spans such a space."""
    definition = json.loads(tokenizer.to_str())
    normalizer = definition.get("normalizer")
    if normalizer not in (None, {"type": "Sequence", "normalizers": []}):
        return False
    if "ByteLevel" not in json.dumps(definition.get("pre_tokenizer")):
        return False
    return not any(re.search(r"\w\s\w", token["content"]) for token in definition.get("added_tokens", []))


_worker_encoder: _Encoder | None = None


def _start_worker(*encoder_args) -> None:
    # Parallelism comes from the processes; Rust threads inside each would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_encoder
    _worker_encoder = _Encoder(*encoder_args)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker waits on its task queue forever; when the parent is killed (SIGKILL gives it no chance to stop the
    pool) the worker would outlive it, so it watches for being re-parented and exits."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder(texts)


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    batch, characters = [], 0
    for document in documents:
        batch.append(document)
        characters += len(document.text)
        if characters >= BATCH_CHARACTERS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


def _encode_all(documents: Iterable[Document], encoder_args: tuple, num_workers: int):
    """(documents, tokens, lengths) per batch, in source order, with a bounded number of batches in flight."""
    if num_workers <= 1:
        encoder = _Encoder(*encoder_args)
        for batch in _batches(documents):
            yield (batch, *encoder([document.text for document in batch]))
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_start_worker, initargs=encoder_args)
    try:
        pending = deque()
        for batch in _batches(documents):
            pending.append((batch, pool.submit(_encode_in_worker, [document.text for document in batch])))
            if len(pending) >= 2 * num_workers:
                batch, future = pending.popleft()
                yield (batch, *future.result())
        while pending:
            batch, future = pending.popleft()
            yield (batch, *future.result())
    finally:
        pool.shutdown(cancel_futures=True)


def held_out_by_name(group: str, val_fraction: float, seed: int) -> bool:
    """Whether a group that no other source has decided is held out: a pure function of its name, so every source
    that has the group decides alike, without knowing the others."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _validation_mask(
    source: str,
    groups: list[str] | None, num_documents: int, val_fraction: float, val_documents: int | None, seed: int,
    pinned_groups: Mapping[str, bool] | None = None,
) -> np.ndarray:
    """Which documents go to validation: whole groups (or whole documents), chosen by a seeded permutation; or, with
    `pinned_groups`, each group where the mapping says and any other by `held_out_by_name`."""
    if pinned_groups is not None:
        decided = {
            group: pinned_groups[group] if group in pinned_groups else held_out_by_name(group, val_fraction, seed)
            for group in set(groups)
        }
        return np.array([decided[group] for group in groups], dtype=bool)
    if groups is None:
        unit_of_document, num_units, unit_name = np.arange(num_documents), num_documents, "documents"
    else:
        units, unit_of_document = np.unique(np.array(groups, dtype=object).astype(str), return_inverse=True)
        num_units, unit_name = len(units), "groups"
    if val_documents is not None:
        count = val_documents
    else:
        count = max(1, round(val_fraction * num_units)) if val_fraction > 0 else 0
    if count and count >= num_units:
        raise ConfigError(
            f"the corpus {source} has {num_units} {unit_name}; a validation split of {count} would leave none for training "
            "(lower --val-fraction or --val-documents, or pass --val-fraction 0)"
        )
    validation_units = np.random.default_rng(seed).permutation(num_units)[:count]
    return np.isin(unit_of_document, validation_units)


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _split_files(
    staging: Path, all_tokens: Path, dtype: np.dtype, lengths: np.ndarray, text_bytes: np.ndarray, is_val: np.ndarray
) -> dict:
    """Copy each document from the all-documents file to train.bin or val.bin, in source order; count each split's
    tokens, documents and UTF-8 bytes (the denominator of bits per byte, the same for every tokenizer)."""
    tokens = np.memmap(all_tokens, dtype=dtype, mode="r")
    ends = np.cumsum(lengths)
    starts = ends - lengths
    boundaries = np.flatnonzero(np.diff(is_val.astype(np.int8))) + 1
    run_starts = np.concatenate([[0], boundaries])
    run_ends = np.concatenate([boundaries, [len(lengths)]])
    counts = {split: {"tokens": 0, "documents": 0, "bytes": 0} for split in SPLITS}
    handles = {split: open(staging / f"{split}.bin", "wb") for split in SPLITS}
    try:
        for first, stop in zip(run_starts, run_ends):
            split = "val" if is_val[first] else "train"
            begin, end = int(starts[first]), int(ends[stop - 1])
            for chunk_start in range(begin, end, COPY_CHUNK_TOKENS):
                handles[split].write(tokens[chunk_start : min(end, chunk_start + COPY_CHUNK_TOKENS)].tobytes())
            counts[split]["tokens"] += end - begin
            counts[split]["documents"] += int(stop - first)
            counts[split]["bytes"] += int(text_bytes[first:stop].sum())
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in handles.values():
            handle.close()
    return counts


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tokenizer_name(spec: str) -> str:
    path = Path(spec)
    return slug(path.parent.name if path.name == "tokenizer.json" else path.name)


def read_meta(prepared_dir: str | Path) -> dict | None:
    """The metadata of a complete prepared folder, or None when it is missing, partial or of another format."""
    prepared_dir = Path(prepared_dir)
    try:
        meta = json.loads((prepared_dir / META_FILE).read_text(encoding="utf-8"))
        complete = meta["format_version"] == FORMAT_VERSION and all(
            (prepared_dir / f"{split}.bin").stat().st_size == meta[split]["tokens"] * np.dtype(meta["dtype"]).itemsize
            for split in SPLITS
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def prepare_corpus(
    source: str = DEFAULT_DATASET,
    tokenizer: str = DEFAULT_TOKENIZER,
    out: str | Path = "data/prepared",
    *,
    text_column: str = "text",
    split: str = "train",
    val_fraction: float = 0.01,
    val_documents: int | None = None,
    split_by: str | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    max_documents: int | None = None,
    streaming: bool | None = None,
    vocab_size: int | None = None,
    pinned_groups: Mapping[str, bool] | None = None,
    split_by_fallback: bool = False,
) -> Path:
    """Tokenize `source` with `tokenizer` into `<out>/<name>-<hash>/` and return that folder (reused when it exists).

    The validation split takes `val_documents` documents (or `split_by` groups) when given, else `val_fraction`
    of them (at least one when the fraction is positive). `vocab_size`, when given, refuses a tokenizer too large
    for the model before any work is done. `pinned_groups` (group -> held out?) splits a mixture's other source as
    its primary was split: the groups the primary has go where it put them, so no held-out book is trained on from
    any source, and the rest by `held_out_by_name` at `val_fraction`. With `split_by_fallback`,
    a source without the `split_by` column is split by document instead, with a note (a preset's choice that does
    not fit the data); without it, that is an InputError (the user asked for that column).
    """
    if pinned_groups is not None and split_by is None:
        raise ConfigError("splitting a source as another was split needs split_by (the column that names the groups)")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_documents is not None and val_documents < 0:
        raise ConfigError(f"--val-documents must be >= 0, got {val_documents}")
    loaded = load_tokenizer(tokenizer)
    if vocab_size is not None:
        check_tokenizer_fits(loaded, vocab_size)
    corpus = open_source(
        source, text_column=text_column, group_column=None if split_by_fallback else split_by, split=split,
        streaming=bool(streaming),
    )
    if split_by_fallback and split_by is not None:
        if not corpus.has_column(split_by):
            print(f"tinyseek prepare: {source} has no column {split_by!r} to split validation by; validation takes "
                  "whole documents instead", file=sys.stderr)
            split_by = None
        corpus = corpus.grouped_by(split_by)
    settings = {
        "val": {"documents": val_documents} if val_documents is not None else {"fraction": val_fraction},
        "split_by": split_by,
        "seed": seed,
        "max_documents": max_documents,
        **({"pinned_groups": sorted(pinned_groups.items())} if pinned_groups is not None else {}),
    }
    identity = tokenizer_identity(loaded)
    key_material = {
        "format_version": FORMAT_VERSION,
        "source": corpus.identity,
        "tokenizer": identity,
        "settings": settings,
    }
    cache_key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
    root = Path(out)
    target = root / f"{corpus.name}-{_tokenizer_name(str(tokenizer))}-{cache_key[:12]}"
    if read_meta(target) is not None:
        print(f"tinyseek prepare: reusing {target}", file=sys.stderr)
        return target
    if target.exists():
        shutil.rmtree(target)

    staging = staging_directory(root, target.name)
    try:
        started = time.perf_counter()
        dtype = token_dtype(len(loaded))
        encoder_args = (loaded.backend_tokenizer.to_str(), document_start_id(loaded), loaded.eos_token_id, dtype.name)
        workers = num_workers or _available_cores()
        lengths: list[np.ndarray] = []
        documents = corpus.documents(max_documents)
        text_bytes: list[int] = []
        groups: list[str] | None = [] if split_by is not None else None
        all_tokens = staging / "documents.tmp"
        expected_documents = min(filter(None, (corpus.num_rows, max_documents)), default=None)
        progress = tqdm(total=expected_documents, unit="doc", desc="tokenizing", disable=None, file=sys.stderr)
        with open(all_tokens, "wb") as handle, progress:
            for batch, tokens, batch_lengths in _encode_all(documents, encoder_args, workers):
                handle.write(tokens.tobytes())
                lengths.append(batch_lengths)
                text_bytes += [len(document.text.encode("utf-8")) for document in batch]
                if groups is not None:
                    groups += [document.group for document in batch]
                progress.update(len(batch))
                faults.point("prepare.batch")
        document_lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        if not len(document_lengths):
            raise InputError(f"the corpus {source} has no non-blank documents in column {text_column!r}")
        is_val = _validation_mask(
            str(source), groups, len(document_lengths), val_fraction, val_documents, seed, pinned_groups
        )
        counts = _split_files(staging, all_tokens, dtype, document_lengths, np.array(text_bytes, np.int64), is_val)
        all_tokens.unlink()
        if groups is not None:
            group_array = np.array(groups, dtype=object).astype(str)
            # Named, so that a mixture's other sources can split alike (tinyseek.data.mixture).
            for split, mask in (("train", ~is_val), ("val", is_val)):
                counts[split]["groups"] = len(np.unique(group_array[mask]))
                counts[split]["group_names"] = sorted(np.unique(group_array[mask]).tolist())
        meta = {
            "format_version": FORMAT_VERSION,
            "cache_key": cache_key,
            "dtype": dtype.name,
            "tokenizer": {
                "spec": str(tokenizer),
                "identity": identity,
                "vocabulary_size": len(loaded),
                "bos_token_id": loaded.bos_token_id,
                "eos_token_id": loaded.eos_token_id,
                "pad_token_id": loaded.pad_token_id,
            },
            "source": {"spec": str(source), "locations": corpus.locations, **corpus.identity},
            "settings": settings,
            **counts,
            "seconds": round(time.perf_counter() - started, 2),
        }
        _fsync_write(staging / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        fsync_path(staging)
        faults.point("prepare.meta")
        try:
            staging.rename(target)
        except OSError:
            # Another process (a second data-parallel rank) finished the same folder first: use it.
            if read_meta(target) is None:
                raise
            shutil.rmtree(staging)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"tinyseek prepare: tokenized {len(document_lengths):,} documents into {target} in {meta['seconds']} s",
          file=sys.stderr)
    return target


def resolve_data(data: str, tokenizer: str, cache_root: str | Path, **prepare_kwargs) -> Path:
    """The prepared folder for `data`: `data` itself if prepare made it (its tokenizer must match), else prepare's."""
    meta = read_meta(data) if Path(data).is_dir() else None
    if meta is None:
        if Path(data).is_dir() and (Path(data) / META_FILE).exists():
            raise FileError(f"{data} holds an incomplete or outdated prepared corpus; run `tinyseek prepare` again")
        return prepare_corpus(data, tokenizer, cache_root, **prepare_kwargs)
    identity = tokenizer_identity(tokenizer)
    if meta["tokenizer"]["identity"] != identity:
        raise InputError(
            f"{data} was prepared with tokenizer {meta['tokenizer']['spec']} ({meta['tokenizer']['identity']}), "
            f"not with {tokenizer} ({identity}); prepare it again with this tokenizer"
        )
    return Path(data)
