"""`gliograde doctor`: what to check before a long run. Versions, GPUs, the precision a run would take and the
layer-by-layer comparison of its kernels with fp32, whether torch.compile works, the cache folder, free disk, threads.
Healthy is exit 0; something broken that training would use (no CUDA for --device cuda, reduced-precision kernels
that disagree with fp32 on the GPU, --device auto included) is exit 1 with a one-line reason."""

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
    """Whether the folder (or its first existing parent) is writable, and the free disk there. Its contents are never
    walked: a shared folder (/tmp) can hold millions of files, and other processes remove theirs during a walk."""
    probe = path
    while True:
        try:
            free = shutil.disk_usage(probe).free
            break
        except FileNotFoundError:  # not made yet, or removed by another process meanwhile: the first existing parent
            if probe == probe.parent:
                raise
            probe = probe.parent
    return {
        "path": str(path),
        "exists": path.is_dir(),
        "writable": os.access(probe, os.W_OK),
        "free_disk_gib": round(free / 2**30, 1),
    }


def _compile_works(device: torch.device) -> dict:
    """torch.compile of a one-layer conv3d net, run once: the compiler and its C++/Triton toolchain work here."""
    try:
        net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU()).to(device)
        out = torch.compile(net)(torch.randn(1, 1, 8, 8, 8, device=device))
        return {"works": bool(torch.isfinite(out).all()), "error": None}
    except Exception as e:  # the toolchain is missing or broken: reported, not raised
        return {"works": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"}


def diagnose(
    device: str = "auto", cache_dir: str = "cache", compile_check: bool = True, batch: int | None = None,
    size: int | None = None, depth: int | None = None,
) -> dict:
    """The report; raises runtime.DeviceError where the requested device cannot be had. The precision diagnostic
    runs where training runs: the backend flags applied (cuDNN benchmark, TF32), channels_last on a GPU, at the final
    preset's shapes (ResNet-50, 8 x 4 x 128^3) on a GPU, at a size the CPU finishes in seconds (ResNet-10,
    2 x 4 x 32^3) on the CPU; seeded first, so that two runs report the same figures."""
    dev = runtime.pick_device(device)
    gpu = dev.type == "cuda"
    batch, size, depth = batch or (8 if gpu else 2), size or (128 if gpu else 32), depth or (50 if gpu else 10)
    runtime.configure_backends(dev)
    runtime.seed_everything(0)
    model = ResNet3D(depth, 4, 2).to(dev)
    x = torch.randn(batch, 4, size, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    if gpu:
        model, x = model.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    decided = runtime.decide_precision("auto", None, dev)
    low = decided.dtype or (torch.bfloat16 if runtime.bf16_supported(dev) else torch.float16)
    try:
        diagnostic = runtime.precision_diagnostic(model, x, low)
    except Exception as e:  # e.g. out of memory on a small GPU: reported, not raised
        diagnostic = {"passed": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
    del model, x
    return {
        "versions": runtime.versions(),
        "device": str(dev),
        "gpus": runtime.gpus(),
        "bf16_supported": runtime.bf16_supported(dev),
        "precision": decided.to_dict(),
        "precision_diagnostic": diagnostic,
        "torch_compile": _compile_works(dev) if compile_check else None,
        "cache": _folder(Path(cache_dir)),
        "temp": _folder(Path(tempfile.gettempdir())),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def problems(report: dict) -> list[str]:
    """What is broken among the things training will use (an empty list: healthy)."""
    out = []
    diag = report["precision_diagnostic"]
    on_gpu = report["device"].startswith("cuda")
    if on_gpu and not diag["passed"]:
        detail = diag.get("error") or (
            f"worst layer {diag['worst_layer']} off by {diag['worst']:.2e} > {diag['tolerance']}"
        )
        out.append(
            f"{diag.get('dtype', 'reduced-precision')} convolutions disagree with fp32 on this GPU stack ({detail}); "
            "train with --precision fp32 (or fp16) and report the stack (see the versions above)"
        )
    tc = report["torch_compile"]
    if on_gpu and tc is not None and not tc["works"]:
        out.append(f"torch.compile does not work here ({tc['error']}); train without --compile")
    if not report["cache"]["writable"]:
        out.append(f"the cache folder {report['cache']['path']} is not writable")
    return out


def table(report: dict) -> str:
    v = report["versions"]
    gpus = [f"{g['index']}: {g['name']} ({g['memory_gib']} GiB, compute {g['capability']})" for g in report["gpus"]]
    lines = [
        f"torch {v['torch']}  CUDA {v['cuda']}  cuDNN {v['cudnn']}  NCCL {v['nccl']}  MONAI {v['monai']}  "
        f"python {v['python']}  gliograde {v['gliograde']}",
        f"device {report['device']}; GPUs: {', '.join(gpus) or 'none'}",
        f"precision (auto): {report['precision']['name']}: {report['precision']['reason']}",
    ]
    d = report["precision_diagnostic"]
    if "error" in d:
        lines.append(f"precision diagnostic: could not run ({d['error']})")
    else:
        stages = ", ".join(f"{k} {e:.1e}" for k, e in d["stage_errors"].items())
        lines.append(
            f"{d['dtype']} vs fp32 layer by layer on {tuple(d['input'])}: {'passed' if d['passed'] else 'FAILED'} "
            f"(worst {d['worst']:.2e} at {d['worst_layer']} <= {d['tolerance']}; {stages}; end to end "
            f"{d['logits_error']:.1e}, not judged)"
        )
    tc = report["torch_compile"]
    if tc is not None:
        lines.append(f"torch.compile: {'works' if tc['works'] else 'does not work: ' + str(tc['error'])}")
    for name in ("cache", "temp"):
        f = report[name]
        lines.append(
            f"{name} folder {f['path']}: {'exists' if f['exists'] else 'not yet made'}, "
            f"{'writable' if f['writable'] else 'NOT writable'}, {f['free_disk_gib']} GiB free on its disk"
        )
    lines.append(f"threads {report['threads']} of {report['cpus']} CPUs")
    return "\n".join(lines)


def run(device: str, cache_dir: str, json_path: str | None, compile_check: bool = True) -> int:
    from gliograde.files import write_json

    report = diagnose(device, cache_dir, compile_check)
    found = problems(report)
    report["problems"] = found
    print(table(report))
    if json_path:
        write_json(Path(json_path), report)
    if found:
        raise GliogradeError(found[0])
    return 0
