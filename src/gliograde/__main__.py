"""`python -m gliograde ...`: the same as the `gliograde` command (for a Python without the console script)."""

from gliograde.cli import main

raise SystemExit(main())
