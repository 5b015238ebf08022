"""`tinyseek prepare ...` and `tinyseek tokenizer train ...`."""

from __future__ import annotations

import argparse
import json

from tinyseek.data.builtin import DEFAULT_DATASET, DEFAULT_TOKENIZER


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=DEFAULT_DATASET,
        help="Hub dataset name, or a local .jsonl/.jsonl.gz/.json/.parquet/.txt file, directory or glob "
        f"(default: {DEFAULT_DATASET})",
    )
    parser.add_argument("--text-column", default="text", help="column holding the document text (default: text)")
    parser.add_argument("--split", default="train", help="Hub dataset split to read (default: train)")
    parser.add_argument("--max-documents", type=int, help="use only the first N non-blank documents")


def _prepare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyseek prepare", description="Tokenize a corpus into training-ready token files."
    )
    _add_source_arguments(parser)
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help=f"Hub name, tokenizer directory or tokenizer.json (default: {DEFAULT_TOKENIZER})",
    )
    parser.add_argument(
        "--out",
        default="data/prepared",
        help="cache root; the files go to a subfolder named by a hash of the inputs (default: data/prepared)",
    )
    validation = parser.add_mutually_exclusive_group()
    validation.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="fraction of documents (or groups) for validation (default: 0.01)",
    )
    validation.add_argument("--val-documents", type=int, help="number of documents (or groups) for validation")
    parser.add_argument(
        "--split-by", metavar="COLUMN", help="keep all documents with the same value of COLUMN on one side of the split"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation choice (default: 0)")
    parser.add_argument("--workers", type=int, help="tokenizer worker processes (default: one per CPU core)")
    parser.add_argument("--streaming", action="store_true", help="stream a Hub dataset instead of downloading it first")
    parser.add_argument("--vocab-size", type=int, help="the model's vocab_size: refuse a tokenizer with larger ids")
    return parser


def _tokenizer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyseek tokenizer", description="Tokenizer tools.")
    commands = parser.add_subparsers(dest="action", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    _add_source_arguments(train)
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--out", required=True, help="directory to save the tokenizer to (loadable by --tokenizer)")
    train.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences for a merge (default: 2)")
    return parser


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "prepare":
        args = _prepare_parser().parse_args(rest)
        from tinyseek.data.prepare import prepare_corpus  # after parsing: --help needs no tokenizers or numpy

        prepared = prepare_corpus(
            args.data,
            args.tokenizer,
            args.out,
            text_column=args.text_column,
            split=args.split,
            val_fraction=args.val_fraction,
            val_documents=args.val_documents,
            split_by=args.split_by,
            seed=args.seed,
            num_workers=args.workers,
            max_documents=args.max_documents,
            streaming=args.streaming,
            vocab_size=args.vocab_size,
        )
        meta = json.loads((prepared / "meta.json").read_text(encoding="utf-8"))
        for split in ("train", "val"):
            print(f"{split}: {meta[split]['tokens']:,} tokens, {meta[split]['documents']:,} documents")
        print(prepared)
        return 0
    args = _tokenizer_parser().parse_args(rest)
    from tinyseek.data.tokenizer import train_bpe_tokenizer

    out = train_bpe_tokenizer(
        args.data,
        args.vocab_size,
        args.out,
        text_column=args.text_column,
        split=args.split,
        max_documents=args.max_documents,
        min_frequency=args.min_frequency,
    )
    print(out)
    return 0
