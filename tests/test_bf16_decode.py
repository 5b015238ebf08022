"""Decoding with bf16 weights (`--weights`): the lean and compiled steps against the fp32 step for every attention
type and feed-forward type, `auto`'s choice by CPU flags, and the arranged weights keyed on their dtype."""

import shutil

import pytest
import torch

from tinyseek import device
from tinyseek.errors import ConfigError
from tinyseek.generate import GenerationEngine, Sampling
from tinyseek.generate.lean import LeanDecoder, LeanWeights

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 99], [40, 41, 42, 43, 44, 45, 46, 47], [200, 3, 3, 150, 7]]
# bf16 keeps 8 significant bits: each rounding moves a value by up to 2^-9 of itself, and a step rounds every GEMM's
# weights, inputs and outputs. Logits may move by this share of their largest magnitude ...
LOGIT_TOLERANCE = 0.03
# ... so where the fp32 step's two likeliest tokens are closer than this share, either choice is right (the bf16
# analogue of the equality rule's 1e-4 in docs/generation.md).
TIE_SHARE = 2 * LOGIT_TOLERANCE


def teacher_forced_logits(model, weights_dtype: torch.dtype, tokens: list[int], compiled: bool = False) -> torch.Tensor:
    """[len(tokens), V]: the logits after each token, the first through the prefill and the rest through steps."""
    weights = LeanWeights(model, weights_dtype)
    decoder = LeanDecoder(model, weights, 1, len(tokens), capture=False, compiled=compiled)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = [decoder.prefill(ids[:, :1], torch.ones_like(ids[:, :1]))]
        logits += [decoder.step(ids[:, index]) for index in range(1, len(tokens))]
    return torch.cat(logits)


def assert_same_greedy_up_to_a_bf16_tie(model, ours: list[int], theirs: list[int], prompt: list[int]) -> None:
    """Token for token up to the first step where the fp32 step's two likeliest tokens are within the bf16 tie."""
    fp32 = teacher_forced_logits(model, torch.float32, prompt + theirs)[len(prompt) - 1 :]
    for index, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        if mine == reference:
            continue
        top = fp32[index].topk(2).values
        assert top[0] - top[1] <= TIE_SHARE * fp32[index].abs().max(), (
            f"token {index} differs ({mine} vs {reference}) without a near-tie"
        )
        return


@pytest.mark.parametrize("ffn_type", ["moe", "dense"])
def test_bf16_weights_decode_like_the_fp32_step(attention_type, ffn_type, tiny_model):
    model = tiny_model(
        2, attention_type=attention_type, ffn_type=ffn_type, n_routed_experts=8, n_shared_experts=1, attention_bias=True
    )
    tokens = torch.randint(1, 257, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    fp32 = teacher_forced_logits(model, torch.float32, tokens)
    bf16 = teacher_forced_logits(model, torch.bfloat16, tokens)
    assert bf16.dtype == torch.float32  # bf16 weights, fp32 activations and logits
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=LOGIT_TOLERANCE * fp32.abs().max().item())
    assert not torch.equal(bf16, fp32)  # the weights really were rounded

    engines = {dtype: GenerationEngine(model, eos_token_ids=[], weights=dtype) for dtype in ("fp32", "bf16")}
    for prompts in (PROMPTS, PROMPTS[:1]):  # batched (every expert) and alone (a single token gathers its experts)
        greedy = {name: engine.generate(prompts, Sampling(temperature=0), 12) for name, engine in engines.items()}
        for prompt, mine, reference in zip(prompts, greedy["bf16"], greedy["fp32"]):
            assert_same_greedy_up_to_a_bf16_tie(model, mine.token_ids, reference.token_ids, prompt)
    assert engines["bf16"].path == "lean step, bf16 weights" and engines["fp32"].path == "lean step"


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler (.ci/run installs g++)")
def test_the_compiled_step_decodes_bf16_weights_like_the_eager_one(tiny_model):
    model = tiny_model(2, attention_type="mla", n_routed_experts=8, n_shared_experts=1, scoring_func="sigmoid")
    tokens = torch.randint(1, 257, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    eager = teacher_forced_logits(model, torch.bfloat16, tokens)
    compiled = teacher_forced_logits(model, torch.bfloat16, tokens, compiled=True)
    # The same bf16 products; fused kernels and the residual stream in fp32 differ only by rounding.
    torch.testing.assert_close(compiled, eager, rtol=0, atol=LOGIT_TOLERANCE * eager.abs().max().item())
    engine = GenerationEngine(model, eos_token_ids=[], decoder="compiled", weights="bf16")
    (completion,) = engine.generate(PROMPTS[:1], Sampling(temperature=0), 8)
    assert engine.path == "compiled lean step, bf16 weights"
    (reference,) = GenerationEngine(model, eos_token_ids=[]).generate(PROMPTS[:1], Sampling(temperature=0), 8)
    assert_same_greedy_up_to_a_bf16_tie(model, completion.token_ids, reference.token_ids, PROMPTS[0])


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),  # Zen 4, Cooper Lake
    ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),  # Sapphire Rapids and later
    ({"avx2", "fma"}, torch.float32),  # Zen 3 and older: torch's bf16 GEMM is emulated, far slower than fp32
    (set(), torch.float32),  # no /proc/cpuinfo
])
def test_auto_picks_bf16_weights_only_on_cpus_with_bf16_units(monkeypatch, flags, expected, tiny_model):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))
    cpu = torch.device("cpu")
    assert device.decode_weights_dtype("auto", cpu) == expected
    assert device.decode_weights_dtype("fp32", cpu) == torch.float32
    assert device.decode_weights_dtype("bf16", cpu) == torch.bfloat16
    assert GenerationEngine(tiny_model(), weights="auto").weights_dtype == expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert device.decode_weights_dtype("auto", torch.device("cuda")) == torch.float32  # emulated bf16 only


def test_an_unknown_weights_dtype_is_refused_and_the_commands_offer_the_same_choices(tiny_model):
    from tinyseek.generate.cli import WEIGHT_CHOICES

    assert WEIGHT_CHOICES == device.WEIGHT_CHOICES
    with pytest.raises(ConfigError, match="weights: must be one of auto, fp32, bf16"):
        GenerationEngine(tiny_model(), weights="fp16")


def test_the_arranged_weights_and_the_compiled_step_are_keyed_on_the_dtype(tiny_model):
    model = tiny_model(2, attention_type="mha")
    engine = GenerationEngine(model, eos_token_ids=[])
    fp32 = engine.lean_weights()
    assert fp32.head.dtype == torch.float32 and engine.lean_weights() is fp32
    engine.weights_dtype = torch.bfloat16
    bf16 = engine.lean_weights()
    assert bf16 is not fp32 and bf16.head.dtype == torch.bfloat16 and engine.lean_weights() is bf16
    attention, feed_forward = bf16.layers[0][1], bf16.layers[0][3]
    assert attention.qkv.dtype == feed_forward.all_gate_up.dtype == torch.bfloat16
    assert attention.qkv_bias is None and feed_forward.router.dtype == torch.float32  # the router stays fp32
    # Caches and the residual stream stay in the model's dtype.
    assert all(cache.dtype == torch.float32 for cache in attention.new_cache(1, 8))
    # A compiled step checks no guards, so one compiled for fp32 weights must never be handed bf16 ones.
    steps = {LeanDecoder(model, weights, 1, 8, False, compiled=True).step_function for weights in (fp32, bf16)}
    assert len(steps) == 2
