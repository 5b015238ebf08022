"""Faults injected into the trainer (a full disk, damaged or forged checkpoints, non-finite steps, an unwritable run
directory): each one stops or continues with one clear line and leaves a run that resumes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinyseek import faults
from tinyseek.cli import main as tinyseek_main
from tinyseek.errors import FileError
from tinyseek.train import latest_checkpoint
from tinyseek.train.checkpoint import checkpoint_problem, list_checkpoints, load_optimizer_state
from tinyseek.train.metrics import read_metrics
from tinyseek.train.trainer import EXIT_CHECKPOINT_WRITE_FAILED, EXIT_NON_FINITE

REPO = Path(__file__).resolve().parents[1]
EVERY_STEP = {"every": 1, "keep": 10}


@pytest.fixture
def inject(monkeypatch):
    """Set TINYSEEK_FAULTS for this test, with the per-process counts of reached points starting from zero."""
    monkeypatch.setattr(faults, "_reached", {})

    def set_rules(rules: str) -> None:
        monkeypatch.setenv(faults.ENVIRONMENT_VARIABLE, rules)

    return set_rules


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_corpus, tiny_trainer) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies of it."""
    root = tmp_path_factory.mktemp("trained")
    trainer = tiny_trainer(root, tiny_corpus, max_steps=4, checkpoint={"every": 2, "keep": 2})
    assert trainer.train() == 0
    return trainer.run_dir


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def step_names(run_dir: Path) -> list[str]:
    return [path.name for path in list_checkpoints(run_dir)]


