"""The chat fine-tuning stage on tiny models: packed windows train exactly the assistant's tokens, a packed batch's
loss is the conversations' own, one by one, a resumed run is bitwise the uninterrupted one, and the model it saves
says it is chat-trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tinyseek import TinySeekForCausalLM
from tinyseek.cli import main as tinyseek
from tinyseek.data import load_tokenizer, open_source
from tinyseek.data.chat import assistant_mask, is_chat_trained
from tinyseek.data.instruct import held_out_stories, is_held_out_story
from tinyseek.ops import IGNORE_INDEX, StepMemory
from tinyseek.testing import write_jsonl
from tinyseek.train import latest_checkpoint, load_config
from tinyseek.train.sft import ConversationSampler, assistant_loss, tokenize_conversations
from tinyseek.train.stages import stage_runs
from tinyseek.train.trainer import Trainer

WORDS = "the a cat dog sat ran on under mat tree red big small quickly slowly".split()


@pytest.fixture(scope="module")
def conversations_file(tmp_path_factory) -> Path:
    """Conversations in the tiny corpus's words, of one and of two exchanges, one with a system message."""
    generator = torch.Generator().manual_seed(1)

    def words(count: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (count,), generator=generator).tolist())

    rows = []
    for index in range(40):
        messages = [{"role": "user", "content": words(3)}, {"role": "assistant", "content": words(4 + index % 5)}]
        if index % 3 == 0:
            messages += [{"role": "user", "content": words(2)}, {"role": "assistant", "content": words(3)}]
        if index % 7 == 0:
            messages.insert(0, {"role": "system", "content": words(2)})
        rows.append({"messages": messages})
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", rows)


