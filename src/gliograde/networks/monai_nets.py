"""MONAI's classification and self-supervised encoders (3D), each one entry of the architecture table.

Each network is an `EncoderClassifier` (networks/classifier.py) whose `encoder` is the MONAI module itself, with
MONAI's own parameter names, so that weights saved from MONAI (or mapped onto its names) load into `model.encoder`;
its own classification head is replaced by nothing (no dead parameters), and the classifier's head is global average
pooling of the last feature map (or of the ViT's tokens), dropout and one linear layer.

- densenet121, densenet169: `monai.networks.nets.DenseNet121/169`; the last map is relu(features(x)) (MONAI's own
  head starts with that ReLU). Five halvings: --size at least 32.
- seresnet50, seresnet101: `SEResNet50/101`; the last map is `features(x)` (layer4).
- efficientnet-b0 ... b4: `EfficientNet` with `EfficientNetBN`'s block arguments and coefficients, its "same" padding
  computed for the run's --size (EfficientNetBN fixes it for the 2D ImageNet size, which breaks small volumes).
- vit: `ViT` (ViT-B: hidden 768, 12 layers, 12 heads, patch 16, no class token; the classifier pools the mean token,
  as MAE fine-tuning does). No feature map: its saliency is attention rollout. --size divisible by 16.
- swinvit: `swin_unetr.SwinTransformer` as SwinUNETR builds its `swinViT` (feature size 48, depths (2,2,2,2), heads
  (3,6,12,24), window 7, patch 2, normalised stage outputs); the last map is its last stage's. --size divisible by 32.

MONAI is imported when a network is built, not when this table is: importing monai costs seconds, and commands that
only read the table (--help, config checks, summaries) should not pay them. Code licence: MONAI, Apache-2.0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from gliograde.networks.classifier import EncoderClassifier
from gliograde.networks.pretrained.common import initialise_encoder, resolve_weights
from gliograde.networks.registry import ArchSpec, register_architecture

VIT_PATCH = 16
SWIN_MULTIPLE = 32  # patch 2, then four patch mergings (SwinUNETR's rule: sides divisible by 2^5)
# MONAI's EfficientNetBN block arguments (monai/networks/nets/efficientnet.py, EfficientNetBN.__init__)
EFFICIENTNET_BLOCKS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)


class ViTClassifier(EncoderClassifier):
    """MONAI's ViT: tokens (B, N, C), no feature map for Grad-CAM; attention rollout is its saliency."""

    def attention_rollout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S, S) -> (B, g, g, g), g = S / patch: how much each patch flows into the pooled feature (Abnar
        and Zuidema, 2020). Per block: the heads' mean attention plus the residual's identity, rows renormalised;
        multiplied input to output; the pooled feature is the tokens' mean, so a patch's share is the mean of its
        column. Class-agnostic (no gradient of a logit), unlike Grad-CAM."""
        blocks = [blk.attn for blk in self.encoder.blocks]
        for attn in blocks:  # kept off in training: it would hold every block's (B, heads, N, N) matrix
            attn.save_attn = True
        try:
            with torch.no_grad():
                self.encoder(x)
                rollout = None
                for attn in blocks:
                    a = attn.att_mat.float().mean(1)
                    a = a + torch.eye(a.shape[-1], device=a.device)
                    a = a / a.sum(-1, keepdim=True)
                    rollout = a if rollout is None else a @ rollout
        finally:
            for attn in blocks:
                attn.save_attn = False
                attn.__dict__.pop("att_mat", None)
        patch = self.encoder.patch_embedding.patch_embeddings.kernel_size  # the "conv" projection: one patch a step
        grid = [s // p for s, p in zip(x.shape[2:], patch, strict=True)]
        return rollout.mean(1).view(x.shape[0], *grid)


# -------------------------------------------------------------------------------------------- descriptions
def _describe(name: str, with_size: bool, cfg, in_channels: int) -> dict:
    desc = {"model": name, "in_channels": in_channels, "num_classes": 2, "dropout": cfg.dropout}
    return {**desc, "size": cfg.size} if with_size else desc


def _describe_vit(cfg, in_channels: int) -> dict:
    # ViT-B/16 (Dosovitskiy et al. 2021); the sizes are recorded so that a checkpoint rebuilds what it was
    return {**_describe("vit", True, cfg, in_channels), "patch_size": VIT_PATCH, "hidden_size": 768,
            "mlp_dim": 3072, "num_layers": 12, "num_heads": 12, "qkv_bias": False}  # fmt: skip


def _describe_swin(cfg, in_channels: int) -> dict:
    # SwinUNETR's swinViT with the feature size of MONAI's self-supervised checkpoint (48)
    return {**_describe("swinvit", True, cfg, in_channels), "feature_size": 48, "depths": [2, 2, 2, 2],
            "num_heads": [3, 6, 12, 24], "window_size": 7, "patch_size": 2}  # fmt: skip


# -------------------------------------------------------------------------------------------- builders
def _classifier(d: dict, encoder: nn.Module, features, num_features: int, stages, display: str, cls=EncoderClassifier):
    return cls(encoder, features, num_features, d["num_classes"], d.get("dropout", 0.0), tuple(stages), display,
               d["in_channels"])  # fmt: skip


def _densenet_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(encoder.features(x))


def _build_densenet(variant: str, d: dict) -> EncoderClassifier:
    from monai.networks.nets import densenet

    cls = {"densenet121": densenet.DenseNet121, "densenet169": densenet.DenseNet169}[variant]
    encoder = cls(spatial_dims=3, in_channels=d["in_channels"], out_channels=1)
    num_features = encoder.class_layers.out.in_features
    encoder.class_layers = nn.Identity()  # MONAI's head: encoder(x) is now its last (pre-ReLU) feature map
    stages = [f"features.{n}" for n, _ in encoder.features.named_children() if n.startswith(("dense", "trans"))]
    return _classifier(d, encoder, _densenet_map, num_features, [*stages, "features.norm5"], _display(variant, d))


def _senet_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder.features(x)


def _build_seresnet(variant: str, d: dict) -> EncoderClassifier:
    from monai.networks.nets import senet

    cls = {"seresnet50": senet.SEResNet50, "seresnet101": senet.SEResNet101}[variant]
    encoder = cls(spatial_dims=3, in_channels=d["in_channels"], num_classes=1)
    num_features = encoder.last_linear.in_features
    encoder.last_linear = nn.Identity()  # MONAI's head: encoder(x) is now the pooled features
    stages = ("layer0", "layer1", "layer2", "layer3", "layer4")
    return _classifier(d, encoder, _senet_map, num_features, stages, _display(variant, d))


def _efficientnet_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet.forward up to its pooling."""
    x = encoder._swish(encoder._bn0(encoder._conv_stem(encoder._conv_stem_padding(x))))
    x = encoder._blocks(x)
    return encoder._swish(encoder._bn1(encoder._conv_head(encoder._conv_head_padding(x))))


