"""What a person sees while a run trains: log lines (console and train.log), metrics.jsonl, TensorBoard, MFU."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

log = logging.getLogger("tinyseek.train")
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


def setup_logging(run_dir: Path | None) -> list[logging.Handler]:
    """Send the `tinyseek.train` logger to stderr and, once the run directory exists, to train.log.

    Returns the handlers so that the caller removes them when the run ends (tests run several trainers in one
    process). The console handler goes through tqdm's redirect at the call site so bars and lines don't garble."""
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / LOG_FILE))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handlers


def remove_handlers(handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        log.removeHandler(handler)
        handler.close()


class MetricsWriter:
    """Appends one JSON object per event to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard if asked."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / METRICS_FILE
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
            else:
                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, kind: str, step: int, tokens: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "tokens": tokens, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's metrics records; a torn line (the process was killed mid-write) or any other line that is not a
    record is ignored."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("kind"), str):
                records.append(record)
    return records


@cache
def measured_peak_flops(device_type: str, dtype: torch.dtype, threads: int) -> float:
    """Achieved FLOP/s of a square matmul on this device, dtype and thread count: a practical peak for MFU.

    The best of several short windows after a warm-up of its own: the first matmuls of a process run below the
    steady rate (the thread pool wakes, pages are first touched, clocks ramp), and a single short window taken
    then is a peak that training later exceeds. `threads` is the run's torch thread count; the cache keys on it
    because the rate depends on it."""
    if torch.get_num_threads() != threads:
        raise ValueError(f"measured_peak_flops: asked for {threads} threads, torch runs {torch.get_num_threads()}")
    size = 1024 if device_type == "cpu" else 4096
    a = torch.randn(size, size, device=device_type, dtype=dtype)
    b = torch.randn(size, size, device=device_type, dtype=dtype)
    flops = 2 * size**3

    def window(seconds: float) -> float:
        synchronize(device_type)
        repeats, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or repeats < 3:
            torch.matmul(a, b)
            repeats += 1
        synchronize(device_type)
        return flops * repeats / (time.perf_counter() - start)

    window(PEAK_WARMUP_S)
    return max(window(PEAK_WINDOW_S) for _ in range(PEAK_WINDOWS))


PEAK_WARMUP_S, PEAK_WINDOW_S, PEAK_WINDOWS = 0.3, 0.1, 5


def sustained_matmul_flops(m: int, k: int, n: int, seconds: float) -> float:
    """FLOP/s of an [m, k] x [k, n] fp32 CPU matmul held for `seconds` after half a second of warm-up: the longer
    measurement the peak probe must agree with (tests/test_mfu.py, benchmarks/peak_probe.py)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    warm_until = time.perf_counter() + 0.5
    while time.perf_counter() < warm_until:
        torch.matmul(a, b)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        repeats += 1
    return 2 * m * k * n * repeats / (time.perf_counter() - start)


def synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def memory_in_use_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1e9
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_rss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux


def format_train_line(step: int, max_steps: int, values: dict[str, Any]) -> str:
    parts = [
        f"step {step}/{max_steps}",
        f"loss {values['loss']:.4f}",
        f"lr {values['lr']:.2e}",
        f"grad_norm {values['grad_norm']:.3f}",
        f"tok/s {values['tokens_per_s']:,.0f}",
        f"mfu {100 * values['mfu']:.1f}%",
    ]
    if "maxvio" in values:
        parts.append(f"maxvio {values['maxvio']:.3f}")
    parts.append(f"mem {values['memory_gb']:.2f}GB")
    return " | ".join(parts)


class Interval:
    """The train loss and the clock since the last train line."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.loss_sum, self.steps, self.start = 0.0, 0, time.perf_counter()

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.steps += 1

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.steps

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return self.steps * tokens_per_step / (time.perf_counter() - self.start)


