"""export: ONNX / TorchScript files with sidecars, parity with PyTorch, the torch-free ONNX predictor and refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gliograde import GRADES
from gliograde.checkpoints import load_checkpoint
from gliograde.data.brats import discover_cases
from gliograde.evaluation.calibration import OperatingPoint
from gliograde.evaluation.scoring import model_from_checkpoint
from gliograde.export import ExportError, export
from gliograde.inference.onnx_predict import (
    check_compatible,
    load_exported,
    predict_cases_onnx,
    predict_exported,
)
from gliograde.inference.predict import _probability, load_ensemble, output_dir, predict_cases

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_dir(cv_run, tmp_path_factory):
    _, cfg, _ = cv_run
    out = tmp_path_factory.mktemp("export") / "onnx"
    files = export(cfg.output_dir, out, "onnx")
    return out, files


def test_onnx_export_matches_pytorch_and_the_predict_probabilities(cv_run, onnx_dir):
    cache, cfg, _ = cv_run
    out, files = onnx_dir
    assert [f.name for f in files] == ["fold_0.onnx", "fold_1.onnx", "fold_2.onnx"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f.name for f in files), *(f.stem + ".json" for f in files)]
    )
    members = load_exported(out)
    ensemble = load_ensemble([cfg.output_dir])
    x = cache.volumes[0].astype(np.float32)[None]
    res = predict_exported(members, x)
    expected = []
    for m, ref in zip(members, ensemble, strict=True):
        meta = m.meta
        assert meta["format"] == "onnx" and meta["model_kind"] == "resnet3d" and meta["classes"] == list(GRADES)
        assert meta["channels"] == list(cache.modalities) and meta["size"] == cache.size == 16
        assert meta["in_channels"] == len(cache.modalities) and meta["logit_scale"] == 1.0
        ckpt_path = Path(meta["provenance"]["checkpoint"])
        assert ckpt_path == ref.checkpoint.resolve()
        assert meta["provenance"]["checkpoint_sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
        ckpt = load_checkpoint(ckpt_path)
        assert meta["preprocess"] == ckpt["preprocess"]
        final = json.loads((ckpt_path.parent.parent / "metrics" / "metrics.json").read_text())["final"]
        assert meta["operating_point"] == final["operating_point"]
        # logits: onnxruntime vs PyTorch on a real cached case, fp32
        model = model_from_checkpoint(ckpt, ckpt_path)
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(x)).numpy()
        ort_logits = m.session.run(["logits"], {"volume": x})[0]
        assert np.max(np.abs(ort_logits - torch_logits)) <= 1e-4
        # P(HGG) at the operating point: as predict computes it, and as OperatingPoint.apply on the torch softmax
        raw = float(torch.softmax(torch.from_numpy(torch_logits), 1)[0, 1])
        point = OperatingPoint.from_dict(final["operating_point"])
        want = float(point.apply(np.array([raw]))[0])
        assert _probability(ref, torch.from_numpy(x), False, None)[1] == pytest.approx(want, abs=1e-6)
        assert res["members"][m.name][0] == pytest.approx(want, abs=1e-5)
        assert res["members_raw"][m.name][0] == pytest.approx(raw, abs=1e-5)
        assert m.threshold == pytest.approx(point.threshold)
        expected.append(want)
    assert res["p_hgg"][0] == pytest.approx(np.mean(expected), abs=1e-5)
    threshold = np.mean([m.point.threshold for m in ensemble])
    assert res["threshold"] == pytest.approx(threshold)
    assert res["predicted_grade"][0] == GRADES[int(res["p_hgg"][0] >= threshold)]
    # a batch of several volumes (the dynamic batch axis)
    batch = predict_exported(members, cache.volumes[:3].astype(np.float32))
    assert batch["p_hgg"].shape == (3,) and batch["p_hgg"][0] == pytest.approx(res["p_hgg"][0], abs=1e-6)


def test_predict_cases_onnx_agrees_with_predict(cv_run, onnx_dir, synth_root, tmp_path):
    _, cfg, _ = cv_run
    out, _ = onnx_dir
    cases = discover_cases(synth_root).cases[:2]
    records = predict_cases_onnx(cases, out, tmp_path / "onnx_pred")
    reference = predict_cases(cases, load_ensemble([cfg.output_dir]), output_dir(tmp_path / "torch_pred"))
    for r, ref in zip(records, reference, strict=True):
        assert r["case"] == ref["case"] and r["predicted_grade"] == ref["predicted_grade"]
        assert r["p_hgg"] == pytest.approx(ref["p_hgg"], abs=1e-5)
        assert list(r["folds"].values()) == pytest.approx(list(ref["folds"].values()), abs=1e-5)
    header = (tmp_path / "onnx_pred" / "predictions.csv").read_text().splitlines()[0]
    assert header == "case,p_hgg,threshold,predicted_grade,true_grade,fold_0,fold_1,fold_2"
    assert json.loads((tmp_path / "onnx_pred" / "predictions.json").read_text())["predictions"] == records
    with pytest.raises(ValueError, match="already holds files"):
        predict_cases_onnx(cases, out, tmp_path / "onnx_pred")


def test_mismatched_channels_or_size_are_refused(cv_run, onnx_dir):
    cache, _, _ = cv_run
    out, _ = onnx_dir
    members = load_exported(out)
    check_compatible(members, list(cache.modalities), cache.size)
    with pytest.raises(ValueError, match=r"fold_0\.json.*channels"):
        check_compatible(members, list(reversed(cache.modalities)), cache.size)
    with pytest.raises(ValueError, match=r"fold_0\.json.*size 16"):
        check_compatible(members, list(cache.modalities), 32)
    with pytest.raises(ValueError, match=r"fold_0\.json"):
        predict_exported(members, np.zeros((1, len(cache.modalities), 8, 8, 8), np.float32))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_loads_and_matches(cv_run, tmp_path):
    cache, _, report = cv_run
    run = Path(report["folds"][0]["run"])
    files = export(run, tmp_path / "ts", "torchscript")
    assert [f.suffix for f in files] == [".pt"]
    meta = json.loads(files[0].with_suffix(".json").read_text())
    assert meta["format"] == "torchscript" and meta["fold"] == 0 and meta["provenance"]["run_dir"] == str(run.resolve())
    ckpt_path = Path(meta["provenance"]["checkpoint"])
    model = model_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path)
    scripted = torch.jit.load(str(files[0]))
    x = torch.from_numpy(cache.volumes[:2].astype(np.float32))
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="torchscript"):
        load_exported(tmp_path / "ts")


def test_refusals(cv_run, onnx_dir, tmp_path):
    _, cfg, report = cv_run
    run = Path(report["folds"][1]["run"])
    # a run folder whose checkpoints are gone: the error names the run
    bare = tmp_path / "run_without_checkpoints"
    shutil.copytree(run / "config", bare / "config")
    for layout in ("absent", "empty"):
        if layout == "empty":
            (bare / "checkpoints").mkdir()
        with pytest.raises(ExportError, match=rf"no selected checkpoint in {bare}.*train or finish the run first"):
            export(bare, tmp_path / f"out_{layout}", "onnx")
        assert not (tmp_path / f"out_{layout}").exists()
    with pytest.raises(ExportError, match="not a results folder"):
        export(tmp_path / "nothing_here", tmp_path / "out_nothing", "onnx")
    out, _ = onnx_dir
    with pytest.raises(ExportError, match="already holds files"):
        export(cfg.output_dir, out, "onnx")
    with pytest.raises(ExportError, match="not one of"):
        export(run, tmp_path / "out_fmt", "tflite")


def test_the_onnx_predictor_never_imports_torch_networks_or_training(cv_run, onnx_dir, tmp_path):
    cache, _, _ = cv_run
    out, _ = onnx_dir
    np.save(tmp_path / "x.npy", cache.volumes[:2].astype(np.float32))
    code = f"""
