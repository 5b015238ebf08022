"""Wall-clock time of `tinyseek prepare` on the developers' textbook corpus with the built-in DeepSeek-Coder
tokenizer: a cold run into an empty folder, then a second run that finds the cache (start-up, hashing the corpus and
loading the tokenizer).

    python benchmarks/prepare_time.py            # needs $TINYSEEK_SHARED_DATA (or ../shared/data)
    python benchmarks/prepare_time.py --quick    # the built-in TinyStories sample instead
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSEEK_SHARED_DATA") or REPO.parent / "shared" / "data")


def timed_prepare(data: str, out: Path) -> tuple[float, float]:
    """Wall-clock and CPU seconds (the process and its tokenizer workers) of one `tinyseek prepare`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["tinyseek", "prepare", "--data", data, "--tokenizer", "builtin", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the built-in sample (to check the script runs)")
    args = parser.parse_args()
    data = "builtin" if args.quick else str(SHARED / "corpus" / "library_of_phi_gpt4.jsonl")
    with tempfile.TemporaryDirectory(prefix="tinyseek-prepare-") as out:
        cold, cold_cpu = timed_prepare(data, Path(out))
        warm, warm_cpu = timed_prepare(data, Path(out))
        meta = json.loads(next(Path(out).glob("**/meta.json")).read_text())
    splits = ", ".join(f"{split} {meta[split]['tokens']:,} tokens in {meta[split]['documents']:,} documents"
                       for split in ("train", "val"))
    print(f"{Path(data).name}, built-in DeepSeek-Coder tokenizer: {splits}")
    print(f"tinyseek prepare, cold: {cold:.1f} s wall clock, {cold_cpu:.1f} s CPU (main process and tokenizer workers)")
    print(f"tinyseek prepare, cache hit: {warm:.1f} s wall clock, {warm_cpu:.1f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
