"""Flags and presets behave as a user expects: what the command line says wins over what a preset proposes, a
preset's choices give way to data that cannot follow them, and `info`, `--version` and .gitignore cover what the
documentation names. Every run is two steps of a tiny model."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinyseek import TinySeekConfig
from tinyseek.cli import main as tinyseek
from tinyseek.data.chat import is_chat_trained
from tinyseek.testing import tiny_training_flags
from tinyseek.report import format_parameter_report, meta_model, parameter_report
from tinyseek.train import latest_checkpoint, load_config
from tinyseek.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
# Two steps of a model small enough for seconds, whatever the preset's own model, windows and samples.
TINY_RUN = [
    "--max-steps", "2", *tiny_training_flags(), "--set", "data.seq_len=16", "--set", "data.micro_batch_size=2",
    "--set", "sample.prompts=[]",
]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    """One cache for the module: the built-in corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("data-cache"))


def train_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in read_metrics(run_dir) if record["kind"] == "train"]


def test_max_steps_on_the_command_line_wins_over_the_preset_time_budget(tmp_path, tiny_corpus, monkeypatch, capsys):
    # cpu-15min's tokenizer is ./tokenizers/bpe-8192: here, one in the current directory.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_corpus["tokenizer"], tmp_path / "tokenizers" / "bpe-8192")
    run = tmp_path / "run"
    arguments = ["train", "--config", "cpu-15min", "--data", tiny_corpus["data"], "--out-dir", str(run), *TINY_RUN,
                 "--set", "logging.log_every=1"]
    assert tinyseek(arguments) == 0
    err = capsys.readouterr().err
    assert err.count("max_steps 2 from the command line replaces the config's time_budget 15m") == 1
    assert "time budget" not in err
    assert train_steps(run) == [1, 2]
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert (written["max_steps"], written["time_budget"]) == (2, None)
    assert written["data"]["tokenizer"] == "./tokenizers/bpe-8192"


