"""The trainer's components, each on its own (no Trainer), and a training stage with its own loss run through the
trainer's loop against a hand-written one."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from filelock import FileLock, Timeout

from tinyseek import ops
from tinyseek.data import TokenDataset, WindowSampler, iter_eval_batches
from tinyseek.distributed import World
from tinyseek.errors import ConfigError
from tinyseek.train import load_config
from tinyseek.train.budget import CALIBRATION_HORIZON, Horizon, TimeBudget
from tinyseek.train.checkpoint import save_checkpoint
from tinyseek.train.checkpointing import Checkpointer, Progress, Resumable, restore_rng_state, rng_state
from tinyseek.train.data import TrainingData, continue_data_order, pinned_sources, preparation_lock
from tinyseek.train.evaluator import Evaluator
from tinyseek.train.metrics import Interval, RunReport, read_metrics
from tinyseek.train.model import Placement, build_model, build_model_config, choose_precision
from tinyseek.train.optim import build_optimizer
from tinyseek.train.optimization import Optimization
from tinyseek.train.schedule import build_scheduler
from tinyseek.train.signals import StopRequest
from tinyseek.train.stage import Stage, StepLoss, token_windows
from tinyseek.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture
def config(tmp_path, tiny_corpus, tiny_config_file):
    """``config(**sections)``: the tiny training config (fp32, CPU, one process)."""
    return lambda **sections: load_config(str(tiny_config_file(tmp_path, tiny_corpus, **sections)))


def one_process(precision: str = "fp32") -> Placement:
    return Placement(World(), CPU, precision)


def built(config):
    """The tiny corpus prepared and opened for `config`, and the model configuration for its tokenizer."""
    data = TrainingData(config.data, Path(config.out_dir))
    model_config = build_model_config(config, data.tokenizer)
    data.prepare(model_config.vocab_size)
    data.open()
    return data, model_config


# -- data ---------------------------------------------------------------------------------------------------------


def test_a_run_directory_pins_the_sources_its_first_start_resolved(tmp_path, config, tiny_corpus):
    assert pinned_sources(tmp_path) == {}  # a new run
    (tmp_path / "config.yaml").write_text("not: [valid")
    assert pinned_sources(tmp_path) == {}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"source": "first.jsonl", "tokenizer": "tok"}}))
    assert pinned_sources(tmp_path) == {"data": "first.jsonl", "tokenizer": "tok"}

    settings = config().data
    data = TrainingData(settings, tmp_path / "new-run")
    assert (settings.source, data.tokenizer_spec) == (tiny_corpus["data"], tiny_corpus["tokenizer"])
    assert data.tokenizer_id.startswith("sha256:")


def test_the_preparation_lock_keeps_other_processes_out_while_held(tmp_path):
    other = FileLock(str(tmp_path / "cache" / ".prepare.lock"))
    with preparation_lock(tmp_path / "cache"):
        with pytest.raises(Timeout):
            other.acquire(timeout=0)
    with other.acquire(timeout=0):
        pass


def test_training_data_prepares_opens_and_describes_the_corpus(config):
    data, model_config = built(config())
    assert len(data.train_set) > len(data.val_set) > 0
    assert data.tokens_per_step(world_size=3) == 16 * 2 * 2 * 3
    (line,) = data.describe(sampler=None)
    assert f"train {len(data.train_set):,} tokens" in line and data.tokenizer_id in line
    assert data.describe_batch(1, 6).endswith("(micro-batch 2 x accumulation 2 x 1 processes); 6 steps")
    assert data.checkpoint_state()["tokenizer"] == data.tokenizer_id


@pytest.mark.parametrize("new_accum", [2, 4])
def test_the_data_order_continues_at_the_first_window_a_checkpoint_had_not_read(config, new_accum):
    data, _ = built(config())
    straight = WindowSampler(data.train_set, 16, 2, seed=0)
    saved_state = {"sampler": straight.state_dict(), "config": {"data": {"grad_accum": 2}}}
    resumed = WindowSampler(data.train_set, 16, 2, seed=0)
    continue_data_order(resumed, saved_state, step=3, grad_accum=new_accum, world_size=1)
    # Step 3 of the old run would have read micro-batch 3 * 2 first; the new run's step 3 reads index 3 * new_accum.
    assert torch.equal(resumed.batch(3 * new_accum), straight.batch(3 * 2))
    assert torch.equal(resumed.batch(3 * new_accum + 1), straight.batch(3 * 2 + 1))


# -- model --------------------------------------------------------------------------------------------------------


def test_precision_and_autocast_follow_the_device():
    assert choose_precision("auto", CPU) == "bf16" and choose_precision("fp16", CPU) == "fp16"
    with one_process("bf16").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with one_process("fp32").autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert one_process().largest_across_ranks(7) == 7


def test_the_model_is_built_from_the_seed_with_single_process_sparse_embedding_gradients(config):
    train_config = config(gradient_checkpointing="full")
    data, model_config = built(train_config)
    first, second = (build_model(train_config, model_config, one_process()) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert first.forward_model is first.model and first.compile_path == "off"
    embeddings = [m for m in first.model.modules() if isinstance(m, ops.Embedding)]
    assert embeddings and all(m.accumulate_sparse_gradients for m in embeddings)
    assert first.model.is_activation_checkpointing


def test_a_model_too_large_for_the_tokenizer_vocabulary_is_refused_before_preparation(config):
    train_config = config(model={"preset": "seed", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                                 "intermediate_size": 64, "moe_intermediate_size": 32})
    data = TrainingData(train_config.data, Path(train_config.out_dir))
    with pytest.raises(ConfigError, match="vocab"):
        build_model_config(train_config, data.tokenizer)


# -- optimizer and schedule ---------------------------------------------------------------------------------------


def optimization_for(train_config):
    data, model_config = built(train_config)
    model = build_model(train_config, model_config, one_process()).model
    return model, Optimization(train_config, model, model, one_process()), data


def test_a_finite_step_clips_and_steps_as_the_plain_optimizer_does(config):
    train_config = config(optim={"lr": 3.0e-3, "grad_clip": 0.01})
    model, optimization, data = optimization_for(train_config)
    twin = deepcopy(model)
    window = WindowSampler(data.train_set, 16, 2, seed=0).batch(0)
    loss = model.train()(input_ids=window[:, :-1], shift_labels=window[:, 1:]).loss
    optimization.backward(loss)
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        theirs.grad = None if mine.grad is None else mine.grad.clone()
    grad_norm, non_finite = optimization.step(loss.detach())
    assert non_finite is None and grad_norm > 0.01  # clipped from above the limit

    # By hand: the same gradients clipped, into a fresh optimizer and schedule of the same config.
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    optimizer = build_optimizer(twin, train_config.optim, CPU)
    scheduler = build_scheduler(optimizer, train_config.schedule, train_config.max_steps)
    optimizer.step()
    scheduler.step()
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
        assert mine.grad is None  # zeroed for the next step
    assert optimization.learning_rate == scheduler.get_last_lr()[0]


def test_a_non_finite_loss_skips_the_update_but_uses_up_the_learning_rate(config):
    model, optimization, data = optimization_for(config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    window = WindowSampler(data.train_set, 16, 2, seed=0).batch(0)
    loss = model.train()(input_ids=window[:, :-1], shift_labels=window[:, 1:]).loss * math.nan
    optimization.backward(loss)
    lr_before = optimization.learning_rate
    grad_norm, non_finite = optimization.step(loss.detach())
    assert non_finite == "loss"
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(not counts.any() for counts in model.expert_load_counts())
    assert optimization.learning_rate != lr_before  # the schedule moved on as if the step had been taken


# -- checkpointing ------------------------------------------------------------------------------------------------


def test_rng_state_round_trips_through_json_for_every_generator():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.random(), np.random.rand(), torch.rand(3), np.random.randn()  # a cached numpy gauss as well
    saved = json.loads(json.dumps(rng_state(CPU)))
    expected = (random.random(), np.random.randn(), torch.rand(4))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(saved, CPU)
    got = (random.random(), np.random.randn(), torch.rand(4))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_progress_round_trips_through_the_trainer_state():
    progress = Progress(step=7, tokens=448, non_finite_steps=2, non_finite_in_a_row=1, train_seconds=3.5)
    assert Progress.from_state(json.loads(json.dumps(progress.state()))) == progress
    assert Progress.from_state({"step": 1, "tokens": 64}) == Progress(step=1, tokens=64)  # older checkpoints


def test_a_checkpoint_of_another_architecture_or_tokenizer_is_refused(tmp_path, tiny_config):
    saved = tiny_config(attention_dropout=0.1)
    (tmp_path / "config.json").write_text(saved.to_json_string())
    found = Resumable(tmp_path, {"tokenizer": "sha256:a"}, {})
    checkpointer = Checkpointer(tmp_path, keep=1)
    with pytest.raises(ConfigError, match="different architecture .*hidden_size"):
        checkpointer.check_fits(found, tiny_config(hidden_size=64), "sha256:a")
    with pytest.raises(ConfigError, match="tokenizer sha256:a, this run uses sha256:b"):
        checkpointer.check_fits(found, tiny_config(), "sha256:b")
    checkpointer.check_fits(found, tiny_config(), "sha256:a")
    (changed,) = checkpointer.changed_on_resume
    assert "attention_dropout" in changed
    lines = checkpointer.describe_resume(tmp_path, Progress(step=4, tokens=1234))
    assert lines == [
        f"resumed from {tmp_path} at step 4 (1,234 tokens)", f"model settings changed on resume: {changed}"
    ]
    assert checkpointer.describe_resume(None, Progress()) == []


def test_the_latest_usable_checkpoint_skips_a_damaged_one(tmp_path, tiny_model, byte_tokenizer):
    model = tiny_model()
    model.config.eos_token_id = byte_tokenizer.eos_token_id
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, byte_tokenizer, {"optimizer": {}}, {"step": step}, keep=2)
    newest = tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])
    checkpointer = Checkpointer(tmp_path, keep=2)
    found = checkpointer.latest_usable()
    assert found.path.name == "step_00000002" and found.state["step"] == 2
    assert len(checkpointer.skipped) == 1 and checkpointer.skipped[0].startswith("step_00000004: ")


# -- evaluation and samples ---------------------------------------------------------------------------------------


def test_the_validation_loss_is_the_mean_over_windows_of_the_plain_cross_entropy(config):
    train_config = config()
    data, model_config = built(train_config)
    model = build_model(train_config, model_config, one_process()).model
    evaluator = Evaluator(train_config, data.val_set, data.tokenizer, world_size=1)
    values = evaluator.evaluate(model, model, CPU, one_process().autocast)
    windows = torch.cat(list(iter_eval_batches(data.val_set, 16, 4, max_batches=2)))
    with torch.no_grad():
        per_window = [F.cross_entropy(model(input_ids=w[None, :-1]).logits[0].float(), w[1:]) for w in windows]
    assert values["val_loss"] == pytest.approx(torch.stack(per_window).mean().item(), rel=1e-5)
    assert values["val_perplexity"] == pytest.approx(math.exp(values["val_loss"]))


def test_samples_do_not_touch_the_training_random_state(config):
    train_config = config(sample={"prompts": ["the cat", "a dog"], "max_new_tokens": 4, "temperature": 1.0})
    data, model_config = built(train_config)
    model = build_model(train_config, model_config, one_process()).model
    evaluator = Evaluator(train_config, data.val_set, data.tokenizer, world_size=1)
    torch.manual_seed(3)
    first = evaluator.sample(model)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert evaluator.sample(model) == first and torch.equal(torch.rand(1), after)
    assert [s["prompt"] for s in first] == ["the cat", "a dog"]


# -- metrics and logging ------------------------------------------------------------------------------------------


def test_the_run_report_writes_records_and_lines_on_the_main_process_only(tmp_path, caplog):
    report = RunReport(tmp_path, tensorboard=False, is_main=True, progress_bar=False)
    report.start_progress(total=10, initial=0)
    values = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0, "mfu": 0.01, "memory_gb": 0.1}
    with caplog.at_level(logging.INFO, logger="tinyseek.train"):
        report.train(1, 10, 64, values)
        report.evaluation(1, 64, 0.5, {"val_loss": 2.0, "val_perplexity": 7.39})
        report.samples(1, 64, [{"prompt": "the", "continuation": "cat\nsat"}])
    report.close()
    assert [r["kind"] for r in read_metrics(tmp_path)] == ["train", "eval", "samples"]
    assert "step 1/10 | loss 2.5000" in caplog.text and "val_ppl 7.39" in caplog.text
    assert "sample | the|cat\\nsat" in caplog.text

    other = RunReport(tmp_path / "other", tensorboard=False, is_main=False, progress_bar=False)
    other.start_progress(total=10, initial=0)
    other.train(1, 10, 64, values)
    assert not (tmp_path / "other").exists()


def test_non_finite_steps_are_tolerated_up_to_the_limit(tmp_path, caplog):
    report = RunReport(tmp_path, tensorboard=False, is_main=True, progress_bar=False)
    result = {"non_finite": "loss", "loss": torch.tensor(math.nan), "grad_norm": torch.tensor(1.0)}
    with caplog.at_level(logging.INFO, logger="tinyseek.train"):
        assert not report.non_finite(Progress(step=1, non_finite_steps=1, non_finite_in_a_row=1), result, limit=2)
        assert report.non_finite(Progress(step=2, non_finite_steps=2, non_finite_in_a_row=2), result, limit=2)
    assert "no checkpoint was written" in caplog.text
    assert [r["in_a_row"] for r in read_metrics(tmp_path)] == [1, 2]


def test_the_interval_averages_the_loss_since_the_last_line():
    interval = Interval()
    interval.add(2.0), interval.add(4.0)
    assert interval.mean_loss == 3.0 and interval.tokens_per_s(tokens_per_step=10) > 0
    interval.restart()
    assert interval.steps == 0


# -- time budget --------------------------------------------------------------------------------------------------


def test_the_time_budget_fixes_the_steps_once_and_every_process_adopts_the_first_decision(monkeypatch):
    from tinyseek.train.budget import BudgetCalibration

    assert TimeBudget(None).initial_max_steps(6) == 6 and TimeBudget("1m").initial_max_steps(6) == CALIBRATION_HORIZON
    budget = TimeBudget("1m")
    budget.start()
    monkeypatch.setattr(BudgetCalibration, "observe", lambda self, step, seconds, elapsed: None)
    # Another process decided 40: this one adopts it although its own calibration has not decided yet.
    assert budget.observe(3, 0.5, 1.5, CALIBRATION_HORIZON, agree=lambda steps: max(steps, 40)) == 40
    budget.horizon = Horizon(40)
    assert budget.observe(4, 0.5, 2.0, 40) is None  # calibrated once; from here on only the pace moves the end
    assert budget.state() == {"time_budget": "1m", "max_steps": 40, "decay_from": None}
    budget.horizon = Horizon(45, (30, 0.5))
    saved = {"budget": budget.state()}
    assert budget.saved_horizon(saved) == Horizon(45, (30, 0.5))  # the checkpoint's JSON holds the pair as a list
    assert TimeBudget("2m").saved_horizon(saved) is None
    assert budget.summary(40, 30.0) == "time budget 1m: trained 40 steps in 30 s, 50.0% of the budget"


def test_the_pace_moves_the_end_only_past_its_tolerance_and_every_process_checks_at_the_same_steps():
    from tinyseek.train.budget import BudgetPace

    pace = BudgetPace(100.0, tolerance=0.01, window=4, check_every=2)
    for step in range(1, 5):
        pace.record(1.0, float(step))
    assert not pace.due(3, 100) and pace.due(4, 100) and not pace.due(4, 4)
    assert pace.proposal(4, 4.0, 100) is None  # 96 more seconds for 96 more steps
    assert pace.proposal(4, 4.0, 99) is None  # 1% off: within the tolerance
    assert pace.proposal(4, 4.0, 90) == 100
    pace.record(1.0, 10.0)  # 5 s between steps 4 and 5 (an evaluation): 1 s per step so far, on top of the 1 s steps
    assert pace.proposal(5, 10.0, 100) == 5 + round(90 / 2.0)


# -- signals ------------------------------------------------------------------------------------------------------


def test_a_signal_asks_for_a_stop_and_puts_the_default_handler_back():
    stop = StopRequest()
    previous = signal.getsignal(signal.SIGTERM)
    with stop.listening():
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM and stop.agreed()
        assert signal.getsignal(signal.SIGTERM) is previous  # a second signal ends the process at once
    other = StopRequest()
    assert other.agreed(across_processes=lambda value: max(value, signal.SIGINT.value))  # another process stopped
    assert other.signal == signal.SIGINT


# -- the step memory ----------------------------------------------------------------------------------------------


def test_step_memory_reuses_its_workspace_and_frees_it_on_request():
    memory = ops.StepMemory(tune_allocator=False)
    assert not memory.keeps_freed_memory
    large = memory.workspace("logits", (4, 8), torch.float32, CPU)
    small = memory.workspace("logits", (2, 8), torch.float32, CPU)
    assert small.data_ptr() == large.data_ptr() and small.shape == (2, 8)
    memory.release_workspaces()
    assert memory.buffers == {}


# -- a stage with its own loss through the trainer's loop ---------------------------------------------------------


def label_smoothed_loss(model, window, memory):
    """Another objective than pre-training's: label-smoothed cross-entropy on the logits, no auxiliary losses."""
    logits = model(input_ids=window[:, :-1]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten(), label_smoothing=0.2)
    return StepLoss(loss, loss)


