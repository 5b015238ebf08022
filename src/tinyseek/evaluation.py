"""Evaluation that compares models across tokenizers: bits per byte of whole held-out documents, nats per token, and
how repetitive greedy and sampled continuations are.

Works with any causal LM whose forward returns `.logits` (tinyseek's own, transformers' `LlamaForCausalLM`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tinyseek.data.tokenizer import encode_prompt
from tinyseek.errors import InputError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DocumentScore:
    bits_per_byte: float
    nats_per_token: float
    tokens: int
    """Document tokens scored (every token of every document; the separators between documents are not)."""
    bytes: int
    """UTF-8 bytes of the documents."""


@torch.no_grad()
def score_documents(
    model: torch.nn.Module, stream: np.ndarray, separator_id: int, num_bytes: int, seq_len: int, batch_size: int = 8,
    start_id: int | None = None,
) -> DocumentScore:
    """Bits per byte and nats per token of documents laid out as `[START] doc SEP [START] doc SEP ...` (a prepared
    split; START is the tokenizer's BOS, where it has one).

    A separator is put in front as the first context, so every document token is predicted, the first of each
    document from the separator (and start token) alone; targets that are the separator or the start token are
    excluded (predicting where a document ends depends on how the corpus was cut, not on the text). The stream is
    read in consecutive non-overlapping windows of `seq_len` targets, so each token is scored once with up to
    `seq_len` tokens of context. Bits per byte = summed cross-entropy (nats) / ln 2 / UTF-8 bytes of the documents: the same denominator for every
    tokenizer, which makes models with different vocabularies comparable.
    """
    tokens = torch.from_numpy(np.concatenate([[separator_id], np.asarray(stream, dtype=np.int64)]))
    targets = tokens.clone()
    targets[targets == separator_id] = IGNORE_INDEX
    if start_id is not None:
        targets[targets == start_id] = IGNORE_INDEX
    starts = list(range(0, len(tokens) - 1, seq_len))
    was_training = model.training
    model.eval()
    total, counted = 0.0, 0
    try:
        # Full windows in batches; the last, shorter window on its own.
        full = [s for s in starts if s + seq_len + 1 <= len(tokens)]
        groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
        groups += [[s] for s in starts if s + seq_len + 1 > len(tokens)]
        for group in groups:
            width = min(seq_len, len(tokens) - 1 - group[0])
            inputs = torch.stack([tokens[s : s + width] for s in group])
            labels = torch.stack([targets[s + 1 : s + 1 + width] for s in group])
            logits = model(input_ids=inputs).logits
            total += F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            counted += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return DocumentScore(total / math.log(2) / num_bytes, total / counted, counted, num_bytes)


def score_split(model: torch.nn.Module, dataset, seq_len: int, batch_size: int = 8) -> DocumentScore:
    """`score_documents` over a prepared split (a `TokenDataset`): every whole document in it."""
    num_bytes = dataset.meta[dataset.split].get("bytes")
    if num_bytes is None:
        raise InputError(f"{dataset.prepared_dir} was prepared before byte counts were recorded; prepare it again")
    return score_documents(
        model, dataset.tokens, dataset.eos_token_id, num_bytes, seq_len, batch_size, start_id=dataset.bos_token_id
    )


def distinct_ngram_share(tokens: list[int], n: int = 4) -> float:
    """Distinct n-grams / all n-grams of a sequence: 1.0 never repeats itself, near 0 loops on one phrase."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


GREEDY = {"do_sample": False}
SAMPLED = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[str], new_tokens: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """Greedy and sampled (temperature 0.8, top-p 0.95) continuations of exactly `new_tokens` tokens, no repetition
    penalty, with their distinct-4-gram shares. Sampling is seeded, on a forked RNG."""
    results: dict[str, list[dict]] = {}
    model.eval()
    for mode, settings in (("greedy", GREEDY), ("sampled", SAMPLED)):
        results[mode] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for prompt in prompts:
                input_ids = torch.tensor([encode_prompt(tokenizer, prompt)])
                output = model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id, **settings,
                )
                new = output[0, input_ids.shape[1] :].tolist()
                results[mode].append({
                    "prompt": prompt,
                    "text": tokenizer.decode(new, skip_special_tokens=True),
                    "distinct_4grams": distinct_ngram_share(new),
                })
    return results
