"""The one owner of device and precision: the decisions training, evaluate and predict share, tested on the CPU by
forcing what the GPU logic sees."""

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


def _model_and_input(batch=2, size=24):
    torch.manual_seed(0)
    return ResNet3D(10, 4, 2), torch.randn(batch, 4, size, size, size)


def test_the_layer_by_layer_diagnostic_passes_correct_kernels_and_leaves_the_model_as_it_was():
    model, x = _model_and_input()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    d = runtime.precision_diagnostic(model, x)
    assert d["passed"] and d["input"] == [2, 4, 24, 24, 24] and d["dtype"] == "bfloat16"
    assert d["layers"] == 13  # ResNet-10: conv1, 4 stages x 2 convs, 3 downsampling convs, the fc layer
    assert set(d["stage_errors"]) == {"conv1", "layer1", "layer2", "layer3", "layer4", "fc"}
    # measured: one bf16 rounding per layer, ~2^-8.4 (2.8e-3 to 5.6e-3 on ResNet-10/-50 at 24^3 to 64^3, any seed),
    # a tenth of the tolerance; end to end through a fresh network the same kernels drift by 0.04-0.7, which is why
    # the end-to-end error is reported and not judged
    assert 1e-3 < d["worst"] < 0.01 and d["tolerance"] == 0.05
    assert d["logits_error"] > 0
    assert not model.training and (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.fixture
def broken_bf16_conv(monkeypatch):
    """What a wrong bf16 kernel (cuDNN 9.10.2, PyTorch #163539) looks like from outside: garbage under bf16 only."""
    real = torch.nn.functional.conv3d

    def broken(inp, *a, **k):
        out = real(inp, *a, **k)
        return out * 7 + 3 if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(torch.nn.functional, "conv3d", broken)


def test_a_wrong_bf16_kernel_fails_the_diagnostic_at_its_first_layer(broken_bf16_conv):
    model, x = _model_and_input()
    d = runtime.precision_diagnostic(model, x)
    assert not d["passed"] and d["worst"] > 1 and d["stage_errors"]["conv1"] > 1
    assert d["stage_errors"]["fc"] < 0.05  # the linear layer's kernel is fine: the fault is located, not smeared


def _cuda(monkeypatch, capability, name="Tesla V100-SXM2-32GB"):
    """What the precision rule sees of a GPU, on a CPU machine."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return torch.device("cuda", 0)


def test_auto_is_bf16_from_compute_capability_8_and_fp16_with_a_scaler_below(monkeypatch):
    monkeypatch.setattr(runtime, "known_bad_bf16_stack", lambda: None)
    v100 = _cuda(monkeypatch, (7, 0))
    p = runtime.decide_precision("auto", None, v100)  # torch.cuda.is_bf16_supported() says True here (emulated)
    assert p.name == "fp16" and p.needs_scaler and "compute capability 7.0 < 8.0" in p.reason
    with pytest.raises(DeviceError, match=r"compute capability 7\.0 < 8\.0\) has no native bf16") as e:
        runtime.decide_precision("bf16", None, v100)
    assert "\n" not in str(e.value)
    h100 = _cuda(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    assert runtime.decide_precision("auto", None, h100).name == "bf16"
    assert runtime.decide_precision("auto", False, h100).name == "fp32"  # --no-amp
    assert runtime.decide_precision("fp16", None, h100).needs_scaler


def test_a_stack_known_to_compute_bf16_wrongly_runs_fp16_under_auto_and_refuses_forced_bf16(monkeypatch, caplog):
    assert "issue #163539" in runtime.known_bad_bf16_stack("2.8.0+cu128", 91002)
    assert runtime.known_bad_bf16_stack("2.9.1", 91002) is None  # PyTorch 2.9 routes around it
    assert runtime.known_bad_bf16_stack("2.8.0", 91500) is None  # cuDNN 9.15 fixes it
    assert runtime.known_bad_bf16_stack("2.13.0", None) is None  # no cuDNN (this CPU build)
    monkeypatch.setattr(runtime, "known_bad_bf16_stack", lambda: "torch 2.8.0 with cuDNN 9.10.2 computes ...")
    a100 = _cuda(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    p = runtime.decide_precision("auto", None, a100)
    assert p.name == "fp16" and p.warning.startswith("torch 2.8.0") and "fp16 autocast" in caplog.text
    with pytest.raises(DeviceError, match=r"--precision bf16: torch 2\.8\.0"):
        runtime.decide_precision("bf16", None, a100)


def test_a_recorded_decision_is_reused_on_the_same_kind_of_device_only():
    cpu = torch.device("cpu")
    bf16 = runtime.Precision("bf16", "bf16 autocast (NVIDIA H100: compute capability >= 8.0)").to_dict()
    assert runtime.reuse_precision(bf16, "cpu: x86_64", cpu).name == "bf16"
    on_cpu = runtime.reuse_precision(bf16, "cuda: NVIDIA H100", cpu)  # a GPU run scored on the CPU
    assert on_cpu.name == "fp32" and "trained in bf16 on cuda: NVIDIA H100" in on_cpu.reason
    assert runtime.reuse_precision(bf16, "cpu: x86_64", cpu, "fp32").name == "fp32"  # explicit wins
    assert runtime.reuse_precision(None, None, cpu).name == "fp32"
    assert runtime.Precision.from_dict(bf16) == runtime.Precision.from_dict(bf16)


def test_precision_decisions():
    cpu = torch.device("cpu")
    assert runtime.decide_precision("auto", None, cpu).name == "fp32"  # the CPU runs fp32 unless --amp
    assert runtime.decide_precision("auto", False, cpu).name == "fp32"
    assert runtime.decide_precision("auto", True, cpu).name == "bf16"  # by rule, no numerical gate
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