LABEL_SMOOTHED = Stage("label-smoothed", token_windows, label_smoothed_loss)


def test_a_stage_with_its_own_loss_runs_through_the_same_loop_as_a_hand_written_one(config):
    train_config = config(max_steps=3, logging={"eval_every": 1000, "log_every": 1, "progress_bar": False,
                                                "peak_flops": 1.0e11}, sample={"prompts": []})
    trainer = Trainer(train_config, stage=LABEL_SMOOTHED)
    assert trainer.train() == 0
    logged = [r["loss"] for r in read_metrics(trainer.run_dir) if r["kind"] == "train"]

    # The same run by hand: same model and data order, the stage's loss, clip, step, bias update, schedule.
    reference = build_model(train_config, trainer.model_config, one_process()).model
    optimizer = build_optimizer(reference, train_config.optim, CPU)
    scheduler = build_scheduler(optimizer, train_config.schedule, train_config.max_steps)
    sampler = WindowSampler(TokenDataset(trainer.data.data_dir, "train"), 16, 2, seed=train_config.seed)
    losses = []
    for step in range(3):
        reference.train()
        step_loss = 0.0
        for micro_step in range(2):
            loss = label_smoothed_loss(reference, sampler.batch(step * 2 + micro_step), None).loss / 2
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), train_config.optim.grad_clip)
        optimizer.step()
        reference.update_load_balance_bias()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(step_loss)
    assert logged == pytest.approx(losses, rel=1e-6)
    for (name, expected), actual in zip(reference.state_dict().items(), trainer.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=name)
