"""The README's first command where the Hugging Face Hub cannot be reached: from a fresh clone to the first logged
training step of `python train.py` (it falls back to the built-in TinyStories sample and tokenizer), then the rate
of its next `--steps` steps (evaluations, samples and checkpoints included) and the whole recipe's time at that rate.

    python benchmarks/first_step.py             # clone, then `python train.py` with this Python's packages
    python benchmarks/first_step.py --install   # clone, a fresh venv and the README's pip install, then train.py

Without --install the install is not timed; with it, the time is mostly downloading torch and its dependencies,
which depends on the network far more than on tinyseek. The Hub is made unreachable with HF_HUB_OFFLINE=1 and an
empty HOME and HF_HOME; training uses torch's default threads, as the README's command does.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], **options) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, **options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="also time a fresh venv and the README's pip install")
    parser.add_argument("--steps", type=int, default=200, help="steps after the first logged one to time the rate")
    parser.add_argument("--quick", action="store_true", help="time 20 steps (to check the script runs)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 20
    with tempfile.TemporaryDirectory(prefix="tinyseek-first-step-") as root:
        root = Path(root)
        clone = root / "clone"
        print(f"clone: {timed(['git', 'clone', '-q', str(REPO), str(clone)]):.1f} s")
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TINYSEEK_SHARED_DATA")}
        env.update(HOME=str(root / "home"), HF_HOME=str(root / "home" / "hf"), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1")
        env.pop("OMP_NUM_THREADS", None)
        python = sys.executable
        if args.install:
            venv = clone / ".venv"
            seconds = timed([sys.executable, "-m", "venv", str(venv)]) + timed(
                [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", "-e", ".[test]"], cwd=clone)
            print(f"venv + pip install torch==2.13.0 -e '.[test]': {seconds:.1f} s")
            python = str(venv / "bin" / "python")
        else:
            env["PYTHONPATH"] = str(clone / "src")  # the clone's code with this Python's packages
        start = time.perf_counter()
        process = subprocess.Popen([python, "train.py", "--out-dir", str(root / "run")], cwd=clone, env=env,
                                   stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        fallback, first = None, None
        for line in process.stderr:
            if "training on the built-in" in line:
                fallback = line.strip()
            logged = re.search(r"step (\d+)/(\d+) .* loss ", line)
            if logged and first is None:
                first, total_steps, first_at = int(logged.group(1)), int(logged.group(2)), time.perf_counter()
                print(f"python train.py to its first logged step: {first_at - start:.1f} s")
                print(f"  {fallback}\n  {line.strip()}")
            elif logged and int(logged.group(1)) >= first + args.steps:
                per_step = (time.perf_counter() - first_at) / (int(logged.group(1)) - first)
                print(f"steps {first}-{logged.group(1)}: {per_step:.3f} s a step (evaluation, samples and checkpoints "
                      f"included); all {total_steps:,} steps at that rate: {per_step * total_steps / 60:.0f} min")
                break
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
