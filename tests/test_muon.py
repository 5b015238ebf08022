"""Muon for the hidden matrices and AdamW for the rest, in one optimizer: which parameter goes where, the fp32
Newton–Schulz iteration against torch's, every parameter moving, and an exact state round trip."""

from __future__ import annotations

import pytest
import torch

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.distributed import full_optimizer_state_dict, load_full_state
from tinyseek.ops import cpu_has_native_bf16_matmul
from tinyseek.train.muon import (
    Float32Muon,
    MuonWithAdamW,
    adjusted_lr,
    build_muon_with_adamw,
    is_muon_matrix,
    newton_schulz_fp32,
)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 96)])
def test_fp32_newton_schulz_matches_torchs_bf16_iteration(shape):
    torch.manual_seed(0)
    gradient = torch.randn(shape)
    expected = torch.optim._muon._zeropower_via_newtonschulz(gradient, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    actual = newton_schulz_fp32(gradient)
    assert actual.dtype == torch.float32 and actual.shape == shape
    # bf16 keeps 8 bits of mantissa: the two agree to bf16's precision, entry by entry.
    assert torch.allclose(actual, expected, rtol=2e-2, atol=2e-2)
    assert (actual - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 96), (32, 16, 4)])
def test_learning_rate_adjustment_is_torchs(adjust_lr_fn, shape):
    # torch's own rule is private: this pins that Float32Muon scales its steps exactly as torch.optim.Muon does.
    expected = torch.optim._muon._adjust_lr(0.02, adjust_lr_fn, torch.Size(shape))
    assert adjusted_lr(0.02, adjust_lr_fn, torch.Size(shape)) == pytest.approx(expected, rel=1e-12)


# For each preset: parameter name (layer 1 stands for every layer) -> "muon" or "adamw".
EXPECTED_GROUPS = {
    "seed": {
        "model.embed_tokens.weight": "adamw",
        "model.layers.1.self_attn.q_proj.weight": "muon",
        "model.layers.1.self_attn.k_proj.weight": "muon",
        "model.layers.1.self_attn.v_proj.weight": "muon",
        "model.layers.1.self_attn.o_proj.weight": "muon",
        "model.layers.1.mlp.gate.weight": "adamw",  # the router
        "model.layers.1.mlp.gate.bias": "adamw",
        "model.layers.1.mlp.experts.gate_up_proj": "adamw",  # 3-D routed experts
        "model.layers.1.mlp.experts.down_proj": "adamw",
        "model.layers.1.input_layernorm.weight": "adamw",
        "model.layers.1.post_attention_layernorm.weight": "adamw",
        "model.norm.weight": "adamw",
        "lm_head.weight": "adamw",
    },
    "deepseek-v3-tiny": {
        "model.embed_tokens.weight": "adamw",
        "model.layers.0.mlp.gate_proj.weight": "muon",  # the dense first layer
        "model.layers.0.mlp.up_proj.weight": "muon",
        "model.layers.0.mlp.down_proj.weight": "muon",
        "model.layers.1.self_attn.q_a_proj.weight": "muon",
        "model.layers.1.self_attn.q_a_layernorm.weight": "adamw",
        "model.layers.1.self_attn.q_b_proj.weight": "muon",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": "muon",
        "model.layers.1.self_attn.kv_a_layernorm.weight": "adamw",
        "model.layers.1.self_attn.kv_b_proj.weight": "muon",
        "model.layers.1.self_attn.o_proj.weight": "muon",
        "model.layers.1.mlp.gate.weight": "adamw",
        "model.layers.1.mlp.experts.gate_up_proj": "adamw",
        "model.layers.1.mlp.experts.down_proj": "adamw",
        "model.layers.1.mlp.shared_experts.gate_proj.weight": "muon",
        "model.layers.1.mlp.shared_experts.up_proj.weight": "muon",
        "model.layers.1.mlp.shared_experts.down_proj.weight": "muon",
        "model.layers.1.input_layernorm.weight": "adamw",
        "model.layers.1.post_attention_layernorm.weight": "adamw",
        "model.norm.weight": "adamw",
        "lm_head.weight": "adamw",
    },
}


def build(model) -> MuonWithAdamW:
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": 0.1, "lr": 1e-2}, {"params": others, "weight_decay": 0.0, "lr": 1e-2}]
    return build_muon_with_adamw(
        model, groups, betas=(0.9, 0.95), eps=1e-8, device=torch.device("cpu"), fused=True, foreach=False,
    )


