"""What llama.cpp computes from tinyseek's GGUF files, measured: the parity tests of tests/test_gguf.py run with their
measurements printed, and only those lines kept (each test asserts its bound; this reports the values under them).

    python benchmarks/gguf_parity.py           # the F32 logits and greedy, F16/Q8_0 perplexity and top-1 agreement,
                                               # and what each difference from llama.cpp's own converter costs
    python benchmarks/gguf_parity.py --quick   # collect the tests only (to check the script runs)

The two models are the tests' own: an MLA + MoE model (`deepseek2`) and a dense GQA model (`llama`), each trained for
100 steps on the built-in data, llama.cpp through llama-cpp-python with one thread (minutes).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURED = ("test_f32_file", "test_f16_and_q8_0", "test_each_difference_from_llama_cpps_own_converter")
# The lines those tests print: "<model> f32: ...", "<model> f16: ...", "<model> q8_0: ...", "without ...: ...".
PRINTED = re.compile(r"^(?:[\w.-]+ (?:f32|f16|q8_0): |without )")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="collect the tests without running them")
    args = parser.parse_args()
    command = [sys.executable, "-m", "pytest", "tests/test_gguf.py", "-p", "no:cacheprovider", "-q", "-s",
               "-k", " or ".join(MEASURED)]
    if args.quick:
        command.append("--collect-only")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"gguf_parity: the tests failed:\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
    lines = [line.strip() for line in result.stdout.splitlines() if PRINTED.match(line.strip().lstrip("."))]
    if args.quick:
        print(result.stdout.strip().splitlines()[-1])
        return
    for line in lines:
        print(f"- {line.lstrip('.')}")


if __name__ == "__main__":
    main()
