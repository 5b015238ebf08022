"""Generation: cached decoding (tinyseek's own loop and model.generate) against recomputation, MLA's compressed cache,
sampling, stop strings, streaming text, and the `tinyseek generate` command."""

import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from tinyseek.testing import EQUALITY_TIE, greedy_by_recomputation
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationMixin

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.cli import main as tinyseek_main
from tinyseek.generate import GenerationEngine, Sampling, TextStream, left_pad

PROMPTS = [[5, 17, 99], [40, 41, 42, 43, 44, 45, 46, 47], [200, 3, 3, 150, 7]]
TIE = EQUALITY_TIE


pytestmark = pytest.mark.usefixtures("one_thread")



def assert_same_greedy(model, prompts, ours: list[list[int]], theirs: list[list[int]]) -> None:
    """The equality rule (docs/generation.md): token for token, up to the reference's first near-tie."""
    for prompt, mine, reference in zip(prompts, ours, theirs, strict=True):
        differ = next((i for i, (a, b) in enumerate(zip(mine, reference)) if a != b), None)
        if differ is None:
            assert len(mine) == len(reference)
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + reference[:differ]])).logits[0, -1]
        gap = (logits[mine[differ]] - logits[reference[differ]]).abs().item()
        assert gap <= TIE, f"token {differ} differs ({mine[differ]} vs {reference[differ]}) without a near-tie: {gap}"


def greedy(engine: GenerationEngine, prompts, new_tokens: int) -> list[list[int]]:
    return [completion.token_ids for completion in engine.generate(prompts, Sampling(temperature=0), new_tokens)]


@pytest.mark.parametrize("ffn_type", ["moe", "dense"])
def test_lean_previous_and_transformers_paths_equal_recomputation_batched_and_alone(
    attention_type, ffn_type, tiny_model
):
    # Seed 2 has no near-tie in any of these models' first ten greedy steps (greedy_by_recomputation checks).
    model = tiny_model(2, attention_type=attention_type, ffn_type=ffn_type, q_lora_rank=12 if ffn_type == "dense" else None)
    new_tokens = 10
    expected = [greedy_by_recomputation(model, prompt, new_tokens) for prompt in PROMPTS]
    lean, previous = GenerationEngine(model, eos_token_ids=[]), GenerationEngine(model, eos_token_ids=[], decoder="model-forward")
    assert greedy(lean, PROMPTS, new_tokens) == expected
    assert lean.path == "lean step"  # every registered type declares its decode step: no silent slow path
    assert greedy(previous, PROMPTS, new_tokens) == expected
    assert [greedy(lean, [prompt], new_tokens)[0] for prompt in PROMPTS] == expected
    input_ids, attention_mask = left_pad(PROMPTS, pad_token_id=0)
    theirs = transformers_generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert theirs[:, input_ids.shape[1]:].tolist() == expected


def test_lean_step_handles_grouped_query_heads_biases_shared_experts_and_a_dense_first_layer(
    attention_type, tiny_model
):
    overrides = dict(num_key_value_heads=2, attention_bias=True, n_shared_experts=1, first_k_dense_replace=1, scoring_func="sigmoid",
                     hidden_act="relu2")
    model = tiny_model(2, attention_type=attention_type, **overrides)
    expected = [greedy_by_recomputation(model, prompt, 8) for prompt in PROMPTS]
    assert greedy(GenerationEngine(model, eos_token_ids=[]), PROMPTS, 8) == expected


def test_one_token_reads_only_its_chosen_experts_and_decodes_like_recomputation(tiny_model):
    from tinyseek.moe import DeepSeekMoEStep

    model = tiny_model(2, attention_type="mla", n_routed_experts=8, n_shared_experts=1, scoring_func="sigmoid")
    assert DeepSeekMoEStep(model.model.layers[-1].mlp).gather  # 2 of 8 experts: a single token gathers its experts
    expected = [greedy_by_recomputation(model, prompt, 8) for prompt in PROMPTS]
    engine = GenerationEngine(model, eos_token_ids=[])
    assert [greedy(engine, [prompt], 8)[0] for prompt in PROMPTS] == expected
    assert greedy(engine, PROMPTS, 8) == expected  # three rows: every expert


