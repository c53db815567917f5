"""The preprocessed volume cache: written once by `prepare_cache`, opened by `open_cache`.

A cache is a folder:

    volumes.npy     (N, 4, S, S, S) float16, memory-mappable, channels t1, t1ce, t2, flair
    cases.csv       id, grade, label, site, patient (row i = volume i; grade: the class name of the cohort's target)
    geometry.json   per case, how its volume was cut out of the NIfTI grid (to map saliency maps back)
    manifest.json   how it was made: parameters, versions, every source file's size and mtime, time
    folds.json      written beside it by `gliograde.data.splits`

It is built in a temporary sibling folder and renamed into place, so a folder named like a cache is always a
complete one. It is reused only when the parameters, the code version and every source file are unchanged.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gliograde import MODALITIES, __version__
from gliograde.data.brats import Case, Discovery, discover_cases
from gliograde.data.preprocess import DEFAULT_MARGIN, PREPROCESS_VERSION, preprocess_case
from gliograde.data.target import Target
from gliograde.errors import DataError
from gliograde.files import json_safe

VOLUMES, CASES, GEOMETRY, MANIFEST = "volumes.npy", "cases.csv", "geometry.json", "manifest.json"


@dataclass(frozen=True)
class CaseRecord:
    id: str
    grade: str  # the class name (the BraTS grade, or the class of the cohort's target)
    label: int
    site: str
    patient: str = ""  # "": the id (one exam per patient)

    def __post_init__(self):
        if not self.patient:
            object.__setattr__(self, "patient", self.id)


@dataclass
class VolumeCache:
    """An opened cache: `.volumes` is the memory-mapped (N, 4, S, S, S) array, row i belongs to `.cases[i]`."""

    path: Path
    volumes: np.ndarray
    cases: list[CaseRecord]
    modalities: tuple[str, ...]
    manifest: dict

    @property
    def size(self) -> int:
        return int(self.volumes.shape[-1])

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    @property
    def labels(self) -> np.ndarray:
        return np.array([c.label for c in self.cases], dtype=np.int64)

    @property
    def patients(self) -> list[str]:
        return [c.patient for c in self.cases]

    @property
    def target(self) -> Target:
        """The question the labels answer (a cache made before targets existed: the BraTS grade)."""
        return Target.from_dict(self.manifest.get("params", {}).get("target"))

    @property
    def classes(self) -> tuple[str, str]:
        return self.target.classes

    def channels(self, modalities) -> list[int]:
        """Channel indices of the named modalities, in the order given."""
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise DataError(f"cache {self.path} has modalities {list(self.modalities)}, not {unknown}")
        return [self.modalities.index(m) for m in modalities]

    def geometry(self) -> dict:
        return json.loads((self.path / GEOMETRY).read_text())


def open_cache(path: str | Path) -> VolumeCache:
    path = Path(path)
    missing = [n for n in (VOLUMES, CASES, MANIFEST) if not (path / n).is_file()]
    if missing:
        raise DataError(
            f"{path} is not a complete gliograde cache (missing {', '.join(missing)}); "
            "build it with `gliograde prepare --data-root DIR --out DIR`"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        with (path / CASES).open(newline="") as f:
            cases = [CaseRecord(r["id"], r["grade"], int(r["label"]), r["site"], r.get("patient") or "")
                     for r in csv.DictReader(f)]  # fmt: skip
        volumes = np.load(path / VOLUMES, mmap_mode="r")
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cache {path} is unreadable ({type(e).__name__}: {e}); delete it and prepare again") from e
    if volumes.ndim != 5 or volumes.shape[0] != len(cases):
        raise DataError(f"cache {path}: volumes.npy has shape {volumes.shape} for {len(cases)} cases; prepare again")
    return VolumeCache(path, volumes, cases, tuple(manifest["params"]["modalities"]), manifest)


def default_cache_path(data_root: str | Path, size: int, cache_dir: str | Path = "cache") -> Path:
    """Where `prepare` puts a cache when no --out is given: ./cache/<data root name>-s<size> (a cohort table:
    <its name without the suffix>)."""
    path = Path(data_root).expanduser().resolve()
    return Path(cache_dir) / f"{path.stem if path.is_file() else path.name}-s{size}"


def other_caches(data_root: str | Path, cache_dir: str | Path, size: int, target: dict | None = None) -> list[Path]:
    """The caches under cache_dir made from data_root at a size other than `size` (by their manifests), asking the
    same question (`target`: a cohort's, as the manifest records it; None: the BraTS grade), by name."""
    root = Path(data_root).expanduser().resolve()
    found = []
    for manifest in sorted(Path(cache_dir).glob(f"*-s*/{MANIFEST}")):
        try:
            made = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        params = made.get("params") or {}
        if made.get("data_root") == str(root) and params.get("size") != size and params.get("target") == target:
            found.append(manifest.parent)
    return found


def _sources(cases: list[Case], root: Path) -> list[dict]:
    out = []
    for case in cases:
        for path in case.files:
            st = path.stat()
            shown = path.relative_to(root) if path.is_relative_to(root) else path  # a table may name files anywhere
            out.append({"path": str(shown), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def target_params(discovery: Discovery) -> dict | None:
    """The question as a cache's manifest records it; None for the BraTS grade (caches from before targets)."""
    return None if discovery.target.column == "grade" else discovery.target.to_dict()


def _params(size: int, margin: int, skip_incomplete: bool, discovery: Discovery) -> dict:
    params = {
        "size": size,
        "margin": margin,
        "modalities": list(MODALITIES),
        "dtype": "float16",
        "skip_incomplete": skip_incomplete,
        "preprocess_version": PREPROCESS_VERSION,
    }
    # a cohort's question and its patients are part of what the cache holds (the BraTS grade, one exam per patient,
    # adds nothing: caches made before targets existed stay current)
    if target_params(discovery) is not None:
        params["target"] = target_params(discovery)
    if discovery.table is not None:
        params["cohort"] = str(discovery.table)
    return params


def _is_current(path: Path, params: dict, sources: list[dict]) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("params") == params
        and manifest.get("sources") == sources
        and all((path / n).is_file() for n in (VOLUMES, CASES, GEOMETRY))
    )


@dataclass
class PrepareResult:
    path: Path
    reused: bool
    discovery: Discovery
    n_cases: int
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # case id -> error (only with skip_incomplete)

    @property
    def cases_per_s(self) -> float:
        return self.n_cases / self.seconds if self.seconds > 0 else float("nan")


def _work(args) -> tuple[int, dict]:
    """Worker: preprocess case i and write it into slot i of the memory-mapped array."""
    index, case, size, margin, volumes_path = args
    volume, geometry = preprocess_case(case, size, margin)
    out = np.load(volumes_path, mmap_mode="r+")
    out[index] = volume
    out.flush()
    return index, geometry.to_dict()


def _run_parallel(jobs: list, workers: int, progress: bool) -> dict[int, dict | DataError]:
    """Runs `_work` over jobs; returns {index: geometry or the DataError it raised}. Stops at a non-data error."""
    from tqdm.auto import tqdm

    results: dict[int, dict | DataError] = {}
    bar = tqdm(total=len(jobs), desc="prepare", unit="case", disable=not progress)
    if workers <= 1:
        for job in jobs:
            try:
                results[job[0]] = _work(job)[1]
            except DataError as e:
                results[job[0]] = e
            bar.update()
        bar.close()
        return results
    # forkserver: workers start from a clean interpreter, safe even when the caller already runs torch threads
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["gliograde.data.preprocess"])
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_work, job): job[0] for job in jobs}
        try:
            for fut in as_completed(futures):
                try:
                    results[futures[fut]] = fut.result()[1]
                except DataError as e:
                    results[futures[fut]] = e
                bar.update()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    bar.close()
    return results


