"""Errors belong to their layer: the library raises tinyseek.errors classes, which are ValueError (configs, inputs)
or OSError (files), and only the CLI turns exactly those into one line and exit status 2."""

import subprocess
import sys

import pytest
import torch

from tinyseek import TinySeekConfig
from tinyseek.cli import main as tinyseek_main
from tinyseek.errors import ConfigError, FileError, InputError, TinySeekError
from tinyseek.loading import load_model_and_tokenizer
from tinyseek.train import load_config


def test_the_library_raises_standard_types_for_bad_configs_inputs_and_missing_files(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="^hidden_size: must be a positive integer") as bad_config:
        TinySeekConfig(hidden_size=-8)
    assert isinstance(bad_config.value, ConfigError)
    with pytest.raises(OSError, match="no such file") as missing:
        load_model_and_tokenizer(tmp_path / "no-such-run")
    assert isinstance(missing.value, FileError)
    with pytest.raises(OSError, match="not a preset"):
        load_config("no-such-preset")
    with pytest.raises(ValueError, match="optim.lr: expected float"):
        load_config(None, [(["optim", "lr"], "fast")])
    model = tiny_model(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8") as too_long:
        model(torch.zeros(1, 9, dtype=torch.long))
    assert isinstance(too_long.value, InputError)
    assert all(issubclass(cls, TinySeekError) for cls in (ConfigError, FileError, InputError))


def test_the_cli_reports_a_library_error_in_one_line_with_exit_2(tmp_path, capsys):
    assert tinyseek_main(["info", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinyseek info: error: ") and "nor a config file" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "config.json").write_text('{"model_type": "tinyseek", "hidden_size": -8}')
    assert tinyseek_main(["info", str(tmp_path)]) == 2
    assert "hidden_size: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("unexpected", [ValueError("a bug, not the user's input"), KeyError("missing"), OSError(5, "I/O")])
def test_any_other_exception_escapes_the_cli_with_its_traceback(monkeypatch, unexpected):
    def broken(argv):
        raise unexpected

    monkeypatch.setattr("tinyseek.info.main", broken)
    with pytest.raises(type(unexpected)):
        tinyseek_main(["info", "seed"])


def test_an_unexpected_exception_prints_its_traceback_from_the_command_line(tmp_path):
    script = "import tinyseek.info as i; i.main = lambda argv: 1 / 0; from tinyseek.cli import main; main(['info', 'seed'])"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
