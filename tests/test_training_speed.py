"""The training-speed options against the plain path: selective and full activation checkpointing, and the regionally
compiled decoder layers (eager where no compiler works)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest
import torch

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.train.compile import compile_decoder_layers
from tinyseek.train.config import load_config

TINY = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
    moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, linear_attention_chunk_size=4,
)
ATTENTION_TYPES = {
    "linear": dict(attention_type="linear", ffn_type="moe"),
    "mla": dict(attention_type="mla", ffn_type="moe", scoring_func="sigmoid", q_lora_rank=24),
    "mha": dict(attention_type="mha", ffn_type="dense"),
}


def loss_and_grads(model, tokens, targets, seed=0):
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for every variant
    out = model(input_ids=tokens, shift_labels=targets)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (2, 12), generator=generator), torch.randint(0, 97, (2, 12), generator=generator)


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_selective_and_full_checkpointing_give_the_gradients_of_none(attention):
    torch.manual_seed(0)
    config = TinySeekConfig(**TINY, **ATTENTION_TYPES[attention], attention_dropout=0.1)  # dropout on: RNG replay
    tokens, targets = batch()
    results = {}
    for mode in ("none", "full", "selective"):
        model = TinySeekForCausalLM(config)
        model.load_state_dict(TinySeekForCausalLM(config).state_dict() if not results else reference_state)
        if not results:
            reference_state = model.state_dict()
        if mode != "none":
            model.activation_checkpointing_enable(selective=mode == "selective")
        results[mode] = loss_and_grads(model, tokens, targets)
        counts = [moe.expert_counts.sum().item() for moe in model.moe_layers()]
        assert counts == [2 * 12 * 2] * len(counts)  # recomputation in backward does not count tokens twice
    loss, grads = results["none"]
    for mode in ("full", "selective"):
        torch.testing.assert_close(results[mode][0], loss, rtol=0, atol=1e-6)
        assert results[mode][1].keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(results[mode][1][name], grads[name], rtol=0, atol=1e-6, msg=f"{mode} {name}")


def test_checkpointing_config_accepts_modes_and_the_old_booleans():
    assert load_config(None, [(["gradient_checkpointing"], True)]).gradient_checkpointing == "full"
    assert load_config(None, [(["gradient_checkpointing"], False)]).gradient_checkpointing == "none"
    assert load_config(None, [(["gradient_checkpointing"], "selective")]).gradient_checkpointing == "selective"
    with pytest.raises(ValueError, match="gradient_checkpointing: unknown mode 'some'"):
        load_config(None, [(["gradient_checkpointing"], "some")])


@contextmanager
def compiler_failure():
    """A C++ compiler that does not exist, and no cached kernels to hide it."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        yield
    torch._dynamo.reset()


def test_compile_falls_back_to_eager_with_the_reason_when_no_compiler_works():
    torch.manual_seed(0)
    model = TinySeekForCausalLM(TinySeekConfig(**TINY, **ATTENTION_TYPES["mha"]))
    eager = loss_and_grads(model, *batch())
    with compiler_failure():
        path = compile_decoder_layers(model, torch.device("cpu"))
    assert path.startswith("eager (torch.compile unavailable here: ") and "C++ compiler" in path
    again = loss_and_grads(model, *batch())
    assert torch.equal(again[0], eager[0])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler (g++), which is not installed")
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_compiled_layers_give_the_loss_and_gradients_of_eager(attention):
    torch.manual_seed(0)
    config = TinySeekConfig(**{**TINY, "num_hidden_layers": 1}, **ATTENTION_TYPES[attention], attention_dropout=0.0)
    model = TinySeekForCausalLM(config)
    tokens, targets = batch()
    eager_loss, eager_grads = loss_and_grads(model, tokens, targets)
    path = compile_decoder_layers(model, torch.device("cpu"))
    assert "compiled" in path, path
    compiled_loss, compiled_grads = loss_and_grads(model, tokens, targets)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    model.eval()  # evaluation keeps the eager forward: no recompilation for its shapes
    with torch.no_grad():
        model(input_ids=tokens)
