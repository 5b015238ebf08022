"""What an export says about itself: a short model card (the architecture, how the model was trained, whether it was
chat-trained, the licences it inherits, how to load it) and the licence files of the tokenizer and data it was made
with.

How the model was trained is read from the checkpoint's trainer_state.json (the run's resolved configuration, steps
and tokens) when the export comes from a run or a checkpoint; a folder export keeps that record
(`TRAINING_RECORD`), so exporting an export again loses nothing. A model folder without one says so instead of
guessing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tinyseek.data.builtin import BUILTIN, BUILTIN_CHAT, BUILTIN_CORPUS, BUILTIN_TOKENIZER
from tinyseek.data.chat import CHAT_TOKENS, is_chat_trained
from tinyseek.runs import TRAINER_STATE

CARD = "README.md"
LICENCES = "licenses"
TRAINING_RECORD = "training_state.json"
# What of a trainer_state.json describes how the model was trained (the rest is the resume machinery's).
PROVENANCE_KEYS = ("step", "tokens", "train_seconds", "config")


@dataclass(frozen=True)
class Licence:
    """Files under a licence of their own that an export inherits, copied unchanged into `licenses/FOLDER/`."""

    name: str
    covers: str
    folder: str
    files: tuple[Path, ...]


TOKENIZER_LICENCE = Licence(
    "DEEPSEEK LICENSE AGREEMENT v1.0",
    "the tokenizer (DeepSeek-Coder's vocabulary and merges), with the use restrictions of its Attachment A, which "
    "pass on to whoever receives it",
    "deepseek-coder-tokenizer",
    (BUILTIN_TOKENIZER / "NOTICE", BUILTIN_TOKENIZER / "LICENSE-MODEL"),
)
DATA_LICENCE = Licence(
    "CDLA-Sharing-1.0",
    "the built-in TinyStories sample (Ronen Eldan and Yuanzhi Li, 2023) and the instruction conversations made from "
    "it: the data, not the weights (the agreement puts no obligation on models trained on the data)",
    "tinystories-data",
    (BUILTIN_CORPUS.parent / "README.md", BUILTIN_CORPUS.parent / "LICENSE-CDLA-Sharing-1.0.txt"),
)
BUILTIN_DATA = (BUILTIN, BUILTIN_CHAT)


def training_record(folder: Path) -> dict[str, Any] | None:
    """How the model in `folder` (a checkpoint or an export) was trained, or None where nothing recorded it."""
    for name in (TRAINER_STATE, TRAINING_RECORD):
        path = folder / name
        if path.is_file():
            state = json.loads(path.read_text(encoding="utf-8"))
            return {key: state[key] for key in PROVENANCE_KEYS if key in state}
    return None


def data_sources(training: dict[str, Any] | None) -> list[str]:
    """Every data source the run's configuration names: each section's `source` (or `data`) and `mixture` entries,
    so a fine-tuning stage's conversations count as the corpus does. The tokenizer is not data."""
    found: list[str] = []

    def visit(node: Any) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in ("source", "data") and isinstance(value, str):
                found.append(value)
            elif key == "mixture" and isinstance(value, dict):
                found.extend(value)
            else:
                visit(value)

    visit((training or {}).get("config"))
    return list(dict.fromkeys(found))


def is_builtin_tokenizer(tokenizer) -> bool:
    """Whether the tokenizer has DeepSeek-Coder's vocabulary (the built-in tokenizer, or a copy saved with a run)."""
    from tinyseek.data.tokenizer import load_tokenizer

    return tokenizer is not None and tokenizer.get_vocab() == load_tokenizer(BUILTIN).get_vocab()


def inherited_licences(tokenizer, training: dict[str, Any] | None) -> list[Licence]:
    """The licences of what the export was made with: the built-in tokenizer's, and the built-in data's where the run
    trained on it. The weights themselves are the user's."""
    licences = [TOKENIZER_LICENCE] if is_builtin_tokenizer(tokenizer) else []
    if any(source in BUILTIN_DATA for source in data_sources(training)):
        licences.append(DATA_LICENCE)
    return licences


def licence_text(licence: Licence) -> str:
    return "\n\n".join(path.read_text(encoding="utf-8") for path in licence.files)


def write_card(out: Path, card: str, licences: list[Licence], training: dict[str, Any] | None) -> None:
    """README.md, the licence files under licenses/ and the training record, beside a folder export's weights."""
    (out / CARD).write_text(card, encoding="utf-8")
    for licence in licences:
        folder = out / LICENCES / licence.folder
        folder.mkdir(parents=True, exist_ok=True)
        for path in licence.files:
            shutil.copyfile(path, folder / path.name)
    if training is not None:
        (out / TRAINING_RECORD).write_text(json.dumps(training, indent=1), encoding="utf-8")


