"""`gliograde doctor`: healthy CPU machine is exit 0 with the figures; a device asked for and missing is exit 1."""

import json
from pathlib import Path

import pytest
import torch

from gliograde.cli import main


def test_doctor_on_a_healthy_cpu_machine_reports_and_exits_0(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    cache = tmp_path / "cache"
    (cache / "c").mkdir(parents=True)
    (cache / "c" / "volumes.npy").write_bytes(b"\0" * 4096)
    rc = main(["doctor", "--device", "cpu", "--cache-dir", str(cache), "--json", str(out), "--no-compile-check"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["versions"]["torch"] == torch.__version__ and r["gpus"] == [] and r["problems"] == []
    d = r["precision_diagnostic"]
    assert d["passed"] and 0 < d["worst"] < d["tolerance"] and d["input"] == [2, 4, 32, 32, 32]  # measured
    assert r["precision"]["name"] == "fp32"
    assert r["cache"]["writable"] and r["cache"]["exists"] and "size_gib" not in r["cache"]
    assert r["cache"]["free_disk_gib"] > 0 and r["temp"]["free_disk_gib"] > 0 and r["threads"] >= 1
    text = capsys.readouterr().out
    assert "vs fp32 layer by layer" in text and "passed" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
def test_doctor_asked_for_cuda_without_it_exits_1_with_one_line(capsys):
    assert main(["doctor", "--device", "cuda", "--no-compile-check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gliograde doctor: ") and "CUDA is not available" in err and "\n" not in err


def test_doctor_reports_free_space_without_walking_the_folders(tmp_path, monkeypatch):
    """A shared /tmp of millions of files took 34 s to walk, and a folder another process removed during the walk was
    a raw FileNotFoundError: the folders are never walked, only their disk's free space is read."""
    import os
    import pathlib
    import shutil

    from gliograde import doctor

    def removed_meanwhile(*args, **kwargs):
        raise FileNotFoundError("a folder another process removed during the walk")

    asked = []

    def disk_usage(path):  # statvfs: 7 GiB free wherever the path exists
        asked.append(Path(path))
        if not Path(path).exists():
            raise FileNotFoundError(path)
        return shutil._ntuple_diskusage(100 * 2**30, 93 * 2**30, 7 * 2**30)

    for owner, name in ((pathlib.Path, "rglob"), (pathlib.Path, "glob"), (pathlib.Path, "iterdir"), (os, "walk"),
                        (os, "scandir"), (os, "listdir")):  # fmt: skip
        monkeypatch.setattr(owner, name, removed_meanwhile)
    monkeypatch.setattr(doctor.shutil, "disk_usage", disk_usage)
    (tmp_path / "cache").mkdir()
    want = {"path": str(tmp_path / "cache"), "exists": True, "writable": True, "free_disk_gib": 7.0}
    assert doctor._folder(tmp_path / "cache") == want
    f = doctor._folder(tmp_path / "not" / "yet")  # the first existing parent's disk
    assert not f["exists"] and f["writable"] and f["free_disk_gib"] == 7.0 and asked[-1] == tmp_path


def test_doctor_names_an_unwritable_cache_folder(tmp_path, capsys):
    from gliograde import doctor

    report = doctor.diagnose("cpu", str(tmp_path), compile_check=False)
    report["cache"]["writable"] = False
    assert doctor.problems(report) == [f"the cache folder {tmp_path} is not writable"]


def test_doctor_is_seeded_so_two_runs_report_the_same_figures(tmp_path):
    from gliograde import doctor

    a = doctor.diagnose("cpu", str(tmp_path), compile_check=False)["precision_diagnostic"]
    torch.manual_seed(123)  # whatever the process did before
    torch.randn(10)
    b = doctor.diagnose("cpu", str(tmp_path), compile_check=False)["precision_diagnostic"]
    assert a["stage_errors"] == b["stage_errors"] and a["logits_error"] == b["logits_error"]


def test_a_failed_diagnostic_on_a_gpu_is_a_problem_under_device_auto_too(tmp_path):
    """`doctor --device auto` on a GPU whose kernels disagree must not exit 0 (the report as a GPU would give it)."""
    from gliograde import doctor

    report = doctor.diagnose("cpu", str(tmp_path), compile_check=False)
    assert doctor.problems(report) == []  # on the CPU the diagnostic is for information
    report["device"] = "cuda:0"
    report["precision_diagnostic"].update(passed=False, worst=3.2, worst_layer="layer3.0.conv2")
    (found,) = doctor.problems(report)
    assert "bfloat16 convolutions disagree with fp32" in found and "layer3.0.conv2 off by 3.20e+00" in found