def test_max_steps_and_time_budget_together_is_an_error_naming_both(tmp_path, capsys):
    assert tinyseek(["train", "--max-steps", "5", "--time-budget", "1m", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinyseek train: error: --max-steps and --time-budget") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    # Without --max-steps the preset's time budget stands, and the command line can still replace it.
    assert load_config("cpu-15min", look_up_tokenizer=False).time_budget == "15m"
    assert load_config("cpu-15min", [(["time_budget"], "2m")], look_up_tokenizer=False).time_budget == "2m"


def test_a_config_extends_another_key_by_key(tmp_path):
    """The budget family extends cpu-15min: same model and optimizer, its own budget and warmup."""
    fifteen, five = (load_config(name, look_up_tokenizer=False) for name in ("cpu-15min", "cpu-5min"))
    assert (five.time_budget, five.schedule.warmup_steps) == ("5m", 40)
    assert five.model == fifteen.model and five.optim == fifteen.optim and five.data == fifteen.data
    assert five.schedule.model_copy(update={"warmup_steps": 100}) == fifteen.schedule
    assert "optim.lr_multipliers.muon" in five.preset_keys
    # A user's file extends a preset by name or a file by a path relative to itself; its mappings merge.
    (tmp_path / "mine.yaml").write_text("extends: cpu-5min\noptim: {lr: 1.0e-3, lr_multipliers: {head: 0.5}}\n")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "longer.yaml").write_text("extends: ../mine.yaml\ntime_budget: 7m\n")
    longer = load_config(str(tmp_path / "nested" / "longer.yaml"), look_up_tokenizer=False)
    assert (longer.time_budget, longer.optim.lr, longer.schedule.warmup_steps) == ("7m", 1.0e-3, 40)
    assert longer.optim.lr_multipliers == {"muon": 3.0, "head": 0.5}
    (tmp_path / "loop.yaml").write_text("extends: nested/longer.yaml\n")
    (tmp_path / "mine.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ValueError, match="leads back to itself"):
        load_config(str(tmp_path / "loop.yaml"), look_up_tokenizer=False)


@pytest.mark.parametrize("sources", [["--data", "builtin", "--tokenizer", "builtin"], []], ids=["builtin", "default"])
def test_a_preset_split_by_a_column_the_data_lacks_falls_back_to_documents(
    tmp_path, sources, data_cache, unreachable_hub, capsys
):
    # cpu-quick splits validation by `title`; the built-in stories (also the default data without the Hub) have none.
    run = tmp_path / "run"
    arguments = ["train", "--config", "cpu-quick", *sources, "--out-dir", str(run), *TINY_RUN,
                 "--set", f"data.cache_dir={data_cache}"]
    assert tinyseek(arguments) == 0
    err = capsys.readouterr().err
    assert err.count("has no column 'title' to split validation by; validation takes whole documents instead") == 1
    assert train_steps(run) == [2]


def test_a_split_column_the_user_asked_for_is_still_required(tmp_path, data_cache, capsys):
    set_by_user = ["train", "--config", "cpu-quick", "--data", "builtin", "--tokenizer", "builtin",
                   "--out-dir", str(tmp_path / "run"), *TINY_RUN, "--set", f"data.cache_dir={data_cache}",
                   "--set", "data.split_by=title"]
    assert tinyseek(set_by_user) == 2
    assert "has no column 'title'" in capsys.readouterr().err
    prepare = ["prepare", "--data", "builtin", "--tokenizer", "builtin", "--split-by", "title",
               "--out", str(tmp_path / "prepared")]
    assert tinyseek(prepare) == 2
    assert "has no column 'title'" in capsys.readouterr().err

    # The same key in a config file of the user's own is their choice too; in a preset it is the preset's.
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"data": {"split_by": "title"}}))
    assert "data.split_by" not in load_config(str(own)).preset_keys
    # A file of the user's that extends the preset leaves the preset's keys the preset's, unless it sets them itself.
    (tmp_path / "extending.yaml").write_text("extends: cpu-quick\ndata: {cache_dir: elsewhere}\n")
    assert "data.split_by" in load_config(str(tmp_path / "extending.yaml")).preset_keys
    (tmp_path / "extending.yaml").write_text("extends: cpu-quick\ndata: {split_by: title}\n")
    assert "data.split_by" not in load_config(str(tmp_path / "extending.yaml")).preset_keys
    assert "data.split_by" in load_config("cpu-quick").preset_keys
    assert "data.split_by" not in load_config("cpu-quick", [(["data", "split_by"], "title")]).preset_keys


def test_a_config_file_relative_tokenizer_is_found_beside_the_file_or_in_the_current_directory(
    tmp_path, monkeypatch
):
    configs, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    (configs / "tok").mkdir(parents=True)
    elsewhere.mkdir()
    config_file = configs / "mine.yaml"
    config_file.write_text(yaml.safe_dump({"data": {"tokenizer": "./tok"}}))
    monkeypatch.chdir(elsewhere)
    assert load_config(str(config_file)).data.tokenizer == str(configs / "tok")
    (elsewhere / "tok").mkdir()
    assert load_config(str(config_file)).data.tokenizer == "./tok"  # the current directory first, as before
    assert load_config(str(config_file), [(["data", "tokenizer"], "builtin")]).data.tokenizer == "builtin"

    shutil.rmtree(configs / "tok")
    shutil.rmtree(elsewhere / "tok")
    with pytest.raises(ValueError) as missing:
        load_config(str(config_file))
    message = str(missing.value)
    assert str(elsewhere / "tok") in message and str(configs / "tok") in message and "--tokenizer" in message


def report_of(config: TinySeekConfig) -> str:
    return format_parameter_report(parameter_report(meta_model(config)))


