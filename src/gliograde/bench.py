"""`gliograde bench`: the seeds' data pipeline against the fast path, side by side, on one synthetic cache.

Baseline: a DataLoader over the memory-mapped cache with MONAI per-sample transforms (axis flips, RandAffine, channel-
wise intensity scale and shift) in worker processes (pinned memory, persistent workers, prefetch 4), as a MONAI user
writes it. Fast: the volumes held beside the model, batches gathered by index and augmented in one grid_sample.
Both feed the same train step (same network, AMP/channels_last/fused Adam on a GPU). Measured for each: volumes/s of
data delivery alone and of the full train step, the share of step time spent waiting for data, peak memory; on a
GPU also TFLOP/s and MFU. Plus preprocessing: the parallel cache writer against a sequential loop over the cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from gliograde import __version__
from gliograde.config import network_name
from gliograde.data.augment import AugmentParams
from gliograde.data.brats import discover_cases
from gliograde.data.cache import VolumeCache, open_cache, prepare_cache
from gliograde.data.device_path import DeviceStream, DeviceVolumes
from gliograde.data.loader_path import CacheDataset, default_workers, inverse_frequency_weights
from gliograde.data.preprocess import preprocess_case
from gliograde.data.synthetic import synthesize
from gliograde.errors import GliogradeError
from gliograde.files import write_json
from gliograde.networks import describe_model
from gliograde.networks.profile import profile_description, profile_model
from gliograde.networks.resnet3d import ResNet3D

OTHER_CPU_SIZE = 32  # bench --trainer --model NAME on the CPU: an edge every network takes, small enough for minutes
# dense bf16 tensor peak (no sparsity), by device name, for MFU
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


@dataclass
class BenchConfig:
    device: str
    depth: int
    layout: str
    size: int
    channels: int
    batch_size: int
    steps: int
    warmup: int
    cases: int
    workers: int
    preprocess_cases: int = 0  # 0 = four per core, at least 8
    preprocess_shape: tuple[int, int, int] = (240, 240, 155)  # the BraTS grid


def defaults(device: str) -> dict:
    """A ResNet50-3D at 128^3 on a GPU; something a 2-core machine finishes in a minute or two on the CPU."""
    if device == "cuda":
        return {"depth": 50, "size": 128, "batch_size": 8, "steps": 30, "cases": 64}
    return {"depth": 10, "size": 48, "batch_size": 4, "steps": 10, "cases": 24}


def bench_device(asked: str | None) -> str:
    """--device: the GPU where CUDA works unless one is named; cuda named without CUDA is refused."""
    device = asked or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise GliogradeError("--device cuda: CUDA is not available (CPU build of torch, or no GPU)")
    return device


def bench_config(
    device: str,
    depth: int | None = None,
    layout: str = "strided",
    size: int | None = None,
    channels: int = 4,
    batch_size: int | None = None,
    steps: int | None = None,
    warmup: int = 3,
    cases: int | None = None,
    workers: int | None = None,
    preprocess_cases: int = 0,
    preprocess_shape=(240, 240, 155),
) -> BenchConfig:
    """The data-path benchmark's settings: what is not given (None) takes the device's default (`defaults`; workers:
    `default_workers()`). Too few cases for two batches is refused."""
    d = defaults(device)
    cfg = BenchConfig(
        device=device,
        depth=depth or d["depth"],
        layout=layout,
        size=size or d["size"],
        channels=channels,
        batch_size=batch_size or d["batch_size"],
        steps=steps or d["steps"],
        warmup=warmup,
        cases=cases or d["cases"],
        workers=default_workers() if workers is None else workers,
        preprocess_cases=preprocess_cases,
        preprocess_shape=tuple(preprocess_shape),
    )
    if cfg.cases < 2 * cfg.batch_size:
        raise GliogradeError(f"--cases {cfg.cases} is too few for batches of {cfg.batch_size}")
    return cfg


# -------------------------------------------------------------------------------------------- measurement aids
class PeakRss:
    """Peak resident memory of this process plus its children (DataLoader workers), sampled every 20 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                out += [int(c) for c in task.read_text().split()]
        return out

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            pids, todo = [], [me]
            while todo:
                pid = todo.pop()
                pids.append(pid)
                todo += self._children(pid)
            self.peak = max(self.peak, sum(self._rss(p) for p in pids))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class MonaiAugmented(Dataset):
    """Per-sample MONAI transforms of the same families and ranges as the fast path, run in the workers."""

    def __init__(self, base: CacheDataset, p: AugmentParams):
        from monai.transforms import Compose, RandAffine, RandFlip, RandScaleIntensity, RandShiftIntensity

        self.base = base
        rad = math.radians(p.rotate_deg)
        self.transform = Compose(
            [
                *(RandFlip(prob=p.flip_prob, spatial_axis=a) for a in range(3)),
                RandAffine(prob=1.0, rotate_range=(rad,) * 3, scale_range=(p.scale_range,) * 3, padding_mode="zeros"),
                RandScaleIntensity(factors=p.intensity_scale, prob=1.0, channel_wise=True),
                RandShiftIntensity(offsets=p.intensity_shift, prob=1.0, channel_wise=True),
            ]
        )

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return torch.as_tensor(self.transform(x)).float(), y


