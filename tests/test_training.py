"""The training engine on tiny CPU runs (ResNet-10, 16^3-32^3 volumes): run folder, policies, resume, faults."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, logged, tiny

from gliograde.checkpoints import CheckpointError, select_checkpoint
from gliograde.cli import build_parser, config_from_args, main
from gliograde.config import ConfigError, check_config, resolve
from gliograde.data.cache import open_cache
from gliograde.errors import GliogradeError
from gliograde.files import json_safe
from gliograde.training import trainer
from gliograde.training.losses import LDAMLoss, drw_active, drw_weights
from gliograde.training.run_folder import new_run_dir
from gliograde.training.selection import improved
from gliograde.training.trainer import train_fold


# ------------------------------------------------------------------------------------------ learning, folder
@pytest.fixture(scope="module")
def learned(demo_run):
    """A learnable fold: fold 0 of the session's demo (60 phantoms at 32^3, the cpu-demo preset's 12 epochs, trained
    by train_fold through the cv), read back from its run folder."""
    run = demo_run.runs[0]
    assert run.parent.name == "fold_0", demo_run.runs
    metrics = json.loads((run / "metrics" / "metrics.json").read_text())
    return trainer.RunResult(run, metrics["final"], metrics["history"])


def test_a_learnable_fold_reaches_auc_090(learned):
    assert learned.final["auc"] >= 0.9
    assert learned.final["checkpoint"] == "best.pt"
    best = max(learned.history, key=lambda h: (h["val_auc"], h["val_f1"]))
    assert learned.final["best_epoch"] == best["epoch"]


def test_the_run_folder_holds_everything_the_seeds_list(learned):
    run = learned.run_dir
    assert run.parent.name == "fold_0" and run.parent.parent.name == "runs" and run.name.startswith("run_")
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    for pt in (run / "checkpoints").iterdir():
        ckpt = torch.load(pt, map_location="cpu", weights_only=True)
        assert {"model_state_dict", "epoch", "val_metrics", "config"} <= set(ckpt)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "rng_state"} <= set(last)
    metrics = json.loads((run / "metrics" / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert {
        "auc",
        "f1",
        "accuracy",
        "best_epoch",
        "sensitivity",
        "specificity",
        "per_class",
        "confusion_matrix",
    } <= set(metrics["final"])
    assert len(metrics["history"]) == len(learned.history) and set(metrics["loss_summary"]) == {"train", "val"}
    h = metrics["history"][0]
    assert {"train_loss", "val_loss", "val_auc", "lr_backbone", "lr_head", "drw_active", "epoch_time_s"} <= set(h)
    assert h["train_volumes_per_s"] > 0 and 0 <= h["data_wait_fraction"] <= 1
    assert h["peak_gpu_memory_gib"] is None  # the CPU
    assert 0 < h["train_time_s"] + h["val_time_s"] <= h["epoch_time_s"]
    assert math.isclose(h["lr_head"], 2 * h["lr_backbone"])
    plots = {p.name for p in (run / "plots").iterdir()}
    for name in ("loss_curve", "learning_curves", "confusion_matrix", "roc_curve", "pr_curve"):  # every epoch's too
        assert f"{name}.png" in plots and all(f"{name}_epoch_{h['epoch']}.png" in plots for h in learned.history)
    assert "reliability.png" in plots  # the calibration of the reported fold
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/auc")] == pytest.approx([h["val_auc"] for h in metrics["history"]])
    preds = run / "predictions"
    probs, labels = np.load(preds / "val_probs.npy"), np.load(preds / "val_labels.npy")
    threshold = metrics["final"]["threshold"]
    assert np.array_equal(np.load(preds / "val_preds.npy"), (probs >= threshold).astype(int))
    val_ids = json.loads((preds / "val_ids.json").read_text())
    assert len(val_ids) == len(labels) == 12
    # inner selection (the default): epochs, checkpoint, threshold and calibration never saw a reported patient
    assert metrics["selection"]["protocol"] == "inner" and metrics["final"]["selection"] == metrics["selection"]
    split = json.loads((run / "config" / "config.json").read_text())["split"]
    assert split["val"] == val_ids and not set(val_ids) & (set(split["fit"]) | set(split["select"]))
    assert metrics["selection"]["n_select"] == len(split["select"]) > 0
    op = metrics["final"]["operating_point"]
    assert op["threshold_rule"] == "youden" and op["fitted_on"] == f"select (n={len(split['select'])})"
    assert op["sampled_prior"] == 0.5 and 0 < op["train_prior"] < 1  # the weighted sampler's prior, corrected
    raw = np.load(preds / "val_probs_raw.npy")
    from gliograde.evaluation.calibration import OperatingPoint

    np.testing.assert_allclose(OperatingPoint.from_dict(op).apply(raw), probs)
    assert {"auc_delong", "rates", "calibration"} <= set(metrics["final"])
    config = json.loads((run / "config" / "config.json").read_text())
    assert config["seed"] == 42 and config["config"]["depth"] == 10
    assert {"python", "torch", "monai", "gliograde", "git_commit", "device"} <= set(config["environment"])
    logs = list((run / "logs").glob("train_*.log"))
    assert len(logs) == 1 and "Epoch 1/12 | train loss" in logs[0].read_text()


# ------------------------------------------------------------------------------------------------ losses
def test_ldam_matches_a_hand_computation():
    counts, max_m, s = [75, 210], 0.5, 30.0
    logits = torch.tensor([[0.2, -0.1], [0.05, 0.3], [-0.4, 0.1]])
    target = torch.tensor([0, 1, 0])
    m = [1 / n**0.25 for n in counts]
    m = [v * max_m / max(m) for v in m]  # the rarest class gets max_m
    expected = 0.0
    for z, y in zip(logits.tolist(), target.tolist(), strict=True):
        z = [s * (z[j] - (m[j] if j == y else 0)) for j in range(2)]
        expected += -(z[y] - math.log(sum(math.exp(v) for v in z)))
    expected /= 3
    assert math.isclose(float(LDAMLoss(counts, max_m, s)(logits, target)), expected, rel_tol=1e-5)
    assert math.isclose(m[0], 0.5) and m[1] < m[0]


def test_drw_weights_and_schedule():
    w = drw_weights([75, 210])
    assert torch.allclose(w / w[1], torch.tensor([math.sqrt(210 / 75), 1.0])) and math.isclose(float(w.mean()), 1.0)
    assert [drw_active("ldam", 3, e) for e in (1, 2, 3, 4)] == [False, False, True, True]
    assert not drw_active("ce", 1, 5) and not drw_active("ldam", None, 5)


@pytest.fixture(scope="module")
def featured_run(tiny_cache, tmp_path_factory):
    """One 3-epoch run holding what three tests read (one training, not three): LDAM with DRW from epoch 2 (shuffled
    batches), EMA weights, MLflow instead of TensorBoard. (result, its results folder, what it logged at INFO)."""
    out = tmp_path_factory.mktemp("featured")
    cfg = tiny(tiny_cache, out, loss="ldam", sampler="shuffle", drw_start_epoch=2, ema_decay=0.9, mlflow="default",
               tensorboard=False)  # fmt: skip
    with logged() as log:
        result = train_fold(cfg)
    return result, out / "res", log.getvalue()


@pytest.mark.slow
def test_drw_switches_on_during_a_run(featured_run):
    result, _, logs = featured_run
    assert [h["drw_active"] for h in result.history] == [False, True, True]
    assert "DRW activated at epoch 2" in logs


def test_config_warns_about_the_seeds_pitfalls(caplog):
    with caplog.at_level("WARNING", logger="gliograde"):
        check_config(resolve("ldam-drw", drw_start_epoch=60, epochs=50))
        check_config(resolve("ldam-drw", drw_start_epoch=25))  # early stopping can end the run at epoch 17
        check_config(resolve("final", loss="LDAM"))
    assert "DRW will never activate" in caplog.text and "DRW may never activate" in caplog.text
    assert "triple balancing" in caplog.text
    for bad in (
        {"lr": -1e-4},
        {"batch_size": 0},
        {"fold": 5, "folds": 5},
        {"fold": -1},
        {"dropout": 1.0},
        {"modalities": "pd"},
    ):
        with pytest.raises(ConfigError):
            check_config(resolve("final", **bad))


def test_plots_every_zero_is_taken_and_a_negative_value_refused_in_one_line(tmp_path, capsys, monkeypatch):
    assert check_config(resolve("cpu-demo", plots_every=0)).plots_every == 0  # the final plots only
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "cpu-demo", "--plots-every", "-1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gliograde train: error: --warmup-epochs and --plots-every must be >= 0"
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------------------------- stopping, policy
def test_improvement_rule_auc_then_f1():
    best = {"auc": 0.8, "f1": 0.7}
    assert improved(0.81, 0.1, best, 0.0) and improved(0.8, 0.71, best, 0.0)
    assert not improved(0.8, 0.7, best, 0.0) and not improved(0.805, 0.9, best, 0.01)
    assert not improved(float("nan"), 1.0, best, 0.0)


@pytest.mark.slow
def test_early_stopping_respects_patience_and_min_epochs(tiny_cache, tmp_path, monkeypatch, caplog):
    real = trainer.compute_metrics
    monkeypatch.setattr(trainer, "compute_metrics", lambda y, p, **kw: {**real(y, p, **kw), "auc": 0.7, "f1": 0.5})
    cfg = tiny(tiny_cache, tmp_path, epochs=10, patience=2, min_epochs=4)
    with caplog.at_level("INFO", logger="gliograde"):
        result = train_fold(cfg)
    assert len(result.history) == 4  # no improvement after epoch 1; patience met at 3, min epochs at 4
    assert "Early stopping at epoch 4" in caplog.text and result.final["best_epoch"] == 1


def test_checkpoint_policy_never_uses_last(tmp_path):
    d = tmp_path
    (d / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.pt is never used"):
        select_checkpoint(d, "auto")
    (d / "best.pt").write_bytes(b"")
    assert select_checkpoint(d, "auto").name == "best.pt"
    (d / "best_ema.pt").write_bytes(b"")
    assert select_checkpoint(d, "auto", ema_enabled=True).name == "best_ema.pt"
    assert select_checkpoint(d, "auto", ema_enabled=False).name == "best.pt"
    with pytest.raises(CheckpointError, match="never evaluated"):
        select_checkpoint(d, "last")


@pytest.mark.slow
def test_ema_run_evaluates_best_ema(featured_run):
    result, _, logs = featured_run
    assert (result.run_dir / "checkpoints" / "best_ema.pt").is_file()
    assert result.final["checkpoint"] == "best_ema.pt" and result.final["used_ema"]
    assert "Using EMA best checkpoint: best_ema.pt" in logs
    assert all("ema_val_auc" in h for h in result.history)
    # the stored operating point belongs to best_ema.pt: re-scoring best.pt fits its own on the selection part
    from gliograde.evaluation.evaluate import evaluate_run

    again = evaluate_run(result.run_dir, "auto").metrics
    assert again["operating_point"] == result.final["operating_point"] and again["auc_difference"] < 1e-9
    other = evaluate_run(result.run_dir, "best").metrics
    assert other["checkpoint"] == "best.pt" and other["reported_auc"] is None
    assert other["operating_point"]["fitted_on"].startswith("select (n=")


@pytest.mark.slow
def test_a_run_logs_to_mlflow_when_asked(featured_run):
    from mlflow.tracking import MlflowClient

    result, results, _ = featured_run
    assert not (result.run_dir / "tensorboard").exists()
    client = MlflowClient((results / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("gliograde").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["depth"] == "10"
    history = client.get_metric_history(run.info.run_id, "val/auc")
    assert [m.value for m in history] == pytest.approx([h["val_auc"] for h in result.history])
    assert {"metrics", "config", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_resume_with_another_configuration_or_global_batch_is_refused(tiny_cache, tmp_path):
    """One trained epoch, refused three times: another configuration (its last.pt left as it was), then as a run of
    2 processes with another global batch would have saved it, with and without a recorded batch plan."""
    run = train_fold(tiny(tiny_cache, tmp_path, epochs=1, min_epochs=1)).run_dir
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(GliogradeError, match=r"another configuration \(differs in \['lr'\]\)"):
        train_fold(tiny(tiny_cache, tmp_path, epochs=1, min_epochs=1, lr=5e-4, resume=str(run)))
    assert last.read_bytes() == before
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["world"] == 1 and len(ckpt["rng_state"]["ranks"]) == 1  # each rank's own generators
    assert ckpt["batch_plan"]["global"] == 4
    # as a --batch-per-gpu run of 2 processes would have saved it: another global batch, another schedule
    torch.save({**ckpt, "world": 2, "batch_plan": {**ckpt["batch_plan"], "global": 8, "processes": 2}}, last)
    with pytest.raises(GliogradeError, match=r"global batch of 8 \(2 process\(es\)\); this would be 4 \(1\)"):
        train_fold(tiny(tiny_cache, tmp_path, epochs=1, min_epochs=1, resume=str(run)))
    old = {k: v for k, v in ckpt.items() if k != "batch_plan"}  # a run saved before the plan: B x A x processes
    torch.save({**old, "world": 2}, last)
    with pytest.raises(GliogradeError, match="global batch of 8"):
        train_fold(tiny(tiny_cache, tmp_path, epochs=1, min_epochs=1, resume=str(run)))


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_gives_the_uninterrupted_result(small_cache, tmp_path):
    small = {"epochs": 4, "min_epochs": 4, "ema_decay": 0.9, "folds": 3}  # conftest's twelve phantoms
    full = train_fold(tiny(small_cache, tmp_path / "a", **small))

    def stop_after_two(epoch, run_dir):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(tiny(small_cache, tmp_path / "b", **small), on_epoch_end=stop_after_two)
    run_b = next((tmp_path / "b" / "res" / "runs" / "fold_0").iterdir())
    assert json.loads((run_b / "metrics" / "metrics.json").read_text())["status"] == "running"
    resumed = train_fold(tiny(small_cache, tmp_path / "b", **small, resume=str(run_b)))
    assert resumed.run_dir == run_b
    a = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run_b / "checkpoints" / "last.pt", weights_only=True)
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k]), k
    for k, v in a["ema_state_dict"].items():
        assert torch.equal(v, b["ema_state_dict"][k]), k
    timing = {"epoch_time_s", "train_time_s", "val_time_s", "train_volumes_per_s", "data_wait_fraction"}
    strip = [{k: v for k, v in h.items() if k not in timing} for h in full.history]
    # json_safe: an undefined metric (NaN: a grade absent from the monitored set) compares equal as null
    assert json_safe(strip) == json_safe([{k: v for k, v in h.items() if k not in timing} for h in resumed.history])
    assert resumed.final["auc"] == full.final["auc"]


# ----------------------------------------------------------------------------------------------- faults
@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_step(tiny_cache, tmp_path):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.path, copy)
    volumes = np.load(copy / "volumes.npy", mmap_mode="r+")
    volumes[:] = np.nan
    volumes.flush()
    with pytest.raises(GliogradeError, match=r"non-finite training loss .* at epoch 1, step 1"):
        train_fold(tiny(open_cache(copy), tmp_path))
    run = next((tmp_path / "res" / "runs" / "fold_0").iterdir())
    metrics = json.loads((run / "metrics" / "metrics.json").read_text())  # nothing presented as a result:
    assert metrics["status"] == "failed" and "non-finite training loss" in metrics["reason"]
    assert metrics["final"] is None


def test_a_run_that_fails_in_its_set_up_is_marked_failed_with_the_reason(tiny_cache, tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(GliogradeError):
        train_fold(tiny(tiny_cache, tmp_path, pretrained_path=str(bad)))
    run = next((tmp_path / "res" / "runs" / "fold_0").iterdir())
    metrics = json.loads((run / "metrics" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and str(bad) in metrics["reason"]
    from gliograde.runs import run_status

    assert run_status(run).startswith("failed: ")


def test_bad_requests_get_clear_errors(tiny_cache, tmp_path, capsys):
    with pytest.raises(GliogradeError, match="exceeds the 15 training cases"):
        train_fold(tiny(tiny_cache, tmp_path, batch_size=32))
    code = main(["train", "--preset", "cpu-demo", "--size", "16", "--fold", "7", "--cache-dir", str(tiny_cache.path)])
    assert code == 2 and "--fold 7 is outside 0..4" in capsys.readouterr().err
    code = main(
        ["train", "--preset", "cpu-demo", "--data-root", str(tmp_path / "nothing"), "--cache-dir", str(tmp_path / "c")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "gliograde demo" in err and "Traceback" not in err


def test_two_runs_in_the_same_second_get_their_own_folders(tmp_path):
    runs = {new_run_dir(str(tmp_path), 0) for _ in range(3)}
    assert len(runs) == 3 and all((r / "checkpoints").is_dir() for r in runs)


# ------------------------------------------------------------------------------------ the seeds' commands
SEED_COMMANDS = {
    "integration": (
        "--fold 0 --pretrained-path pretrained/medicalnet_resnet50_3d.pth --lr 2e-4 --batch_size 6 "
        "--epochs 60 --optimizer adam --loss LDAM --scheduler cosine --dropout 0.4 --grad_clip 0.5 "
        "--gradient_accumulation_steps 2 --ema_decay 0.999 --multi_gpu --gpu --amp",
        {
            "lr": 2e-4,
            "batch_size": 6,
            "epochs": 60,
            "loss": "ldam",
            "dropout": 0.4,
            "grad_clip": 0.5,
            "grad_accum": 2,
            "ema_decay": 0.999,
            "multi_gpu": True,
            "gpu": True,
            "amp": True,
        },
    ),
    "single": (
        "--fold 0 --modality flair --epochs 50 --batch-size 4 --lr 1e-4 --amp --tf32",
        {"modalities": ["flair"], "epochs": 50, "batch_size": 4, "amp": True, "tf32": True},
    ),
    "custom": (
        "--fold 0 --modality flair --epochs 50 --batch-size 4 --lr 5e-4 --drw-start-epoch 20 --max-m 0.6 "
        "--early-stopping 10 --grad-clip 1.0",
        {"lr": 5e-4, "drw_start_epoch": 20, "max_m": 0.6, "patience": 10, "grad_clip": 1.0},
    ),
    "full": (
        "--fold 0 --lr 1e-4 --batch-size 4 --epochs 50 --early-stopping 7 --optimizer adam --multi-gpu --gpu",
        {"patience": 7, "optimizer": "adam", "multi_gpu": True, "modalities": ["t1", "t1ce", "t2", "flair"]},
    ),
    "pretrained": (
        "--fold 0 --modality flair --pretrained-path /path/to/medicalnet/resnet_50_23dataset.pth "
        "--epochs 50 --batch-size 4 --lr 1e-4",
        {"pretrained_path": "/path/to/medicalnet/resnet_50_23dataset.pth"},
    ),
    "multi": ("--fold 0 --modality flair --multi-gpu --batch-size 4 --epochs 50", {"multi_gpu": True}),
}


@pytest.mark.parametrize("name", list(SEED_COMMANDS))
def test_every_seed_command_line_parses_to_the_intended_configuration(name):
    line, expected = SEED_COMMANDS[name]
    cfg = config_from_args(build_parser().parse_args(["train", *shlex.split(line)]))
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    assert cfg.preset == "final" and cfg.fold == 0


def test_ldam_drw_preset_is_the_guides_defaults():
    cfg = resolve("ldam-drw")
    assert (cfg.modalities, cfg.loss, cfg.max_m, cfg.ldam_s, cfg.drw_start_epoch, cfg.sampler, cfg.dropout) == (
        ["flair"],
        "ldam",
        0.5,
        30.0,
        15,
        "shuffle",
        0.5,
    )
    assert (cfg.patience, cfg.min_epochs, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == (
        7,
        10,
        50,
        4,
        1e-4,
        1e-4,
    )
    final = resolve("final")
    assert (
        final.loss,
        final.sampler,
        final.grad_accum,
        final.classifier_lr_mult,
        final.dropout,
        final.patience,
        final.min_epochs,
        final.ema_decay,
        final.seed,
    ) == ("ce", "weighted", 2, 2.0, 0.4, 10, 15, 0.0, 42)


def test_the_seeds_script_runs_as_written_with_dry_run():
    cmd = [
        sys.executable,
        "scripts/training/train_resnet50_3d.py",
        *shlex.split(SEED_COMMANDS["integration"][0]),
        "--dry-run",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert printed["loss"] == "ldam" and printed["ema_decay"] == 0.999 and printed["grad_accum"] == 2
    assert printed["selection"] == "outer"  # the seeds' script keeps the seeds' protocol
    assert "would train fold 0" in out.stdout and "triple balancing" in out.stderr


def test_a_config_file_sits_between_the_preset_and_the_flags(tmp_path, capsys):
    from gliograde.config import ConfigError, resolve_with_sources

    path = tmp_path / "exp.yaml"
    path.write_text("lr: 5.0e-4\nepochs: 7\nmodalities: [flair]\n")
    cfg, sources = resolve_with_sources("cpu-demo", path, epochs=9)
    assert (cfg.lr, cfg.epochs, cfg.depth, cfg.modalities) == (5e-4, 9, 10, ["flair"])
    assert sources["lr"] == f"file {path}" and sources["epochs"] == "command line"
    assert sources["depth"] == "preset cpu-demo" and sources["tf32"] == "default"
    for text, hint in (("learning_rate: 1\n", "did you mean 'lr'"), ("batchsize: 2\n", "did you mean 'batch_size'")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=hint):
            resolve_with_sources("final", path)
    path.write_text("lr: 5.0e-4\n")
    assert main(["train", "--preset", "cpu-demo", "--config", str(path), "--dry-run"]) == 0
    assert f"0.0005  (file {path})" in capsys.readouterr().out


def test_mil2d_takes_depth_18_unless_a_file_or_the_command_line_gives_one(tmp_path, capsys):
    """The 3D presets' depth (10, 50) does not leak into --model mil2d (issue 21, §1)."""
    from gliograde.config import resolve_with_sources

    for preset in ("cpu-demo", "final", "ldam-drw"):
        for command in ("train", "cv"):
            args = build_parser().parse_args([command, "--model", "mil2d", "--preset", preset])
            cfg = check_config(config_from_args(args))
            assert (cfg.model, cfg.depth) == ("mil2d", 18), (preset, command)
    cfg, sources = resolve_with_sources("final", model="mil2d")
    assert (cfg.depth, sources["depth"]) == (18, "default (mil2d)")
    cfg, sources = resolve_with_sources("final", model="mil2d", depth=34)
    assert (cfg.depth, sources["depth"]) == (34, "command line")
    assert resolve("cpu-demo").depth == 10 and resolve("final", model="resnet3d").depth == 50  # 3D: unchanged
    path = tmp_path / "mil.yaml"
    path.write_text("model: mil2d\ndepth: 34\n")
    assert resolve("cpu-demo", path).depth == 34
    path.write_text("model: mil2d\n")
    assert resolve("cpu-demo", path).depth == 18
    path.write_text("depth: 50\n")  # a depth asked for in a file is validated, not replaced
    with pytest.raises(ConfigError, match="not a 2D ResNet depth"):
        check_config(resolve("cpu-demo", path, model="mil2d"))
    with pytest.raises(ConfigError, match="not a 2D ResNet depth"):
        check_config(resolve("cpu-demo", model="mil2d", depth=10))
    assert main(["train", "--model", "mil2d", "--preset", "cpu-demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "18  (default (mil2d))" in out
