"""Shared fixtures: the nine real BraTS 2018 cases (skipped where absent) and small synthetic sets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the real sample: $GLIOGRADE_SAMPLE_DATA, else ../shared beside the checkout, else this workplace's shared folder
_CANDIDATES = [REPO.parent / "shared" / "data" / "brats2018_sample", Path("/work/shared/data/brats2018_sample")]
SAMPLE = Path(
    os.environ.get("GLIOGRADE_SAMPLE_DATA") or next((c for c in _CANDIDATES if (c / "HGG").is_dir()), _CANDIDATES[0])
)
SAMPLE_HGG = [
    "Brats18_2013_3_1",
    "Brats18_CBICA_ABM_1",
    "Brats18_TCIA01_425_1",
    "Brats18_TCIA02_370_1",
    "Brats18_TCIA03_265_1",
]
SAMPLE_LGG = ["Brats18_TCIA10_628_1", "Brats18_TCIA10_637_1", "Brats18_TCIA10_639_1", "Brats18_TCIA13_623_1"]


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request, monkeypatch):
    """Only tests marked `gpu` may use CUDA: for every other test the GPUs are hidden, from this process (what
    `torch.cuda` reports) and from the processes it starts (DDP ranks, torchrun nodes, fold subprocesses), so that a
    bare `pytest` on a GPU machine runs the CPU tests on the CPU, with deterministic kernels."""
    if request.node.get_closest_marker("gpu") is not None:
        return
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="session")
def sample_root() -> Path:
    if not (SAMPLE / "HGG").is_dir():
        pytest.skip(f"real BraTS sample cases not found at {SAMPLE} (set GLIOGRADE_SAMPLE_DATA to run these tests)")
    return SAMPLE


def copy_case(src_root: Path, case_id: str, dst_root: Path, grade: str | None = None) -> Path:
    """Copy one real case folder (writable copy, for tests that alter files)."""
    grade = grade or ("HGG" if case_id in SAMPLE_HGG else "LGG")
    dst = dst_root / grade / case_id
    shutil.copytree(src_root / grade / case_id, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    dst.chmod(0o755)
    return dst


@pytest.fixture(scope="session")
def real_cache(sample_root, tmp_path_factory):
    """The nine real cases prepared at the full 128^3 size, once per test session."""
    from gliograde.data.cache import open_cache, prepare_cache

    out = tmp_path_factory.mktemp("real") / "cache"
    result = prepare_cache(sample_root, out, size=128, workers=2, progress=False)
    return open_cache(result.path)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic BraTS-like set (24 cases of 48 x 48 x 40 voxels)."""
    from gliograde.data.synthetic import synthesize

    out, _ = synthesize(tmp_path_factory.mktemp("synth") / "data", 24, (48, 48, 40), seed=7, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_cache(synth_root, tmp_path_factory):
    """The synthetic set at 16^3 (5 folds when a test asks for them)."""
    from gliograde.data.cache import open_cache, prepare_cache

    out = tmp_path_factory.mktemp("tiny") / "cache-s16"
    return open_cache(prepare_cache(synth_root, out, size=16, workers=1, progress=False).path)


def tiny(cache, tmp_path, **kw):
    """A cpu-demo configuration shrunk to seconds: 16^3, 3 epochs, batch 4, no worker processes; on the CPU even on
    a machine with a GPU (only tests marked `gpu` use CUDA: they pass device="cuda")."""
    from gliograde.config import resolve

    base = {
        "cache_dir": str(cache.path),
        "size": 16,
        "epochs": 3,
        "batch_size": 4,
        "output_dir": str(tmp_path / "res"),
        "num_workers": 0,
        "min_epochs": 3,
        "device": "cpu",
    }
    return resolve("cpu-demo", **{**base, **kw})


@pytest.fixture(scope="session")
def cv_run(synth_root, tmp_path_factory):
    """A finished 3-fold CV (ResNet-10, 16^3, 2 epochs) on its own cache: (cache, config, summary report)."""
    from gliograde.data.cache import open_cache, prepare_cache
    from gliograde.training.cv import run_cv

    tmp = tmp_path_factory.mktemp("cv")
    cache = open_cache(prepare_cache(synth_root, tmp / "cache-s16", size=16, workers=1, progress=False).path)
    cfg = tiny(cache, tmp, folds=3, epochs=2, min_epochs=2)
    return cache, cfg, run_cv(cfg, [0, 1, 2])
