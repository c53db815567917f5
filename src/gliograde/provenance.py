"""What produced a number: hashes of the inputs a run depends on, recorded beside its configuration.

The pretrained weights file (sha256 of its bytes), the volume cache (sha256 of its manifest.json: parameters,
versions and every source file's size and mtime) and the split (sha256 of folds.json's canonical JSON). The code
(git commit, dirty flag), the library versions and the precision are in the environment record (runtime.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def provenance(pretrained_path: str | None, cache_path: Path, folds: dict) -> dict:
    weights = Path(pretrained_path) if pretrained_path else None
    manifest = Path(cache_path) / "manifest.json"
    return {
        "pretrained_weights": str(weights) if weights else None,
        "pretrained_sha256": sha256_file(weights) if weights and weights.is_file() else None,
        "cache_fingerprint": sha256_file(manifest) if manifest.is_file() else None,
        "folds_sha256": sha256_json(folds),
    }
