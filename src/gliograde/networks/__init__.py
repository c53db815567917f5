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


MODEL_KINDS = ("resnet3d", "mil2d")


def build_for(cfg, in_channels: int, pretrained_path: str | Path | None, logger: logging.Logger | None = None):
    """The network a training configuration asks for: the ResNet-3D (MedicalNet weights when given) or the 2D MIL
    model (MedicalNet weights are 3D and do not apply: it trains from scratch, said so)."""
    log = logger or logging.getLogger("gliograde")
    if cfg.model == "mil2d":
        from gliograde.networks.mil import MILResNet2D

        if pretrained_path:
            log.warning("--model mil2d: MedicalNet weights (%s) are 3D and do not apply; training from scratch",
                        pretrained_path)  # fmt: skip
        channel = cfg.modalities.index(cfg.mil_entropy_modality) if cfg.mil_entropy_modality else None
        model = MILResNet2D(
            cfg.depth, in_channels, 2, cfg.mil_k, cfg.mil_pooling, cfg.dropout, cfg.mil_min_gap, entropy_channel=channel
        )
        n = sum(p.numel() for p in model.parameters())
        log.info("Model: MIL ResNet%d-2D over %d entropy-selected axial slices, %s pooling, %.2fM params", cfg.depth,
                 cfg.mil_k, cfg.mil_pooling, n / 1e6)  # fmt: skip
        return model
    return build_model(cfg.depth, in_channels, 2, cfg.shortcut, cfg.layout, cfg.dropout, pretrained_path, log)


def model_kind(model) -> str:
    return "mil2d" if type(model).__name__ == "MILResNet2D" else "resnet3d"


__all__ = [
    "MODEL_KINDS",
    "ResNet3D",
    "build_for",
    "build_model",
    "initialise",
    "load_medicalnet_pretrained",
    "model_kind",
    "resolve_pretrained",
]