class EfficientNetClassifier(EncoderClassifier):
    """MONAI's memory-efficient swish (a custom autograd Function) while training, which saves activation memory;
    the plain one in eval mode, which ONNX export traces (MONAI's `set_swish` says so). The same values."""

    def train(self, mode: bool = True):
        self.encoder.set_swish(memory_efficient=mode)
        return super().train(mode)


def _build_efficientnet(variant: str, d: dict) -> EncoderClassifier:
    from monai.networks.nets.efficientnet import EfficientNet, efficientnet_params

    width, depth, _, dropout_rate, drop_connect = efficientnet_params[variant]
    encoder = EfficientNet(list(EFFICIENTNET_BLOCKS), spatial_dims=3, in_channels=d["in_channels"], num_classes=1,
                           width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout_rate,
                           image_size=d["size"], drop_connect_rate=drop_connect)  # fmt: skip
    num_features = encoder._fc.in_features
    encoder._fc = nn.Identity()  # MONAI's head: encoder(x) is now the pooled features
    stages = [f"_blocks.{n}" for n, _ in encoder._blocks.named_children()] + ["_conv_head", "_bn1"]
    model = _classifier(d, encoder, _efficientnet_map, num_features, stages, _display(variant, d),
                        EfficientNetClassifier)  # fmt: skip
    return model.train()


