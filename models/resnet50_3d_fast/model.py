"""The seeds' import path: `from models.resnet50_3d_fast.model import ResNet50_3D, load_medicalnet_pretrained`.

Only re-exports gliograde's network; see gliograde/networks/resnet3d.py and medicalnet.py.
"""

from __future__ import annotations

import logging

from gliograde.networks import initialise
from gliograde.networks.medicalnet import DEFAULT_PRETRAINED, load_medicalnet_pretrained
from gliograde.networks.resnet3d import ResNet3D


class ResNet50_3D(ResNet3D):
    """ResNet50-3D with MedicalNet-compatible parameter names (46.16 M parameters with 1 input channel)."""

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        pretrained_path: str | None = None,
        dropout: float = 0.5,
        logger: logging.Logger | None = None,
        shortcut: str = "B",
        layout: str = "strided",
    ):
        (logger or logging.getLogger("gliograde")).info("Creating ResNet50-3D model...")
        super().__init__(50, in_channels, num_classes, shortcut, layout, dropout)
        initialise(self, pretrained_path, logger)


__all__ = ["DEFAULT_PRETRAINED", "ResNet50_3D", "load_medicalnet_pretrained"]