def forge_manifest(checkpoint: Path, name: str) -> None:
    """Rewrite the manifest entry of `name` to match its current bytes, as an attacker with write access would."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    data = (checkpoint / name).read_bytes()
    state["manifest"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state_file.write_text(json.dumps(state))


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(
    tmp_path, tiny_corpus, inject, capsys, tiny_trainer, tiny_config_file
):
    inject("checkpoint.optimizer@2=enospc")  # the second checkpoint write (step 4) finds the disk full
    config = tiny_config_file(tmp_path, tiny_corpus, max_steps=6, checkpoint={"every": 2, "keep": 2})
    assert tinyseek_main(["train", "--config", str(config)]) == EXIT_CHECKPOINT_WRITE_FAILED
    errors = [line for line in capsys.readouterr().err.splitlines() if "cannot write checkpoint" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "step_00000002, is intact" in errors[0]
    run_dir = tmp_path / "run"
    assert os.listdir(run_dir / "checkpoints") == ["step_00000002"]  # the partial step 4 is gone, no .tmp left

    inject("")
    resumed = tiny_trainer(tmp_path, tiny_corpus, max_steps=6, checkpoint={"every": 2, "keep": 2})
    assert resumed.progress.step == 2
    assert resumed.train() == 0 and step_names(run_dir) == ["step_00000004", "step_00000006"]


@pytest.mark.parametrize("damage", ["truncate", "flip a bit"])
def test_damaged_checkpoint_is_detected_and_the_one_before_used(
    trained_run, tmp_path, tiny_corpus, damage, tiny_trainer
):
    run_dir = copy_run(trained_run, tmp_path)
    optimizer_file = run_dir / "checkpoints" / "step_00000004" / "optimizer.pt"
    data = bytearray(optimizer_file.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 3] ^= 0x10
    optimizer_file.write_bytes(bytes(data))
    assert "optimizer.pt" in checkpoint_problem(optimizer_file.parent)
    trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=4, checkpoint={"every": 2, "keep": 2})
    assert trainer.resumed_from.name == "step_00000002" and trainer.progress.step == 2
    assert trainer.checkpointer.skipped and "step_00000004: optimizer.pt" in trainer.checkpointer.skipped[0]


def test_code_running_optimizer_state_is_refused_unrun(trained_run, tmp_path, tiny_corpus, tiny_trainer):
    run_dir = copy_run(trained_run, tmp_path)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    checkpoint = run_dir / "checkpoints" / "step_00000004"
    (checkpoint / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Payload()}, protocol=2))
    forge_manifest(checkpoint, "optimizer.pt")
    assert checkpoint_problem(checkpoint) is None  # the manifest cannot tell: the loader must refuse it
    with pytest.raises(FileError, match="optimizer.pt holds more than tensors.*refused without running it"):
        load_optimizer_state(checkpoint)
    trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=4, checkpoint={"every": 2, "keep": 2})
    assert trainer.resumed_from.name == "step_00000002"
    assert "refused without running it" in trainer.checkpointer.skipped[0]
    assert not marker.exists()


def test_unwritable_run_directory_fails_before_training(tmp_path, tiny_corpus, inject, capsys, tiny_config_file):
    inject("run_dir.write=eacces")  # root ignores permission bits, so the refusal is injected
    config = tiny_config_file(tmp_path, tiny_corpus)
    assert tinyseek_main(["train", "--config", str(config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "run directory" in line and "is not writable (Permission denied" in line
    assert not (tmp_path / "run").exists()


def test_non_finite_step_is_skipped_and_resume_stays_exact(tmp_path, tiny_corpus, inject, tiny_trainer):
    inject("train.loss@2=nan")  # the loss of optimizer step 2 is NaN, as after an overflow
    straight = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "straight", max_steps=4,
                            checkpoint=EVERY_STEP)
    assert straight.train() == 0
    checkpoints = {path.name: path for path in list_checkpoints(straight.run_dir)}
    before, skipped, after = (load_file(checkpoints[f"step_0000000{n}"] / "model.safetensors") for n in (1, 2, 3))
    assert all(torch.equal(before[key], skipped[key]) for key in before)  # weights and MoE biases untouched
    assert any(not torch.equal(skipped[key], after[key]) for key in before)
    state = json.loads((checkpoints["step_00000002"] / "trainer_state.json").read_text())
    assert state["non_finite_steps"] == [1, 1] and state["tokens"] == 2 * 2 * 2 * 16
    assert load_optimizer_state(checkpoints["step_00000002"])["scheduler"]["last_epoch"] == 2
    (record,) = [r for r in read_metrics(straight.run_dir) if r["kind"] == "non_finite"]
    assert record["step"] == 2 and record["what"] == "loss"

    inject("train.loss@2=nan")
    first = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", max_steps=4, checkpoint=EVERY_STEP)
    first.train(stop_at_step=3)
    second = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", max_steps=4, checkpoint=EVERY_STEP)
    assert second.progress.step == 3 and second.progress.non_finite_steps == 1 and second.train() == 0
    expected = load_file(latest_checkpoint(straight.run_dir) / "model.safetensors")
    actual = load_file(latest_checkpoint(second.run_dir) / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_consecutive_non_finite_steps_stop_without_saving(tmp_path, tiny_corpus, inject, capsys, tiny_config_file):
    inject("train.loss@3=nan,train.loss@4=nan")
    config = tiny_config_file(tmp_path, tiny_corpus, max_steps=6, checkpoint={"every": 2, "keep": 2},
                              optim={"lr": 3.0e-3, "max_non_finite_steps": 2})
    assert tinyseek_main(["train", "--config", str(config)]) == EXIT_NON_FINITE
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "stopped at step" in line]
    assert "stopped at step 4: non-finite loss" in line and "2 steps in a row" in line
    assert "the last checkpoint is step_00000002" in line
    assert step_names(tmp_path / "run") == ["step_00000002"]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_crash_harness_short_run_ends_bitwise_equal(tmp_path):
    """Two SIGKILLs (one inside a checkpoint write, by the hook; one at a random instant) and a kill of
    `tinyseek prepare`; the resumed run's final state equals the uninterrupted run's bit for bit."""
    harness = load_benchmark("crash_resume")
    # The hook kills in the second write of its process, so the next process surely resumes from the first.
    result = harness.run_harness(tmp_path, kills=2, steps=12, tiny=True, write_share=0.5, corrupt_share=1.0,
                                 graceful=False, documents=200, hook_occurrences=(2,), log=lambda line: None)
    counts = result["counts"]
    assert counts["kills"] == 2 and counts["inside a write (hook)"] == 1 and counts["resumes"] >= 1
    assert counts["damaged checkpoints skipped"] == counts["corrupted on purpose"]
    assert result["prepare"]["killed"] and result["prepare"]["left"]  # killed with its work half done ...
    assert result["prepare"]["identical"] and not result["prepare"]["stale_left"]  # ... and redone, the same
    assert not result["stale staging left"]
    assert result["equality"] == dict.fromkeys(result["equality"], True)


@pytest.fixture(scope="module")
def hostile_cases(tmp_path_factory, tiny_corpus):
    """Every fixed hostile input of benchmarks/fuzz_inputs.py and 20 seeded config mutations, on the tiny corpus."""
    fuzz = load_benchmark("fuzz_inputs")
    workdir = tmp_path_factory.mktemp("hostile")
    tokenizer = Path(tiny_corpus["tokenizer"])
    fixture = {"corpus": tokenizer.parent / "corpus.jsonl", "tokenizer": tokenizer, "prepared": Path(tiny_corpus["data"])}
    cases = fuzz.config_cases(fixture, workdir, random.Random(0), 20)
    cases += fuzz.corpus_cases(fixture, workdir) + fuzz.model_cases(fixture, workdir)
    return fuzz, cases


@pytest.mark.parametrize("kind", ["config", "config file", "flags", "corpus", "tokenizer", "model folder"])
def test_hostile_inputs_are_handled_or_refused_in_one_line(hostile_cases, kind):
    fuzz, cases = hostile_cases
    outcomes = {case.name: fuzz.run_case(case, timeout=120) for case in cases if case.kind == kind}
    assert len(outcomes) >= 6
    assert {name: outcome for name, outcome in outcomes.items() if outcome[0] not in ("handled", "clear error")} == {}


def test_a_very_long_line_is_tokenized_in_pieces_with_the_same_ids(tmp_path, tiny_corpus, monkeypatch):
    from tinyseek.data import prepare as prepare_module
    from tinyseek.data.tokenizer import load_tokenizer

    generator = random.Random(3)
    pieces = ["the", "cat's", " ", "  ", "x=1;", "12345", "café", "日本語", "!!", "\t", "Hello", "a b", "= y"]
    text = "".join(generator.choice(pieces) + " " * generator.randint(0, 1) for _ in range(20_000))
    monkeypatch.setattr(prepare_module, "LONG_TEXT_CHARACTERS", 1000)
    for spec in (tiny_corpus["tokenizer"], "builtin"):
        tokenizer = load_tokenizer(spec)
        encoder = prepare_module._Encoder(tokenizer.backend_tokenizer.to_str(), None, tokenizer.eos_token_id, "uint32")
        assert encoder.splits_long_texts
        whole = encoder.tokenizer.encode(text, add_special_tokens=False).ids
        assert encoder.encode_long(text).tolist() == whole

    line = tmp_path / "one-line.txt"
    line.write_text(text.replace("\n", " ").replace("\t", " "))
    prepared = prepare_module.prepare_corpus(str(line), tiny_corpus["tokenizer"], tmp_path / "out", val_fraction=0)
    tokenizer = load_tokenizer(tiny_corpus["tokenizer"])
    expected = tokenizer.backend_tokenizer.encode(line.read_text(), add_special_tokens=False).ids
    tokens = np.fromfile(prepared / "train.bin", dtype=np.dtype(json.loads((prepared / "meta.json").read_text())["dtype"]))
    assert expected == [t for t in tokens.tolist() if t not in (tokenizer.bos_token_id, tokenizer.eos_token_id)]


def test_sizes_that_cannot_fit_are_refused_before_allocating(capsys):
    from tinyseek.config import TinySeekConfig
    from tinyseek.errors import ConfigError
    from tinyseek.report import check_model_fits
    from tinyseek.train import load_config

    huge = TinySeekConfig.from_preset("seed", hidden_size=65536, num_hidden_layers=16)  # 4.5 TB for training state
    with pytest.raises(ConfigError, match=r"model: [\d,]+ parameters need [\d,.]+ GB"):
        check_model_fits(huge, torch.device("cpu"))
    assert tinyseek_main(["info", "seed"]) == 0 and "10,095,760" in capsys.readouterr().out  # counted on meta
    with pytest.raises(ConfigError, match="optim.lr: expected a finite number, got inf"):
        load_config(None, [(["optim", "lr"], float("inf"))])
    with pytest.raises(ValueError, match="hidden_size: must be a positive integer, got 'big'"):
        TinySeekConfig.from_dict({"hidden_size": "big"})
    with pytest.raises(ValueError, match="v_head_dim: must be a non-negative integer, got -1"):
        TinySeekConfig.from_preset("seed", v_head_dim=-1)  # linear attention does not use it: still refused
    with pytest.raises(ConfigError, match="data.seq_len: 16 is longer than the model's max_position_embeddings=8"):
        load_config(None, [(["model", "max_position_embeddings"], 8), (["data", "seq_len"], 16)])
