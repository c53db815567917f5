"""`gliograde demo`: the embedded default job on a synthetic BraTS-like set, end to end on the CPU in minutes.

Synthesize phantoms -> prepare a 32^3 cache and 5 folds -> a 5-fold CV with the cpu-demo preset -> predict two new
phantoms with the fold ensemble (flip TTA, Grad-CAM). Each step reuses what a previous demo in the same folder left
(the data, the cache, every complete fold); the predictions go to a new folder each time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gliograde")

SHAPE = (64, 64, 48)  # voxels of the phantoms: small enough for a CPU, large enough for a brain and a tumour
SIZE = 32  # edge of the cached volumes
NEW_CASES_SEED = 2024


@dataclass
class DemoResult:
    report: dict  # the CV summary (summary.json)
    records: list[dict]  # the predictions of the new cases
    outputs: list[tuple[str, str]]  # (what, where) of everything the demo wrote
    seconds: float


def run_demo(out: str | Path, cases: int = 60, workers: int | None = None) -> DemoResult:
    """Run the four steps into `out`; logs each step, returns what the command prints."""
    from gliograde.config import resolve
    from gliograde.data.brats import discover_cases
    from gliograde.data.source import prepare_and_split
    from gliograde.data.splits import SplitSpec
    from gliograde.data.synthetic import synthesize
    from gliograde.inference.predict import load_ensemble, output_dir, predict_cases
    from gliograde.training.cv import run_cv

    out = Path(out)
    start = time.perf_counter()
    log.info("[1/4] synthesizing %d BraTS-like cases (%s voxels, NIfTI, BraTS 2018 layout) ...", cases,
             " x ".join(map(str, SHAPE)))  # fmt: skip
    data, reused = synthesize(out / "data", cases, SHAPE, seed=42, workers=workers)
    log.info("      %s %s", "reused" if reused else "wrote", data)
    log.info("[2/4] preprocessing to a %d^3 cache and writing 5 stratified folds ...", SIZE)
    cache, _ = prepare_and_split(data, out / "cache", SIZE, workers, False, SplitSpec(k=5, seed=42))
    results = out / resolve("cpu-demo").output_dir  # results/ResNet10-3D: the folder follows the network
    log.info("[3/4] 5-fold cross-validation with the cpu-demo preset (ResNet10-3D, 4 channels, %d^3) ...", SIZE)
    report = run_cv(resolve("cpu-demo", cache_dir=str(cache.path), output_dir=str(results)))
    log.info("[4/4] two new synthetic patients (never seen in training): 5-fold ensemble, flip TTA, Grad-CAM ...")
    new, _ = synthesize(out / "new_cases", 2, SHAPE, seed=NEW_CASES_SEED, workers=1, first_index=cases)
    members = load_ensemble([results])
    pred_dir = output_dir(None, out / "predictions")
    records = predict_cases(discover_cases(new).cases, members, pred_dir, tta=True, saliency=True)
    outputs = demo_outputs(data, cache.path, report, new, pred_dir)
    return DemoResult(report, records, outputs, time.perf_counter() - start)


def demo_outputs(data: Path, cache: Path, report: dict, new: Path, pred_dir: Path) -> list[tuple[str, str]]:
    """The demo's closing list: (what, where) of everything it wrote, the CV's figures as the summary made them."""
    results = Path(report["results_dir"])
    return [
        ("synthetic BraTS folder", str(data)),
        ("volume cache + folds", f"{cache} (volumes.npy, cases.csv, manifest.json, folds.json)"),
        ("fold run folders", str(results / "runs" / "fold_*")),
        ("CV summary", f"{results / 'summary.md'} (.csv, .json)"),
        ("CV report (one page)", str(Path(report.get("report_html") or results / "report.html"))),
        ("CV figures", f"{', '.join(Path(f).name for f in report['figures'])} (in {results})"),
        ("new cases", str(new)),
        ("predictions", f"{pred_dir / 'predictions.csv'} (.json)"),
        ("saliency maps", f"{pred_dir / 'saliency'} (NIfTI on each case's grid + PNG)"),
    ]
