"""The optimizer registry and its parameter groups: AdamW's groups as before the registry, learning-rate multipliers
per parameter role, the current config winning on resume, and a newly registered optimizer training end to end."""

import pytest
import torch

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.train import optim
from tinyseek.train.config import OptimConfig, ScheduleConfig
from tinyseek.train.schedule import build_scheduler


def groups_before_the_registry(model):
    """The reference: AdamW's two groups as the trainer built them, decay first (weight matrices, the untied head)
    and no decay (1-D parameters and token embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.ndim < 2 or id(p) in embeddings]
    return [decay, no_decay]


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"num_nextn_predict_layers": 1}])
def test_adamw_groups_are_the_groups_from_before_the_registry(tiny_config, overrides):
    model = TinySeekForCausalLM(tiny_config(**{**TinySeekConfig.from_preset("seed").to_diff_dict(), **overrides}))
    optimizer = optim.build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    expected = groups_before_the_registry(model)
    assert [[id(p) for p in group["params"]] for group in optimizer.param_groups] == [[id(p) for p in g] for g in expected]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]


def test_lr_multipliers_split_groups_and_every_group_follows_the_schedule_and_the_current_config(tiny_model):
    model = tiny_model()
    config = OptimConfig(lr=1e-3, lr_multipliers={"embedding": 5.0, "head": 0.5}, implementation="for-loop")
    optimizer = optim.build_optimizer(model, config, torch.device("cpu"))
    assert [group["roles"] for group in optimizer.param_groups] == [["matrix"], ["head"], ["embedding"], ["vector"]]
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 5e-4, 5e-3, 1e-3]
    schedule = ScheduleConfig(kind="constant", warmup_steps=4)
    scheduler = build_scheduler(optimizer, schedule, max_steps=10)
    model(torch.randint(0, 257, (1, 8)), labels=torch.randint(0, 257, (1, 8))).loss.backward()
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4, 2.5e-4, 2.5e-3, 5e-4])

    # Resuming under a config with another peak rate and decay: the moments stay, the settings follow the config.
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    changed = OptimConfig(lr=2e-3, weight_decay=0.2, lr_multipliers={"embedding": 5.0, "head": 0.5}, implementation="for-loop")
    resumed = optim.build_optimizer(model, changed, torch.device("cpu"))
    resumed_scheduler = build_scheduler(resumed, schedule, max_steps=10)
    resumed.load_state_dict(saved_optimizer)
    resumed_scheduler.load_state_dict(saved_scheduler)
    optim.apply_current_hyperparameters(resumed, optim.build_optimizer(model, changed, torch.device("cpu")), resumed_scheduler)
    assert [group["lr"] for group in resumed.param_groups] == pytest.approx([1e-3, 5e-4, 5e-3, 1e-3])
    assert [group["weight_decay"] for group in resumed.param_groups] == [0.2, 0.2, 0.0, 0.0]
    assert resumed.state_dict()["state"][0]["exp_avg"].equal(saved_optimizer["state"][0]["exp_avg"])
    resumed_scheduler.step()
    assert [group["lr"] for group in resumed.param_groups] == pytest.approx([1.5e-3, 7.5e-4, 7.5e-3, 1.5e-3])


def test_a_changed_group_layout_is_refused_on_resume(tiny_model):
    model = tiny_model()
    two = optim.build_optimizer(model, OptimConfig(), torch.device("cpu"))
    three = optim.build_optimizer(model, OptimConfig(lr_multipliers={"embedding": 2.0}), torch.device("cpu"))
    with pytest.raises(ValueError, match="parameter groups"):
        optim.apply_current_hyperparameters(two, three, build_scheduler(two, ScheduleConfig(), 10))


def test_a_registered_optimizer_trains_checkpoints_and_resumes(tmp_path, tiny_corpus, tiny_trainer, monkeypatch):
    monkeypatch.setitem(optim.OPTIMIZERS, "sgd", lambda model, config, device: torch.optim.SGD(
        optim.parameter_groups(model, config), lr=config.lr, momentum=0.9))
    first = tiny_trainer(tmp_path, tiny_corpus, optim={"name": "sgd", "lr": 0.1}, checkpoint={"every": 2})
    assert first.train(stop_at_step=2) == 0 and isinstance(first.optimization.optimizer, torch.optim.SGD)
    resumed = tiny_trainer(tmp_path, tiny_corpus, optim={"name": "sgd", "lr": 0.1}, checkpoint={"every": 2})
    assert resumed.progress.step == 2
    assert resumed.optimization.optimizer.state_dict()["state"][0]["momentum_buffer"].abs().sum() > 0
    assert resumed.train() == 0
    assert "optimizer sgd (for-loop) | matrix+head:" in (resumed.run_dir / "train.log").read_text()


def test_an_unknown_optimizer_or_role_is_a_config_error(tmp_path, tiny_corpus, tiny_trainer):
    with pytest.raises(ValueError, match="optim.name: unknown optimizer 'lion'; choose one of adamw"):
        tiny_trainer(tmp_path, tiny_corpus, optim={"name": "lion"})
    with pytest.raises(ValueError, match="optim.lr_multipliers: unknown parameter role 'router'"):
        tiny_trainer(tmp_path, tiny_corpus, optim={"lr_multipliers": {"router": 2.0}})