def _vit_tokens(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder(x)[0]  # (B, N, C) after the final LayerNorm; [1] holds every block's output


def _build_vit(d: dict) -> ViTClassifier:
    from monai.networks.nets.vit import ViT

    patch = d["patch_size"]
    if d["size"] % patch:
        raise ValueError(f"the input size {d['size']} is not divisible by the patch size {patch}")
    encoder = ViT(in_channels=d["in_channels"], img_size=d["size"], patch_size=patch, hidden_size=d["hidden_size"],
                  mlp_dim=d["mlp_dim"], num_layers=d["num_layers"], num_heads=d["num_heads"], proj_type="conv",
                  pos_embed_type="learnable", classification=False, spatial_dims=3,
                  qkv_bias=d.get("qkv_bias", False))  # fmt: skip
    stages = [f"blocks.{i}" for i in range(d["num_layers"])] + ["norm"]  # the patch embedding sits before them
    return _classifier(d, encoder, _vit_tokens, d["hidden_size"], stages, _display("vit", d), ViTClassifier)


def _swin_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder(x, normalize=True)[-1]  # SwinUNETR's call: each stage's output layer-normalised


def _build_swin(d: dict) -> EncoderClassifier:
    from monai.networks.nets.swin_unetr import SwinTransformer

    multiple = d["patch_size"] * 2 ** len(d["depths"])
    if d["size"] % multiple:
        raise ValueError(f"the input size {d['size']} is not divisible by {multiple} (patch {d['patch_size']}, then "
                         f"{len(d['depths'])} patch mergings)")  # fmt: skip
    encoder = SwinTransformer(in_chans=d["in_channels"], embed_dim=d["feature_size"],
                              window_size=(d["window_size"],) * 3, patch_size=(d["patch_size"],) * 3,
                              depths=tuple(d["depths"]), num_heads=tuple(d["num_heads"]), spatial_dims=3)  # fmt: skip
    num_features = d["feature_size"] * 2 ** len(d["depths"])  # the last stage's merging doubles the channels again
    stages = [f"layers{i + 1}" for i in range(len(d["depths"]))]
    return _classifier(d, encoder, _swin_map, num_features, stages, _display("swinvit", d))


# -------------------------------------------------------------------------------------------- names, checks
DISPLAY = {
    "densenet121": "DenseNet121-3D",
    "densenet169": "DenseNet169-3D",
    "seresnet50": "SEResNet50-3D",
    "seresnet101": "SEResNet101-3D",
    **{f"efficientnet-b{i}": f"EfficientNet-B{i}-3D" for i in range(5)},
    "vit": "ViT-B16-3D",
    "swinvit": "SwinViT-3D",
}


def _display(name: str, desc: dict) -> str:
    return DISPLAY[name]


def _check_size(name: str, multiple: int, minimum: int, why: str, cfg) -> str | None:
    """One line when --size does not fit the network (before any data is read)."""
    if cfg.size % multiple:
        return f"--model {name}: --size {cfg.size} is not divisible by {multiple} ({why})"
    if cfg.size < minimum:
        return f"--model {name}: --size {cfg.size} is below {minimum} ({why})"
    return None


def _check_weights(name: str, path: str) -> None:
    """A --pretrained-path that does not exist is refused before any work (the presets' MedicalNet file: skipped)."""
    resolve_weights(path, name, logging.getLogger("gliograde"))


# MedicalNet's file is the presets' default: a MONAI network starts from random weights unless a file is named
NETWORK_DEFAULTS = {"pretrained_path": None}


def _register(name: str, describe: Callable, build: Callable, model_class: type, check=None, **flags) -> None:
    """One entry; its weights load through the pretrained formats that name it (networks/pretrained/)."""
    register_architecture(ArchSpec(
        name, describe, build, model_class, initialise_encoder(name), display=partial(_display, name),
        config_defaults=NETWORK_DEFAULTS, check=check, check_weights=partial(_check_weights, name), **flags,
    ))  # fmt: skip


# BatchNorm3d in the convolutional ones: one volume per process would normalise by its own statistics (DDP)
for _name in ("densenet121", "densenet169"):
    _register(_name, partial(_describe, _name, False), partial(_build_densenet, _name), EncoderClassifier,
              partial(_check_size, _name, 1, 32, "five halvings"), channels_last=True)  # fmt: skip
for _name in ("seresnet50", "seresnet101"):
    _register(_name, partial(_describe, _name, False), partial(_build_seresnet, _name), EncoderClassifier,
              channels_last=True)  # fmt: skip
for _i in range(5):  # depthwise 3D convolutions: channels_last_3d kernels for grouped convolutions are not assured
    _name = f"efficientnet-b{_i}"
    _register(_name, partial(_describe, _name, True), partial(_build_efficientnet, _name), EfficientNetClassifier)
# LayerNorm only: no BatchNorm statistics to share between processes
_register("vit", _describe_vit, _build_vit, ViTClassifier,
          partial(_check_size, "vit", VIT_PATCH, VIT_PATCH, f"the ViT's patch size {VIT_PATCH}"),
          batchnorm_per_volume=False)  # fmt: skip
_register("swinvit", _describe_swin, _build_swin, EncoderClassifier,
          partial(_check_size, "swinvit", SWIN_MULTIPLE, SWIN_MULTIPLE, "patch 2, then four patch mergings"),
          batchnorm_per_volume=False)  # fmt: skip
