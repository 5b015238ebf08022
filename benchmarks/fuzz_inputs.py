"""Hostile inputs for every command: configs, corpora, tokenizers, run directories and flags that are wrong.

    python benchmarks/fuzz_inputs.py                 # every fixed case + 200 seeded config mutations
    python benchmarks/fuzz_inputs.py --configs 20    # fewer mutations

Each input goes through `tinyseek.cli.main`, in this process (one torch import for all of them), under a time
limit. An outcome is one of:
    handled      exit 0: the input was valid after all (a long line, an odd but legal config)
    clear error  non-zero exit and one line that names the field, flag or file
    unclear      non-zero exit but the message is not one line or does not name what is wrong
    traceback    an exception escaped (a bug)
    hang         the time limit passed
    leftover     something half-written was left behind (a run directory, a `.partial-`/`.tmp-` folder)
Prints the counts per input class and every case that is not handled or a clear error; exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import io
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tinyseek.testing import write_jsonl

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat ran on under mat tree red big small quickly slowly".split()
OUTCOMES = ("handled", "clear error", "unclear", "traceback", "hang", "leftover")
HOSTILE_VALUES = ["abc", "", [], {}, None, True, -1, 0, 1.5, -(10**12), 10**12, float("nan"), float("inf"),
                  [1, "x"], {"a": 1}]
MODEL_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                "attention_type", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "num_key_value_heads",
                "ffn_type", "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
                "scoring_func", "first_k_dense_replace", "num_nextn_predict_layers", "rms_norm_eps",
                "attention_dropout", "linear_attention_chunk_size", "q_lora_rank", "bias_update_speed"]
INCONSISTENT_MODELS = [
    {"hidden_size": 30, "num_attention_heads": 4},
    {"num_attention_heads": 3},
    {"num_experts_per_tok": 8, "n_routed_experts": 4},
    {"attention_type": "mha", "num_key_value_heads": 3},
    {"attention_type": "mla", "qk_rope_head_dim": 7},
    {"first_k_dense_replace": 9},
    {"vocab_size": 10},
    {"hidden_size": 10**6},
    {"hidden_size": 4096, "num_hidden_layers": 4096},
    {"n_routed_experts": 10**7},
    {"max_position_embeddings": 8, "attention_type": "mha"},
]


@dataclass
class Case:
    kind: str
    name: str
    argv: list[str]
    names: list[str]  # a clear error mentions one of these
    must_not_exist: list[Path] = field(default_factory=list)  # a refused command leaves these absent or empty
    watch: list[Path] = field(default_factory=list)  # folders where no .partial-/.tmp- may remain


class Hang(BaseException):
    pass


def run_case(case: Case, timeout: float) -> tuple[str, str]:
    """(outcome, the error text or traceback's last line)."""
    from tinyseek.cli import main as tinyseek_main

    stdout, stderr = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = tinyseek_main(case.argv)
            except SystemExit as exit:  # argparse: usage and one error line naming the argument
                status = exit.code if isinstance(exit.code, int) else 2
    except Hang:
        return "hang", f"more than {timeout:.0f} s"
    except Exception as error:  # noqa: BLE001 - the point is to catch what escapes
        return "traceback", f"{type(error).__name__}: {error}".splitlines()[0][:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for path in case.watch:
        if path.is_dir() and any(p.name.startswith((".partial-", ".tmp-")) for p in path.rglob("*")):
            return "leftover", f"a staging folder is left in {path}"
    if status == 0:
        return "handled", ""
    for path in case.must_not_exist:
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return "leftover", f"{path} was written by a refused command"
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    message = errors[-1] if errors else (lines[-1] if lines else "")
    if len(errors) != 1 or not any(name in message for name in case.names):
        return "unclear", " / ".join(lines)[-300:]
    return "clear error", message


# -- inputs -------------------------------------------------------------------------------------------------------


def make_fixture(workdir: Path) -> dict[str, Path]:
    from tinyseek.data import prepare_corpus, train_bpe_tokenizer

    generator = random.Random(0)
    corpus = write_jsonl(workdir / "good.jsonl", (
        {"text": " ".join(generator.choice(WORDS) for _ in range(60))} for _ in range(200)
    ))
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = train_bpe_tokenizer(str(corpus), 300, workdir / "tokenizer")
        prepared = prepare_corpus(str(corpus), str(tokenizer), workdir / "prepared", val_fraction=0.1)
    return {"corpus": corpus, "tokenizer": tokenizer, "prepared": prepared}


def base_config(fixture: dict[str, Path], out_dir: Path) -> dict:
    return {
        "out_dir": str(out_dir), "max_steps": 1, "dtype": "fp32", "device": "cpu",
        "model": {"preset": "seed", "vocab_size": 304, "hidden_size": 32, "num_hidden_layers": 2,
                  "intermediate_size": 64, "moe_intermediate_size": 32},
        "data": {"source": str(fixture["prepared"]), "tokenizer": str(fixture["tokenizer"]), "seq_len": 16,
                 "micro_batch_size": 2, "grad_accum": 1},
        "checkpoint": {"every": 1, "keep": 1},
        "logging": {"log_every": 1, "eval_every": 1, "eval_batches": 1, "sample_every": 1000,
                    "progress_bar": False, "peak_flops": 1.0e11},
        "sample": {"prompts": []},
    }


def config_cases(fixture, workdir: Path, rng: random.Random, count: int) -> list[Case]:
    """Seeded mutations of a valid tiny config: one field set to a hostile value, an unknown key, or an
    inconsistent model; each run as `tinyseek train --config FILE`."""
    base = base_config(fixture, workdir / "unused")
    leaves = [(section, key) for section, values in base.items() if isinstance(values, dict) for key in values
              if not (section == "data" and key in ("source", "tokenizer"))]
    leaves += [("model", name) for name in MODEL_FIELDS] + [(None, key) for key in ("max_steps", "seed", "dtype")]
    leaves += [("optim", key) for key in ("lr", "weight_decay", "betas", "eps", "grad_clip", "max_non_finite_steps")]
    leaves += [("schedule", key) for key in ("kind", "warmup_steps", "min_lr_ratio", "decay_fraction")]
    cases = []
    for number in range(count):
        out_dir = workdir / f"config-{number}"
        config = copy.deepcopy(base)
        config["out_dir"] = str(out_dir)
        roll = rng.random()
        if roll < 0.1:
            section = rng.choice([None, "data", "optim", "model", "logging"])
            (config.setdefault(section, {}) if section else config)["bogus_key"] = 1
            described, names = f"unknown key in {section or 'top level'}", ["bogus_key"]
        elif roll < 0.2:
            changes = rng.choice(INCONSISTENT_MODELS)
            config["model"].update(changes)
            described, names = f"model {changes}", [f"model.{key}" for key in changes] + list(changes) + ["model: "]
        else:
            section, key = rng.choice(leaves)
            value = rng.choice(HOSTILE_VALUES)
            (config.setdefault(section, {}) if section else config)[key] = value
            dotted = f"{section}.{key}" if section else key
            # A size too large for memory is refused for the model as a whole ("model: N parameters need ...").
            described, names = f"{dotted}={value!r}", [dotted, key] + (["model: "] if section == "model" else [])
        path = workdir / f"config-{number}.yaml"
        path.write_text(yaml.safe_dump(config))
        cases.append(Case("config", described, ["train", "--config", str(path)], names, [out_dir], [workdir]))
    raw = {"not yaml": b"model: [unclosed\n", "a list": b"- 1\n- 2\n", "binary": bytes(range(256)) * 4,
           "empty": b"", "bad TOML": b"[model\nx=", "top level scalar": b"42\n"}
    for name, content in raw.items():
        path = workdir / f"raw-{name.replace(' ', '-')}.{'toml' if 'TOML' in name else 'yaml'}"
        path.write_bytes(content)
        out_dir = workdir / f"raw-{name.replace(' ', '-')}-run"
        argv = ["train", "--config", str(path), "--out-dir", str(out_dir), "--data", str(fixture["prepared"]),
                "--tokenizer", str(fixture["tokenizer"]), "--max-steps", "1", "--set", "model.vocab_size=304",
                "--set", "model.hidden_size=32", "--set", "sample.prompts=[]", "--set", "logging.peak_flops=1e11",
                "--set", "data.seq_len=16"]
        cases.append(Case("config file", name, argv, [path.name], [out_dir], [workdir]))
    for flag, value in [("--max-steps", "-5"), ("--max-steps", "x"), ("--keep", "0"), ("--device", "tpu"),
                        ("--device", "cuda:99"), ("--checkpoint-every", "-1"), ("--seed", "1e3")]:
        out_dir = workdir / f"flag{flag}{value}"
        argv = ["train", "--config", str(workdir / "config-base.yaml"), "--out-dir", str(out_dir), flag, value]
        cases.append(Case("flags", f"train {flag} {value}", argv, [flag, flag.strip("-").replace("-", "_"),
                                                                   "device", value], [out_dir], [workdir]))
    (workdir / "config-base.yaml").write_text(yaml.safe_dump(base_config(fixture, workdir / "unused")))
    return cases


def corpus_cases(fixture, workdir: Path) -> list[Case]:
    """Corpora and tokenizers that are wrong, each given to `prepare`, `tokenizer train` and `train --data`."""
    files = workdir / "corpora"
    files.mkdir()
    corpora = {
        "empty .jsonl": ("empty.jsonl", b""),
        "empty .txt": ("empty.txt", b""),
        "whitespace only": ("blank.txt", b"  \n\n\t\n"),
        "binary as .txt": ("binary.txt", random.Random(1).randbytes(50_000)),
        "invalid UTF-8 .jsonl": ("latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1")),
        "invalid UTF-8 .txt": ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1") * 10),
        "missing text field": ("missing.jsonl", b'{"body": "hello there"}\n'),
        "number as text": ("number.jsonl", b'{"text": 42}\n'),
        "list as text": ("list.jsonl", b'{"text": ["a", "b"]}\n'),
        "JSONL line not an object": ("array.jsonl", b'["text"]\n'),
        "truncated JSONL": ("truncated.jsonl", b'{"text": "hello"}\n{"text": "hel'),
        "JSON scalar": ("scalar.json", b"42"),
        "not gzip": ("fake.jsonl.gz", b"plain text, not gzip"),
        "not parquet": ("fake.parquet", b"PAR1 nonsense"),
        "unsupported suffix": ("corpus.csv", b"text\nhello\n"),
        "NUL bytes in text": ("nul.jsonl", json.dumps({"text": "a\u0000b " * 50}).encode() + b"\n"),
    }
    cases = []
    for kind_name, (file_name, content) in corpora.items():
        path = files / file_name
        path.write_bytes(content)
        cases += commands_on_corpus(fixture, workdir, "corpus", kind_name, path)
    (files / "no-corpus-dir").mkdir()
    (files / "no-corpus-dir" / "readme.md").write_text("hi")
    cases += commands_on_corpus(fixture, workdir, "corpus", "folder without corpus files", files / "no-corpus-dir")
    cases += commands_on_corpus(fixture, workdir, "corpus", "missing path", files / "nowhere.jsonl")

    tokenizers = workdir / "tokenizers"
    tokenizers.mkdir()
    bad_tokenizers = {
        "random bytes": b"\x00\xff" * 100, "empty": b"", "JSON, not a tokenizer": b'{"hello": 1}',
        "truncated tokenizer": (fixture["tokenizer"] / "tokenizer.json").read_bytes()[:500],
    }
    for name, content in bad_tokenizers.items():
        path = tokenizers / f"{name.replace(' ', '-').replace(',', '')}.json"
        path.write_bytes(content)
        cases += commands_on_tokenizer(fixture, workdir, name, path)
    (tokenizers / "empty-dir").mkdir()
    cases += commands_on_tokenizer(fixture, workdir, "folder without a tokenizer", tokenizers / "empty-dir")
    return cases


def commands_on_corpus(fixture, workdir: Path, kind: str, name: str, path: Path) -> list[Case]:
    slug = name.replace(" ", "-").replace(".", "")
    prepared, tokenizer_out, run = workdir / f"prep-{slug}", workdir / f"tok-{slug}", workdir / f"run-{slug}"
    names = [path.name, str(path)]
    return [
        Case(kind, f"prepare: {name}", ["prepare", "--data", str(path), "--tokenizer", str(fixture["tokenizer"]),
                                         "--out", str(prepared)], names, [prepared], [prepared]),
        Case(kind, f"tokenizer train: {name}", ["tokenizer", "train", "--data", str(path), "--vocab-size", "300",
                                                "--out", str(tokenizer_out)], names, [tokenizer_out], [workdir]),
        Case(kind, f"train --data: {name}", ["train", "--config", str(workdir / "config-base.yaml"), "--data",
                                             str(path), "--out-dir", str(run), "--set",
                                             f"data.cache_dir={workdir / f'cache-{slug}'}"], names, [run], [workdir]),
    ]


def commands_on_tokenizer(fixture, workdir: Path, name: str, path: Path) -> list[Case]:
    slug = name.replace(" ", "-").replace(",", "")
    run = workdir / f"run-tok-{slug}"
    names = [path.name, str(path)]
    return [
        Case("tokenizer", f"prepare: {name}", ["prepare", "--data", str(fixture["corpus"]), "--tokenizer", str(path),
                                               "--out", str(workdir / f"prep-tok-{slug}")], names,
             [workdir / f"prep-tok-{slug}"], [workdir / f"prep-tok-{slug}"]),
        Case("tokenizer", f"train: {name}", ["train", "--config", str(workdir / "config-base.yaml"), "--tokenizer",
                                             str(path), "--out-dir", str(run)], names, [run], [workdir]),
    ]


def model_cases(fixture, workdir: Path) -> list[Case]:
    """Run directories and model folders that are wrong, for generate, export, plot and info."""
    folder = workdir / "models"
    folder.mkdir()
    (folder / "empty").mkdir()
    (folder / "a-file").write_text("not a run")
    (folder / "bad-config").mkdir()
    (folder / "bad-config" / "config.json").write_bytes(b"\x00not json")
    (folder / "typed-config").mkdir()
    (folder / "typed-config" / "config.json").write_text(json.dumps({"hidden_size": "big", "model_type": "tinyseek"}))
    (folder / "broken-run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    (folder / "broken-run" / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{")
    (folder / "plot-garbage").mkdir()
    (folder / "plot-garbage" / "metrics.jsonl").write_bytes(b"\xff\xfe garbage\n{\"kind\": 1}\n")
    cases = []
    for name in ("empty", "a-file", "bad-config", "typed-config", "broken-run", "nowhere"):
        path = folder / name
        for command in ("generate", "export"):
            extra = ["--prompt", "hi"] if command == "generate" else ["--out", str(workdir / f"export-{name}")]
            for flag in ("--run-dir", "--model"):
                cases.append(Case("model folder", f"{command} {flag} {name}", [command, flag, str(path), *extra],
                                  [name], [workdir / f"export-{name}"], [workdir]))
        cases.append(Case("model folder", f"info {name}", ["info", str(path)], [name]))
    for name in ("empty", "a-file", "plot-garbage", "nowhere"):
        cases.append(Case("model folder", f"plot {name}", ["plot", str(folder / name)], [name]))
    return cases


def long_line_case(fixture, workdir: Path, megabytes: int) -> tuple[str, str, float]:
    """A single line of `megabytes` MB of valid text: prepared in a child process whose peak memory is measured."""
    import resource
    import subprocess

    generator = random.Random(2)
    path = workdir / "one-line.txt"
    with open(path, "w") as handle:
        written = 0
        while written < megabytes * 1_000_000:
            chunk = " ".join(generator.choice(WORDS) for _ in range(20_000)) + " "
            handle.write(chunk)
            written += len(chunk)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "tinyseek", "prepare", "--data", str(path), "--tokenizer", str(fixture["tokenizer"]),
         "--out", str(workdir / "prep-long-line"), "--val-fraction", "0"],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    outcome = "handled" if result.returncode == 0 else ("traceback" if "Traceback" in result.stderr else "unclear")
    return outcome, f"{megabytes} MB line: {result.stdout.strip().splitlines()[0] if result.stdout else result.stderr[-200:]}; " \
                    f"peak memory {peak_gb:.2f} GB; {seconds:.0f} s", peak_gb


