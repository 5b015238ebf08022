"""The training loop: setup that fails before touching the run directory, then steps, logs, evals, samples and
checkpoints until max_steps or a signal."""

from __future__ import annotations

import base64
import json
import math
import random
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tinyseek import TinySeekConfig, TinySeekForCausalLM, estimate_flops_per_token, format_parameter_report, parameter_report
from tinyseek.data import (
    TokenDataset,
    WindowSampler,
    check_tokenizer_fits,
    iter_eval_batches,
    load_tokenizer,
    resolve_data,
    tokenizer_identity,
)
from tinyseek.data.builtin import resolve_sources
from tinyseek.data.tokenizer import encode_prompt
from tinyseek import distributed, faults, ops
from tinyseek.data.mixture import MixtureSampler, prepare_extra_sources
from tinyseek.device import choose_device
from tinyseek.errors import ConfigError, FileError
from tinyseek.generate.engine import GenerationEngine
from tinyseek.report import check_model_fits
from tinyseek.train import checkpoint as ckpt
from tinyseek.train import optim
from tinyseek.train.compile import compile_decoder_layers
from tinyseek.train.config import TrainConfig
from tinyseek.train.metrics import (
    MetricsWriter,
    format_train_line,
    log,
    measured_peak_flops,
    memory_in_use_gb,
    remove_handlers,
    setup_logging,
    synchronize,
)
from tinyseek.train.budget import CALIBRATION_HORIZON, BudgetCalibration, parse_duration
from tinyseek.train.schedule import build_scheduler, set_horizon

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RESOLVED_CONFIG = "config.yaml"


def pinned_sources(run_dir: Path) -> dict[str, str | None]:
    """The data and tokenizer a run directory's config.yaml recorded on its first start (none for a new run)."""
    try:
        data = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text()).get("data") or {}
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    return {"data": data.get("source"), "tokenizer": data.get("tokenizer")}
# Exit statuses besides 0 (finished), 2 (bad input, from the CLI) and 128 + signal (stopped by SIGINT/SIGTERM).
EXIT_NON_FINITE = 3  # optim.max_non_finite_steps steps in a row had a non-finite loss or gradient
EXIT_CHECKPOINT_WRITE_FAILED = 4  # a checkpoint could not be written (disk full, I/O error)


def choose_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cpu":
        return "bf16"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator's state as JSON (large integer arrays as base64 of their uint32 words)."""
    version, mt_words, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, encode_words(np.array(mt_words, dtype=np.uint32)), gauss],
        "numpy": [np_name, encode_words(np_keys), np_pos, np_has_gauss, np_gauss],
        "torch": encode_words(torch.get_rng_state().numpy()),
    }
    if device.type == "cuda":
        state["cuda"] = [encode_words(s.numpy()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, mt_words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in decode_words(mt_words, np.uint32)), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, decode_words(np_keys, np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(torch.from_numpy(decode_words(state["torch"], np.uint8)))
    if device.type == "cuda" and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.from_numpy(decode_words(s, np.uint8)) for s in state["cuda"]])


def encode_words(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def decode_words(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def preparation_lock(cache_dir: Path):
    """Held while preparing data into `cache_dir`: one process tokenizes, the others (other ranks, other runs) wait."""
    from filelock import FileLock  # huggingface_hub's own dependency; a cross-platform lock file

    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / ".prepare.lock")):
        yield


@contextmanager
def stop_on_signals(trainer: "Trainer"):
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current optimizer step. The first signal puts
    the default handlers back, so a second one ends the process at once (the last checkpoint is still intact)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def request_stop(signum, frame):
        trainer.stop_signal = signal.Signals(signum)
        for sig in signals:
            signal.signal(sig, previous[sig])

    for sig in signals:
        signal.signal(sig, request_stop)
    try:
        yield
    finally:
        for sig in signals:
            signal.signal(sig, previous[sig])