def test_the_engine_arranges_the_weights_once_and_again_after_an_in_place_update(tiny_model):
    """`lean.weights_version` reads `Tensor._version`, which torch has no public equivalent of: this pins that an
    in-place update of a parameter (what a non-fused optimizer step does) bumps it, so the engine rearranges."""
    model = tiny_model(2, attention_type="mha")
    engine = GenerationEngine(model, eos_token_ids=[])
    greedy(engine, PROMPTS, 2)
    arranged = engine.lean_weights()
    greedy(engine, PROMPTS, 2)
    assert engine.lean_weights() is arranged
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(5)))
    expected = [greedy_by_recomputation(model, prompt, 6) for prompt in PROMPTS]
    assert greedy(engine, PROMPTS, 6) == expected
    assert engine.lean_weights() is not arranged


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler (.ci/run installs g++)")
def test_the_compiled_step_decodes_like_recomputation_batched_and_alone(attention_type, tiny_model):
    """Compiling takes a few seconds for each batch shape."""
    from tinyseek.generate import lean

    model = tiny_model(2, attention_type=attention_type, n_routed_experts=8, n_shared_experts=1, scoring_func="sigmoid")
    expected = [greedy_by_recomputation(model, prompt, 8) for prompt in PROMPTS]
    engine = GenerationEngine(model, eos_token_ids=[], decoder="compiled")
    assert greedy(engine, PROMPTS, 8) == expected
    assert engine.path == "compiled lean step"
    assert [greedy(engine, [prompt], 8)[0] for prompt in PROMPTS] == expected
    if attention_type == "mla":  # transformers' way to ask for a compiled decode, through model.generate()
        reused_before = lean.compiled_lean_step.cache_info().hits
        output = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, cache_implementation="static")
        assert output[0, len(PROMPTS[0]) :].tolist() == expected[0]
        assert lean.compiled_lean_step.cache_info().hits == reused_before + 1  # the step compiled above


class RecordOutputShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        return result


def test_mla_decodes_from_the_latent_cache_without_expanding_per_head_keys_or_values(tiny_model):
    """The decode step's attention, that is: a prefill attends in the expanded form."""
    model = tiny_model(attention_type="mla", q_lora_rank=12)
    config = model.config
    heads, per_head = config.num_attention_heads, min(config.qk_nope_head_dim, config.v_head_dim)
    assert config.kv_lora_rank < heads * per_head  # otherwise an expanded tensor would not stand out by size
    input_ids, attention_mask = left_pad(PROMPTS, pad_token_id=0)
    batch, context = input_ids.shape[0], input_ids.shape[1] + 1
    up_projection_inputs = []
    with torch.no_grad():
        prefill = model(input_ids, attention_mask=attention_mask, use_cache=True)  # expanded, like training
        model.model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda m, args, out: up_projection_inputs.append(args[0].shape))
        next_token = prefill.logits[:, -1:].argmax(-1)
        step_mask = torch.cat([attention_mask, torch.ones(batch, 1, dtype=torch.long)], 1)
        with RecordOutputShapes() as recorder:
            step = model(next_token, attention_mask=step_mask, cache=prefill.cache, use_cache=True)

    for layer in step.cache.layers:
        tensors = (layer.keys, layer.values)
        assert all(t.shape[:3] == (batch, 1, context) for t in tensors)
        assert sum(t.shape[-1] for t in tensors) == config.kv_lora_rank + config.qk_rope_head_dim
    assert up_projection_inputs == []  # kv_b_proj is absorbed into the query and the output, never applied
    expanded = [s for s in recorder.shapes if context in s and torch.Size(s).numel() >= batch * heads * context * per_head]
    assert expanded == [], f"per-head tensors over the context during decoding: {expanded}"
    assert any(s == (batch, 1, context, config.kv_lora_rank) for s in recorder.shapes)


