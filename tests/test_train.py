"""The trainer on a tiny model (hidden 32, 2 layers, a 300-token BPE) and a synthetic corpus: seconds per test."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tinyseek import TinySeekForCausalLM
from tinyseek.cli import main as tinyseek_main
from tinyseek.loading import load_model_and_tokenizer
from tinyseek.train import latest_checkpoint, load_config
from tinyseek.train.checkpoint import list_checkpoints
from tinyseek.train.cli import main as train_main
from tinyseek.train.config import ScheduleConfig, parse_assignment
from tinyseek.train.metrics import read_metrics
from tinyseek.train.plot import plot_run
from tinyseek.train.schedule import lr_multiplier
from tinyseek.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_loss_falls_on_a_tiny_corpus(tmp_path, tiny_corpus, tiny_trainer):
    trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=30, optim={"lr": 1.0e-2}, logging={"eval_every": 30})
    assert trainer.train() == 0
    records = read_metrics(trainer.run_dir)
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 30
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 1.0
    (final_eval,) = [r for r in records if r["kind"] == "eval"]
    assert final_eval["val_loss"] < train_losses[0] - 1.0
    assert final_eval["tokens"] == 30 * 2 * 2 * 16
    assert (trainer.run_dir / "loss.png").stat().st_size > 0
    assert "val_loss" in (trainer.run_dir / "train.log").read_text()
    written = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    assert written["max_steps"] == 30 and written["model"]["hidden_size"] == 32


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_interrupted_and_resumed_run_is_bitwise_identical(
    tmp_path, tiny_corpus, checkpointing, tiny_trainer, final_weights
):
    # Dropout stays on (the seed preset's 0.1), so the restored torch RNG state matters.
    straight = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "straight", gradient_checkpointing=checkpointing)
    straight.train()
    first = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", checkpoint={"every": 100},
                         gradient_checkpointing=checkpointing)
    first.train(stop_at_step=4)
    assert [p.name for p in list_checkpoints(first.run_dir)] == ["step_00000004"]
    second = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", checkpoint={"every": 100},
                          gradient_checkpointing=checkpointing)
    assert second.progress.step == 4 and second.resumed_from is not None
    second.train()
    expected, actual = final_weights(straight.run_dir), final_weights(second.run_dir)
    assert expected.keys() == actual.keys()
    assert any("bias" in key for key in actual)  # the MoE balancing buffers travel in the weights
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_trainer_says_which_path_compile_took(tmp_path, tiny_corpus, tiny_trainer, compiler_failure):
    with compiler_failure():
        trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=1, compile=True)
    assert trainer.compile_path.startswith("eager (torch.compile unavailable here")
    assert trainer.train() == 0
    assert "compile eager (torch.compile unavailable here" in (trainer.run_dir / "train.log").read_text()


def test_sigterm_mid_run_leaves_a_checkpoint_that_resumes(
    tmp_path, tiny_corpus, tiny_trainer, tiny_config_file, final_weights
):
    config = tiny_config_file(
        tmp_path, tiny_corpus, max_steps=100_000, schedule={"kind": "constant", "warmup_steps": 0},
        checkpoint={"every": 100_000},
    )
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 120
    while not any(r["kind"] == "train" and r["step"] >= 3 for r in read_metrics(run_dir)):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    stopped_at = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())["step"]
    assert stopped_at >= 3

    # Resume to two steps past the stop; the constant schedule makes it comparable with a straight run.
    constant = {"kind": "constant", "warmup_steps": 0}
    resumed = tiny_trainer(tmp_path, tiny_corpus, out_dir=run_dir, max_steps=stopped_at + 2, schedule=constant)
    assert resumed.progress.step == stopped_at
    resumed.train()
    straight = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "straight", max_steps=stopped_at + 2,
                            schedule=constant)
    straight.train()
    expected, actual = final_weights(straight.run_dir), final_weights(run_dir)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_keeps_only_the_latest_k_checkpoints(tmp_path, tiny_corpus, tiny_trainer):
    trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=5, checkpoint={"every": 1, "keep": 2})
    trainer.train()
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_corpus, caplog, tiny_trainer):
    tiny_trainer(tmp_path, tiny_corpus, max_steps=4, checkpoint={"every": 2, "keep": 2}).train()
    run_dir = tmp_path / "run"
    weights = run_dir / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert latest_checkpoint(run_dir).name == "step_00000002"
    with caplog.at_level("WARNING", logger="tinyseek.train"):
        trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=4, checkpoint={"every": 2, "keep": 2})
    assert trainer.progress.step == 2 and trainer.resumed_from.name == "step_00000002"
    assert "step_00000004" in caplog.text and "model.safetensors" in caplog.text
    trainer.train()
    assert latest_checkpoint(run_dir).name == "step_00000004"


def test_bias_update_runs_once_per_optimizer_step(tmp_path, tiny_corpus, monkeypatch, tiny_trainer):
    calls = {"update": 0, "train_forward": 0}
    original_update, original_forward = TinySeekForCausalLM.update_load_balance_bias, TinySeekForCausalLM.forward

    def counting_update(self):
        calls["update"] += 1
        original_update(self)

    def counting_forward(self, *args, **kwargs):
        calls["train_forward"] += self.training
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(TinySeekForCausalLM, "update_load_balance_bias", counting_update)
    monkeypatch.setattr(TinySeekForCausalLM, "forward", counting_forward)
    trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=4, data={"grad_accum": 3})
    biases_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "bias" in k}
    trainer.train()
    assert calls == {"update": 4, "train_forward": 12}
    biases_after = trainer.model.state_dict()
    assert any(not torch.equal(biases_before[k], biases_after[k]) for k in biases_before)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--set", "optim.bogus=1"], "unknown config key optim.bogus"),
        (["--set", "optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
        (["--set", "max_steps=1.5"], "max_steps: expected int"),
        (["--set", "model.hidden_sise=64"], "unknown config key model.hidden_sise"),
        (["--set", "model.attention_type=rnn"], "model.attention_type: unknown attention type"),
        (["--set", "dtype=fp8"], "dtype: unknown value 'fp8'; choose one of 'auto', 'fp32', 'bf16' or 'fp16'"),
        (["--set", "schedule.kind=linear"], "schedule.kind: unknown value 'linear'"),
        (["--set", "data.foo=1"], "unknown config key data.foo; data keys are: cache_dir, grad_accum,"),
        (["--set", "data=5"], "data: expected a section (mapping), got 5"),
        (["--set", "logging.progress_bar=maybe"], "logging.progress_bar: expected bool, got 'maybe'"),
        (["--set", "optim.lr=.inf"], "optim.lr: expected a finite number, got inf"),
        (["--set", "optim.lr=-1"], "optim.lr: must be positive, got -1"),
        (["--parallel", "fsdp", "--set", "optim.name=muon"], "optim.name muon: Muon orthogonalises whole weight"),
        (["--max-steps", "0"], "max_steps: must be positive, got 0"),
        (["--config", "no-such-preset"], "not a preset"),
        (["--set", "optim"], "expected KEY=VALUE"),
    ],
)
def test_config_errors_are_clear(arguments, message):
    with pytest.raises((ValueError, OSError), match=re.escape(message)):
        train_main(["train", *arguments])


def test_bad_input_exits_with_one_line_and_touches_nothing(tmp_path, tiny_corpus, capsys, tiny_trainer):
    tiny_trainer(tmp_path, tiny_corpus, max_steps=2).train()
    checkpoint = latest_checkpoint(tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    config = ["--config", str(tmp_path / "tiny.yaml")]

    # One real process: `python train.py` exits 2 with a one-line message, no traceback.
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *config, "--set", "model.hidden_size=64", "--max-steps", "4"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "hidden_size: checkpoint has 32, this run has 64" in result.stderr and "Traceback" not in result.stderr
    for extra, message in [
        (["--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "other")], "missing.txt"),
        (["--tokenizer", str(tmp_path / "no-tokenizer"), "--out-dir", str(tmp_path / "other")], "no-tokenizer"),
        (["--set", "optim.lr=fast"], "optim.lr"),
    ]:
        assert tinyseek_main(["train", *config, *extra]) == 2
        assert message in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before
    assert not (tmp_path / "other").exists()


def test_checkpoint_loads_for_generation(tmp_path, tiny_corpus, tiny_trainer):
    trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=2)
    trainer.train()
    model, tokenizer = load_model_and_tokenizer(trainer.run_dir)
    assert not model.training
    saved = trainer.model.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert plot_run(trainer.run_dir, tmp_path / "again.png").stat().st_size > 0


def test_schedule_warms_up_then_decays_to_the_floor():
    cosine = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cosine, 100) == pytest.approx(0.1)
    assert lr_multiplier(9, cosine, 100) == pytest.approx(1.0)
    assert lr_multiplier(55, cosine, 100) == pytest.approx(0.55)
    assert lr_multiplier(100, cosine, 100) == pytest.approx(0.1)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_multiplier(79, wsd, 100) == 1.0
    assert lr_multiplier(90, wsd, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, wsd, 100) == 0.0


@pytest.mark.parametrize("kind", ["wsd", "cosine"])
def test_moving_the_end_keeps_the_rate_continuous_and_still_decays_to_the_floor(kind):
    from tinyseek.train.budget import Horizon
    from tinyseek.train.schedule import moved_horizon

    schedule = ScheduleConfig(kind=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.3)
    if kind == "wsd":  # before the decay, a new end is just the plain schedule for it
        assert moved_horizon(schedule, Horizon(100), 50, 120) == Horizon(120)
    for step, new_end in ((80, 130), (80, 90), (95, 97)):  # inside the decay, longer or shorter
        before = lr_multiplier(step, schedule, 100)
        moved = moved_horizon(schedule, Horizon(100), step, new_end)
        assert moved.decay_from == (step, before)
        assert lr_multiplier(step, schedule, *moved) == before
        rates = [lr_multiplier(s, schedule, *moved) for s in range(step, new_end + 1)]
        assert all(a >= b for a, b in zip(rates, rates[1:])) and rates[-1] == pytest.approx(0.1)
        # Moved again, from the moved horizon, it continues from wherever the rate is.
        again = moved_horizon(schedule, moved, step + 2, new_end + 5)
        assert lr_multiplier(step + 2, schedule, *again) == lr_multiplier(step + 2, schedule, *moved)


def test_set_values_keep_their_yaml_types():
    assert parse_assignment("optim.betas=[0.9, 0.99]") == (["optim", "betas"], [0.9, 0.99])
    config = load_config(None, [parse_assignment("optim.lr=3e-4"), parse_assignment("model.hidden_size=256")])
    assert config.optim.lr == 3e-4 and config.model == {"preset": "seed", "hidden_size": 256}


def test_seed_preset_runs_two_steps_on_local_data(tmp_path, shared_data):
    corpus = shared_data / "corpus" / "tinyshakespeare.txt"
    tokenizer = shared_data / "tokenizers" / "deepseek-coder"
    if not corpus.is_file() or not tokenizer.is_dir():
        pytest.skip("tinyshakespeare or the deepseek-coder tokenizer is absent")
    config = load_config("seed", [
        (["data", "source"], str(corpus)), (["data", "tokenizer"], str(tokenizer)),
        (["data", "cache_dir"], str(tmp_path / "cache")), (["out_dir"], str(tmp_path / "seed")),
        (["max_steps"], 2), (["logging", "eval_batches"], 1), (["sample", "max_new_tokens"], 3),
        (["logging", "progress_bar"], False),
    ])
    trainer = Trainer(config)
    assert trainer.config.gradient_checkpointing == "full" and trainer.placement.precision == "bf16"  # the preset's `true`
    assert sum(p.numel() for p in trainer.model.parameters()) == 10_095_760
    assert trainer.train() == 0
    assert latest_checkpoint(trainer.run_dir).name == "step_00000002"
    assert [r["kind"] for r in read_metrics(trainer.run_dir)] == ["train", "eval", "samples"]


def test_parse_duration():
    from tinyseek.train.budget import parse_duration

    assert parse_duration("15m") == 900 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    assert parse_duration("2.5m") == 150 and parse_duration("45s") == 45
    for bad in ("", "fast", "0s", "15 minutes"):
        with pytest.raises(ValueError, match="time_budget"):
            parse_duration(bad)


def test_time_budget_calibration_leaves_out_the_slow_first_steps():
    from tinyseek.train.budget import BudgetCalibration

    # Like the reference loop of benchmarks/quality.py: its first six steps 30% slower than the steady rate. Timing
    # them would fix too few steps; the run must end within one step of its budget.
    budget_s, step_seconds = 900.0, [1.3] * 6 + [1.0] * 1000
    calibration, elapsed_s = BudgetCalibration(budget_s), 0.0
    for step, seconds in enumerate(step_seconds, start=1):
        elapsed_s += seconds
        fixed = calibration.observe(step, seconds, elapsed_s)
        if fixed is not None:
            break
    assert calibration.seconds_per_step == 1.0
    assert budget_s - 1.0 < sum(step_seconds[:fixed]) <= budget_s


def test_time_budget_fixes_max_steps_from_the_measured_speed(tmp_path, tiny_corpus, tiny_trainer):
    trainer = tiny_trainer(tmp_path, tiny_corpus, time_budget="1s", max_steps=3)
    fixed = []
    original = Trainer.fix_max_steps
    trainer.fix_max_steps = lambda steps: (fixed.append(steps), original(trainer, steps))
    assert trainer.train() == 0
    assert fixed and fixed[0] > 5  # measured after the timed steps, not the config's 3
    assert trainer.progress.step == fixed[-1]
    assert yaml.safe_load((trainer.run_dir / "config.yaml").read_text())["max_steps"] == fixed[-1]
    state = json.loads((latest_checkpoint(trainer.run_dir) / "trainer_state.json").read_text())
    assert (state["budget"]["time_budget"], state["budget"]["max_steps"]) == ("1s", fixed[-1])
    assert 0 < state["train_seconds"]
    assert "% of the budget" in (trainer.run_dir / "train.log").read_text()


def test_time_budget_resume_keeps_the_fixed_steps_and_is_bitwise_identical(
    tmp_path, tiny_corpus, monkeypatch, tiny_trainer, final_weights
):
    from tinyseek.train.budget import BudgetCalibration

    # The clock decides the step count; here it decides 9 at step 3 in both runs, so their weights can be compared.
    monkeypatch.setattr(BudgetCalibration, "observe", lambda self, step, seconds, elapsed: 9 if step == 3 else None)
    sections = dict(time_budget="10m", schedule={"warmup_steps": 4}, checkpoint={"every": 100})
    straight = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "straight", **sections)
    assert straight.train() == 0 and straight.progress.step == 9
    first = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", **sections)
    first.train(stop_at_step=5)
    # On resume the machine may be faster or slower: the checkpoint's step count stands, nothing is timed again.
    monkeypatch.setattr(BudgetCalibration, "observe", lambda *args: pytest.fail("calibrated again on resume"))
    second = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", **sections)
    assert second.progress.step == 5 and second.config.max_steps == 9
    assert second.train() == 0 and second.progress.step == 9
    expected, actual = final_weights(straight.run_dir), final_weights(second.run_dir)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_a_run_whose_end_moved_inside_the_decay_resumes_bitwise_identical(
    tmp_path, tiny_corpus, monkeypatch, tiny_trainer, final_weights
):
    from tinyseek.train.budget import TimeBudget

    # The clock decides: 9 steps at step 3, then, its pace having slowed, 12 at step 7 (inside the cosine decay).
    decisions = {3: 9, 7: 12}
    monkeypatch.setattr(TimeBudget, "observe", lambda self, step, *args, **kwargs: decisions.get(step))
    sections = dict(time_budget="10m", schedule={"warmup_steps": 4}, checkpoint={"every": 100})
    straight = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "straight", **sections)
    assert straight.train() == 0 and straight.progress.step == 12
    assert straight.budget.horizon.decay_from[0] == 7
    first = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", **sections)
    first.train(stop_at_step=10)
    second = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", **sections)
    assert second.budget.horizon == straight.budget.horizon and second.progress.step == 10
    assert second.train() == 0 and second.progress.step == 12
    expected, actual = final_weights(straight.run_dir), final_weights(second.run_dir)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_a_run_whose_steps_slow_down_still_ends_on_its_budget(tmp_path, tiny_corpus, monkeypatch, tiny_trainer):
    # From step 40 on, every step sleeps 40 ms more (the fault hook): the pace measured at calibration no longer
    # holds, and a budget fixed once would end at about twice its length.
    monkeypatch.setenv("TINYSEEK_FAULTS", "train.step@40+=pause:0.04")
    trainer = tiny_trainer(tmp_path, tiny_corpus, time_budget="5s", max_steps=3,
                           logging={"eval_every": 50, "eval_batches": 1}, checkpoint={"every": 10**6})
    assert trainer.train() == 0
    assert trainer.progress.train_seconds == pytest.approx(5.0, rel=0.03)
    assert trainer.optimization.learning_rate == pytest.approx(
        trainer.config.optim.lr * trainer.config.schedule.min_lr_ratio)  # the decay completed


def test_the_budget_holds_when_steps_slow_down_and_evaluations_take_time():
    from tinyseek.train.budget import Horizon, TimeBudget

    # A cpu-15min run as measured on a 2-core machine: 0.56 s per step at calibration, 0.70 s by step 1,000, and a
    # 5-second evaluation every 200 steps. Fixed once, it ran 114% of its budget.
    def run(keep_pace: bool) -> float:
        budget, max_steps, step, elapsed = TimeBudget("15m"), 10**9, 0, 0.0
        budget.start()
        while step < max_steps:
            step += 1
            seconds = 0.56 + 0.14 * min(step, 1000) / 1000
            elapsed += seconds
            moved = budget.observe(step, seconds, elapsed, max_steps)
            if moved is not None and (keep_pace or not budget.fixed):
                max_steps = moved
                budget.horizon = Horizon(moved)
            if step % 200 == 0:
                elapsed += 5.0
        return elapsed / 900

    assert run(keep_pace=False) > 1.1
    assert run(keep_pace=True) == pytest.approx(1.0, abs=0.02)


def test_trainer_samples_and_tinyseek_generate_draw_the_same_text_from_the_same_seed(
    tmp_path, tiny_corpus, capsys, tiny_trainer
):
    # docs/generation.md: a seed starts a private stream, the trainer's samples and `tinyseek generate --seed` alike;
    # model.generate() draws from torch's global stream as transformers does (tests/test_generate.py).
    sample = {"prompts": ["the cat"], "max_new_tokens": 8, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
              "repetition_penalty": 1.1}
    trainer = tiny_trainer(tmp_path, tiny_corpus, max_steps=2, dtype="bf16", seed=5, sample=sample)
    trainer.train()
    (from_trainer,) = trainer.evaluator.sample(trainer.model)
    capsys.readouterr()

    argv = ["generate", "--run-dir", str(trainer.run_dir), "--prompt", "the cat", "--max-new-tokens", "8",
            "--temperature", "0.8", "--top-k", "50", "--top-p", "0.95", "--repetition-penalty", "1.1", "--seed", "5"]
    assert tinyseek_main(argv) == 0
    from_cli = capsys.readouterr().out
    assert from_trainer["continuation"] + "\n" == from_cli
    assert len(from_cli.strip()) > 0


def test_resume_accepts_changed_training_knobs_and_logs_them_but_refuses_another_architecture(
    tmp_path, tiny_corpus, tiny_trainer
):
    mtp = {"num_nextn_predict_layers": 1, "mtp_loss_weight": 0.3}
    first = tiny_trainer(tmp_path, tiny_corpus, max_steps=4, model=mtp, checkpoint={"every": 2})
    first.train(stop_at_step=2)
    knobs = {**mtp, "attention_dropout": 0.0, "mtp_loss_weight": 0.5}
    resumed = tiny_trainer(tmp_path, tiny_corpus, max_steps=4, model=knobs, checkpoint={"every": 2})
    assert resumed.progress.step == 2 and resumed.model.config.mtp_loss_weight == 0.5
    assert resumed.train() == 0
    log = (resumed.run_dir / "train.log").read_text()
    assert "model settings changed on resume: attention_dropout: checkpoint has 0.1, this run has 0.0" in log
    assert "mtp_loss_weight: checkpoint has 0.3, this run has 0.5" in log
    with pytest.raises(ValueError, match=r"different architecture.*hidden_size: checkpoint has 32, this run has 64"):
        tiny_trainer(tmp_path, tiny_corpus, max_steps=6, model={**knobs, "hidden_size": 64})