class Trainer:
    """One training run. `Trainer(config)` does all the checking and loading (data, tokenizer, model, the resume
    checkpoint) and raises tinyseek.errors exceptions before anything is written; `train()` runs the loop."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.run_dir = Path(config.out_dir).expanduser()
        ckpt.check_writable(self.run_dir)
        self.stop_signal: signal.Signals | None = None
        # Each step reads what the ones before it set up, in this order.
        self.prepare_data()
        self.join_process_group()
        self.load_data()
        self.build_model()
        self.forward_model = self.wrap_model()
        self.build_optimizer()
        self.step, self.tokens = 0, 0
        self.non_finite_steps, self.non_finite_in_a_row = 0, 0
        self.skipped_checkpoints: list[str] = []
        self.changed_on_resume: list[str] = []
        self.resumed_from = self.resume()

    def prepare_data(self) -> None:
        """Tokenizer, model config and the prepared corpus, before any process group exists: every rank asks for
        the corpus under one file lock, so the first prepares it while the others wait (however long a large corpus
        takes, no collective is waiting with a timeout), then find it ready."""
        config, data = self.config, self.config.data
        # The resolved pair goes into the config, so the run directory's config.yaml pins it for every resume.
        sources = resolve_sources(data.source, data.tokenizer, pinned_sources(self.run_dir))
        data.source, data.tokenizer = sources.data, sources.tokenizer
        self.sources_note = sources.note
        if distributed.process_rank() == 0 and sources.note:
            print(f"tinyseek train: {sources.note}", file=sys.stderr, flush=True)
        self.tokenizer_spec = data.tokenizer
        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        self.tokenizer_id = tokenizer_identity(self.tokenizer)
        self.model_config = config.build_model_config(
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        check_tokenizer_fits(self.tokenizer, self.model_config.vocab_size)
        # Before a corpus is tokenized for a model that cannot be trained here anyway.
        check_model_fits(self.model_config, choose_device(config.device))
        cache_dir = Path(data.cache_dir).expanduser()
        with preparation_lock(cache_dir):
            self.data_dir = resolve_data(
                data.source,
                self.tokenizer_spec,
                cache_dir,
                text_column=data.text_column,
                split_by=data.split_by,
                split_by_fallback="data.split_by" in config.preset_keys,
                val_fraction=data.val_fraction,
                val_documents=data.val_documents,
                vocab_size=self.model_config.vocab_size,
            )
            self.extra_data_dirs = prepare_extra_sources(
                self.data_dir, list(data.mixture), self.tokenizer_spec, cache_dir,
                split_by=data.split_by, text_column=data.text_column, vocab_size=self.model_config.vocab_size,
            ) if data.mixture else []

    def join_process_group(self) -> None:
        """The device, and the process group under torchrun (a world of one otherwise)."""
        device = choose_device(self.config.device)
        self.world = distributed.init_distributed(device)
        self.is_main = self.world.is_main
        self.device = distributed.local_device(device, self.world)
        self.precision = choose_precision(self.config.dtype, self.device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        if self.device.type == "cpu":
            ops.keep_freed_memory()

    def load_data(self) -> None:
        """The memory-mapped splits and this rank's share of each batch."""
        config, data = self.config, self.config.data
        self.train_set = TokenDataset(self.data_dir, "train")
        self.val_set = TokenDataset(self.data_dir, "val")
        if data.mixture:
            self.sampler = MixtureSampler(
                [self.train_set, *(TokenDataset(folder, "train") for folder in self.extra_data_dirs)],
                [data.weight, *data.mixture.values()], data.seq_len, data.micro_batch_size, config.seed,
                self.world.rank, self.world.size,
            )
        else:
            self.sampler = WindowSampler(
                self.train_set, data.seq_len, data.micro_batch_size, config.seed, self.world.rank, self.world.size
            )
        self.tokens_per_step = data.seq_len * data.micro_batch_size * data.grad_accum * self.world.size

    def build_model(self) -> None:
        config = self.config
        seed_everything(config.seed)
        self.model = TinySeekForCausalLM(self.model_config).to(self.device)
        if not self.world.is_distributed:  # DDP and FSDP reduce dense gradient buckets
            for module in self.model.modules():
                if isinstance(module, ops.Embedding):
                    module.accumulate_sparse_gradients = True
        if config.gradient_checkpointing != "none":
            self.model.activation_checkpointing_enable(selective=config.gradient_checkpointing == "selective")
        self.compile_path = compile_decoder_layers(self.model, self.device) if config.compile else "off"

    def build_optimizer(self) -> None:
        """Optimizer, schedule and loss scaler. After `wrap_model`: FSDP2 replaces parameters with sharded ones."""
        config = self.config
        # With a time budget, max_steps is unknown until the first steps are timed (or a checkpoint says it).
        self.budget_s = parse_duration(config.time_budget) if config.time_budget is not None else None
        if self.budget_s is not None:
            config.max_steps = CALIBRATION_HORIZON
        self.budget_fixed = False
        self.train_seconds = 0.0
        self.optimizer = optim.build_optimizer(self.model, config.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, config.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def wrap_model(self) -> torch.nn.Module:
        """The module the loop calls: the model made data-parallel under torchrun, else the model itself."""
        return distributed.parallelize(self.model, self.config.parallel, self.world, self.device)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Load the latest usable checkpoint of the run directory, if any; refuse one that does not fit. A checkpoint
        whose files do not match their manifest, or whose optimizer state is more than tensors, is skipped."""
        for checkpoint in ckpt.valid_checkpoints(self.run_dir, report=self.note_skipped):
            try:
                blobs = ckpt.load_optimizer_state(checkpoint)
                break
            except FileError as error:
                self.note_skipped(checkpoint, str(error))
        else:
            checkpoint = None
        for skipped in self.skipped_checkpoints:
            log.warning("skipping unusable checkpoint %s", skipped)
        if checkpoint is None:
            return None
        state = ckpt.read_trainer_state(checkpoint)
        saved_architecture = json.loads((checkpoint / "config.json").read_text())
        differences = ckpt.config_differences(saved_architecture, self.model_config, ckpt.ARCHITECTURE_FIELDS)
        if differences:
            raise ConfigError(
                f"checkpoint {checkpoint} is a different architecture from this run's model ("
                + "; ".join(differences)
                + "); use another --out-dir or the checkpoint's configuration"
            )
        # Announced with the rest of the run's setup, once the run's log exists.
        self.changed_on_resume = ckpt.config_differences(
            saved_architecture, self.model_config, TinySeekConfig.TRAINING_KNOBS
        )
        if state["tokenizer"] != self.tokenizer_id:
            raise ConfigError(
                f"checkpoint {checkpoint} was trained with tokenizer {state['tokenizer']}, this run uses "
                f"{self.tokenizer_id}; use another --out-dir or the same tokenizer"
            )
        ckpt.load_training_state(self.model, self.optimizer, checkpoint, blobs["optimizer"])
        self.scheduler.load_state_dict(blobs["scheduler"])
        if self.scaler is not None and blobs.get("scaler"):
            self.scaler.load_state_dict(blobs["scaler"])
        budget = state.get("budget")
        if budget is not None and budget["time_budget"] == self.config.time_budget:
            self.fix_max_steps(budget["max_steps"])
        self.apply_current_hyperparameters()
        self.step, self.tokens = state["step"], state["tokens"]
        self.non_finite_steps, self.non_finite_in_a_row = state.get("non_finite_steps", [0, 0])
        self.train_seconds = state.get("train_seconds", 0.0)
        self.continue_data_order(state)
        self.saved_rng = state["rng"]
        return checkpoint

    def note_skipped(self, checkpoint: Path, problem: str) -> None:
        self.skipped_checkpoints.append(f"{checkpoint.name}: {problem}")

    def continue_data_order(self, state: dict[str, Any]) -> None:
        """Pick the data order up at the first window the checkpoint had not read, also when the global batch
        changed (another world size, micro-batch or accumulation)."""
        saved = state["sampler"]
        saved_accum = state["config"]["data"]["grad_accum"]
        consumed = saved.get("first_window", 0) + self.step * saved_accum * saved["global_batch_size"]
        accum = self.config.data.grad_accum
        self.sampler.continue_after(saved, consumed, self.step * accum)
        if (saved["global_batch_size"], saved_accum) != (self.sampler.global_batch_size, accum):
            log.warning(
                "the global batch changed from %d x %d to %d x %d windows (%d -> %d processes): the data order "
                "continues at window %s of its stream, so no window repeats or is skipped, but batches differ from "
                "an uninterrupted run's", saved["global_batch_size"], saved_accum, self.sampler.global_batch_size,
                accum, saved.get("world_size", 1), self.world.size, f"{consumed:,}",
            )

    def apply_current_hyperparameters(self) -> None:
        """The loaded optimizer carries the old run's settings; the current config wins."""
        current = optim.build_optimizer(self.model, self.config.optim, self.device)
        optim.apply_current_hyperparameters(self.optimizer, current, self.scheduler)

    def fix_max_steps(self, max_steps: int) -> None:
        """The time budget's step count, from now on the run's max_steps (config.yaml and checkpoints keep it)."""
        self.config.max_steps = max_steps
        set_horizon(self.scheduler, self.config.schedule, max_steps)
        self.budget_fixed = True

    def calibrate(self, calibration: BudgetCalibration, step_seconds: float, progress) -> None:
        fixed = calibration.observe(self.step, step_seconds, self.train_seconds)
        if self.world.is_distributed:  # every rank must stop at the same step: adopt the first decision anywhere
            fixed = distributed.max_across_ranks(fixed or 0, self.world, self.device) or None
        if fixed is None:
            return
        self.fix_max_steps(fixed)
        progress.total = fixed
        progress.refresh()
        if self.is_main:
            self.write_resolved_config()
            log.info(
                "time budget %s: %.3f s per step over %d timed steps -> max_steps %d", self.config.time_budget,
                calibration.seconds_per_step, calibration.timed_steps, fixed,
            )

    def save(self) -> Path | None:
        """Every rank takes part (FSDP gathers the full state); the main process writes."""
        model_state = distributed.full_model_state_dict(self.forward_model)
        optimizer_state = distributed.full_optimizer_state_dict(self.forward_model, self.optimizer)
        if not self.is_main:
            return None
        trainer_state = {
            "step": self.step,
            "tokens": self.tokens,
            "non_finite_steps": [self.non_finite_steps, self.non_finite_in_a_row],
            "train_seconds": self.train_seconds,
            "budget": {"time_budget": self.config.time_budget, "max_steps": self.config.max_steps}
            if self.budget_fixed else None,
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(self.device),
            "tokenizer": self.tokenizer_id,
            "tokenizer_spec": self.tokenizer_spec,
            "data_dir": str(self.data_dir),
            "config": self.config.to_dict(),
        }
        blobs = {
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        path = ckpt.save_checkpoint(
            self.run_dir, self.step, self.model, self.tokenizer, blobs, trainer_state, self.config.checkpoint.keep,
            model_state=model_state,
        )
        log.info("saved checkpoint %s", path)
        return path

    # -- the loop ---------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, torch.Tensor]:
        accum = self.config.data.grad_accum
        self.model.train()
        lm_loss = torch.zeros((), device=self.device)
        total_loss = torch.zeros((), device=self.device)
        with ops.gradient_accumulation(defer_head_gradients=not self.world.is_distributed):
            for micro_step in range(accum):
                window = self.sampler.batch(self.step * accum + micro_step).to(self.device, non_blocking=True)
                # Data-parallel gradients are reduced once per optimizer step, on the last micro-batch's backward.
                with distributed.gradient_sync(self.forward_model, enabled=micro_step == accum - 1):
                    with self.autocast():
                        out = self.forward_model(input_ids=window[:, :-1], shift_labels=window[:, 1:])
                    loss = out.loss / accum
                    if faults.point("train.loss", index=self.step + 1) == "nan":
                        loss = loss * math.nan
                    (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                lm_loss += out.lm_loss.detach() / accum
                total_loss += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.forward_model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        non_finite = self.non_finite_part(total_loss, grad_norm)
        if non_finite is None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            # Every rank must make the same bias update, so each sees the load of the whole global batch.
            distributed.sum_across_ranks(self.model.expert_load_counts(), self.world)
            self.model.update_load_balance_bias()
            self.non_finite_in_a_row = 0
        else:
            # Skipped: no optimizer or bias update, but the step's windows, learning rate and number are used up,
            # so the data order and schedule stay those of a run without the fault (and resume stays exact).
            if self.scaler is not None:
                self.scaler.update()
            for counts in self.model.expert_load_counts():
                counts.zero_()
            self.non_finite_steps += 1
            self.non_finite_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn that the optimizer never stepped
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        self.tokens += self.tokens_per_step
        return {"lm_loss": lm_loss, "loss": total_loss, "grad_norm": grad_norm, "non_finite": non_finite}

    def non_finite_part(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> str | None:
        """"loss" or "gradient" when that is NaN or infinite on any process, else None. Under fp16 an infinite
        gradient is the GradScaler's business (it skips the step and lowers the scale), not a fault."""
        code = 0 if torch.isfinite(loss) else 1
        if code == 0 and self.scaler is None and not torch.isfinite(grad_norm):
            code = 2
        code = distributed.max_across_ranks(code, self.world, self.device)
        return (None, "loss", "gradient")[code]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over the same validation windows every time (spread evenly over the split), in
        batches of one optimizer step's windows (of all processes): without gradients they fit where training fits.

        Every process evaluates all windows: FSDP needs all ranks in every forward, and the figure is then the
        single-process one exactly."""
        data = self.config.data
        self.model.eval()
        total, windows = torch.zeros((), device=self.device), 0
        batches = iter_eval_batches(
            self.val_set, data.seq_len, data.micro_batch_size * data.grad_accum * self.world.size,
            max_batches=self.config.logging.eval_batches,
        )
        for window in batches:
            window = window.to(self.device)
            with self.autocast():
                loss = self.forward_model(input_ids=window[:, :-1], shift_labels=window[:, 1:]).lm_loss
            total += loss.float() * len(window)
            windows += len(window)
        val_loss = total.item() / windows
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}

    def sample(self) -> list[dict[str, str]]:
        """Continuations of the configured prompts, through the generation engine (fp32, whatever the training
        precision). Each prompt draws from its own generator seeded from the config, so sampling neither perturbs
        training (exact resume) nor varies between evaluations except through the weights."""
        settings = self.config.sample
        sampling = settings.sampling(self.config.seed)
        engine = GenerationEngine(self.model, self.tokenizer)
        samples = []
        for prompt in settings.prompts:
            prompt_ids = encode_prompt(self.tokenizer, prompt)
            (completion,) = engine.generate([prompt_ids], sampling, settings.max_new_tokens)
            samples.append({"prompt": prompt, "continuation": completion.text})
        return samples

    def peak_flops(self) -> float:
        if self.config.logging.peak_flops:
            return self.config.logging.peak_flops
        # A CPU without bf16 units emulates bf16 matmuls far below its fp32 rate; the hardware's peak is the faster.
        dtypes = {torch.float32, self.amp_dtype or torch.float32}
        return max(measured_peak_flops(self.device.type, dtype, torch.get_num_threads()) for dtype in dtypes)

    def announce(self) -> None:
        log.info("run directory %s", self.run_dir.resolve())
        for note in self.config.notes:
            log.info("%s", note)
        log.info("%s", self.model)
        log.info("%s", format_parameter_report(parameter_report(self.model)))
        data = self.config.data
        log.info(
            "device %s | precision %s | optimizer %s | gradient checkpointing %s | compile %s",
            self.device, self.precision, optim.describe(self.optimizer, self.config.optim),
            self.config.gradient_checkpointing, self.compile_path,
        )
        log.info(
            "data %s (%s) | train %s tokens, %s documents | val %s tokens, %s documents | tokenizer %s",
            data.source, self.data_dir, f"{len(self.train_set):,}", f"{self.train_set.num_documents:,}",
            f"{len(self.val_set):,}", f"{self.val_set.num_documents:,}", f"{self.tokenizer_spec} ({self.tokenizer_id})",
        )
        if isinstance(self.sampler, MixtureSampler):
            for sampler, weight in zip(self.sampler.sources[1:], self.sampler.weights[1:]):
                log.info(
                    "mixture: + %s | train %s tokens | weight %g (source weight %g)", sampler.dataset.prepared_dir,
                    f"{len(sampler.dataset):,}", weight, self.sampler.weights[0],
                )
        log.info(
            "batch %d sequences x %d tokens = %s tokens per step (micro-batch %d x accumulation %d x %d processes);"
            " %d steps", data.micro_batch_size * data.grad_accum * self.world.size, data.seq_len,
            f"{self.tokens_per_step:,}", data.micro_batch_size, data.grad_accum, self.world.size,
            self.config.max_steps,
        )
        if self.resumed_from is not None:
            log.info("resumed from %s at step %d (%s tokens)", self.resumed_from, self.step, f"{self.tokens:,}")
            if self.changed_on_resume:
                log.info("model settings changed on resume: %s", "; ".join(self.changed_on_resume))

    def write_resolved_config(self) -> None:
        path = self.run_dir / RESOLVED_CONFIG
        staging = path.with_suffix(".yaml.tmp")
        staging.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        staging.replace(path)

    def train(self, stop_at_step: int | None = None) -> int:
        """Run until max_steps (or `stop_at_step`, as if interrupted there); return the process exit status:
        0 when finished, 128 + signal number when stopped by SIGINT/SIGTERM (after checkpointing)."""
        handlers = []
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_staging(self.run_dir)
            self.write_resolved_config()
            handlers = setup_logging(self.run_dir)
        metrics = MetricsWriter(self.run_dir, self.config.logging.tensorboard) if self.is_main else None
        try:
            with logging_redirect_tqdm([log]), stop_on_signals(self):
                return self.loop(metrics, stop_at_step)
        except ckpt.CheckpointWriteError as error:
            log.error("%s; free space and run the same command again to resume from it", error)
            return EXIT_CHECKPOINT_WRITE_FAILED
        except Exception as error:
            if self.world.is_distributed:  # torchrun's own summary names the rank too, after the other ranks stop
                print(f"tinyseek train: rank {self.world.rank} failed: {error!r}", file=sys.stderr, flush=True)
            raise
        finally:
            if metrics is not None:
                metrics.close()
            remove_handlers(handlers)
            if self.world.is_distributed:
                distributed.shutdown()  # the process group joined for this run ends with it

    def loop(self, metrics: MetricsWriter | None, stop_at_step: int | None) -> int:
        config, every = self.config, self.config.logging
        if self.is_main:
            self.announce()
        flops_per_token = estimate_flops_per_token(self.model_config, config.data.seq_len)
        peak = self.peak_flops()
        if self.resumed_from is not None:
            restore_rng_state(self.saved_rng, self.device)
        calibration = BudgetCalibration(self.budget_s) if self.budget_s and not self.budget_fixed else None
        progress = tqdm(
            total=config.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
            disable=not (self.is_main and every.progress_bar),
        )
        saved_at = self.step if self.resumed_from is not None else None
        loss_sum, steps_since_log, interval_start = 0.0, 0, time.perf_counter()
        seconds_before, loop_start = self.train_seconds, time.perf_counter()
        while self.step < min(config.max_steps, stop_at_step or config.max_steps) and not self.stop_agreed():
            step_start = time.perf_counter()
            result = self.train_step()
            progress.update()
            if result["non_finite"] is not None and self.report_non_finite(result, metrics):
                progress.close()
                return EXIT_NON_FINITE
            loss_sum += result["lm_loss"].item()
            self.train_seconds = seconds_before + time.perf_counter() - loop_start
            if calibration is not None and not self.budget_fixed:
                self.calibrate(calibration, time.perf_counter() - step_start, progress)
            steps_since_log += 1
            if self.step % every.log_every == 0 or self.step == config.max_steps:
                synchronize(self.device.type)
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = steps_since_log * self.tokens_per_step / elapsed
                values = {
                    "loss": distributed.mean_across_ranks(loss_sum / steps_since_log, self.world, self.device),
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": result["grad_norm"].item(),
                    "tokens_per_s": tokens_per_s,
                    "mfu": tokens_per_s * flops_per_token / peak,
                    **self.model.moe_metrics(),
                    "memory_gb": memory_in_use_gb(self.device),
                    "train_seconds": self.train_seconds,
                }
                if self.is_main:
                    progress.set_postfix(loss=f"{values['loss']:.3f}")
                    log.info("%s", format_train_line(self.step, config.max_steps, values))
                    metrics.write("train", self.step, self.tokens, **values)
                loss_sum, steps_since_log, interval_start = 0.0, 0, time.perf_counter()
            if self.step % every.eval_every == 0 or self.step == config.max_steps:
                self.report_evaluation(metrics)
            if self.step % every.sample_every == 0 or self.step == config.max_steps:
                self.report_samples(metrics)
            if self.step % config.checkpoint.every == 0:
                self.save()
                saved_at = self.step
            if self.step % every.log_every == 0:
                interval_start = time.perf_counter()  # eval, samples and saving are not training throughput
        progress.close()
        if saved_at != self.step:
            self.save()
        if self.stop_signal is not None:
            log.info("stopped by %s at step %d; run the same command again to resume", self.stop_signal.name,
                     self.step)
            return 128 + self.stop_signal.value
        if self.is_main and self.step >= config.max_steps:
            from tinyseek.train.plot import plot_run

            if self.budget_s is not None:
                log.info(
                    "time budget %s: trained %d steps in %.0f s, %.1f%% of the budget", config.time_budget, self.step,
                    self.train_seconds, 100 * self.train_seconds / self.budget_s,
                )
            log.info("finished %d steps; loss curves in %s", self.step, plot_run(self.run_dir))
        return 0

    def report_non_finite(self, result: dict[str, Any], metrics: MetricsWriter | None) -> bool:
        """Log a skipped step; True when there were too many in a row and the run must stop. It stops without saving,
        so the last checkpoint stays the last one written before the trouble (its weights are finite)."""
        limit = self.config.optim.max_non_finite_steps
        what = f"non-finite {result['non_finite']} (loss {result['loss'].item():.4g}, gradient norm " \
               f"{result['grad_norm'].item():.4g})"
        if self.is_main:
            metrics.write("non_finite", self.step, self.tokens, what=result["non_finite"],
                          in_a_row=self.non_finite_in_a_row, total=self.non_finite_steps)
        if self.non_finite_in_a_row < limit:
            log.warning("step %d: %s; optimizer and bias update skipped (%d in a row, the run stops at %d)",
                        self.step, what, self.non_finite_in_a_row, limit)
            return False
        last = ckpt.latest_checkpoint(self.run_dir, report=lambda path, problem: None)
        log.error(
            "stopped at step %d: %s for %d steps in a row (optim.max_non_finite_steps=%d); nothing saved, %s; "
            "lower optim.lr or check the data before resuming", self.step, what, self.non_finite_in_a_row, limit,
            f"the last checkpoint is {last.name}" if last else "no checkpoint was written",
        )
        return True

    def stop_agreed(self) -> bool:
        """Whether any process was asked to stop: all stop at the same step, or their collectives would hang."""
        requested = self.stop_signal.value if self.stop_signal is not None else 0
        if self.world.is_distributed:
            requested = distributed.max_across_ranks(requested, self.world, self.device)
            if requested and self.stop_signal is None:
                self.stop_signal = signal.Signals(requested)
        return bool(requested)

    def report_evaluation(self, metrics: MetricsWriter | None) -> None:
        values = self.evaluate()
        if self.is_main:
            log.info("step %d | val_loss %.4f | val_ppl %.2f", self.step, values["val_loss"], values["val_perplexity"])
            metrics.write("eval", self.step, self.tokens, train_seconds=self.train_seconds, **values)

    def report_samples(self, metrics: MetricsWriter | None) -> None:
        if not self.config.sample.prompts:
            return
        samples = self.sample()  # on every rank: a sharded (FSDP) model needs all of them in each forward
        if not self.is_main:
            return
        for sample in samples:
            log.info("sample | %s|%s", sample["prompt"], sample["continuation"].replace("\n", "\\n"))
        metrics.write("samples", self.step, self.tokens, samples=samples)