def model_card(model, licences: list[Licence], training: dict[str, Any] | None, format: str, name: str) -> str:
    """The card, in Markdown (with the Hub's YAML header for a folder export); `model` is the tinyseek model,
    `licences` what `inherited_licences` found."""
    config = model.config
    chat_trained = is_chat_trained(config)
    sections = [
        f"# {name}\n\nA small DeepSeek-style language model made with tinyseek"
        + (", fine-tuned for chat." if chat_trained else ": a base model, which continues text."),
        "## Architecture\n\n" + architecture_table(model, format),
        "## Training\n\n" + training_section(training, chat_trained),
        "## Use\n\n" + usage_section(config, chat_trained, format, name),
        "## Licences\n\n" + licence_section(licences, training, format),
    ]
    card = "\n\n".join(sections) + "\n"
    return card if format == "gguf" else hub_header(licences, chat_trained) + card


def hub_header(licences: list[Licence], chat_trained: bool) -> str:
    """The Hugging Face Hub's model-card metadata."""
    header: dict[str, Any] = {
        "library_name": "transformers", "pipeline_tag": "text-generation",
        "tags": ["tinyseek", "deepseek"] + (["chat"] if chat_trained else []),
    }
    if TOKENIZER_LICENCE in licences:
        header.update(license="other", license_name="deepseek-license",
                      license_link=f"{LICENCES}/{TOKENIZER_LICENCE.folder}/LICENSE-MODEL")
    if DATA_LICENCE in licences:
        header["datasets"] = ["roneneldan/TinyStories"]
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n"