import json, sys
import numpy as np
def banned():
    return sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")
                  or m.startswith("gliograde.training") or m.startswith("gliograde.networks")
                  or m == "gliograde.evaluation.scoring")
import gliograde.inference.onnx_predict as op
after_import = banned()
members = op.load_exported({str(out)!r})
op.check_compatible(members, members[0].channels, members[0].size)
res = op.predict_exported(members, np.load({str(tmp_path / "x.npy")!r}))
print(json.dumps({{"import": after_import, "predict": banned(), "n": len(res["p_hgg"])}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"import": [], "predict": [], "n": 2}


def test_export_and_predict_onnx_from_the_command_line(cv_run, synth_root, tmp_path, capsys, caplog):
    from gliograde.cli import main

    _, cfg, _ = cv_run
    models = tmp_path / "models"
    assert main(["export", cfg.output_dir, "--format", "onnx", "--out", str(models)]) == 0
    assert len(list(models.glob("*.onnx"))) == 3 and "fold_0.onnx" in capsys.readouterr().out
    case = discover_cases(synth_root).cases[0]
    out = tmp_path / "pred"
    argv = ["predict", "--onnx", str(models), "--case", str(case.paths["flair"].parent), "--out", str(out)]
    with caplog.at_level("INFO", logger="gliograde"):
        assert main(argv) == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("case,p_hgg,threshold,predicted_grade,true_grade") and rows[1].startswith(case.id)
    threshold = json.loads((out / "predictions.json").read_text())["threshold"]
    # the printed decision names the threshold it was taken at, and the true grade its HGG/ or LGG/ folder gives
    assert f"threshold {threshold:.4f} -> " in caplog.text and f"true grade {case.grade}" in caplog.text
    assert main(["export", cfg.output_dir, "--out", str(models)]) == 2  # a non-empty --out is refused


def _imported(importtime_stderr: str) -> set[str]:
    """The modules a `python -X importtime` run imported (its stderr lines 'import time: self | cumulative | name')."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_the_predict_onnx_command_imports_neither_torch_nor_the_training_code(cv_run, onnx_dir, synth_root, tmp_path):
    """`gliograde predict --onnx` itself (a subprocess under -X importtime), then again where torch cannot be
    imported at all (a deployment without torch): the same predictions (issue 21, §1)."""
    out, _ = onnx_dir
    case = discover_cases(synth_root).cases[0].paths["flair"].parent
    args = ["predict", "--onnx", str(out), "--case", str(case)]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gliograde.cli", *args, "--out", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert "gliograde.inference.onnx_predict" in imported and "onnxruntime" in imported  # the parse works
    banned = sorted(
        m for m in imported
        if m.split(".")[0] == "torch" or m.startswith(("gliograde.training", "gliograde.networks"))
        or m in ("gliograde.inference.predict", "gliograde.evaluation.scoring", "monai")
    )  # fmt: skip
    assert banned == []
    no_torch = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "from gliograde.cli import main\n"
        f"sys.exit(main({[*args, '--out', str(tmp_path / 'b')]!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", no_torch], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = ((tmp_path / d / "predictions.csv").read_text() for d in ("a", "b"))
    assert a == b and a.splitlines()[1].startswith(discover_cases(synth_root).cases[0].id)
