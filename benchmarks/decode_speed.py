"""Decode speed: tinyseek's lean step, its previous path (the model's own forward with its cache) and transformers'
generate() on the same weights, side by side in one process; speculative decoding with the MTP head; prefill.

The three presets are the three attention types: ``seed`` (linear attention, MoE; no transformers twin),
``deepseek-v3-tiny`` (MLA, MoE; twin ``DeepseekV3ForCausalLM``) and ``llama-tiny`` (MHA, dense; twin
``LlamaForCausalLM``), random weights, fp32, greedy. Writes docs/decode.md and docs/decode_speed.png.

    python benchmarks/decode_speed.py [--threads 2] [--quick]
    python benchmarks/decode_speed.py --compare-ref REV [--rounds 7] [--quick]   # REV's tree vs this one, no docs written
    python benchmarks/decode_speed.py --weights [--run-dir PRESET=RUN] [--quick]  # bf16 vs fp32 weights

Decode tokens/s are (new tokens - 1) x batch / (time from the first new token to the last), best of --repeats
(for `model.generate()`, which cannot stream: the time for N new tokens minus the time for 1), so a prefill is
never counted as decoding. The speculative section trains a small MTP model first (kept in --work-dir).

``--llama-cpp`` adds llama.cpp (llama-cpp-python, ``pip install -e '.[llama-cpp]'``) on the same weights exported by
``tinyseek export --format gguf``: F32 against tinyseek's lean and compiled steps, Q8_0 against tinyseek's fastest.

``--weights`` measures the compiled step with its weights in bf16 against fp32 ones: tokens/s at batch 1 (also in a
subprocess that sees an AVX2-only CPU), and, through checkpoints of the `cpu-quick` recipe (trained first unless
``--run-dir`` names them), top-1 agreement over held-out tokens and the identical prefix of greedy continuations.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import itertools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.streamers import BaseStreamer

# Only names that every tree since the engine landed has: --compare-ref imports this file against an older tree.
from tinyseek import TinySeekConfig, TinySeekForCausalLM
from tinyseek.data.tokenizer import load_tokenizer
from tinyseek.generate import GenerationEngine, Sampling
from tinyseek.hf import to_transformers
from tinyseek.loading import load_model_and_tokenizer
from tinyseek.train.checkpoint import latest_checkpoint
from tree_workers import TreeWorker, git_worktree

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"linear": "seed", "mla": "deepseek-v3-tiny", "mha": "llama-tiny"}
LABELS = {"linear": "linear attention (`seed`)", "mla": "MLA (`deepseek-v3-tiny`)", "mha": "MHA (`llama-tiny`)"}
TWINS = {"mla", "mha"}
GREEDY = Sampling(temperature=0)


def build_model(preset: str, positions: int, **overrides) -> TinySeekForCausalLM:
    torch.manual_seed(0)
    return TinySeekForCausalLM(TinySeekConfig.from_preset(preset, max_position_embeddings=positions, **overrides)).eval()


def random_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(length * 31 + batch)
    return torch.randint(100, vocab - 300, (batch, length), generator=generator).tolist()


def best_time(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def decode_rate(generate, new_tokens: int, batch: int, repeats: int) -> float:
    """tokens/s after the first token, for a call that cannot stream: generate(n) produces n new tokens per row."""
    full = best_time(lambda: generate(new_tokens), repeats)
    first = best_time(lambda: generate(1), repeats)
    return (new_tokens - 1) * batch / max(full - first, 1e-9)


def streamed_rate(stamps_of_a_run, new_tokens: int, batch: int, repeats: int) -> float:
    """tokens/s after the first token, from the times at which a streaming run produced each step's tokens."""
    best = float("inf")
    for _ in range(repeats):
        stamps = stamps_of_a_run()
        best = min(best, stamps[-1] - stamps[0])
    return (new_tokens - 1) * batch / max(best, 1e-9)


class Stamps(BaseStreamer):
    """A transformers streamer that only notes when each step's tokens arrive (the first call is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class Paths:
    """The ways to decode one model: tinyseek's engine (lean or previous path) and the transformers twin."""

    def __init__(self, model, with_twin: bool):
        self.model = model
        self.lean = GenerationEngine(model, eos_token_ids=[])
        self.compiled = GenerationEngine(model, eos_token_ids=[], decoder="compiled")
        self.previous = GenerationEngine(model, eos_token_ids=[], decoder="model-forward")
        self.twin = to_transformers(model).eval() if with_twin else None

    def tinyseek(self, engine, prompts, new_tokens) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(prompts, GREEDY, new_tokens)]

    def transformers(self, prompts, new_tokens, streamer=None) -> list[list[int]]:
        ids = torch.tensor(prompts)
        with torch.no_grad():
            out = self.twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
        return out[:, ids.shape[1]:].tolist()

    def engine_stamps(self, engine, prompts, new_tokens) -> list[float]:
        return [time.perf_counter() for _ in engine.stream(prompts, GREEDY, new_tokens)]

    def transformers_stamps(self, prompts, new_tokens) -> list[float]:
        stamps = Stamps()
        self.transformers(prompts, new_tokens, stamps)
        return stamps.times[1:]

    def model_generate(self, prompts, new_tokens, compiled: bool = False) -> list[list[int]]:
        ids = torch.tensor(prompts)
        static = {"cache_implementation": "static"} if compiled else {}  # transformers' way to ask for compilation
        return self.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **static)[:, ids.shape[1]:].tolist()

    def rates(self, prompts, new_tokens: int, repeats: int, lean: bool = True) -> dict[str, float]:
        batch, rates = len(prompts), {}
        engines = {"lean": self.lean, "compiled": self.compiled, "previous": self.previous} if lean else {"previous": self.previous}
        for name, engine in engines.items():
            rates[name] = streamed_rate(lambda: self.engine_stamps(engine, prompts, new_tokens), new_tokens, batch, repeats)
        if self.twin is not None:
            rates["transformers"] = streamed_rate(lambda: self.transformers_stamps(prompts, new_tokens), new_tokens, batch, repeats)
        return rates

    def agreement(self, prompts, new_tokens: int) -> str:
        """How many rows of the lean path's greedy tokens equal the compiled and previous paths' (and transformers')."""
        lean = self.tinyseek(self.lean, prompts, new_tokens)
        others = [self.tinyseek(self.compiled, prompts, new_tokens), self.tinyseek(self.previous, prompts, new_tokens)]
        if self.twin is not None:
            others.append(self.transformers(prompts, new_tokens))
        equal = sum(all(row == other[i] for other in others) for i, row in enumerate(lean))
        return f"{equal}/{len(lean)}"


