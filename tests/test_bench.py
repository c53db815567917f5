"""`gliograde bench` end to end at toy sizes: both pipelines measured, the JSON holds what the README promises."""

from __future__ import annotations

import json

import pytest
import torch

from gliograde.cli import main


@pytest.mark.slow
def test_bench_writes_the_figures_of_both_pipelines(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--depth", "10", "--size", "16", "--batch-size", "2", "--steps", "2"]
    argv += ["--cases", "8", "--workers", "1", "--preprocess-cases", "2", "--preprocess-shape", "24", "24", "20"]
    assert main([*argv, "--json", str(out), "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu")
    for name in ("baseline", "fast"):
        r = report[name]
        assert r["data_vols_per_s"] > 0 and r["train_vols_per_s"] > 0 and r["peak_mem_bytes"] > 0
        assert 0 <= r["data_wait_fraction"] < 1 and r["mfu"] is None  # no MFU without a known GPU peak
    assert report["speedup"]["data"] == report["fast"]["data_vols_per_s"] / report["baseline"]["data_vols_per_s"]
    assert report["preprocess"]["cases"] == 2 and report["preprocess"]["sequential_cases_per_s"] > 0
    assert report["gflop_per_volume_train"] > 0
    table = capsys.readouterr().out
    assert "baseline (DataLoader+MONAI)" in table and "fast / baseline" in table
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_trainer_times_the_real_train_fold_and_projects_the_cv(tmp_path, capsys):
    out = tmp_path / "trainer.json"
    rc = main(
        ["bench", "--trainer", "--device", "cpu", "--depth", "10", "--size", "16", "--batch-size", "4", "--cases",
         "24", "--epochs", "2", "--min-steps", "1", "--channels", "2", "--workdir", str(tmp_path / "w"), "--json",
         str(out)]
    )  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    # the figures are the run's own history: the run folder it came from is a real train_fold run
    run = next((tmp_path / "w" / "results" / "runs" / "fold_0").iterdir())
    history = json.loads((run / "metrics" / "metrics.json").read_text())["history"]
    assert r["train_volumes_per_s"] == pytest.approx(history[1]["train_volumes_per_s"])
    assert 0 <= r["data_wait_fraction"] <= 1 and r["peak_gpu_memory_gib"] is None and r["mfu"] is None
    assert r["activation_peak_gib"] is None and r["config"]["epochs"] == 2 and r["steady_optimizer_steps"] == 3
    assert r["precision"]["name"] == "fp32" and r["config"]["channels"] == 2
    expected = 5 * 50 * (228 / r["train_volumes_per_s"] + 57 * r["val_s_per_case"])
    assert r["projected_cv_s"] == pytest.approx(expected)
    assert r["gflop_per_volume_train"] > 0 and r["tflops"] > 0
    mil = r["mil2d"]  # the 2D MIL model timed in the same run, on the same cache
    assert mil["train_volumes_per_s"] > 0 and mil["speed_vs_3d"] == pytest.approx(
        mil["train_volumes_per_s"] / r["train_volumes_per_s"]
    )
    out_text = capsys.readouterr().out
    assert "projected CV" in out_text and "MIL ResNet18-2D" in out_text
