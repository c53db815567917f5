"""Pretrained 3D encoders, each loaded as its authors saved it: one small module per format, one table (`FORMATS`).

| format | module | fits --model |
|---|---|---|
| medicalnet | networks/medicalnet.py | resnet3d |
| swinunetr-ssl, brainsegfounder | swin.py | swinvit |
| models-genesis | genesis.py (its encoder: --model genesis-unet3d) | genesis-unet3d |
| sam-med3d-turbo | sam_med3d.py (its encoder: --model sam-med3d) | sam-med3d |
| bm-mae, bm-mae-notcga | bm_mae.py (its encoder: --model bm-mae) | bm-mae |
| brainiac | brainiac.py | vit |

`load_pretrained(model, path, log, fmt=None) -> LoadReport` loads any of them (the format named, or recognised from
the file's keys); an architecture's `initialise` calls it (`initialise_encoder(name)` is one ready-made). Every
format states its pretraining data and their overlap with BraTS and TCGA, warned once per load. docs/
pretrained-weights.md tabulates them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from gliograde.networks.medicalnet import PRETRAINING_OVERLAP, LoadReport, PretrainedError, load_medicalnet_pretrained
from gliograde.networks.pretrained import bm_mae, brainiac, genesis, sam_med3d, swin
from gliograde.networks.pretrained.common import initialise_encoder, load_pretrained, resolve_weights, sniff_format
from gliograde.networks.pretrained.formats import (
    CHOSEN,
    FORMATS,
    PretrainedFormat,
    chosen_format,
    formats_for,
    register_format,
)
from gliograde.networks.resnet3d import ResNet3D


def _load_medicalnet(model: nn.Module, path: str | Path, log: logging.Logger) -> LoadReport:
    if not isinstance(model, ResNet3D):
        raise PretrainedError(f"{path}: MedicalNet weights fit --model resnet3d, not "
                              f"{model.describe() if hasattr(model, 'describe') else type(model).__name__}. "
                              "Nothing was loaded.")  # fmt: skip
    return load_medicalnet_pretrained(model, path, log)


register_format(PretrainedFormat(
    name="medicalnet",
    title="MedicalNet (ResNet-3D)",
    architectures=("resnet3d",),
    pretraining="3DSeg-8, eight public segmentation sets (Chen et al., arXiv:1904.00625), or 23 unlisted sets for "
    "the *_23dataset files (Tencent/MedicalNet README)",
    overlap=PRETRAINING_OVERLAP,
    licence="MIT",
    files=("resnet_10.pth", "resnet_18.pth", "resnet_34.pth", "resnet_50.pth", "resnet_101.pth", "resnet_152.pth",
           "resnet_200.pth", "resnet_10_23dataset.pth", "resnet_18_23dataset.pth", "resnet_34_23dataset.pth",
           "resnet_50_23dataset.pth"),
    where="https://github.com/Tencent/MedicalNet (the README's download links; TencentMedicalNet on Hugging Face)",
    target="",
    sniff=lambda state: "conv1.weight" in state and any(k.startswith("layer1.") for k in state),
    loader=_load_medicalnet,
    input_note="1 channel; volumes z-scored over the brain (MedicalNet's normalisation)",
))  # fmt: skip

__all__ = [
    "CHOSEN",
    "FORMATS",
    "LoadReport",
    "PretrainedError",
    "PretrainedFormat",
    "bm_mae",
    "brainiac",
    "chosen_format",
    "formats_for",
    "genesis",
    "initialise_encoder",
    "load_pretrained",
    "register_format",
    "resolve_weights",
    "sam_med3d",
    "sniff_format",
    "swin",
]
