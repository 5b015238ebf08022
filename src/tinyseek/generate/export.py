"""`tinyseek export`: a Hugging Face folder (weights, config, tokenizer, generation config) or a GGUF file from a run
or model.

The tokenizer files carry the chat template (transformers writes it to chat_template.jinja); a chat-trained model
keeps `chat_trained: true` in its config.json and stops generating at the end of a turn.

``--format tinyseek`` (the default) loads with ``AutoModelForCausalLM`` once ``tinyseek`` is imported;
``--format transformers`` loads with plain transformers as ``DeepseekV3ForCausalLM`` or ``LlamaForCausalLM`` where the
architecture has such a twin (see ``tinyseek.hf``), and is refused with the reason where it has not;
``--format gguf`` writes one file that llama.cpp runs (see ``tinyseek.generate.gguf_export``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tinyseek.errors import ConfigError, FileError
from tinyseek.loading import add_source_arguments, load_from_arguments

FORMATS = ("tinyseek", "transformers", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the keys of gguf_export.FILE_TYPES, here so --help needs no gguf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyseek export", description=__doc__.split("\n\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--out", type=Path, required=True,
                        help="the folder to write (must not exist or be empty); for gguf, the file (must not exist)")
    parser.add_argument("--format", choices=FORMATS, default="tinyseek")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="f32",
                        help="the GGUF file's weight type (norms and the router stay f32)")
    return parser


def export(model, tokenizer, out: Path, format: str = "tinyseek") -> Path:
    """Write `model` and `tokenizer` (None: the weights alone) to `out` in `format`; return `out`."""
    # Imported here so that `tinyseek export --help` answers without transformers.
    from transformers import GenerationConfig

    from tinyseek.data.chat import chat_refusal, end_of_turn_ids, is_chat_trained, mark_chat_trained
    from tinyseek.data.tokenizer import match_prompt_convention
    from tinyseek.hf import to_transformers, transformers_twin_problem

    if format == "transformers":
        problem = transformers_twin_problem(model.config)
        if problem is not None:
            raise ConfigError(
                f"--format transformers: this {model.config.attention_type}/{model.config.ffn_type} model has no "
                f"transformers equivalent: {problem}"
            )
        chat_trained = is_chat_trained(model.config)
        model = to_transformers(model)
        if chat_trained:
            mark_chat_trained(model.config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileError(f"--out {out} already exists and is not an empty folder")
    if tokenizer is not None:
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.config, field, getattr(tokenizer, field))
    model.generation_config = GenerationConfig.from_model_config(model.config)
    if chat_refusal(model.config, tokenizer, base_model_allowed=False) is None:
        # A chat model's reply ends at the end of its turn, in plain transformers' generate() too.
        model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.save_pretrained(out)
    if tokenizer is not None:
        match_prompt_convention(tokenizer).save_pretrained(out)
    return out


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("export"), as the `tinyseek` dispatcher passes it."""
    args = build_parser().parse_args(argv[1:])
    if args.format == "gguf":
        try:
            from tinyseek.generate.gguf_export import export_gguf
        except ImportError as error:
            raise ConfigError(f"--format gguf needs the gguf package ({error}); pip install 'tinyseek[gguf]'") from None
        model, tokenizer = load_from_arguments(args, tokenizer_required=True)
        for note in export_gguf(model, tokenizer, args.out, args.gguf_type):
            print(f"note: {note}")
        print(f"wrote {args.gguf_type} GGUF file {args.out}")
        return 0
    model, tokenizer = load_from_arguments(args, tokenizer_required=False)
    export(model, tokenizer, args.out, args.format)
    print(f"wrote {args.format} folder {args.out}")
    if tokenizer is None:
        print(f"no tokenizer included: {args.model} has none; copy one into {args.out} to generate from it")
    return 0