def test_info_takes_a_run_directory_a_model_preset_or_a_training_preset(
    tmp_path, tiny_model, byte_tokenizer, write_run, capsys
):
    cases = {
        "llama-tiny": TinySeekConfig.from_preset("llama-tiny"),
        # A training preset reports the model it trains: its model preset with the preset's own fields.
        "cpu-15min": TinySeekConfig.from_preset("deepseek-v3-tiny", vocab_size=8192),
        str(REPO / "configs" / "cpu-quick.yaml"): TinySeekConfig.from_preset("seed", attention_dropout=0.0),
    }
    model = tiny_model(num_hidden_layers=1)
    write_run(tmp_path / "run", model, byte_tokenizer)
    cases[str(tmp_path / "run")] = model.config
    headers = {}
    for spec, expected in cases.items():
        assert tinyseek(["info", spec]) == 0
        out = capsys.readouterr().out
        assert out.endswith(report_of(expected) + "\n"), spec
        headers[spec] = out.splitlines()[0]
    assert headers[str(tmp_path / "run")] == f"# run directory {tmp_path / 'run'}: step_00000010"
    assert headers["cpu-15min"].startswith("# training config ")
    assert tinyseek(["info", "no-such-thing"]) == 2
    err = capsys.readouterr().err
    assert "model preset (seed, deepseek-v3-tiny, llama-tiny)" in err and "cpu-quick" in err


def test_version_is_the_project_version_and_loads_no_heavy_module():
    script = (
        "import sys; from tinyseek.cli import main; main(['--version']); "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    tomllib = pytest.importorskip("tomllib")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert result.stdout.splitlines() == [f"tinyseek {project}", "[]"]


# `--out PATH` and `--out-dir PATH` in the documentation's commands, and the folder `--model` reads that an earlier
# command of the README is meant to have written.
WRITTEN = re.compile(r"--(?:out|out-dir|model)[ =]([^\s`\[\]|]+)")


def test_gitignore_covers_what_the_documented_commands_write():
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    written = {
        match for page in pages for match in WRITTEN.findall(page.read_text())
        # scratch folders, placeholders, and report.py's temporary folder in the blocks' headers
        if not match.startswith(("/", "~", "$", "{")) and not match.isupper()
    }
    assert {"data/prepared", "tokenizers/bpe-8192", "exported/", "routes.png"} <= written
    result = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=REPO, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(written), "not ignored: " + ", ".join(
        sorted(set(written) - set(result.stdout.split()))
    )
    for code in ("src/tinyseek/data/prepare.py", "docs/quality.png"):
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", code], cwd=REPO).returncode == 1


def test_cpu_chat_pretrains_then_fine_tunes_into_a_model_that_tinyseek_chat_talks_to(
    tmp_path, data_cache, monkeypatch, capsys
):
    run = tmp_path / "cpu-chat"
    arguments = ["train", "--config", "cpu-chat", "--out-dir", str(run), *TINY_RUN, "--set", "data.seq_len=64",
                 "--set", f"data.cache_dir={data_cache}"]
    assert tinyseek(arguments) == 0
    err = capsys.readouterr().err
    assert "max_steps 2 from the command line replaces the config's time_budget 4m" in err
    assert "sft.max_steps 2 from the command line replaces the config's sft.time_budget 9m" in err
    assert train_steps(run / "pretrain") == [2] and train_steps(run) == [2]
    base, chat = (json.loads((latest_checkpoint(folder) / "config.json").read_text()) for folder in (run / "pretrain", run))
    assert not is_chat_trained(base) and is_chat_trained(chat)
    assert chat["attention_type"] == "mla" and chat["ffn_type"] == "moe"  # an architecture that exports
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["stages"] == ["sft"] and written["data"]["seq_len"] == 640 and written["optim"]["lr"] == 2e-3

    monkeypatch.setattr("sys.stdin", io.StringIO("Write a story about a dog named Max.\n"))
    assert tinyseek(["chat", "--run-dir", str(run), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert "base model" not in capsys.readouterr().err
