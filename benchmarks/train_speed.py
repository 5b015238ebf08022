"""Training throughput: tinyseek against transformers' own model with the same architecture and the same weights.

For each architecture, micro-batch x sequence shape and precision, one process builds the tinyseek model and its
transformers twin (``tinyseek.hf.to_transformers``: DeepseekV3ForCausalLM for MLA, LlamaForCausalLM for MHA + dense)
with identical weights, gives each its own ``torch.optim.AdamW(fused=True)``, warms both up, then times full training
steps (forward, backward, optimizer step, zero_grad) alternating A B A B and reports medians. The seed model (linear
attention) has no transformers twin and is timed alone.

MFU is achieved FLOP/s (``tinyseek.estimate_flops_per_token`` x tokens/s) over this machine's matrix-multiply peak
for the dtype, measured here with torch.mm. For bf16 the peak is the faster of torch's bf16 GEMM and the fp32 GEMM
(bf16 x bf16 products are exact in fp32, so the fp32 units are a way to multiply bf16 matrices too).

    python benchmarks/train_speed.py            # the full table (see docs/benchmarks.md)
    python benchmarks/train_speed.py --quick    # smoke run: 1x32 only, 2 timed steps

The seed recipe (configs/seed.yaml as `python train.py` runs it: 1x32 windows, accumulation 8, dtype auto,
gradient checkpointing) is timed through the trainer itself, in worker processes whose optimizer steps alternate:

    python benchmarks/train_speed.py --recipe --compare-ref REV    # REV's tree (a temporary git worktree) vs this one
    python benchmarks/train_speed.py --recipe --checkpointing      # gradient checkpointing none / full / selective
    python benchmarks/train_speed.py --recipe --compile            # eager vs regionally compiled decoder layers
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import transformers

from tinyseek import TinySeekConfig, TinySeekForCausalLM, estimate_flops_per_token, ops
from tinyseek.hf import to_transformers
from tree_workers import REPO, TreeWorker, git_worktree

SEED_MLA_MOE = dict(attention_type="mla", scoring_func="sigmoid", router_bias=False, attention_dropout=0.0)
CONFIGS = {
    # name: (preset, overrides, has a transformers twin)
    "seed": ("seed", {}, False),
    "seed-mla-moe": ("seed", SEED_MLA_MOE, True),
    "deepseek-v3-tiny": ("deepseek-v3-tiny", {}, True),
    "llama-tiny": ("llama-tiny", {}, True),
}
SHAPES = ((1, 32), (8, 256))
DTYPES = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs)"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, repeats: int = 3) -> float:
    """Best median FLOP/s of torch.mm over a few shapes (square, and the thin shapes of this model family)."""
    shapes = [(1024, 1024, 1024), (2048, 128, 4096), (2048, 4096, 128)] if dtype == torch.float32 else [
        (512, 512, 512), (1024, 128, 2048), (1024, 2048, 128)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        best = max(best, 2 * m * k * n / median_seconds(lambda: torch.mm(a, b), repeats))
    return best


# ----------------------------------------------------------------------------------------------------------------
# Memory: RSS growth during one step, sampled by a thread (torch ops release the GIL)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only), so the next step's RSS growth is its own working set.
    Used only before the separate memory-measurement step, never in timed steps."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------------------------
# Training steps


class Trainee:
    def __init__(self, name: str, model: torch.nn.Module, is_tinyseek: bool, dtype: str):
        self.name, self.model, self.is_tinyseek = name, model.train(), is_tinyseek
        self.autocast = dtype == "bf16"
        # The same optimizer kind for both: fused AdamW (the trainer's choice on CPU; ~4x faster than the for-each
        # default there).
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        # The fused loss's scratch buffers, kept between steps as the trainer keeps them.
        self.forward_options = {"step_memory": ops.StepMemory()} if is_tinyseek else {}
        self.times: list[float] = []
        self.first_loss: float | None = None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            if self.is_tinyseek:  # what the trainer calls
                out = self.model(input_ids=inputs, shift_labels=targets, **self.forward_options)
            else:  # transformers uses shift_labels as given once labels is not None
                out = self.model(input_ids=inputs, labels=targets, shift_labels=targets)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.is_tinyseek:
            self.model.update_load_balance_bias()
        elapsed = time.perf_counter() - start
        if self.first_loss is None:
            self.first_loss = float((out.lm_loss if self.is_tinyseek else out.loss).detach())
        return elapsed

    def step_memory(self, inputs, targets) -> int:
        trim_heap()
        with PeakRSS() as peak:
            before = rss_bytes()
            self.step(inputs, targets)
        return peak.peak - before


def run_case(config_name: str, batch: int, seq_len: int, dtype: str, steps: int, warmup: int) -> list[dict]:
    preset, overrides, has_twin = CONFIGS[config_name]
    config = TinySeekConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    model = TinySeekForCausalLM(config)
    trainees = [Trainee("tinyseek", model, True, dtype)]
    if has_twin:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = to_transformers(model)
        trainees.append(Trainee(type(twin).__name__, twin, False, dtype))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=generator) for _ in range(2)]
    data = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]

    for i in range(warmup):
        for trainee in trainees:
            trainee.step(*data[i % 2])
    for i in range(steps):  # A B A B ...
        for trainee in trainees:
            trainee.times.append(trainee.step(*data[i % 2]))
    memory = {trainee.name: trainee.step_memory(*data[0]) for trainee in trainees}

    flops_per_token = estimate_flops_per_token(config, seq_len)
    rows = []
    for trainee in trainees:
        seconds = statistics.median(trainee.times)
        rows.append(dict(
            config=config_name, shape=f"{batch}x{seq_len}", dtype=dtype, model=trainee.name,
            tokens_per_s=batch * seq_len / seconds, step_ms=1e3 * seconds, steps=len(trainee.times),
            flops_per_token=flops_per_token, step_memory_mib=memory[trainee.name] / 2**20,
            first_loss=trainee.first_loss,
        ))
    if has_twin:
        rows[0]["ratio"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    del trainees, model
    gc.collect()
    return rows


def profile_step(config_name: str, steps: int = 3) -> None:
    """The operators of a 1x32 fp32 training step (forward, backward, optimizer), by self time, averaged over
    `steps` steps after two warm-up steps. Uses only what every tree has, so PYTHONPATH=OLD/src profiles an old one."""
    preset, overrides, _ = CONFIGS[config_name]
    config = TinySeekConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    trainee = Trainee("tinyseek", TinySeekForCausalLM(config), True, "fp32")
    window = torch.randint(0, config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(1))
    inputs, targets = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    for _ in range(2):
        trainee.step(inputs, targets)
    with torch.profiler.profile() as profiler:
        for _ in range(steps):
            trainee.step(inputs, targets)
    events = profiler.key_averages()
    operators = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    print(f"{config_name} 1x32 fp32: {operators:,.0f} aten operator calls and {total_ms:,.1f} ms self CPU time per step "
          f"(profiled; the profiler itself adds time per call)\n")
    print("| operator | calls per step | self ms per step | share |")
    print("|---|---|---|---|")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        ms = event.self_cpu_time_total / 1e3 / steps
        print(f"| {event.key[:60]} | {event.count / steps:,.0f} | {ms:,.1f} | {100 * ms / total_ms:.0f}% |")


# ----------------------------------------------------------------------------------------------------------------
# The seed recipe through the trainer, in worker processes (one per tree and setting) that take turns


def recipe_worker(spec: dict) -> None:
    """Runs in a child process with PYTHONPATH at one tree's src/: builds that tree's Trainer for the recipe, then
    answers "steps N" with the seconds N optimizer steps took and "memory" with the RSS growth of one step.
    Only APIs that every tree since the trainer landed has are used (load_config, parse_assignment, Trainer,
    train_step), so an older tree runs exactly its own code."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the trainer's own output must not mix with the protocol
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from tinyseek.train.config import load_config, parse_assignment
    from tinyseek.train.trainer import Trainer

    config = load_config(spec["config"], [parse_assignment(a) for a in spec["set"]])
    trainer = Trainer(config)
    for _ in range(spec["warmup"]):
        trainer.train_step()
    protocol.write(f"ready {trainer.tokens_per_step}\n")
    for line in sys.stdin:
        command, *args = line.split()
        if command == "steps":
            start = time.perf_counter()
            for _ in range(int(args[0])):
                trainer.train_step()
            protocol.write(f"{time.perf_counter() - start}\n")
        elif command == "memory":
            trim_heap()
            with PeakRSS() as peak:
                before = rss_bytes()
                trainer.train_step()
            protocol.write(f"{peak.peak - before}\n")