# A soft-capped head keeps the logits' order, so greedy decoding cannot tell whether a path applies the cap; sampling can.
@pytest.mark.parametrize("softcap", [None, 0.5])
def test_seeded_sampling_is_reproducible_and_unseeded_sampling_draws_like_transformers(attention_type, softcap,
                                                                                      tiny_model):
    model = tiny_model(attention_type=attention_type, final_logit_softcapping=softcap)
    sampling = Sampling(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=7)

    def sample(engine, sampling):
        return [completion.token_ids for completion in engine.generate(PROMPTS, sampling, 12)]

    lean, previous = GenerationEngine(model, eos_token_ids=[]), GenerationEngine(model, eos_token_ids=[], decoder="model-forward")
    first = sample(lean, sampling)
    assert sample(lean, sampling) == first
    assert sample(previous, sampling) == first
    assert sample(lean, Sampling(**{**vars(sampling), "seed": 8})) != first
    # From torch's global stream the draws are transformers' own.
    unseeded = Sampling(**{**vars(sampling), "seed": None})
    torch.manual_seed(7)
    ours = sample(lean, unseeded)
    input_ids, attention_mask = left_pad(PROMPTS, pad_token_id=0)
    torch.manual_seed(7)
    reference = transformers_generate(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=12, pad_token_id=0, **sampling.generate_kwargs()
    )
    assert reference[:, input_ids.shape[1]:].tolist() == ours


def test_a_private_stream_samples_the_distribution_and_never_a_token_without_probability(monkeypatch):
    probabilities = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    scores = probabilities.log().expand(4, -1)
    sampling, generator = Sampling(temperature=1.0, top_k=0), torch.Generator().manual_seed(0)
    draws = torch.cat([sampling.choose(scores, generator) for _ in range(5000)])
    frequencies = torch.bincount(draws, minlength=6) / len(draws)
    assert frequencies[probabilities == 0].sum() == 0
    assert torch.allclose(frequencies, probabilities, atol=0.015)  # 20,000 draws: over 4 standard deviations
    # The largest uniform draw still lands on the last token with a probability, not past it.
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.full((4, 1), 1 - 2**-24))
    assert sampling.choose(scores, generator).tolist() == [4] * 4


def test_top_k_of_one_is_greedy(tiny_model):
    model = tiny_model(attention_type="mla")
    engine = GenerationEngine(model, eos_token_ids=[])
    top_1 = [c.token_ids for c in engine.generate(PROMPTS, Sampling(temperature=1.5, top_k=1, seed=0), 10)]
    assert top_1 == greedy(engine, PROMPTS, 10)


def test_generation_stops_at_eos_and_at_stop_strings_and_cuts_the_text_before_them(
    tiny_model, byte_tokenizer, letters_only
):
    model, tokenizer = letters_only(tiny_model(attention_type="mla")), byte_tokenizer
    prompt = tokenizer("hello", add_special_tokens=False).input_ids
    free = greedy(GenerationEngine(model, tokenizer), [prompt], 24)[0]
    text = tokenizer.decode(free)
    assert text.isalpha() and len(text) == 24
    at = next(i for i in range(8, 20) if text.find(text[i : i + 2]) == i)  # a stop string first seen mid-text
    stop = text[at : at + 2]

    def run(stop_strings, eos_token_id=None):
        engine = GenerationEngine(model, tokenizer, eos_token_ids=[eos_token_id] if eos_token_id is not None else [])
        events = [step[0] for step in engine.stream([prompt], Sampling(temperature=0), 24, stop=stop_strings)]
        return [event.text for event in events], events[-1].finish_reason

    pieces, reason = run([stop, "zzzz-never"])
    assert "".join(pieces) == text[:at] and reason == "stop"
    assert len(pieces) == at + 2  # the token completing the stop string is the last one generated
    assert pieces[at:] == ["", ""]  # the stop string's start was held back
    pieces, reason = run([], eos_token_id=free[5])  # pretend the sixth token is EOS
    assert len(pieces) == 6 and "".join(pieces) == text[:5] and reason == "stop"
    pieces, reason = run([])
    assert "".join(pieces) == text and reason == "length"


