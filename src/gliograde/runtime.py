"""Where and how a model runs: the device, the precision (and its bf16 self-check), backend flags, seeding and the
environment record. Training, `evaluate` and `predict` all ask this module, so they take the same decisions.

Precision. `auto` is bf16 autocast on a GPU that supports it (fp16 with a GradScaler on one that does not) and fp32
on the CPU. bf16 is used only after a self-check against fp32 on a real input of the run's size: the relative error
of the pooled features and of one backward pass (the gradients of all parameters). cuDNN 9.10.2 computes large bf16
conv3d wrongly (PyTorch issue #163539); such a stack fails the check. A failed check means fp32 and a warning that is
recorded in the run; a failed check of an explicitly requested `--precision bf16` is an error.
"""

from __future__ import annotations

import logging
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
# bf16 keeps 8 mantissa bits. Measured on the CPU with correct kernels (ResNet-10 at 32^3, ResNet-50 at 64^3, random
# init): pooled features within 0.5 % of fp32, parameter gradients within ~17 % (the backward pass compounds rounding
# through every layer). A wrong kernel is off by O(1) in both.
FEATURE_TOLERANCE = 0.05
GRADIENT_TOLERANCE = 0.5


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
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True  # CPU autocast runs bf16 (slowly where the CPU has no bf16 units)


# --------------------------------------------------------------------------------------------------- precision
@dataclass
class Precision:
    """The precision a process runs in, why, and the self-check figures behind the decision."""

    name: str  # bf16 | fp16 | fp32
    reason: str
    check: dict | None = None
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


def _features(model, x: torch.Tensor, dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext():
        return model.forward_features(x).float()


def bf16_check(model, x: torch.Tensor) -> dict:
    """bf16 autocast against fp32 on `x` (a real input at the run's size): relative error of the pooled features, and
    of the gradients of all parameters for one backward pass of a fixed random projection of those features.

    Eval mode: no dropout, BatchNorm on its running statistics (batch statistics of a batch of 2 would divide by
    near-zero variances in the deep layers and amplify any rounding). A fresh model's activations can then grow
    large, so norms are taken in float64. The model is left as it was (mode, weights, buffers, gradients)."""
    was_training = model.training
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    try:
        results = {}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            for p in params:
                p.grad = None
            f = _features(model, x, dtype)
            projection = torch.randn(f.shape, generator=torch.Generator().manual_seed(0)).to(f.device)
            (f * projection).sum().backward()
            grads = torch.cat([p.grad.detach().double().flatten() for p in params if p.grad is not None])
            results[name] = (f.detach().double(), grads)
        (f32, g32), (f16, g16) = results["fp32"], results["bf16"]
        feature_err = float((f16 - f32).norm() / f32.norm().clamp_min(1e-12))
        grad_err = float((g16 - g32).norm() / g32.norm().clamp_min(1e-12))
    finally:
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
        with torch.no_grad():
            live = dict(model.named_buffers())
            for k, v in buffers.items():
                live[k].copy_(v)
        model.train(was_training)
    ok = feature_err <= FEATURE_TOLERANCE and grad_err <= GRADIENT_TOLERANCE  # NaN fails both comparisons
    return {
        "passed": bool(ok),
        "feature_rel_error": feature_err,
        "gradient_rel_error": grad_err,
        "feature_tolerance": FEATURE_TOLERANCE,
        "gradient_tolerance": GRADIENT_TOLERANCE,
        "input": list(x.shape),
    }


def decide_precision(
    request: str, amp: bool | None, device: torch.device, model=None, sample: torch.Tensor | None = None
) -> Precision:
    """The precision of this process. request: auto | bf16 | fp16 | fp32 (--precision); amp: the seeds' --amp /
    --no-amp (None = not given), which only matters for auto. bf16 is only granted after `bf16_check` passes on
    `sample` (a real input; the check is skipped, and said so, when no sample is given)."""
    if request not in PRECISIONS:
        raise DeviceError(f"--precision {request!r} is not one of {', '.join(PRECISIONS)}")
    forced = request != "auto"
    if request == "auto":
        wanted = amp if amp is not None else device.type == "cuda"
        if not wanted:
            why = "--no-amp" if amp is False else "the CPU (no --amp)"
            return Precision("fp32", f"fp32 on {why}", requested=request)
        request = "bf16" if bf16_supported(device) else "fp16"
    if request == "fp32":
        return Precision("fp32", "--precision fp32", requested="fp32")
    if request == "fp16":
        return Precision(
            "fp16",
            "fp16 autocast with a GradScaler" + ("" if forced else " (no bf16 on this GPU)"),
            requested="fp16" if forced else "auto",
        )
    if not bf16_supported(device):
        raise DeviceError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16")
    if model is None or sample is None:
        return Precision(
            "bf16", "bf16 autocast (not self-checked: no sample input)", requested="bf16" if forced else "auto"
        )
    check = bf16_check(model, sample)
    figures = f"features {check['feature_rel_error']:.2e}, gradients {check['gradient_rel_error']:.2e}"
    if check["passed"]:
        return Precision(
            "bf16",
            f"bf16 autocast; self-check against fp32 passed ({figures})",
            check,
            requested="bf16" if forced else "auto",
        )
    message = (
        f"bf16 autocast disagrees with fp32 on a {tuple(check['input'])} input (relative error {figures}; tolerances "
        f"{FEATURE_TOLERANCE} and {GRADIENT_TOLERANCE}): this GPU stack computes bf16 convolutions wrongly"
    )
    if forced:
        raise DeviceError(f"--precision bf16: {message}; use --precision fp32 or another cuDNN")
    log.warning("%s; running in fp32", message)
    return Precision("fp32", "fp32: the bf16 self-check failed", check, warning=message + "; ran in fp32")


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
    import monai

    from gliograde import __version__

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
        "monai": monai.__version__,
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
