"""The table of architectures: name -> how a training configuration describes the network, and how a description
(the `arch` record of every checkpoint) becomes the network again.

Training, `evaluate`, `predict` and `export` all build through `build_from_description`, so a checkpoint rebuilds
from what it recorded, never from today's defaults (timm's `create_model` is the model). A new architecture is one
`register_architecture(ArchSpec(...))`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from gliograde.config import register_choices
from gliograde.errors import GliogradeError, unknown_name
from gliograde.networks.medicalnet import load_medicalnet_pretrained, resolve_pretrained
from gliograde.networks.mil import MILResNet2D
from gliograde.networks.resnet3d import ResNet3D


class ArchitectureError(GliogradeError):
    """A description that names no registered architecture, or weights that do not fit the network it describes."""


@dataclass(frozen=True)
class ArchSpec:
    """`describe(cfg, in_channels)` -> the description a checkpoint records (plain values, with "model": name);
    `build(description)` -> the untrained network; `model_class`: the class `build` returns (what `model_kind` reads);
    `initialise(model, pretrained_path, log)` -> the network with pretrained weights where they apply, logged."""

    name: str
    describe: Callable[[Any, int], dict]
    build: Callable[[dict], nn.Module]
    model_class: type
    initialise: Callable[[nn.Module, str | Path | None, logging.Logger], nn.Module] | None = None


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
    """The registered name of a built network (by its class)."""
    for name, spec in ARCHITECTURES.items():
        if type(model) is spec.model_class:
            return name
    raise ArchitectureError(f"{type(model).__name__} is the class of no registered architecture")


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
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("Model created: %.2fM total params, %.2fM trainable", total / 1e6, trainable / 1e6)
    return model


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


register_architecture(ArchSpec("resnet3d", _describe_resnet3d, _build_resnet3d, ResNet3D, _initialise_resnet3d))
register_architecture(ArchSpec("mil2d", _describe_mil2d, _build_mil2d, MILResNet2D, _initialise_mil2d))
register_choices("model", "architecture", ARCHITECTURES)
