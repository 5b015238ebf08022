"""`tinyseek export --format gguf`, checked by llama.cpp itself (through llama-cpp-python): the same tokens, the same
fp32 logits, the same greedy continuations, and near-equal perplexity from the F16 and Q8_0 files; for the `llama`
architecture transformers' own GGUF reader checks the logits a second, independent time."""

import gzip
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tinyseek.cli import main as tinyseek_main
from tinyseek.data.builtin import BUILTIN_ROOT
from tinyseek.data.tokenizer import encode_prompt, load_tokenizer
from tinyseek.generate import GenerationEngine, Sampling
from tinyseek.loading import load_model_and_tokenizer

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llama-cpp]' (.ci/run installs it)"
)
from tinyseek.generate.gguf_export import open_in_llama_cpp  # noqa: E402  (after the skip: it needs gguf)

pytestmark = pytest.mark.usefixtures("one_thread")

THREADS = 1
STEPS = 100
# Small enough to train in about a minute, wide enough that Q8_0 quantizes every matrix (rows of whole 32-blocks).
SMALL = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
         "model.intermediate_size=128", "model.max_position_embeddings=256"]
MODELS = {
    "deepseek2": ["model.preset=deepseek-v3-tiny", "model.q_lora_rank=32", "model.kv_lora_rank=32",
                  "model.qk_nope_head_dim=32", "model.qk_rope_head_dim=16", "model.v_head_dim=32",
                  "model.moe_intermediate_size=32", "model.n_routed_experts=8"],
    "llama": ["model.preset=llama-tiny", "model.num_key_value_heads=2"],
}
LOGITS_ATOL = 1e-3
GREEDY = Sampling(temperature=0)
TIE = 2e-3  # the equality rule's margin, matched to the logits' tolerance
PROMPTS = ["Once upon a time, there was a little", "Tom and Lily went to the park. They saw a big",
           "The cat said, \"I am hungry!\" Then", "def add(a, b):\n    return"]
HELD_OUT = (
    "One sunny morning, a small brown dog named Max found a red ball under the old tree. He wanted to play, so he "
    "ran to his friend Sue. \"Look what I found!\" Max barked. Sue laughed and threw the ball far across the green "
    "grass. Max ran and ran until he caught it. Then they sat together in the shade and ate apples. When the sun "
    "went down, Sue's mom called them home. Max was tired but happy, and he slept next to his new ball all night."
)


def varied_texts() -> list[str]:
    """A few hundred texts that exercise every branch of the pre-tokenizers: code, Unicode, whitespace runs,
    digits, punctuation, and the training corpus's own sentences."""
    code = ["def f(x):\n\treturn x**2 + 1\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }", "x = {'a': [1, 2]}\n",
            "#include <stdio.h>\nint main() { printf(\"%d\\n\", 42); }", "SELECT * FROM t WHERE id=7;",
            "    if self.ok:\n        pass\n\n\n", "λx. x → y", "// TODO: fix   this", "a_b-c.d/e\\f|g&h"]
    unicode = ["héllo wörld", "naïve café résumé", "日本語のテキスト", "中文字符串测试", "한국어 문장입니다", "Привет, мир!",
               "emoji 😀🎉 ok", "Ελληνικά", "עברית", "العربية", "ß ẞ ﬁ ﬂ", "tab\there", "\u00a0nbsp", "zero\u200bwidth"]
    spaces = [" ", "  ", "   leading", "trailing   ", "a  b   c    d", "\n", "\n\n\n", "\r\n", " \n \n", "\t\t", "x \t y"]
    digits = ["0", "12", "123", "1234567890", "3.14159", "1,000,000", "2024-01-02", "v1.2.3", "0x1F", "1e-10", "-42"]
    words = ["Hello world", "hello", "HELLO", "Hello, world!", "it's", "don't", "I'm", "you're", "we'll", "(parens)",
             "\"quotes\"", "...", "?!", "a-b", "<|User|> hi", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>x"]
    with gzip.open(BUILTIN_ROOT / "tinystories" / "tinystories_sample.jsonl.gz", "rt") as lines:
        stories = [json.loads(line)["text"] for line in itertools.islice(lines, 150)]
    mixed = [f"{a} {b}" for a, b in zip(code + unicode + digits, reversed(words + spaces + unicode))]
    return code + unicode + spaces + digits + words + stories + mixed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`trained(name)`: (run directory, model, tokenizer) of a small model of that architecture trained STEPS steps on
    the built-in data with the built-in tokenizer (the command docs/export.md documents), trained once per module."""
    runs = {}

    def train(name: str):
        if name not in runs:
            root = tmp_path_factory.mktemp(name)
            settings = [*SMALL, *MODELS[name], f"data.cache_dir={root / 'cache'}", "data.seq_len=64",
                        "data.micro_batch_size=4", "optim.lr=3e-3", "schedule.warmup_steps=10",
                        "logging.progress_bar=false", "logging.sample_every=100000", f"logging.eval_every={STEPS}",
                        "logging.eval_batches=2", "logging.peak_flops=1e11"]
            argv = ["train", "--data", "builtin", "--tokenizer", "builtin", "--out-dir", str(root / "run"),
                    "--max-steps", str(STEPS), "--checkpoint-every", str(STEPS), "--device", "cpu", "--dtype", "fp32",
                    *itertools.chain.from_iterable(("--set", setting) for setting in settings)]
            assert tinyseek_main(argv) == 0
            runs[name] = (root / "run", *load_model_and_tokenizer(root / "run"))
        return runs[name]

    return train


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """`exported(name, gguf_type)`: the path of that trained model's GGUF file of that type."""
    files = {}

    def export(name: str, gguf_type: str):
        if (name, gguf_type) not in files:
            run, _, _ = trained(name)
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{gguf_type}.gguf"
            argv = ["export", "--run-dir", str(run), "--out", str(out), "--format", "gguf", "--gguf-type", gguf_type]
            assert tinyseek_main(argv) == 0
            files[name, gguf_type] = out
        return files[name, gguf_type]

    return export


@contextmanager
def llama(path, **options) -> Iterator["llama_cpp.Llama"]:
    # fp32 key/value cache: llama.cpp's default fp16 cache would round the keys and latents that tinyseek keeps in fp32.
    f32 = llama_cpp.GGML_TYPE_F32
    runner = open_in_llama_cpp(path, n_ctx=256, n_batch=256, n_threads=THREADS, logits_all=True, type_k=f32,
                               type_v=f32, verbose=False, **options)
    try:
        yield runner
    finally:
        runner.close()  # now, not at interpreter exit, where llama-cpp-python's finaliser fails noisily


def llama_logits(model: "llama_cpp.Llama", tokens: list[int]) -> np.ndarray:
    model.reset()
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)], dtype=np.float32)


