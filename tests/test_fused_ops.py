"""The fast training paths of tinyseek.ops against the plain PyTorch computation they replace."""

import pytest
import torch
import torch.nn.functional as F

from tinyseek import TinySeekForCausalLM, ops
from tinyseek.modeling import cross_entropy

def plain_loss(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(), ignore_index=-100)


def loss_and_grads(fn, hidden, weight, targets, scale=1.0, autocast=False):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(hidden, weight, targets)
    (scale * loss).backward()
    return loss.detach(), hidden.grad, weight.grad


def inputs(tokens=70, hidden=24, vocab=301, ignored_every=5):
    torch.manual_seed(0)
    targets = torch.randint(0, vocab, (2, tokens))
    targets[:, ::ignored_every] = -100
    return torch.randn(2, tokens, hidden), torch.randn(vocab, hidden) * 0.5, targets


@pytest.mark.parametrize("chunk_rows", [1, 16, 64, 1000])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_fused_linear_cross_entropy_matches_the_plain_path_in_fp32(chunk_rows, scale):
    hidden, weight, targets = inputs()
    fused = lambda h, w, t: ops.linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)  # noqa: E731
    expected = loss_and_grads(plain_loss, hidden, weight, targets, scale)
    for got, want in zip(loss_and_grads(fused, hidden, weight, targets, scale), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [16, 1000], ids=["chunked", "one-chunk-deferred"])
def test_fused_z_loss_matches_autograd_of_the_plain_objective_and_reports_the_plain_cross_entropy(chunk_rows):
    hidden, weight, targets = inputs()
    coef = 0.05  # large enough that its gradient shows

    def plain_objective(h, w, t):
        logits = F.linear(h, w).float().flatten(0, -2)
        counted = t.flatten() != -100
        return plain_loss(h, w, t) + coef * logits.logsumexp(-1)[counted].square().mean()

    reported = []

    def fused(h, w, t):
        objective, cross_entropy = ops.linear_cross_entropy_with_z_loss(h, w, t, coef, chunk_rows=chunk_rows)
        reported.append(cross_entropy)
        return objective

    expected = loss_and_grads(plain_objective, hidden, weight, targets, 0.5)
    for got, want in zip(loss_and_grads(fused, hidden, weight, targets, 0.5), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reported[0], plain_loss(hidden, weight, targets), rtol=1e-6, atol=1e-6)
    assert not reported[0].requires_grad


@pytest.mark.parametrize("chunk_rows", [16, 1000], ids=["chunked", "one-chunk-deferred"])
@pytest.mark.parametrize("z_loss_coef", [0.0, 0.05])
def test_fused_soft_capped_loss_matches_autograd_of_the_plain_soft_capped_objective(chunk_rows, z_loss_coef):
    hidden, weight, targets = inputs()
    cap = 2.0  # below the logits' spread (about 2.4), so the cap bends them

    def plain_objective(h, w, t):
        logits = ops.soft_capped(F.linear(h, w).float(), cap).flatten(0, -2)
        counted = t.flatten() != -100
        cross_entropy_ = F.cross_entropy(logits, t.flatten(), ignore_index=-100)
        return cross_entropy_ + z_loss_coef * logits.logsumexp(-1)[counted].square().mean()

    def fused(h, w, t):
        return ops.linear_cross_entropy_with_z_loss(h, w, t, z_loss_coef, chunk_rows=chunk_rows, softcap=cap)[0]

    expected = loss_and_grads(plain_objective, hidden, weight, targets, 0.5)
    assert not torch.allclose(expected[0], loss_and_grads(plain_loss, hidden, weight, targets)[0])
    for got, want in zip(loss_and_grads(fused, hidden, weight, targets, 0.5), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu-check", "accelerator-form"])
def test_fused_linear_cross_entropy_is_exact_for_far_off_targets(monkeypatch, sync_free):
    # The accelerator form (no host synchronisation per chunk) runs here on the CPU by declaring syncs expensive.
    monkeypatch.setattr(ops, "host_sync_is_cheap", lambda device: not sync_free)
    hidden, weight, targets = inputs(tokens=8)
    weight = weight * 200  # logit gaps of thousands: softmax probabilities of the targets underflow to 0
    expected = loss_and_grads(plain_loss, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, t: ops.linear_cross_entropy(h, w, t, chunk_rows=4), hidden, weight, targets)
    assert torch.isfinite(got[0])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("native", [False, True])
def test_fused_linear_cross_entropy_under_bf16_autocast_is_close_to_the_plain_path(monkeypatch, native):
    monkeypatch.setattr(ops, "cpu_has_native_bf16_matmul", lambda: native)
    hidden, weight, targets = inputs()
    fused = lambda h, w, t: ops.linear_cross_entropy(h, w, t, chunk_rows=32)  # noqa: E731
    got = loss_and_grads(fused, hidden, weight, targets, autocast=True)
    expected = loss_and_grads(plain_loss, hidden, weight, targets, autocast=True)
    exact = loss_and_grads(plain_loss, hidden, weight, targets)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=1e-2, atol=0)
    for g, e, x in zip(got[1:], expected[1:], exact[1:]):
        assert g.dtype == torch.float32
        # As close to the fp32 gradients as autocast's own path is (bf16 operands), within a few bf16 ulps.
        assert (g - x).norm() <= 2 * (e - x).norm() + 1e-6
        torch.testing.assert_close(g, e, rtol=0, atol=0.02 * e.abs().max().item())