def test_packed_windows_train_exactly_the_assistant_tokens_of_each_conversation(tiny_corpus, conversations_file):
    tokenizer = load_tokenizer(tiny_corpus["tokenizer"])
    conversations = tokenize_conversations(str(conversations_file), tokenizer, 64, progress=False)
    sampler = ConversationSampler(conversations, 64, 3, tokenizer.pad_token_id, seed=5)
    rows = sampler.epoch_rows(0)
    assert sorted(index for row in rows for index in row) == list(range(len(conversations)))  # each once an epoch
    assert len(rows) < len(conversations)  # several to a window
    for index in range(len(rows) // 3):
        batch = sampler.batch(index)
        for row, members in enumerate(rows[3 * index: 3 * index + 3]):
            start = 0
            for document, member in enumerate(members):
                ids = conversations[member].ids.tolist()
                end = start + len(ids)
                assert batch.input_ids[row, start:end].tolist() == ids
                assert (batch.document_ids[row, start:end] == document).all()
                # The target of position t is id t + 1, trained where assistant_mask says so.
                labels = batch.labels[row, start:end - 1].tolist()
                mask = assistant_mask(tokenizer, ids)[1:]
                assert [label != IGNORE_INDEX for label in labels] == mask
                assert [label for label in labels if label != IGNORE_INDEX] == [i for i, m in zip(ids[1:], mask) if m]
                start = end
            assert (batch.labels[row, start - 1:] == IGNORE_INDEX).all()  # no target across into the padding
            assert (batch.document_ids[row, start:] == len(members)).all()


def one_by_one_loss(model, conversations) -> torch.Tensor:
    """The second implementation: each conversation alone, unpacked, its assistant tokens' cross-entropy summed."""
    total, count = torch.zeros(()), 0
    for conversation in conversations:
        ids = torch.from_numpy(conversation.ids)[None]
        logits = model(input_ids=ids).logits[0, :-1].float()
        trained = torch.from_numpy(conversation.trained[1:])
        total += F.cross_entropy(logits[trained], ids[0, 1:][trained], reduction="sum")
        count += int(trained.sum())
    return total / count


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-fused-loss"])
def test_a_packed_batch_has_the_loss_of_its_conversations_one_by_one(
    tiny_corpus, conversations_file, tiny_config, attention_type, training
):
    tokenizer = load_tokenizer(tiny_corpus["tokenizer"])
    conversations = tokenize_conversations(str(conversations_file), tokenizer, 64, progress=False)
    sampler = ConversationSampler(conversations, 64, 4, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = TinySeekForCausalLM(tiny_config(vocab_size=304, attention_type=attention_type, attention_dropout=0.0))
    model.train(training)
    packed = assistant_loss(model, sampler.batch(0), StepMemory(torch.device("cpu"))).reported
    members = [conversations[index] for row in sampler.epoch_rows(0)[:4] for index in row]
    model.eval()
    with torch.no_grad():
        expected = one_by_one_loss(model, members)
    torch.testing.assert_close(packed.detach(), expected, rtol=1e-5, atol=1e-5)


def sft_config(directory: Path, tiny_config_file, corpus, conversations: Path, init_from: Path, out_dir: Path,
               **chat) -> Path:
    """The tiny training config as a chat stage that starts from `init_from`."""
    path = tiny_config_file(directory, corpus)
    config = yaml.safe_load(path.read_text())
    config.update(stages=["sft"], init_from=str(init_from), out_dir=str(out_dir))
    config["sft"] = {"conversations": str(conversations), "seq_len": 64, "max_steps": 6, "lr": 2e-3,
                     "schedule": {"warmup_steps": 2}, **chat}
    path = directory / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stage_trainer(config_path: Path) -> Trainer:
    ((settings, stage),) = stage_runs(load_config(str(config_path)))
    return Trainer(settings, stage)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_corpus, tiny_trainer) -> Path:
    directory = tmp_path_factory.mktemp("pretrained")
    trainer = tiny_trainer(directory, tiny_corpus, max_steps=2)
    assert trainer.train() == 0
    return trainer.run_dir


def test_an_interrupted_chat_stage_resumes_bitwise_and_saves_a_chat_trained_model(
    tmp_path, tiny_corpus, tiny_config_file, conversations_file, pretrained, final_weights
):
    def trainer(name: str) -> Trainer:
        return stage_trainer(sft_config(tmp_path, tiny_config_file, tiny_corpus, conversations_file, pretrained,
                                        tmp_path / name, max_steps=6))

    straight = trainer("straight")
    assert straight.config.max_steps == 6 and straight.config.optim.lr == 2e-3 and straight.config.data.seq_len == 64
    assert straight.train() == 0
    first = trainer("resumed")
    first.train(stop_at_step=3)
    second = trainer("resumed")
    assert second.progress.step == 3 and second.resumed_from is not None
    assert second.train() == 0
    expected, actual = final_weights(straight.run_dir), final_weights(second.run_dir)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    # It started from the pre-trained weights, not from a fresh initialisation, and learned from there.
    start = final_weights(pretrained)
    assert start.keys() == actual.keys() and not torch.equal(start["lm_head.weight"], actual["lm_head.weight"])
    saved = json.loads((latest_checkpoint(second.run_dir) / "config.json").read_text())
    assert is_chat_trained(saved) and not is_chat_trained(json.loads((latest_checkpoint(pretrained) / "config.json")
                                                                      .read_text()))
    state = json.loads((latest_checkpoint(second.run_dir) / "trainer_state.json").read_text())
    assert state["sampler"]["num_conversations"] == 40


def test_a_bad_row_is_one_line_naming_file_and_row_and_nothing_is_written(
    tmp_path, tiny_corpus, tiny_config_file, pretrained, capsys
):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]},
        {"messages": [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": " "}]},
    ])
    config = sft_config(tmp_path, tiny_config_file, tiny_corpus, bad, pretrained, tmp_path / "run")
    assert tinyseek(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tinyseek train: error: {bad} row 2: turn 2 is an empty assistant turn") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_builtin_pretraining_data_leaves_out_the_held_out_stories():
    documents = [document.text for document in open_source("builtin").documents()]
    held_out = held_out_stories()
    assert held_out and not any(map(is_held_out_story, documents))
    assert len(documents) + len(held_out) == 2316  # the whole built-in sample, less the held-out stories
