"""One prompt convention (`encode_prompt`) for the prepared documents, trainer samples, `tinyseek generate` and a
plain transformers export."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinyseek.cli import main as tinyseek
from tinyseek.data import TokenDataset, load_tokenizer, prepare_corpus
from tinyseek.data.tokenizer import encode_prompt, match_prompt_convention
from tinyseek.train.checkpoint import latest_checkpoint
from tinyseek.train.config import load_config
from tinyseek.train.metrics import read_metrics
from tinyseek.train.trainer import Trainer
from tinyseek.testing import write_jsonl

# Short prompts, for which this tiny model's greedy continuation depends on the token the prompt starts with.
PROMPTS = ["a", "big"]
PROMPT = "the cat sat"
NEW_TOKENS = 8


def test_prepared_documents_begin_as_encode_prompt_begins_a_prompt(tmp_path, tiny_corpus, shared_data):
    texts = ["the cat sat on the mat.", "a dog ran under the tree."]
    corpus = write_jsonl(tmp_path / "two.jsonl", ({"text": text} for text in texts))
    for spec in (tiny_corpus["tokenizer"], shared_data / "tokenizers" / "gpt2" / "tokenizer.json"):
        tokenizer = load_tokenizer(spec)
        prepared = prepare_corpus(str(corpus), str(spec), tmp_path / "cache", val_fraction=0)
        stream = TokenDataset(prepared, "train").tokens.tolist()
        eos = tokenizer.eos_token_id
        if tokenizer.bos_token_id is not None:  # BOS text EOS, and the prompt starts with that BOS
            expected = [id for text in texts for id in encode_prompt(tokenizer, text) + [eos]]
        else:  # text EOS: each document follows the EOS before it, as the prompt follows its leading EOS
            assert encode_prompt(tokenizer, "x")[0] == eos
            expected = [id for text in texts for id in encode_prompt(tokenizer, text)[1:] + [eos]]
        assert stream == expected


def test_a_tokenizer_default_call_is_made_to_follow_the_convention(shared_data):
    builtin = load_tokenizer("builtin")
    assert builtin(PROMPT).input_ids == encode_prompt(builtin, PROMPT)
    assert encode_prompt(builtin, PROMPT)[0] == builtin.bos_token_id == 32013
    gpt2 = load_tokenizer(shared_data / "tokenizers" / "gpt2" / "tokenizer.json")
    assert gpt2(PROMPT).input_ids != encode_prompt(gpt2, PROMPT)
    assert match_prompt_convention(gpt2)(PROMPT).input_ids == encode_prompt(gpt2, PROMPT)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_corpus):
    """A tiny Llama-shaped model (it has a plain transformers twin) trained a little, sampling greedily."""
    root = tmp_path_factory.mktemp("convention")
    overrides = {
        "out_dir": str(root / "run"), "max_steps": 40, "dtype": "fp32", "device": "cpu",
        "model": {"preset": "llama-tiny", "vocab_size": 304, "hidden_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64},
        "data": {"source": tiny_corpus["data"], "tokenizer": tiny_corpus["tokenizer"], "seq_len": 32,
                 "micro_batch_size": 4, "grad_accum": 1},
        "optim": {"lr": 1.0e-2},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 40},
        "logging": {"log_every": 40, "eval_every": 40, "eval_batches": 1, "sample_every": 40, "progress_bar": False,
                    "peak_flops": 1.0e11},
        "sample": {"prompts": PROMPTS, "max_new_tokens": NEW_TOKENS, "do_sample": False, "repetition_penalty": 1.0},
    }
    config = load_config(None, [([key], value) for key, value in overrides.items()])
    assert Trainer(config).train() == 0
    return root / "run"


def generate_text(capsys, prompt, *source) -> str:
    arguments = ["generate", *source, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)]
    capsys.readouterr()
    assert tinyseek(arguments) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_trainer_samples_and_tinyseek_generate_continue_a_prompt_alike(trained_run, capsys):
    (record,) = [r for r in read_metrics(trained_run) if r["kind"] == "samples"]
    assert [sample["prompt"] for sample in record["samples"]] == PROMPTS
    for sample in record["samples"]:
        assert sample["continuation"].strip()
        assert generate_text(capsys, sample["prompt"], "--run-dir", str(trained_run)) == sample["continuation"]


PLAIN_TRANSFORMERS = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
inputs = tokenizer(prompt, return_tensors="pt")
output = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)
print(type(model).__name__, "tinyseek" in sys.modules, inputs.input_ids[0].tolist())
print(tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True), end="")
"""


def test_plain_transformers_continues_an_export_as_tinyseek_generate_does(trained_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert tinyseek(["export", "--run-dir", str(trained_run), "--out", str(out), "--format", "transformers"]) == 0
    tokenizer = load_tokenizer(latest_checkpoint(trained_run))
    for prompt in (*PROMPTS, PROMPT):
        result = subprocess.run(
            [sys.executable, "-c", PLAIN_TRANSFORMERS, str(out), prompt, str(NEW_TOKENS)],
            capture_output=True, text=True, check=True,
        )
        header, text = result.stdout.split("\n", 1)
        assert header == f"LlamaForCausalLM False {encode_prompt(tokenizer, prompt)}"
        assert text == generate_text(capsys, prompt, "--run-dir", str(trained_run))


def test_echo_prints_the_prompt_before_the_same_continuation(trained_run, capsys):
    plain = generate_text(capsys, PROMPT, "--run-dir", str(trained_run))
    assert generate_text(capsys, PROMPT, "--run-dir", str(trained_run), "--echo") == PROMPT + plain
    assert generate_text(capsys, PROMPT, "--run-dir", str(trained_run), "--echo", "--stream") == PROMPT + plain


def test_a_model_folder_without_tokenizer_exports_its_weights_and_says_so(trained_run, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(latest_checkpoint(trained_run))
    model.save_pretrained(tmp_path / "weights-only")
    for format in ("tinyseek", "transformers"):
        out = tmp_path / f"export-{format}"
        assert tinyseek(["export", "--model", str(tmp_path / "weights-only"), "--out", str(out), "--format", format]) == 0
        assert "no tokenizer included" in capsys.readouterr().out
        assert not (out / "tokenizer.json").exists()
        exported = AutoModelForCausalLM.from_pretrained(out)
        tokens = torch.tensor([[0, 5, 9, 13]])
        with torch.no_grad():
            torch.testing.assert_close(exported(tokens).logits, model(tokens).logits, rtol=0, atol=1e-5)
    assert tinyseek(["generate", "--model", str(tmp_path / "weights-only"), "--prompt", "a"]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
