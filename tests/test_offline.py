"""Working without the Hugging Face Hub: the built-in corpus and tokenizer, presets inside the package."""

from pathlib import Path

from tinyseek.data import load_tokenizer, open_source, tokenizer_identity
from tinyseek.train.config import PRESET_DIR, load_config


def test_builtin_names_the_tinystories_sample_and_the_deepseek_coder_tokenizer(shared_data):
    documents = list(open_source("builtin").documents())
    assert len(documents) == 2316
    assert sum(len(document.text) for document in documents) == 2_057_741
    tokenizer = load_tokenizer("builtin")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (32013, 32014, 32022)
    assert tokenizer_identity(tokenizer) == tokenizer_identity(shared_data / "tokenizers" / "deepseek-coder")


def test_presets_live_inside_the_package_as_the_repository_configs_folder():
    assert PRESET_DIR.parent.name == "tinyseek"
    repository_configs = Path(__file__).resolve().parents[1] / "configs"
    assert (PRESET_DIR / "seed.yaml").samefile(repository_configs / "seed.yaml")
    assert load_config("seed").max_steps == 10_000
