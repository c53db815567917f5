#!/usr/bin/env python
"""The seeds' training script: `python scripts/training/train_resnet50_3d.py --fold 0 ...` = `gliograde train ...`."""

import sys

from gliograde.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
