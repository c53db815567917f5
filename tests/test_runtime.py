"""The one owner of device and precision: the decisions training, evaluate and predict share, tested on the CPU by
forcing what the GPU logic sees."""

import json
import subprocess
import sys

import pytest
import torch

from gliograde import runtime
from gliograde.networks.resnet3d import ResNet3D
from gliograde.runtime import DeviceError


def test_cuda_without_cuda_is_a_one_line_error_and_auto_falls_back():
    with pytest.raises(DeviceError, match="CUDA is not available") as e:
        runtime.pick_device("cuda", cuda=False)
    assert "\n" not in str(e.value)
    assert runtime.pick_device("auto", cuda=False) == torch.device("cpu")
    assert runtime.pick_device("auto", local_rank=3, cuda=True) == torch.device("cuda", 3)  # its own GPU under DDP
    assert runtime.pick_device("cpu", cuda=True) == torch.device("cpu")
    with pytest.raises(DeviceError, match="not auto, cuda or cpu"):
        runtime.pick_device("tpu")


def _model_and_input():
    torch.manual_seed(0)
    return ResNet3D(10, 4, 2), torch.randn(2, 4, 24, 24, 24)


def test_bf16_check_passes_a_correct_kernel_and_leaves_the_model_as_it_was():
    model, x = _model_and_input()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = runtime.bf16_check(model, x)
    assert check["input"] == [2, 4, 24, 24, 24]
    # the figures in a fresh interpreter: after some other tests of the suite this process's state (not pinned down
    # yet, see the stop note) once gave the fresh model a gradient error of 2e30 with the same feature error
    code = (
        "import json, torch\nfrom gliograde import runtime\nfrom gliograde.networks.resnet3d import ResNet3D\n"
        "torch.manual_seed(0)\nm, x = ResNet3D(10, 4, 2), torch.randn(2, 4, 24, 24, 24)\nm.train()\n"
        "c = runtime.bf16_check(m, x)\nprint(json.dumps(c))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["passed"], fresh
    assert 0 < fresh["feature_rel_error"] < runtime.FEATURE_TOLERANCE
    assert 0 < fresh["gradient_rel_error"] < runtime.GRADIENT_TOLERANCE
    assert fresh["feature_rel_error"] == pytest.approx(check["feature_rel_error"])  # the same model and input
    assert model.training and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched (the check runs in eval mode)
        assert torch.equal(v, before[k]), k


@pytest.fixture
def broken_bf16_conv(monkeypatch):
    """What a wrong bf16 kernel (cuDNN 9.10.2, PyTorch #163539) looks like from outside: garbage under bf16 only."""
    real = torch.nn.functional.conv3d

    def broken(inp, *a, **k):
        out = real(inp, *a, **k)
        return out * 7 + 3 if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(torch.nn.functional, "conv3d", broken)


def test_a_wrong_bf16_kernel_fails_the_check_then_auto_means_fp32_with_a_recorded_warning(broken_bf16_conv, caplog):
    model, x = _model_and_input()
    assert not runtime.bf16_check(model, x)["passed"]
    p = runtime.decide_precision("auto", True, torch.device("cpu"), model, x)
    assert p.name == "fp32" and p.dtype is None
    assert "disagrees with fp32" in p.warning and p.to_dict()["warning"] == p.warning
    assert p.check["passed"] is False
    assert "disagrees with fp32" in caplog.text


def test_a_failed_check_of_forced_bf16_is_an_error(broken_bf16_conv):
    model, x = _model_and_input()
    with pytest.raises(DeviceError, match="--precision bf16: bf16 autocast disagrees"):
        runtime.decide_precision("bf16", None, torch.device("cpu"), model, x)


def test_precision_decisions():
    cpu = torch.device("cpu")
    assert runtime.decide_precision("auto", None, cpu).name == "fp32"  # the CPU runs fp32 unless --amp
    assert runtime.decide_precision("auto", False, cpu).name == "fp32"
    code = (  # in a fresh interpreter, for the reason given in the test above
        "import torch\nfrom gliograde import runtime\nfrom gliograde.networks.resnet3d import ResNet3D\n"
        "torch.manual_seed(0)\nm, x = ResNet3D(10, 4, 2), torch.randn(2, 4, 24, 24, 24)\n"
        "c = runtime.decide_precision('auto', True, torch.device('cpu'), m, x)\nprint(c.name, c.check['passed'])\n"
        "print(c.reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "bf16 True" and "self-check against fp32 passed" in lines[-1]
    fp16 = runtime.decide_precision("fp16", None, cpu)
    assert fp16.needs_scaler and fp16.dtype == torch.float16
    with pytest.raises(DeviceError, match="not one of"):
        runtime.decide_precision("int8", None, cpu)


def test_resume_on_fewer_gpus_restores_what_fits_and_says_so(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, i: restored.append(i))
    states = [torch.zeros(8, dtype=torch.uint8)] * 4
    note = runtime.restore_cuda_rng_states(states, visible=2)
    assert restored == [0, 1]
    assert "4 GPU(s)" in note and "has 2" in note
    assert runtime.restore_cuda_rng_states(states[:2], visible=2) is None
    assert runtime.restore_cuda_rng_states([], visible=0) is None  # a CPU run resumed on the CPU


def test_environment_records_versions_and_the_precision():
    p = runtime.decide_precision("fp32", None, torch.device("cpu"))
    env = runtime.environment(torch.device("cpu"), p)
    assert {"torch", "cuda", "cudnn", "nccl", "monai", "git_commit", "git_dirty", "threads"} <= set(env)
    assert env["precision"]["name"] == "fp32" and env["gpus"] == []
