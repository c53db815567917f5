"""Where and how a model runs: the device, the precision (by rule; and its diagnostic), backend flags, seeding and the
environment record. Training, `evaluate` and `predict` all ask this module, so they take the same decisions.

Precision, by rule: `auto` is bf16 autocast on a GPU of compute capability >= 8.0, fp16 autocast with a GradScaler
below it, and fp32 on the CPU. A stack known to compute bf16 conv3d wrongly (torch < 2.9 with cuDNN 9.10.x, PyTorch
issue #163539) runs fp16 under auto and refuses --precision bf16. The decision is taken once per run and reused by
resume, `evaluate` and `predict`; `precision_diagnostic` compares bf16 with fp32 stage by stage, as a diagnostic
(`doctor`, `pytest -m gpu`), never as a gate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gliograde.errors import GliogradeError

log = logging.getLogger("gliograde")

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class DeviceError(GliogradeError):
    """A device or precision that was asked for and cannot be had."""


# ------------------------------------------------------------------------------------------------------ device
def pick_device(request: str = "auto", local_rank: int = 0, cuda: bool | None = None) -> torch.device:
    """auto: the GPU (this process's own under DDP) where CUDA works, else the CPU; cuda: the GPU or a one-line
    error; cpu: the CPU. `cuda` overrides the detection (tests of the GPU logic on a CPU machine)."""
    if request not in ("auto", "cuda", "cpu"):
        raise DeviceError(f"--device {request!r} is not auto, cuda or cpu")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if request == "cpu":
        return torch.device("cpu")
    if request == "cuda" and not cuda:
        raise DeviceError(
            "--device cuda / --gpu: CUDA is not available here (a CPU build of torch, or no GPU visible); "
            "install the CUDA build of torch or use --device cpu"
        )
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def configure_backends(device: torch.device, tf32: bool = True) -> None:
    """cuDNN autotuning (fixed input shapes) and TF32 matmuls/convolutions on a GPU; nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def seed_everything(seed: int) -> None:
    """The global torch (and CUDA) generators; sampling and augmentation use an explicit generator of their own."""
    torch.manual_seed(seed)


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this device: compute capability >= 8.0 (Ampere and later) of the GPU in use. Not
    `torch.cuda.is_bf16_supported()`, which counts emulation (V100, T4: slow) and looks at the current device."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True  # CPU autocast runs bf16 (slowly where the CPU has no bf16 units)


def known_bad_bf16_stack(torch_version: str | None = None, cudnn: int | None = None) -> str | None:
    """Why bf16 convolutions cannot be trusted on this stack, or None. cuDNN 9.10.x computes large bf16 conv3d
    wrongly (PyTorch issue #163539); PyTorch 2.9 and later route around it, and cuDNN 9.15 fixes it."""
    torch_version = torch_version or torch.__version__
    if cudnn is None:
        cudnn = torch.backends.cudnn.version() if torch.version.cuda and torch.backends.cudnn.is_available() else None
    if cudnn is None:
        return None
    major_minor = tuple(int(p) for p in torch_version.split("+")[0].split(".")[:2])
    if 91000 <= cudnn < 91100 and major_minor < (2, 9):
        return (
            f"torch {torch_version} with cuDNN {cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100} computes large "
            "bf16 conv3d wrongly (PyTorch issue #163539); upgrade to torch >= 2.9 or cuDNN >= 9.15"
        )
    return None


# --------------------------------------------------------------------------------------------------- precision
@dataclass
class Precision:
    """The precision a process runs in, and why. Decided once per run (`decide_precision`), recorded in config.json
    and last.pt, and reused by resume, `evaluate` and `predict` (`reuse_precision`)."""

    name: str  # bf16 | fp16 | fp32
    reason: str
    check: dict | None = None  # kept for runs recorded before the rule: the old self-check's figures
    warning: str | None = None
    requested: str = "auto"
    extra: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "requested": self.requested,
            "reason": self.reason,
            "check": self.check,
            "warning": self.warning,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Precision:
        return cls(d["name"], d.get("reason", ""), d.get("check"), d.get("warning"), d.get("requested", "auto"))


def decide_precision(request: str, amp: bool | None, device: torch.device) -> Precision:
    """The precision of a run, by rule (no numerical gate: see `precision_diagnostic`). request: auto | bf16 | fp16 |
    fp32 (--precision); amp: the seeds' --amp / --no-amp (None = not given), which only matters for auto.

    auto: bf16 autocast on a GPU of compute capability >= 8.0, fp16 autocast with a GradScaler below it, fp32 on
    the CPU (bf16 with --amp). A stack known to compute bf16 wrongly runs fp16 under auto, and refuses --precision
    bf16. This is how nnU-Net v2 and MONAI run AMP: autocast and a GradScaler, no self-check."""
    if request not in PRECISIONS:
        raise DeviceError(f"--precision {request!r} is not one of {', '.join(PRECISIONS)}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    if request == "fp32":
        return Precision("fp32", "--precision fp32", requested="fp32")
    if request == "fp16":
        return Precision("fp16", "--precision fp16: fp16 autocast with a GradScaler", requested="fp16")
    bad = known_bad_bf16_stack() if device.type == "cuda" else None
    if request == "bf16":
        if not bf16_supported(device):
            major, minor = torch.cuda.get_device_capability(device)
            raise DeviceError(
                f"--precision bf16: {gpu} (compute capability {major}.{minor} < 8.0) has no native bf16; "
                "use --precision fp16 or auto"
            )
        if bad:
            raise DeviceError(f"--precision bf16: {bad}; use --precision fp16 or fp32")
        return Precision("bf16", "--precision bf16: bf16 autocast", requested="bf16")
    wanted = amp if amp is not None else device.type == "cuda"
    if not wanted:
        why = "--no-amp" if amp is False else "the CPU (no --amp)"
        return Precision("fp32", f"fp32 on {why}")
    if device.type == "cuda" and not bf16_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        return Precision("fp16", f"fp16 autocast with a GradScaler ({gpu}: compute capability {major}.{minor} < 8.0)")
    if bad:
        log.warning("%s; running fp16 autocast with a GradScaler instead of bf16", bad)
        return Precision("fp16", "fp16 autocast with a GradScaler (bf16 is broken on this stack)", warning=bad)
    where = f"{gpu}: compute capability >= 8.0" if device.type == "cuda" else "the CPU, --amp"
    return Precision("bf16", f"bf16 autocast ({where})")


def reuse_precision(
    recorded: dict | None, recorded_device: str | None, device: torch.device, request: str = "auto", amp=None
) -> Precision:
    """The precision of a re-run (`evaluate`, `predict`) of a recorded run: an explicit --precision wins; else the
    run's own decision where it runs on the same kind of device (recorded_device: config.json's "cuda: NAME" or
    "cpu: ..."); else the rule for this device (a GPU run scored on the CPU runs fp32, and says so)."""
    if request != "auto" or amp is not None:
        return decide_precision(request, amp, device)
    if recorded and recorded_device and recorded_device.split(":")[0] == device.type:
        p = Precision.from_dict(recorded)
        return dataclasses.replace(p, reason=f"the run's own precision ({p.name}: {p.reason})")
    decided = decide_precision("auto", None, device)
    if recorded:
        return dataclasses.replace(decided, reason=f"{decided.reason}; the run trained in {recorded['name']} on "
                                                     f"{recorded_device or 'another device'}")  # fmt: skip
    return decided


KERNELS = (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear)


@torch.no_grad()
def precision_diagnostic(model, x: torch.Tensor, dtype=torch.bfloat16, tolerance: float = 0.05) -> dict:
    """Autocast in `dtype` against an fp32 reference (TF32 off), layer by layer, on `x`: during one fp32 forward pass
    every convolution and linear layer is run a second time under autocast on the same fp32 input, and the relative
    error of its output is kept (per stage: conv1 ... layer4, fc, the worst of its layers). A wrong kernel is off by
    O(1) at its own layer; correct bf16 kernels by about 2^-8 (the errors do not compound, as they would end to end
    through a fresh network). The end-to-end error of the logits is reported beside it, not judged.

    A diagnostic for `doctor` and `pytest -m gpu`, not a gate: run it at the training shapes (batch, 128^3,
    channels_last, cudnn.benchmark on) so that the kernels compared are the ones training uses. Train mode (batch
    statistics, as in training); the model is left as it was (mode, buffers, TF32 flags)."""
    was_training = model.training
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    layers: dict[str, float] = {}
    busy = [False]

    def compare(name):
        def hook(module, inputs, output):
            if busy[0]:
                return
            busy[0] = True
            try:
                with torch.autocast(x.device.type, dtype=dtype):
                    low = module(*inputs)
            finally:
                busy[0] = False
            a, b = output.double(), low.double()
            layers[name] = float((b - a).norm() / a.norm().clamp_min(1e-12))

        return hook

    hooks = [m.register_forward_hook(compare(n)) for n, m in model.named_modules() if isinstance(m, KERNELS)]
    try:
        model.train()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        reference = model(x).double()
        for h in hooks:
            h.remove()
        hooks = []
        live = dict(model.named_buffers())
        for k, v in buffers.items():  # the end-to-end pass from the same running statistics
            live[k].copy_(v)
        with torch.autocast(x.device.type, dtype=dtype):
            end_to_end = model(x).double()
    finally:
        for h in hooks:
            h.remove()
        live = dict(model.named_buffers())
        for k, v in buffers.items():
            live[k].copy_(v)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        model.train(was_training)
    stages: dict[str, float] = {}
    for name, err in layers.items():
        stage = name.split(".")[0]
        stages[stage] = max(stages.get(stage, 0.0), err) if err == err else math.nan  # NaN stays NaN
    worst = max(layers.values(), key=lambda e: math.inf if e != e else e)
    worst_layer = max(layers, key=lambda n: math.inf if layers[n] != layers[n] else layers[n])
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "input": list(x.shape),
        "channels_last": x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "layers": len(layers),
        "stage_errors": stages,
        "worst": worst,
        "worst_layer": worst_layer,
        "logits_error": float((end_to_end - reference).norm() / reference.norm().clamp_min(1e-12)),
        "tolerance": tolerance,
        "passed": bool(worst <= tolerance),  # NaN fails
    }


def oom_message(error: BaseException, batch_size: int, grad_accum: int) -> str:
    """A CUDA out-of-memory, said with the batch size and the GPU's memory, and what to change."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(index) / 2**30
        where = f"{torch.cuda.get_device_name(index)} ({total:.1f} GiB; {peak:.1f} GiB peak allocated by this run)"
    else:
        where = "the GPU"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    smaller = max(1, batch_size // 2)
    return (
        f"CUDA out of memory at --batch-size {batch_size} on {where}: {first}. Lower --batch-size (e.g. {smaller}) "
        f"and raise --gradient-accumulation-steps to {grad_accum * batch_size // smaller} to keep the effective "
        "batch; check that AMP is on and that no other process holds GPU memory"
    )


# ----------------------------------------------------------------------------------------------- RNG states
def cuda_rng_states() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def restore_cuda_rng_states(states: list, visible: int | None = None) -> str | None:
    """Restore the CUDA generators that exist here; returns a note when the run had more (or fewer) GPUs."""
    visible = torch.cuda.device_count() if visible is None else visible
    states = list(states or [])
    n = min(len(states), visible)
    for i in range(n):
        torch.cuda.set_rng_state(states[i], i)
    if len(states) != visible and states:
        return (
            f"the run saved the RNG state of {len(states)} GPU(s), this machine has {visible}: restored {n}; "
            "sampling and augmentation are unaffected (their generator is on the CPU), dropout draws differ"
        )
    return None


# --------------------------------------------------------------------------------------------- environment
def git_state() -> dict:
    """The commit of the code that ran and whether its work tree had uncommitted changes (None outside git)."""
    here = Path(__file__).parent

    def git(*args):
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit or None, "git_dirty": None if status is None else bool(status)}


def gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 2),
                "capability": f"{p.major}.{p.minor}",
            }
        )
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from gliograde import __version__

    try:  # read from its metadata: importing MONAI to ask costs 2.4 s of CPU in every process that trains
        monai = version("monai")
    except PackageNotFoundError:
        monai = None

    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # NCCL absent from this build
            nccl = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": nccl,
        "monai": monai,
        "gliograde": __version__,
    }


def environment(device: torch.device, precision: Precision | None = None) -> dict:
    """What a run records of where it ran."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        **versions(),
        **git_state(),
        "device": f"{device.type}: {name}",
        "gpus": gpus(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "precision": precision.to_dict() if precision is not None else None,
    }
