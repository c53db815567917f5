"""Networks: the ResNet-3D family and MedicalNet weight loading."""

from __future__ import annotations

import logging
from pathlib import Path

from gliograde.networks.medicalnet import load_medicalnet_pretrained, resolve_pretrained
from gliograde.networks.resnet3d import ResNet3D


def initialise(model: ResNet3D, pretrained_path: str | Path | None = None, logger: logging.Logger | None = None):
    """Load MedicalNet weights when `pretrained_path` resolves to a file, then log the parameter counts."""
    log = logger or logging.getLogger("gliograde")
    log.info("Model architecture: %s (MedicalNet-compatible)", model.describe())
    path = resolve_pretrained(pretrained_path, log)
    if path is not None:
        load_medicalnet_pretrained(model, path, log)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("Model created: %.2fM total params, %.2fM trainable", total / 1e6, trainable / 1e6)
    return model


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


__all__ = ["ResNet3D", "build_model", "initialise", "load_medicalnet_pretrained", "resolve_pretrained"]
