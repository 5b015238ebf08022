"""DeepSeekMoE routing and auxiliary-loss-free balancing."""

import pytest
import torch

from tinyseek import TinySeekForCausalLM
from tinyseek.moe import DeepSeekMoE

# Eight routed experts behind softmax attention: enough experts for imbalance to show.
MOE = dict(attention_type="mha", n_routed_experts=8)


@pytest.fixture
def make_moe(tiny_config):
    """``make_moe(**overrides)``: the first MoE layer of a freshly initialised tiny model (seed 0)."""

    def build(**overrides) -> DeepSeekMoE:
        torch.manual_seed(0)
        return TinySeekForCausalLM(tiny_config(**MOE, **overrides)).model.layers[0].mlp

    return build


def test_bias_changes_selection_but_not_the_gating_weights(make_moe):
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


def test_vectorised_experts_equal_a_naive_per_token_loop(make_moe):
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


def test_bias_updates_bring_max_violation_down_on_a_skewed_router(make_moe):
    # Sign updates of a fixed speed settle into a small cycle whose size depends on the draw; vocab_size=97 keeps
    # the draw (router weights, then the hidden states) this test's bounds were set on.
    moe = make_moe(scoring_func="sigmoid", router_bias=True, bias_update_speed=0.01, vocab_size=97).train()
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


def test_counts_from_micro_batches_with_one_update_equal_one_full_batch(tiny_config):
    torch.manual_seed(0)
    batch = torch.randint(0, 97, (8, 12))
    results = []
    for micro_batches, checkpointing in ((8, False), (8, True), (1, False)):
        torch.manual_seed(0)
        model = TinySeekForCausalLM(tiny_config(**MOE)).train()
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


def test_evaluation_forwards_do_not_count(make_moe):
    moe = make_moe().eval()
    moe(torch.randn(1, 4, 32))
    assert moe.expert_counts.sum() == 0


def test_sequence_balance_loss_is_added_when_enabled(tiny_config):
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(**MOE, seq_aux_loss_coef=0.01)).train()
    tokens = torch.randint(0, 97, (2, 10))
    out = model(tokens, labels=tokens)
    assert out.balance_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.balance_loss)
    out.loss.backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0
