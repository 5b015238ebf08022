"""DeepSeekMoE routing and auxiliary-loss-free balancing."""

import torch

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.moe import DeepSeekMoE

CONFIG = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, moe_intermediate_size=16,
    n_routed_experts=8, num_experts_per_tok=2, attention_type="mha", max_position_embeddings=64,
)


def make_moe(**overrides) -> DeepSeekMoE:
    torch.manual_seed(0)
    model = TinySeekForCausalLM(TinySeekConfig(**{**CONFIG, **overrides}))
    return model.model.layers[0].mlp


def test_bias_changes_selection_but_not_the_gating_weights():
    moe = make_moe(scoring_func="sigmoid", norm_topk_prob=False)
    tokens = torch.randn(64, 32)
    indices, weights, scores = moe.gate(tokens)
    moe.gate.e_score_correction_bias[:] = torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 0])
    biased_indices, biased_weights, biased_scores = moe.gate(tokens)
    assert (biased_indices == 0).any(dim=1).all()  # expert 0 is now always chosen
    assert not torch.equal(indices, biased_indices)
    assert torch.equal(scores, biased_scores)
    # Each gate weight is the unbiased score of the chosen expert.
    torch.testing.assert_close(biased_weights, scores.gather(1, biased_indices))


def test_vectorised_experts_equal_a_naive_per_token_loop():
    moe = make_moe(n_shared_experts=1, routed_scaling_factor=2.5, scoring_func="sigmoid")
    hidden = torch.randn(3, 5, 32)
    output, _ = moe(hidden)
    tokens = hidden.reshape(-1, 32)
    indices, weights, _ = moe.gate(tokens)
    expected = []
    for token, chosen, gate_weights in zip(tokens, indices, weights):
        total = moe.shared_experts(token)
        for expert, weight in zip(chosen.tolist(), gate_weights):
            gate, up = (moe.experts.gate_up_proj[expert] @ token).chunk(2)
            total = total + weight * (moe.experts.down_proj[expert] @ (torch.nn.functional.silu(gate) * up))
        expected.append(total)
    torch.testing.assert_close(output.reshape(-1, 32), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_bias_updates_bring_max_violation_down_on_a_skewed_router():
    moe = make_moe(scoring_func="sigmoid", router_bias=True, bias_update_speed=0.01).train()
    with torch.no_grad():
        moe.gate.bias.copy_(torch.tensor([3.0, 2.5, 0, 0, 0, 0, 0, 0]))  # most tokens prefer experts 0 and 1
    hidden = torch.randn(1, 512, 32)
    violations = []
    for _ in range(300):
        with torch.no_grad():
            moe(hidden)
        moe.update_load_balance_bias()
        violations.append(moe.max_violation())
    assert violations[0] > 2.0
    assert max(violations[-20:]) < 0.25 * violations[0]
    assert abs(float(moe.gate.e_score_correction_bias.mean())) < 1e-6


def test_counts_from_micro_batches_with_one_update_equal_one_full_batch():
    torch.manual_seed(0)
    batch = torch.randint(0, 97, (8, 12))
    results = []
    for micro_batches, checkpointing in ((8, False), (8, True), (1, False)):
        torch.manual_seed(0)
        model = TinySeekForCausalLM(TinySeekConfig(**CONFIG)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        for micro in batch.chunk(micro_batches):
            model(micro, labels=micro).loss.backward()
        counts = [c.clone() for c in model.expert_load_counts()]
        assert sum(c.sum() for c in counts) == 2 * 8 * 12 * 2  # layers x tokens x top-k
        model.update_load_balance_bias()
        biases = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
        results.append((counts, biases))
        assert all(c.sum() == 0 for c in model.expert_load_counts())
    for counts, biases in results[1:]:
        for a, b in zip(counts + biases, results[0][0] + results[0][1]):
            assert torch.equal(a, b)


def test_evaluation_forwards_do_not_count():
    moe = make_moe().eval()
    moe(torch.randn(1, 4, 32))
    assert moe.expert_counts.sum() == 0


def test_sequence_balance_loss_is_added_when_enabled():
    torch.manual_seed(0)
    model = TinySeekForCausalLM(TinySeekConfig(**CONFIG, seq_aux_loss_coef=0.01)).train()
    tokens = torch.randint(0, 97, (2, 10))
    out = model(tokens, labels=tokens)
    assert out.balance_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.balance_loss)
    out.loss.backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0
