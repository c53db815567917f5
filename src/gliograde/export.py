"""`gliograde export`: a run's (or a CV's folds') selected checkpoints as ONNX or TorchScript files for deployment.

Each model is written as `<name>.onnx` (or `<name>.pt`, a traced TorchScript module) plus a JSON sidecar
`<name>.json` holding everything needed to use it without gliograde's training code: the input channels and their
order, the size, the preprocessing parameters, the logit scale (LDAM's s), the run's operating point (prior
correction, temperature, threshold), the class names and where the model came from. The input is "volume"
(N, C, S, S, S) float32 with a dynamic batch axis, the output "logits" (N, 2). Every export is checked against the
PyTorch model on a random input (max abs logit difference <= 1e-4 in fp32) before it is kept.

ONNX models are run with `gliograde.inference.onnx_predict` (onnxruntime + numpy, no torch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from gliograde import GRADES, __version__
from gliograde.checkpoints import BEST, BEST_EMA, CheckpointError, select_checkpoint
from gliograde.config import load_run_config
from gliograde.errors import GliogradeError
from gliograde.files import write_json
from gliograde.inference.predict import Member, load_ensemble, load_member
from gliograde.networks import model_kind

log = logging.getLogger("gliograde")

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17
TOLERANCE = 1e-4  # max abs logit difference, fp32, exported vs PyTorch
INPUT, OUTPUT = "volume", "logits"
SIDECAR_VERSION = 1


class ExportError(GliogradeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_member(run_dir: Path, policy: str) -> Member:
    """The member of a single run folder, with an error naming the run when it has no selected checkpoint."""
    if not (run_dir / "checkpoints").is_dir():
        try:
            load_run_config(run_dir)
        except GliogradeError:
            raise ExportError(
                f"{run_dir} is not a results folder (with runs/) nor a run folder (with checkpoints/)"
            ) from None
    try:
        try:
            ema = load_run_config(run_dir).ema_decay > 0
        except GliogradeError:
            ema = True
        select_checkpoint(run_dir / "checkpoints", policy, ema_enabled=ema)
    except CheckpointError as e:
        raise ExportError(
            f"no selected checkpoint in {run_dir} ({BEST_EMA}/{BEST}); train or finish the run first ({e})"
        ) from e
    return load_member(run_dir, policy)


def _members(target: Path, policy: str) -> list[Member]:
    if (target / "runs").is_dir():
        return load_ensemble([target], policy)  # one model per fold of repeat 0 (find_runs), same configuration
    return [_run_member(target, policy)]


def _operating_point(run_dir: Path, checkpoint: Path) -> dict | None:
    """The operating point the run fitted for this checkpoint (metrics/metrics.json final), else None (the raw
    probabilities and the 0.5 threshold; the same rule `predict` applies)."""
    try:
        final = json.loads((run_dir / "metrics" / "metrics.json").read_text()).get("final") or {}
    except (OSError, ValueError):
        return None
    point = final.get("operating_point")
    if point and final.get("checkpoint", checkpoint.name) == checkpoint.name:
        return dict(point)
    return None


def _name(member: Member) -> str:
    return f"fold_{member.fold}" if member.fold is not None else member.checkpoint.parent.parent.name


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, kind: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as e:
        path.unlink(missing_ok=True)
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(
            f"the ONNX exporter failed on the {kind} model ({type(e).__name__}: {first}); "
            "export it with --format torchscript instead"
        ) from e


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, kind: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"tracing the {kind} model to TorchScript failed ({type(e).__name__}: {e})") from e


def _ort_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(
            "ONNX export needs onnx and onnxruntime (pip install 'gliograde[export]') for the parity check"
        ) from e
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _parity(model: torch.nn.Module, path: Path, fmt: str, channels: int, size: int, kind: str) -> float:
    """Max abs logit difference of the exported file vs the PyTorch model on a random batch of 2 (a batch size the
    export was not traced with: the batch axis must really be dynamic)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, size, generator=g)
    with torch.no_grad():
        expected = model(x).numpy()
    try:
        if fmt == "onnx":
            got = _ort_session(path).run([OUTPUT], {INPUT: x.numpy()})[0]
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's
                got = torch.jit.load(str(path), map_location="cpu")(x).numpy()
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"the exported {kind} model {path} cannot be run on a batch of 2 ({type(e).__name__}: {e})"
            + ("; export it with --format torchscript instead" if fmt == "onnx" else "")
        ) from e
    if got.shape != expected.shape:
        raise ExportError(f"the exported {kind} model {path} returns shape {got.shape}, PyTorch {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    if not diff <= TOLERANCE:
        raise ExportError(
            f"the exported {kind} model {path} differs from PyTorch by {diff:.3g} in the logits (> {TOLERANCE:g})"
            + ("; export it with --format torchscript instead" if fmt == "onnx" else "")
        )
    return diff


def _versions(fmt: str) -> dict:
    v = {"gliograde": __version__, "torch": torch.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        v.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, opset=OPSET)
    return v


def export(target: str | Path, out: str | Path, fmt: str = "onnx", policy: str = "auto") -> list[Path]:
    """Export the selected checkpoint of a run folder, or of every fold (repeat 0) of a results folder, into the new
    or empty folder `out`. Returns the written model files (each with its `<name>.json` sidecar beside it)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    target, out = Path(target), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already holds files; choose a new folder (nothing is overwritten)")
    members = _members(target, policy)
    names = [_name(m) for m in members]
    if len(set(names)) != len(names):
        raise ExportError(f"the models of {target} would share file names ({names})")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for name, m in zip(names, members, strict=True):
            model = m.model.to("cpu", torch.float32).eval()
            kind = model_kind(model)
            channels, size = len(m.modalities), int(m.size)
            example = torch.zeros(1, channels, size, size, size)
            path = out / f"{name}{SUFFIX[fmt]}"
            written.append(path)
            (_export_onnx if fmt == "onnx" else _export_torchscript)(model, example, path, kind)
            diff = _parity(model, path, fmt, channels, size, kind)
            run_dir = m.checkpoint.parent.parent
            sidecar = {
                "sidecar_version": SIDECAR_VERSION,
                "format": fmt,
                "file": path.name,
                "model_kind": kind,
                "name": name,
                "fold": m.fold,
                "input": {"name": INPUT, "shape": ["N", channels, size, size, size], "dtype": "float32"},
                "output": {"name": OUTPUT, "shape": ["N", len(GRADES)], "dtype": "float32"},
                "in_channels": channels,
                "channels": list(m.modalities),
                "size": size,
                "preprocess": m.preprocess,
                "logit_scale": float(m.logit_scale),
                "operating_point": _operating_point(run_dir, m.checkpoint),
                "classes": list(m.classes),  # labels 0 and 1 of the run's question (HGG/LGG, or a cohort's own)
                "probability": "p_hgg = softmax(logit_scale * logits)[:, 1], then the operating point (logit(p) + "
                "logit(train_prior) - logit(sampled_prior), / temperature), compared to its threshold; no operating "
                "point: the raw probability and threshold 0.5",
                "parity": {"max_abs_logit_diff": diff, "tolerance": TOLERANCE, "input": "randn(2, C, S, S, S)"},
                "provenance": {
                    "checkpoint": str(m.checkpoint.resolve()),
                    "checkpoint_sha256": _sha256(m.checkpoint),
                    "run_dir": str(run_dir.resolve()),
                    **_versions(fmt),
                    "exported": datetime.now().astimezone().isoformat(timespec="seconds"),
                },
            }
            written.append(out / f"{name}.json")
            write_json(out / f"{name}.json", sidecar)
            log.info("%s -> %s (%s, max abs logit diff %.2g)", m.checkpoint, path, kind, diff)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return [p for p in written if p.suffix == SUFFIX[fmt]]
