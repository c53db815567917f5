"""`gliograde doctor`: what to check before a long run. Versions, GPUs, bf16 and its self-check figures, whether
torch.compile works, the cache folder, free disk, threads. Healthy is exit 0; something the user asked for that is
broken (e.g. --device cuda without CUDA) is exit 1 with a one-line reason."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from gliograde import runtime
from gliograde.errors import GliogradeError
from gliograde.networks.resnet3d import ResNet3D


def _folder(path: Path) -> dict:
    """Whether the folder (or its first existing parent) is writable, what it holds, and the free disk there."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    writable = os.access(probe, os.W_OK)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    return {
        "path": str(path),
        "exists": path.is_dir(),
        "writable": writable,
        "size_gib": round(size / 2**30, 3),
        "free_disk_gib": round(shutil.disk_usage(probe).free / 2**30, 1),
    }


def _compile_works(device: torch.device) -> dict:
    """torch.compile of a one-layer conv3d net, run once: the compiler and its C++/Triton toolchain work here."""
    try:
        net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU()).to(device)
        out = torch.compile(net)(torch.randn(1, 1, 8, 8, 8, device=device))
        return {"works": bool(torch.isfinite(out).all()), "error": None}
    except Exception as e:  # the toolchain is missing or broken: reported, not raised
        return {"works": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"}


def diagnose(device: str = "auto", cache_dir: str = "cache", compile_check: bool = True) -> dict:
    """The report; raises runtime.DeviceError where the requested device cannot be had."""
    dev = runtime.pick_device(device)
    if dev.type == "cuda":  # the self-check at the real input: ResNet-50, 4 x 128^3
        model, x = ResNet3D(50, 4, 2).to(dev), torch.randn(2, 4, 128, 128, 128, device=dev)
    else:  # the check's logic on a size the CPU finishes in seconds
        model, x = ResNet3D(10, 4, 2), torch.randn(2, 4, 32, 32, 32)
    torch.manual_seed(0)
    check = runtime.bf16_check(model, x) if runtime.bf16_supported(dev) else None
    return {
        "versions": runtime.versions(),
        "device": str(dev),
        "gpus": runtime.gpus(),
        "bf16_supported": runtime.bf16_supported(dev),
        "bf16_check": check,
        "torch_compile": _compile_works(dev) if compile_check else None,
        "cache": _folder(Path(cache_dir)),
        "temp": _folder(Path(tempfile.gettempdir())),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def problems(report: dict, device: str) -> list[str]:
    """What is broken among the things asked for (an empty list: healthy)."""
    out = []
    check = report["bf16_check"]
    if device == "cuda" and check is not None and not check["passed"]:
        out.append(
            f"the bf16 self-check failed (feature error {check['feature_rel_error']:.2e}, gradient error "
            f"{check['gradient_rel_error']:.2e}); train with --precision fp32 or change the cuDNN version"
        )
    if not report["cache"]["writable"]:
        out.append(f"the cache folder {report['cache']['path']} is not writable")
    return out


def table(report: dict) -> str:
    v = report["versions"]
    lines = [
        f"torch {v['torch']}  CUDA {v['cuda']}  cuDNN {v['cudnn']}  NCCL {v['nccl']}  MONAI {v['monai']}  "
        f"python {v['python']}  gliograde {v['gliograde']}",
        f"device {report['device']}; GPUs: "
        + (", ".join(f"{g['index']}: {g['name']} ({g['memory_gib']} GiB)" for g in report["gpus"]) or "none"),
    ]
    c = report["bf16_check"]
    if c is None:
        lines.append("bf16: not supported on this device")
    else:
        lines.append(
            f"bf16 self-check on {tuple(c['input'])}: {'passed' if c['passed'] else 'FAILED'} (features "
            f"{c['feature_rel_error']:.2e} <= {c['feature_tolerance']}, gradients {c['gradient_rel_error']:.2e} "
            f"<= {c['gradient_tolerance']})"
        )
    tc = report["torch_compile"]
    if tc is not None:
        lines.append(f"torch.compile: {'works' if tc['works'] else 'does not work: ' + str(tc['error'])}")
    for name in ("cache", "temp"):
        f = report[name]
        lines.append(
            f"{name} folder {f['path']}: {'exists' if f['exists'] else 'not yet made'}, "
            f"{'writable' if f['writable'] else 'NOT writable'}, {f['size_gib']} GiB held, "
            f"{f['free_disk_gib']} GiB free"
        )
    lines.append(f"threads {report['threads']} of {report['cpus']} CPUs")
    return "\n".join(lines)


def run(device: str, cache_dir: str, json_path: str | None, compile_check: bool = True) -> int:
    from gliograde.files import write_json

    report = diagnose(device, cache_dir, compile_check)
    found = problems(report, device)
    report["problems"] = found
    print(table(report))
    if json_path:
        write_json(Path(json_path), report)
    if found:
        raise GliogradeError(found[0])
    return 0
