"""RunLogger: TensorBoard event files and an MLflow file store written, then read back with their own readers."""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from gliograde.errors import GliogradeError
from gliograde.training import tracking
from gliograde.training.tracking import RunLogger, flatten_params, resolve_mlflow_uri, scalar_tag

PARAMS = {
    "model": "resnet50",
    "lr": 3e-4,
    "epochs": 3,
    "amp": True,
    "modalities": ["t1", "t1ce", "t2", "flair"],
    "note": "x" * 900,
    "resume": None,
    "nested": {"a": 1},
}


def history() -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 0.7 - 0.1 * e,
            "val_loss": 0.75 - 0.05 * e,
            "val_auc": 0.6 + 0.1 * e,
            "val_f1": 0.5 + 0.05 * e,
            "lr_backbone": 1e-4 / e,
            "lr_head": 1e-3 / e,
            "drw_active": e == 3,
            "train_volumes_per_s": 10.0 + e,
            "data_wait_fraction": 0.1,
            "peak_gpu_memory_gib": None,
            "ema_val_auc": 0.55 + 0.1 * e,
            "device": "cpu",
        }
        for e in (1, 2, 3)
    ]


FINAL = {
    "auc": 0.91,
    "f1": 0.8,
    "balanced_accuracy": 0.85,
    "threshold": 0.5,
    "checkpoint": "best",
    "calibration": {"ece": 0.07, "reliability": [[0.1, 0.2]]},
    "auc_ci": [0.8, 0.95],
}


def make_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "results" / "ResNet50-3D" / "runs" / "fold_0" / "run_20260101_000000"
    for sub in ("metrics", "plots", "config"):
        (run_dir / sub).mkdir(parents=True)
    from matplotlib import image

    for name, colour in (("loss", (1.0, 0.0, 0.0)), ("roc", (0.0, 0.0, 1.0))):
        img = np.zeros((8, 12, 3), dtype=np.float32)
        img[...] = colour
        image.imsave(run_dir / "plots" / f"{name}.png", img)
    (run_dir / "metrics" / "metrics.json").write_text(json.dumps({"final": FINAL, "history": history()}))
    (run_dir / "config" / "config.json").write_text(json.dumps(PARAMS))
    return run_dir


def log_all(logger: RunLogger, run_dir: Path) -> None:
    for record in history():
        logger.log_epoch(record)
    figures = sorted((run_dir / "plots").glob("*.png"))
    logger.log_final(FINAL, figures, [run_dir / "metrics" / "metrics.json", run_dir / "plots", run_dir / "config"])
    logger.close()


def test_tags_and_params():
    assert scalar_tag("train_loss") == "loss/train"
    assert scalar_tag("val_loss") == "loss/val"
    assert scalar_tag("val_auc") == "val/auc"
    assert scalar_tag("ema_val_auc") == "ema/val_auc"
    assert scalar_tag("lr_backbone") == "lr/backbone"
    assert scalar_tag("train_volumes_per_s") == "speed/volumes_per_s"
    assert scalar_tag("something") == "other/something"
    flat = flatten_params(PARAMS)
    assert flat["modalities"] == "t1,t1ce,t2,flair"
    assert len(flat["note"]) == 500
    assert flat["nested.a"] == 1 and flat["lr"] == 3e-4 and flat["amp"] is True and flat["resume"] == "None"


def test_default_mlflow_store_is_beside_runs(tmp_path):
    run_dir = tmp_path / "out" / "runs" / "fold_1" / "run_x"
    assert resolve_mlflow_uri("", run_dir) == (tmp_path / "out" / "mlruns").as_uri()
    assert (
        resolve_mlflow_uri("default", run_dir.parent.parent / "repeat_2" / "fold_1" / "run_y")
        == (tmp_path / "out" / "mlruns").as_uri()
    )
    assert resolve_mlflow_uri(str(tmp_path / "store"), run_dir) == (tmp_path / "store").as_uri()
    assert resolve_mlflow_uri("http://localhost:5000", run_dir) == "http://localhost:5000"


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = make_run(tmp_path)
    logger = RunLogger(run_dir, tensorboard=True, params=PARAMS)
    assert logger.tensorboard_on and not logger.mlflow_on
    log_all(logger, run_dir)

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    hist = history()
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx([h["train_loss"] for h in hist])
    assert [e.value for e in acc.Scalars("val/auc")] == pytest.approx([h["val_auc"] for h in hist])
    assert [e.value for e in acc.Scalars("lr/head")] == pytest.approx([h["lr_head"] for h in hist])
    assert [e.value for e in acc.Scalars("train/drw_active")] == [0.0, 0.0, 1.0]
    for tag in ("loss/val", "val/f1", "lr/backbone", "speed/volumes_per_s", "speed/data_wait_fraction", "ema/val_auc"):
        assert tag in tags["scalars"]
    assert "system/peak_gpu_memory_gib" not in tags["scalars"]  # None is skipped
    assert "other/device" not in tags["scalars"]  # so are strings
    assert acc.Scalars("final/auc")[0].value == pytest.approx(0.91)
    assert acc.Scalars("final/calibration.ece")[0].value == pytest.approx(0.07)
    assert acc.Scalars("hparam/balanced_accuracy")[0].value == pytest.approx(0.85)
    assert sorted(tags["images"]) == ["plots/loss", "plots/roc"]
    img = acc.Images("plots/roc")[0]
    assert (img.width, img.height) == (12, 8)
    # the hparams plugin's session holds the flattened params
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model"].string_value == "resnet50"
    assert start.hparams["epochs"].number_value == 3
    assert start.hparams["modalities"].string_value == "t1,t1ce,t2,flair"


