"""Crash harness: kill a real training run again and again, resume it each time, and check that it ends bitwise where
an uninterrupted run ends.

    python benchmarks/crash_resume.py                    # 20 SIGKILLs, seed preset, fp32 CPU (a few minutes)
    python benchmarks/crash_resume.py --kills 3 --tiny   # the short version the test suite runs

It writes a small generated corpus and trains a byte-level BPE on it, then:

1. kills `tinyseek prepare` inside its work (TINYSEEK_FAULTS=prepare.*=kill), reruns it, and compares the prepared
   files with an uninterrupted preparation;
2. trains the reference run in one go (`--steps` optimizer steps, a checkpoint every 2 steps, keeping 2);
3. trains the same run as a series of processes. Each is SIGKILLed: either at a seeded random instant (after a
   random step, plus a random fraction of a second: sometimes inside a checkpoint write, which saving right after
   the step's log line makes likely), or, for 40% of the kills (seeded), by the fault-injection hook at a named point inside
   a checkpoint write (staging made, weights written, optimizer state written, manifest written, renamed). After some
   kills a byte of the newest checkpoint is flipped on purpose. One process is stopped by SIGTERM and one by SIGINT
   (graceful: exit 143/130 with a checkpoint at the stop step). Each next process resumes by itself;
4. runs the last process to the end and compares weights, optimizer state, data position (step, tokens, sampler)
   and RNG state with the reference, bitwise.

Prints a table and returns nonzero if anything differs. Use OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tinyseek.testing import TINY_TRAINED_MODEL, write_jsonl

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat ran on under mat tree red big small quickly slowly".split()
WRITE_POINTS = ("checkpoint.staging", "checkpoint.weights", "checkpoint.optimizer", "checkpoint.state",
                "checkpoint.renamed")
STEP_LINE = re.compile(r"\bstep (\d+)/\d+ \|")
SKIPPED_LINE = re.compile(r"skipping unusable checkpoint (step_\d+)")
TINY_MODEL = {**TINY_TRAINED_MODEL, "num_hidden_layers": 2, "vocab_size": 304}


def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env.pop("TINYSEEK_FAULTS", None)
    return env


def make_corpus(workdir: Path, documents: int) -> tuple[Path, Path]:
    from tinyseek.data import train_bpe_tokenizer

    generator = random.Random(0)
    corpus = write_jsonl(workdir / "corpus.jsonl", (
        {"text": " ".join(generator.choice(WORDS) for _ in range(60)) + "."} for _ in range(documents)
    ))
    tokenizer = train_bpe_tokenizer(str(corpus), 300, workdir / "tokenizer")
    return corpus, tokenizer


def prepared_files(folder: Path) -> dict[str, object]:
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("seconds")
    return {"meta": meta, **{name: (folder / name).read_bytes() for name in ("train.bin", "val.bin")}}


def kill_during_prepare(workdir: Path, corpus: Path, tokenizer: Path, rng: random.Random) -> dict[str, object]:
    """Kill `tinyseek prepare` at a named point, run it again, and compare with an uninterrupted preparation."""
    from tinyseek.cli import main as tinyseek_main
    from tinyseek.data import prepare_corpus

    reference = prepare_corpus(str(corpus), str(tokenizer), workdir / "prepared-reference", val_fraction=0.1)
    point = rng.choice(["prepare.batch", "prepare.meta"])
    command = [sys.executable, "-m", "tinyseek", "prepare", "--data", str(corpus), "--tokenizer", str(tokenizer),
               "--out", str(workdir / "prepared"), "--val-fraction", "0.1"]
    killed = subprocess.run(command, env={**environment(), "TINYSEEK_FAULTS": f"{point}=kill"}, capture_output=True)
    left_partial = [p.name for p in (workdir / "prepared").iterdir()]
    rerun_output = io.StringIO()
    with contextlib.redirect_stdout(rerun_output), contextlib.redirect_stderr(io.StringIO()):
        rerun_status = tinyseek_main(command[3:])  # the same command again, in this process
    prepared = Path(rerun_output.getvalue().strip().splitlines()[-1])
    return {
        "point": point,
        "killed": killed.returncode == -signal.SIGKILL,
        "left": left_partial,
        "rerun_ok": rerun_status == 0,
        "identical": prepared_files(prepared) == prepared_files(reference),
        "stale_left": [p.name for p in (workdir / "prepared").iterdir() if p.name.startswith(".partial")],
    }


def write_config(workdir: Path, prepared: Path, tokenizer: Path, steps: int, tiny: bool) -> Path:
    config = {
        "max_steps": steps, "dtype": "fp32", "device": "cpu", "seed": 0,
        "model": {"preset": "seed", **(TINY_MODEL if tiny else {})},
        "data": {"source": str(prepared), "tokenizer": str(tokenizer), "seq_len": 16, "micro_batch_size": 2,
                 "grad_accum": 2},
        "optim": {"lr": 3.0e-3},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "logging": {"log_every": 1, "eval_every": 1_000_000, "eval_batches": 1, "sample_every": 1_000_000,
                    "progress_bar": False, "peak_flops": 1.0e11},
        "sample": {"prompts": []},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_in_process(config: Path, out_dir: Path) -> None:
    from tinyseek.train import load_config
    from tinyseek.train.trainer import Trainer

    with contextlib.redirect_stderr(io.StringIO()):
        status = Trainer(load_config(str(config), [(["out_dir"], str(out_dir))])).train()
    if status != 0:
        raise SystemExit(f"the reference run failed with status {status}")


class Process:
    """One `python train.py` of the interrupted run, its output in a log file."""

    def __init__(self, config: Path, run_dir: Path, log: Path, faults: str | None = None):
        env = environment()
        if faults:
            env["TINYSEEK_FAULTS"] = faults
        self.log = log
        self.handle = open(log, "w")
        command = [sys.executable, str(REPO / "train.py"), "--config", str(config), "--out-dir", str(run_dir)]
        self.popen = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def last_step(self) -> int | None:
        steps = STEP_LINE.findall(self.output())
        return int(steps[-1]) if steps else None

    def wait_for_step(self, step: int, timeout: float = 600) -> bool:
        """True once the process has logged `step`; False if it ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reached = self.last_step()
            if reached is not None and reached >= step:
                return True
            if self.popen.poll() is not None:
                return False
            time.sleep(0.02)
        raise TimeoutError(f"no step {step} within {timeout} s; see {self.log}")

    def finish(self, timeout: float = 600) -> int:
        status = self.popen.wait(timeout)
        self.handle.close()
        return status


