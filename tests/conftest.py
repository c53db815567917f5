"""Shared fixtures: the nine real BraTS 2018 cases (skipped where absent) and small synthetic sets."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

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


# Fixtures that train: a test that uses one, directly or through another fixture, trains and is marked `slow` (left
# out of `make test-fast`). Whichever test builds the demo first gets its ceiling: ~4 min alone, for a shared machine.
TRAINING_FIXTURES = {"cv_run", "demo_run", "one_process_run", "mil_cv", "focal_run"}
DEMO_TIMEOUT_S = 1800


# Under pytest-xdist (`make test` runs two workers, `--dist loadgroup`) a session fixture is built once per worker that
# asks for it: the tests of each shared trained fixture go to one worker, so that each trains once per session.
# the MIL tests use cv_run and mil_cv together: both in one group, each trained once
# The same for the costly fixtures of one module (a run trained, real cases prepared): once, not once per worker.
SHARED_GROUPS = {"demo_run": "demo", "cv_run": "trained", "mil_cv": "trained", "one_process_run": "ddp",
                 "flat_prepared": "cohort", "real_cache": "real", "idh_cv": "idh", "frozen_run": "frozen",
                 "featured_run": "featured", "focal_run": "focal", "real_small_cache": "real-small"}  # fmt: skip


# The suite's files go to a RAM disk where one has room for them: the tiny folds write ~0.6 GB of checkpoints each,
# and writing them through this machine's disk (ext4) cost a quarter of a tiny fold's time, most of it system CPU
# (`make test`: 427 s -> 394 s on two cores). The measured peak is 8.3 GB (the demo, the CVs and the ViT's checkpoints
# at once): the RAM disk is taken only with twice that free, and a run that fails keeps its folders there as
# anywhere (pytest keeps the last three sessions'). --basetemp or PYTEST_DEBUG_TEMPROOT, when given, decide.
RAM_DISK, RAM_DISK_NEEDS_GIB = Path("/dev/shm"), 16


def _ram_disk_has_room() -> bool:
    try:
        free = os.statvfs(RAM_DISK)
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available_kib = int(meminfo["MemAvailable"].split()[0])
    except (OSError, KeyError, ValueError):
        return False
    return min(free.f_bavail * free.f_frsize, available_kib * 1024) >= RAM_DISK_NEEDS_GIB * 2**30


def pytest_configure(config):
    """Each xdist worker gets its share of the cores, for torch here and for the processes it starts: two workers
    with two threads each on two cores would thrash. The temporary folders go to the RAM disk when it has room
    (before pytest makes its base folder, which the workers are given)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not (worker or config.option.basetemp or "PYTEST_DEBUG_TEMPROOT" in os.environ) and _ram_disk_has_room():
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(RAM_DISK)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = threads
        import torch

        torch.set_num_threads(int(threads))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(items):
    # the longest groups first (the demo's ~2 min, then the CVs), then the other tests that train, then the rest: no
    # worker starts a long test when the others are nearly done, and the short ones fill the end; the order within
    # each stays the collection's
    order = {g: i for i, g in enumerate(dict.fromkeys(SHARED_GROUPS.values()))}
    rank = {}
    for item in items:
        trains = TRAINING_FIXTURES.intersection(item.fixturenames)
        if trains:
            item.add_marker(pytest.mark.slow)
        if "demo_run" in trains:
            item.add_marker(pytest.mark.timeout(DEMO_TIMEOUT_S))
        group = next((g for name, g in SHARED_GROUPS.items() if name in item.fixturenames), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        rank[item.nodeid] = (order.get(group, len(order)), item.get_closest_marker("slow") is None)
    items[:] = sorted(items, key=lambda item: rank[item.nodeid])


@contextlib.contextmanager
def _training_refused(item):
    """The inner loop (`-m "not slow"`) never trains: an epoch started in this process while a test without the `slow`
    mark sets up (its fixtures included) or runs fails it, naming the mark (training in a subprocess is marked by
    hand)."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    from unittest import mock

    from gliograde.training import trainer

    def refuse(*args, **kwargs):
        raise AssertionError(f"{item.nodeid} trains: mark it @pytest.mark.slow")

    with mock.patch.object(trainer, "train_epoch", refuse):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _training_refused(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _training_refused(item):
        yield


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


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> Path:
    """Twelve phantoms, half of synth_root, for folds that prove plumbing, not learning (3 folds: 5 need more LGG)."""
    from gliograde.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("small") / "data", 12, (48, 48, 40), seed=7, workers=1, progress=False)[0]


@pytest.fixture(scope="session")
def small_cache(small_root, tmp_path_factory):
    """The twelve phantoms at 16^3."""
    from gliograde.data.cache import open_cache, prepare_cache

    out = tmp_path_factory.mktemp("small") / "cache-s16"
    return open_cache(prepare_cache(small_root, out, size=16, workers=1, progress=False).path)


def tiny(cache, tmp_path, **kw):
    """A cpu-demo configuration shrunk to seconds: 16^3, 3 epochs, batch 4, no worker processes, the final plots only
    (half a tiny fold's CPU went to per-epoch figures; the demo's folds draw every epoch's); on the CPU even on a
    machine with a GPU (only tests marked `gpu` use CUDA: they pass device="cuda")."""
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
        "plots_every": 0,
    }
    return resolve("cpu-demo", **{**base, **kw})


def fake_run(results, fold, k, ids, labels, probs, *, repeat=0, stamp="20260101_000000", status="complete",
             final=None, metrics=None, config=None) -> Path:  # fmt: skip
    """A run folder as the trainer leaves it (runs/[repeat_r/]fold_f/run_<stamp>) with given validation predictions,
    without training: metrics.json (`final`: these predictions' metrics unless given; `metrics`: more keys of the
    record), config.json ({**config, fold, folds}) and predictions/. The one builder of fake runs of every test."""
    import json

    import numpy as np

    from gliograde.evaluation.metrics import compute_metrics

    run = results / "runs" / (f"repeat_{repeat}" if repeat else "") / f"fold_{fold}" / f"run_{stamp}"
    for sub in ("metrics", "config", "predictions", "checkpoints"):
        (run / sub).mkdir(parents=True)
    if final is None:
        final = {**compute_metrics(labels, probs), "best_epoch": 3, "checkpoint": "best.pt"}
    record = {"status": status, "fold": fold, "final": final if status == "complete" else None, "history": []}
    (run / "metrics" / "metrics.json").write_text(json.dumps({**record, **(metrics or {})}))
    (run / "config" / "config.json").write_text(json.dumps({"config": {**(config or {}), "fold": fold, "folds": k}}))
    np.save(run / "predictions" / "val_labels.npy", np.asarray(labels))
    np.save(run / "predictions" / "val_probs.npy", np.asarray(probs))
    (run / "predictions" / "val_ids.json").write_text(json.dumps(list(ids)))
    return run


# the one-process run DDP must reproduce: --batch-size 2 --gradient-accumulation-steps 2 (a global batch of 4)
DDP_REFERENCE = {"data_path": "device", "dropout": 0.0, "epochs": 2, "min_epochs": 2, "patience": 5, "batch_size": 2,
                 "grad_accum": 2}  # fmt: skip


@pytest.fixture(scope="session")
def one_process_run(tiny_cache, tmp_path_factory):
    """DDP_REFERENCE trained in this process, once: what the gloo ranks and the torchrun nodes are compared with."""
    from gliograde.training.trainer import train_fold

    return train_fold(tiny(tiny_cache, tmp_path_factory.mktemp("one"), **DDP_REFERENCE))


@pytest.fixture(scope="session")
def cv_run(synth_root, tmp_path_factory):
    """A finished 3-fold CV (ResNet-10, 16^3, 2 epochs) on its own cache: (cache, config, summary report)."""
    from gliograde.data.cache import open_cache, prepare_cache
    from gliograde.training.cv import run_cv

    tmp = tmp_path_factory.mktemp("cv")
    cache = open_cache(prepare_cache(synth_root, tmp / "cache-s16", size=16, workers=1, progress=False).path)
    cfg = tiny(cache, tmp, folds=3, epochs=2, min_epochs=2)
    return cache, cfg, run_cv(cfg, [0, 1, 2])


@contextlib.contextmanager
def logged(name: str = "gliograde", level: int = logging.INFO):
    """What logger `name` logs at `level` and above inside the block: caplog for a session fixture."""
    stream, logger = io.StringIO(), logging.getLogger(name)
    handler, before = logging.StreamHandler(stream), logger.level
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's first command, `gliograde demo`, once per session at its own size (60 phantoms of 64 x 64 x 48,
    a 5-fold CV of the cpu-demo preset: ResNet-10 at 32^3, 12 epochs): its folders, exit code, what it printed and
    logged, and the prediction folders it left (listed before any test runs it again)."""
    from gliograde.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    with contextlib.redirect_stdout(io.StringIO()) as printed, logged() as log:
        rc = main(["demo", "--out", str(out), "--workers", "2"])
    results, predictions = out / "results" / "ResNet10-3D", out / "predictions"
    return SimpleNamespace(rc=rc, out=out, results=results, runs=sorted(results.glob("runs/fold_*/run_*")),
                           printed=printed.getvalue(), logged=log.getvalue(),
                           predictions=sorted(predictions.iterdir()) if predictions.is_dir() else [])  # fmt: skip
