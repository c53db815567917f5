"""The table of architectures: name -> how a training configuration describes the network, and how a description
(the `arch` record of every checkpoint) becomes the network again.

Training, `evaluate`, `predict` and `export` all build through `build_from_description`, so a checkpoint rebuilds
from what it recorded, never from today's defaults (timm's `create_model` is the model). A new architecture is one
`register_architecture(ArchSpec(...))`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from gliograde.config import BUILTIN_NETWORKS, register_choices
from gliograde.errors import GliogradeError, unknown_name
from gliograde.networks.medicalnet import DEFAULT_PRETRAINED, load_medicalnet_pretrained, resolve_pretrained
from gliograde.networks.mil import MILResNet2D
from gliograde.networks.resnet3d import ResNet3D


class ArchitectureError(GliogradeError):
    """A description that names no registered architecture, or weights that do not fit the network it describes."""


@dataclass(frozen=True)
class ArchSpec:
    """`describe(cfg, in_channels)` -> the description a checkpoint records (plain values, with "model": name);
    `build(description)` -> the untrained network; `model_class`: the class `build` returns;
    `initialise(model, pretrained_path, log)` -> the network with pretrained weights where they apply, logged.

    What the rest of the code reads instead of testing the name (config.py reads the first three through
    `config.CHOICES["model"]`: it sits below this table):
    `display(description)` -> the network's name in results folders and report headers (results/ResNet50-3D; from a
    checkpoint's description, or from the configuration's model and depth alone); `config_defaults`: the values that
    replace the presets' (a 3D ResNet's) for this network, unless a config file or a flag gives them; `check(cfg)` ->
    one line for a configuration the network cannot take, or None; `summary(cfg)` -> what `train --dry-run` says it
    would train (default: the display name); `check_weights(path)` refuses a --pretrained-path it cannot load before
    any work; `channels_last`: its convolutions run in channels_last_3d on a GPU; `batchnorm_per_volume`: it has
    BatchNorm over the batch of volumes (a micro-batch of 1 under DDP needs SyncBatchNorm); `slice_attention`: it
    records the axial slices it looked at (`last_slices`, `last_attention`), which `predict` and `evaluate` report
    instead of a saliency map."""

    name: str
    describe: Callable[[Any, int], dict]
    build: Callable[[dict], nn.Module]
    model_class: type
    initialise: Callable[[nn.Module, str | Path | None, logging.Logger], nn.Module] | None = None
    display: Callable[[Mapping], str] | None = None  # None: the registered name
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Any], str | None] | None = None
    summary: Callable[[Any], str] | None = None
    check_weights: Callable[[str], None] | None = None
    channels_last: bool = False
    batchnorm_per_volume: bool = True
    slice_attention: bool = False

    def network_name(self, desc: Mapping) -> str:
        return self.display(desc) if self.display else self.name


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Add (or replace) an architecture; `--model NAME` and configuration files may then name it."""
    ARCHITECTURES[spec.name] = spec
    return spec


def get_architecture(name: str, where: str = "--model") -> ArchSpec:
    if name not in ARCHITECTURES:
        raise ArchitectureError(unknown_name(where, name, ARCHITECTURES, "architecture"))
    return ARCHITECTURES[name]


def model_kind(model: nn.Module) -> str:
    """The registered name of a built network: the one `build_from_description` gave it, else the architecture whose
    class it is (several MONAI networks share `EncoderClassifier`: their class alone names none of them)."""
    name = getattr(model, "architecture", None)
    if name in ARCHITECTURES:
        return name
    named = [name for name, spec in ARCHITECTURES.items() if type(model) is spec.model_class]
    if len(named) == 1:
        return named[0]
    which = f"several registered architectures ({', '.join(named)})" if named else "no registered architecture"
    raise ArchitectureError(f"{type(model).__name__} is the class of {which}")


def describe_model(cfg, in_channels: int) -> dict:
    """The description of the network `cfg` asks for, as every checkpoint records it."""
    return get_architecture(cfg.model).describe(cfg, in_channels)


