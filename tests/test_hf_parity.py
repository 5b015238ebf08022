"""Numerical agreement with transformers' own DeepseekV3 and Llama where the architectures coincide."""

import re

import pytest
import torch
from transformers import DeepseekV3ForCausalLM, LlamaForCausalLM

from tinyseek import TinySeekForCausalLM
from tinyseek.attention import attention_spec
from tinyseek.hf import from_transformers, to_transformers

# Three layers, so that a dense first layer (first_k_dense_replace=1) is followed by more than one MoE layer.
LAYERS = 3
CONVERTIBLE = {
    "mla+sigmoid-moe": (dict(attention_type="mla", ffn_type="moe", scoring_func="sigmoid", n_routed_experts=8,
                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24,
                             routed_scaling_factor=2.5), DeepseekV3ForCausalLM),
    "mla+dense": (dict(attention_type="mla", ffn_type="dense"), DeepseekV3ForCausalLM),
    "mha+dense": (dict(attention_type="mha", ffn_type="dense", num_key_value_heads=2), LlamaForCausalLM),
    # ReLU-squared gates (the speedrun's activation): transformers' twins take any ACT2FN name as hidden_act.
    "mla+sigmoid-moe+relu2": (dict(attention_type="mla", ffn_type="moe", scoring_func="sigmoid", n_routed_experts=8,
                                   num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24,
                                   hidden_act="relu2"), DeepseekV3ForCausalLM),
    "mha+dense+relu2": (dict(attention_type="mha", ffn_type="dense", hidden_act="relu2"), LlamaForCausalLM),
}


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_to_transformers_matches_logits_and_from_transformers_round_trips(name, tiny_config):
    overrides, expected_class = CONVERTIBLE[name]
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(num_hidden_layers=LAYERS, **overrides)).eval()
    with torch.no_grad():  # a trained-looking balancing bias, so selection really depends on it
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    reference = to_transformers(model)
    assert type(reference) is expected_class
    tokens = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, reference(tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        back = from_transformers(reference)
        assert torch.equal(back(tokens).logits, ours)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(attention_type="linear"), "linear attention"),
        (dict(attention_type="mla", scoring_func="softmax"), "sigmoid"),
        (dict(attention_type="mla", scoring_func="sigmoid", router_bias=True), "learnable bias"),
        (dict(attention_type="mha", ffn_type="moe"), "dense"),
        (dict(attention_type="mla", ffn_type="dense", num_nextn_predict_layers=1), "multi-token"),
    ],
)
def test_architectures_without_a_transformers_twin_are_refused_with_the_reason(overrides, reason, tiny_config):
    model = TinySeekForCausalLM(tiny_config(num_hidden_layers=LAYERS, **overrides))
    with pytest.raises(ValueError, match=reason):
        to_transformers(model)


def test_every_attention_type_converts_to_its_declared_twin_or_is_refused_with_its_declared_reason(
    tiny_config, attention_type
):
    spec = attention_spec(attention_type)
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(attention_type=attention_type, ffn_type="dense")).eval()
    if spec.no_export_reason is not None:
        with pytest.raises(ValueError, match=re.escape(spec.no_export_reason)):
            to_transformers(model)
        return
    reference = to_transformers(model)
    assert reference.config.model_type == spec.transformers_export
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=1e-4)