def test_streamed_text_never_splits_a_multi_byte_character(byte_tokenizer):
    tokenizer = byte_tokenizer
    text = "naïve café → 日本語 ✓ done"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text)  # several tokens per character
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) + stream.finish() == text
    assert not any("\ufffd" in piece for piece in pieces)


# --- `tinyseek generate` -----------------------------------------------------------------------------------------


def test_generate_command_streams_the_greedy_continuation_of_the_latest_checkpoint(
    tmp_path, capsys, tiny_model, byte_tokenizer, write_run, letters_only
):
    model, tokenizer = letters_only(tiny_model(attention_type="linear")), byte_tokenizer
    write_run(tmp_path / "run", tiny_model(attention_type="linear"), tokenizer, step=5)  # an older checkpoint
    write_run(tmp_path / "run", model, tokenizer, step=10)
    prompt = [tokenizer.eos_token_id] + tokenizer("once upon", add_special_tokens=False).input_ids
    expected = tokenizer.decode(greedy_by_recomputation(model, prompt, 9))

    argv = ["generate", "--run-dir", str(tmp_path / "run"), "--prompt", "once upon", "--max-new-tokens", "9",
            "--temperature", "0", "--stream", "--device", "cpu"]
    assert tinyseek_main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "9 tokens in" in captured.err and "tokens/s" in captured.err


def test_generate_command_refuses_a_run_without_checkpoint_and_a_prompt_beyond_the_positions(
    tmp_path, capsys, tiny_model, byte_tokenizer, write_run
):
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    assert tinyseek_main(["generate", "--run-dir", str(tmp_path / "empty-run"), "--prompt", "hi"]) == 2
    assert "has no valid checkpoint" in capsys.readouterr().err

    write_run(tmp_path / "run", tiny_model(max_position_embeddings=16), byte_tokenizer)
    argv = ["generate", "--run-dir", str(tmp_path / "run"), "--prompt", "a prompt of well over sixteen bytes"]
    assert tinyseek_main(argv) == 2
    err = capsys.readouterr().err
    assert "tokens long" in err and "max_position_embeddings=16" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_generate_command_reports_an_unknown_option_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tinyseek", "generate", "--run-dir", str(tmp_path), "--prompt", "hi", "--temprature", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --temprature" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# --- the generation engine ----------------------------------------------------------------------------------------


def routing_by_full_forward(model, sequence: list[int]) -> list[list[list[int]]]:
    """[position][MoE layer] -> sorted routed expert ids, from one uncached forward with the routers recorded."""
    recorded = []
    hooks = [
        moe.gate.register_forward_hook(lambda module, args, out: recorded.append(out[0].sort(dim=-1).values))
        for moe in model.moe_layers()
    ]
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0]
    for hook in hooks:
        hook.remove()
    return torch.stack(recorded, dim=1).tolist(), logits


def test_capture_returns_the_routed_experts_and_alternatives_of_a_forward_pass(attention_type, tiny_model, byte_tokenizer):
    model = tiny_model(**{**TinySeekConfig.from_preset("seed").to_diff_dict(), "attention_type": attention_type})
    moe_layers = len(model.moe_layers())
    assert moe_layers == model.config.num_hidden_layers
    prompt, new_tokens = PROMPTS[1], 6
    engine = GenerationEngine(model, byte_tokenizer)
    events = [step[0] for step in engine.stream([prompt], Sampling(temperature=0), new_tokens, capture=True)]
    assert engine.path == "lean step"
    generated = [event.token_id for event in events]
    routing, logits = routing_by_full_forward(model, prompt + generated)
    probabilities = logits.softmax(-1)
    for index, event in enumerate(events):
        position = len(prompt) - 1 + index  # the position whose output chose this token
        assert len(event.experts) == moe_layers
        assert [sorted(experts) for experts in event.experts] == routing[position]
        top = probabilities[position].topk(5)
        assert [token for token, _, _ in event.alternatives] == top.indices.tolist()
        assert [probability for _, _, probability in event.alternatives] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert event.alternatives[0][1] == byte_tokenizer.decode([event.alternatives[0][0]])
    plain = [step[0] for step in engine.stream([prompt], Sampling(temperature=0), new_tokens)]
    assert [event.token_id for event in plain] == generated
    assert all(event.experts is None and event.alternatives is None for event in plain)