@pytest.mark.parametrize("autocast", ["fp32", "bf16-emulated", "bf16-native"])
@pytest.mark.parametrize("defer", [False, True])
def test_an_accumulation_window_shares_one_head_operand_and_gives_the_same_gradients(monkeypatch, autocast, defer):
    monkeypatch.setattr(ops, "cpu_has_native_bf16_matmul", lambda: autocast == "bf16-native")
    hidden, weight, targets = inputs(tokens=16)
    weight = weight.requires_grad_()

    def backward_both_micro_batches(memory=None):
        weight.grad = None
        for micro_batch in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast != "fp32"):
                ops.linear_cross_entropy(
                    hidden[micro_batch], weight, targets[micro_batch], chunk_rows=32, memory=memory
                ).backward()

    backward_both_micro_batches()
    separately = weight.grad.clone()
    memory = ops.StepMemory(tune_allocator=False)
    with memory.gradient_accumulation(defer_head_gradients=defer):
        backward_both_micro_batches(memory)
        assert (weight.grad is None) == defer  # deferred: left to the end of the window
        assert len(memory.window.operands) == (autocast != "fp32")  # one head copy for both micro-batches
    assert memory.window is None
    if defer:  # one GEMM over both micro-batches' rows, rounded once instead of twice under bf16
        tolerance = 1e-6 if autocast == "fp32" else 0.01 * separately.abs().max().item()
        torch.testing.assert_close(weight.grad, separately, rtol=0, atol=tolerance)
    else:
        assert torch.equal(weight.grad, separately)


def test_fused_linear_cross_entropy_without_grad_returns_the_loss_only():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_cross_entropy(hidden, weight, targets), plain_loss(hidden, weight, targets))


def test_emulated_bf16_linear_equals_autocast_linear(monkeypatch):
    monkeypatch.setattr(ops, "cpu_has_native_bf16_matmul", lambda: False)
    torch.manual_seed(0)
    layer = ops.Linear(24, 40, bias=True)
    x = torch.randn(3, 7, 24, requires_grad=True)
    results = []
    for fn in (layer, lambda v: F.linear(v, layer.weight, layer.bias)):
        x.grad = layer.weight.grad = layer.bias.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x)
        out.float().square().sum().backward()
        results.append((out, x.grad, layer.weight.grad, layer.bias.grad))
    (out, *grads), (ref, *ref_grads) = results
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)  # both bf16 roundings of one sum
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=0, atol=0.02 * r.abs().max().item())


def model_loss_and_grads(model, tokens, targets, fused, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if fused:
            out = model.train()(input_ids=tokens, shift_labels=targets)
            assert out.logits is None
        else:  # the plain path: full logits, F.cross_entropy
            model.train()
            outputs = model.model(input_ids=tokens)
            out_loss = cross_entropy(model.head_logits(outputs.last_hidden_state), targets)
            if outputs.balance_loss is not None:
                out_loss = out_loss + outputs.balance_loss
            out = type("Out", (), {"loss": out_loss})
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ffn_type, softcap", [("moe", None), ("dense", None), ("moe", 0.5)])
def test_model_training_loss_and_gradients_match_the_plain_path(attention_type, ffn_type, softcap, tiny_config):
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(attention_type=attention_type, ffn_type=ffn_type, scoring_func="sigmoid",
                                            seq_aux_loss_coef=0.01, final_logit_softcapping=softcap))
    tokens, targets = torch.randint(0, 257, (2, 13)), torch.randint(0, 257, (2, 13))
    targets[0, -3:] = -100
    fast_loss, fast = model_loss_and_grads(model, tokens, targets, fused=True)
    plain_loss_, plain = model_loss_and_grads(model, tokens, targets, fused=False)
    torch.testing.assert_close(fast_loss, plain_loss_, rtol=1e-5, atol=1e-6)
    assert fast.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_training_under_bf16_autocast_stays_close_to_the_plain_path(monkeypatch, tiny_config):
    monkeypatch.setattr(ops, "cpu_has_native_bf16_matmul", lambda: False)
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(attention_type="mla", scoring_func="sigmoid"))
    tokens, targets = torch.randint(0, 257, (2, 13)), torch.randint(0, 257, (2, 13))
    fast_loss, fast = model_loss_and_grads(model, tokens, targets, fused=True, autocast=True)
    monkeypatch.setattr(ops, "cpu_has_native_bf16_matmul", lambda: True)  # torch's own bf16 kernels
    plain_loss_, plain = model_loss_and_grads(model, tokens, targets, fused=False, autocast=True)
    torch.testing.assert_close(fast_loss, plain_loss_, rtol=1e-2, atol=0)
    for name in plain:
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(fast[name], plain[name], rtol=0, atol=0.05 * scale + 1e-8, msg=name)


