"""Model quality for the same wall-clock (or token) budget: tinyseek presets against a plain transformers reference.

Every run trains on the same data (library_of_phi_gpt4, whole books held out by title; a run named *-mix* draws on
the other two textbook corpora too) and is evaluated the same way, in one invocation:

  reference   transformers' LlamaForCausalLM (hidden 128, 4 layers, 4 heads, intermediate 256, untied, 32,256
              embedding rows, SDPA) in a plain loop: 256-token windows at random offsets, micro-batch 16, fused AdamW
              lr 3e-3, betas (0.9, 0.95), weight decay 0.1 on 2-D parameters, 100 warmup steps then cosine to 10%,
              fp32, gradient clipping at 1.0
  reference-* the reference with a lever of tinyseek's recipe (REFERENCE_VARIANTS below): one that helps it, it gets
  cpu-15min   configs/cpu-15min.yaml: the preset this benchmark's screening chose
  cpu-quick   configs/cpu-quick.yaml (the seed architecture)
  ...         the screening variants in RUNS below

Reported per run: tokens seen, tokens/s, training time and the share of the budget it used, validation bits per byte
(summed cross-entropy of every held-out document token, separators excluded, over the documents' UTF-8 bytes: the
same for every tokenizer) and nats per token on the whole held-out books with 256-token windows, bits per byte on
the held-out books of each other textbook corpus (split alike: a book held out in one is held out in all, whatever
the run trained on, see tinyseek.data.mixture), MoE MaxVio, and the
share of distinct 4-grams in greedy and sampled 200-token continuations of 5 fixed prompts (no repetition penalty).
Writes docs/quality.md (or --out), quality.png (training loss in bits per byte against training time) and
quality_samples.json.

    python benchmarks/report.py quality-15min    # the headline: four 15-minute runs, ~65 min
    python benchmarks/quality.py --runs screen-dense,screen-mla-moe --tokens 250000 --threads 1   # screening
    python benchmarks/quality.py --runs reference,cpu-15min,screen-dense --throughput 2      # tokens/s side by side
    python benchmarks/quality.py --budgets 5m,15m,60m    # each budget's preset and the reference at it, ~3 h
    python benchmarks/quality.py --family docs           # the budget family from the budgets measured so far
    python benchmarks/quality.py --mixture gpt35_wiki=1 ...   # every run (the reference too) on a mixture

Every time-budgeted invocation also writes quality_<budget>.json (its runs' figures, commit and command). With
--budgets, each budget's own preset (BUDGET_PRESETS) and the reference (--reference) train for that budget, and
quality_<budget>.md for each budget and the family, quality_budgets.md and quality_budgets.png (bits per byte against
minutes, on each source's held-out books), are written instead. --family DIR draws the family from the
quality_<budget>.json files in DIR, so its budgets can be measured by separate invocations, at different commits
(each point names its own): the three budgets in one go take longer than an idle machine is often available.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tinyseek.data import TokenDataset, load_tokenizer, open_source, resolve_data, train_bpe_tokenizer
from tinyseek.data.mixture import prepare_extra_sources
from tinyseek.evaluation import continuations, score_split
from tinyseek.train.budget import Horizon, TimeBudget, parse_duration
from tinyseek.train.config import DataConfig, OptimConfig, ScheduleConfig, load_config
from tinyseek.train.metrics import read_metrics
from tinyseek.train.optim import build_optimizer
from tinyseek.train.schedule import lr_multiplier, moved_horizon
from tinyseek.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSEEK_SHARED_DATA") or REPO.parent / "shared" / "data")
WIKI = SHARED / "corpus" / "library_of_phi_gpt35_wiki.jsonl.gz"
SYNTH = SHARED / "corpus" / "library_of_phi_gpt35_synth.jsonl.gz"
# Every run is scored on the held-out books of these too (those present), whatever it trained on.
OTHER_SOURCES = (WIKI, SYNTH)
PROMPTS = [
    "The study of economics",
    "In this chapter, we will",
    "The cell membrane is",
    "A function f is continuous if",
    "During the Industrial Revolution,",
]
EVAL_SEQ_LEN = 256
# A model's first training steps run slower than the rest (the reference's first six by 30% on 1 thread), so speed
# is timed after these.
THROUGHPUT_WARMUP_STEPS = 6
SPLIT = {"split_by": "title", "val_fraction": 0.05}  # the same held-out books for every run and tokenizer
REFERENCE = "reference"
MUON_X3 = {"name": "muon", "lr_multipliers": {"muon": 3.0}}  # cpu-15min's optimizer
WSD = {"kind": "wsd", "decay_fraction": 0.3}  # cpu-15min's schedule (the warmup and floor are the reference's too)
# The reference with a lever of tinyseek's recipe, to check whether the lever helps it too (then it gets it): name ->
# {"optimizer": settings of tinyseek's registered builder that replace its AdamW, "schedule": ScheduleConfig fields
# that replace its cosine's, "mixture": other training sources and their weights, relative to the primary's 1}.
REFERENCE_VARIANTS: dict[str, dict] = {
    REFERENCE: {},
    "reference-muon": {"optimizer": MUON_X3},
    "reference-wsd": {"schedule": WSD},
    "reference-muon-wsd": {"optimizer": MUON_X3, "schedule": WSD},
}
SCREENING_HEADING = "## Screening"
BUDGET_PRESETS = {"5m": "cpu-5min", "15m": "cpu-15min", "60m": "cpu-60min"}  # --budgets: the preset for each

ADAMW = {"name": "adamw", "lr_multipliers": {}}  # the optimizer settings of cpu-15min before Muon shipped
# name -> (preset, overrides). Screening variants change one lever of their base at a time. A run whose overrides
# name `data.tokenizer: bpe-N` gets a byte-level BPE of N tokens trained here on the training split (never on the
# held-out books), as `tinyseek tokenizer train` trains one.
RUNS: dict[str, tuple[str, dict]] = {
    "cpu-5min": ("cpu-5min", {}),
    "cpu-15min": ("cpu-15min", {}),
    "cpu-60min": ("cpu-60min", {}),
    # The screening (docs/quality.md): the preset's recipe with one lever moved from a dense 8k-vocabulary base.
    "screen-dense": ("cpu-15min", {"model": {"preset": "llama-tiny"}}),
    "screen-dense-vocab-32k": (
        "cpu-15min", {"data": {"tokenizer": None}, "model": {"preset": "llama-tiny", "vocab_size": 32256}}),
    "screen-dense-vocab-16k": (
        "cpu-15min", {"data": {"tokenizer": "bpe-16384"}, "model": {"preset": "llama-tiny", "vocab_size": 16384}}),
    "screen-mla-moe": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}}),
    "screen-seed-arch": ("cpu-15min", {"model": {"preset": "seed", "attention_dropout": 0.0}}),
    "screen-dense-hidden-192": (
        "cpu-15min", {"model": {"preset": "llama-tiny", "hidden_size": 192, "intermediate_size": 512}}),
    "screen-dense-mtp": ("cpu-15min", {"model": {"preset": "llama-tiny", "num_nextn_predict_layers": 1}}),
    "screen-dense-wiki-mix": ("cpu-15min", {"model": {"preset": "llama-tiny"}, "data": {"mixture": {str(WIKI): 1.0}}}),
    # The preset's other levers, one at a time from its own base (screen-mla-moe: MLA + MoE, 8k BPE, Muon at x3 since
    # Muon shipped). Window and batch variants keep the other of the two, so the total tokens stay fixed through the
    # step count. Muon's update is scaled to AdamW's RMS, so AdamW's lr is Moonshot's choice for it; the preset's x3
    # gives the step of Keller Jordan's usual lr 0.02 under his own scaling on matrices with 128 inputs (most here).
    "screen-mla-moe-adamw": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "optim": ADAMW}),
    "screen-mla-moe-muon-lr-x1": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "optim": {"lr_multipliers": {"muon": 1.0}}}),
    "screen-mla-moe-vocab-16k": ("cpu-15min", {
        "data": {"tokenizer": "bpe-16384"}, "model": {"preset": "deepseek-v3-tiny", "vocab_size": 16384}}),
    "screen-mla-moe-wiki-mix": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "data": {"mixture": {str(WIKI): 1.0}}}),
    "screen-mla-moe-lr-1.5e-3": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "optim": {"lr": 1.5e-3}}),
    "screen-mla-moe-lr-6e-3": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "optim": {"lr": 6e-3}}),
    "screen-mla-moe-cosine": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "schedule": {"kind": "cosine"}}),
    "screen-mla-moe-tied": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "tie_word_embeddings": True}}),
    "screen-mla-moe-window-128": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "data": {"seq_len": 128, "micro_batch_size": 32}}),
    "screen-mla-moe-window-512": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "data": {"seq_len": 512, "micro_batch_size": 8}}),
    "screen-mla-moe-batch-8": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "data": {"micro_batch_size": 8}}),
    "screen-mla-moe-batch-32": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "data": {"micro_batch_size": 32}}),
    "screen-mla-moe-layers-6": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "num_hidden_layers": 6}}),
    "screen-mla-moe-hidden-192": ("cpu-15min", {"model": {  # every feed-forward width scaled with the hidden size
        "preset": "deepseek-v3-tiny", "hidden_size": 192, "intermediate_size": 768, "moe_intermediate_size": 96}}),
    # Issue 24's screens on the same base: the MoE's own knobs (the active width per token kept at 4 x 64 unless the
    # lever is the width itself) and the shape of the schedule.
    "screen-mla-moe-experts-8": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "n_routed_experts": 8}}),
    "screen-mla-moe-experts-32": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "n_routed_experts": 32}}),
    "screen-mla-moe-experts-32-of-32": ("cpu-15min", {"model": {
        "preset": "deepseek-v3-tiny", "n_routed_experts": 32, "moe_intermediate_size": 32, "num_experts_per_tok": 8}}),
    "screen-mla-moe-top-2": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "num_experts_per_tok": 2}}),
    "screen-mla-moe-top-6": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "num_experts_per_tok": 6}}),
    "screen-mla-moe-bias-speed-1e-2": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "bias_update_speed": 1e-2}}),
    "screen-mla-moe-bias-speed-1e-4": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "bias_update_speed": 1e-4}}),
    "screen-mla-moe-no-seq-aux": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "seq_aux_loss_coef": 0.0}}),
    # The GPT-2 speedrun's levers that keep the model exportable (issue 24): ReLU-squared gates, PaLM's z-loss at its
    # coefficient, a zero-initialised untied head.
    "screen-mla-moe-relu2": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "hidden_act": "relu2"}}),
    "screen-mla-moe-z-loss": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "z_loss_coef": 1e-4}}),
    "screen-mla-moe-zero-head": ("cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "zero_init_lm_head": True}}),
    # The speedrun's logit soft-cap (its values over time: 30, then 15). It changes the function DeepseekV3 computes,
    # so a winner could ship only as a separate preset without the transformers and GGUF exports.
    "screen-mla-moe-softcap-15": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "final_logit_softcapping": 15.0}}),
    "screen-mla-moe-softcap-30": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny", "final_logit_softcapping": 30.0}}),
    "screen-mla-moe-decay-0.5": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "schedule": {"decay_fraction": 0.5}}),
    "screen-mla-moe-floor-0": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "schedule": {"min_lr_ratio": 0.0}}),
    # More text (issue 24): the other textbook corpora mixed in (with screen-mla-moe-wiki-mix, 1:1), screened at a
    # token count that repeats the primary (its training split is 3.7M tokens of the 8k BPE). gpt35_wiki alone has
    # 3.2 times the primary's text, so wiki-3 reads the two about as they are.
    "screen-mla-moe-mix-wiki-3": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "data": {"mixture": {str(WIKI): 3.0}}}),
    "screen-mla-moe-mix-wiki-synth": (
        "cpu-15min", {"model": {"preset": "deepseek-v3-tiny"}, "data": {"mixture": {str(WIKI): 1.0, str(SYNTH): 0.5}}}),
    # The recipe before Muon shipped in cpu-15min (AdamW for every parameter), for the side-by-side that confirmed it.
    "cpu-15min-adamw": ("cpu-15min", {"optim": ADAMW}),
    # Earlier presets and architectures at cpu-quick's recipe.
    "cpu-quick": ("cpu-quick", {}),
    "seed-recipe": ("seed", {}),
    "seed-no-bias": ("cpu-quick", {"model": {"preset": "seed", "attention_dropout": 0.0, "bias_update_speed": 0.0}}),
    "llama-tiny": ("cpu-quick", {"model": {"preset": "llama-tiny"}}),
    "deepseek-v3-tiny": ("cpu-quick", {"model": {"preset": "deepseek-v3-tiny"}}),
}


class ReferenceRun:
    """The reference recipe, written as a user would write it with transformers and torch alone."""

    MICRO_BATCH, SEQ_LEN, LR, WARMUP = 16, 256, 3e-3, 100

    def __init__(self, data_dir: Path, tokenizer_spec: str, seed: int = 0, optimizer: dict | None = None,
                 schedule: dict | None = None, mixture: dict[str, float] | None = None):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        tokenizer = load_tokenizer(tokenizer_spec)
        config = LlamaConfig(
            vocab_size=32256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=256, tie_word_embeddings=False, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        config._attn_implementation = "sdpa"
        self.model = LlamaForCausalLM(config)
        self.tokenizer = tokenizer
        if optimizer is None:
            matrices = [p for p in self.model.parameters() if p.ndim >= 2]
            others = [p for p in self.model.parameters() if p.ndim < 2]
            self.optimizer = torch.optim.AdamW(
                [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                lr=self.LR, betas=(0.9, 0.95), fused=True,
            )
        else:  # a variant: tinyseek's builder, at the reference's rate, betas and decay
            settings = OptimConfig(lr=self.LR, weight_decay=0.1, betas=[0.9, 0.95], **optimizer)
            self.optimizer = build_optimizer(self.model, settings, torch.device("cpu"))
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        mixture = mixture or {}
        extra_dirs = prepare_extra_sources(
            data_dir, list(mixture), tokenizer_spec, cache_dir(), split_by=SPLIT["split_by"],
            val_fraction=SPLIT["val_fraction"],
        )
        self.data_dir = data_dir
        self.train_sources = [TokenDataset(folder, "train").tokens for folder in [data_dir, *extra_dirs]]
        self.source_weights = torch.tensor([1.0, *mixture.values()])
        self.generator = torch.Generator().manual_seed(seed)
        self.schedule = ScheduleConfig(**{"kind": "cosine", "warmup_steps": self.WARMUP, "min_lr_ratio": 0.1,
                                          **(schedule or {})})

    def step(self, step: int, horizon: Horizon) -> float:
        multiplier = lr_multiplier(step, self.schedule, *horizon)
        for group, peak_lr in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak_lr * multiplier
        sources = torch.multinomial(self.source_weights, self.MICRO_BATCH, replacement=True, generator=self.generator)
        windows = []
        for source in sources.tolist():
            tokens = self.train_sources[source]
            offset = torch.randint(0, len(tokens) - self.SEQ_LEN - 1, (), generator=self.generator).item()
            windows.append(tokens[offset : offset + self.SEQ_LEN + 1])
        batch = torch.from_numpy(np.stack(windows).astype(np.int64))
        logits = self.model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, time_budget: str | None, tokens: int | None) -> dict:
        """Train for the time budget, kept as tinyseek's trainer keeps it (the same calibration and pace), or for
        `tokens` (then with a warmup of at most a tenth of the steps, as the tinyseek runs get)."""
        tokens_per_step = self.MICRO_BATCH * self.SEQ_LEN
        budget = TimeBudget(time_budget)
        horizon = Horizon(budget.initial_max_steps(max(1, (tokens or 0) // tokens_per_step)))
        if tokens:
            self.schedule.warmup_steps = min(self.schedule.warmup_steps, max(1, horizon.max_steps // 10))
        budget.start()
        self.model.train()
        curve, step, start = [], 0, time.perf_counter()
        while step < horizon.max_steps:
            step_start = time.perf_counter()
            loss = self.step(step, horizon)
            step += 1
            elapsed = time.perf_counter() - start
            moved = budget.observe(step, time.perf_counter() - step_start, elapsed, horizon.max_steps)
            if moved is not None:
                horizon = budget.horizon = moved_horizon(self.schedule, horizon, step, moved)
            if step % 10 == 0 or step == horizon.max_steps:
                curve.append((elapsed, loss))
        return {"steps": step, "tokens": step * tokens_per_step, "train_s": time.perf_counter() - start,
                "curve": curve, "maxvio": None}


def parse_mixture(text: str) -> dict[str, float]:
    """`gpt35_wiki=1,gpt35_synth=0.5` -> {path of the corpus: weight}."""
    sources = {source_label(path): path for path in OTHER_SOURCES}
    mixture = {}
    for item in filter(None, text.split(",")):
        source, _, weight = item.partition("=")
        if source not in sources:
            raise argparse.ArgumentTypeError(f"unknown source {source!r}; choose from {', '.join(sources)}")
        mixture[str(sources[source])] = float(weight or 1)
    return mixture


def cache_dir() -> Path:
    return Path(DataConfig().cache_dir).expanduser()


def primary_data_dir(args) -> Path:
    return resolve_data(args.data, args.tokenizer, cache_dir(), **SPLIT)


def source_label(path: str | Path) -> str:
    return Path(path).name.split(".")[0].removeprefix("library_of_phi_")


def held_out_sets(args, primary_dir: Path, tokenizer: str) -> dict[str, TokenDataset]:
    """The held-out books of the primary and of each other source present that has some, tokenized with
    `tokenizer`."""
    others = [path for path in OTHER_SOURCES if path.exists()]
    folders = prepare_extra_sources(primary_dir, [str(path) for path in others], tokenizer, cache_dir(),
                                    split_by=SPLIT["split_by"], val_fraction=SPLIT["val_fraction"],
                                    max_documents=args.other_documents)
    sets = {source_label(path): TokenDataset(folder, "val")
            for path, folder in [(args.data, primary_dir), *zip(others, folders)]}
    return {source: held_out for source, held_out in sets.items() if len(held_out)}


def training_split_tokenizer(args, vocab_size: int) -> tuple[str, float]:
    """A BPE of `vocab_size` tokens trained on the training split of --data (the held-out books left out), cached in
    the work directory; with the seconds its training took (0 when cached)."""
    out = Path(args.work_dir) / "tokenizers" / f"bpe-{vocab_size}"
    if (out / "tokenizer.json").is_file():
        return str(out), 0.0
    held_out = set(TokenDataset(primary_data_dir(args), "val").meta["val"]["group_names"])
    split_file = Path(args.work_dir) / "training-split.jsonl"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    with open(split_file, "w", encoding="utf-8") as handle:
        for document in open_source(args.data, group_column=SPLIT["split_by"]).documents():
            if document.group not in held_out:
                handle.write(json.dumps({"text": document.text}, ensure_ascii=False) + "\n")
    start = time.perf_counter()
    train_bpe_tokenizer(str(split_file), vocab_size, out)
    return str(out), time.perf_counter() - start


def tinyseek_trainer(name: str, args, budget: str | None) -> tuple[Trainer, float]:
    """The run's Trainer, fresh, and the seconds spent training its tokenizer."""
    preset, overrides = RUNS[name]
    # The held-out split comes first: a run with a mixture is only valid with it.
    override_list = [(["data", key], value) for key, value in SPLIT.items()]
    override_list += [([section, key], value) for section, values in overrides.items() for key, value in values.items()]
    preset_tokenizer = load_config(preset, override_list, look_up_tokenizer=False).data.tokenizer  # trained below
    tokenizer, tokenizer_s = preset_tokenizer or args.tokenizer, 0.0
    if re.fullmatch(r"bpe-\d+", Path(tokenizer).name):
        tokenizer, tokenizer_s = training_split_tokenizer(args, int(Path(tokenizer).name.removeprefix("bpe-")))
    if args.mixture and "mixture" in overrides.get("data", {}):
        raise SystemExit(f"quality: run {name} has its own mixture; leave out --mixture")
    settings = {
        **({"data.mixture": args.mixture} if args.mixture else {}),
        "out_dir": str(Path(args.work_dir) / name),
        "seed": 0,
        "data.source": args.data,
        "data.tokenizer": tokenizer,
        "checkpoint.every": 10**9,
        "logging.eval_every": 10**9,
        "logging.eval_batches": 1,
        "logging.log_every": 10,
        "logging.progress_bar": False,
        "sample.prompts": [],
    }
    override_list += [(key.split("."), value) for key, value in settings.items()]
    config = load_config(preset, override_list)
    if budget:
        config.time_budget = budget
    else:  # a fixed token budget (screening): the steps it takes, with a warmup of at most a tenth of them
        config.time_budget = None
        data = config.data
        config.max_steps = max(1, args.tokens // (data.seq_len * data.micro_batch_size * data.grad_accum))
        config.schedule.warmup_steps = min(config.schedule.warmup_steps, max(1, config.max_steps // 10))
    shutil.rmtree(config.out_dir, ignore_errors=True)  # a benchmark run starts fresh, never resumes an old budget
    return Trainer(config), tokenizer_s


def run_tinyseek(name: str, args, budget: str | None) -> tuple[dict, Trainer]:
    trainer, tokenizer_s = tinyseek_trainer(name, args, budget)
    config = trainer.config
    if trainer.train() != 0:
        raise SystemExit(f"run {name} stopped before the end")
    records = [m for m in read_metrics(config.out_dir) if m["kind"] == "train"]
    result = {
        "steps": trainer.progress.step, "tokens": trainer.progress.tokens, "train_s": trainer.progress.train_seconds,
        "curve": [(m["train_seconds"], m["loss"]) for m in records],
        "maxvio": records[-1].get("maxvio") if records else None,
        "tokenizer_s": tokenizer_s,
    }
    return result, trainer


def reference_run(name: str, args) -> ReferenceRun:
    """A reference variant, on --mixture when one is given."""
    return ReferenceRun(primary_data_dir(args), args.tokenizer,
                        **{**REFERENCE_VARIANTS[name], **({"mixture": args.mixture} if args.mixture else {})})


def measure(name: str, args, budget: str | None) -> dict:
    """Train run `name` for the wall-clock `budget` (None: for --tokens), then score it."""
    if name in REFERENCE_VARIANTS:
        reference = reference_run(name, args)
        result = reference.run(budget, args.tokens)
        model, tokenizer = reference.model, reference.tokenizer
        data_dir, tokenizer_spec = reference.data_dir, args.tokenizer
    else:
        result, trainer = run_tinyseek(name, args, budget)
        model, tokenizer = trainer.model, trainer.data.tokenizer
        data_dir, tokenizer_spec = trainer.data.data_dir, trainer.data.tokenizer_spec
    scores = {source: score_split(model, held_out, EVAL_SEQ_LEN)
              for source, held_out in held_out_sets(args, data_dir, tokenizer_spec).items()}
    score = scores[source_label(args.data)]
    texts = continuations(model, tokenizer, PROMPTS)
    meta = TokenDataset(data_dir, "val").meta
    return {
        "name": name,
        **result,
        "tokens_per_s": result["tokens"] / result["train_s"],
        "budget_s": parse_duration(budget) if budget else None,
        "bits_per_byte": score.bits_per_byte,
        "nats_per_token": score.nats_per_token,
        "held_out_bits_per_byte": {source: other.bits_per_byte for source, other in scores.items()},
        "train_tokens_per_byte": meta["train"]["tokens"] / meta["train"]["bytes"],
        "tokenizer": f"{Path(meta['tokenizer']['spec']).name} ({meta['tokenizer']['vocabulary_size']:,})",
        "greedy_distinct_4grams": float(np.mean([t["distinct_4grams"] for t in texts["greedy"]])),
        "sampled_distinct_4grams": float(np.mean([t["distinct_4grams"] for t in texts["sampled"]])),
        "continuations": texts,
    }


def side_by_side_throughput(names: list[str], args, rounds: int, steps: int = 2) -> str:
    """Training tokens/s and text bytes/s of each run, measured in one process in interleaved rounds (a few steps of
    each in turn), so every run sees the same share of a busy machine; as a markdown table."""
    steppers, tokens_per_step, tokens_per_byte = {}, {}, {}
    for name in names:
        if name in REFERENCE_VARIANTS:
            reference = reference_run(name, args)
            reference.model.train()
            steppers[name] = lambda step, reference=reference: reference.step(step, Horizon(10**9))
            tokens_per_step[name] = reference.MICRO_BATCH * reference.SEQ_LEN
            meta = TokenDataset(primary_data_dir(args), "train").meta
        else:
            trainer, _ = tinyseek_trainer(name, args, None)
            steppers[name] = lambda step, trainer=trainer: trainer.train_step()
            tokens_per_step[name] = trainer.tokens_per_step
            meta = trainer.data.train_set.meta
        tokens_per_byte[name] = meta["train"]["tokens"] / meta["train"]["bytes"]
        for step in range(THROUGHPUT_WARMUP_STEPS):
            steppers[name](step)
    seconds = dict.fromkeys(names, 0.0)
    for round_number in range(rounds):
        for name in names:
            start = time.perf_counter()
            for step in range(steps):
                steppers[name](THROUGHPUT_WARMUP_STEPS + round_number * steps + step)
            seconds[name] += time.perf_counter() - start
    lines = ["| run | tokens/s | text bytes/s | ratio to the first |", "|---|---:|---:|---:|"]
    first = None
    for name in names:
        tokens_per_s = rounds * steps * tokens_per_step[name] / seconds[name]
        bytes_per_s = tokens_per_s / tokens_per_byte[name]
        first = first or bytes_per_s
        lines.append(f"| {name} | {tokens_per_s:,.0f} | {bytes_per_s:,.0f} | {bytes_per_s / first:.2f} |")
    return "\n".join(lines)


def training_time(run: dict) -> str:
    """Minutes, and the share of the budget used (none with --tokens or --quick: no budget)."""
    used = f" ({100 * run['train_s'] / run['budget_s']:.0f}%)" if run["budget_s"] else ""
    return f"{run['train_s'] / 60:.1f} min{used}"


def table(results: list[dict]) -> str:
    primary, *others = results[0]["held_out_bits_per_byte"]
    lines = [
        f"| run | tokenizer | tokens | tokens/s | text bytes/s | training time | val bits/byte ({primary}) "
        "| val nats/token | " + "".join(f"{source} held-out bits/byte | " for source in others)
        + "MaxVio | distinct 4-grams greedy | distinct 4-grams sampled |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(others) + "---:|---:|---:|",
    ]
    for r in results:
        maxvio = "-" if r["maxvio"] is None else f"{r['maxvio']:.2f}"
        lines.append(
            f"| {r['name']} | {r['tokenizer']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} "
            f"| {r['tokens_per_s'] / r['train_tokens_per_byte']:,.0f} | {training_time(r)} "
            f"| {r['bits_per_byte']:.4f} | {r['nats_per_token']:.3f} | "
            + "".join(f"{r['held_out_bits_per_byte'][source]:.4f} | " for source in others)
            + f"{maxvio} | {r['greedy_distinct_4grams']:.2f} "
            f"| {r['sampled_distinct_4grams']:.2f} |"
        )
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    """Every run against every reference variant listed before it in the invocation: on the primary's held-out books,
    then on each other source's, so a gain on one cannot hide a loss on another."""
    def lower(run: dict, ref: dict, source: str) -> str:
        ratio = run["held_out_bits_per_byte"][source] / ref["held_out_bits_per_byte"][source]
        return f"{ratio:.3f}x {ref['name']}'s ({100 * (1 - ratio):+.1f}% lower)"

    lines = []
    for number, ref in enumerate(results):
        if ref["name"] in REFERENCE_VARIANTS:
            for run in results[number + 1:]:
                primary, *others = run["held_out_bits_per_byte"]
                lines.append(f"- {run['name']}: bits per byte {lower(run, ref, primary)}, tokens/s "
                             f"{run['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
                             + "".join(f"; on {source}'s held-out books {lower(run, ref, source)}"
                                       for source in others))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for r in results:
        if r["curve"]:
            seconds, losses = zip(*r["curve"])
            bits = [loss / math.log(2) * r["train_tokens_per_byte"] for loss in losses]
            line, = axis.plot([s / 60 for s in seconds], bits, label=f"{r['name']} ({r['tokenizer']})", alpha=0.8)
            axis.plot([seconds[-1] / 60], [r["bits_per_byte"]], marker="*", markersize=12, color=line.get_color())
    axis.set_xlabel("training time (minutes)")
    axis.set_ylabel("bits per byte")
    axis.set_title("Training loss in bits per byte (lines) and final validation bits per byte (stars)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def method(command: str, measured_at: str, threads: int, budget: str, mixture: dict[str, float]) -> str:
    """Where, how and with what a report's runs were measured and scored."""
    mixed = "".join(f", mixed with `{Path(path).name}` at weight {weight:g} to its 1"
                    for path, weight in mixture.items())
    return f"""Measured {datetime.date.today()} at commit `{measured_at}` on {machine()}, {threads} threads
(`torch.set_num_threads`).

```bash
{command}
```

Each run trains for {budget} on `library_of_phi_gpt4.jsonl`{mixed} (whole books held out by title: the same held-out
documents for every run and tokenizer; a run named `*-mix*` also on the other textbook corpora) and is evaluated on
all held-out documents: bits per byte (summed cross-entropy of every document token, separators excluded, over the
documents' UTF-8 bytes; comparable across tokenizers), on gpt4's held-out books and on those of each other corpus
(split alike, whatever the run trained on), nats per token (not comparable across tokenizers) with
{EVAL_SEQ_LEN}-token windows, and the share of distinct 4-grams in 200-token greedy and sampled (temperature 0.8,
top-p 0.95) continuations of 5 fixed prompts, no repetition penalty. Training time is the training loop's wall clock;
in parentheses the share of the budget used."""


def save_budgets(results: list[dict], out: Path, measured_at: str, command: str, threads: int,
                 mixture: dict[str, float]) -> None:
    """Each budget's runs as quality_<budget>.json, what --family reads back."""
    for budget in dict.fromkeys(run["budget"] for run in results if run["budget"]):
        runs = [{key: value for key, value in run.items() if key not in ("curve", "continuations")}
                for run in results if run["budget"] == budget]
        (out / f"quality_{budget}.json").write_text(json.dumps(
            {"budget": budget, "measured_at": measured_at, "date": datetime.date.today().isoformat(),
             "machine": machine(), "threads": threads, "command": command, "mixture": mixture, "runs": runs},
            indent=1))


def budget_block(budget: str) -> str:
    return f"quality-{int(parse_duration(budget)) // 60}min"


def budget_family(source: Path, reference: str) -> tuple[list[dict], list[str]]:
    """The reference and the preset at each budget measured in `source`, alternating (as budget_ratios and
    plot_budgets read them), each with the commit it was measured at; and a line for each budget not measured there."""
    pairs, missing = [], []
    for budget, preset in BUDGET_PRESETS.items():
        path = source / f"quality_{budget}.json"
        measured = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        runs = {run["name"]: {**run, "measured_at": measured["measured_at"]} for run in measured["runs"]}
        if reference in runs and preset in runs:
            pairs += [runs[reference], runs[preset]]
        else:
            missing.append(f"- at {budget}: not measured yet (no {reference} and {preset} in `{path.name}`): "
                           f"`python benchmarks/report.py {budget_block(budget)}`")
    return pairs, missing


def family_table(results: list[dict]) -> str:
    sources = list(results[0]["held_out_bits_per_byte"])
    lines = ["| budget | run | commit | tokens | tokens/s | training time | "
             + "".join(f"{source} held-out bits/byte | " for source in sources) + "distinct 4-grams greedy |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(sources) + "---:|"]
    for r in results:
        lines.append(f"| {r['budget']} | {r['name']} | `{r['measured_at']}` | {r['tokens']:,} | "
                     f"{r['tokens_per_s']:,.0f} | {training_time(r)} | "
                     + "".join(f"{r['held_out_bits_per_byte'][source]:.4f} | " for source in sources)
                     + f"{r['greedy_distinct_4grams']:.2f} |")
    return "\n".join(lines)


def write_family(source: Path, out: Path, reference: str) -> None:
    """quality_budgets.md and quality_budgets.png: every budget measured in `source`, preset against reference."""
    results, missing = budget_family(source, reference)
    if not results:
        raise SystemExit(f"quality: no budget measured in {source} (quality_<budget>.json with {reference} and the "
                         "budget's preset): run one first")
    out.mkdir(parents=True, exist_ok=True)
    plot_budgets(results, out / "quality_budgets.png")
    (out / "quality_budgets.md").write_text(f"""# Quality against the budget

Each budget's preset and the reference `{reference}`, trained for that budget one after the other in one invocation,
at the commit in the table (the block `quality-<minutes>min` of each budget names the machine, threads, load and
command), scored on every source's held-out books:

{family_table(results)}

{chr(10).join([budget_ratios(results), *missing])}

![held-out bits per byte against the training budget](quality_budgets.png)
""")


def budget_ratios(results: list[dict]) -> str:
    """At each budget, its preset against the reference."""
    return "\n".join(f"- at {pair[0]['budget']}: " + ratios(pair).removeprefix("- ")
                     for pair in zip(results[::2], results[1::2]))


def plot_budgets(results: list[dict], path: Path) -> None:
    """Bits per byte against the budget's minutes: the reference and the presets, on each source's held-out books."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for runs, color in ((results[::2], "tab:gray"), (results[1::2], "tab:blue")):  # the reference, the presets
        minutes = [parse_duration(run["budget"]) / 60 for run in runs]
        for source, style in zip(runs[0]["held_out_bits_per_byte"], ("-", "--", ":")):
            axis.plot(minutes, [run["held_out_bits_per_byte"][source] for run in runs], style, marker="o",
                      color=color, label=f"{', '.join(dict.fromkeys(run['name'] for run in runs))}, {source}")
    axis.set_xscale("log")
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # the budgets are the only ticks
    axis.set_xticks([parse_duration(run["budget"]) / 60 for run in results[::2]],
                    [run["budget"] for run in results[::2]])
    axis.set_xlabel("training budget (wall clock, log scale)")
    axis.set_ylabel("held-out bits per byte")
    axis.set_title("Bits per byte against the training budget")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_budget_report(results: list[dict], command: str, out: Path, measured_at: str, threads: int,
                        mixture: dict[str, float], reference: str) -> None:
    """quality_<budget>.md and .json for each budget, then the family drawn from what is in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_budgets(results, out, measured_at, command, threads, mixture)
    for pair in zip(results[::2], results[1::2]):
        budget = pair[0]["budget"]
        runs = f"{budget}: `{BUDGET_PRESETS[budget]}` and the reference `{reference}`"
        (out / f"quality_{budget}.md").write_text(f"""# Quality at {budget}

{method(command, measured_at, threads, runs, mixture)}

{table(list(pair))}

{ratios(list(pair))}
""")
    write_family(out, out, reference)


def write_report(results: list[dict], command: str, out: Path, measured_at: str, threads: int,
                 mixture: dict[str, float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "quality.png")
    save_budgets(results, out, measured_at, command, threads, mixture)
    (out / "quality_samples.json").write_text(json.dumps(
        [{"run": r["name"], **r["continuations"]} for r in results], indent=1, ensure_ascii=False))
    samples = []
    for number in range(3):
        samples.append(f"**{PROMPTS[number]}**\n")
        for r in results:
            greedy = r["continuations"]["greedy"][number]["text"][:400]
            sampled = r["continuations"]["sampled"][number]["text"][:400]
            samples.append(f"- {r['name']}, greedy: {greedy!r}\n- {r['name']}, sampled: {sampled!r}")
        samples.append("")
    timed = results and results[0]["budget_s"]
    budget = "the same wall-clock budget (`--time-budget`)" if timed else "the same number of tokens"
    report = f"""# Quality for the same budget

{method(command, measured_at, threads, budget, mixture)}

{table(results)}

{ratios(results)}

![training loss in bits per byte against training time](quality.png)

Continuations of the first three prompts (all in `quality_samples.json`):

""" + "\n".join(samples)
    # The screening section (written from --tokens runs, see its commands) survives a rerun of the headline.
    previous = (out / "quality.md").read_text() if (out / "quality.md").is_file() else ""
    kept = previous[previous.index(SCREENING_HEADING):] if SCREENING_HEADING in previous else ""
    (out / "quality.md").write_text(report.rstrip("\n") + "\n\n" + kept if kept else report)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=f"{REFERENCE},cpu-15min",
                        help=f"comma-separated, from: {', '.join([*REFERENCE_VARIANTS, *RUNS])} "
                             f"(default: {REFERENCE},cpu-15min)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--time-budget", default=None, help="wall-clock training budget per run, e.g. 15m (default)")
    budget.add_argument("--tokens", type=int, help="a fixed number of training tokens per run instead")
    budget.add_argument("--budgets", help=f"comma-separated budgets from {', '.join(BUDGET_PRESETS)}: at each, its "
                                          "preset and the reference (--runs is not used)")
    budget.add_argument("--family", metavar="DIR", help="train nothing: draw the budget family from the "
                                                        "quality_<budget>.json files in DIR (e.g. docs)")
    parser.add_argument("--mixture", type=parse_mixture, default={},
                        help="every run (the reference too) also trains on other corpora: comma-separated "
                             f"SOURCE=WEIGHT from {', '.join(map(source_label, OTHER_SOURCES))}, relative to "
                             "--data's 1")
    parser.add_argument("--reference", default=REFERENCE, choices=list(REFERENCE_VARIANTS),
                        help=f"the reference variant --budgets compares with (default {REFERENCE})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--throughput", type=int, metavar="ROUNDS",
                        help="only measure training speed side by side: ROUNDS interleaved rounds of 2 steps per run")
    parser.add_argument("--data", default=str(SHARED / "corpus" / "library_of_phi_gpt4.jsonl"))
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "deepseek-coder"))
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "quality"), help="where the runs are written")
    parser.add_argument("--out", default=str(REPO / "docs"), help="where the report goes")
    parser.add_argument("--quick", action="store_true",
                        help="4,096 training tokens a run, held-out books of the other sources' first 2,000 chapters "
                             "(to check the script runs)")
    args = parser.parse_args()
    budgets = [budget.strip() for budget in (args.budgets or "").split(",") if budget.strip()]
    if any(budget not in BUDGET_PRESETS for budget in budgets):
        parser.error(f"--budgets: choose from {', '.join(BUDGET_PRESETS)}")
    if args.quick:
        args.tokens, args.time_budget, args.throughput = 4096, None, args.throughput and 1
    args.other_documents = 2000 if args.quick else None
    if args.tokens is None and args.time_budget is None and not budgets:
        args.time_budget = "15m"
    names = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in names if name not in REFERENCE_VARIANTS and name not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join([*REFERENCE_VARIANTS, *RUNS])}")
    if args.family:
        write_family(Path(args.family), Path(args.out), args.reference)
        return 0
    if not Path(args.data).exists():
        sys.exit(f"quality: corpus {args.data} not found; pass --data or set TINYSEEK_SHARED_DATA")
    torch.set_num_threads(args.threads)
    if args.throughput:
        args.tokens = args.tokens or 10**9  # the schedule of a long run: the measured steps are its first
        print(f"threads: {args.threads}\n" + side_by_side_throughput(names, args, args.throughput))
        return 0
    measured_at = commit()  # the code the runs use is the code at the start
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    # (run, budget) in order: with --budgets, each budget's reference and preset; a run trains for its budget unless
    # --tokens (or --quick) fixes its tokens instead.
    plan = ([(name, budget) for budget in budgets for name in (args.reference, BUDGET_PRESETS[budget])] if budgets
            else [(name, args.time_budget) for name in names])
    results = []
    for name, budget in plan:
        print(f"== {name} for {budget or f'{args.tokens:,} tokens'} ({args.threads} threads)", flush=True)
        results.append({**measure(name, args, None if args.tokens else budget), "budget": budget})
        print(table(results), flush=True)
    if budgets:
        write_budget_report(results, command, Path(args.out), measured_at, args.threads, args.mixture,
                            args.reference)
    else:
        write_report(results, command, Path(args.out), measured_at, args.threads, args.mixture)
    print(f"threads: {args.threads}\n{table(results)}\n{budget_ratios(results) if budgets else ratios(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
