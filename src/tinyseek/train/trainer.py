"""The training loop: components set up before the run directory is touched (data, model, optimizer, checkpoint,
evaluation, time budget), then steps, logs, evals, samples and checkpoints until max_steps or a signal."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from tinyseek import distributed, estimate_flops_per_token, faults, ops
from tinyseek.train import checkpoint as ckpt
from tinyseek.train.budget import Horizon, TimeBudget
from tinyseek.train.checkpointing import Checkpointer, Progress, restore_rng_state, rng_state
from tinyseek.train.config import TrainConfig
from tinyseek.train.data import TrainingData, continue_data_order, write_resolved_config
from tinyseek.train.evaluator import Evaluator
from tinyseek.train.initial import load_initial_model
from tinyseek.train.metrics import (
    Interval, RunReport, announce, log, memory_in_use_gb, peak_flops, remove_handlers, setup_logging, synchronize,
)
from tinyseek.train.model import Placement, build_model, build_model_config
from tinyseek.train.optimization import Optimization
from tinyseek.train.schedule import moved_horizon
from tinyseek.train.signals import StopRequest
from tinyseek.train.stage import PRETRAINING, Stage

# Exit statuses besides 0 (finished), 2 (bad input, from the CLI) and 128 + signal (stopped by SIGINT/SIGTERM).
EXIT_NON_FINITE = 3  # optim.max_non_finite_steps steps in a row had a non-finite loss or gradient
EXIT_CHECKPOINT_WRITE_FAILED = 4  # a checkpoint could not be written (disk full, I/O error)


class Trainer:
    """One training run of one stage (pre-training unless `stage` says otherwise). `Trainer(config)` does all the
    checking and loading (data, tokenizer, model, the resume checkpoint) and raises tinyseek.errors exceptions before
    anything is written; `train()` runs the loop."""

    def __init__(self, config: TrainConfig, stage: Stage = PRETRAINING):
        self.config, self.stage = config, stage
        self.run_dir = Path(config.out_dir).expanduser()
        ckpt.check_writable(self.run_dir)
        self.stop = StopRequest()
        # Each component reads what the ones before it set up, in this order. The corpus is prepared before any
        # process group exists, so no collective waits with a timeout while the first process tokenizes it.
        initial = load_initial_model(config) if config.init_from is not None else None
        self.data = TrainingData(config.data, self.run_dir)
        self.model_config = build_model_config(config, self.data.tokenizer, initial)
        stage.mark(self.model_config)
        self.data.prepare(self.model_config.vocab_size, split_by_fallback="data.split_by" in config.preset_keys)
        self.placement = Placement.join(config)
        self.world, self.device = self.placement.world, self.placement.device
        self.memory = ops.StepMemory(self.device)  # the fused loss's buffers and accumulation window, kept by this run
        self.data.open()
        self.sampler = stage.batches(self.data, config, self.world)
        self.tokens_per_step = self.data.tokens_per_step(self.world.size)
        built = build_model(config, self.model_config, self.placement,
                            initial.weights if initial is not None else None)
        self.model, self.forward_model, self.compile_path = built.model, built.forward_model, built.compile_path
        # With a time budget, max_steps is unknown until the first steps are timed (or a checkpoint says it).
        self.budget = TimeBudget(config.time_budget)
        config.max_steps = self.budget.initial_max_steps(config.max_steps)
        self.optimization = Optimization(config, self.model, self.forward_model, self.placement)
        self.evaluator = Evaluator(config, self.data.val_set, self.data.tokenizer, self.world.size)
        self.checkpointer = Checkpointer(self.run_dir, config.checkpoint.keep)
        self.progress = Progress()
        self.resumed_from = self.resume()

    def resume(self) -> Path | None:
        """Continue from the latest usable checkpoint of the run directory, if any; refuse one that does not fit."""
        found = self.checkpointer.latest_usable()
        if found is None:
            return None
        self.checkpointer.check_fits(found, self.model_config, self.data.tokenizer_id)
        self.optimization.load(found.path, found.blobs)
        saved_horizon = self.budget.saved_horizon(found.state)
        if saved_horizon is not None:
            self.fix_horizon(saved_horizon)
        self.optimization.apply_current_hyperparameters()
        self.progress = Progress.from_state(found.state)
        continue_data_order(self.sampler, found.state, self.progress.step, self.config.data.grad_accum, self.world.size)
        self.saved_rng = found.state["rng"]
        return found.path

    def fix_max_steps(self, max_steps: int) -> None:
        """The time budget's step count, from now on the run's max_steps (config.yaml and checkpoints keep it), with
        the learning rate continuous at the current step."""
        current = self.budget.horizon or Horizon(self.config.max_steps)
        self.fix_horizon(moved_horizon(self.config.schedule, current, self.progress.step, max_steps))

    def fix_horizon(self, horizon: Horizon) -> None:
        self.config.max_steps = horizon.max_steps
        self.optimization.set_horizon(horizon)
        self.budget.horizon = horizon

    def save(self) -> Path | None:
        """Every rank takes part (FSDP gathers the full state); the main process writes."""
        model_state = distributed.full_model_state_dict(self.forward_model)
        blobs = self.optimization.checkpoint_blobs()
        if not self.world.is_main:
            return None
        trainer_state = {
            **self.progress.state(), "budget": self.budget.state(),
            "sampler": self.sampler.state_dict(), "rng": rng_state(self.device), **self.data.checkpoint_state(),
            "config": self.config.to_dict(),
        }
        return self.checkpointer.save(self.progress.step, self.model, model_state, self.data.tokenizer, blobs,
                                      trainer_state)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches of the stage's data, minimising the stage's loss."""
        accum, progress = self.config.data.grad_accum, self.progress
        faults.point("train.step", index=progress.step + 1)
        self.model.train()
        reported, total = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        with self.memory.gradient_accumulation(defer_head_gradients=not self.world.is_distributed):
            for micro_step in range(accum):
                batch = self.sampler.batch(progress.step * accum + micro_step).to(self.device, non_blocking=True)
                # Data-parallel gradients are reduced once per optimizer step, on the last micro-batch's backward.
                with distributed.gradient_sync(self.forward_model, enabled=micro_step == accum - 1):
                    with self.placement.autocast():
                        losses = self.stage.loss(self.forward_model, batch, self.memory)
                    loss = losses.loss / accum
                    if faults.point("train.loss", index=progress.step + 1) == "nan":
                        loss = loss * math.nan
                    self.optimization.backward(loss)
                reported += losses.reported.detach() / accum
                total += loss.detach()
        grad_norm, non_finite = self.optimization.step(total)
        progress.non_finite_in_a_row = 0 if non_finite is None else progress.non_finite_in_a_row + 1
        progress.non_finite_steps += non_finite is not None
        progress.step += 1
        progress.tokens += self.tokens_per_step
        return {"lm_loss": reported, "loss": total, "grad_norm": grad_norm, "non_finite": non_finite}

    def train(self, stop_at_step: int | None = None) -> int:
        """Run until max_steps (or `stop_at_step`, as if interrupted there); return the process exit status:
        0 when finished, 128 + signal number when stopped by SIGINT/SIGTERM (after checkpointing)."""
        handlers = []
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_staging(self.run_dir)
            write_resolved_config(self.run_dir, self.config)
            handlers = setup_logging(self.run_dir)
        report = RunReport(self.run_dir, self.config.logging.tensorboard, self.world.is_main,
                           self.config.logging.progress_bar)
        try:
            with logging_redirect_tqdm([log]), self.stop.listening():
                return self.loop(report, stop_at_step)
        except ckpt.CheckpointWriteError as error:
            log.error("%s; free space and run the same command again to resume from it", error)
            return EXIT_CHECKPOINT_WRITE_FAILED
        except Exception as error:
            if self.world.is_distributed:  # torchrun's own summary names the rank too, after the other ranks stop
                print(f"tinyseek train: rank {self.world.rank} failed: {error!r}", file=sys.stderr, flush=True)
            raise
        finally:
            report.close()
            remove_handlers(handlers)
            if self.world.is_distributed:
                distributed.shutdown()  # the process group joined for this run ends with it

    def announce(self) -> None:
        config, progress = self.config, self.progress
        setup = [
            *config.notes,
            f"device {self.device} | precision {self.placement.precision} | optimizer "
            f"{self.optimization.describe()} | gradient checkpointing {config.gradient_checkpointing} | compile "
            f"{self.compile_path}",
            *self.data.describe(self.sampler), *self.stage.describe(self.sampler), self.data.describe_batch(self.world.size, config.max_steps),
        ]
        announce(self.run_dir, self.model, setup + self.checkpointer.describe_resume(self.resumed_from, progress))

    def loop(self, report: RunReport, stop_at_step: int | None) -> int:
        config, every, progress, is_main = self.config, self.config.logging, self.progress, self.world.is_main
        if is_main:
            self.announce()
        flops_per_token = estimate_flops_per_token(self.model_config, config.data.seq_len)
        peak = peak_flops(every.peak_flops, self.device, self.placement.amp_dtype)
        if self.resumed_from is not None:
            restore_rng_state(self.saved_rng, self.device)
        self.budget.start()
        report.start_progress(config.max_steps, progress.step)
        saved_at = progress.step if self.resumed_from is not None else None
        interval, seconds_before, loop_start = Interval(), progress.train_seconds, time.perf_counter()
        while progress.step < min(config.max_steps, stop_at_step or config.max_steps) and not self.stop.agreed(
            self.placement.largest_across_ranks
        ):
            step_start = time.perf_counter()
            result = self.train_step()
            report.progress.update()
            if result["non_finite"] is not None and report.non_finite(
                progress, result, config.optim.max_non_finite_steps
            ):
                return EXIT_NON_FINITE
            interval.add(result["lm_loss"].item())
            progress.train_seconds = seconds_before + time.perf_counter() - loop_start
            fixed = self.budget.observe(progress.step, time.perf_counter() - step_start, progress.train_seconds,
                                        config.max_steps, self.placement.largest_across_ranks)
            if fixed is not None:
                self.fix_max_steps(fixed)
                report.set_total(fixed)
                if is_main:
                    write_resolved_config(self.run_dir, self.config)
            at_log = progress.step % every.log_every == 0 or progress.step == config.max_steps
            if at_log:
                synchronize(self.device.type)
                tokens_per_s = interval.tokens_per_s(self.tokens_per_step)
                report.train(progress.step, config.max_steps, progress.tokens, {
                    "loss": distributed.mean_across_ranks(interval.mean_loss, self.world, self.device),
                    "lr": self.optimization.learning_rate, "grad_norm": result["grad_norm"].item(),
                    "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak,
                    **self.model.moe_metrics(), "memory_gb": memory_in_use_gb(self.device),
                    "train_seconds": progress.train_seconds,
                })
            if progress.step % every.eval_every == 0 or progress.step == config.max_steps:
                values = self.evaluator.evaluate(self.model, self.forward_model, self.device, self.placement.autocast)
                report.evaluation(progress.step, progress.tokens, progress.train_seconds, values)
            if (progress.step % every.sample_every == 0 or progress.step == config.max_steps) and config.sample.prompts:
                # On every rank: a sharded (FSDP) model needs all of them in each forward.
                report.samples(progress.step, progress.tokens, self.evaluator.sample(self.model))
            if progress.step % config.checkpoint.every == 0:
                self.save()
                saved_at = progress.step
            if at_log:
                interval.restart()  # eval, samples and saving are not training throughput
        report.progress.close()
        if saved_at != progress.step:
            self.save()
        if self.stop.signal is not None:
            log.info("stopped by %s at step %d; run the same command again to resume", self.stop.signal.name,
                     progress.step)
            return 128 + self.stop.signal.value
        if is_main and progress.step >= config.max_steps:
            from tinyseek.train.plot import plot_run

            if self.budget.seconds is not None:
                log.info("%s", self.budget.summary(progress.step, progress.train_seconds))
            log.info("finished %d steps; loss curves in %s", progress.step, plot_run(self.run_dir))
        return 0
