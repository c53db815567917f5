"""The ResNet-3D family of MedicalNet (Tencent/MedicalNet, models/resnet.py), with a classification head.

Parameter names are MedicalNet's (conv1, bn1, layerN.i.convK, layerN.i.bnK, layerN.0.downsample.0/1), so its
checkpoints map one to one. Two layouts of the same weights:

- "medicalnet": exactly MedicalNet's network. layer2 has stride 2; layer3 and layer4 keep stride 1 and use
  dilation 2 and 4, so a 128^3 input ends in a 16^3 feature map (made for segmentation).
- "strided": stride 2 in layers 2, 3 and 4, no dilation (the classification layout); a 128^3 input ends in 4^3.
  About 5x less arithmetic than "medicalnet" at 128^3. MONAI's resnet50 (with conv1_t_stride=2) is this layout.

API as in timm: `feature_maps(x)` -> last feature map, `forward_features(x)` -> pooled features (B, 512 or 2048),
`forward_head(features)` -> logits, `forward(x)` -> both in one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUTS = ("strided", "medicalnet")
SHORTCUTS = ("A", "B")


def conv3x3x3(inplanes: int, planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class ShortcutA(nn.Module):
    """MedicalNet's parameter-free shortcut: subsample by `stride`, then zero-pad the channels up to `planes`.

    Unlike MedicalNet (which concatenates `out.data`), the gradient flows through the identity part.
    """

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.planes - x.shape[1]))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# depth -> (block, blocks per stage), as in MedicalNet
ARCHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}


class ResNet3D(nn.Module):
    def __init__(
        self,
        depth: int = 50,
        in_channels: int = 1,
        num_classes: int = 2,
        shortcut: str = "B",
        layout: str = "strided",
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth not in ARCHS:
            raise ValueError(f"depth {depth} is not one of {sorted(ARCHS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut {shortcut!r} is not one of {SHORTCUTS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout {dropout} must lie in [0, 1)")
        block, blocks = ARCHS[depth]
        self.depth, self.in_channels, self.num_classes = depth, in_channels, num_classes
        self.shortcut, self.layout = shortcut, layout
        self.inplanes = 64
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        dilated = layout == "medicalnet"
        self.layer1 = self._make_layer(block, 64, blocks[0])
        self.layer2 = self._make_layer(block, 128, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, blocks[2], stride=1 if dilated else 2, dilation=2 if dilated else 1)
        self.layer4 = self._make_layer(block, 512, blocks[3], stride=1 if dilated else 2, dilation=4 if dilated else 1)
        self.num_features = 512 * block.expansion
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, n_blocks, stride=1, dilation=1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if self.shortcut == "A":
                downsample = ShortcutA(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * block.expansion),
                )
        layers = [block(self.inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, n_blocks)]
        return nn.Sequential(*layers)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The output of layer4: (B, num_features, D', H', W') (16^3 or 4^3 for a 128^3 input)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.feature_maps(x)), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The backbone by depth, input first (layer-wise learning-rate decay): the stem (conv1, bn1), layer1..4."""
        stem = [*self.conv1.parameters(), *self.bn1.parameters()]
        return [stem] + [list(getattr(self, f"layer{i}").parameters()) for i in range(1, 5)]

    def describe(self) -> str:
        return (
            f"ResNet{self.depth}-3D ({self.layout} layout, shortcut {self.shortcut}, {self.in_channels} input channels)"
        )
