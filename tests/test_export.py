"""`tinyseek export`: a tinyseek folder that AutoModelForCausalLM loads with identical logits, and a transformers
folder that plain transformers loads, in a process that never imports tinyseek, with matching logits."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin

from tinyseek import TinySeekForCausalLM
from tinyseek.cli import main as tinyseek_main
from tinyseek.data.tokenizer import encode_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

DEEPSEEK_V3_LIKE = dict(
    attention_type="mla", q_lora_rank=12, ffn_type="moe", scoring_func="sigmoid", n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
)
LLAMA_LIKE = dict(attention_type="mha", ffn_type="dense", num_key_value_heads=2)
EOS = 256  # the byte tokenizer's (conftest.py)
TOKENS = [[EOS, 104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100], [EOS, 0, 255, 7, 128, 64, 32, 16, 8, 4, 2, 1]]

# Runs in a fresh interpreter: loads each folder with transformers alone and prints its class and logits.
LOAD_WITH_PLAIN_TRANSFORMERS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
tokens, results = torch.tensor(json.loads(sys.argv[1])), {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        results[folder] = {"class": type(model).__name__, "logits": model(tokens).logits.tolist()}
assert not any(name.startswith("tinyseek") for name in sys.modules), "tinyseek was imported"
print(json.dumps(results))
"""


def trained_looking(model: TinySeekForCausalLM) -> TinySeekForCausalLM:
    """A balancing bias away from zero, so that a lost buffer would change which experts are chosen."""
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def test_export_writes_a_folder_that_automodel_and_autotokenizer_load_with_identical_logits(
    tmp_path, tiny_model, byte_tokenizer, write_run
):
    model, tokenizer = trained_looking(tiny_model(**DEEPSEEK_V3_LIKE)), byte_tokenizer
    write_run(tmp_path / "run", model, tokenizer)
    out = tmp_path / "exported"
    assert tinyseek_main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(out)]) == 0

    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == EOS
    loaded, loaded_tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    assert isinstance(loaded, TinySeekForCausalLM)
    # The exported tokenizer's default call begins a prompt as training documents begin (here: after an EOS).
    assert loaded_tokenizer("héllo").input_ids == encode_prompt(tokenizer, "héllo")
    exported_state = loaded.state_dict()
    assert all(torch.equal(exported_state[name], tensor) for name, tensor in model.state_dict().items())
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        # Bitwise-equal weights; the logits may still differ in the last bit because tensors read from the
        # safetensors file are not 64-byte aligned, which changes the order of the vectorised expert sums.
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=1e-6)
    # transformers' own loop on the original model, against the engine that the loaded model's generate() runs.
    ours = GenerationMixin.generate(model, tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=5, eos_token_id=EOS, pad_token_id=EOS)
    assert torch.equal(loaded.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=5), ours)


def test_transformers_format_loads_without_tinyseek_as_deepseek_v3_and_llama_with_matching_logits(
    tmp_path, capsys, tiny_model, byte_tokenizer, write_run
):
    expected, folders = {}, {}
    for name, overrides in (("DeepseekV3ForCausalLM", DEEPSEEK_V3_LIKE), ("LlamaForCausalLM", LLAMA_LIKE)):
        model = trained_looking(tiny_model(**overrides))
        write_run(tmp_path / name, model, byte_tokenizer)
        folders[name] = tmp_path / f"{name}-export"
        argv = ["export", "--run-dir", str(tmp_path / name), "--out", str(folders[name]), "--format", "transformers"]
        assert tinyseek_main(argv) == 0
        with torch.no_grad():
            expected[name] = model(torch.tensor(TOKENS)).logits

    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_PLAIN_TRANSFORMERS, json.dumps(TOKENS), *map(str, folders.values())],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name, folder in folders.items():
        loaded = results[str(folder)]
        assert loaded["class"] == name
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected[name], rtol=0, atol=1e-4)

    # tinyseek generate reads the transformers folder too, and continues the text as the original model does.
    capsys.readouterr()
    argv = ["generate", "--model", str(folders["DeepseekV3ForCausalLM"]), "--prompt", "hello", "--temperature", "0",
            "--max-new-tokens", "6", "--device", "cpu"]
    assert tinyseek_main(argv) == 0
    from_transformers_folder = capsys.readouterr().out
    argv[2] = str(tmp_path / "DeepseekV3ForCausalLM")
    argv[1] = "--run-dir"
    assert tinyseek_main(argv) == 0
    assert capsys.readouterr().out == from_transformers_folder


@pytest.mark.parametrize(
    "overrides, reason",
    [(dict(attention_type="linear"), "linear attention"), (dict(attention_type="mla", scoring_func="softmax"), "sigmoid")],
)
def test_transformers_format_is_refused_with_the_reason_where_there_is_no_twin(
    tmp_path, capsys, overrides, reason, tiny_model, byte_tokenizer, write_run
):
    write_run(tmp_path / "run", tiny_model(**overrides), byte_tokenizer)
    argv = ["export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--format", "transformers"]
    assert tinyseek_main(argv) == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
