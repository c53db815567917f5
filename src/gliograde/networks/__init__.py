"""Networks: the ResNet-3D family, the 2D MIL model, MONAI's 3D networks (monai_nets.py), MedicalNet weight loading,
the pretrained encoders and their weight formats (networks/pretrained/), and the table of architectures
(`ARCHITECTURES`, networks/registry.py) through which every network is described and built."""

from __future__ import annotations

import logging
from pathlib import Path

# monai_nets registers MONAI's networks in the table: wherever the table is read, their names are known
from gliograde.networks import monai_nets  # noqa: F401
from gliograde.networks.medicalnet import PretrainedError, load_medicalnet_pretrained, resolve_pretrained
from gliograde.networks.pretrained import FORMATS, chosen_format, load_pretrained
from gliograde.networks.registry import (
    ARCHITECTURES,
    ArchitectureError,
    ArchSpec,
    build_from_description,
    describe_model,
    get_architecture,
    model_kind,
    register_architecture,
)
from gliograde.networks.resnet3d import ResNet3D


def initialise(model: ResNet3D, pretrained_path: str | Path | None = None, logger: logging.Logger | None = None):
    """Load MedicalNet weights when `pretrained_path` resolves to a file, then log the parameter counts."""
    return ARCHITECTURES["resnet3d"].initialise(model, pretrained_path, logger or logging.getLogger("gliograde"))


def build_model(
    depth: int = 50,
    in_channels: int = 1,
    num_classes: int = 2,
    shortcut: str = "B",
    layout: str = "strided",
    dropout: float = 0.0,
    pretrained_path: str | Path | None = None,
    logger: logging.Logger | None = None,
) -> ResNet3D:
    (logger or logging.getLogger("gliograde")).info("Creating ResNet%d-3D model...", depth)
    return initialise(ResNet3D(depth, in_channels, num_classes, shortcut, layout, dropout), pretrained_path, logger)


def build_for(cfg, in_channels: int, pretrained_path: str | Path | None, logger: logging.Logger | None = None):
    """The network a training configuration asks for, built from its description (what its checkpoints record), with
    the pretrained weights its architecture takes (MedicalNet for the ResNet-3D; none for the 2D MIL model, said)."""
    log = logger or logging.getLogger("gliograde")
    spec = get_architecture(cfg.model)
    fmt = getattr(cfg, "pretrained_format", None)
    if fmt and pretrained_path and cfg.model not in FORMATS[fmt].architectures:
        raise PretrainedError(f"--pretrained-format {fmt} ({FORMATS[fmt].title}) fits --model "
                              f"{', '.join(FORMATS[fmt].architectures)}, not --model {cfg.model}")  # fmt: skip
    model = build_from_description(spec.describe(cfg, in_channels))
    with chosen_format(fmt):  # the architecture's initialise loads through load_pretrained, which reads it
        return spec.initialise(model, pretrained_path, log) if spec.initialise else model


__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ArchitectureError",
    "ResNet3D",
    "build_for",
    "build_from_description",
    "build_model",
    "describe_model",
    "get_architecture",
    "initialise",
    "load_medicalnet_pretrained",
    "load_pretrained",
    "model_kind",
    "register_architecture",
    "resolve_pretrained",
]