class RunReport:
    """What a run reports: log lines, and on the main process metrics.jsonl records (TensorBoard too if asked) and
    the progress bar. Every process calls it; only the main one writes."""

    def __init__(self, run_dir: Path, tensorboard: bool, is_main: bool, progress_bar: bool):
        self.run_dir, self.is_main, self.progress_bar = run_dir, is_main, progress_bar
        self.writer = MetricsWriter(run_dir, tensorboard) if is_main else None
        self.progress = None

    def start_progress(self, total: int, initial: int) -> None:
        self.progress = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             disable=not (self.is_main and self.progress_bar))

    def set_total(self, total: int) -> None:
        self.progress.total = total
        self.progress.refresh()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()

    def train(self, step: int, max_steps: int, tokens: int, values: dict[str, Any]) -> None:
        if self.is_main:
            self.progress.set_postfix(loss=f"{values['loss']:.3f}")
            log.info("%s", format_train_line(step, max_steps, values))
            self.writer.write("train", step, tokens, **values)

    def evaluation(self, step: int, tokens: int, train_seconds: float, values: dict[str, float]) -> None:
        if self.is_main:
            log.info("step %d | val_loss %.4f | val_ppl %.2f", step, values["val_loss"], values["val_perplexity"])
            self.writer.write("eval", step, tokens, train_seconds=train_seconds, **values)

    def samples(self, step: int, tokens: int, samples: list[dict[str, str]]) -> None:
        if self.is_main:
            for sample in samples:
                log.info("sample | %s|%s", sample["prompt"], sample["continuation"].replace("\n", "\\n"))
            self.writer.write("samples", step, tokens, samples=samples)

    def non_finite(self, progress, result: dict[str, Any], limit: int) -> bool:
        """Log the skipped step that `result` describes (`progress`: the run's counters after it); True when there
        were `limit` in a row and the run must stop. It stops without saving, so the last checkpoint stays the last
        one written before the trouble (its weights are finite)."""
        from tinyseek.train.checkpoint import latest_checkpoint  # transformers, which `tinyseek plot` does without

        step, what, in_a_row = progress.step, result["non_finite"], progress.non_finite_in_a_row
        loss, grad_norm = result["loss"].item(), result["grad_norm"].item()
        description = f"non-finite {what} (loss {loss:.4g}, gradient norm {grad_norm:.4g})"
        if self.is_main:
            self.writer.write("non_finite", step, progress.tokens, what=what, in_a_row=in_a_row,
                              total=progress.non_finite_steps)
        if in_a_row < limit:
            log.warning("step %d: %s; optimizer and bias update skipped (%d in a row, the run stops at %d)",
                        step, description, in_a_row, limit)
            return False
        last_checkpoint = latest_checkpoint(self.run_dir, report=lambda path, problem: None)
        log.error(
            "stopped at step %d: %s for %d steps in a row (optim.max_non_finite_steps=%d); nothing saved, %s; "
            "lower optim.lr or check the data before resuming", step, description, in_a_row, limit,
            f"the last checkpoint is {last_checkpoint.name}" if last_checkpoint else "no checkpoint was written",
        )
        return True


def peak_flops(configured: float | None, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """The FLOP/s that MFU divides by: the configured figure, else the measured matmul peak."""
    if configured:
        return configured
    # A CPU without bf16 units emulates bf16 matmuls far below its fp32 rate; the hardware's peak is the faster.
    dtypes = {torch.float32, amp_dtype or torch.float32}
    return max(measured_peak_flops(device.type, dtype, torch.get_num_threads()) for dtype in dtypes)


def announce(run_dir: Path, model: torch.nn.Module, setup: list[str]) -> None:
    """What the run log opens with: the run directory, the model and its parameters, then `setup` line by line."""
    from tinyseek import format_parameter_report, parameter_report  # the model's modules: not for `tinyseek plot`

    log.info("run directory %s", run_dir.resolve())
    log.info("%s", model)
    log.info("%s", format_parameter_report(parameter_report(model)))
    for line in setup:
        log.info("%s", line)