class RecipeRun(TreeWorker):
    """One worker: a tree (its src/ on PYTHONPATH) and `--set` overrides on top of the recipe."""

    def __init__(self, label: str, tree: Path, overrides: list[str], args, scratch: Path):
        self.times, self.memory = [], None
        run_dir = scratch / label.replace(" ", "-")
        spec = {
            "config": args.recipe_config, "threads": args.threads, "warmup": args.warmup,
            "set": [f"data.source={args.data}", f"data.tokenizer={args.tokenizer}", f"data.cache_dir={run_dir}/data",
                    f"out_dir={run_dir}/run", "logging.progress_bar=false", *overrides],
        }
        super().__init__(label, tree, Path(__file__).resolve(), "--recipe-worker", spec)


def recipe_variants(args, ref_tree: Path | None) -> list[tuple[str, Path, list[str]]]:
    variants = []
    if ref_tree is not None:
        variants.append((f"{args.compare_ref} (ref)", ref_tree, []))
    if args.checkpointing:
        variants += [(f"checkpointing {mode}", REPO, [f"gradient_checkpointing={mode}"]) for mode in ("none", "full", "selective")]
    else:
        variants.append(("this tree", REPO, []))
    if args.compile:
        variants.append(("this tree, compiled", REPO, ["compile=true"]))
    return variants


