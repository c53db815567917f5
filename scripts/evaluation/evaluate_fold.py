#!/usr/bin/env python
"""The seeds' standalone evaluation script: `python scripts/evaluation/evaluate_fold.py --run RUN_DIR
[--checkpoint auto|best|best_ema]` = `gliograde evaluate ...`."""

import sys

from gliograde.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