def tinyseek_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    logits = torch.from_numpy(logits[:-1])
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:])).exp())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_f32_file_gives_llama_cpp_the_same_tokens_logits_and_greedy_continuations(name, trained, exported):
    _, model, tokenizer = trained(name)
    with llama(exported(name, "f32")) as runner:
        results = [check_prompt(runner, model, tokenizer, text) for text in PROMPTS]
    differences, identical = zip(*results)
    print(f"{name} f32: logits within {max(differences):.2g} of tinyseek's on {len(PROMPTS)} prompts; greedy "
          f"continuations identical token for token on {sum(identical)}/{len(PROMPTS)} (the rest up to a near-tie)")


def check_prompt(runner, model, tokenizer, text: str) -> tuple[float, bool]:
    """Same prompt tokens, fp32 logits within LOGITS_ATOL, and greedy continuations equal under the equality rule.
    Returns the largest logit difference and whether the continuations were identical."""
    tokens = encode_prompt(tokenizer, text)
    # llama.cpp begins the prompt as tinyseek does (BOS), from the file's metadata alone.
    assert runner.tokenize(text.encode(), add_bos=True, special=True) == tokens
    theirs, ours = llama_logits(runner, tokens), tinyseek_logits(model, tokens)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=LOGITS_ATOL)

    new_tokens = 24
    continuation = GenerationEngine(model, eos_token_ids=[]).generate([tokens], GREEDY, new_tokens)[0].token_ids
    runner.reset()
    their_continuation = list(itertools.islice(runner.generate(tokens, temp=0.0, top_k=1, reset=True), new_tokens))
    assert len(their_continuation) == len(continuation) == new_tokens
    steps = tinyseek_logits(model, tokens + continuation)[len(tokens) - 1:]
    for step, (mine, other) in enumerate(zip(continuation, their_continuation)):
        if mine != other:  # allowed only where tinyseek's own top two are within the tie margin
            top = np.sort(steps[step])[-2:]
            assert top[1] - top[0] <= TIE, (text, step, continuation, their_continuation)
            break
    return float(np.abs(theirs - ours).max()), continuation == their_continuation


