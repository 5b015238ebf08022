"""The chat template, the built-in instruction data and the chat-data readers (tinyseek.data.chat, .instruct,
.conversations): ids compared with hand-built references, plain transformers on an export, and the shipped file."""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from tinyseek.data.builtin import BUILTIN_INSTRUCT, BUILTIN_TOKENIZER
from tinyseek.data.chat import (
    CHAT_TEMPLATE,
    assistant_mask,
    chat_refusal,
    chat_token_ids,
    end_of_turn_ids,
    is_chat_trained,
    mark_chat_trained,
    render_chat,
)
from tinyseek.data.conversations import read_conversations
from tinyseek.data.instruct import (
    builtin_stories,
    held_out_stories,
    is_held_out_story,
    story_conversations,
    write_instruct_data,
)
from tinyseek.data.tokenizer import encode_prompt, load_tokenizer, train_bpe_tokenizer
from tinyseek.errors import InputError

CONVERSATION = [
    {"role": "system", "content": "You write stories."},
    {"role": "user", "content": "Write a story about a dog named Max."},
    {"role": "assistant", "content": "Max was a happy dog. He liked to run."},
    {"role": "user", "content": "Now one about a cat, héhé."},
    {"role": "assistant", "content": "The cat sat on the mat."},
    {"role": "user", "content": "Thanks!"},
]

# In a fresh interpreter: plain transformers renders the messages with the folder's template.
APPLY_TEMPLATE_WITH_PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer.apply_chat_template(json.loads(sys.argv[2]), tokenize=True, add_generation_prompt=True,
                                    return_dict=True)["input_ids"]
