"""Working without the Hugging Face Hub: the built-in corpus and tokenizer, presets inside the package."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from tinyseek.cli import COMMANDS, main as tinyseek
from tinyseek.train.checkpoint import latest_checkpoint
from tinyseek.data import load_tokenizer, open_source, tokenizer_identity
from tinyseek.data.instruct import held_out_stories
from tinyseek.testing import tiny_training_flags
from tinyseek.train.config import PRESET_DIR, load_config


def test_builtin_names_the_tinystories_sample_and_the_deepseek_coder_tokenizer(shared_data):
    documents = list(open_source("builtin").documents())
    held_out = held_out_stories()  # kept for measuring instruction following, out of every training set
    assert len(documents) == 2316 - len(held_out)
    assert sum(len(document.text) for document in documents) == 2_057_741 - sum(map(len, held_out))
    tokenizer = load_tokenizer("builtin")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (32013, 32014, 32022)
    assert tokenizer_identity(tokenizer) == tokenizer_identity(shared_data / "tokenizers" / "deepseek-coder")


def test_presets_live_inside_the_package_as_the_repository_configs_folder():
    assert PRESET_DIR.parent.name == "tinyseek"
    repository_configs = Path(__file__).resolve().parents[1] / "configs"
    assert (PRESET_DIR / "seed.yaml").samefile(repository_configs / "seed.yaml")
    assert load_config("seed").max_steps == 10_000


def test_without_the_hub_a_run_trains_on_the_builtin_pair_and_a_resume_keeps_what_it_pinned(
    tmp_path, unreachable_hub, capsys, monkeypatch
):
    run = tmp_path / "run"
    tiny = [*tiny_training_flags(), "--set", "data.cache_dir=" + str(tmp_path / "cache"),
            "--set", "logging.sample_every=1000", "--out-dir", str(run)]
    assert tinyseek(["train", *tiny, "--max-steps", "2", "--checkpoint-every", "2"]) == 0
    err = capsys.readouterr().err
    assert "Hub unreachable: training on the built-in TinyStories sample with the built-in DeepSeek-Coder tokenizer; " \
           "pass --data/--tokenizer for your own" in err
    assert "data builtin (" in err
    pinned = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert (pinned["source"], pinned["tokenizer"]) == ("builtin", "builtin")

    # The Hub is back, and would serve the seed's defaults: the resumed run still uses what it pinned.
    monkeypatch.setattr("tinyseek.data.hub._hub_is_reachable", lambda: True)
    assert tinyseek(["train", *tiny, "--max-steps", "4", "--checkpoint-every", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming with the run's pinned data builtin and tokenizer builtin" in err
    assert "resumed from" in err and "data builtin (" in err
    assert (run / "checkpoints" / "step_00000004").is_dir()
    assert AutoTokenizer.from_pretrained(latest_checkpoint(run))("Once upon").input_ids[0] == 32013


HEAVY_MODULES = ("torch", "transformers", "datasets")
# Runs in a fresh interpreter: the command line as the `tinyseek` script runs it, then which heavy modules it loaded.
RUN_CLI = """
import sys
from tinyseek.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(name for name in {heavy} if name in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_and_argument_errors_import_neither_torch_nor_transformers(command, tmp_path):
    script = RUN_CLI.format(heavy=HEAVY_MODULES)
    for arguments in ([command, "--help"], [command, "--no-such-option"]) if command else (["--help"], ["nope"]):
        result = subprocess.run(
            [sys.executable, "-c", script, *arguments], capture_output=True, text=True, cwd=tmp_path
        )
        assert result.stderr.splitlines()[-1] == "[]", (arguments, result.stderr)
        assert "usage: tinyseek" in result.stdout + result.stderr


def test_plain_import_is_light_yet_tinyseek_folders_load_with_automodel_and_hf_is_reachable(tmp_path):
    from tinyseek import TinySeekConfig, TinySeekForCausalLM

    config = TinySeekConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, attention_type="mha", ffn_type="dense")
    TinySeekForCausalLM(config).save_pretrained(tmp_path / "model")
    script = f"""
import sys
import tinyseek
heavy = sorted(name for name in {HEAVY_MODULES} if name in sys.modules)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
print(heavy, type(model).__name__, tinyseek.hf.to_transformers(model).__class__.__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.split() == ["[]", "TinySeekForCausalLM", "LlamaForCausalLM"], result.stderr


def test_a_run_directory_refuses_other_data_than_it_pinned_with_one_line(tmp_path):
    from tinyseek.data.builtin import resolve_sources
    from tinyseek.errors import InputError

    corpus = tmp_path / "books.jsonl"
    corpus.write_text('{"text": "a"}\n')
    pinned = {"data": str(corpus), "tokenizer": "builtin"}
    same = resolve_sources(str(tmp_path / "." / "books.jsonl"), None, pinned)  # another spelling of the same file
    assert Path(same.data).resolve() == corpus.resolve() and same.tokenizer == "builtin"
    with pytest.raises(InputError, match="started with --data .*books.jsonl, not builtin.*--out-dir"):
        resolve_sources("builtin", None, pinned)


def test_the_training_config_and_its_choices_load_without_torch_or_transformers():
    # tinyseek.train.cli takes its flag choices from the config's definitions before parsing the arguments.
    script = ("import sys, tinyseek.train.config, tinyseek.train.cli; "
              f"print(sorted(name for name in {HEAVY_MODULES} if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