def test_mla_training_attention_with_padded_values_equals_unpadded_sdpa(tiny_config):
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(attention_type="mla")).eval()
    attention = model.model.layers[0].self_attn
    q_nope, q_rope = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 4)
    latent, k_rope = torch.randn(2, 1, 9, 16), torch.randn(2, 1, 9, 4)
    got = attention.expanded_attention(q_nope, q_rope, latent, k_rope, None, 0.0)
    kv = attention.kv_b_proj(latent.squeeze(1)).view(2, 9, 4, -1).transpose(1, 2)
    k_nope, value = kv.split([8, 8], dim=-1)
    key = torch.cat((k_nope, k_rope.expand(-1, 4, -1, -1)), dim=-1)
    expected = F.scaled_dot_product_attention(torch.cat((q_nope, q_rope), -1), key, value, is_causal=True,
                                              scale=attention.scale)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fused_loss_cannot_be_back_propagated_twice():
    hidden, weight, targets = inputs()
    hidden.requires_grad_()
    loss = ops.linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def unfused_linear(x, layers):
    return tuple(layer(x) for layer in layers)


@pytest.mark.parametrize("attention_type, ffn_type, extra", [
    ("linear", "moe", {}),
    ("mla", "moe", dict(q_lora_rank=24, n_shared_experts=1, first_k_dense_replace=1)),
    ("mla", "dense", {}),
    ("mha", "dense", dict(num_key_value_heads=2)),
    ("mha", "moe", dict(attention_bias=True)),
])
def test_fused_projections_and_dense_dispatch_match_separate_layers_and_routed_experts(
    monkeypatch, tiny_config, attention_type, ffn_type, extra
):
    """One GEMM for q/k/v (or the two MLA projections of x) and for gate/up, and every-expert dispatch for few
    tokens, against separate nn.Linear calls and per-expert routed matmuls: logits and gradients within 1e-6."""
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(**extra, attention_type=attention_type, ffn_type=ffn_type,
                                            scoring_func="sigmoid"))
    with torch.no_grad():  # non-zero biases, so their place in the fused bias matters
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    tokens, targets = torch.randint(0, 257, (2, 13)), torch.randint(0, 257, (2, 13))

    def logits_and_grads():
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
        return (logits, *model_loss_and_grads(model, tokens, targets, fused=True))

    fused_logits, fused_loss, fused = logits_and_grads()
    from tinyseek import moe
    from tinyseek.attention import latent, linear, multi_head

    for module in (latent, linear, multi_head, moe):
        monkeypatch.setattr(module, "fused_linear", unfused_linear)
    monkeypatch.setattr(moe, "DENSE_DISPATCH_MAX_ROWS", 0)
    plain_logits, plain_loss_, plain = logits_and_grads()
    torch.testing.assert_close(fused_logits, plain_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused_loss, plain_loss_, rtol=0, atol=1e-6)
    assert fused.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_fused_projections_keep_the_stored_parameter_names(tiny_config):
    """Checkpoints written before the projections were fused load unchanged: the state dict has the same names."""
    for attention_type in ("linear", "mla", "mha"):
        names = set(TinySeekForCausalLM(tiny_config(attention_type=attention_type)).state_dict())
        attention_names = {"linear": ("q_proj", "k_proj", "v_proj"), "mha": ("q_proj", "k_proj", "v_proj"),
                           "mla": ("q_proj", "kv_a_proj_with_mqa")}[attention_type]
        for projection in attention_names:
            assert f"model.layers.0.self_attn.{projection}.weight" in names
        assert not any("qkv" in name or "fused" in name for name in names)


def test_training_and_validation_losses_agree_on_the_same_batch_in_fp32(tiny_model, attention_type):
    """Training takes the fused chunked head, validation (eval mode) the full logits: one loss, within 1e-5."""
    model = tiny_model(attention_type=attention_type, seq_aux_loss_coef=0.01)
    tokens = torch.randint(0, 257, (3, 21))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, -4:] = -100
    training = model.train()(input_ids=inputs, shift_labels=targets)
    assert training.logits is None  # the fused path
    with torch.no_grad():
        validation = model.eval()(input_ids=inputs, shift_labels=targets)
    assert validation.logits is not None
    torch.testing.assert_close(training.lm_loss.detach(), validation.lm_loss, rtol=0, atol=1e-5)