assert not any(name.startswith("tinyseek") for name in sys.modules), "tinyseek was imported"
print(json.dumps(list(ids)))
"""


@pytest.fixture(scope="module")
def builtin_tokenizer():
    return load_tokenizer("builtin")


def reference_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    """The template written out by hand: BOS as encode_prompt starts, system text and a blank line, then the turns
    between their role tokens, each piece of text encoded on its own."""
    special = chat_token_ids(tokenizer)
    user, assistant, end = special["<|User|>"], special["<|Assistant|>"], special["<|EOT|>"]

    def text(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False).input_ids

    ids = encode_prompt(tokenizer, "")
    for message in messages:
        if message["role"] == "system":
            ids += text(message["content"] + "\n\n")
        elif message["role"] == "user":
            ids += [user] + text(message["content"])
        else:
            ids += [assistant] + text(message["content"]) + [end]
    return ids + [assistant] if add_generation_prompt else ids


def test_the_builtin_tokenizer_has_the_chat_tokens_at_their_vocabulary_ids_and_the_template(builtin_tokenizer):
    assert chat_token_ids(builtin_tokenizer) == {"<|User|>": 32019, "<|Assistant|>": 32020, "<|EOT|>": 32021}
    stored = json.loads((BUILTIN_TOKENIZER / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert stored["chat_template"] == CHAT_TEMPLATE
    assert end_of_turn_ids(builtin_tokenizer) == [32021, 32019, builtin_tokenizer.eos_token_id]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_the_hand_built_ids_and_plain_transformers(builtin_tokenizer, add_generation_prompt):
    messages = CONVERSATION if add_generation_prompt else CONVERSATION[:5]
    ours = render_chat(builtin_tokenizer, messages, add_generation_prompt=add_generation_prompt)
    assert ours == reference_ids(builtin_tokenizer, messages, add_generation_prompt)
    plain = AutoTokenizer.from_pretrained(BUILTIN_TOKENIZER).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True)["input_ids"]
    assert ours == list(plain)
    # A conversation begins as a prompt does (BOS), so chat and plain prompts are conditioned alike.
    assert ours[0] == encode_prompt(builtin_tokenizer, "x")[0] == builtin_tokenizer.bos_token_id


def test_bad_conversations_are_refused_by_the_template(builtin_tokenizer):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="system message must come first"):
        render_chat(builtin_tokenizer, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(TemplateError, match="unsupported role tool"):
        render_chat(builtin_tokenizer, [{"role": "tool", "content": "a"}])


def test_the_assistant_mask_is_exactly_what_each_assistant_turn_adds_to_the_rendering(builtin_tokenizer):
    ids = render_chat(builtin_tokenizer, CONVERSATION)
    mask = assistant_mask(builtin_tokenizer, ids)
    expected = [False] * len(ids)
    for index, message in enumerate(CONVERSATION):
        if message["role"] == "assistant":
            start = len(render_chat(builtin_tokenizer, CONVERSATION[:index], add_generation_prompt=True))
            end = len(render_chat(builtin_tokenizer, CONVERSATION[: index + 1]))
            expected[start:end] = [True] * (end - start)
    assert mask == expected
    taught = [token for token, learn in zip(ids, mask) if learn]
    assert builtin_tokenizer.decode(taught) == "Max was a happy dog. He liked to run.<|EOT|>The cat sat on the mat.<|EOT|>"


def test_a_trained_tokenizer_reserves_the_chat_tokens_and_renders_as_the_hand_built_reference(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in builtin_stories()[:100]))
    out = train_bpe_tokenizer(corpus, 400, tmp_path / "bpe")
    tokenizer = load_tokenizer(out)
    assert chat_token_ids(tokenizer) == {"<|User|>": 3, "<|Assistant|>": 4, "<|EOT|>": 5}
    assert json.loads((out / "tinyseek_tokenizer.json").read_text())["chat_tokens"] == chat_token_ids(tokenizer)
    ours = render_chat(tokenizer, CONVERSATION, add_generation_prompt=True)
    assert ours == reference_ids(tokenizer, CONVERSATION, True)
    assert ours[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("format", ["tinyseek", "transformers"])
def test_an_export_carries_the_template_the_chat_mark_and_the_end_of_turn_stop(
    tmp_path, tiny_model, builtin_tokenizer, format, one_thread
):
    from tinyseek.generate.export import export
    from tinyseek.loading import load_model_and_tokenizer

    model = tiny_model(attention_type="mla", ffn_type="moe", scoring_func="sigmoid", vocab_size=32256)
    assert chat_refusal(model.config, builtin_tokenizer, base_model_allowed=False) is not None
    mark_chat_trained(model.config)
    out = export(model, builtin_tokenizer, tmp_path / "exported", format)

    config = json.loads((out / "config.json").read_text())
    assert is_chat_trained(config)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == end_of_turn_ids(
        builtin_tokenizer)
    plain = subprocess.run(
        [sys.executable, "-c", APPLY_TEMPLATE_WITH_PLAIN_TRANSFORMERS, str(out), json.dumps(CONVERSATION)],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(plain.stdout) == render_chat(builtin_tokenizer, CONVERSATION, add_generation_prompt=True)
    loaded, tokenizer = load_model_and_tokenizer(out)
    assert chat_refusal(loaded.config, tokenizer, base_model_allowed=False) is None


def test_the_shipped_instruction_data_is_what_the_script_makes(tmp_path):
    rebuilt = tmp_path / "instruct.jsonl.gz"
    count = write_instruct_data(rebuilt)
    assert rebuilt.read_bytes() == BUILTIN_INSTRUCT.read_bytes()
    with gzip.open(BUILTIN_INSTRUCT, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert len(rows) == count
    kinds = {kind: sum(row["kind"] == kind for row in rows) for kind in ("about", "words", "continue", "summary", "self")}
    assert kinds["about"] > 1000 and kinds["self"] >= 200 and min(kinds.values()) > 0
    assert any("tinyseek developers" in row["messages"][1]["content"] for row in rows if row["kind"] == "self")


def test_each_about_conversation_also_comes_renamed_to_another_introduced_name():
    from tinyseek.data.instruct import RENAMED_COPIES

    with gzip.open(BUILTIN_INSTRUCT, "rt", encoding="utf-8") as handle:
        about = [row for row in map(json.loads, handle) if row["kind"] == "about"]
    originals = [row for row in about if "renamed_from" not in row]
    assert len(about) == (1 + RENAMED_COPIES) * len(originals)
    assert len({row["name"] for row in about}) > 100  # far more than the handful of names TinyStories repeats
    source = None
    for row in about:
        if "renamed_from" not in row:
            source = row
            continue
        assert row["renamed_from"] == source["name"] != row["name"]
        old = re.compile(rf"\b{source['name']}\b")
        for before, after in zip(source["messages"], row["messages"], strict=True):
            assert after["content"] == old.sub(row["name"], before["content"])
            assert row["name"] in after["content"] and not old.search(after["content"])


def test_held_out_stories_are_a_stable_share_and_give_no_conversation():
    stories, held_out = builtin_stories(), held_out_stories()
    assert 0.03 * len(stories) < len(held_out) < 0.07 * len(stories)
    assert held_out == [text for text in stories if is_held_out_story(text)]
    shipped = set()
    for conversation in read_conversations("builtin-chat"):
        shipped.update(message["content"] for message in conversation.messages)
    for story in held_out:
        # Templated summaries may coincide between stories; the story's own text never appears.
        for made in story_conversations(story):
            story_text = made["messages"][0 if made["kind"] == "summary" else 1]["content"]
            assert story_text not in shipped


def test_story_instructions_take_their_character_thing_and_words_from_the_story():
    story = ("Once upon a time, there was a little girl named Lily. She had a red ball. Lily liked to throw the ball "
             "to her dog. One day the ball rolled into the pond. Lily was sad. Her dog jumped in and got it.")
    made = {item["kind"]: item["messages"] for item in story_conversations(story)}
    assert made["about"][0]["content"] == "Write a story about a little girl named Lily and a red ball."
    assert made["about"][1]["content"] == story
    (second,) = set(made) - {"about"}
    prompt, answer = made[second][0]["content"], made[second][1]["content"]
    if second == "words":
        assert all(word.strip('"') in story for word in prompt.removesuffix(".").split(" words ")[1].replace(
            " and ", ", ").split(", "))
    elif second == "continue":
        assert prompt.removeprefix("Continue this story: ") + " " + answer == story
    else:
        assert answer.startswith("This story is about a little girl named Lily. It begins: Once upon a time")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_every_chat_form_reads_as_the_same_messages(tmp_path):
    pair = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    files = {
        "openai": write_jsonl(tmp_path / "openai.jsonl", [{"messages": [{"role": "system", "content": "S"}, *pair]}]),
        "sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
            {"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]),
        "pairs": write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "response": "Hello!"},
                                                        {"prompt": "Hi", "completion": "Hello!"}]),
    }
    read = {form: [c.messages for c in read_conversations(path)] for form, path in files.items()}
    assert read["openai"] == read["sharegpt"] == [[{"role": "system", "content": "S"}, *pair]]
    assert read["pairs"] == [pair, pair]
    first = next(read_conversations("builtin-chat"))
    assert first.where == str(BUILTIN_INSTRUCT) and first.row == 1 and first.messages[1]["role"] == "assistant"


BAD_ROWS = [
    ({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}, "row 2: turn 1 has no 'role'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     "row 2: turn 2 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "row 2 has no assistant turn"),
    ({"conversations": [{"from": "alien", "value": "Hi"}]}, "row 2: turn 1 has the unknown from 'alien'"),
    ({"text": "just text"}, "row 2 is not a conversation (columns: 'text')"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_a_bad_row_is_one_line_naming_the_file_and_row(tmp_path, row, message):
    good = {"prompt": "Hi", "response": "Hello!"}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, row])
    with pytest.raises(InputError) as error:
        list(read_conversations(path))
    assert str(error.value).startswith(f"{path} {message}") and "\n" not in str(error.value)


def test_a_conversation_longer_than_the_window_is_refused_naming_its_row(tmp_path, builtin_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Hi", "response": "Hello!"},
                                                 {"prompt": "Hi " * 50, "response": "Hello!"}])
    with pytest.raises(InputError, match=r"chat.jsonl row 2: the conversation is \d+ tokens long, longer than the "
                                         r"window of 32"):
        list(read_conversations(path, tokenizer=builtin_tokenizer, window=32))


def test_a_hub_chat_dataset_is_read_through_datasets(tmp_path, monkeypatch):
    """The Hub path, offline: `datasets.load_dataset` of the Hub name answers with a local parquet copy of
    HuggingFaceTB/smol-smoltalk's schema (a `messages` column of {content, role} lists)."""
    import datasets

    rows = [{"messages": [{"content": f"Question {i}", "role": "user"}, {"content": f"Answer {i}", "role": "assistant"}],
             "source": "test"} for i in range(3)]
    local = tmp_path / "smol-smoltalk.parquet"
    datasets.Dataset.from_list(rows).to_parquet(local)
    load_dataset = datasets.load_dataset
    asked = []

    def from_local_copy(name, split, streaming=False):
        asked.append((name, split))
        return load_dataset("parquet", data_files={split: str(local)}, split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", from_local_copy)
    read = list(read_conversations("HuggingFaceTB/smol-smoltalk", split="train"))
    assert asked == [("HuggingFaceTB/smol-smoltalk", "train")]
    assert [c.messages for c in read] == [[{"role": m["role"], "content": m["content"]} for m in row["messages"]]
                                          for row in rows]
    assert read[2].where == "HuggingFaceTB/smol-smoltalk[train]" and read[2].row == 3


CHAPTER = """## Chapter: Chapter 2: Medieval Religions

### Introduction

{words}

### Section: 2.2 Historical Perspectives on Religion:

#### 2.2b Medieval Religions

##### The Crusades

{words}

##### Too short

A few words only.

### Exercises

#### Exercise 1

{words}
"""


def test_textbook_sections_become_questions_and_whole_courses_are_held_out(tmp_path):
    from tinyseek.data.textbook import QUESTIONS, is_held_out_course, textbook_conversations

    courses = [f"Course {number}" for number in range(100)]
    held_out = next(name for name in courses if is_held_out_course(name))
    kept = next(name for name in courses if not is_held_out_course(name))
    words = " ".join(f"word{number}" for number in range(50))
    path = write_jsonl(tmp_path / "books.jsonl", [{"text": CHAPTER.format(words=words), "course_name": name}
                                                  for name in (held_out, kept)])
    made = list(textbook_conversations(path))
    assert len(made) == 1 and made[0]["kind"] == "textbook"
    question, answer = (message["content"] for message in made[0]["messages"])
    assert question in {template.format(topic="The Crusades", course=kept) for template in QUESTIONS}
    assert answer == words


def test_the_textbook_recipe_reads_the_library_of_phi_corpus(shared_data):
    from tinyseek.data.textbook import COURSE_COLUMN, is_held_out_course, textbook_conversations

    corpus = shared_data / "corpus" / "library_of_phi_gpt4.jsonl"
    made = list(textbook_conversations(corpus))
    assert len(made) > 5000
    courses = {json.loads(line)[COURSE_COLUMN] for line in corpus.open(encoding="utf-8")}
    held_out = [course for course in courses if is_held_out_course(course)]
    assert held_out and len(held_out) < len(courses) / 4
    questions = [row["messages"][0]["content"] for row in made]
    assert not any(question.endswith(f", from {course}.") for course in held_out for question in questions)
    assert not any(re.fullmatch(r"(Explain|What should I know about) (Introduction|Exercises?( \d+)?|Conclusion)[.?]",
                                question) for question in questions)


def test_held_out_instructions_are_scored_by_their_rules_and_an_echo_passes_nothing():
    from tinyseek.data.instruction_rules import Score, distinct_ngrams, held_out_instructions, score

    instructions = held_out_instructions()
    by_kind = {kind: [i for i in instructions if i.kind == kind] for kind in ("about", "words", "self")}
    assert len(by_kind["about"]) > 60 and by_kind["words"] and by_kind["self"]
    shipped_prompts = {c.messages[0]["content"] for c in read_conversations("builtin-chat")}
    assert not any(instruction.prompt in shipped_prompts for instruction in by_kind["self"])
    # The held-out story an instruction was made from passes its rule.
    for story in held_out_stories():
        for made in story_conversations(story):
            matching = [i for i in instructions if i.prompt == made["messages"][0]["content"]]
            for instruction in matching:
                result = score(instruction, made["messages"][1]["content"], stopped=True)
                assert result.passed == 1.0 or not result.long_enough

    about = by_kind["about"][0]
    filler = " ".join(["and then they played in the park"] * 10)
    assert score(about, f"{about.prompt} {filler}", stopped=True).passed == 0.0  # the name only in the echo
    assert score(about, f"{about.prompt} {about.name} was happy.", stopped=True).long_enough is False
    assert score(about, f"{filler} {about.name} smiled.", stopped=False) == Score(1.0, True, False)
    words = by_kind["words"][0]
    half = f"{filler} {words.words[0]}"
    assert score(words, half, stopped=True).passed == pytest.approx(1 / len(words.words))
    assert score(by_kind["self"][0], "I am tinyseek, made by the tinyseek developers.", True).passed == 1.0
    assert score(by_kind["self"][0], "I am a robot.", True).passed == 0.0
    assert distinct_ngrams(["a b c d a b c d"]) == pytest.approx(4 / 5)


# --- one template, the same ids everywhere -------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Write a story about a dog named Max."}],
    [{"role": "system", "content": "Tu écris des histoires pour enfants."},
     {"role": "user", "content": "Une histoire sur un chat — 猫, über Ünïcödé 🐈, s'il te plaît.\n\nMerci !"}],
    CONVERSATION,
]