def cli_rate(model, tokenizer, prompt_ids: list[int], new_tokens: int, threads: int, work: Path,
             compiled: bool = False) -> tuple[float, int]:
    """`tinyseek generate` on the model saved as a folder: its own reported decode rate and prompt length."""
    folder = work / "cli-model"
    if not folder.exists():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    prompt_file = work / "prompt.txt"
    prompt_file.write_text(tokenizer.decode(prompt_ids, skip_special_tokens=True))
    command = [sys.executable, "-m", "tinyseek", "generate", "--model", str(folder), "--prompt-file", str(prompt_file),
               "--max-new-tokens", str(new_tokens), "--temperature", "0", "--device", "cpu", "--weights", "fp32"]
    command += ["--compile"] if compiled else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"tinyseek generate failed: {result.stderr.strip()}")
    err = result.stderr
    rate = float(re.search(r"then ([\d.]+) tokens/s", err).group(1))
    return rate, int(re.search(r"prompt (\d+) tokens", err).group(1))


def prefill_seconds(engine, prompt, repeats: int) -> float:
    return best_time(lambda: engine.generate([prompt], GREEDY, 1), repeats)


def train_quick_model(work: Path, preset: str, steps: int, threads: int, *settings: str) -> Path:
    """A run of the `cpu-quick` recipe on the built-in TinyStories sample (fp32), kept in ``work`` for later runs;
    ``settings``: extra ``--set`` overrides."""
    run = work / "-".join([preset, *(setting.split("=")[0].split(".")[-1] for setting in settings), str(steps)])
    if latest_checkpoint(run) is None:
        command = [sys.executable, "-m", "tinyseek", "train", "--config", "cpu-quick", "--data", "builtin",
                   "--tokenizer", "builtin", "--out-dir", str(run), "--max-steps", str(steps), "--dtype", "fp32",
                   "--set", f"model.preset={preset}", "--set", "logging.progress_bar=false", "--set", "data.split_by=null"]
        command += [part for setting in settings for part in ("--set", setting)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(sys.path)}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return run


def speculative_section(args, work: Path) -> dict:
    run = train_quick_model(work, "deepseek-v3-tiny", args.mtp_steps, args.threads, "model.num_nextn_predict_layers=1")
    model, tokenizer = load_model_and_tokenizer(run)
    from tinyseek.data.tokenizer import encode_prompt

    prompts = ["Once upon a time, there was a little girl named", "The dog ran to the park and", "Tom and Sue"]
    plain, previous = GenerationEngine(model, eos_token_ids=[]), GenerationEngine(model, eos_token_ids=[], decoder="model-forward")
    speculative = GenerationEngine(model, eos_token_ids=[], decoder="speculative")
    drafted = accepted = 0
    times = {"speculative": 0.0, "previous": 0.0, "lean": 0.0}
    equal = 0
    for text in prompts:
        ids = [encode_prompt(tokenizer, text)]
        outputs = {}
        for name, engine in (("speculative", speculative), ("previous", previous), ("lean", plain)):
            times[name] += best_time(lambda: outputs.__setitem__(name, engine.generate(ids, GREEDY, args.spec_tokens)), args.repeats)
        drafted += speculative.acceptance[0]
        accepted += speculative.acceptance[1]
        equal += outputs["speculative"][0].token_ids == outputs["lean"][0].token_ids
    return {
        "steps": args.mtp_steps, "acceptance": accepted / max(drafted, 1), "drafted": drafted,
        "speedup_previous": times["previous"] / times["speculative"], "speedup_lean": times["lean"] / times["speculative"],
        "equal": f"{equal}/{len(prompts)}", "tokens": args.spec_tokens,
    }


# ----------------------------------------------------------------------------------------------------------------
# --weights: the decode step with bf16 weights against fp32 ones

WEIGHTS_PRESETS = {"mla": "deepseek-v3-tiny", "mha": "llama-tiny"}
# An AVX2-only x86 CPU, as far as torch's kernels can tell: ATen's and torch.compile's vector code, oneDNN (bf16
# GEMMs) and MKL (fp32 GEMMs) all limited to AVX2.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
AGREEMENT_RULE = 0.99  # bf16 may be `auto`'s choice only if it picks the fp32 step's top-1 token this often


