"""`tinyseek export`: a Hugging Face folder (weights, config, tokenizer, generation config) or a GGUF file from a run
or model.

Every export keeps chat working and says what it is: the tokenizer files carry the chat template (transformers
writes it to chat_template.jinja) with its role and end-of-turn tokens; a chat-trained model keeps
`chat_trained: true` in its config.json and stops generating at the end of a turn; and a model card (README.md, or
the GGUF file's description) states the architecture, how the model was trained and the licences of the tokenizer
and data it inherits, whose texts go along (tinyseek.generate.model_card).

``--format tinyseek`` (the default) loads with ``AutoModelForCausalLM`` once ``tinyseek`` is imported;
``--format transformers`` loads with plain transformers as ``DeepseekV3ForCausalLM`` or ``LlamaForCausalLM`` where the
architecture has such a twin (see ``tinyseek.hf``), and is refused with the reason where it has not;
``--format gguf`` writes one file that llama.cpp runs (see ``tinyseek.generate.gguf_export``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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


def export(model, tokenizer, out: Path, format: str = "tinyseek", training: dict[str, Any] | None = None) -> Path:
    """Write `model` and `tokenizer` (None: the weights alone) to `out` in `format`, with a model card that tells how
    it was trained from `training` (`model_card.training_record` of its checkpoint; None: not recorded); return
    `out`."""
    # Imported here so that `tinyseek export --help` answers without transformers.
    from transformers import GenerationConfig

    from tinyseek.data.chat import chat_refusal, end_of_turn_ids, is_chat_trained, mark_chat_trained
    from tinyseek.data.tokenizer import match_prompt_convention
    from tinyseek.generate.model_card import inherited_licences, model_card, write_card
    from tinyseek.hf import to_transformers, transformers_twin_problem

    problem = transformers_twin_problem(model.config) if format == "transformers" else None
    if problem is not None:
        raise ConfigError(f"--format transformers: this {model.config.attention_type}/{model.config.ffn_type} model has "
                          f"no transformers equivalent: {problem}")
    licences = inherited_licences(tokenizer, training)
    card = model_card(model, licences, training, format, out.name)  # from the tinyseek model, before any conversion
    if format == "transformers":
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
    write_card(out, card, licences, training)
    return out


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("export"), as the `tinyseek` dispatcher passes it."""
    from tinyseek.generate.model_card import training_record
    from tinyseek.loading import resolve_checkpoint

    args = build_parser().parse_args(argv[1:])
    if args.format == "gguf":
        try:
            from tinyseek.generate.gguf_export import export_gguf
        except ImportError as error:
            raise ConfigError(f"--format gguf needs the gguf package ({error}); pip install 'tinyseek[gguf]'") from None
    model, tokenizer = load_from_arguments(args, tokenizer_required=args.format == "gguf")
    training = training_record(resolve_checkpoint(args.run_dir if args.run_dir is not None else args.model))
    if args.format == "gguf":
        for note in export_gguf(model, tokenizer, args.out, args.gguf_type, training):
            print(f"note: {note}")
        print(f"wrote {args.gguf_type} GGUF file {args.out}")
        return 0
    export(model, tokenizer, args.out, args.format, training)
    print(f"wrote {args.format} folder {args.out}")
    if tokenizer is None:
        print(f"no tokenizer included: {args.model} has none; copy one into {args.out} to generate from it")
    return 0