def test_engine_events_finish_rows_at_eos_and_at_the_length_limit_and_drop_finished_rows(
    tiny_model, byte_tokenizer, letters_only
):
    model, tokenizer = letters_only(tiny_model(attention_type="mha")), byte_tokenizer
    engine = GenerationEngine(model, tokenizer)
    free = engine.generate(PROMPTS, Sampling(temperature=0), 12)
    assert [completion.finish_reason for completion in free] == ["length"] * 3
    assert [completion.text for completion in free] == [tokenizer.decode(c.token_ids) for c in free]
    eos = free[0].token_ids[4]  # pretend row 0's fifth token is EOS
    engine = GenerationEngine(model, tokenizer, eos_token_ids=[eos])
    steps = list(engine.stream(PROMPTS, Sampling(temperature=0), 12))
    first_eos = [completion.token_ids.index(eos) if eos in completion.token_ids else None for completion in free]
    for row, at in enumerate(first_eos):
        rows_steps = [step for step in steps if any(event.row == row for event in step)]
        assert len(rows_steps) == (at + 1 if at is not None else 12)
        last = next(event for event in rows_steps[-1] if event.row == row)
        assert last.finish_reason == ("stop" if at is not None else "length")
        # EOS adds no text; at the length limit the last token's letter is released with it.
        assert last.text == ("" if at is not None else tokenizer.decode([last.token_id]))
    assert max(first_eos[0], *(a for a in first_eos if a is not None)) < 12


def transformers_generate(model, *args, **kwargs):
    """transformers' own generation loop, bypassing the engine that `model.generate()` routes to."""
    return GenerationMixin.generate(model, *args, **kwargs)


def test_model_generate_runs_on_the_engine_and_equals_transformers_loop(attention_type, tiny_model, letters_only):
    model = letters_only(tiny_model(attention_type=attention_type))
    input_ids, attention_mask = left_pad(PROMPTS, pad_token_id=0)
    greedy = dict(attention_mask=attention_mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    free = transformers_generate(model, input_ids, **greedy)
    eos = free[0, input_ids.shape[1] + 3].item()  # row 0 stops after four tokens; the others may or may not
    calls = []
    original = GenerationEngine.stream
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GenerationEngine, "stream", lambda *a, **k: calls.append(1) or original(*a, **k))
        assert torch.equal(model.generate(input_ids, **greedy), free)
        assert torch.equal(model.generate(input_ids, eos_token_id=eos, **greedy), transformers_generate(model, input_ids, eos_token_id=eos, **greedy))
        sampled = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=20, pad_token_id=0)
        torch.manual_seed(3)
        ours = model.generate(input_ids, **sampled)
        assert len(calls) == 3
        torch.manual_seed(3)
        assert torch.equal(ours, transformers_generate(model, input_ids, **sampled))
        beams = model.generate(input_ids, num_beams=2, **greedy)  # not the engine's: transformers does it
        assert len(calls) == 3
    assert torch.equal(beams, transformers_generate(model, input_ids, num_beams=2, **greedy))


ENGINE_FIELDS = ["min_new_tokens", "stop_strings", "num_return_sequences", "no_repeat_ngram_size", "bad_words_ids"]


