"""Writing outputs: never half a file (write a temporary sibling, then rename), never a folder shared by two runs."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

from gliograde.errors import GliogradeError


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def json_safe(obj):
    """obj with every non-finite float (an undefined metric: NaN, an infinite loss) as None, so that the JSON is
    strict (null), as every JSON reader expects; numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and getattr(obj, "ndim", None):  # numpy arrays
        return json_safe(obj.tolist())
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj, indent: int = 2, strict: bool = False) -> None:
    """`strict`: every non-finite float as null (the reports people and other tools read: summary, compare,
    validation, gpu-check). The run records (metrics.json, attention.json) keep NaN, which Python's json reads back
    as the float that the code computing means and intervals expects."""
    if strict:
        obj = json_safe(obj)
    write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=not strict))


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
