import json
import os
from pathlib import Path

import pytest
import torch

from tinyseek.data import resolve_data, train_bpe_tokenizer

WORDS = "the a cat dog sat ran on under mat tree red big small quickly slowly".split()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (corpora, tokenizers): $TINYSEEK_SHARED_DATA, else <repo>/../shared/data."""
    folder = Path(os.environ.get("TINYSEEK_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is absent (set TINYSEEK_SHARED_DATA)")
    return folder


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Make the Hugging Face Hub look unreachable, whatever the network, so Hub fallbacks are tested offline."""
    monkeypatch.setattr("tinyseek.data.hub._hub_is_reachable", lambda: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, str]:
    """A prepared corpus of simple generated sentences and a BPE tokenizer trained on it."""
    root = tmp_path_factory.mktemp("tiny-corpus")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for document in range(200):
        picks = torch.randint(len(WORDS), (60,), generator=generator).tolist()
        sentence = " ".join(WORDS[i] for i in picks[:6])
        lines.append(f"{sentence}. {sentence}. " + " ".join(WORDS[i] for i in picks[6:]) + ".")
    text_file = root / "corpus.jsonl"
    text_file.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    tokenizer = train_bpe_tokenizer(str(text_file), 300, root / "tokenizer")
    prepared = resolve_data(str(text_file), str(tokenizer), root / "cache", val_fraction=0.1)
    return {"data": str(prepared), "tokenizer": str(tokenizer)}