@pytest.mark.parametrize("preset", list(EXPECTED_GROUPS))
def test_which_parameters_muon_takes(preset):
    model = TinySeekForCausalLM(TinySeekConfig.from_preset(preset, vocab_size=512))
    optimizer = build(model)
    group_of = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            group_of[id(parameter)] = "muon" if group["muon"] else "adamw"
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)  # every trainable parameter exactly once
    layer_one = {name: group_of[id(p)] for name, p in names.items() if ".layers." not in name or ".layers.1." in name}
    layer_zero_mlp = {name: group_of[id(p)] for name, p in names.items() if ".layers.0.mlp." in name}
    expected = EXPECTED_GROUPS[preset]
    assert {**layer_one, **{k: v for k, v in layer_zero_mlp.items() if k in expected}} == expected
    # Every other layer is split as layer 1 is.
    for name, parameter in names.items():
        if ".layers." in name and ".layers.0." not in name:
            assert group_of[id(parameter)] == expected["model.layers.1." + name.split(".", 3)[3]]
    # torch's bf16 Muon only where bf16 matmuls are native; Float32Muon (a subclass) everywhere else.
    assert type(optimizer.muon) is (torch.optim.Muon if cpu_has_native_bf16_matmul() else Float32Muon)


def tiny_model() -> TinySeekForCausalLM:
    torch.manual_seed(0)
    return TinySeekForCausalLM(TinySeekConfig.from_preset(
        "deepseek-v3-tiny", vocab_size=128, hidden_size=32, num_attention_heads=2, intermediate_size=48,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=2,
    ))


def train_steps(model, optimizer, steps: range) -> None:
    for step in steps:
        batch = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(step))
        model(input_ids=batch[:, :-1], shift_labels=batch[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_one_step_changes_every_trainable_parameter():
    model = tiny_model().train()
    optimizer = build(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model, optimizer, range(1))
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged
    assert any(group["muon"] for group in optimizer.param_groups)
    assert all(p in optimizer.state for group in optimizer.param_groups for p in group["params"])


def test_state_round_trip_continues_bitwise():
    straight_model = tiny_model().train()
    straight = build(straight_model)
    train_steps(straight_model, straight, range(4))

    first_model = tiny_model().train()
    first = build(first_model)
    train_steps(first_model, first, range(2))
    saved_weights = {k: v.clone() for k, v in first_model.state_dict().items()}
    saved_optimizer = full_optimizer_state_dict(first_model, first)

    resumed_model = tiny_model().train()
    resumed = build(resumed_model)
    load_full_state(resumed_model, resumed, saved_weights, saved_optimizer)
    assert resumed.muon.state is resumed.state and resumed.muon.param_groups[0] is resumed.param_groups[0]
    train_steps(resumed_model, resumed, range(2, 4))
    for (name, expected), actual in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_muon_under_fsdp_is_refused():
    from tinyseek.errors import ConfigError
    from tinyseek.train import load_config

    with pytest.raises(ConfigError, match="optim.name muon: .*fsdp"):
        load_config(None, [(["optim", "name"], "muon"), (["parallel"], "fsdp")])


def test_muon_run_killed_and_resumed_is_bitwise_identical(tmp_path, tiny_corpus, tiny_trainer, final_weights):
    sections = dict(optim={"lr": 3.0e-3, "name": "muon"}, checkpoint={"every": 100})
    straight = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "straight", **sections)
    assert isinstance(straight.optimization.optimizer, MuonWithAdamW)
    assert straight.train() == 0
    first = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", **sections)
    first.train(stop_at_step=3)
    second = tiny_trainer(tmp_path, tiny_corpus, out_dir=tmp_path / "resumed", **sections)
    assert second.progress.step == 3
    assert second.train() == 0
    expected, actual = final_weights(straight.run_dir), final_weights(second.run_dir)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_the_muon_multiplier_scales_muons_groups_alone_and_needs_muon():
    from tinyseek.errors import ConfigError
    from tinyseek.train.config import OptimConfig, load_config
    from tinyseek.train.optim import build_optimizer

    model = tiny_model()
    plain = build_optimizer(model, OptimConfig(lr=1e-3, name="muon"), torch.device("cpu"))
    scaled = build_optimizer(model, OptimConfig(lr=1e-3, name="muon", lr_multipliers={"muon": 3.0}), torch.device("cpu"))
    assert [group["muon"] for group in scaled.param_groups] == [group["muon"] for group in plain.param_groups]
    for before, after in zip(plain.param_groups, scaled.param_groups):
        expected = 3.0 if before["muon"] else 1.0
        assert after["lr"] == pytest.approx(before["lr"] * expected)
        assert after["lr_scale"] == pytest.approx(before["lr_scale"] * expected)
    with pytest.raises(ConfigError, match="lr_multipliers.muon: only with optim.name muon"):
        load_config(None, [(["optim", "lr_multipliers"], {"muon": 3.0})])
