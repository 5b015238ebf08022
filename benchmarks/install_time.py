"""What installing the test extras costs CI, and what llama.cpp's build adds to it: `.ci/run`'s install steps in a
fresh venv, timed with an empty pip cache, then again with the cache the first install filled, and with an empty
cache for the extras as they were before the GGUF export (without llama-cpp-python, which pip builds from source).

    python benchmarks/install_time.py            # three installs from a fresh clone (about 12 minutes, idle 2 cores)
    python benchmarks/install_time.py --quick    # a venv and tinyseek alone, no dependencies (to check the script runs)

Every install runs `.ci/run`'s two pip commands (torch==2.13.0, then the project with its extras) with
CMAKE_BUILD_PARALLEL_LEVEL set to the number of cores, as `.ci/run` sets it; the torch wheel comes from wherever pip
finds it on this machine, the same for every row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install(clone: Path, venv: Path, cache: Path, requirements: list[str]) -> float:
    env = {**os.environ, "PIP_CACHE_DIR": str(cache), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if "--no-deps" not in requirements:
        subprocess.run([*pip, "torch==2.13.0"], check=True, env=env, cwd=clone)
    subprocess.run([*pip, *requirements], check=True, env=env, cwd=clone)
    return time.perf_counter() - start


def test_extras_without_llama_cpp(clone: Path) -> list[str]:
    """The test extra's requirements with llama-cpp-python left out (tinyseek[gguf] stays: pure Python)."""
    extras = tomllib.loads((clone / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return ["-e", ".[serve,gguf]", *(r for r in extras["test"] if not r.startswith("tinyseek["))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one install of tinyseek alone, without dependencies")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinyseek-install-") as root:
        root = Path(root)
        clone = root / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        if args.quick:
            seconds = install(clone, root / "venv", root / "cache", ["--no-deps", "-e", "."])
            print(f"venv + pip install --no-deps -e . (empty cache): {seconds:.1f} s")
            return
        cases = [
            ("`.[test]`, empty pip cache (a fresh CI machine)", root / "cache", ["-e", ".[test]"]),
            ("`.[test]`, the cache that install filled (the next run)", root / "cache", ["-e", ".[test]"]),
            ("`.[test]` without llama-cpp-python, empty pip cache (before the GGUF export)", root / "cache-before",
             test_extras_without_llama_cpp(clone)),
        ]
        print("| install (venv, torch==2.13.0, then the project) | seconds |\n|---|---|")
        seconds = []
        for number, (name, cache, requirements) in enumerate(cases):
            seconds.append(install(clone, root / f"venv-{number}", cache, requirements))
            print(f"| {name} | {seconds[-1]:.0f} |", flush=True)
        print(f"\nllama-cpp-python on an empty cache adds {seconds[0] - seconds[2]:.0f} s to a fresh machine's install; "
              f"the filled cache saves {seconds[0] - seconds[1]:.0f} s of it on the next run.")


if __name__ == "__main__":
    main()