def checkpoint_step(run_dir: Path) -> int:
    from tinyseek.train import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir, report=lambda path, problem: None)
    return json.loads((checkpoint / "trainer_state.json").read_text())["step"] if checkpoint else 0


def flip_a_byte(run_dir: Path, rng: random.Random) -> tuple[str | None, str | None]:
    """Damage the newest checkpoint when there is an older valid one for the next process to fall back to."""
    from tinyseek.train.checkpoint import valid_checkpoints

    valid = list(valid_checkpoints(run_dir, report=lambda path, problem: None))
    if len(valid) < 2:
        return None, None
    checkpoint = valid[0]
    file = checkpoint / rng.choice(["model.safetensors", "optimizer.pt"])
    data = bytearray(file.read_bytes())
    data[rng.randrange(len(data))] ^= 0xFF
    file.write_bytes(bytes(data))
    return checkpoint.name, file.name


def staging_left(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith((".tmp-", ".old-")) for p in root.iterdir())


def same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def compare_final(reference: Path, resumed: Path) -> dict[str, bool]:
    from tinyseek.train import latest_checkpoint
    from tinyseek.train.checkpoint import load_optimizer_state

    expected, actual = latest_checkpoint(reference), latest_checkpoint(resumed)
    states = [json.loads((c / "trainer_state.json").read_text()) for c in (expected, actual)]
    return {
        "same final step": expected.name == actual.name,
        "weights": same_tree(load_file(expected / "model.safetensors"), load_file(actual / "model.safetensors")),
        "optimizer state": same_tree(load_optimizer_state(expected), load_optimizer_state(actual)),
        "data position": all(states[0][k] == states[1][k] for k in ("step", "tokens", "sampler")),
        "RNG state": states[0]["rng"] == states[1]["rng"],
    }


