"""Models Genesis (Zhou et al., MICCAI 2019): the encoder of its UNet3D, under the upstream parameter names, and the
loader of `Genesis_Chest_CT.pt`.

Upstream (MrGiovanni/ModelsGenesis, pytorch/unet3d.py): UNet3D(n_class=1, act='relu') with down_tr64 =
DownTransition(1, 0), down_tr128 (64, 1), down_tr256 (128, 2), down_tr512 (256, 3); each DownTransition holds
`ops` = two LUConv (conv1: Conv3d k3 p1 with bias, bn1: ContBatchNorm3d, activation: ReLU, no parameters) of
32*2^d then 64*2^d channels (the second doubles), and max-pools except at depth 3. One input channel. The README
fine-tunes a classifier on `out512` with global average pooling, what EncoderClassifier does here.
pytorch/Genesis_Chest_CT.py saves {'state_dict': nn.DataParallel(UNet3D).state_dict(), 'optimizer_state_dict'}:
keys 'module.down_tr64.ops.0.conv1.weight', ... beside the decoder up_tr256/up_tr128/up_tr64 and out_tr.

One departure, said in the docs: upstream's ContBatchNorm3d normalises with the batch's statistics even in eval
mode; gliograde's encoder uses nn.BatchNorm3d (the same parameters and running statistics, which upstream's
F.batch_norm keeps updating), so that a patient's prediction does not depend on the others in its batch.
Pretrained on 64x64x32 cubes of LUNA16 chest CT clipped to -1000..1000 HU and scaled to 0..1 (the README: MRI
clipped to 0..4000 then scaled); sides divisible by 16 for the full U-Net, by 8 for the encoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gliograde.networks.classifier import EncoderClassifier
from gliograde.networks.pretrained.common import (
    NO_MEDICALNET,
    check_weights_for,
    initialise_encoder,
    size_check,
)
from gliograde.networks.pretrained.formats import PretrainedFormat, State, register_format
from gliograde.networks.registry import ArchSpec, register_architecture


class LUConv(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_chan, out_chan, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_chan)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    def __init__(self, in_channel: int, depth: int):
        super().__init__()
        width = 32 * 2**depth
        self.ops = nn.Sequential(LUConv(in_channel, width), LUConv(width, width * 2))
        self.maxpool = nn.MaxPool3d(2)
        self.current_depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ops(x)
        return out if self.current_depth == 3 else self.maxpool(out)


class GenesisEncoder(nn.Module):
    """UNet3D's encoder: (B, C, D, H, W) -> out512 (B, 512, D/8, H/8, W/8)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.down_tr64 = DownTransition(in_channels, 0)
        self.down_tr128 = DownTransition(64, 1)
        self.down_tr256 = DownTransition(128, 2)
        self.down_tr512 = DownTransition(256, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_tr512(self.down_tr256(self.down_tr128(self.down_tr64(x))))


class GenesisClassifier(EncoderClassifier):
    """The Models Genesis encoder with global average pooling of out512 and one linear layer."""


STAGES = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")


def _describe(cfg, in_channels: int) -> dict:
    return {"model": "genesis-unet3d", "in_channels": in_channels, "num_classes": 2, "dropout": cfg.dropout,
            "size": cfg.size}  # fmt: skip


def _build(d: dict) -> GenesisClassifier:
    if d.get("size", 128) % 8:
        raise ValueError(f"--size {d['size']} is not divisible by 8, the encoder's three poolings")
    return GenesisClassifier(GenesisEncoder(d["in_channels"]), lambda enc, x: enc(x), 512, d["num_classes"],
                             d.get("dropout", 0.0), STAGES, "Models Genesis UNet3D encoder",
                             d["in_channels"])  # fmt: skip


register_architecture(ArchSpec(
    "genesis-unet3d", _describe, _build, GenesisClassifier, initialise_encoder("genesis-unet3d"),
    display=lambda desc: "ModelsGenesis-UNet3D", config_defaults=NO_MEDICALNET,
    check=size_check("genesis-unet3d", 8, "the encoder's three poolings"),
    check_weights=check_weights_for("genesis-unet3d"), batchnorm_per_volume=True,
))  # fmt: skip


def translate_genesis(state: State, model) -> tuple[State, dict[str, str]]:
    kept, dropped = {}, {}
    for k, v in state.items():
        if k.startswith(("up_tr", "out_tr.")):
            dropped[k] = "the U-Net decoder (Models Genesis restores the image; the classifier needs the encoder)"
        else:
            kept[k] = v
    return kept, dropped


register_format(PretrainedFormat(
    name="models-genesis",
    title="Models Genesis (Genesis Chest CT)",
    architectures=("genesis-unet3d",),
    pretraining="LUNA16 chest CT, 623 scans, self-supervised restoration (Zhou et al., MICCAI 2019; "
    "MrGiovanni/ModelsGenesis pytorch/README.md)",
    overlap=None,
    licence="MIT (code); the weights are given after a request form",
    files=("Genesis_Chest_CT.pt",),
    where="the request form linked from MrGiovanni/ModelsGenesis pytorch/README.md",
    translate=translate_genesis,
    sniff=lambda state: "down_tr64.ops.0.conv1.weight" in state,
    channel_keys=("down_tr64.ops.0.conv1.weight",),
    input_note="1 channel; CT clipped to -1000..1000 HU (MRI: 0..4000) and scaled to 0..1; sides divisible by 8",
))  # fmt: skip
