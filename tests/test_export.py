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
    [(dict(attention_type="linear"), "linear attention"), (dict(attention_type="mla", scoring_func="softmax"), "sigmoid"),
     (dict(attention_type="mla", scoring_func="sigmoid", final_logit_softcapping=15.0), "soft-capping")],
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


# --- chat, the model card and the licences ----------------------------------------------------------------------

CHAT = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Write a story about a dog "
                                                                                      "named Max, s'il te plaît."}]
REPLY_TOKENS = 24

# In a fresh interpreter, plain transformers answers a conversation as its documentation says: the folder's chat
# template, then greedy generate() with the folder's generation config; prints the prompt and the reply's ids.
CHAT_WITH_PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, messages, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
assert not any(name.startswith("tinyseek") for name in sys.modules), "tinyseek was imported"
prompt = inputs["input_ids"][0].tolist()
print(json.dumps({"class": type(model).__name__, "prompt": prompt, "reply": output[0, len(prompt):].tolist()}))
"""


def speaking(model: TinySeekForCausalLM, token_ids: list[int]) -> TinySeekForCausalLM:
    """The model with a head that can only choose `token_ids` (every other row zero), each by a wide margin: greedy
    replies without near-ties, in tokens that read back as themselves."""
    with torch.no_grad():
        keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        keep[token_ids] = True
        model.lm_head.weight[~keep] = 0
        model.lm_head.weight[keep] *= 30
    return model


def write_trained_run(run_dir, model, tokenizer, data: dict):
    """A run directory whose checkpoint records a training run as the trainer does (its resolved configuration,
    steps, tokens and time)."""
    from tinyseek.train.checkpoint import save_checkpoint
    from tinyseek.train.config import TrainConfig

    model.config.eos_token_id = tokenizer.eos_token_id
    config = TrainConfig(max_steps=200, data=data).to_dict()
    state = {"step": 200, "tokens": 409_600, "train_seconds": 95.0, "config": config, "rng": {}, "sampler": {}}
    save_checkpoint(run_dir, 200, model, tokenizer, optimizer_state={}, trainer_state=state, keep=1)
    return run_dir


def test_plain_transformers_answers_a_chat_as_tinyseek_chat_does_and_stops_at_the_end_of_the_turn(
    tmp_path, tiny_model, chat_byte_tokenizer, write_run
):
    from tinyseek.data.chat import END_OF_TURN_TOKEN, end_of_turn_ids, mark_chat_trained, render_chat
    from tinyseek.generate import GenerationEngine, Sampling

    from test_generate import assert_same_greedy

    tokenizer = chat_byte_tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    model = speaking(trained_looking(tiny_model(12, **DEEPSEEK_V3_LIKE, vocab_size=len(tokenizer))),
                     [*b"abcdefghijklmnopqrstuvwxyz", end_of_turn])
    mark_chat_trained(model.config)
    write_run(tmp_path / "run", model, tokenizer)
    out = tmp_path / "exported"
    argv = ["export", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--format", "transformers"]
    assert tinyseek_main(argv) == 0

    # tinyseek's chat path: the template's ids, the engine stopping at the end of the turn (as `tinyseek chat`).
    prompt = render_chat(tokenizer, CHAT, add_generation_prompt=True)
    engine = GenerationEngine(model, tokenizer, eos_token_ids=end_of_turn_ids(tokenizer))
    (ours,) = engine.generate([prompt], Sampling(temperature=0), REPLY_TOKENS)
    assert ours.finish_reason == "stop" and ours.token_ids[-1] == end_of_turn and len(ours.token_ids) > 3

    plain = subprocess.run(
        [sys.executable, "-c", CHAT_WITH_PLAIN_TRANSFORMERS, str(out), json.dumps(CHAT), str(REPLY_TOKENS)],
        capture_output=True, text=True, timeout=300,
    )
    assert plain.returncode == 0, plain.stderr
    theirs = json.loads(plain.stdout.strip().splitlines()[-1])
    assert theirs["class"] == "DeepseekV3ForCausalLM" and theirs["prompt"] == prompt
    assert_same_greedy(model, [prompt], [theirs["reply"]], [ours.token_ids])


def test_an_export_carries_a_model_card_and_the_licences_of_its_tokenizer_and_data(tmp_path, tiny_model):
    import yaml

    from tinyseek.data.builtin import BUILTIN_ROOT
    from tinyseek.data.chat import CHAT_TOKENS, mark_chat_trained
    from tinyseek.data.tokenizer import load_tokenizer
    from tinyseek.generate.export import export
    from tinyseek.report import parameter_report

    tokenizer = load_tokenizer("builtin")
    model = tiny_model(**DEEPSEEK_V3_LIKE, vocab_size=32256)
    mark_chat_trained(model.config)
    run = write_trained_run(tmp_path / "run", model, tokenizer, dict(source="builtin-chat", tokenizer="builtin",
                                                                     mixture={"builtin": 0.5}))
    first, second = tmp_path / "first", tmp_path / "second"
    assert tinyseek_main(["export", "--run-dir", str(run), "--out", str(first), "--format", "transformers"]) == 0
    # An export of the export says the same: the training record travels with it.
    assert tinyseek_main(["export", "--model", str(first), "--out", str(second)]) == 0

    for out, format in ((first, "transformers"), (second, "tinyseek")):
        card = (out / "README.md").read_text()
        header = yaml.safe_load(card.split("---\n")[1])
        assert header["license"] == "other" and header["license_name"] == "deepseek-license"
        assert (out / header["license_link"]).read_bytes() == (BUILTIN_ROOT / "deepseek-coder" / "LICENSE-MODEL").read_bytes()
        assert header["datasets"] == ["roneneldan/TinyStories"] and "chat" in header["tags"]
        for name in ("README.md", "LICENSE-CDLA-Sharing-1.0.txt"):
            shipped = (BUILTIN_ROOT / "tinystories" / name).read_bytes()
            assert (out / "licenses" / "tinystories-data" / name).read_bytes() == shipped
        assert (out / "licenses" / "deepseek-coder-tokenizer" / "NOTICE").is_file()
        total = parameter_report(model)["total"]
        for fact in (f"{total:,}", "MLA", "DeepSeekMoE: 8 routed experts", "**Chat-trained**", "200 optimizer steps",
                     "409,600 tokens", "`builtin-chat`, `builtin`", "CDLA-Sharing-1.0", "DEEPSEEK LICENSE AGREEMENT",
                     "apply_chat_template", "source: builtin-chat"):
            assert fact in card, fact
        assert ("import tinyseek" in card) == (format == "tinyseek")
        assert ("`DeepseekV3ForCausalLM` in transformers" in card) == (format == "transformers")
        exported = AutoTokenizer.from_pretrained(out)
        assert [exported.convert_tokens_to_ids(token) for token in CHAT_TOKENS] == [32019, 32020, 32021]

    # A model folder that recorded nothing says so, and claims no data licence.
    base = export(tiny_model(attention_type="linear"), None, tmp_path / "bare")
    card = (base / "README.md").read_text()
    assert "**Not chat-trained**" in card and "is not recorded" in card and "license" not in yaml.safe_load(
        card.split("---\n")[1])
    assert not (base / "licenses").exists() and "llama.cpp cannot run it: llama.cpp has no ELU+1" in card


def test_a_gguf_chat_model_answers_in_llama_cpp_as_tinyseek_chat_does(tmp_path, tiny_model):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")
    from tinyseek.generate.gguf_export import open_in_llama_cpp
    from tinyseek.data.builtin import BUILTIN_ROOT
    from tinyseek.data.chat import END_OF_TURN_TOKEN, end_of_turn_ids, mark_chat_trained, render_chat
    from tinyseek.data.tokenizer import load_tokenizer
    from tinyseek.generate import GenerationEngine, Sampling

    tokenizer = load_tokenizer("builtin")
    letters = tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    model = speaking(tiny_model(5, attention_type="mla", q_lora_rank=12, vocab_size=32256), [*letters, end_of_turn])
    mark_chat_trained(model.config)
    run = write_trained_run(tmp_path / "run", model, tokenizer, dict(source="builtin", tokenizer="builtin"))
    out = tmp_path / "chat.gguf"
    assert tinyseek_main(["export", "--run-dir", str(run), "--out", str(out), "--format", "gguf"]) == 0

    prompt = render_chat(tokenizer, CHAT, add_generation_prompt=True)
    engine = GenerationEngine(model, tokenizer, eos_token_ids=end_of_turn_ids(tokenizer))
    (ours,) = engine.generate([prompt], Sampling(temperature=0), REPLY_TOKENS)
    assert ours.finish_reason == "stop" and len(ours.token_ids) > 3
    runner = open_in_llama_cpp(out, n_ctx=256, n_threads=1, verbose=False)
    try:
        metadata = runner.metadata
        assert metadata["tinyseek.chat_trained"] == "true" and int(metadata["tokenizer.ggml.eot_token_id"]) == end_of_turn
        assert "**Chat-trained**" in metadata["general.description"]
        assert "CDLA-Sharing" in metadata["tinyseek.data.license"]
        assert metadata["tokenizer.license"].startswith((BUILTIN_ROOT / "deepseek-coder" / "NOTICE").read_text())
        # llama-cpp-python renders the file's template itself (jinja2) and stops at the end-of-turn token.
        reply = runner.create_chat_completion(messages=CHAT, temperature=0, max_tokens=REPLY_TOKENS)["choices"][0]
    finally:
        runner.close()
    assert (reply["message"]["content"], reply["finish_reason"]) == (ours.text, "stop")