def run_harness(workdir: Path, kills: int = 20, seed: int = 0, steps: int = 60, tiny: bool = False,
                write_share: float = 0.4, corrupt_share: float = 0.15, graceful: bool = True,
                documents: int = 400, hook_occurrences: tuple[int, ...] = (1, 2), log=print) -> dict[str, object]:
    """The harness (see the module's docstring). A hook kill fires at one of `hook_occurrences` (the first or
    second checkpoint write of its process); returns the counts, the comparisons and the time taken."""
    rng = random.Random(seed)
    started = time.perf_counter()
    corpus, tokenizer = make_corpus(workdir, documents)
    prepare = kill_during_prepare(workdir, corpus, tokenizer, rng)
    log(f"prepare killed at {prepare['point']}: rerun identical {prepare['identical']}")
    prepared = next(p for p in (workdir / "prepared-reference").iterdir() if not p.name.startswith("."))
    config = write_config(workdir, prepared, tokenizer, steps, tiny)
    train_in_process(config, workdir / "reference")
    log(f"reference run: {steps} steps")

    run_dir = workdir / "run"
    counts = {"kills": 0, "inside a write (hook)": 0, "inside a write (random instant)": 0, "SIGTERM": 0,
              "SIGINT": 0, "graceful stop saved its step": 0, "resumes": 0, "corrupted on purpose": 0,
              "damaged checkpoints skipped": 0, "processes": 0}
    flipped = None  # the checkpoint damaged after the last process: the next one must skip it
    graceful_rounds = {kills // 3: signal.SIGTERM, (2 * kills) // 3: signal.SIGINT} if graceful else {}
    hook_rounds = set(rng.sample(range(kills), round(kills * write_share)))
    round_number, kill_round = 0, 0
    while kill_round < kills or graceful_rounds:
        resume_step = checkpoint_step(run_dir)
        if resume_step >= steps - 2:
            log(f"only {counts['kills']} kills fitted into {steps} steps; raise --steps")
            break
        round_number += 1
        stop_signal = graceful_rounds.pop(kill_round, None) if kill_round in graceful_rounds else None
        in_write = stop_signal is None and kill_round in hook_rounds
        faults = f"{rng.choice(WRITE_POINTS)}@{rng.choice(hook_occurrences)}=kill" if in_write else None
        process = Process(config, run_dir, workdir / f"round-{round_number:02d}.log", faults)
        counts["processes"] += 1
        target = min(steps - 1, resume_step + rng.randint(1, 4))
        if stop_signal is not None:
            process.wait_for_step(target)
            process.popen.send_signal(stop_signal)
            status = process.finish()
            counts[stop_signal.name] += 1
            counts["graceful stop saved its step"] += (
                status == 128 + stop_signal and checkpoint_step(run_dir) == process.last_step()
            )
            description = f"{stop_signal.name} after step {process.last_step()}: exit {status}"
        elif faults:
            status = process.finish()
            counts["kills"] += status == -signal.SIGKILL
            counts["inside a write (hook)"] += status == -signal.SIGKILL
            description = f"hook {faults}: exit {status}"
            kill_round += 1
        else:
            if process.wait_for_step(target):
                time.sleep(rng.random() * 0.5)
                process.popen.kill()
            status = process.finish()
            inside = staging_left(run_dir)
            counts["kills"] += status == -signal.SIGKILL
            counts["inside a write (random instant)"] += inside
            description = f"SIGKILL after step {process.last_step()}{' inside a write' if inside else ''}"
            kill_round += 1
        output = process.output()
        counts["resumes"] += "resumed from" in output
        counts["damaged checkpoints skipped"] += flipped is not None and flipped in SKIPPED_LINE.findall(output)
        if "Traceback" in output:
            raise SystemExit(f"a traceback in {process.log}")
        flipped, damaged_file = flip_a_byte(run_dir, rng) if rng.random() < corrupt_share else (None, None)
        counts["corrupted on purpose"] += flipped is not None
        log(f"round {round_number:2d}: resumed at step {resume_step:3d}, {description}"
            + (f"; flipped a byte of {flipped}/{damaged_file}" if flipped else ""))

    final = Process(config, run_dir, workdir / "final.log")
    status = final.finish()
    output = final.output()
    counts["processes"] += 1
    counts["resumes"] += "resumed from" in output
    counts["damaged checkpoints skipped"] += flipped is not None and flipped in SKIPPED_LINE.findall(output)
    if status != 0:
        raise SystemExit(f"the final process failed with status {status}; see {final.log}")
    equality = compare_final(workdir / "reference", run_dir)
    return {"counts": counts, "prepare": prepare, "equality": equality,
            "stale staging left": staging_left(run_dir), "seconds": time.perf_counter() - started}


def format_table(result: dict[str, object]) -> str:
    rows = [(name, str(value)) for name, value in result["counts"].items()]
    prepare = result["prepare"]
    rows.append(("prepare killed at " + prepare["point"], "rerun identical" if prepare["identical"] else "DIFFERENT"))
    rows.append(("stale staging folders left", str(result["stale staging left"] or bool(prepare["stale_left"]))))
    rows += [(f"final {name} equal bitwise", "yes" if same else "NO") for name, same in result["equality"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'what':<{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the training run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (default 0)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the run (default 60)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the seed preset's")
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder, deleted)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 kills, 8 steps (to check the script runs)")
    args = parser.parse_args()
    if args.quick:
        args.tiny, args.kills, args.steps = True, 2, 8
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        result = run_harness(workdir, kills=args.kills, seed=args.seed, steps=args.steps, tiny=args.tiny)
    print(f"\nseed preset{' (tiny model)' if args.tiny else ''}, fp32, CPU, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.steps} steps, checkpoint every 2 keeping 2, "
          f"seed {args.seed}: {result['seconds']:.0f} s\n")
    print(format_table(result))
    ok = all(result["equality"].values()) and result["prepare"]["identical"] and not result["stale staging left"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
