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
