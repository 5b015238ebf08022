"""`python train.py [options]`: the same program as `tinyseek train` (see `python train.py --help`), with the same
error handling."""

import sys

from tinyseek.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
