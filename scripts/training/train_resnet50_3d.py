#!/usr/bin/env python
"""The seeds' training script: `python scripts/training/train_resnet50_3d.py --fold 0 ...` = `gliograde train ...`,
with the seeds' protocol (`--selection outer`: epoch and checkpoint chosen on the reported fold) unless
`--selection` is given."""

import sys

from gliograde.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    protocol = [] if any(a == "--selection" or a.startswith("--selection=") for a in argv) else ["--selection", "outer"]
    sys.exit(main(["train", *protocol, *argv]))
