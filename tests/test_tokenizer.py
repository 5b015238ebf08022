import json

import pytest

from tinyseek.cli import main as tinyseek
from tinyseek.data import check_tokenizer_fits, load_tokenizer, tokenizer_identity, train_bpe_tokenizer
from tinyseek.testing import write_jsonl

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing tabs\t\n\nand blank lines\n",
    "Unicode: naïve café, Führer, 中文字符, emoji 🦊🚀, math ∑ x² ≤ ∞",
    "code: def f(x):\n    return x ** 2  # 42",
    "literal special text <|eos|> stays text",
]


def write_corpus(path, count=200):
    topics = ["gradient descent", "matrix algebra", "thermodynamics", "protein folding", "compilers"]
    return write_jsonl(path, (
        {"text": f"Chapter {n}: {topics[n % 5]}.\nIn this section we study {topics[n % 5]} and its {n % 7} main ideas."}
        for n in range(count)
    ))


@pytest.mark.parametrize("which", ["shared", "builtin"])
def test_deepseek_coder_reproduces_the_llama_cpp_reference_encodings(shared_data, which):
    folder = shared_data / "tokenizers" / "deepseek-coder"
    inputs = (
        (folder / "ggml-vocab-deepseek-coder.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    )
    expected = (folder / "ggml-vocab-deepseek-coder.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) == len(expected) == 47
    tokenizer = load_tokenizer(folder if which == "shared" else "builtin")
    for text, ids in zip(inputs, expected):
        assert tokenizer.encode(text, add_special_tokens=False) == [int(token) for token in ids.split()], text


def test_trained_tokenizer_round_trips_and_has_its_special_tokens_where_its_metadata_says(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "bpe"
    assert tinyseek(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)

    metadata = json.loads((out / "tinyseek_tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(out)
    assert len(tokenizer) == metadata["vocab_size"] <= 400
    for role, special in metadata["special_tokens"].items():
        assert getattr(tokenizer, f"{role}_token_id") == special["id"]
        assert tokenizer.convert_ids_to_tokens(special["id"]) == special["token"]
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert max(ids) < len(tokenizer)
        assert tokenizer.decode(ids) == text


def test_the_shipped_tinystories_bpe_is_what_tokenizer_train_makes_from_the_builtin_stories(tmp_path):
    from tinyseek.data.builtin import BUILTIN_STORIES_TOKENIZER
    from tinyseek.data.chat import CHAT_TOKENS
    from tinyseek.data.instruct import held_out_stories

    assert tinyseek(["tokenizer", "train", "--data", "builtin", "--vocab-size", "4096", "--out", str(tmp_path)]) == 0
    for shipped in BUILTIN_STORIES_TOKENIZER.iterdir():
        if shipped.name != "README.md":
            assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name
    tokenizer = load_tokenizer("builtin-tinystories-bpe")
    assert len(tokenizer) == 4096 and tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)) == [3, 4, 5]
    # Fewer tokens per byte than DeepSeek-Coder's 32k vocabulary, on stories it was not trained on.
    stories = held_out_stories()
    counts = [sum(len(one.encode(text, add_special_tokens=False)) for text in stories)
              for one in (tokenizer, load_tokenizer("builtin"))]
    assert counts[0] < counts[1]
    assert all(tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text for text in stories)


def test_training_refuses_a_vocabulary_smaller_than_the_byte_alphabet(tmp_path):
    with pytest.raises(ValueError, match="--vocab-size must exceed 262"):
        train_bpe_tokenizer(write_corpus(tmp_path / "corpus.jsonl"), 100, tmp_path / "bpe")


def test_a_directory_and_its_tokenizer_json_are_the_same_tokenizer(shared_data):
    folder = shared_data / "tokenizers" / "deepseek-coder"
    from_directory, from_file = load_tokenizer(folder), load_tokenizer(folder / "tokenizer.json")
    assert from_directory.eos_token_id == from_file.eos_token_id == 32014
    assert tokenizer_identity(from_directory) == tokenizer_identity(from_file) == tokenizer_identity(str(folder))
    assert tokenizer_identity(shared_data / "tokenizers" / "gpt2" / "tokenizer.json") != tokenizer_identity(
        from_directory
    )


def test_a_bare_tokenizer_json_gets_its_conventional_eos(shared_data):
    tokenizer = load_tokenizer(shared_data / "tokenizers" / "gpt2" / "tokenizer.json")
    assert (len(tokenizer), tokenizer.eos_token_id) == (50257, 50256)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_naming_both_sizes(shared_data):
    tokenizer = load_tokenizer(shared_data / "tokenizers" / "deepseek-coder")
    check_tokenizer_fits(tokenizer, 32256)
    with pytest.raises(ValueError, match=r"32022 tokens \(largest id 32021\).*vocab_size is 32000"):
        check_tokenizer_fits(tokenizer, 32000)


def test_unusable_tokenizer_specs_raise_user_errors(tmp_path, unreachable_hub):
    with pytest.raises(OSError, match="no such tokenizer"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(OSError, match="cannot reach the Hugging Face Hub.*--tokenizer PATH"):
        load_tokenizer("deepseek-ai/deepseek-coder-1.3b-base")
