"""The model: the seed's exact shape, causality, cached decoding against full forwards, and the Hugging Face API."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinyseek import TinySeekConfig, TinySeekForCausalLM, parameter_report
from tinyseek.attention import ATTENTION_REGISTRY, AttentionSpec, TinySeekCache, register_attention

def test_seed_preset_has_exactly_the_seed_parameter_count_and_structure():
    model = TinySeekForCausalLM(TinySeekConfig.from_preset("seed"))
    assert parameter_report(model)["total"] == 10_095_760
    printed = str(model)
    assert "(embed_tokens): Embedding(32256, 128)" in printed
    assert "(0-3): 4 x DecoderLayer(" in printed
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"({projection}): Linear(in_features=128, out_features=128, bias=False)" in printed
    assert "Dropout(p=0.1" in printed
    assert "(gate): Router(in_features=128, out_features=4, bias=True)" in printed
    assert "num_experts=4, SwiGLU gate/up 128->256, down 256->128, bias=False" in printed
    assert "(input_layernorm): RMSNorm(128, eps=1e-06)" in printed
    assert "(post_attention_layernorm): RMSNorm(128, eps=1e-06)" in printed
    assert "(norm): RMSNorm(128, eps=1e-06)" in printed
    assert "(lm_head): Linear(in_features=128, out_features=32256, bias=False)" in printed
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * 256, 128) and experts.down_proj.shape == (4, 128, 256)


def test_parameter_report_counts_only_chosen_routed_experts_as_active(tiny_model):
    model = tiny_model(n_shared_experts=1)
    report = parameter_report(model)
    routed_per_layer = sum(p.numel() for p in model.model.layers[0].mlp.experts.parameters())
    assert report["total"] - report["active_per_token"] == 2 * routed_per_layer // 2  # top-2 of 4 in 2 layers
    assert report["embedding"] == 2 * 257 * 32
    assert report["non_embedding"] == report["total"] - report["embedding"]


def test_changing_later_tokens_leaves_earlier_logits_unchanged(attention_type, tiny_model):
    model = tiny_model(attention_type=attention_type)
    tokens = torch.randint(0, 101, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = torch.randint(0, 101, (2, 5))
    with torch.no_grad():
        original, perturbed = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(original[:, :7], perturbed[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(original[:, 7:], perturbed[:, 7:])


def test_token_by_token_cached_decoding_equals_the_full_forward(attention_type, tiny_model):
    model = tiny_model(attention_type=attention_type)
    tokens = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        full = model(tokens).logits
        cache, stepwise = None, []
        for t in range(tokens.shape[1]):
            out = model(tokens[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            stepwise.append(out.logits)
        prefix = model(tokens[:, :6], use_cache=True)
        rest = model(tokens[:, 6:], cache=prefix.cache, use_cache=True)
    torch.testing.assert_close(torch.cat(stepwise, 1), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([prefix.logits, rest.logits], 1), full, rtol=0, atol=1e-5)


def test_linear_attention_cache_is_a_fixed_size_state(tiny_model):
    model = tiny_model(attention_type="linear")
    with torch.no_grad():
        out = model(torch.randint(0, 101, (1, 9)), use_cache=True)
        sizes = [(layer.state.shape, layer.normalizer.shape) for layer in out.cache.layers]
        out = model(torch.randint(0, 101, (1, 1)), cache=out.cache, use_cache=True)
    assert sizes == [(layer.state.shape, layer.normalizer.shape) for layer in out.cache.layers]
    assert sizes[0] == ((1, 4, 8, 8), (1, 4, 8))
    assert out.cache.get_seq_length() == 10


def test_mla_cache_holds_only_the_latent_and_the_shared_rope_key(tiny_model):
    model = tiny_model(attention_type="mla", q_lora_rank=12)
    with torch.no_grad():
        out = model(torch.randint(0, 101, (3, 7)), use_cache=True)
    assert isinstance(out.cache, TinySeekCache)
    for layer in out.cache.layers:
        per_token = sum(t.shape[-1] for t in (layer.keys, layer.values))
        assert per_token == model.config.kv_lora_rank + model.config.qk_rope_head_dim
        assert layer.keys.shape == (3, 1, 7, model.config.kv_lora_rank) and layer.values.shape == (3, 1, 7, 4)


def test_generate_with_cache_equals_greedy_recomputation(attention_type, tiny_model):
    model = tiny_model(attention_type=attention_type)
    prompt = torch.randint(0, 101, (2, 5))
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, sequence)


def test_save_pretrained_then_from_pretrained_and_automodel_give_identical_logits(tmp_path, tiny_model):
    model = tiny_model(attention_type="mla")
    with torch.no_grad():
        model.moe_layers()[0].gate.e_score_correction_bias.copy_(torch.tensor([0.1, -0.1, 0.05, -0.05]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    tokens = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        expected = model(tokens).logits
        for loaded in (TinySeekForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
            assert isinstance(loaded, TinySeekForCausalLM)
            assert torch.equal(loaded.eval()(tokens).logits, expected)


def test_tied_embeddings_share_one_tensor(tiny_model):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert parameter_report(model)["embedding"] == 257 * 32


def test_prompt_longer_than_positions_is_refused(tiny_model):
    model = tiny_model(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_multi_token_prediction_adds_a_weighted_loss_without_touching_the_logits(tiny_model):
    model = tiny_model(num_nextn_predict_layers=1, mtp_loss_weight=0.5).train()
    tokens = torch.randint(0, 101, (2, 10))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model(input_ids=inputs, shift_labels=targets)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mtp_loss)
    out.loss.backward()
    assert model.mtp[0].projection.weight.grad.abs().sum() > 0
    # Depth 1 predicts the token two ahead: recompute it from the module's parts.
    hidden = model.model(inputs).pre_norm_hidden_state
    rotary = model.model.rotary_emb(torch.arange(8)[None]) if model.model.rotary_emb is not None else None
    _, normed, _ = model.mtp[0](hidden[:, :8], model.model.embed_tokens(inputs[:, 1:]), rotary)
    expected = torch.nn.functional.cross_entropy(model.lm_head(normed).flatten(0, 1), targets[:, 1:].flatten())
    torch.testing.assert_close(out.mtp_loss, expected)
    model.eval()
    with torch.no_grad():
        before = model(inputs).logits
        model.mtp[0].projection.weight.add_(1.0)
        assert torch.equal(model(inputs).logits, before)


def test_z_loss_joins_the_training_loss_only_and_a_zero_initialised_head_starts_uniform(tiny_model):
    model = tiny_model(z_loss_coef=1e-2, zero_init_lm_head=True, ffn_type="dense").train()
    assert torch.equal(model.lm_head.weight, torch.zeros_like(model.lm_head.weight))
    assert model.model.embed_tokens.weight.abs().sum() > 0
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # a head whose log-partition is far from log(vocab)
    tokens = torch.randint(0, 101, (2, 10))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model(input_ids=inputs, shift_labels=targets)
    logits = model.lm_head(model.model(inputs).last_hidden_state).float().flatten(0, 1)
    torch.testing.assert_close(out.lm_loss, torch.nn.functional.cross_entropy(logits, targets.flatten()))
    torch.testing.assert_close(out.loss, out.lm_loss + 1e-2 * logits.logsumexp(-1).square().mean())
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=inputs, shift_labels=targets)
    torch.testing.assert_close(evaluated.loss, evaluated.lm_loss)


BAD_CONFIGS = [
    ({"hidden_size": 30, "attention_type": "mha"}, "hidden_size"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"attention_type": "flash"}, "attention_type"),
    ({"ffn_type": "conv"}, "ffn_type"),
    ({"hidden_size": -8}, "hidden_size"),
    ({"n_routed_experts": 0}, "n_routed_experts"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"qk_rope_head_dim": 3}, "qk_rope_head_dim"),
    ({"attention_type": "mha", "num_key_value_heads": 3}, "num_key_value_heads"),
    ({"scoring_func": "tanh"}, "scoring_func"),
    ({"num_experts_per_tok": 1, "norm_topk_prob": True}, "norm_topk_prob"),
    ({"attention_dropout": 1.5}, "attention_dropout"),
    ({"bias_update_speed": -1.0}, "bias_update_speed"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"hidden_act": "gelu_new"}, "hidden_act"),
    ({"z_loss_coef": -1e-4}, "z_loss_coef"),
    ({"zero_init_lm_head": True, "tie_word_embeddings": True}, "zero_init_lm_head"),
    ({"final_logit_softcapping": 0.0}, "final_logit_softcapping"),
]


@pytest.mark.parametrize("overrides, field", BAD_CONFIGS)
def test_bad_config_raises_value_error_naming_the_field(overrides, field, tiny_config):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        tiny_config(**overrides)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset"):
        TinySeekConfig.from_preset("gpt-5")


@pytest.mark.parametrize("name", ["seed", "deepseek-v3-tiny", "llama-tiny"])
def test_presets_build_and_run(name):
    config = TinySeekConfig.from_preset(name, vocab_size=512)
    model = TinySeekForCausalLM(config).eval()
    tokens = torch.randint(0, 512, (1, 16))
    out = model(tokens, labels=tokens)
    assert torch.isfinite(out.loss) and out.logits.shape == (1, 16, 512)


def test_registering_an_attention_type_without_a_declaration_is_refused():
    with pytest.raises(TypeError, match="registered without an AttentionSpec"):
        register_attention("undeclared")
    with pytest.raises(TypeError, match="missing .* required"):
        AttentionSpec(cache_layer=lambda config: None, rotary_dim=lambda config: None)  # the rest left out
    assert "undeclared" not in ATTENTION_REGISTRY


def test_an_unknown_attention_type_is_refused_naming_the_registered_ones(tiny_config):
    with pytest.raises(ValueError, match=r"^attention_type: unknown attention type 'flash'.*'mla'"):
        tiny_config(attention_type="flash")


@pytest.mark.parametrize("ffn_type", ["moe", "dense"])
def test_packed_documents_equal_each_document_run_alone(attention_type, ffn_type, tiny_model):
    """Chat fine-tuning packs conversations into one window: with document_ids, each document's logits (and the MTP
    loss's inputs) are those of the document alone: no attention across a boundary, positions from 0, linear
    attention's state restarted. Lengths 7, 3 and 12 cross the tiny config's chunk (4) and window (5) both ways."""
    model = tiny_model(attention_type=attention_type, ffn_type=ffn_type, num_nextn_predict_layers=1)
    lengths = [7, 3, 12]
    documents = [torch.randint(0, 257, (1, length)) for length in lengths]
    packed = torch.cat(documents, dim=1)
    document_ids = torch.cat([torch.full((1, length), index) for index, length in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = model(packed, document_ids=document_ids).logits
        alone = torch.cat([model(document).logits for document in documents], dim=1)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    unpacked = model(packed).logits.detach()
    assert not torch.allclose(unpacked[:, lengths[0]:], alone[:, lengths[0]:], atol=1e-3)  # the ids do matter

    # Training on the packed window: each document's loss alone, weighted by its targets, is the packed loss.
    model.train()
    torch.manual_seed(0)
    targets = torch.cat([torch.cat([d[:, 1:], torch.full((1, 1), -100)], dim=1) for d in documents], dim=1)
    packed_loss = model(packed, shift_labels=targets, document_ids=document_ids).lm_loss
    alone_losses = [model(d, shift_labels=torch.cat([d[:, 1:], torch.full((1, 1), -100)], dim=1)).lm_loss for d in documents]
    weights = torch.tensor([length - 1 for length in lengths], dtype=torch.float)
    torch.testing.assert_close(packed_loss, (torch.stack(alone_losses) * weights).sum() / weights.sum(), rtol=0, atol=1e-5)


def test_document_ids_refuse_a_cache(tiny_model):
    model = tiny_model(attention_type="mha")
    tokens = torch.randint(0, 257, (1, 6))
    prefix = model(tokens[:, :3], use_cache=True)
    with pytest.raises(ValueError, match="document_ids"):
        model(tokens[:, 3:], cache=prefix.cache, use_cache=True, document_ids=torch.zeros(1, 3, dtype=torch.long))


def test_a_subclass_never_decodes_with_its_parents_step_by_accident():
    from tinyseek.attention.multi_head import MultiHeadAttention

    spec = ATTENTION_REGISTRY["mha"]

    class Subclass(MultiHeadAttention):
        pass

    with pytest.raises(TypeError, match="would decode with its parent's MultiHeadAttentionStep"):
        register_attention("accidental", spec)(Subclass)
    assert "accidental" not in ATTENTION_REGISTRY
    register_attention("declared-valid", replace(spec, parent_decode_step_is_valid=True))(Subclass)
    try:
        assert ATTENTION_REGISTRY["declared-valid"].decode_step is spec.decode_step
    finally:
        del ATTENTION_REGISTRY["declared-valid"]