@pytest.mark.parametrize("name", sorted(MODELS))
def test_f16_and_q8_0_files_keep_perplexity_within_1_and_3_percent(name, trained, exported, record_property):
    _, model, tokenizer = trained(name)
    tokens = encode_prompt(tokenizer, HELD_OUT)
    reference = tinyseek_logits(model, tokens)
    reference_perplexity = perplexity(reference, tokens)
    for gguf_type, tolerance in (("f16", 0.01), ("q8_0", 0.03)):
        with llama(exported(name, gguf_type)) as runner:
            logits = llama_logits(runner, tokens)
        ratio = perplexity(logits, tokens) / reference_perplexity
        agreement = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        record_property(f"{name}-{gguf_type}", {"perplexity_ratio": ratio, "top1_agreement": agreement})
        print(f"{name} {gguf_type}: perplexity {ratio:.4f}x tinyseek's fp32 ({reference_perplexity:.2f}), "
              f"top-1 agreement {agreement:.1%} over {len(tokens)} positions")
        assert abs(ratio - 1) <= tolerance, (gguf_type, ratio)


@pytest.mark.parametrize("omission, target, replacement", [
    ("the RoPE row reordering", "tinyseek.generate.gguf_export.interleave_rope_rows", lambda weight, *layout: weight),
    ("the gating function", "gguf.GGUFWriter.add_expert_gating_func", lambda writer, value: None),
])
def test_each_difference_from_llama_cpps_own_converter_is_needed_for_deepseek2(
    omission, target, replacement, trained, tmp_path, monkeypatch
):
    """llama.cpp's convert_hf_to_gguf.py writes a `--format transformers` export of an MLA+MoE model without either
    (docs/export.md): each alone moves llama.cpp's logits beyond the parity tolerance."""
    from tinyseek.generate.gguf_export import export_gguf

    _, model, tokenizer = trained("deepseek2")
    monkeypatch.setattr(target, replacement)
    export_gguf(model, tokenizer, tmp_path / "converter-like.gguf")
    with llama(tmp_path / "converter-like.gguf") as runner:
        differences, agreements = [], []
        for text in PROMPTS:
            tokens = encode_prompt(tokenizer, text)
            theirs, ours = llama_logits(runner, tokens), tinyseek_logits(model, tokens)
            differences.append(np.abs(theirs - ours).max())
            agreements.append((theirs.argmax(-1) == ours.argmax(-1)).mean())
    print(f"without {omission}: logits differ by up to {max(differences):.3g}, top-1 agreement "
          f"{np.mean(agreements):.1%}")
    assert max(differences) > LOGITS_ATOL


def test_llama_architecture_reads_back_in_transformers_gguf_loader_with_the_same_logits(trained, exported):
    from transformers import AutoModelForCausalLM

    _, model, tokenizer = trained("llama")
    path = exported("llama", "f32")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for text in PROMPTS:
        tokens = encode_prompt(tokenizer, text)
        with torch.no_grad():
            theirs = loaded(torch.tensor([tokens])).logits[0].numpy()
        np.testing.assert_allclose(theirs, tinyseek_logits(model, tokens), rtol=0, atol=1e-4)


def test_tokenization_equals_llama_cpp_on_varied_texts_for_the_builtin_and_a_trained_bpe(
    trained, exported, tiny_corpus, tiny_model, write_run, tmp_path
):
    trained_bpe = load_tokenizer(tiny_corpus["tokenizer"])
    write_run(tmp_path / "run", tiny_model(vocab_size=304, attention_type="mha", ffn_type="dense"), trained_bpe)
    bpe_file = tmp_path / "bpe.gguf"
    assert tinyseek_main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(bpe_file), "--format", "gguf"]) == 0
    texts = varied_texts()
    assert len(texts) >= 200
    for tokenizer, path in ((trained("llama")[2], exported("llama", "f32")), (trained_bpe, bpe_file)):
        with llama(path, vocab_only=True) as vocabulary:
            mismatches = [text for text in texts if vocabulary.tokenize(text.encode(), add_bos=False, special=True)
                          != tokenizer(text, add_special_tokens=False).input_ids]
        assert mismatches == []