def prepare_cache(
    data_root: str | Path | Discovery,
    out: str | Path | None = None,
    size: int = 128,
    workers: int | None = None,
    skip_incomplete: bool = False,
    margin: int = DEFAULT_MARGIN,
    progress: bool = True,
) -> PrepareResult:
    """Build (or reuse) the cache of every case under `data_root`, or of the cases a `Discovery` holds (a cohort
    table's, `data.cohort`).

    A case whose files cannot be preprocessed is an error naming the file, or with `skip_incomplete` a
    skipped case listed in `PrepareResult.failed` and in the manifest. Files whose headers are unreadable, whose
    data is truncated or whose grids differ are named by the scan, before any case is preprocessed.
    """
    if size < 8:
        raise DataError(f"--size {size} is too small; use at least 8 (128 is the default)")
    if isinstance(data_root, Discovery):
        discovery, root = data_root, data_root.root
    else:
        root = Path(data_root).expanduser().resolve()
        discovery = discover_cases(root, skip_incomplete=skip_incomplete)  # headers read once a process: cheap again
    out = Path(out) if out is not None else default_cache_path(discovery.table or root, size)
    params, sources = _params(size, margin, skip_incomplete, discovery), _sources(discovery.cases, root)
    if out.exists():
        if _is_current(out, params, sources):
            return PrepareResult(out, True, discovery, len(discovery.cases))
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise DataError(f"{out} exists and is not a gliograde cache; choose another --out or remove it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        cases = discovery.cases
        volumes_path = tmp / VOLUMES
        np.lib.format.open_memmap(
            volumes_path, mode="w+", dtype=np.float16, shape=(len(cases), len(MODALITIES), size, size, size)
        ).flush()
        workers = max(1, min(workers or os.cpu_count() or 1, len(cases)))
        jobs = [(i, c, size, margin, str(volumes_path)) for i, c in enumerate(cases)]
        results = _run_parallel(jobs, workers, progress)
        failed = {cases[i].id: str(r) for i, r in sorted(results.items()) if isinstance(r, DataError)}
        if failed and not skip_incomplete:
            first = next(r for _, r in sorted(results.items()) if isinstance(r, DataError))
            raise DataError(f"{first} (pass --skip-incomplete to leave such cases out)")
        keep = [i for i in range(len(cases)) if i in results and not isinstance(results[i], DataError)]
        if not keep:
            raise DataError(f"no case of {root} could be preprocessed: " + "; ".join(failed.values()))
        if len(keep) < len(cases):  # compact: drop the slots of skipped cases
            full = np.load(volumes_path, mmap_mode="r")
            compact = np.lib.format.open_memmap(
                tmp / "compact.npy", mode="w+", dtype=np.float16, shape=(len(keep), *full.shape[1:])
            )
            for j, i in enumerate(keep):
                compact[j] = full[i]
            compact.flush()
            del full, compact
            os.replace(tmp / "compact.npy", volumes_path)
        kept = [cases[i] for i in keep]
        _write_tables(tmp, kept, {cases[i].id: results[i] for i in keep})
        seconds = time.perf_counter() - start
        manifest = {
            "params": params,
            "sources": sources,
            "data_root": str(root),
            "layout": discovery.layout,
            "patients": len({c.patient for c in kept}),
            "skipped": {**discovery.skipped, **failed},
            "ungraded": discovery.ungraded,
            "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(json_safe(manifest), indent=2, allow_nan=False))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareResult(out, False, discovery, len(kept), seconds, failed)


def _write_tables(folder: Path, cases: list[Case], geometry: dict[str, dict]) -> None:
    with (folder / CASES).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "grade", "label", "site", "patient"])
        writer.writerows([c.id, c.grade, c.label, c.site, c.patient] for c in cases)
    (folder / GEOMETRY).write_text(json.dumps(json_safe(geometry), allow_nan=False))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an older cache there is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict:
    import nibabel
    import torch

    return {
        "gliograde": __version__,
        "nibabel": nibabel.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
