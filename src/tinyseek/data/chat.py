"""The one chat template: how a conversation becomes token ids, which of them the model learns to write, and where
a reply ends.

The template lives in the tokenizer (`chat_template` in tokenizer_config.json), so the trainer, the server,
`tinyseek chat` and `apply_chat_template` on an export in plain transformers all render a conversation the same way.
It begins as `encode_prompt` begins a prompt (BOS, else EOS), puts a system message as plain text before the first
turn, each user turn after `<|User|>` and each assistant turn between `<|Assistant|>` and `<|EOT|>`:

    BOS system\\n\\n <|User|>question<|Assistant|>answer<|EOT|> <|User|>...<|Assistant|>

(without the spaces). The built-in DeepSeek-Coder tokenizer has these three tokens in its vocabulary (ids 32019 to
32021); `tinyseek tokenizer train` reserves them.

A model says it was trained on conversations with `chat_trained: true` in its config.json: the template is only used
for such models unless the user explicitly asks otherwise (see `tinyseek.serve`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"
END_OF_TURN_TOKEN = "<|EOT|>"
CHAT_TOKENS = (USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN)
SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant")
# The config.json key that says a model was fine-tuned on conversations rendered with this template.
CHAT_TRAINED = "chat_trained"

# Jinja, as transformers, llama.cpp and vLLM read it; one line so that no template whitespace leaks into the text.
CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% else %}{{ eos_token }}{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'developer'] -%}"
    "{%- if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif -%}"
    "{{ message['content'] }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}" + USER_TOKEN + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT_TOKEN + "{{ message['content'] }}" + END_OF_TURN_TOKEN +
    "{%- else -%}{{ raise_exception('unsupported role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}" + ASSISTANT_TOKEN + "{% endif -%}"
)

Message = Mapping[str, str]


class ChatTemplateError(ValueError):
    """The tokenizer cannot render conversations with tinyseek's template."""


def chat_token_ids(tokenizer) -> dict[str, int]:
    """The ids of the role and end-of-turn tokens; ChatTemplateError when the vocabulary lacks one."""
    ids = {}
    for token in CHAT_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ChatTemplateError(f"the tokenizer has no {token} token; tinyseek's chat template needs {CHAT_TOKENS}")
        ids[token] = token_id
    return ids


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries tinyseek's template (and so its tokens)."""
    return getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE


def render_chat(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
    """The ids of a conversation, through the tokenizer's own `apply_chat_template`. With `add_generation_prompt`
    they end in `<|Assistant|>`, where the model's reply begins."""
    if not has_chat_template(tokenizer):
        raise ChatTemplateError("the tokenizer has no tinyseek chat template (chat_template in tokenizer_config.json)")
    rendered = tokenizer.apply_chat_template(
        [dict(message) for message in messages], tokenize=True, add_generation_prompt=add_generation_prompt,
        return_dict=True,
    )
    return list(rendered["input_ids"])


def assistant_mask(tokenizer, ids: Sequence[int]) -> list[bool]:
    """Per id of a rendered conversation, whether the model is taught to write it: each assistant turn's content and
    the `<|EOT|>` that ends it (not `<|Assistant|>`, which the prompt always supplies)."""
    special = chat_token_ids(tokenizer)
    assistant, end_of_turn, user = special[ASSISTANT_TOKEN], special[END_OF_TURN_TOKEN], special[USER_TOKEN]
    mask, inside = [], False
    for token in ids:
        if token == assistant:
            mask.append(False)
            inside = True
        elif token == user:
            mask.append(False)
            inside = False
        else:
            mask.append(inside)
            if token == end_of_turn:
                inside = False
    return mask


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids a reply ends at: `<|EOT|>`, and `<|User|>` or EOS in case a model writes one of them instead."""
    special = chat_token_ids(tokenizer)
    ids = [special[END_OF_TURN_TOKEN], special[USER_TOKEN]]
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def is_chat_trained(config) -> bool:
    """Whether a model's config (a PretrainedConfig or the dict of its config.json) says it was chat-trained."""
    value = config.get(CHAT_TRAINED, False) if isinstance(config, Mapping) else getattr(config, CHAT_TRAINED, False)
    return value is True


def chat_refusal(config, tokenizer, *, base_model_allowed: bool) -> str | None:
    """Why conversations with this model cannot be rendered in the template, or None when they can: the tokenizer
    must carry the template, and the model must be chat-trained unless the user allowed a base model explicitly."""
    if tokenizer is None or not has_chat_template(tokenizer):
        return "its tokenizer has no tinyseek chat template (chat_template in tokenizer_config.json)"
    if not is_chat_trained(config) and not base_model_allowed:
        return (f"it is a base model: its config.json does not say {CHAT_TRAINED}: true, so it never learned the chat "
                "template; fine-tune it on conversations, or start with --chat-template-for-base-model to use the "
                "template anyway")
    return None


def mark_chat_trained(config) -> None:
    """Record in a model's config that it was fine-tuned on conversations in this template (the SFT stage's call)."""
    setattr(config, CHAT_TRAINED, True)