def architecture_table(model, format: str) -> str:
    from tinyseek.report import parameter_report

    config = model.config
    counts = parameter_report(model)
    attention = {
        "mla": f"MLA (latent rank {config.kv_lora_rank}, query rank {config.q_lora_rank or 'full'}, "
               f"RoPE dimension {config.qk_rope_head_dim})",
        "mha": f"softmax, {config.num_key_value_heads} key/value heads",
    }.get(config.attention_type, config.attention_type)
    if config.ffn_type == "moe":
        dense_first = config.first_k_dense_replace
        feed_forward = (f"DeepSeekMoE: {config.n_routed_experts} routed experts of width {config.moe_intermediate_size}"
                        f", top {config.num_experts_per_tok}, {config.scoring_func} scores, {config.n_shared_experts} shared"
                        + (f"; the first {dense_first} layer(s) dense" if dense_first else ""))
    else:
        feed_forward = f"{config.ffn_type}, width {config.intermediate_size}"
    rows = [
        ("loads as", loader(config, format)),
        ("attention", f"{attention}, {config.num_attention_heads} heads"),
        ("feed-forward", feed_forward),
        ("layers / hidden size", f"{config.num_hidden_layers} / {config.hidden_size}"),
        ("context", f"{config.max_position_embeddings} positions"),
        ("vocabulary", f"{config.vocab_size:,} rows"),
        ("parameters", f"{counts['total']:,} ({counts['active_per_token']:,} active per token)"),
    ]
    if config.num_nextn_predict_layers:
        rows.append(("multi-token prediction", f"{config.num_nextn_predict_layers} module(s), used in training only"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def loader(config, format: str) -> str:
    """What reads the export: the transformers class of its format, or llama.cpp's architecture."""
    if format == "gguf":
        from tinyseek.generate.gguf_export import GGUF_ARCHITECTURES

        return f"llama.cpp's `{GGUF_ARCHITECTURES[config.attention_type].name}` architecture"
    if format == "transformers":
        from tinyseek.attention import attention_spec
        from tinyseek.hf import TWINS

        return f"`{TWINS[attention_spec(config.attention_type).transformers_export].model_class.__name__}` in transformers"
    return "`TinySeekForCausalLM` in transformers, once `import tinyseek` has registered it"


def training_section(training: dict[str, Any] | None, chat_trained: bool) -> str:
    if chat_trained:
        tokens = ", ".join(f"`{token}`" for token in CHAT_TOKENS)
        chat = (f"**Chat-trained**: fine-tuned on conversations in tinyseek's chat template (roles and end of turn "
                f"as {tokens}); replies end at `<|EOT|>`.")
    else:
        chat = ("**Not chat-trained**: a base model. Its tokenizer carries tinyseek's chat template, but the model "
                "never learned it; `tinyseek chat` and `tinyseek serve` refuse chat with it unless told "
                "`--chat-template-for-base-model`.")
    if training is None:
        return chat + "\n\nHow it was trained is not recorded: it was exported from a model folder without a trainer state."
    run = training.get("config", {})
    data, optim, schedule = run.get("data", {}), run.get("optim", {}), run.get("schedule", {})
    lines = [chat, ""]
    if "step" in training:
        lines.append(f"- {training['step']:,} optimizer steps, {training.get('tokens', 0):,} tokens"
                     + (f", {training['train_seconds'] / 60:.1f} minutes" if training.get("train_seconds") else ""))
    sources = data_sources(training)
    if sources:
        builtin = " (the built-in TinyStories sample and conversations made from it)" if any(
            source in BUILTIN_DATA for source in sources) else ""
        lines.append("- data: " + ", ".join(f"`{source}`" for source in sources) + builtin)
    if data:
        lines.append(f"- tokenizer `{data.get('tokenizer')}`; windows of {data.get('seq_len')} tokens, "
                     f"{data.get('micro_batch_size')} per micro-batch, {data.get('grad_accum')} micro-batches a step")
    if optim:
        lines.append(f"- {optim.get('name')} at learning rate {optim.get('lr')}, {schedule.get('kind')} schedule "
                     f"({schedule.get('warmup_steps')} warm-up steps); dtype {run.get('dtype')}, device {run.get('device')}")
    if run:
        lines += ["", "<details><summary>The run's configuration</summary>", "", "```yaml",
                  yaml.safe_dump(run, sort_keys=False).rstrip(), "```", "", "</details>"]
    return "\n".join(lines).rstrip()


def usage_section(config, chat_trained: bool, format: str, name: str) -> str:
    if format == "gguf":
        chat = f"llama-cli -m {name} --jinja -cnv   # chat, with the template stored in the file\n" if chat_trained else ""
        return (
            "```bash\n" + chat
            + f'llama-cli -m {name} -p "Once upon a time" -n 64 --temp 0\n```\n\n'
            "```python\nfrom llama_cpp import Llama\n\n"
            f'llm = Llama(model_path="{name}")\n'
            + ('print(llm.create_chat_completion(messages=[{"role": "user", "content": "Write a story about a dog '
               'named Max."}], temperature=0)["choices"][0]["message"]["content"])\n' if chat_trained else
               'print(llm("Once upon a time", max_tokens=64, temperature=0)["choices"][0]["text"])\n')
            + "```"
        )
    imports = "import tinyseek  # registers the tinyseek architecture with transformers\n" if format == "tinyseek" else ""
    if chat_trained:
        prompt = ('messages = [{"role": "user", "content": "Write a story about a dog named Max."}]\n'
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,\n"
                  '                                       return_tensors="pt")\n')
    else:
        prompt = 'inputs = tokenizer("Once upon a time", return_tensors="pt")  # begins as training documents began\n'
    python = (
        "```python\n" + imports + "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("{name}")\n' + prompt
        + "output = model.generate(**inputs, max_new_tokens=200, do_sample=False)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n```'
    )
    if chat_trained:
        python += ("\n\n`generation_config.json` ends a reply at `<|EOT|>` (or `<|User|>`, or EOS); `tinyseek chat "
                   f"--model {name}` talks to it in a terminal, `tinyseek serve --model {name}` over OpenAI's API.")
    problem = llama_cpp_problem(config)
    if problem is None:
        llama = (f"For llama.cpp, write a GGUF file: `tinyseek export --model {name} --format gguf --out "
                 f"{name}.gguf`; it carries the chat template and this card.")
    else:
        llama = f"llama.cpp cannot run it: {problem}."
    return python + "\n\n" + llama


def llama_cpp_problem(config) -> str | None:
    """Why this model cannot go out as a GGUF file, or None."""
    try:
        from tinyseek.generate.gguf_export import gguf_problem
    except ImportError:
        return "writing GGUF needs the gguf package (pip install 'tinyseek[gguf]')"
    return gguf_problem(config)


def licence_section(licences: list[Licence], training: dict[str, Any] | None, format: str) -> str:
    where = ("in this file's metadata (`tokenizer.license`, `tinyseek.data.license`)" if format == "gguf"
             else f"in `{LICENCES}/`")
    lines = ["The weights are yours to license; tinyseek's code is MIT-licensed."]
    lines += [f"- **{licence.name}** covers {licence.covers}: its text and notice are {where}." for licence in licences]
    if TOKENIZER_LICENCE not in licences:
        lines.append("- The tokenizer is not tinyseek's built-in one: its own licence applies.")
    if DATA_LICENCE not in licences:
        lines.append("- The training data is not recorded: its own licence applies." if training is None else
                     "- The training data is not tinyseek's built-in data: its own licence applies.")
    return "\n".join(lines)
