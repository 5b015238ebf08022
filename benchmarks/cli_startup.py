"""How fast the `tinyseek` command answers `--help`, side by side with what it used to import first.

Each case runs in a fresh interpreter, the cases interleaved, best of --repeats (default 5; about a minute on an
idle 2-core machine): a bare interpreter, `tinyseek --help`, `tinyseek train --help`, and the imports every command
paid for before the package became lazy (torch, transformers and tinyseek's model, which the old `tinyseek/__init__`
loaded to register the Auto classes). Children run with OMP_NUM_THREADS=1.

    python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": "pass",
    "tinyseek --help": "from tinyseek.cli import main; main(['--help'])",
    "tinyseek train --help": "from tinyseek.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass",
    "old eager import (torch, transformers, model)": (
        "from transformers import AutoConfig, AutoModelForCausalLM; import tinyseek.modeling, tinyseek.report"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one process each (to check the script runs)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, code in CASES.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    print(f"fresh processes, best and median of {args.repeats}, OMP_NUM_THREADS=1; load average at end "
          f"{' / '.join(f'{load:.1f}' for load in os.getloadavg())}")
    for name, values in times.items():
        print(f"  {name:<46} best {min(values):6.3f} s   median {statistics.median(values):6.3f} s")
    old, new = min(times["old eager import (torch, transformers, model)"]), min(times["tinyseek --help"])
    print(f"  tinyseek --help is {old / new:.1f}x faster than the imports it used to make first")


if __name__ == "__main__":
    main()
