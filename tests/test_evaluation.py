"""Bits per byte against a token-by-token hand computation, for two tokenizers; distinct n-grams."""

from __future__ import annotations

import math

import pytest
import torch

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.data import TokenDataset, load_tokenizer, prepare_corpus, train_bpe_tokenizer
from tinyseek.data.tokenizer import encode_prompt
from tinyseek.evaluation import distinct_ngram_share, score_split
from tinyseek.testing import write_jsonl

BOOKS = {
    "Cells": ["The cell membrane keeps the inside in.", "Mitochondria make energy; ribosomes make proteins."],
    "Rivers": ["A river runs to the sea — über alles, naïvely.", "Deltas form where rivers slow down."],
    "Stars": ["Stars burn hydrogen into helium.", "A red giant swells; a white dwarf cools for ages."],
}


@pytest.fixture(scope="module")
def book_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("books")
    rows = [{"text": text, "title": title} for title, texts in BOOKS.items() for text in texts]
    return root, write_jsonl(root / "books.jsonl", rows)


def hand_bits_per_byte(model, tokenizer, documents: list[str], seq_len: int) -> float:
    """Each document token's -log p given the stream before it, from the start of its window of seq_len targets,
    one forward pass per token; separators and start tokens are context only."""
    eos = tokenizer.eos_token_id
    stream = [eos]
    is_document_token = [False]
    for text in documents:
        ids = encode_prompt(tokenizer, text)
        stream += ids + [eos]
        is_document_token += [False] + [True] * (len(ids) - 1) + [False]
    nats = 0.0
    with torch.no_grad():
        for position in range(1, len(stream)):
            if not is_document_token[position]:
                continue
            window_start = (position - 1) // seq_len * seq_len
            context = torch.tensor([stream[window_start:position]])
            log_probs = torch.log_softmax(model(input_ids=context).logits[0, -1].double(), dim=-1)
            nats -= log_probs[stream[position]].item()
    num_bytes = sum(len(text.encode("utf-8")) for text in documents)
    return nats / math.log(2) / num_bytes


@pytest.mark.parametrize("vocab_size", [280, 400])
def test_bits_per_byte_equals_hand_computation_and_excludes_separators(book_corpus, vocab_size):
    root, corpus = book_corpus
    tokenizer_dir = train_bpe_tokenizer(str(corpus), vocab_size, root / f"tokenizer-{vocab_size}", min_frequency=1)
    prepared = prepare_corpus(str(corpus), str(tokenizer_dir), root / "cache", split_by="title", val_documents=1)
    tokenizer = load_tokenizer(tokenizer_dir)
    val = TokenDataset(prepared, "val")
    (title,) = val.meta["val"]["group_names"]
    documents = BOOKS[title]
    torch.manual_seed(0)
    model = TinySeekForCausalLM(TinySeekConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, attention_type="mha", ffn_type="dense", eos_token_id=tokenizer.eos_token_id,
    )).eval()
    seq_len = 7  # shorter than a document, so windows cut through documents and separators

    score = score_split(model, val, seq_len=seq_len, batch_size=3)

    document_tokens = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in documents)
    assert score.tokens == document_tokens == len(val) - 2 * len(documents)  # no separator or BOS counted
    assert score.bytes == sum(len(text.encode("utf-8")) for text in documents)
    assert score.bits_per_byte == pytest.approx(hand_bits_per_byte(model, tokenizer, documents, seq_len), rel=1e-5)
    assert score.nats_per_token == pytest.approx(score.bits_per_byte * math.log(2) * score.bytes / score.tokens)


def test_distinct_ngram_share():
    assert distinct_ngram_share([1, 2, 3, 4, 5, 6]) == 1.0
    assert distinct_ngram_share([7, 7, 7, 7, 7, 7, 7]) == 0.25
    assert distinct_ngram_share([1, 2, 3]) == 1.0
