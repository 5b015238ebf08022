import os
from pathlib import Path

import pytest


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
