"""Each extension point owns its names (docs/architecture.md): a loss and a metric defined in this file alone,
registered through the public API, are trained with, evaluated, predicted with and summarized by the unchanged
package; a name no table holds, or a checkpoint whose architecture cannot be rebuilt, is refused in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny
from sklearn.metrics import matthews_corrcoef

from gliograde.checkpoints import CheckpointError, checkpoint_logit_scale, load_checkpoint
from gliograde.config import ConfigError, TrainConfig, check_config
from gliograde.data.augment import AugmentParams
from gliograde.evaluation.calibration import OperatingPoint
from gliograde.evaluation.metrics import METRICS, MetricError, MetricSpec, compute_metrics, get_metric, register_metric
from gliograde.evaluation.scoring import model_from_checkpoint
from gliograde.networks import ARCHITECTURES, build_from_description
from gliograde.training.losses import LOSSES, LossSpec, drw_active, get_loss, register_loss

FOCAL_SCALE = 2.0  # the focal loss below works on 2 x logits: its probabilities must be softmax(2 x logits)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017) on scaled logits: mean of -(1 - p_t)^gamma log p_t, p_t = softmax(s z)_y."""

    def __init__(self, gamma: float, s: float):
        super().__init__()
        self.gamma, self.s = gamma, s

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(self.s * logits.float(), 1).gather(1, target[:, None])[:, 0]
        return (-((1 - logp.exp()) ** self.gamma) * logp).mean()


def mcc(labels, probs, threshold) -> float:
    """Matthews correlation at the threshold; undefined (NaN) where a row or column of the confusion matrix is
    empty."""
    labels = np.asarray(labels)
    preds = (np.asarray(probs) >= np.asarray(threshold)).astype(int)
    if len(np.unique(labels)) < 2 or len(np.unique(preds)) < 2:
        return math.nan
    return matthews_corrcoef(labels, preds)


@pytest.fixture(scope="module")
def extensions():
    """The focal loss and the MCC metric registered for this module's tests, removed afterwards."""
    register_loss(LossSpec("focal", "focal", lambda counts, cfg: FocalLoss(2.0, FOCAL_SCALE), lambda cfg: FOCAL_SCALE))
    register_metric(MetricSpec("mcc", "MCC", compute=mcc, fmt=".3f"))
    yield
    LOSSES.pop("focal")
    METRICS.pop("mcc")


@pytest.fixture(scope="module")
def focal_run(extensions, tiny_cache, tmp_path_factory):
    from gliograde.training.trainer import train_fold

    tmp = tmp_path_factory.mktemp("focal")
    cfg = tiny(tiny_cache, tmp, loss="focal", epochs=2, min_epochs=2)
    return cfg, train_fold(cfg)


def test_a_registered_loss_and_metric_train_a_fold(focal_run):
    cfg, result = focal_run
    run = result.run_dir
    log = next((run / "logs").glob("train_*.log")).read_text()
    assert "Loss: focal; P(HGG) = softmax(2 x logits)" in log  # the spec's display name and scale
    ckpt = load_checkpoint(run / "checkpoints" / result.final["checkpoint"])
    assert ckpt["logit_scale"] == FOCAL_SCALE and ckpt["config"]["loss"] == "focal"
    assert ckpt["arch"]["model"] == "resnet3d" and ckpt["arch"]["depth"] == cfg.depth
    assert all("val_mcc" in h for h in result.history) and len(result.history) == 2
    labels = np.load(run / "predictions" / "val_labels.npy")
    probs = np.load(run / "predictions" / "val_probs.npy")
    assert result.final["mcc"] == pytest.approx(mcc(labels, probs, result.final["threshold"]), nan_ok=True)
    saved = json.loads((run / "metrics" / "metrics.json").read_text())
    assert "mcc" in saved["final"] and "val_mcc" in saved["history"][-1]


