"""An encoder turned into a classifier: the contract every network of the architecture table keeps.

The trainer, the optimizer, `evaluate`, `predict` (Grad-CAM, the out-of-distribution features) and `export` use a
network only through these methods, which `ResNet3D` and `MILResNet2D` also have:

    forward(x) -> logits (B, num_classes)
    forward_features(x) -> pooled features (B, num_features)       the OOD check reads these
    forward_head(features) -> logits
    feature_maps(x) -> (B, C, D', H', W') or None                   Grad-CAM's layer; None: no Grad-CAM
    head_parameters(), backbone_parameters()                        the optimizer's two groups (and --probe)
    layer_groups() -> [[params of the stem], ..., [params of the last stage]]   layer-wise learning-rate decay
    describe() -> one line

`EncoderClassifier` wraps a segmentation or self-supervised encoder (a MONAI network's feature extractor, a Swin
transformer, a ViT, the Models Genesis or SAM-Med3D encoders) with global average pooling of its last feature map
and one linear layer: the head MedicalNet #37/#58 and nnU-Net #1715 users ask how to put on such an encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


class EncoderClassifier(nn.Module):
    """`encoder`: an nn.Module; `features(encoder, x)` -> its last feature map (B, C, D', H', W') or tokens
    (B, N, C); `num_features`: C; `stages`: names of the encoder's submodules from input to output, dotted where
    they sit deeper ("features.denseblock1"; layer_groups); `name`: what describe() says. Pooling: the mean over the
    spatial axes (or over the tokens), so that Grad-CAM's weights are the gradient of the logit through that mean."""

    def __init__(
        self,
        encoder: nn.Module,
        features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        num_features: int,
        num_classes: int = 2,
        dropout: float = 0.0,
        stages: tuple[str, ...] = (),
        name: str = "encoder",
        in_channels: int = 1,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout {dropout} must lie in [0, 1)")
        self.encoder = encoder
        self._features = features
        self.num_features, self.num_classes, self.in_channels = num_features, num_classes, in_channels
        self.stages, self.name = tuple(stages), name
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, num_classes)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor | None:
        out = self._features(self.encoder, x)
        return out if out.dim() == 5 else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self._features(self.encoder, x)
        return out.mean(dim=1) if out.dim() == 3 else torch.flatten(out, 2).mean(dim=2)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The encoder's parameters by depth, input first: one group per named stage, then one for what no stage
        holds (put first: embeddings and stems sit at the input)."""
        if not self.stages:
            return [self.backbone_parameters()]
        groups = [list(self.encoder.get_submodule(s).parameters()) for s in self.stages]
        staged = {id(p) for g in groups for p in g}
        rest = [p for p in self.encoder.parameters() if id(p) not in staged]
        return ([rest] if rest else []) + groups

    def describe(self) -> str:
        return f"{self.name} ({self.in_channels} input channels)"