def run_recipe(args) -> None:
    with tempfile.TemporaryDirectory(prefix="tinyseek-recipe-") as scratch_name:
        scratch = Path(scratch_name)
        with git_worktree(args.compare_ref, scratch) if args.compare_ref else contextlib.nullcontext() as ref_tree:
            runs = [RecipeRun(label, tree, overrides, args, scratch) for label, tree, overrides in recipe_variants(args, ref_tree)]
            try:
                tokens_per_step = {run.label: int(run.read().split()[1]) for run in runs}
                for _ in range(args.rounds):  # A B C A B C ...
                    for run in runs:
                        run.times.append(run.ask(f"steps {args.steps}") / args.steps)
                for run in runs:
                    run.memory = run.ask("memory")
            finally:
                for run in runs:
                    run.close()
    print(f"\nrecipe {args.recipe_config} ({next(iter(tokens_per_step.values()))} tokens per optimizer step), "
          f"{args.rounds} rounds x {args.steps} optimizer steps per worker, alternating; median step\n")
    print("| run | tokens/s | optimizer step ms | vs first row | step memory MiB |")
    print("|---|---|---|---|---|")
    first = None
    for run in runs:
        seconds = statistics.median(run.times)
        tokens_per_s = tokens_per_step[run.label] / seconds
        first = first or tokens_per_s
        print(f"| {run.label} | {tokens_per_s:,.0f} | {1e3 * seconds:,.0f} | **{tokens_per_s / first:.2f}x** | "
              f"{run.memory / 2**20:,.0f} |")


# ----------------------------------------------------------------------------------------------------------------
# Report