# ---------------------------------------------------------------------------------------------------- pipelines
def baseline_batches(cache: VolumeCache, rows, cfg: BenchConfig, device: torch.device):
    dataset = MonaiAugmented(CacheDataset(cache, rows, list(range(cfg.channels))), AugmentParams.from_config(cfg))
    sampler = WeightedRandomSampler(inverse_frequency_weights(dataset.base.labels), 10**6, replacement=True)
    extra = {"persistent_workers": True, "prefetch_factor": 4} if cfg.workers > 0 else {}
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        **extra,
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def fast_batches(cache: VolumeCache, rows, cfg: BenchConfig, device: torch.device):
    volumes = DeviceVolumes(cache, rows, list(range(cfg.channels)), device)
    augment = AugmentParams.from_config(cfg)  # a bench configuration names none: the training defaults
    stream = DeviceStream(volumes, cfg.batch_size, "weighted", torch.Generator().manual_seed(0), augment)
    while True:
        yield from stream


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(make_batches, cfg: BenchConfig, device: torch.device, model_parts) -> dict:
    """Data alone, then data + train step; waits are host time blocked on the next batch (GPU synchronized)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, optimizer, loss_fn, dtype, channels_last = model_parts
    with PeakRss() as rss:
        batches = make_batches()
        # warm-up: worker start-up, first copies; and drain what the workers prefetched meanwhile (workers x 4
        # batches), so that the rate measured next is the steady one, not the read-out of a full queue
        for _ in range(cfg.warmup + 4 * cfg.workers):
            next(batches)
        sync(device)
        data_steps = 5 * cfg.steps  # delivery alone is cheap to measure: a longer window, a steadier figure
        t0 = time.perf_counter()
        for _ in range(data_steps):
            next(batches)
        sync(device)
        data_s = time.perf_counter() - t0

        def step(x, y):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(max(cfg.warmup, 2)):  # cudnn benchmark picks its kernels here
            step(*next(batches))
        sync(device)
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            w = time.perf_counter()
            x, y = next(batches)
            sync(device)
            wait += time.perf_counter() - w
            step(x, y)
            sync(device)
        train_s = time.perf_counter() - t0
        batches.close()
    n = cfg.steps * cfg.batch_size
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "data_vols_per_s": data_steps * cfg.batch_size / data_s,
        "train_vols_per_s": n / train_s,
        "data_wait_fraction": wait / train_s,
        "peak_mem_bytes": gpu_peak if gpu_peak is not None else rss.peak,
        "peak_host_rss_bytes": rss.peak,
        "peak_gpu_bytes": gpu_peak,
    }


def preprocessing(work: Path, cfg: BenchConfig) -> dict:
    """Cases/s of preparing BraTS-sized cases: a plain sequential loop against the parallel cache writer."""
    workers = os.cpu_count() or 1
    n = cfg.preprocess_cases or max(8, 4 * workers)  # enough cases to amortize the workers' start-up
    data, _ = synthesize(work / "preprocess-data", n, cfg.preprocess_shape, seed=1, progress=False)
    cases = discover_cases(data).cases
    t0 = time.perf_counter()
    for case in cases:  # the plain loop: one process, case after case
        preprocess_case(case, cfg.size)
    sequential = len(cases) / (time.perf_counter() - t0)
    result = prepare_cache(data, work / "preprocess-cache", size=cfg.size, workers=workers, progress=False)
    return {
        "cases": len(cases),
        "shape": list(cfg.preprocess_shape),
        "sequential_cases_per_s": sequential,
        "parallel_cases_per_s": result.cases_per_s,
        "workers": workers,
        "speedup": result.cases_per_s / sequential,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def run_bench(cfg: BenchConfig, workdir: Path | None = None, log=print) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tmp = tempfile.TemporaryDirectory(prefix="gliograde-bench-") if workdir is None else None
    work = Path(tmp.name if tmp else workdir)
    try:
        shape = (round(cfg.size * 1.25), round(cfg.size * 1.25), cfg.size)
        log(f"synthesizing {cfg.cases} cases of {shape} voxels for the data pipelines ...")
        data, _ = synthesize(work / "data", cfg.cases, shape, seed=0, progress=False)
        cache = open_cache(prepare_cache(data, work / "cache", size=cfg.size, progress=False).path)
        log(f"preprocessing {cfg.preprocess_shape} cases: a sequential loop against the parallel cache writer ...")
        pre = preprocessing(work, cfg)
        rows = np.arange(len(cache.ids))

        torch.manual_seed(0)
        model = ResNet3D(cfg.depth, cfg.channels, 2, "B", cfg.layout).to(device)
        channels_last = device.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        fused = True if device.type == "cuda" else None
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused)
        dtype = torch.bfloat16 if device.type == "cuda" else None
        parts = (model.train(), optimizer, torch.nn.CrossEntropyLoss(), dtype, channels_last)
        results = {}
        for name, make in (("baseline", baseline_batches), ("fast", fast_batches)):
            log(f"{name}: {cfg.steps} batches of {cfg.batch_size} x {cfg.channels} x {cfg.size}^3 ...")
            results[name] = measure(lambda make=make: make(cache, rows, cfg, device), cfg, device, parts)

        gflop = profile_model(model, cfg.channels, cfg.size).gflop_train
        peak = peak_tflops(device_name(device)) if device.type == "cuda" else None
        for r in results.values():
            r["tflops"] = r["train_vols_per_s"] * gflop / 1e3
            r["mfu"] = r["tflops"] / peak if peak else None
        return {
            "device": device_name(device),
            "torch": torch.__version__,
            "gliograde": __version__,
            "config": cfg.__dict__,
            "gflop_per_volume_train": gflop,
            "peak_bf16_tflops": peak,
            "preprocess": pre,
            "baseline": results["baseline"],
            "fast": results["fast"],
            "speedup": {
                "data": results["fast"]["data_vols_per_s"] / results["baseline"]["data_vols_per_s"],
                "train": results["fast"]["train_vols_per_s"] / results["baseline"]["train_vols_per_s"],
            },
        }
    finally:
        if tmp:
            tmp.cleanup()


def table(report: dict) -> str:
    b, f, s, p = report["baseline"], report["fast"], report["speedup"], report["preprocess"]

    def mem(x):
        return "n/a" if x is None else f"{x / 2**30:.2f} GiB"

    def opt(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    rows = [
        ("", "baseline (DataLoader+MONAI)", "fast (on-device)", "fast / baseline"),
        ("data, volumes/s", f"{b['data_vols_per_s']:.1f}", f"{f['data_vols_per_s']:.1f}", f"{s['data']:.2f}x"),
        ("train step, volumes/s", f"{b['train_vols_per_s']:.1f}", f"{f['train_vols_per_s']:.1f}", f"{s['train']:.2f}x"),
        ("waiting for data", f"{b['data_wait_fraction']:.1%}", f"{f['data_wait_fraction']:.1%}", ""),
        ("peak memory", mem(b["peak_mem_bytes"]), mem(f["peak_mem_bytes"]), ""),
        ("TFLOP/s", f"{b['tflops']:.2f}", f"{f['tflops']:.2f}", ""),
        ("MFU (bf16 peak)", opt(b["mfu"], ".1%"), opt(f["mfu"], ".1%"), ""),
        (
            "preprocess, cases/s",
            f"{p['sequential_cases_per_s']:.2f} (sequential)",
            f"{p['parallel_cases_per_s']:.2f} ({p['workers']} workers)",
            f"{p['speedup']:.2f}x",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    c = report["config"]
    head = (
        f"{report['device']} | torch {report['torch']} | ResNet{c['depth']}-3D {c['layout']}, "
        f"batch {c['batch_size']} x {c['channels']} x {c['size']}^3, {c['steps']} steps, {c['workers']} loader workers"
    )
    lines = [head] + ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)


# ------------------------------------------------------------------------------------- the real training loop
CV_CASES, CV_FOLDS, CV_EPOCHS = 285, 5, 50  # BraTS 2018 (210 HGG + 75 LGG), the seeds' protocol


def _mil_trainer_figures(cfg, size, work: Path, n_val: int, train_rate: float, cv_train: int, cv_val: int, log) -> dict:
    """The 2D MIL model (ResNet18-2D over min(16, size) slices) timed by `train_fold` on the same cache and settings."""
    from gliograde.training.trainer import train_fold

    k = min(16, size)
    log(f"train_fold: MIL ResNet18-2D over {k} slices, same cache and settings ...")
    mcfg = dataclasses.replace(cfg, model="mil2d", depth=18, mil_k=k, output_dir=str(work / "results-mil"))
    mh = train_fold(mcfg).history
    msteady = mh[1:] or mh
    mil_rate = float(np.mean([h["train_volumes_per_s"] for h in msteady]))
    mil_val = float(np.mean([h["val_time_s"] for h in msteady])) / max(n_val, 1)
    mpeaks = [h["peak_gpu_memory_gib"] for h in mh if h["peak_gpu_memory_gib"] is not None]
    return {
        "model": f"MIL ResNet18-2D, {k} slices, {mcfg.mil_pooling} pooling",
        "train_volumes_per_s": mil_rate,
        "data_wait_fraction": float(np.mean([h["data_wait_fraction"] for h in msteady])),
        "epoch_time_s": float(np.mean([h["epoch_time_s"] for h in msteady])),
        "peak_gpu_memory_gib": max(mpeaks) if mpeaks else None,
        "projected_cv_s": CV_FOLDS * CV_EPOCHS * (cv_train / mil_rate + cv_val * mil_val),
        "speed_vs_3d": mil_rate / train_rate,
    }


def run_trainer_bench(
    device: str,
    depth: int | None = None,
    size: int | None = None,
    batch_size: int | None = None,
    channels: int = 4,
    epochs: int | None = None,
    cases: int | None = None,
    preset: str = "final",
    workdir: Path | None = None,
    log=print,
    mil: bool = True,
    min_steps: int = 20,
    model: str = "resnet3d",
) -> dict:
    """Time `train_fold` itself (not a copy of its loop) on a synthetic cache: per-epoch volumes/s, data-wait
    fraction, peak memory and epoch time from the run's own metrics.json history, MFU from the model's FLOP count
    and the device's stated peak, and the projected wall time of a 5-fold x 50-epoch CV on 285 cases. The first
    epoch (cuDNN autotuning, torch.compile) is reported apart and left out of the steady-state figures, which cover
    at least `min_steps` optimizer steps (epochs are added until they do). Accumulation 1: every micro-batch is a
    step. The activation peak is reported apart from what stays resident (volumes on the device, weights, optimizer
    state). `mil`: also time the 2D MIL model (ResNet18-2D over min(16, size) slices) on the same cache. `model`:
    another network of the architecture table, timed beside the ResNet-50 baseline on the same cache and settings
    (`baseline`, `speed_vs_baseline`; no MIL figures), on the CPU at 32^3 unless --size says (a size every network
    takes: a ViT's patch 16, a Swin's 32). What is not given (None) takes the device's default (`defaults`; epochs:
    3)."""
    d = defaults(device)
    other = model != "resnet3d"
    if other:  # the baseline is the seeds' ResNet-50, whatever the device's default depth
        depth, d = 50, {**d, "size": d["size"] if device == "cuda" else OTHER_CPU_SIZE}
    depth, size, batch_size, cases = (depth or d["depth"], size or d["size"], batch_size or d["batch_size"],
                                      cases or d["cases"])  # fmt: skip
    tmp = tempfile.TemporaryDirectory(prefix="gliograde-bench-trainer-") if workdir is None else None
    work = Path(tmp.name if tmp else workdir)
    try:
        cache = _bench_cache(work, size, cases, log)
        timed = partial(_train_timed_fold, work, cache, device, size=size, batch_size=batch_size, channels=channels,
                        epochs=epochs or 3, preset=preset, min_steps=min_steps, log=log)  # fmt: skip
        cfg, result = timed(model=model, depth=None if other else depth)
        n_val = len(json.loads((result.run_dir / "predictions" / "val_ids.json").read_text()))
        figures = _trainer_figures(cfg, result, channels, batch_size, n_val)
        cv_train, cv_val = CV_CASES * (CV_FOLDS - 1) // CV_FOLDS, CV_CASES // CV_FOLDS
        train_rate = figures["train_volumes_per_s"]
        mil_figures = None
        if mil and not other:
            mil_figures = _mil_trainer_figures(cfg, size, work, n_val, train_rate, cv_train, cv_val, log)
        settings = {"depth": depth, "size": size, "batch_size": batch_size, "channels": channels,
                    "epochs": cfg.epochs, "cases": cases, "preset": preset}  # fmt: skip
        name = device_name(torch.device("cuda" if device == "cuda" else "cpu"))
        report = {"mil2d": mil_figures, "device": name, "torch": torch.__version__, "gliograde": __version__,
                  "config": settings, **figures}  # fmt: skip
        if other:
            bcfg, bresult = timed(model="resnet3d", depth=depth, output="results-baseline")
            baseline = {"network": network_name("resnet3d", depth),
                        **_trainer_figures(bcfg, bresult, channels, batch_size, n_val)}  # fmt: skip
            report.update(model=model, network=network_name(model, depth), baseline=baseline,
                          speed_vs_baseline=train_rate / baseline["train_volumes_per_s"])  # fmt: skip
        return report
    finally:
        if tmp:
            tmp.cleanup()


def _bench_cache(work: Path, size: int, cases: int, log) -> VolumeCache:
    """The synthetic cache every timed fold of one bench trains on."""
    shape = (round(size * 1.25), round(size * 1.25), size)
    log(f"synthesizing {cases} cases of {shape} voxels ...")
    data, _ = synthesize(work / "data", cases, shape, seed=0, progress=False)
    return open_cache(prepare_cache(data, work / "cache", size=size, progress=False).path)


def _train_timed_fold(work: Path, cache: VolumeCache, device: str, *, model: str, depth: int | None, size: int,
                      batch_size: int, channels: int, epochs: int, preset: str, min_steps: int, log,
                      output: str = "results"):  # fmt: skip
    """Fold 0 of the cache trained by `train_fold` with early stopping, warm-up and plots out of the way; epochs
    added until the steady state holds `min_steps` optimizer steps. Returns (configuration, result)."""
    from gliograde import MODALITIES
    from gliograde.config import check_config, resolve
    from gliograde.training.trainer import train_fold

    per_epoch = max(1, int(len(cache.ids) * 0.8 * 0.8) // batch_size)  # the fit part of fold 0 (inner selection)
    epochs = max(epochs, 1 + math.ceil(min_steps / per_epoch))
    cfg = resolve(
        preset,
        device=device,
        model=model,
        depth=depth,
        size=size,
        batch_size=batch_size,
        grad_accum=1,
        modalities=list(MODALITIES[-channels:]),
        epochs=epochs,
        min_epochs=epochs,
        patience=epochs + 1,
        warmup_epochs=0,
        cache_dir=str(cache.path),
        output_dir=str(work / output),
        plots_every=0,  # no per-epoch figures (a best epoch drew five on a thread beside the timed loop)
        pretrained_path="",
    )
    check_config(cfg)  # a size the network cannot take: one line before anything trains
    name = network_name(cfg.model, cfg.depth)
    log(f"train_fold: {name}, {channels} x {size}^3, batch {batch_size}, {epochs} epochs on {device} ...")
    return cfg, train_fold(cfg)


def _trainer_figures(cfg, result, channels: int, batch_size: int, n_val: int) -> dict:
    """The figures of a timed fold (`n_val` cases scored each epoch), from its metrics.json history and config.json."""
    history = result.history
    config = json.loads((result.run_dir / "config" / "config.json").read_text())
    steady = history[1:] or history
    train_rate = float(np.mean([h["train_volumes_per_s"] for h in steady]))
    val_per_case = float(np.mean([h["val_time_s"] for h in steady])) / max(n_val, 1)
    gflop = profile_description(describe_model(cfg, channels), cfg.size).gflop_train
    peak = peak_tflops(device_name(torch.device("cuda"))) if cfg.device == "cuda" else None
    tflops = train_rate * gflop / 1e3
    cv_train, cv_val = CV_CASES * (CV_FOLDS - 1) // CV_FOLDS, CV_CASES // CV_FOLDS
    peaks = [h["peak_gpu_memory_gib"] for h in history if h["peak_gpu_memory_gib"] is not None]
    resident = [h["resident_gpu_memory_gib"] for h in steady if h.get("resident_gpu_memory_gib") is not None]
    activation = [h["peak_gpu_memory_gib"] - h["resident_gpu_memory_gib"] for h in steady
                  if h.get("resident_gpu_memory_gib") is not None]  # fmt: skip
    return {
        "precision": config["environment"]["precision"],
        "first_epoch_s": history[0]["epoch_time_s"],
        "train_volumes_per_s": train_rate,
        "data_wait_fraction": float(np.mean([h["data_wait_fraction"] for h in steady])),
        "epoch_time_s": float(np.mean([h["epoch_time_s"] for h in steady])),
        "val_s_per_case": val_per_case,
        "peak_gpu_memory_gib": max(peaks) if peaks else None,
        "resident_gpu_memory_gib": max(resident) if resident else None,
        "activation_peak_gib": max(activation) if activation else None,
        "steady_optimizer_steps": sum(round(h["train_volumes_per_s"] * h["train_time_s"]) for h in steady)
        // batch_size,
        "gflop_per_volume_train": gflop,
        "tflops": tflops,
        "peak_bf16_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "projected_cv_s": CV_FOLDS * CV_EPOCHS * (cv_train / train_rate + cv_val * val_per_case),
        "projected_cv": f"{CV_FOLDS}-fold x {CV_EPOCHS} epochs on {CV_CASES} cases",
        "targets": {"train_volumes_per_s": 300, "data_wait_fraction": 0.02, "mfu": 0.30, "activation_peak_gib": 12},
    }


def trainer_table(r: dict) -> str:
    def opt(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    c = r["config"]
    network = r.get("network") or f"ResNet{c['depth']}-3D"
    rows = [
        f"gliograde bench --trainer: {r['device']}, torch {r['torch']}, precision {r['precision']['name']}",
        f"  {network}, {c['channels']} x {c['size']}^3, batch {c['batch_size']}, {c['epochs']} epochs, "
        f"{c['cases']} cases ({c['preset']} preset)",
        f"  train volumes/s        {r['train_volumes_per_s']:.1f}   (target on one H100: >= 300)",
        f"  data wait              {100 * r['data_wait_fraction']:.1f} %   (target < 2 %)",
        f"  TFLOP/s, MFU           {r['tflops']:.2f}, {opt(r['mfu'] and 100 * r['mfu'], '.1f')} %   (target >= 30 %)",
        f"  activation peak        {opt(r.get('activation_peak_gib'), '.2f')} GiB   (target <= 12 GB at batch 8; "
        f"resident {opt(r.get('resident_gpu_memory_gib'), '.2f')}, total peak {opt(r['peak_gpu_memory_gib'], '.2f')})",
        f"  steady state           {r.get('steady_optimizer_steps')} optimizer steps, accumulation 1",
        f"  epoch time             {r['epoch_time_s']:.1f} s (first epoch {r['first_epoch_s']:.1f} s)",
        f"  projected CV           {r['projected_cv_s'] / 60:.1f} min for a {r['projected_cv']}",
    ]
    b = r.get("baseline")
    if b:
        rows.append(
            f"  beside {b['network']} (same cache and settings): {b['train_volumes_per_s']:.1f} train volumes/s, "
            f"{b['tflops']:.2f} TFLOP/s, epoch {b['epoch_time_s']:.1f} s, projected CV {b['projected_cv_s'] / 60:.1f} "
            f"min; {network} trains at {r['speed_vs_baseline']:.2f}x its speed"
        )
    m = r.get("mil2d")
    if m:
        rows.append(
            f"  {m['model']}: {m['train_volumes_per_s']:.1f} train volumes/s ({m['speed_vs_3d']:.2f}x the 3D model), "
            f"epoch {m['epoch_time_s']:.1f} s, projected CV {m['projected_cv_s'] / 60:.1f} min"
        )
    return "\n".join(rows)