def weights_rates(args) -> dict[str, dict[str, float]]:
    """Tokens/s at batch 1 with fp32 and with bf16 weights, per attention type, of the compiled step (keys "fp32",
    "bf16") and of the eager one ("eager fp32", "eager bf16"); random weights: the rate does not depend on their
    values."""
    rates = {}
    for attention, preset in WEIGHTS_PRESETS.items():
        model = build_model(preset, args.target_prompt + args.target_tokens + 8)
        (prompt,) = random_prompts(1, args.target_prompt, model.config.vocab_size)
        rates[attention] = {}
        for decoder, weights in itertools.product(("compiled", "lean"), ("fp32", "bf16")):
            key = weights if decoder == "compiled" else f"eager {weights}"
            engine = GenerationEngine(model, eos_token_ids=[], decoder=decoder, weights=weights)
            engine.generate([prompt], GREEDY, args.target_tokens)  # compiled outside the timing
            rates[attention][key] = streamed_rate(
                lambda: [time.perf_counter() for _ in engine.stream([prompt], GREEDY, args.target_tokens)],
                args.target_tokens, 1, args.repeats,
            )
    return rates


def avx2_weights_rates(args) -> dict[str, dict[str, float]]:
    """`weights_rates` in a subprocess that sees an AVX2-only CPU (`AVX2_ENV`)."""
    command = [sys.executable, __file__, "--weights-rates", "--threads", str(args.threads), "--target-prompt",
               str(args.target_prompt), "--target-tokens", str(args.target_tokens), "--repeats", str(args.repeats)]
    env = {**os.environ, **AVX2_ENV, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"the AVX2 run failed: {result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def held_out_tokens(run: Path) -> list[int]:
    """The validation split of the corpus the run trained on (documents it never saw)."""
    from tinyseek.data import TokenDataset
    from tinyseek.runs import read_trainer_state

    return TokenDataset(read_trainer_state(latest_checkpoint(run))["data_dir"], "val").tokens.tolist()


def teacher_forced_top1(model, weights, tokens: list[int], capacity: int) -> tuple[list[int], list[float]]:
    """The compiled step's top-1 token after each of ``tokens`` but the last (the first through the prefill), fed the
    real tokens; and the gap between its two likeliest logits there. One ``capacity`` for every window: one compiled
    step."""
    from tinyseek.generate.lean import LeanDecoder

    decoder = LeanDecoder(model, weights, 1, capacity, capture=False, compiled=True)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = [decoder.prefill(ids[:, :1], torch.ones_like(ids[:, :1]))]
        logits += [decoder.step(ids[:, index]) for index in range(1, len(tokens) - 1)]
    top = torch.cat(logits).topk(2, dim=-1)
    return top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()


def agreement(args, preset: str, run: Path) -> dict:
    """Top-1 agreement of the bf16-weight step with the fp32 one over held-out text (teacher-forced, in windows of
    the training context), and the identical prefixes of their free-running greedy continuations."""
    from tinyseek.generate.lean import LeanWeights

    model, _ = load_model_and_tokenizer(run)
    held_out, window = held_out_tokens(run), min(128, model.config.max_position_embeddings)
    fp32, bf16 = LeanWeights(model, torch.float32), LeanWeights(model, torch.bfloat16)
    same = compared = 0
    flips = []  # the fp32 top-2 gaps where bf16 chose otherwise
    for start in range(0, len(held_out) - window, window):
        if compared >= args.agreement_tokens:
            break
        tokens = held_out[start : start + window + 1][: args.agreement_tokens - compared + 1]
        (reference, gaps), (ours, _) = (teacher_forced_top1(model, weights, tokens, window) for weights in (fp32, bf16))
        same += sum(a == b for a, b in zip(reference, ours))
        flips += [gap for a, b, gap in zip(reference, ours, gaps) if a != b]
        compared += len(reference)
    engines = [GenerationEngine(model, eos_token_ids=[], decoder="compiled", weights=name) for name in ("fp32", "bf16")]
    prompts = [held_out[start : start + args.prefix_prompt] for start in range(0, args.prefix_prompts * window, window)]
    prefixes = []
    for prompt in prompts:
        reference, ours = (engine.generate([prompt], GREEDY, args.prefix_tokens)[0].token_ids for engine in engines)
        prefixes.append(next((index for index, (a, b) in enumerate(zip(reference, ours)) if a != b), len(reference)))
    from tinyseek.runs import read_trainer_state

    steps = read_trainer_state(latest_checkpoint(run))["step"]
    return {"preset": preset, "steps": steps, "compared": compared, "same": same,
            "widest_flip": max(flips, default=None), "prefixes": prefixes}


def weights_section(args) -> dict:
    runs = dict(spec.split("=", 1) for spec in args.run_dir)
    results = {"rates": weights_rates(args), "avx2": avx2_weights_rates(args), "agreement": {}}
    print("weights rates", json.dumps(results["rates"]), "avx2", json.dumps(results["avx2"]), flush=True)
    for attention, preset in WEIGHTS_PRESETS.items():
        given = runs.get(preset)
        run = Path(given) if given else train_quick_model(args.work_dir, preset, args.train_steps, args.threads)
        results["agreement"][attention] = agreement(args, preset, run)
        print(attention, "agreement", json.dumps(results["agreement"][attention]), flush=True)
    return results


def weights_markdown(results: dict, args, started, load_average) -> str:
    rates, avx2, agreements = results["rates"], results["avx2"], results["agreement"]
    lines = [
        "# bf16 weights",
        "",
        f"The compiled step at batch 1, a {args.target_prompt}-token prompt, {args.target_tokens} greedy tokens, "
        f"{args.threads} torch thread(s), random weights; tokens/s as in the tables above. *AVX2* is the same run in "
        "a subprocess that sees an AVX2-only CPU (" + ", ".join(f"`{k}={v}`" for k, v in AVX2_ENV.items()) + "), "
        "the fallback of CPUs without bf16 units, where `--weights auto` keeps fp32.",
        "",
        "| preset | fp32 weights | bf16 weights | bf16 / fp32 | AVX2, fp32 weights | AVX2, bf16 weights "
        "| eager step: fp32 weights | eager step: bf16 weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for attention, row in rates.items():
        lines.append(
            f"| {LABELS[attention]} | {row['fp32']:,.0f} | {row['bf16']:,.0f} | {row['bf16'] / row['fp32']:.2f}x | "
            f"{avx2[attention]['fp32']:,.0f} | {avx2[attention]['bf16']:,.0f} | {row['eager fp32']:,.0f} | "
            f"{row['eager bf16']:,.0f} |"
        )
    lines += [
        "",
        "Target (issue): 1,000 tokens/s or more with bf16 weights for both presets, on one thread of a CPU with bf16 "
        "units (the compiled step). The eager step (without `--compile`) is measured the same way in the last two "
        "columns.",
        "",
        "Agreement with the fp32 step, through checkpoints of the `cpu-quick` recipe trained on the built-in "
        f"TinyStories sample: the top-1 token after each of {args.agreement_tokens:,} held-out tokens (its validation "
        "split, fed to both steps in windows of the training context), and the identical prefix of the two steps' "
        f"greedy continuations of {args.prefix_prompts} held-out {args.prefix_prompt}-token prompts "
        f"({args.prefix_tokens} new tokens each).",
        "",
        "| preset | training steps | top-1 agreement | widest fp32 top-2 gap where they differ | identical greedy prefix: "
        "shortest / median / longest |",
        "|---|---:|---:|---:|---:|",
    ]
    for attention, row in agreements.items():
        prefixes = sorted(row["prefixes"])
        widest = "-" if row["widest_flip"] is None else f"{row['widest_flip']:.3f}"
        lines.append(
            f"| {LABELS[attention]} | {row['steps']} | {row['same'] / row['compared']:.1%} ({row['same']:,} of "
            f"{row['compared']:,}) | {widest} | {prefixes[0]} / {statistics.median(prefixes):.0f} / "
            f"{prefixes[-1]} of {args.prefix_tokens} |"
        )
    short = [row["preset"] for row in agreements.values() if row["same"] / row["compared"] < AGREEMENT_RULE]
    lines += [
        "",
        f"The rule (issue): bf16 may be `--weights auto`'s choice only where the agreement is at least "
        f"{AGREEMENT_RULE:.0%}. This run: {'NOT met for ' + ', '.join(short) if short else 'met for both presets'}.",
        "",
        f"- {machine()}; torch {torch.__version__}; load average at start: {load_average}",
        f"- date: {started:%Y-%m-%d %H:%M %Z}; git commit: {git_commit()}; {results['seconds']:.0f} s",
        "",
    ]
    return "\n".join(lines)


class CountOperators(TorchDispatchMode):
    """Counts the ATen operators dispatched (views included), without the profiler's nesting."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_profile(model, context: int, steps: int = 20) -> dict:
    """Where one lean decode step's time goes (batch 1, torch.profiler), and the LM head's GEMV timed alone."""
    from torch.profiler import ProfilerActivity, profile

    from tinyseek.generate.lean import LeanDecoder, LeanWeights

    weights = LeanWeights(model)
    decoder = LeanDecoder(model, weights, 1, context + 2 * steps + 8, False)
    prompt = torch.tensor(random_prompts(1, context, model.config.vocab_size))
    compiled = LeanDecoder(model, weights, 1, context + 2 * steps + 8, False, compiled=True)
    with torch.no_grad():
        token = compiled.prefill(prompt, torch.ones_like(prompt)).argmax(-1)
        started = time.perf_counter()
        for _ in range(steps):
            token = compiled.step(token).argmax(-1)
        compiled_ms = (time.perf_counter() - started) / steps * 1e3
        token = decoder.prefill(prompt, torch.ones_like(prompt)).argmax(-1)
        for _ in range(steps):
            token = decoder.step(token).argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                token = decoder.step(token).argmax(-1)
        with CountOperators() as counter:
            token = decoder.step(token).argmax(-1)
        hidden = torch.randn(1, model.config.hidden_size)
        head = best_time(lambda: [hidden @ weights.head for _ in range(steps)], 3) / steps
    events = [e for e in profiler.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return {
        "ops_per_step": counter.count,
        "step_ms": total / steps / 1e3, "head_ms": head * 1e3, "compiled_step_ms": compiled_ms,
        "top": [(e.key, e.self_cpu_time_total / total, e.count / steps) for e in top],
    }


def llama_cpp_rate(path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> float:
    """llama.cpp's decode tokens/s after the first new token, greedy, through llama-cpp-python's own loop."""
    from tinyseek.generate.gguf_export import open_in_llama_cpp

    model = open_in_llama_cpp(path, n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt), n_threads=threads,
                              n_threads_batch=threads, verbose=False)

    def stamps() -> list[float]:
        tokens = model.generate(prompt, temp=0.0, top_k=1, reset=True)
        return [time.perf_counter() for _ in zip(range(new_tokens), tokens)]

    return streamed_rate(stamps, new_tokens, 1, repeats)


def llama_cpp_section(args, tokenizer, work: Path) -> dict:
    """Per preset with a llama.cpp architecture: tokens/s of tinyseek's lean and compiled steps and of llama.cpp's F32
    and Q8_0 files of the same weights, and the bytes of weights each reads per token."""
    from tinyseek.generate.gguf_export import export_gguf

    rows = {}
    for attention in ("mha", "mla"):
        model = build_model(PRESETS[attention], args.target_prompt + args.target_tokens + 8)
        (prompt,) = random_prompts(1, args.target_prompt, len(tokenizer))
        paths = Paths(model, with_twin=False)
        paths.tinyseek(paths.compiled, [prompt], args.target_tokens)  # compiled outside the timing
        rates = paths.rates([prompt], args.target_tokens, args.repeats)
        row = {"lean": rates["lean"], "compiled": rates["compiled"],
               "tinyseek_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
        for gguf_type in ("f32", "q8_0"):
            path = work / f"{attention}-{gguf_type}.gguf"
            path.unlink(missing_ok=True)
            export_gguf(model, tokenizer, path, gguf_type)
            row[gguf_type] = llama_cpp_rate(path, prompt, args.target_tokens, args.threads, args.repeats)
            row[f"{gguf_type}_bytes"] = path.stat().st_size
        rows[attention] = row
        print(attention, "llama.cpp", json.dumps(row), flush=True)
    return rows


def llama_cpp_markdown(rows: dict, args) -> list[str]:
    lines = [
        f"## Beside llama.cpp: batch 1, a {args.target_prompt}-token prompt, {args.target_tokens} greedy tokens",
        "",
        "The same random weights written by `tinyseek export --format gguf` and decoded by llama.cpp through "
        f"llama-cpp-python's `generate()` (its own greedy loop), with {args.threads} thread(s) like torch's. MB/token: "
        "the weights each side stores, which a step reads at least once (the GGUF file's size for llama.cpp).",
        "",
        "| preset | lean | compiled | llama.cpp F32 | F32 / compiled | tinyseek MB/token | llama.cpp Q8_0 | "
        "Q8_0 / tinyseek's fastest | Q8_0 MB/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for attention, row in rows.items():
        fastest = max(row["lean"], row["compiled"])
        lines.append(
            f"| {LABELS[attention]} | {row['lean']:,.0f} | {row['compiled']:,.0f} | {row['f32']:,.0f} | "
            f"{row['f32'] / row['compiled']:.2f}x | {row['tinyseek_bytes'] / 1e6:.1f} | {row['q8_0']:,.0f} | "
            f"{row['q8_0'] / fastest:.2f}x | {row['q8_0_bytes'] / 1e6:.1f} |"
        )
    lines += [
        "",
        "At F32 both sides read the same bytes per token, so a ratio away from 1 there is per-token overhead (graph "
        "building, operator dispatch, the Python loop around each step); Q8_0 reads about a quarter of the bytes, "
        "which a memory-bound step turns into speed.",
        "",
    ]
    return lines


def write_plot(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({batch for by_batch in sweep.values() for batch in by_batch})
    figure, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    styles = {"compiled": "-", "lean": "-.", "previous": "--", "transformers": ":"}
    for axis, batch in zip(axes[0], batches):
        for index, (attention, by_batch) in enumerate(sweep.items()):
            by_context = by_batch.get(batch, {})
            for path_name, style in styles.items():
                points = [(c, r[path_name]) for c, r in by_context.items() if path_name in r]
                if points:
                    axis.plot(*zip(*points), style, marker="o", color=f"C{index}", label=f"{attention}, {path_name}")
        contexts = sorted({c for by_batch in sweep.values() for c in by_batch.get(batch, {})})
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, labels=[str(c) for c in contexts])
        axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"batch {batch}")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(results: dict, args, started, load_average) -> str:
    targets, sweep, prefill, spec = results["targets"], results["sweep"], results["prefill"], results.get("speculative")
    lines = [
        "# Decoding speed",
        "",
        "All figures from one run of the command at the end, in one process (the CLI in a subprocess), fp32, greedy,",
        f"random weights, {args.threads} torch thread(s). Tokens/s count decoding only: (N - 1) x batch / (time from "
        "the first new token to the last), best of repeated runs. *Lean* is tinyseek's generation engine with its lean decode "
        "step (the default); *previous* is the engine through the model's own forward and cache (the path before "
        "the lean step); *transformers* is `generate()` of `tinyseek.hf.to_transformers(model)` on the same weights.",
        "",
        f"## Targets: batch 1, a {args.target_prompt}-token prompt, {args.target_tokens} new tokens",
        "",
        "| preset | lean, `model.generate()` | compiled, `model.generate()` | lean, `tinyseek generate` | "
        "compiled, `tinyseek generate --compile` | previous | transformers | compiled / transformers | compile time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for attention, row in targets.items():
        twin = row.get("transformers")
        ratio = f"{row['compiled'] / twin:.1f}x" if twin else "no twin"
        lines.append(
            f"| {LABELS[attention]} | {row['model_generate']:,.0f} | {row['compiled']:,.0f} | {row['cli']:,.0f} | "
            f"{row['cli_compiled']:,.0f} | {row['previous']:,.0f} | {f'{twin:,.0f}' if twin else '-'} | {ratio} | "
            f"{row['compile_seconds']:.0f} s |"
        )
    lines += [
        "",
        "Targets (issue): >= 5x transformers for `llama-tiny` and `deepseek-v3-tiny`, and >= 1,000 tokens/s for all "
        "three. *Compiled* is the lean step through torch.compile, which `model.generate(..., "
        "cache_implementation=\"static\")` (transformers' way to ask for it), `tinyseek generate --compile` and "
        "`GenerationEngine(decoder=\"compiled\")` select; the compile time is the first such call's, once per process and "
        "shape (torch's on-disk cache shortens later ones). The CLI's figure is the rate it reports itself after the "
        f"first token (its prompt: {targets[next(iter(targets))]['cli_prompt']} tokens of text).",
        "",
        "## Tokens/s against context length and batch",
        "",
        f"{args.sweep_tokens} new tokens after a random prompt of the given length; the last column says for how "
        "many rows the lean path's tokens equal the compiled and previous paths' (and transformers') token for token.",
        "",
        "| attention | batch | context | lean | compiled | previous | transformers | equal rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for attention, by_batch in sweep.items():
        for batch, by_context in by_batch.items():
            for context, rates in by_context.items():
                twin = rates.get("transformers")
                lines.append(
                    f"| {LABELS[attention]} | {batch} | {context} | {rates['lean']:,.0f} | {rates['compiled']:,.0f} | "
                    f"{rates['previous']:,.0f} | "
                    f"{f'{twin:,.0f}' if twin else '-'} | {rates['equal']} |"
                )
    lines += [
        "",
        "![decode tokens/s against context length, batch 1 and 16](decode_speed.png)",
        "",
        f"## Prefill: time to the first token of a {args.prefill_prompt}-token prompt (batch 1)",
        "",
        "| attention | tinyseek | transformers |",
        "|---|---:|---:|",
    ]
    for attention, row in prefill.items():
        if attention == "mla-absorbed":
            continue
        twin = row.get("transformers")
        lines.append(f"| {LABELS[attention]} | {row['tinyseek'] * 1e3:.1f} ms | {f'{twin * 1e3:.1f} ms' if twin else '-'} |")
    absorbed = prefill["mla-absorbed"]["tinyseek"]
    lines += [
        "",
        f"MLA prefills in the expanded form (per-head keys and values from the latent, fused SDPA, as in training): "
        f"{prefill['mla']['tinyseek'] * 1e3:.1f} ms against {absorbed * 1e3:.1f} ms in the absorbed form that decoding "
        "uses; the cache holds only the latent either way.",
        "",
    ]
    profile = results["profile"]
    lines += [
        f"## Where a lean step's time goes (`deepseek-v3-tiny`, batch 1, context {args.target_prompt})",
        "",
        f"torch.profiler over 20 steps of the eager lean step: {profile['ops_per_step']} ATen operator calls per "
        f"step (views included), {profile['step_ms']:.2f} ms of operator time per step. The compiled step takes "
        f"{profile['compiled_step_ms']:.2f} ms, of which the LM head's GEMV ([1, 128] x [128, 32256], 16.5 MB of fp32 "
        f"weights) alone takes {profile['head_ms']:.2f} ms.",
        "",
        "| operator (eager step) | share of the step | calls per step |",
        "|---|---:|---:|",
        *(f"| `{name}` | {share:.0%} | {calls:.0f} |" for name, share, calls in profile["top"]),
        "",
        "A step does about 10 MFLOP, most of it the head, and reads every weight it uses once: the 16.5 MB head and "
        "about 7 MB of layers, more than a core's share of cache, so a step is bound by how fast one core streams "
        "them from L3 (about 40 GB/s measured here with `torch.sum` over the head). The eager step adds a few "
        "hundred small operations, each a few microseconds of dispatch; the compiled step fuses the element-wise "
        "work into a few C++ kernels called from a C++ wrapper with no guard checks, so what is left is the GEMVs' "
        "memory traffic and torch.compile's per-call entry (~0.1 ms). Further speed would need fewer bytes per "
        "token: weights in bf16 (`--weights bf16`, half the traffic, measured in the bf16 block), or batching several "
        "sequences per step (the batch-16 rows).",
        "",
    ]
    if results.get("llama_cpp"):
        lines += llama_cpp_markdown(results["llama_cpp"], args)
    if spec:
        lines += [
            "## Self-speculative decoding with the MTP head",
            "",
            f"`deepseek-v3-tiny` with one MTP module, trained for {spec['steps']} steps of the `cpu-quick` recipe on the "
            f"built-in TinyStories sample; {spec['tokens']} greedy tokens after three short story prompts. The MTP "
            "head drafts the next token; the main model checks it in the same forward as the current token.",
            "",
            "| drafts checked | accepted | speedup over the previous path | speedup over the lean step | output equal |",
            "|---:|---:|---:|---:|---:|",
            f"| {spec['drafted']} | {spec['acceptance']:.0%} | {spec['speedup_previous']:.2f}x | "
            f"{spec['speedup_lean']:.2f}x | {spec['equal']} |",
            "",
            "Speculation verifies through the model's own forward (one two-token forward per draft), so it is "
            "measured against that path first. At this size a draft is not cheap: it runs a decoder block and the "
            "full 32k-wide head, a large part of a whole step, while a two-token forward costs about what a "
            "one-token forward does; so even a high acceptance buys little, and the lean single-token step is "
            "faster than both.",
            "",
        ]
    lines += [
        "## Setup",
        "",
        f"- machine: {machine()}; torch threads: {args.threads}; load average at start: {load_average}"
        + (" (a shared machine: other jobs ran at the same time, so absolute figures are low and noisy)"
           if float(load_average.split(" / ")[0]) > 0.5 * (os.cpu_count() or 1) else ""),
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {started:%Y-%m-%d %H:%M %Z}; git commit: {git_commit()}",
        f"- command: `{' '.join(['python', shlex.join(sys.argv)])}` ({results['seconds']:.0f} s)",
        "",
    ]
    return "\n".join(lines)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} logical cores"


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # As report.py judges a tree: the pages that benchmarks write do not count.
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs", ":(exclude)README.md")
    return commit + (" (with uncommitted changes)" if changed else "")


# ----------------------------------------------------------------------------------------------------------------
# --compare-ref: this tree against another revision's, in worker processes taking turns


def engine_for(model, path: str):
    """A GenerationEngine of either API: `decoder=` now, the `compile=` flag in trees before it."""
    if "decoder" in inspect.signature(GenerationEngine).parameters:
        return GenerationEngine(model, eos_token_ids=[], decoder=path)
    return GenerationEngine(model, eos_token_ids=[], compile=path == "compiled")


def compare_worker(spec: dict) -> None:
    """Runs in a child process with PYTHONPATH at one tree's src/: builds every preset's model and engines, decodes
    once with each (compiling the compiled step), then answers "PRESET PATH" with one decode rate in tokens/s."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # warnings and compiler output must not mix with the protocol
    torch.set_num_threads(spec["threads"])
    prompt_length, new_tokens = spec["prompt"], spec["tokens"]
    engines, prompts = {}, {}
    for preset in spec["presets"]:
        model = build_model(preset, prompt_length + new_tokens + 1)
        (prompts[preset],) = random_prompts(1, prompt_length, model.config.vocab_size)
        for path in spec["paths"]:
            engines[preset, path] = engine_for(model, path)
            engines[preset, path].generate([prompts[preset]], GREEDY, 2)
    protocol.write("ready\n")
    for line in sys.stdin:
        preset, path = line.split()
        stamps = [time.perf_counter() for _ in engines[preset, path].stream([prompts[preset]], GREEDY, new_tokens)]
        protocol.write(f"{(new_tokens - 1) / (stamps[-1] - stamps[0])}\n")


def compare_ref(args) -> None:
    """Median decode rate of each preset and path in REV's tree and in this one, over interleaved rounds (each round
    asks every worker in turn, so slow spells of a shared machine hit both), with the rounds' spread."""
    spec = {"threads": args.threads, "prompt": args.target_prompt, "tokens": args.target_tokens,
            "presets": list(PRESETS.values()), "paths": ["lean", "compiled"]}
    print(f"{datetime.date.today()}  commit {git_commit()}  {machine()}  torch {torch.__version__}  threads "
          f"{args.threads}  load average {' / '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tinyseek-decode-") as scratch, git_worktree(args.compare_ref, Path(scratch)) as ref:
        script, env = Path(__file__).resolve(), {"OMP_NUM_THREADS": str(args.threads)}
        workers = [TreeWorker(label, tree, script, "--compare-worker", spec, env)
                   for label, tree in ((f"{args.compare_ref} (ref)", ref), ("this tree", ROOT))]
        try:
            for worker in workers:
                worker.read()  # "ready": models built, compiled steps compiled
            rates = {(worker.label, preset, path): [] for worker in workers for preset in spec["presets"] for path in spec["paths"]}
            for _ in range(args.rounds):
                for preset in spec["presets"]:
                    for path in spec["paths"]:
                        for worker in workers:
                            rates[worker.label, preset, path].append(worker.ask(f"{preset} {path}"))
        finally:
            for worker in workers:
                worker.close()
    print(f"\nbatch 1, a {args.target_prompt}-token prompt, {args.target_tokens} new tokens; {args.rounds} interleaved "
          "rounds; median decode tokens/s (min-max over the rounds)\n")
    print("| preset | path | ref | this tree | this / ref |")
    print("|---|---|---:|---:|---:|")
    for preset in spec["presets"]:
        for path in spec["paths"]:
            ref_rates, ours = (rates[worker.label, preset, path] for worker in workers)
            print(f"| {preset} | {path} | {statistics.median(ref_rates):,.0f} ({min(ref_rates):,.0f}-{max(ref_rates):,.0f}) | "
                  f"{statistics.median(ours):,.0f} ({min(ours):,.0f}-{max(ours):,.0f}) | "
                  f"{statistics.median(ours) / statistics.median(ref_rates):.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target-prompt", type=int, default=128)
    parser.add_argument("--target-tokens", type=int, default=256)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048], help="context lengths at batch 1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-contexts", type=int, nargs="+", default=[128, 512], help="context lengths at --batch")
    parser.add_argument("--sweep-tokens", type=int, default=32)
    parser.add_argument("--prefill-prompt", type=int, default=384)
    parser.add_argument("--mtp-steps", type=int, default=300, help="training steps of the MTP model (0: skip)")
    parser.add_argument("--spec-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "decode-benchmark")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="add llama.cpp on the same weights (needs llama-cpp-python: pip install -e '.[llama-cpp]')")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script (figures meaningless)")
    parser.add_argument("--compare-ref", metavar="REV",
                        help="only compare decode rates (lean and compiled, every preset) of git revision REV's tree "
                             "(a temporary worktree) and this one; prints a table, writes no docs")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --compare-ref (median reported)")
    parser.add_argument("--compare-worker", help=argparse.SUPPRESS)
    weights = parser.add_argument_group("--weights: the compiled step with bf16 weights against fp32 ones")
    weights.add_argument("--weights", action="store_true",
                         help="only this comparison (tokens/s, also as on an AVX2-only CPU, and agreement on trained "
                              "checkpoints); writes decode_bf16.md")
    weights.add_argument("--run-dir", action="append", default=[], metavar="PRESET=RUN",
                         help="a trained run of deepseek-v3-tiny or llama-tiny to measure agreement on (default: "
                              "train one with the cpu-quick recipe, kept in --work-dir)")
    weights.add_argument("--train-steps", type=int, default=300, help="training steps of the runs trained for it")
    weights.add_argument("--agreement-tokens", type=int, default=1000, help="held-out tokens, teacher-forced")
    weights.add_argument("--prefix-prompts", type=int, default=8, help="held-out prompts continued greedily")
    weights.add_argument("--prefix-prompt", type=int, default=16, help="tokens of each of those prompts")
    weights.add_argument("--prefix-tokens", type=int, default=256, help="greedy tokens after each of those prompts")
    weights.add_argument("--weights-rates", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare_worker:
        return compare_worker(json.loads(args.compare_worker))
    if args.quick:
        args.target_tokens, args.contexts, args.sweep_tokens, args.repeats = 8, [16, 64], 4, 1
        args.prefill_prompt, args.mtp_steps, args.spec_tokens, args.batch, args.batch_contexts = 64, 4, 8, 3, [16]
        args.rounds = 2
        args.train_steps, args.agreement_tokens, args.prefix_prompts, args.prefix_tokens = 4, 64, 2, 8
    torch.set_num_threads(args.threads)
    if args.compare_ref:
        return compare_ref(args)
    if args.weights_rates:
        return print(json.dumps(weights_rates(args)))
    started, clock = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    load_average = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.weights:
        results = weights_section(args)
        results["seconds"] = time.perf_counter() - clock
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "decode_bf16.md").write_text(weights_markdown(results, args, started, load_average))
        return print(f"wrote {args.out_dir / 'decode_bf16.md'} in {results['seconds']:.0f} s")
    results = {"targets": {}, "sweep": {}, "prefill": {}}
    tokenizer = load_tokenizer("builtin")

    for attention, preset in PRESETS.items():
        positions = max(args.contexts) + args.sweep_tokens + 1
        # Room for the CLI's prompt too: random ids decoded to text may re-encode to more tokens.
        positions = max(positions, 4 * args.target_prompt + args.target_tokens, args.prefill_prompt + 1)
        model = build_model(preset, positions)
        paths = Paths(model, attention in TWINS)
        vocab = model.config.vocab_size
        (prompt,) = random_prompts(1, args.target_prompt, min(vocab, len(tokenizer)))
        started_compiling = time.perf_counter()
        paths.model_generate([prompt], args.target_tokens, compiled=True)
        compile_seconds = time.perf_counter() - started_compiling
        paths.model_generate([prompt], 1, compiled=True)  # decode_rate's other shape, compiled outside the timing
        row = {
            "model_generate": decode_rate(lambda n: paths.model_generate([prompt], n), args.target_tokens, 1, args.repeats),
            "compiled": decode_rate(lambda n: paths.model_generate([prompt], n, compiled=True), args.target_tokens, 1, args.repeats),
            "compile_seconds": compile_seconds,
            **paths.rates([prompt], args.target_tokens, args.repeats, lean=False),
        }
        with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
            row["cli"], row["cli_prompt"] = cli_rate(model, tokenizer, prompt, args.target_tokens, args.threads, Path(work))
            row["cli_compiled"], _ = cli_rate(model, tokenizer, prompt, args.target_tokens, args.threads, Path(work), compiled=True)
        results["targets"][attention] = row
        print(attention, "targets", json.dumps(row), flush=True)

        results["sweep"][attention] = {}
        for batch, contexts in ((1, args.contexts), (args.batch, args.batch_contexts)):
            results["sweep"][attention][batch] = {}
            for context in contexts:
                prompts = random_prompts(batch, context, vocab)
                rates = paths.rates(prompts, args.sweep_tokens, args.repeats)
                rates["equal"] = paths.agreement(prompts, args.sweep_tokens)
                results["sweep"][attention][batch][context] = rates
                print(attention, "batch", batch, "context", context, json.dumps(rates), flush=True)

        (prompt,) = random_prompts(1, args.prefill_prompt, vocab)
        prefill = {"tinyseek": prefill_seconds(paths.lean, prompt, args.repeats)}
        if paths.twin is not None:
            prefill["transformers"] = best_time(lambda: paths.transformers([prompt], 1), args.repeats)
        results["prefill"][attention] = prefill
        if attention == "mla":
            from tinyseek.attention.latent import MultiHeadLatentAttention

            MultiHeadLatentAttention.expanded_prefill = False
            results["prefill"]["mla-absorbed"] = {"tinyseek": prefill_seconds(paths.lean, prompt, args.repeats)}
            MultiHeadLatentAttention.expanded_prefill = True
        print(attention, "prefill", json.dumps(prefill), flush=True)

    if args.llama_cpp:
        results["llama_cpp"] = llama_cpp_section(args, tokenizer, args.work_dir)
    results["profile"] = step_profile(build_model("deepseek-v3-tiny", 4 * args.target_prompt), args.target_prompt)
    print("profile", json.dumps(results["profile"]), flush=True)
    if args.mtp_steps:
        results["speculative"] = speculative_section(args, args.work_dir)
        print("speculative", json.dumps(results["speculative"]), flush=True)
    results["seconds"] = time.perf_counter() - clock

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_plot(results["sweep"], args.out_dir / "decode_speed.png")
    (args.out_dir / "decode.md").write_text(markdown(results, args, started, load_average))
    print(f"wrote {args.out_dir / 'decode.md'} and {args.out_dir / 'decode_speed.png'} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
