"""MFU's denominator against what it must bound: the start-up peak probe (`measured_peak_flops`), the probe as it was
before (one warm-up matmul, one 0.1 s window), a 3-second sustained square matmul, and the training's largest GEMM
shapes (the LM head's forward and weight gradient at 16 x 256 tokens and an 8k vocabulary), in GFLOP/s.

    python benchmarks/peak_probe.py --threads 2      # run it first thing in a fresh process, as a training run does
"""

from __future__ import annotations

import argparse
import time

import torch

from tinyseek.train.metrics import measured_peak_flops, sustained_matmul_flops


def single_window_probe(size: int = 1024) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.1 or repeats < 3:
        torch.matmul(a, b)
        repeats += 1
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="0.3 s sustained windows (to check the script runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds = 0.3 if args.quick else 3.0
    old = single_window_probe()
    new = measured_peak_flops.__wrapped__("cpu", torch.float32, args.threads) / 1e9
    print(f"threads {args.threads}: previous probe {old:.1f}, probe {new:.1f}, sustained 1024^3 "
          f"{sustained_matmul_flops(1024, 1024, 1024, seconds) / 1e9:.1f}, head forward 4096x128x8192 "
          f"{sustained_matmul_flops(4096, 128, 8192, seconds) / 1e9:.1f}, head weight gradient 8192x4096x128 "
          f"{sustained_matmul_flops(8192, 4096, 128, seconds) / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
