"""`tinyseek info`: a model's architecture and parameter counts, from a preset or a config.json."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("info"), as the `tinyseek` dispatcher passes it."""
    parser = argparse.ArgumentParser(prog="tinyseek info", description="Print a model's architecture and parameter counts.")
    parser.add_argument("config", help="a model preset (seed, llama-tiny, ...) or a config.json file or directory")
    args = parser.parse_args(argv[1:])
    # After parsing, so that --help and argument errors answer without torch or transformers.
    from tinyseek.report import format_parameter_report, load_config, meta_model, parameter_report

    model = meta_model(load_config(args.config))  # any size prints: nothing is allocated
    print(model)
    print(format_parameter_report(parameter_report(model)))
    return 0