def test_the_file_carries_the_special_ids_the_chat_template_and_the_tokenizers_licence(
    trained, exported, tmp_path, tiny_model, tiny_corpus, write_run
):
    _, _, builtin = trained("llama")
    with llama(exported("llama", "f32"), vocab_only=True) as runner:
        assert (runner.token_bos(), runner.token_eos()) == (builtin.bos_token_id, builtin.eos_token_id)
        assert runner.n_vocab() == 32256 > len(builtin)  # one entry per embedding row
        assert runner.metadata["tokenizer.ggml.pre"] == "deepseek-coder"
        assert runner.metadata["tokenizer.license"].startswith((BUILTIN_ROOT / "deepseek-coder" / "NOTICE").read_text())
        assert "DEEPSEEK LICENSE AGREEMENT" in runner.metadata["tokenizer.license"]
        # The run trained on the built-in data: its licence, and a card that says how the model was trained.
        assert "Community Data License Agreement - Sharing" in runner.metadata["tinyseek.data.license"]
        assert f"{STEPS} optimizer steps" in runner.metadata["general.description"]
        assert runner.metadata["tinyseek.chat_trained"] == "false" and "tokenizer.ggml.eot_token_id" not in runner.metadata

    chat = load_tokenizer(tiny_corpus["tokenizer"])
    chat.bos_token = None
    chat.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    write_run(tmp_path / "run", tiny_model(vocab_size=304, attention_type="mha", ffn_type="dense"), chat)
    argv = ["export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "chat.gguf"), "--format", "gguf"]
    assert tinyseek_main(argv) == 0
    with llama(tmp_path / "chat.gguf", vocab_only=True) as runner:
        assert runner.metadata["tokenizer.chat_template"] == chat.chat_template
        # Without a BOS, a prompt begins with EOS, as training documents follow the previous one's EOS.
        assert runner.token_bos() == runner.token_eos() == chat.eos_token_id
        assert runner.metadata["tokenizer.ggml.pre"] == "gpt-2" and "tokenizer.license" not in runner.metadata
        assert "tinyseek.data.license" not in runner.metadata


@pytest.mark.parametrize("overrides, note", [
    # Softmax scores, no shared expert (the file gets a zero one), and an MTP module to leave out.
    (dict(attention_type="mla", q_lora_rank=16, num_nextn_predict_layers=1),
     "note: left out 1 multi-token-prediction module(s)"),
    (dict(attention_type="mla", q_lora_rank=16, ffn_type="dense"), None),
    (dict(attention_type="mha", ffn_type="dense", tie_word_embeddings=True), None),
])
def test_the_other_exportable_shapes_run_alike_in_llama_cpp(
    overrides, note, tmp_path, capsys, tiny_model, tiny_corpus, write_run
):
    tokenizer = load_tokenizer(tiny_corpus["tokenizer"])
    model = tiny_model(vocab_size=304, **overrides)
    with torch.no_grad():  # a balancing bias away from zero, so that a lost one would change which experts are chosen
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    write_run(tmp_path / "run", model, tokenizer)
    out = tmp_path / "model.gguf"
    assert tinyseek_main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--format", "gguf"]) == 0
    printed = capsys.readouterr().out
    assert note in printed if note else "note:" not in printed
    tokens = encode_prompt(tokenizer, "the big red dog sat on the mat under the tree")
    with llama(out) as runner:
        np.testing.assert_allclose(llama_logits(runner, tokens), tinyseek_logits(model, tokens), rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("overrides, reason", [
    (dict(attention_type="linear"), "no ELU+1 causal linear attention"),
    (dict(attention_type="mla", q_lora_rank=16, router_bias=True), "router has no learnable bias"),
    (dict(attention_type="mla"), "needs a low-rank query projection"),
    (dict(attention_type="mla", q_lora_rank=16, rms_norm_eps=1e-5), "one epsilon for every norm"),
    (dict(attention_type="mha", ffn_type="moe"), "Mixtral"),
    (dict(attention_type="mha", ffn_type="dense", hidden_act="relu2"), "hidden_act is relu2"),
    (dict(attention_type="mha", ffn_type="dense", final_logit_softcapping=15.0), "soft-capping"),
    (dict(attention_type="mha", ffn_type="dense"), "the tokenizer has no merges"),  # the byte tokenizer
])
def test_what_llama_cpp_cannot_run_is_refused_in_one_line_with_the_reason(
    overrides, reason, tmp_path, capsys, tiny_model, byte_tokenizer, write_run
):
    write_run(tmp_path / "run", tiny_model(**overrides), byte_tokenizer)
    out = tmp_path / "model.gguf"
    assert tinyseek_main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert reason in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_a_failure_while_writing_leaves_no_file_and_no_partial_one(tmp_path, capsys, monkeypatch, tiny_model,
                                                                  tiny_corpus, write_run):
    model = tiny_model(vocab_size=304, attention_type="mha", ffn_type="dense")
    write_run(tmp_path / "run", model, load_tokenizer(tiny_corpus["tokenizer"]))
    out = tmp_path / "out" / "model.gguf"
    argv = ["export", "--run-dir", str(tmp_path / "run"), "--out", str(out), "--format", "gguf"]
    monkeypatch.setenv("TINYSEEK_FAULTS", "gguf.written=enospc")
    monkeypatch.setattr("tinyseek.faults._reached", {})  # earlier exports in this process passed the point too
    assert tinyseek_main(argv) == 2
    assert "cannot write" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []
    monkeypatch.delenv("TINYSEEK_FAULTS")
    assert tinyseek_main(argv) == 0
    assert [path.name for path in out.parent.iterdir()] == ["model.gguf"]
    capsys.readouterr()
    assert tinyseek_main(argv) == 2  # an existing file is never overwritten
    assert "already exists" in capsys.readouterr().err
