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


def write_json(path: str | Path, obj, indent: int = 2, strict: bool = True) -> None:
    """Strict JSON, always: every non-finite float as null (a bare NaN token is not JSON; jq, JavaScript and most
    parsers refuse it). The run records included (metrics.json, attention.json): a reader that does arithmetic on a
    recorded figure turns null back into NaN with `number`. Files written before this rule hold NaN tokens, which
    Python's json reads as the float NaN. `strict` is kept for the callers that name it; False is refused."""
    if not strict:
        raise ValueError("write_json writes strict JSON only (NaN and infinities as null)")
    write_text_atomic(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False))


def number(value) -> float:
    """A recorded figure as a float for arithmetic: null (an undefined metric, written by `write_json`) back to NaN;
    an old file's NaN token is already the float NaN."""
    return math.nan if value is None else float(value)


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