def build_from_description(desc: dict, state_dict: dict | None = None) -> nn.Module:
    """The network a description names, with `state_dict` loaded when given. A description written before the MIL
    model names no model: a ResNet-3D. One-line ArchitectureError for an unknown name, a description its
    architecture cannot build, or weights that do not fit (naming the first key that differs)."""
    name = desc.get("model", "resnet3d")
    spec = get_architecture(name, "model")
    try:
        model = spec.build(desc)
    except KeyError as e:
        raise ArchitectureError(f"the {name} description has no {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise ArchitectureError(f"the {name} description cannot be built ({e})") from None
    model.architecture = name  # what model_kind reads (a plain attribute: not in the state dict)
    if state_dict is not None:
        problem = misfit(model.state_dict(), state_dict)
        if problem:
            raise ArchitectureError(f"the weights do not fit the recorded {name} ({_brief(desc)}): {problem}")
        model.load_state_dict(state_dict)
    return model


def misfit(own: dict, saved: dict) -> str | None:
    """What differs between a network's state dict and saved weights, in one line (None: they fit)."""
    shapes = [
        f"{k} is {list(saved[k].shape)} in the weights, {list(v.shape)} in the network"
        for k, v in own.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    missing = [f"{k} is missing from the weights" for k in own if k not in saved]
    unexpected = [f"{k} is in the weights but not in the network" for k in saved if k not in own]
    problems = shapes + missing + unexpected
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else "")


def _brief(desc: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in desc.items() if k != "model" and isinstance(v, (int, str)))


# -------------------------------------------------------------------------------------------- the built-in ones
def _describe_resnet3d(cfg, in_channels: int) -> dict:
    return {
        "model": "resnet3d",
        "depth": cfg.depth,
        "layout": cfg.layout,
        "shortcut": cfg.shortcut,
        "in_channels": in_channels,
        "num_classes": 2,
        "dropout": cfg.dropout,  # training's; identity in eval mode (records before it: 0)
    }


def _build_resnet3d(d: dict) -> ResNet3D:
    return ResNet3D(d["depth"], d["in_channels"], d["num_classes"], d["shortcut"], d["layout"], d.get("dropout", 0.0))


def _initialise_resnet3d(model: ResNet3D, pretrained_path, log: logging.Logger) -> ResNet3D:
    """MedicalNet weights when `pretrained_path` resolves to a file, then the parameter counts, logged."""
    log.info("Model architecture: %s (MedicalNet-compatible)", model.describe())
    path = resolve_pretrained(pretrained_path, log)
    if path is not None:
        load_medicalnet_pretrained(model, path, log)
    log_parameters(model, log)
    return model


def log_parameters(model: nn.Module, log: logging.Logger) -> None:
    """The network's parameter counts, total and trainable, as every architecture's `initialise` logs them."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("Model created: %.2fM total params, %.2fM trainable", total / 1e6, trainable / 1e6)


def _describe_mil2d(cfg, in_channels: int) -> dict:
    channel = cfg.modalities.index(cfg.mil_entropy_modality) if cfg.mil_entropy_modality else None
    return {
        "model": "mil2d",
        "depth": cfg.depth,
        "layout": cfg.layout,
        "shortcut": cfg.shortcut,
        "in_channels": in_channels,
        "num_classes": 2,
        "k": cfg.mil_k,
        "pooling": cfg.mil_pooling,
        "min_gap": cfg.mil_min_gap,
        "dropout": cfg.dropout,
        "entropy_channel": channel,
    }


def _build_mil2d(d: dict) -> MILResNet2D:
    return MILResNet2D(d["depth"], d["in_channels"], d["num_classes"], d["k"], d["pooling"], d.get("dropout", 0.0),
                       d.get("min_gap", 0), entropy_channel=d.get("entropy_channel"))  # fmt: skip


def _initialise_mil2d(model: MILResNet2D, pretrained_path, log: logging.Logger) -> MILResNet2D:
    """MedicalNet weights are 3D and do not apply: the 2D model trains from scratch, said so."""
    if pretrained_path:
        log.warning("--model mil2d: MedicalNet weights (%s) are 3D and do not apply; training from scratch",
                    pretrained_path)  # fmt: skip
    n = sum(p.numel() for p in model.parameters())
    log.info("Model: MIL ResNet%d-2D over %d entropy-selected axial slices, %s pooling, %.2fM params", model.depth,
             model.k, model.pooling, n / 1e6)  # fmt: skip
    return model


def _check_medicalnet_file(path: str) -> None:
    """A MedicalNet file the user named must exist (the presets' default, absent: a warning when the run starts)."""
    if Path(path) != Path(DEFAULT_PRETRAINED):
        resolve_pretrained(path)


def _summary_resnet3d(cfg) -> str:
    return f"ResNet{cfg.depth}-3D {cfg.layout}"


def _summary_mil2d(cfg) -> str:
    return f"2D MIL ResNet{cfg.depth} ({cfg.mil_k} slices, {cfg.mil_pooling} pooling)"


_RESNET3D, _MIL2D = BUILTIN_NETWORKS["resnet3d"], BUILTIN_NETWORKS["mil2d"]
register_architecture(ArchSpec(
    "resnet3d", _describe_resnet3d, _build_resnet3d, ResNet3D, _initialise_resnet3d, display=_RESNET3D.display,
    config_defaults=_RESNET3D.config_defaults, check=_RESNET3D.check, summary=_summary_resnet3d,
    check_weights=_check_medicalnet_file, channels_last=True,
))  # fmt: skip
# BatchNorm over the k slices of each volume: a micro-batch of one volume is fine
register_architecture(ArchSpec(
    "mil2d", _describe_mil2d, _build_mil2d, MILResNet2D, _initialise_mil2d, display=_MIL2D.display,
    config_defaults=_MIL2D.config_defaults, check=_MIL2D.check, summary=_summary_mil2d, batchnorm_per_volume=False,
    slice_attention=True,
))  # fmt: skip
register_choices("model", "architecture", ARCHITECTURES)