def test_evaluate_and_predict_read_the_logit_scale_from_the_checkpoint(focal_run, tiny_cache, synth_root, tmp_path):
    from gliograde.data.brats import discover_cases
    from gliograde.evaluation.evaluate import evaluate_run
    from gliograde.inference.predict import load_ensemble, output_dir, predict_cases

    _, result = focal_run
    run = result.run_dir
    evaluation = evaluate_run(run)
    assert evaluation.metrics["auc"] == pytest.approx(result.final["auc"], abs=1e-9)
    assert "mcc" in evaluation.metrics
    # evaluate's probabilities are softmax(2 x logits) at the run's operating point, computed here by hand
    path = run / "checkpoints" / evaluation.metrics["checkpoint"]
    model = model_from_checkpoint(load_checkpoint(path), path)
    ids = json.loads((evaluation.out_dir / "val_ids.json").read_text())
    x = torch.from_numpy(np.stack([tiny_cache.volumes[tiny_cache.ids.index(i)] for i in ids]).astype(np.float32))
    with torch.no_grad():
        logits = model(x).float()
    point = OperatingPoint.from_dict(evaluation.metrics["operating_point"])
    scaled = point.apply(torch.softmax(FOCAL_SCALE * logits, 1)[:, 1].numpy())
    unscaled = point.apply(torch.softmax(logits, 1)[:, 1].numpy())
    got = np.load(evaluation.out_dir / "val_probs.npy")
    assert got == pytest.approx(scaled, abs=1e-5) and np.abs(got - unscaled).max() > 1e-4

    members = load_ensemble([run])
    assert [m.logit_scale for m in members] == [FOCAL_SCALE]
    case = discover_cases(synth_root).cases[0]
    (record,) = predict_cases([case], members, output_dir(tmp_path / "out"))
    v = torch.from_numpy(tiny_cache.volumes[tiny_cache.ids.index(case.id)].astype(np.float32))[None]
    with torch.no_grad():
        expected = float(torch.softmax(FOCAL_SCALE * model(v).float(), 1)[0, 1])
    assert record["p_hgg_raw"] == pytest.approx(expected, abs=1e-5)


def test_evaluating_a_run_whose_loss_is_not_registered_is_one_line(focal_run, monkeypatch):
    from gliograde.errors import GliogradeError
    from gliograde.evaluation.evaluate import evaluate_run

    run = focal_run[1].run_dir
    before = sorted(run.glob("evaluation_*"))
    monkeypatch.delitem(LOSSES, "focal")
    with pytest.raises(GliogradeError) as e:
        evaluate_run(run)
    assert str(e.value) == f"{run}: the run's loss focal is not a registered loss (ce, ldam)"
    assert sorted(run.glob("evaluation_*")) == before  # nothing written


