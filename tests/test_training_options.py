"""The training-speed options against the plain path: selective and full activation checkpointing, and the regionally
compiled decoder layers (eager where no compiler works)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tinyseek import TinySeekForCausalLM
from tinyseek.train.compile import compile_decoder_layers
from tinyseek.train.config import load_config

# What each attention type is trained with here besides the tiny config (others: MoE with softmax routing).
EXTRAS = {
    "mla": dict(scoring_func="sigmoid", q_lora_rank=24),
    "mha": dict(ffn_type="dense"),
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


def test_selective_and_full_checkpointing_give_the_gradients_of_none(tiny_config, attention_type):
    torch.manual_seed(0)
    config = tiny_config(attention_type=attention_type, **EXTRAS.get(attention_type, {}), attention_dropout=0.1)  # dropout on: RNG replay
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
    with pytest.raises(ValueError, match="gradient_checkpointing: unknown value 'some'; choose one of 'none', 'full' or 'selective'"):
        load_config(None, [(["gradient_checkpointing"], "some")])


def test_compile_falls_back_to_eager_with_the_reason_when_no_compiler_works(tiny_config, compiler_failure):
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(attention_type="mha", **EXTRAS["mha"]))
    eager = loss_and_grads(model, *batch())
    with compiler_failure():
        path = compile_decoder_layers(model, torch.device("cpu"))
    assert path.startswith("eager (torch.compile unavailable here: ") and "C++ compiler" in path
    again = loss_and_grads(model, *batch())
    assert torch.equal(again[0], eager[0])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler (g++), which is not installed")
def test_compiled_layers_give_the_loss_and_gradients_of_eager(tiny_config, attention_type):
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=1, attention_type=attention_type, **EXTRAS.get(attention_type, {}),
                         attention_dropout=0.0)
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


@pytest.mark.parametrize("tie", [False, True])
def test_row_sparse_embedding_gradients_accumulate_to_the_dense_ones(tiny_config, tie):
    torch.manual_seed(0)
    config = tiny_config(attention_type="mla", **EXTRAS["mla"], attention_dropout=0.0, tie_word_embeddings=tie)
    models = [TinySeekForCausalLM(config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    models[1].model.embed_tokens.accumulate_sparse_gradients = True
    for model in models:
        model.train()
        for micro_batch in range(3):  # accumulation: the 2nd and 3rd embedding gradients arrive row-sparse
            (model(input_ids=batch(micro_batch)[0], shift_labels=batch(micro_batch)[1]).loss / 3).backward()
    dense, sparse = (dict(model.named_parameters()) for model in models)
    for name, parameter in dense.items():
        assert sparse[name].grad.layout == torch.strided
        torch.testing.assert_close(sparse[name].grad, parameter.grad, rtol=0, atol=1e-7, msg=name)