def test_mlflow_file_store_read_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the logger sets it for a file store
    run_dir = make_run(tmp_path)
    logger = RunLogger(run_dir, tensorboard=False, mlflow_uri="default", run_name="fold_0_test", params=PARAMS)
    assert logger.mlflow_on and not logger.tensorboard_on
    run_id = logger.mlflow_run_id
    log_all(logger, run_dir)
    assert not (run_dir / "tensorboard").exists()

    store = tmp_path / "results" / "ResNet50-3D" / "mlruns"
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "fold_0_test" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "gliograde"
    params = run.data.params
    assert params["model"] == "resnet50" and params["modalities"] == "t1,t1ce,t2,flair"
    assert params["epochs"] == "3" and len(params["note"]) == 500 and params["nested.a"] == "1"
    hist = client.get_metric_history(run_id, "val/auc")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2, 3]
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx([h["val_auc"] for h in history()])
    assert run.data.metrics["final/auc"] == pytest.approx(0.91)
    assert "system/peak_gpu_memory_gib" not in run.data.metrics
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"metrics", "plots", "config"}
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/loss.png", "plots/roc.png"}
    assert [a.path for a in client.list_artifacts(run_id, "metrics")] == ["metrics/metrics.json"]

    # a second run lands in the same experiment
    second = RunLogger(run_dir, tensorboard=False, mlflow_uri="default", run_name="again")
    second.close("FAILED")
    assert client.get_run(second.mlflow_run_id).info.experiment_id == run.info.experiment_id
    assert client.get_run(second.mlflow_run_id).info.status == "FAILED"


def test_tensorboard_off_writes_nothing(tmp_path):
    run_dir = make_run(tmp_path)
    logger = RunLogger(run_dir, tensorboard=False)
    assert not logger.tensorboard_on and not logger.mlflow_on
    log_all(logger, run_dir)
    assert not (run_dir / "tensorboard").exists()


def test_failing_tensorboard_warns_once_and_goes_off(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    run_dir = make_run(tmp_path)
    logger = RunLogger(run_dir, tensorboard=True)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise OSError(28, "No space left on device")

    logger._writer.add_scalar = broken
    with caplog.at_level(logging.WARNING, logger="gliograde"):
        log_all(logger, run_dir)  # no exception
    warnings = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert len(calls) == 1 and not logger.tensorboard_on


def test_failing_mlflow_warns_once_and_goes_off(tmp_path, caplog):
    pytest.importorskip("mlflow")
    run_dir = make_run(tmp_path)
    logger = RunLogger(run_dir, tensorboard=False, mlflow_uri=str(tmp_path / "store"))

    def broken(*args, **kwargs):
        raise OSError("store is read-only")

    logger._client.log_batch = broken
    with caplog.at_level(logging.WARNING, logger="gliograde"):
        log_all(logger, run_dir)
    warnings = [r for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "read-only" in warnings[0].getMessage()
    assert not logger.mlflow_on


def test_unreachable_mlflow_store_warns(tmp_path, caplog):
    pytest.importorskip("mlflow")
    run_dir = make_run(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="gliograde"):
        logger = RunLogger(run_dir, tensorboard=False, mlflow_uri=str(blocker / "store"))
    assert not logger.mlflow_on and any("MLflow tracking off" in r.getMessage() for r in caplog.records)
    log_all(logger, run_dir)


def _hide(monkeypatch, *names):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if any(name == n or name.startswith(n + ".") for n in names):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_tensorboard_missing_warns_and_continues(tmp_path, monkeypatch, caplog):
    run_dir = make_run(tmp_path)
    _hide(monkeypatch, "torch.utils.tensorboard")
    with caplog.at_level(logging.WARNING, logger="gliograde"):
        logger = RunLogger(run_dir, tensorboard=True)
    assert [r.getMessage() for r in caplog.records] == [tracking.TB_INSTALL]
    assert not logger.tensorboard_on
    log_all(logger, run_dir)
    assert not (run_dir / "tensorboard").exists()


def test_mlflow_missing_raises_with_pip_command(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path)
    _hide(monkeypatch, "mlflow")
    with pytest.raises(GliogradeError, match="pip install mlflow"):
        RunLogger(run_dir, tensorboard=False, mlflow_uri="default")


def test_context_manager_closes(tmp_path):
    run_dir = make_run(tmp_path)
    with RunLogger(run_dir, tensorboard=False) as logger:
        logger.log_epoch(history()[0])
    assert logger._closed
    logger.log_epoch(history()[1])  # after close: a no-op
