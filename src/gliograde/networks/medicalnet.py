"""Reading MedicalNet checkpoints (resnet_{10..200}.pth, resnet_{10,18,34,50}_23dataset.pth) into a ResNet3D.

The files are dicts with 'state_dict' (or 'model'), or flat state dicts; keys carry DataParallel's 'module.'
prefix or not, `num_batches_tracked` or not, and the segmentation head `conv_seg.*`. Every backbone tensor of the
model must be found in the file with the right shape: a file of another depth or shortcut type is an error that
names the mismatching keys and the architecture the file does fit, never a silent half-load (MedicalNet users'
classic trap: `strict=False` loading 0 tensors and training from scratch without knowing it).
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gliograde.errors import GliogradeError
from gliograde.networks.resnet3d import ARCHS, ResNet3D

DEFAULT_PRETRAINED = "pretrained/medicalnet_resnet50_3d.pth"
# Shortcut types of the released files (MedicalNet README / train settings)
RELEASED_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B", 101: "B", 152: "B", 200: "B"}
HEAD_PREFIXES = ("fc.", "conv_seg.")
# Said once per load: the README's "MedicalNet weights" section gives the sources
PRETRAINING_OVERLAP = (
    "MedicalNet's pretraining data probably include BraTS patients: its 3DSeg-8 set (Chen et al., arXiv:1904.00625) "
    "draws on the Medical Segmentation Decathlon, whose brain-tumour task is the BraTS 2016/2017 cases, and the "
    "23-dataset release lists no sources (Tencent/MedicalNet issues #15, #47, #65). Patients these weights saw in "
    "pretraining may sit in your validation folds, and no list of them exists: treat fine-tuned BraTS AUCs as "
    "possibly optimistic, and compare with a run from random initialisation"
)


class PretrainedError(GliogradeError):
    """A weight file that is missing, unreadable, unsafe or does not fit the model."""


@dataclass
class LoadReport:
    path: str
    wrapper: str
    loaded: int
    total: int
    missing: list[str] = field(default_factory=list)  # model keys not in the file (the new head)
    dropped: list[str] = field(default_factory=list)  # file keys not used (segmentation/classification head)
    adapted_conv1: tuple[int, int] | None = None  # (file channels, model channels) of the input-channel tensor
    format: str = "medicalnet"  # the pretrained format's name (networks/pretrained/formats.py)
    adapted_key: str | None = None  # the input-channel tensor adapted, where it is not conv1 (other formats)
    why: dict[str, str] = field(default_factory=dict)  # group of skipped keys -> why it was skipped


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(flat state dict without 'module.' prefixes, how it was wrapped). Only plain tensors are unpickled."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights {path} do not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        blocked = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln), None)
        if blocked is None:  # not a refusal: the bytes are not a pickle at all
            detail = next((ln.strip() for ln in lines if "Unsupported" in ln), "not a pickle or zip file")
            raise PretrainedError(f"{path} cannot be read as a PyTorch checkpoint ({detail})") from e
        raise PretrainedError(
            f"refused to load {path}: unpickling it would execute code or build objects other than tensors "
            f"({blocked}). Only plain state dicts are accepted; if you trust the file, re-save its state_dict "
            "with torch.save(ckpt['state_dict'], new_path)."
        ) from e
    except Exception as e:
        raise PretrainedError(f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    wrapper = "flat state_dict"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, wrapper = obj["state_dict"], "checkpoint['state_dict']"
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj, wrapper = obj["model"], "checkpoint['model']"
    elif isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):  # SAM-Med3D's train.py
        obj, wrapper = obj["model_state_dict"], "checkpoint['model_state_dict']"
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
        wrapper += " with DataParallel 'module.' prefix"
    return obj, wrapper


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """The ResNet-3D architecture a state dict fits, e.g. 'ResNet50-3D, shortcut B, 1 input channel'."""
    blocks = []
    for n in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{n}.") and k.split(".")[1].isdigit()}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    depth = next((d for d, (b, n) in ARCHS.items() if n == tuple(blocks) and (b.expansion == 4) == bottleneck), None)
    shortcut = "B" if any(".downsample." in k for k in state) else "A"
    conv1 = state.get("conv1.weight")
    channels = f", {conv1.shape[1]} input channel(s)" if conv1 is not None and conv1.ndim == 5 else ""
    arch = f"ResNet{depth}-3D" if depth else f"an unknown network (blocks per stage {blocks})"
    return f"{arch}, shortcut {shortcut}{channels}"


def _is_head(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def load_medicalnet_pretrained(model: ResNet3D, path: str | Path, logger: logging.Logger | None = None) -> LoadReport:
    """Load MedicalNet backbone weights into `model` (in place); the classification head stays as initialised.

    A 1-channel conv1 is adapted to the model's C input channels by repeating the kernel and scaling by 1/C,
    so a volume repeated on C channels gives the features the 1-channel network gives.
    """
    log = logger or logging.getLogger("gliograde")
    log.info("Loading MedicalNet pretrained weights from: %s", path)
    state, wrapper = read_checkpoint(path)
    log.info("Using %s", wrapper if wrapper != "flat state_dict" else "checkpoint as direct state_dict")
    dropped = sorted(k for k in state if _is_head(k))
    state = {k: v for k, v in state.items() if not _is_head(k)}
    target = model.state_dict()

    adapted = None
    conv1 = state.get("conv1.weight")
    want = target["conv1.weight"].shape
    if conv1 is not None and conv1.ndim == 5 and conv1.shape[1] != want[1] and conv1.shape[0] == want[0]:
        if conv1.shape[1] != 1:
            raise PretrainedError(
                f"{path}: conv1 takes {conv1.shape[1]} input channels, the model {want[1]}; only 1-channel "
                "weights can be adapted to another number of channels"
            )
        state["conv1.weight"] = conv1.repeat(1, want[1], 1, 1, 1) / want[1]
        adapted = (1, int(want[1]))

    def backbone(keys):
        return {k for k in keys if not _is_head(k) and not k.endswith("num_batches_tracked")}

    missing = sorted(backbone(target) - set(state))
    unexpected = sorted(backbone(state) - set(target))
    wrong_shape = sorted(k for k in backbone(target) & set(state) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} model tensors absent from the file (first: {missing[:4]})")
        if unexpected:
            problems.append(f"{len(unexpected)} file tensors the model lacks (first: {unexpected[:4]})")
        if wrong_shape:
            k = wrong_shape[0]
            problems.append(
                f"{len(wrong_shape)} shape mismatches (first: {k} {tuple(state[k].shape)} in the file, "
                f"{tuple(target[k].shape)} in the model)"
            )
        hint = f"MedicalNet released resnet_{model.depth} with shortcut {RELEASED_SHORTCUT[model.depth]}."
        raise PretrainedError(
            f"{path} does not fit {model.describe()}: {'; '.join(problems)}. "
            f"The file fits {describe_state_dict(state)}. {hint} Nothing was loaded."
        )

    usable = {k: v for k, v in state.items() if k in target}
    model.load_state_dict(usable, strict=False)
    if adapted:
        log.info("Adapted conv1 from 1 to %d input channels (kernel repeated, scaled by 1/%d)", adapted[1], adapted[1])
    if dropped:
        log.info(
            "Dropped %d head keys of the file (%s)", len(dropped), ", ".join(sorted({k.split(".")[0] for k in dropped}))
        )
    missing_all = sorted(set(target) - set(usable))
    head_missing = [k for k in missing_all if _is_head(k)]
    counters = [k for k in missing_all if k.endswith("num_batches_tracked")]
    log.info("Missing keys (expected for classification head): %d keys %s", len(head_missing), head_missing)
    if counters:
        log.info("%d BatchNorm num_batches_tracked counters not in the file (harmless, start at 0)", len(counters))
    log.info("Successfully loaded %d/%d pretrained weights from MedicalNet", len(usable), len(target))
    log.info("MedicalNet pretrained weights loaded successfully!")
    log.warning(PRETRAINING_OVERLAP)
    return LoadReport(str(path), wrapper, len(usable), len(target), missing_all, dropped, adapted)


def resolve_pretrained(path: str | Path | None, logger: logging.Logger | None = None) -> Path | None:
    """The file to load, or None for random initialisation.

    A path the user gave must exist. The seeds' default path being absent is only a warning (random init).
    """
    log = logger or logging.getLogger("gliograde")
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if Path(path) == Path(DEFAULT_PRETRAINED):
        log.warning("Pretrained weights file not found: %s", path)
        log.warning("Using random initialization instead.")
        return None
    raise PretrainedError(
        f"--pretrained-path {path} does not exist. Download MedicalNet weights (https://github.com/Tencent/MedicalNet) "
        "and give the path of the .pth file, or omit the flag to train from random initialization."
    )
