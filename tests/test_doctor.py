"""`gliograde doctor`: healthy CPU machine is exit 0 with the figures; a device asked for and missing is exit 1."""

import json

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
    assert r["bf16_check"]["passed"] and r["bf16_check"]["gradient_rel_error"] > 0  # measured, not assumed
    assert r["cache"]["writable"] and r["cache"]["size_gib"] == pytest.approx(4096 / 2**30, abs=1e-3)
    assert r["cache"]["free_disk_gib"] > 0 and r["threads"] >= 1
    text = capsys.readouterr().out
    assert "bf16 self-check" in text and "passed" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
def test_doctor_asked_for_cuda_without_it_exits_1_with_one_line(capsys):
    assert main(["doctor", "--device", "cuda", "--no-compile-check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gliograde doctor: ") and "CUDA is not available" in err and "\n" not in err


def test_doctor_names_an_unwritable_cache_folder(tmp_path, capsys):
    from gliograde import doctor

    report = doctor.diagnose("cpu", str(tmp_path), compile_check=False)
    report["cache"]["writable"] = False
    assert doctor.problems(report, "cpu") == [f"the cache folder {tmp_path} is not writable"]
