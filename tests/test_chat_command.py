"""`tinyseek chat` driven through piped stdin on tiny random models: the ids it generates from are the chat
template's, replies end at the end of a turn, history is trimmed to the context with a note, and the commands work."""

from __future__ import annotations

import io

import pytest
import torch

from tinyseek.cli import main as tinyseek_main
from tinyseek.data.chat import END_OF_TURN_TOKEN, mark_chat_trained, render_chat
from tinyseek.generate.engine import GenerationEngine
from tinyseek.generate.sampling import Sampling
from tinyseek.loading import load_model_and_tokenizer
from tinyseek.route import expert_colour

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model, letters_only, chat_byte_tokenizer, write_run):
    """A chat-trained MoE model that writes lowercase letters (so its replies read back to the same ids)."""
    model = letters_only(tiny_model(max_position_embeddings=64, vocab_size=len(chat_byte_tokenizer)))
    mark_chat_trained(model.config)
    return write_run(tmp_path_factory.mktemp("chat") / "run", model, chat_byte_tokenizer).parent.parent


@pytest.fixture
def prompts_seen(monkeypatch):
    """Every prompt (ids) the chat loop hands to the engine, in order."""
    seen = []
    stream = GenerationEngine.stream

    def recording(self, prompt_ids, *args, **kwargs):
        seen.append(list(prompt_ids[0]))
        return stream(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(GenerationEngine, "stream", recording)
    return seen


def chat(monkeypatch, capsys, run_dir, lines: list[str], *options: str) -> tuple[list[str], str]:
    """(the replies on stdout, stderr) of a session fed `lines`."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    assert tinyseek_main(["chat", "--run-dir", str(run_dir), "--device", "cpu", *options]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err


def test_the_loop_renders_the_template_keeps_history_and_obeys_its_commands(
    chat_run, monkeypatch, capsys, prompts_seen
):
    lines = ["hello", "/system be brief", "more", "/temperature 0", "again", "/reset", "fresh", "/temperature x"]
    replies, log = chat(monkeypatch, capsys, chat_run, lines, "--max-new-tokens", "4", "--seed", "3")
    assert len(replies) == 4 and all(replies)
    user = [{"role": "user", "content": text} for text in ("hello", "more", "again", "fresh")]
    said = [{"role": "assistant", "content": text} for text in replies]
    system = [{"role": "system", "content": "be brief"}]
    expected = [
        [user[0]],
        system + [user[0], said[0], user[1]],
        system + [user[0], said[0], user[1], said[1], user[2]],
        system + [user[3]],
    ]
    _, tokenizer = load_model_and_tokenizer(chat_run)
    assert prompts_seen == [render_chat(tokenizer, messages, add_generation_prompt=True) for messages in expected]
    assert "(temperature 0)" in log and "(conversation cleared)" in log
    assert "/temperature takes a number >= 0, got 'x'" in log

    # After /temperature 0 the replies are greedy: the engine's own greedy continuation of the same ids.
    model, _ = load_model_and_tokenizer(chat_run)
    (greedy,) = GenerationEngine(model, tokenizer).generate([prompts_seen[2]], Sampling(temperature=0), 4)
    assert replies[2] == greedy.text


def test_the_oldest_exchanges_are_dropped_with_a_note_when_the_context_is_full(
    chat_run, monkeypatch, capsys, prompts_seen
):
    lines = ["abcdefghijklmnopqrst", "uvwxyzabcdefghijklmn", "opqrstuvwxyzabcdefgh"]
    replies, log = chat(monkeypatch, capsys, chat_run, lines, "--max-new-tokens", "8", "--temperature", "0")
    _, tokenizer = load_model_and_tokenizer(chat_run)
    kept = [{"role": "user", "content": lines[1]}, {"role": "assistant", "content": replies[1]},
            {"role": "user", "content": lines[2]}]
    assert prompts_seen[2] == render_chat(tokenizer, kept, add_generation_prompt=True)
    assert "(dropped the oldest 1 exchange to fit the model's 64 positions)" in log

    replies, log = chat(monkeypatch, capsys, chat_run, ["x" * 70, "short"], "--max-new-tokens", "8")
    assert len(replies) == 1 and "write a shorter one" in log


def test_a_reply_ends_at_the_end_of_turn_token(tiny_model, chat_byte_tokenizer, write_run, tmp_path, monkeypatch,
                                               capsys, prompts_seen):
    model = tiny_model(max_position_embeddings=64, vocab_size=len(chat_byte_tokenizer))
    end_of_turn = chat_byte_tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    # The residual stream's first channel is dominated by the input token's embedding: +100 everywhere, -100 for
    # "z". The head reads only that channel: "z" wins where it is positive, <|EOT|> where it is negative (after "z").
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.model.embed_tokens.weight[ord("z"), 0] = -100.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[ord("z"), 0] = 1.0
        model.lm_head.weight[end_of_turn, 0] = -2.0
    mark_chat_trained(model.config)
    run_dir = write_run(tmp_path / "run", model, chat_byte_tokenizer).parent.parent
    replies, _ = chat(monkeypatch, capsys, run_dir, ["hi", "bye"], "--temperature", "0", "--max-new-tokens", "20")
    assert replies == ["z", "z"]  # without the stop, <|EOT|> would be followed by "z" again, up to 20 tokens
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "z"},
               {"role": "user", "content": "bye"}]
    assert prompts_seen[1] == render_chat(chat_byte_tokenizer, history, add_generation_prompt=True)


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on(chat_run, monkeypatch, capsys, prompts_seen):
    stream = GenerationEngine.stream

    def interrupted_after_two_tokens(self, *args, **kwargs):
        steps = stream(self, *args, **kwargs)
        for step, events in enumerate(steps):
            if step == 2 and len(prompts_seen) == 1:
                raise KeyboardInterrupt
            yield events

    monkeypatch.setattr(GenerationEngine, "stream", interrupted_after_two_tokens)
    replies, log = chat(monkeypatch, capsys, chat_run, ["hello", "again"], "--max-new-tokens", "6")
    assert "(reply stopped)" in log
    assert len(replies[0]) == 2 and len(replies[1]) == 6


def test_the_expert_view_tags_each_token_with_its_expert_in_the_chosen_layer(chat_run, monkeypatch, capsys):
    replies, log = chat(monkeypatch, capsys, chat_run, ["/experts 1", "hello", "/experts", "/reset", "hello", "/experts 5"],
                        "--temperature", "0", "--max-new-tokens", "5")
    model, tokenizer = load_model_and_tokenizer(chat_run)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "hello"}], add_generation_prompt=True)
    (reference,) = GenerationEngine(model, tokenizer).generate([prompt], Sampling(temperature=0), 5)
    steps = list(GenerationEngine(model, tokenizer).stream([prompt], Sampling(temperature=0), 5, capture=True))
    layer = [index for index, layer in enumerate(model.model.layers) if layer.feed_forward_spec.routes].index(1)
    assert replies[0] == "".join(f"[{event.experts[layer][0]}]{event.text}" for (event,) in steps)
    assert replies[1] == reference.text  # the view toggled off
    assert "expert view on" in log and "expert view off" in log and "/experts takes a MoE layer's index" in log

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    monkeypatch.setattr("sys.stdin", io.StringIO("/experts 1\nhello\n"))
    assert tinyseek_main(["chat", "--run-dir", str(chat_run), "--device", "cpu", "--temperature", "0",
                          "--max-new-tokens", "5"]) == 0
    colours = [tuple(int(expert_colour(event.experts[layer][0])[i: i + 2], 16) for i in (1, 3, 5))
               for (event,) in steps]
    assert terminal.getvalue() == "".join(f"\x1b[38;2;{r};{g};{b}m{event.text}\x1b[0m"
                                          for (r, g, b), (event,) in zip(colours, steps)) + "\n"


def test_a_base_model_is_refused_unless_asked_for_explicitly(tiny_model, letters_only, chat_byte_tokenizer,
                                                             write_run, tmp_path, monkeypatch, capsys):
    model = letters_only(tiny_model(max_position_embeddings=64, vocab_size=len(chat_byte_tokenizer)))
    run_dir = write_run(tmp_path / "run", model, chat_byte_tokenizer).parent.parent
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert tinyseek_main(["chat", "--run-dir", str(run_dir), "--device", "cpu"]) == 2
    assert "it is a base model" in capsys.readouterr().err
    replies, _ = chat(monkeypatch, capsys, run_dir, ["hi"], "--chat-template-for-base-model", "--max-new-tokens", "3")
    assert len(replies) == 1 and len(replies[0]) == 3
