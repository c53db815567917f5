"""The README's first command: `gliograde demo` runs end to end and says where its outputs are."""

from __future__ import annotations

import copy
import json

import nibabel as nib
import torch

from gliograde.cli import main


# The demo runs once a session (conftest.demo_run, its own size); these tests read what it left and printed.
def test_the_demo_trains_five_folds_that_learn_and_prints_the_summary(demo_run):
    assert demo_run.rc == 0
    results, runs = demo_run.results, demo_run.runs
    assert [r.parent.name for r in runs] == [f"fold_{k}" for k in range(5)]
    for run in runs:
        assert json.loads((run / "metrics" / "metrics.json").read_text())["status"] == "complete"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["k"] == 5 and not summary["partial"] and summary["pooled"]["n"] == 60
    # it learned (chance is 0.5); the pooled AUC sits below the fold mean: each fold's scores are scaled differently
    assert summary["mean"]["auc"] >= 0.85 and summary["pooled"]["auc"] >= 0.75
    assert "Mean ± std" in demo_run.printed and "Pooled out-of-fold (60 patients)" in demo_run.printed


def test_the_demo_predicts_two_unseen_cases_with_saliency_on_their_grid(demo_run):
    out = demo_run.out
    (pred_dir,) = demo_run.predictions
    rows = (pred_dir / "predictions.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.startswith("Brats18_SYN") for r in rows[1:])
    new_ids = {p.name for p in (out / "new_cases").glob("*GG/*")}
    assert new_ids == {r.split(",")[0] for r in rows[1:]}
    assert not new_ids & set(json.loads((out / "cache" / "folds.json").read_text())["case_ids"])  # unseen cases
    for case in new_ids:
        saliency = nib.load(pred_dir / "saliency" / f"{case}_gradcam.nii.gz")
        flair = nib.load(next((out / "new_cases").glob(f"*GG/{case}/{case}_flair.nii.gz")))
        assert saliency.shape == flair.shape
    assert "demo finished" in demo_run.logged and str(demo_run.results / "summary.md") in demo_run.logged


def test_a_second_demo_reuses_data_cache_and_folds_and_predicts_into_a_new_folder(demo_run, caplog):
    out, results, runs = demo_run.out, demo_run.results, demo_run.runs
    metrics = (runs[0] / "metrics" / "metrics.json").read_bytes()
    with caplog.at_level("INFO", logger="gliograde"):
        assert main(["demo", "--out", str(out), "--workers", "2"]) == 0
    assert "reused" in caplog.text and "skipped" in caplog.text
    assert sorted(results.glob("runs/fold_*/run_*")) == runs
    assert (runs[0] / "metrics" / "metrics.json").read_bytes() == metrics
    predictions = sorted((out / "predictions").iterdir())
    assert len(predictions) == 2 and set(demo_run.predictions) < set(predictions)


def test_the_cpu_optimizer_is_fused_and_steps_as_the_per_tensor_loop_does():
    """The demo trains on the CPU, where torch's default Adam loops over the tensors one by one (0.8 s a step for
    ResNet-10 against 0.25 s fused): the fused kernel is taken there too, with the same update."""
    from gliograde.config import resolve
    from gliograde.networks.resnet3d import ResNet3D
    from gliograde.training.optim import make_optimizer

    cfg = resolve("cpu-demo")
    torch.manual_seed(0)
    model = ResNet3D(10, 4, 2)
    reference = copy.deepcopy(model)
    fused = make_optimizer(model, cfg)
    groups = [{"params": reference.backbone_parameters(), "lr": cfg.lr},
              {"params": reference.head_parameters(), "lr": cfg.lr * cfg.classifier_lr_mult}]  # fmt: skip
    loop = torch.optim.Adam(groups, weight_decay=cfg.weight_decay, foreach=False)
    assert fused.defaults["fused"] and [g["lr"] for g in fused.param_groups] == [g["lr"] for g in loop.param_groups]
    grads = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=grads)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
