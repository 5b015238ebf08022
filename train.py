"""`python train.py [options]`: the same program as `tinyseek train` (see `python train.py --help`)."""

import sys

from tinyseek.train.cli import run_script

if __name__ == "__main__":
    sys.exit(run_script())