def format_table(rows: list[dict], peaks: dict[str, float]) -> str:
    header = ("| config | B x T | dtype | model | tokens/s | step ms | tinyseek / transformers | MFU | step memory MiB | "
              "first loss |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        mfu = row["tokens_per_s"] * row["flops_per_token"] / peaks[row["dtype"]]
        ratio = f"**{row['ratio']:.2f}x**" if "ratio" in row else ""
        lines.append(
            f"| {row['config']} | {row['shape']} | {row['dtype']} | {row['model']} | {row['tokens_per_s']:,.0f} | "
            f"{row['step_ms']:,.0f} | {ratio} | {100 * mfu:.1f}% | {row['step_memory_mib']:,.0f} | "
            f"{row['first_loss']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1x32 only, 1 warm-up and 2 timed steps")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--shapes", nargs="+", default=[f"{b}x{t}" for b, t in SHAPES], help="BxT, e.g. 8x256")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice, one per core). On a shared machine "
                             "2 OpenMP threads on a contended core ran 20x slower than 1 (docs/benchmarks.md)")
    parser.add_argument("--profile", metavar="CONFIG", choices=list(CONFIGS),
                        help="instead of timing: torch.profiler table of one 1x32 fp32 tinyseek training step")
    recipe = parser.add_argument_group("seed recipe (through the trainer, worker processes taking turns)")
    recipe.add_argument("--recipe", action="store_true", help="time the recipe instead of the tables")
    recipe.add_argument("--recipe-config", default="seed", help="config preset or file (default: seed)")
    recipe.add_argument("--compare-ref", metavar="REV", help="also time git revision REV's tree (a temporary worktree)")
    recipe.add_argument("--checkpointing", action="store_true", help="gradient checkpointing none / full / selective")
    recipe.add_argument("--compile", action="store_true", help="also time this tree with compile=true")
    recipe.add_argument("--data", default="builtin", help="training data (default: the built-in TinyStories sample)")
    recipe.add_argument("--tokenizer", default="builtin", help="tokenizer (default: the built-in DeepSeek-Coder one)")
    recipe.add_argument("--rounds", type=int, default=5, help="turns per worker (median reported)")
    recipe.add_argument("--recipe-steps", dest="recipe_steps", type=int, default=3, help="optimizer steps per turn")
    parser.add_argument("--recipe-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe_worker:
        return recipe_worker(json.loads(args.recipe_worker))
    keep_freed_memory = getattr(ops, "keep_freed_memory", None)  # absent from trees before it (--profile on them)
    if keep_freed_memory is not None:
        keep_freed_memory()  # what the trainer does on CPU; both models of a table share the process and its malloc
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        return profile_step(args.profile)
    if args.recipe:
        args.warmup, args.steps = max(args.warmup, 2), args.recipe_steps
        print(f"{datetime.date.today()}  commit {git_commit()}  {cpu_model()}  torch {torch.__version__}  "
              f"threads {args.threads or 'default'}  load average {os.getloadavg()[0]:.1f}", flush=True)
        return run_recipe(args)
    if args.quick:
        args.shapes, args.steps, args.warmup = ["1x32"], 2, 1
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]

    started = time.time()
    print(f"{datetime.date.today()}  commit {git_commit()}  {cpu_model()}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}  threads {torch.get_num_threads()}  "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    peaks = {"fp32": matmul_peak(torch.float32)}
    native_bf16 = matmul_peak(torch.bfloat16)
    peaks["bf16"] = max(native_bf16, peaks["fp32"])
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 (torch.mm bf16) {native_bf16 / 1e9:.1f} GFLOP/s",
          flush=True)

    rows = []
    for dtype in args.dtypes:
        for batch, seq_len in shapes:
            for config_name in args.configs:
                case = run_case(config_name, batch, seq_len, dtype, args.steps, args.warmup)
                for row in case:
                    ratio = f"  ratio {row['ratio']:.2f}x" if "ratio" in row else ""
                    print(f"{row['config']:>16} {row['shape']:>6} {dtype} {row['model']:>22}: "
                          f"{row['tokens_per_s']:9,.0f} tok/s{ratio}", flush=True)
                rows.extend(case)
    print()
    print(format_table(rows, peaks))
    print(f"\n{len(rows)} rows in {(time.time() - started) / 60:.1f} min, load average at the end "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