def run_fuzz(workdir: Path, configs: int = 200, seed: int = 0, long_line_mb: int = 20, timeout: float = 120,
             verbose: bool = False, log=print) -> dict[str, object]:
    started = time.perf_counter()
    fixture = make_fixture(workdir)
    rng = random.Random(seed)
    cases = config_cases(fixture, workdir, rng, configs) + corpus_cases(fixture, workdir) + model_cases(fixture, workdir)
    counts: dict[str, dict[str, int]] = {}
    problems = []
    for number, case in enumerate(cases, 1):
        outcome, detail = run_case(case, timeout)
        counts.setdefault(case.kind, dict.fromkeys(OUTCOMES, 0))[outcome] += 1
        if outcome not in ("handled", "clear error"):
            problems.append((case, outcome, detail))
        if outcome != "clear error" or verbose:
            log(f"[{number}/{len(cases)}] {outcome}: {case.kind}: {case.name}: {detail}")
    long_line = None
    if long_line_mb:
        outcome, detail, peak_gb = long_line_case(fixture, workdir, long_line_mb)
        counts.setdefault("long line", dict.fromkeys(OUTCOMES, 0))[outcome] += 1
        long_line = {"outcome": outcome, "detail": detail, "peak_gb": peak_gb}
        if outcome != "handled":
            problems.append((Case("long line", detail, [], []), outcome, detail))
    return {"counts": counts, "problems": problems, "long_line": long_line, "seconds": time.perf_counter() - started}


def format_table(counts: dict[str, dict[str, int]]) -> str:
    lines = ["| input class | tried | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    totals = dict.fromkeys(OUTCOMES, 0)
    for kind, row in counts.items():
        lines.append(f"| {kind} | {sum(row.values())} | " + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
        for outcome in OUTCOMES:
            totals[outcome] += row[outcome]
    lines.append(f"| **all** | **{sum(totals.values())}** | " + " | ".join(f"**{totals[o]}**" for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=200, help="seeded config mutations (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-line-mb", type=int, default=20, help="size of the single-line corpus (0: skip)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a case counts as a hang")
    parser.add_argument("--verbose", action="store_true", help="print every clear error too")
    parser.add_argument("--quick", action="store_true", help="3 mutations and a 1 MB line (to check the script runs)")
    args = parser.parse_args()
    if args.quick:
        args.configs, args.long_line_mb = 3, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as workdir:
        result = run_fuzz(Path(workdir), args.configs, args.seed, args.long_line_mb, args.timeout, args.verbose)
    print(f"\n{sum(sum(row.values()) for row in result['counts'].values())} inputs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {result['seconds']:.0f} s")
    if result["long_line"]:
        print(result["long_line"]["detail"])
    print(format_table(result["counts"]))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