# In a fresh interpreter: plain transformers renders each conversation with the folder's template.
APPLY_TEMPLATE_TO_EACH = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps([list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"])
                  for messages in json.loads(sys.argv[2])]))
"""


@pytest.mark.parametrize("tokenizer_kind", ["builtin", "trained"])
def test_the_trainer_the_server_tinyseek_chat_and_plain_transformers_give_identical_ids(
    tmp_path, tiny_model, builtin_tokenizer, tokenizer_kind, monkeypatch, one_thread
):
    """The trainer renders with `render_chat`; the server and `tinyseek chat` through their own code paths (the ids
    the server queues, the ids the chat loop builds from its history and system message); plain transformers from an
    export. The playground sends its conversation to the server's endpoint: tests/test_serve.py's browser test
    checks the ids the server receives from it against `render_chat` too."""
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from tinyseek.chat import ChatSession, build_parser
    from tinyseek.generate.export import export
    from tinyseek.serve.app import create_app
    from tinyseek.serve.scheduler import Scheduler

    if tokenizer_kind == "builtin":
        tokenizer = builtin_tokenizer
    else:
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in builtin_stories()[:100]))
        tokenizer = load_tokenizer(train_bpe_tokenizer(corpus, 400, tmp_path / "bpe"))
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=512, scoring_func="sigmoid")
    mark_chat_trained(model.config)
    trainer = [render_chat(tokenizer, messages, add_generation_prompt=True) for messages in CONVERSATIONS]

    queued = []
    submit = Scheduler.submit

    def recording(self, job):
        queued.append(job.prompt_ids)
        return submit(self, job)

    monkeypatch.setattr(Scheduler, "submit", recording)
    with TestClient(create_app(model, tokenizer)) as client:
        for messages in CONVERSATIONS:
            reply = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
            assert reply.status_code == 200, reply.text
    assert queued == trainer

    session = ChatSession(model, tokenizer, build_parser().parse_args(["--model", "unused"]), io.StringIO(),
                          io.StringIO())
    chat_command = []
    for messages in CONVERSATIONS:
        system = [message["content"] for message in messages if message["role"] == "system"]
        session.system = system[0] if system else ""
        session.messages = [message for message in messages if message["role"] != "system"]
        chat_command.append(session.prompt_ids())
    assert chat_command == trainer

    out = export(model, tokenizer, tmp_path / "exported", "transformers")
    plain = subprocess.run([sys.executable, "-c", APPLY_TEMPLATE_TO_EACH, str(out), json.dumps(CONVERSATIONS)],
                           capture_output=True, text=True, check=True)
    assert json.loads(plain.stdout) == trainer
    # And the ids are the template's, built by hand.
    assert trainer == [reference_ids(tokenizer, messages, True) for messages in CONVERSATIONS]
