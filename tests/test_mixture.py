"""A weighted mixture of training sources: proportions, determinism, exact resume, no held-out book trained on, and
every source's own held-out books."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tinyseek.data import TokenDataset, load_tokenizer, prepare_corpus, train_bpe_tokenizer
from tinyseek.data.mixture import MIX_BLOCK, MixtureSampler, block_quota, prepare_extra_sources
from tinyseek.errors import TinySeekError
from tinyseek.testing import write_jsonl

TITLES = ["Algebra", "Botany", "Chemistry", "Dynamics", "Ecology"]
# Books the primary lacks, shared by the two other sources: how a source splits them is decided by name alone.
NEW_TITLES = [f"Topic {number}" for number in range(16)]


def write_books(path: Path, marker: str, titles: list[str], chapters: int = 6) -> Path:
    rows = [
        {"title": title, "text": f"{marker} {title} chapter {number}: " + " ".join([f"{marker}{title}"] * 40)}
        for title in titles for number in range(chapters)
    ]
    return write_jsonl(path, rows)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A primary corpus split by title and a second one that repeats its titles (as gpt35_wiki repeats gpt4's)."""
    root = tmp_path_factory.mktemp("mixture")
    primary = write_books(root / "primary.jsonl", "alpha", TITLES)
    extra = write_books(root / "extra.jsonl", "beta", TITLES + NEW_TITLES)
    third = write_books(root / "third.jsonl", "gamma", TITLES[:2] + NEW_TITLES[::-1], chapters=2)
    tokenizer = train_bpe_tokenizer([str(primary), str(extra)], 400, root / "tokenizer", min_frequency=1)
    primary_dir = prepare_corpus(str(primary), str(tokenizer), root / "cache", split_by="title", val_documents=1)
    extra_dir, third_dir = prepare_extra_sources(
        primary_dir, [str(extra), str(third)], str(tokenizer), root / "cache", split_by="title", val_fraction=0.3)
    return {"primary": primary_dir, "extra": extra_dir, "third": third_dir, "tokenizer": str(tokenizer),
            "extra_file": str(extra), "cache": str(root / "cache")}


def test_a_validation_title_never_appears_in_a_training_source(two_sources):
    tokenizer = load_tokenizer(two_sources["tokenizer"])
    (held_out,) = TokenDataset(two_sources["primary"], "val").meta["val"]["group_names"]
    val_text = tokenizer.decode(TokenDataset(two_sources["primary"], "val").tokens)
    assert f"alpha{held_out}" in val_text
    for folder in (two_sources["primary"], two_sources["extra"]):
        train_text = tokenizer.decode(TokenDataset(folder, "train").tokens)
        assert held_out not in train_text
        assert all(title in train_text for title in TITLES if title != held_out)
    extra_val = TokenDataset(two_sources["extra"], "val")
    assert held_out in extra_val.meta["val"]["group_names"]
    assert f"beta{held_out}" in tokenizer.decode(extra_val.tokens)


def test_sources_split_the_books_the_primary_lacks_alike(two_sources):
    """Each other source holds out some of the books only they have, the same ones in each, at about val_fraction."""
    held_out = {name: set(TokenDataset(two_sources[name], "val").meta["val"]["group_names"]) & set(NEW_TITLES)
                for name in ("extra", "third")}
    trained = {name: set(TokenDataset(two_sources[name], "train").meta["train"]["group_names"]) & set(NEW_TITLES)
               for name in ("extra", "third")}
    assert held_out["extra"] == held_out["third"] and trained["extra"] == trained["third"]
    assert 0 < len(held_out["extra"]) < len(NEW_TITLES) / 2
    assert held_out["extra"].isdisjoint(trained["extra"])


def test_block_quota_is_proportional_and_fills_the_block():
    quota = block_quota([3.0, 1.0])
    assert quota.tolist() == [768, 256]
    assert block_quota([1.0, 1.0, 1.0]).sum() == MIX_BLOCK


def mixture(two_sources, weights, seed=0, micro_batch_size=8, **kwargs) -> MixtureSampler:
    datasets = [TokenDataset(two_sources["primary"], "train"), TokenDataset(two_sources["extra"], "train")]
    return MixtureSampler(datasets, weights, 16, micro_batch_size, seed, **kwargs)


def test_windows_come_from_each_source_in_proportion_to_its_weight(two_sources):
    sampler = mixture(two_sources, [1.0, 3.0])
    alpha = set(TokenDataset(two_sources["primary"], "train").tokens.tolist())
    beta = set(TokenDataset(two_sources["extra"], "train").tokens.tolist())
    only_alpha, only_beta = alpha - beta, beta - alpha
    counts = np.zeros(2)
    for index in range(500):  # 4,000 windows, not a whole number of mixing blocks
        batch = sampler.batch(index)
        sources, _ = sampler.sources_of(sampler.positions(index))
        for window, source in zip(batch.tolist(), sources):
            # Each window holds tokens that only its own source has.
            assert set(window) & (only_alpha if source == 0 else only_beta)
            counts[source] += 1
    assert counts[1] / counts.sum() == pytest.approx(0.75, abs=0.01)


def test_mixture_order_is_a_function_of_the_seed_and_shards_over_ranks(two_sources):
    first, again, other = mixture(two_sources, [1, 1]), mixture(two_sources, [1, 1]), mixture(two_sources, [1, 1], 1)
    assert all(torch.equal(first.batch(i), again.batch(i)) for i in range(0, 300, 7))
    assert not all(torch.equal(first.batch(i), other.batch(i)) for i in range(5))
    ranks = [mixture(two_sources, [1, 1], micro_batch_size=4, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([ranks[0].batch(3), ranks[1].batch(3)]), first.batch(3))


def test_resuming_needs_the_same_mixture(two_sources):
    sampler = mixture(two_sources, [1, 1])
    restored = mixture(two_sources, [1, 1], seed=5)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.batch(42), sampler.batch(42))
    with pytest.raises(TinySeekError, match="mixture"):
        mixture(two_sources, [1, 2]).load_state_dict(sampler.state_dict())


def test_training_on_a_mixture_resumes_bitwise(tmp_path, two_sources):
    from safetensors.torch import load_file

    from tinyseek.train import latest_checkpoint, load_config
    from tinyseek.train.trainer import Trainer

    def trainer(out_dir: str) -> Trainer:
        settings = {
            "out_dir": str(tmp_path / out_dir), "max_steps": 4, "dtype": "fp32", "device": "cpu",
            "model": {"preset": "llama-tiny", "vocab_size": 400, "hidden_size": 32, "num_hidden_layers": 1,
                      "intermediate_size": 64},
            "data": {"source": str(two_sources["primary"]), "tokenizer": two_sources["tokenizer"],
                     "cache_dir": two_sources["cache"], "split_by": "title", "seq_len": 16, "micro_batch_size": 4,
                     "grad_accum": 1, "mixture": {two_sources["extra_file"]: 2.0}},
            "checkpoint": {"every": 100},
            "logging": {"eval_every": 100, "eval_batches": 1, "sample_every": 1000, "progress_bar": False,
                        "peak_flops": 1.0e11},
        }
        return Trainer(load_config(None, [([key], value) for key, value in settings.items()]))

    straight = trainer("straight")
    assert isinstance(straight.sampler, MixtureSampler) and straight.train() == 0
    trainer("resumed").train(stop_at_step=2)
    resumed = trainer("resumed")
    assert resumed.progress.step == 2 and resumed.train() == 0
    expected = load_file(latest_checkpoint(straight.run_dir) / "model.safetensors")
    actual = load_file(latest_checkpoint(resumed.run_dir) / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