@pytest.mark.parametrize("field", ENGINE_FIELDS)
def test_model_generate_keeps_each_field_on_the_engine_and_equals_transformers(
    field, monkeypatch, tiny_model, byte_tokenizer, letters_only
):
    model = letters_only(tiny_model(2, attention_type="mha"))
    input_ids, attention_mask = left_pad(PROMPTS, pad_token_id=0)
    width = input_ids.shape[1]
    plain = dict(attention_mask=attention_mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    free = transformers_generate(model, input_ids, **plain)
    new = free[:, width:]
    settings = {
        "min_new_tokens": dict(eos_token_id=new[0, 2].item(), min_new_tokens=9),  # row 0 would end at its third token
        # With an EOS (the model never chooses 256) transformers pads the rows that have stopped, as the engine does.
        "stop_strings": dict(stop_strings=[byte_tokenizer.decode(new[0, 4:6])], tokenizer=byte_tokenizer, eos_token_id=256),
        "num_return_sequences": dict(num_return_sequences=3, do_sample=True, temperature=0.9, top_k=20),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "bad_words_ids": dict(bad_words_ids=[[new[0, 0].item()], new[1, 1:3].tolist()]),
    }[field]
    call = {**plain, **settings}
    torch.manual_seed(3)
    theirs = transformers_generate(model, input_ids, **call)
    torch.manual_seed(3)
    without_field = transformers_generate(model, input_ids, **{**call, field: 1 if field == "num_return_sequences" else None})
    assert theirs.shape != without_field.shape or not torch.equal(theirs, without_field)  # the field changes the text

    monkeypatch.setattr(GenerationMixin, "generate", lambda *args, **kwargs: pytest.fail("reached transformers' loop"))
    torch.manual_seed(3)
    ours = model.generate(input_ids, **call)
    assert ours.shape == theirs.shape
    if call["do_sample"]:
        assert torch.equal(ours, theirs)  # the same draws, in transformers' row order
    else:
        prompts = [prompt for prompt in PROMPTS for _ in range(call.get("num_return_sequences", 1))]
        assert_same_greedy(model, prompts, ours[:, width:].tolist(), theirs[:, width:].tolist())


def test_greedy_num_return_sequences_is_refused_as_transformers_refuses_it(monkeypatch, tiny_model):
    """transformers' generate() refuses greedy copies (a ValueError from its config check); the engine runs the same
    check, so `model.generate()` refuses them too, without reaching transformers' loop."""
    model = tiny_model(attention_type="mha")
    call = dict(max_new_tokens=4, do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences") as theirs:
        transformers_generate(model, torch.tensor([PROMPTS[0]]), **call)
    monkeypatch.setattr(GenerationMixin, "generate", lambda *args, **kwargs: pytest.fail("reached transformers' loop"))
    with pytest.raises(ValueError, match="num_return_sequences") as ours:
        model.generate(torch.tensor([PROMPTS[0]]), **call)
    assert str(ours.value) == str(theirs.value)


def test_model_generate_names_what_sends_it_to_transformers_once_per_process(monkeypatch, tiny_model):
    from tinyseek.generate import engine

    monkeypatch.setattr(engine, "FALLBACK_WARNED", set())
    model = tiny_model(attention_type="mha")
    prompt = torch.tensor([PROMPTS[0]])
    with pytest.warns(RuntimeWarning, match="does not do num_beams; decoding with transformers' generate"):
        expected = model.generate(prompt, max_new_tokens=4, num_beams=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model.generate(prompt, max_new_tokens=4, num_beams=2), expected)


def test_without_a_working_compiler_generation_falls_back_to_the_eager_step_and_says_so(
    monkeypatch, tmp_path, capsys, tiny_model, byte_tokenizer, write_run, letters_only
):
    from torch._inductor.exc import InvalidCxxCompiler

    from tinyseek.generate import lean

    def compile_without_compiler(function, **options):
        def compiled(*args, **kwargs):
            raise InvalidCxxCompiler()  # what inductor raises at the first call when no C++ compiler works

        return compiled

    monkeypatch.setattr(torch, "compile", compile_without_compiler)
    lean.compiled_lean_step.cache_clear()
    model = tiny_model(2, attention_type="mha")
    expected = [greedy_by_recomputation(model, prompt, 6) for prompt in PROMPTS]
    engine = GenerationEngine(model, eos_token_ids=[], decoder="compiled")
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*decoding with the eager lean step") as caught:
        assert greedy(engine, PROMPTS, 6) == expected
    assert len(caught) == 1 and engine.path == "lean step"

    write_run(tmp_path / "run", letters_only(tiny_model(attention_type="mla")), byte_tokenizer)
    argv = ["generate", "--run-dir", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "4", "--compile"]
    with pytest.warns(RuntimeWarning, match="eager lean step"):
        assert tinyseek_main(argv) == 0
    assert "; lean step)" in capsys.readouterr().err
    lean.compiled_lean_step.cache_clear()


def test_the_engine_decodes_in_fp32_inside_a_bf16_autocast(tiny_model):
    model = tiny_model(2, attention_type="mla")
    expected = [greedy_by_recomputation(model, prompt, 8) for prompt in PROMPTS]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for decoder in ("lean", "model-forward"):
            assert greedy(GenerationEngine(model, eos_token_ids=[], decoder=decoder), PROMPTS, 8) == expected


# --- self-speculative decoding with the MTP head ------------------------------------------------------------------


def test_speculative_greedy_output_equals_plain_greedy_at_eos_and_at_the_last_position(attention_type, tiny_model):
    model = tiny_model(2, attention_type=attention_type, num_nextn_predict_layers=1)
    plain = GenerationEngine(model, eos_token_ids=[])
    speculative = GenerationEngine(model, eos_token_ids=[], decoder="speculative")
    room = model.config.max_position_embeddings - len(PROMPTS[1]) + 1
    for prompt in PROMPTS:
        expected = greedy(plain, [prompt], 200)[0]  # runs to the model's last position
        assert len(expected) == model.config.max_position_embeddings - len(prompt) + 1
        assert greedy(speculative, [prompt], 200)[0] == expected
        assert speculative.path.startswith("speculative")
        drafted, accepted = speculative.acceptance
        assert drafted >= len(expected) // 2 - 1 and 0 <= accepted <= drafted
        eos = expected[len(expected) // 3]
        with_eos = GenerationEngine(model, eos_token_ids=[eos], decoder="speculative")
        assert greedy(with_eos, [prompt], 200)[0] == expected[: expected.index(eos) + 1]
    assert greedy(speculative, [PROMPTS[1]], room - 7)[0] == greedy(plain, [PROMPTS[1]], room - 7)[0]


def draft_model(model: TinySeekForCausalLM, always_right: bool) -> TinySeekForCausalLM:
    """The model (with MTP) changed so its main head always picks token 0 (its final norm is zero, so every logit is
    0), with an MTP head that then also drafts token 0 (its norm zero too) or never does (its own hidden state, with
    token 0's head row zeroed: some other logit is positive)."""
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.lm_head.weight[0] = 0
        if always_right:
            model.mtp[0].norm.weight.zero_()
    return model


@pytest.mark.parametrize("always_right", [True, False])
def test_speculative_acceptance_is_counted_on_drafts_that_are_always_right_or_always_wrong(always_right, tiny_model):
    model = draft_model(tiny_model(attention_type="mla", num_nextn_predict_layers=1), always_right)
    engine = GenerationEngine(model, eos_token_ids=[], decoder="speculative")
    new_tokens = 9
    assert greedy(engine, [PROMPTS[0]], new_tokens)[0] == [0] * new_tokens
    # Steps follow tokens 1..8. Right drafts are checked every other step (an accepted one makes the next step
    # need no forward, and no draft); wrong ones at every step after the first.
    assert engine.acceptance == ((4, 4) if always_right else (7, 0))
