import copy
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers import decoders as token_decoders
from transformers import PreTrainedTokenizerFast

from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.attention import ATTENTION_REGISTRY
from tinyseek.data import resolve_data, train_bpe_tokenizer
from tinyseek.data.chat import CHAT_TEMPLATE, CHAT_TOKENS
from tinyseek.train import latest_checkpoint
from tinyseek.train.checkpoint import save_checkpoint

# The model every model-level test starts from: a few thousand parameters, a vocabulary of 257 so the byte
# tokenizer's ids (0-255 and EOS 256) fit, and each attention type's sizes smaller than the tests' sequences, so that
# chunks, windows and latents are really exercised.
TINY_MODEL = dict(
    vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=96,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
    moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, linear_attention_chunk_size=4,
    sliding_window=5,
)
CHAT_VOCAB_SIZE = 260  # the byte tokenizer's 257 and the chat template's three tokens
WORDS = "the a cat dog sat ran on under mat tree red big small quickly slowly".split()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (corpora, tokenizers): $TINYSEEK_SHARED_DATA, else <repo>/../shared/data."""
    folder = Path(os.environ.get("TINYSEEK_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is absent (set TINYSEEK_SHARED_DATA)")
    return folder


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Make the Hugging Face Hub look unreachable, whatever the network, so Hub fallbacks are tested offline."""
    monkeypatch.setattr("tinyseek.data.hub._hub_is_reachable", lambda: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, str]:
    """A prepared corpus of simple generated sentences and a BPE tokenizer trained on it."""
    root = tmp_path_factory.mktemp("tiny-corpus")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for document in range(200):
        picks = torch.randint(len(WORDS), (60,), generator=generator).tolist()
        sentence = " ".join(WORDS[i] for i in picks[:6])
        lines.append(f"{sentence}. {sentence}. " + " ".join(WORDS[i] for i in picks[6:]) + ".")
    text_file = root / "corpus.jsonl"
    text_file.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    tokenizer = train_bpe_tokenizer(str(text_file), 300, root / "tokenizer")
    prepared = resolve_data(str(text_file), str(tokenizer), root / "cache", val_fraction=0.1)
    return {"data": str(prepared), "tokenizer": str(tokenizer)}


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**overrides)``: the tiny model's TinySeekConfig with any field overridden."""
    return lambda **overrides: TinySeekConfig(**{**TINY_MODEL, **overrides})


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """``tiny_model(seed=0, **overrides)``: a freshly initialised tiny model in eval mode."""

    def build(seed: int = 0, **overrides) -> TinySeekForCausalLM:
        torch.manual_seed(seed)
        return TinySeekForCausalLM(tiny_config(**overrides)).eval()

    return build


@pytest.fixture(scope="session")
def letters_only():
    """``letters_only(model)``: the model with a head that can only favour lowercase ASCII letters (every other row
    of the head is zero, so its logit is 0 while the best letter's is positive): readable byte-level output."""

    def restrict(model: TinySeekForCausalLM) -> TinySeekForCausalLM:
        letters = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz"))
        with torch.no_grad():
            keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            keep[letters] = True
            model.lm_head.weight[~keep] = 0
        return model

    return restrict


@pytest.fixture(params=sorted(ATTENTION_REGISTRY))
def attention_type(request) -> str:
    """Every registered attention type: a test that takes this fixture runs once per type, new ones included."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: a second thread only adds synchronisation, which on a busy machine costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level tokenizer with one token per byte (id = byte value) and EOS = 256: every character
    outside ASCII spans several tokens."""
    backend = Tokenizer(models.BPE(vocab={symbol: byte for byte, symbol in enumerate(byte_symbols())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = token_decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eos|>", pad_token="<|eos|>")
    assert tokenizer.eos_token_id == 256
    return tokenizer


@pytest.fixture(scope="session")
def chat_byte_tokenizer(byte_tokenizer) -> PreTrainedTokenizerFast:
    """The byte tokenizer with tinyseek's chat template and its <|User|>, <|Assistant|>, <|EOT|> tokens (ids 257,
    258, 259): a model for it needs vocab_size=260."""
    tokenizer = copy.deepcopy(byte_tokenizer)
    assert tokenizer.add_tokens(list(CHAT_TOKENS), special_tokens=True) == len(CHAT_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == CHAT_VOCAB_SIZE
    return tokenizer


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255: printable bytes stand for themselves, the others take the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = iter(range(256, 512))
    symbols = [chr(byte) if byte in printable else chr(next(stand_ins)) for byte in range(256)]
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    return symbols


@pytest.fixture(scope="session")
def write_run():
    """``write_run(run_dir, model, tokenizer, step=10)``: a run directory laid out by the trainer's checkpoint writer."""

    def write(run_dir, model, tokenizer, step: int = 10):
        model.config.eos_token_id = tokenizer.eos_token_id
        return save_checkpoint(run_dir, step, model, tokenizer, optimizer_state={}, trainer_state={"step": step}, keep=1)

    return write


@pytest.fixture(scope="session")
def tiny_config_file():
    """``tiny_config_file(directory, corpus, **sections)``: a training config for the tiny seed-shaped model on
    `corpus` (the `tiny_corpus` fixture), six steps in fp32 on the CPU; `sections` update or replace its sections."""

    def write(directory: Path, corpus: dict[str, str], **sections) -> Path:
        config = {
            "out_dir": str(directory / "run"),
            "max_steps": 6,
            "dtype": "fp32",
            "device": "cpu",
            "model": {
                "preset": "seed", "vocab_size": 304, "hidden_size": 32, "num_hidden_layers": 2,
                "intermediate_size": 64, "moe_intermediate_size": 32,
            },
            "data": {"source": corpus["data"], "tokenizer": corpus["tokenizer"], "seq_len": 16,
                     "micro_batch_size": 2, "grad_accum": 2},
            "optim": {"lr": 3.0e-3},
            "schedule": {"warmup_steps": 2},
            "checkpoint": {"every": 3, "keep": 1},
            "logging": {"log_every": 1, "eval_every": 3, "eval_batches": 2, "sample_every": 1000,
                        "progress_bar": False, "peak_flops": 1.0e11},
            "sample": {"prompts": ["the cat"], "max_new_tokens": 4},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                config[section].update(values)
            else:
                config[section] = values
        path = directory / "tiny.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_trainer(tiny_config_file):
    """``tiny_trainer(directory, corpus, out_dir=None, **sections)``: a Trainer on `tiny_config_file`'s config."""
    from tinyseek.train import load_config
    from tinyseek.train.trainer import Trainer

    def build(directory: Path, corpus: dict[str, str], out_dir=None, **sections) -> Trainer:
        overrides = [(["out_dir"], str(out_dir))] if out_dir else []
        return Trainer(load_config(str(tiny_config_file(directory, corpus, **sections)), overrides))

    return build


@pytest.fixture(scope="session")
def final_weights():
    """``final_weights(run_dir)``: the weights of a run's latest valid checkpoint."""
    return lambda run_dir: load_file(latest_checkpoint(run_dir) / "model.safetensors")


@pytest.fixture(scope="session")
def compiler_failure():
    """``with compiler_failure():`` a C++ compiler that does not exist, and no cached kernels to hide it."""

    @contextmanager
    def failing():
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
            yield
        torch._dynamo.reset()

    return failing


def pytest_terminal_summary(terminalreporter):
    """The documented commands the docs test did not run, each with the reason its page gives (tests/doc_commands.py)."""
    from doc_commands import SKIPPED

    if SKIPPED:
        terminalreporter.section("documented commands not run by the docs test")
        for line in SKIPPED:
            terminalreporter.write_line(line)
