"""Writing outputs: never half a file (write a temporary sibling, then rename), never a folder shared by two runs."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from gliograde.errors import GliogradeError


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=True))


def new_stamped_dir(parent: str | Path, prefix: str) -> Path:
    """parent/PREFIX_YYYYMMDD_HHMMSS, created; with _2, _3, ... when another started in the same second."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    for n in range(1, 1000):
        path = parent / (f"{prefix}_{stamp}" if n == 1 else f"{prefix}_{stamp}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise GliogradeError(f"could not create a new {prefix} folder in {parent}")