def test_a_registered_metric_reaches_the_summary(focal_run):
    from gliograde.evaluation.summary import summarize

    cfg, result = focal_run
    report = summarize(cfg.output_dir, allow_partial=True, bootstrap=50)
    assert report["folds"][0]["mcc"] == pytest.approx(result.final["mcc"], nan_ok=True)
    assert "mcc" in report["mean"]
    header = (result.run_dir.parents[2] / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[3:10] == ["auc", "f1", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "mcc"]
    table = (result.run_dir.parents[2] / "summary.md").read_text()
    assert "| Bal. acc. | MCC |" in table


def test_names_no_table_holds_are_one_line_with_the_closest(extensions):
    with pytest.raises(ConfigError) as e:
        check_config(TrainConfig(loss="focl"))
    assert str(e.value) == "--loss focl is not a registered loss (ce, focal, ldam); did you mean 'focal'?"
    with pytest.raises(ConfigError) as e:
        check_config(TrainConfig(model="resnet3"))
    assert str(e.value) == (
        f"--model resnet3 is not a registered architecture ({', '.join(sorted(ARCHITECTURES))}); did you mean "
        "'resnet3d'?"
    )
    with pytest.raises(ConfigError, match=r"^--loss hinge is not a registered loss \(ce, focal, ldam\)$"):
        get_loss("hinge")
    with pytest.raises(MetricError, match=r"metric mc is not a registered metric .*; did you mean 'mcc'"):
        get_metric("mc")
    with pytest.raises(MetricError, match="built-in"):  # compute_metrics computes it: another would be shadowed
        register_metric(MetricSpec("auc", "AUC", compute=mcc))
    with pytest.raises(MetricError, match="needs compute"):
        register_metric(MetricSpec("youden", "J"))
    assert "youden" not in METRICS
    assert not drw_active("focal", 1, 5) and drw_active("ldam", 1, 5)  # the spec decides whether DRW applies


def test_a_configuration_file_naming_no_loss_is_refused_by_the_dry_run(tmp_path):
    """In a fresh process (no table imported before the command runs), as a user runs it."""
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("loss: focl\n")
    done = subprocess.run([sys.executable, "-m", "gliograde", "train", "--config", str(tmp_path / "bad.yaml"),
                           "--dry-run"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "would train" not in done.stdout
    assert done.stderr == "gliograde train: error: --loss focl is not a registered loss (ce, ldam)\n"


def _resnet10(in_channels: int) -> dict:
    return {"model": "resnet3d", "depth": 10, "layout": "strided", "shortcut": "B", "in_channels": in_channels,
            "num_classes": 2}  # fmt: skip


def test_a_checkpoint_whose_architecture_cannot_be_rebuilt_is_one_line(tmp_path):
    registered = sorted(ARCHITECTURES)
    weights = build_from_description(_resnet10(2)).state_dict()
    path = tmp_path / "best.pt"
    cases = [
        ({**_resnet10(2), "model": "resnet4d"}, "model resnet4d is not a registered architecture "
         f"({', '.join(sorted(ARCHITECTURES))}); did you mean 'resnet3d'?"),
        (_resnet10(4), "the weights do not fit the recorded resnet3d (depth 10, layout strided, shortcut B, "
         "in_channels 4, num_classes 2): conv1.weight is [64, 2, 7, 7, 7] in the weights, [64, 4, 7, 7, 7] in the "
         "network"),
        ({**_resnet10(2), "depth": 18}, "the weights do not fit the recorded resnet3d (depth 18, layout strided, "
         "shortcut B, in_channels 2, num_classes 2): layer1.1.conv1.weight is missing from the weights"),
        ({"model": "mil2d", "depth": 18}, "the mil2d description has no 'in_channels'"),
    ]  # fmt: skip
    for arch, why in cases:
        with pytest.raises(CheckpointError) as e:
            model_from_checkpoint({"arch": arch, "model_state_dict": weights}, path)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{path}: {why}"), message
    assert isinstance(model_from_checkpoint({"arch": _resnet10(2), "model_state_dict": weights}, path), nn.Module)
    assert sorted(ARCHITECTURES) == registered  # a description that fails registers nothing


def test_the_logit_scale_of_a_checkpoint_written_before_it_was_recorded():
    assert checkpoint_logit_scale({"config": {"loss": "ldam", "ldam_s": 7.0}}) == 7.0
    assert checkpoint_logit_scale({"config": {"loss": "ce", "ldam_s": 7.0}}) == 1.0
    assert checkpoint_logit_scale({"logit_scale": 2.5, "config": {"loss": "ldam", "ldam_s": 7.0}}) == 2.5


def test_augmentation_parameters_come_from_the_configuration_in_one_place():
    p = AugmentParams.from_config(TrainConfig(flip_prob=0.25, rotate_deg=3.0, intensity_shift=0.0))
    assert (p.flip_prob, p.rotate_deg, p.scale_range, p.intensity_shift) == (0.25, 3.0, 0.1, 0.0)
    assert AugmentParams.from_config(TrainConfig(augment=False)) is None


def test_compute_metrics_carries_the_registered_metrics(extensions):
    labels, probs = [0, 0, 1, 1, 1], [0.2, 0.7, 0.6, 0.9, 0.4]
    m = compute_metrics(labels, probs, 0.5)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, [0, 1, 1, 1, 0]))
    assert get_metric("mcc").format(m["mcc"]) == f"{m['mcc']:.3f}" and get_metric("mcc").format(math.nan) == "n/a"
