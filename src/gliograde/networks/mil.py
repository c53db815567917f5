"""A 2D multiple-instance (MIL) model: entropy-selected axial slices -> 2D ResNet -> pooled bag -> classifier.

Drop-in for `ResNet3D`: it takes the same (B, C, D, H, W) volumes and exposes `forward`, `forward_features`
(bag features, (B, num_features)), `forward_head`, `backbone_parameters()` (the 2D ResNet),
`head_parameters()` (attention pooling + classifier), `layer_groups()`, `describe()` and the attributes depth,
in_channels, num_classes and num_features.

Per case, the k axial slices (x[..., z]) of highest entropy (`torch_slice_entropy` below, under
no_grad) form the bag; each slice is an instance image (C, D, H). The 2D ResNet has torchvision's layout and
parameter names (conv1 7x7 stride 2, bn1, maxpool, layer1..4 of BasicBlocks, downsample.0/1, global average pool),
so a torchvision resnet18/34 state dict (without `fc`) loads into `model.backbone`. Pooling: "mean", "max" or
"attention" (gated attention of Ilse et al. 2018: a = softmax_k(w^T (tanh(V h) * sigmoid(U h))), bag = sum_k a h).
"""

from __future__ import annotations

import torch
import torch.nn as nn

POOLINGS = ("attention", "mean", "max")
ARCHS_2D: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def torch_slice_entropy(x: torch.Tensor, bins: int = 32, channel: int | None = None) -> torch.Tensor:
    """Vectorized `data.slices.slice_entropy` for a batch (B, C, D, H, W) -> (B, W) float32, on x's device.

    Same binning as the numpy version (per case and channel, bins over its brain range, float32), so the two
    agree up to float32 rounding of the entropy. One scatter_add builds all (case, channel, slice) histograms.
    """
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, D, H, W), got shape {tuple(x.shape)}")
    if bins < 1:
        raise ValueError(f"bins {bins} must be at least 1")
    x = x.detach().float()
    x_ch = x if channel is None else x[:, [channel]]
    b, c = x_ch.shape[:2]
    n_slices = x.shape[-1]
    mask = (x != 0).any(1, keepdim=True)  # (B, 1, D, H, W): brain in any channel
    flat = x_ch.reshape(b, c, -1)
    m = mask.reshape(b, 1, -1).expand(b, c, -1)
    lo = torch.where(m, flat, torch.full_like(flat, float("inf"))).amin(-1, keepdim=True)
    hi = torch.where(m, flat, torch.full_like(flat, float("-inf"))).amax(-1, keepdim=True)
    rng = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    idx = torch.floor((flat - lo) / rng * bins).clamp_(0, bins - 1).long()
    slice_of = torch.arange(n_slices, device=x.device).repeat(flat.shape[-1] // n_slices)
    idx = idx + slice_of * bins
    counts = torch.zeros(b, c, n_slices * bins, device=x.device)
    counts.scatter_add_(2, idx, m.float())
    counts = counts.view(b, c, n_slices, bins)
    n = counts.sum(-1, keepdim=True)
    p = counts / n.clamp_min(1)
    h = -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)
    h = torch.where(n[..., 0] >= 2, h, torch.zeros_like(h))
    return h.mean(1)


class BasicBlock2D(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet2D(nn.Module):
    """torchvision's ResNet-18/34 trunk (no fc): (N, C, H, W) -> (N, 512)."""

    def __init__(self, depth: int = 18, in_channels: int = 3):
        super().__init__()
        if depth not in ARCHS_2D:
            raise ValueError(f"depth {depth} is not one of {sorted(ARCHS_2D)}")
        blocks = ARCHS_2D[depth]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], stride=2)
        self.layer4 = self._make_layer(512, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, n_blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock2D(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock2D(planes, planes) for _ in range(1, n_blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class GatedAttention(nn.Module):
    """Ilse et al. 2018: a = softmax_k(w^T (tanh(V h) * sigmoid(U h))); returns (bag (B, F), a (B, k))."""

    def __init__(self, in_features: int, hidden: int = 128):
        super().__init__()
        self.V = nn.Linear(in_features, hidden)
        self.U = nn.Linear(in_features, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)  # (B, k)
        a = torch.softmax(scores.float(), dim=1).to(h.dtype)
        return torch.einsum("bk,bkf->bf", a, h), a


def select_slice_indices(
    x: torch.Tensor, k: int, min_gap: int = 0, bins: int = 32, channel: int | None = None
) -> torch.Tensor:
    """(B, k) indices of the k axial slices of highest entropy per case, sorted ascending (no gradient).

    Slices with brain come first (by entropy); if a case has fewer than k, slices without brain fill the bag.
    With min_gap > 0 the choice is greedy (highest first, vectorized over the batch, k steps): slices within
    `min_gap` of a chosen one are taken only when nothing else is left. Indices are always distinct.
    """
    n_slices = x.shape[-1]
    if k > n_slices:
        raise ValueError(f"k={k} slices requested but the volume has only {n_slices} axial slices")
    with torch.no_grad():
        h = torch_slice_entropy(x, bins=bins, channel=channel)  # (B, S); channel None: mean over modalities
        brain = (x.detach() != 0).flatten(1, -2).any(1)  # (B, S)
        score = torch.where(brain, h, torch.full_like(h, -1.0))
        if min_gap <= 0:
            idx = score.topk(k, dim=1).indices
        else:
            pos = torch.arange(n_slices, device=x.device)
            rows = torch.arange(x.shape[0], device=x.device)
            blocked = torch.zeros_like(score, dtype=torch.bool)
            chosen = torch.zeros_like(blocked)
            picks = []
            for _ in range(k):
                s = torch.where(blocked, score - 1e4, score).masked_fill(chosen, float("-inf"))
                i = s.argmax(1)  # (B,)
                picks.append(i)
                chosen[rows, i] = True
                blocked |= (pos[None, :] - i[:, None]).abs() <= min_gap
            idx = torch.stack(picks, 1)
        return idx.sort(dim=1).values


def make_bags(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) volumes and (B, k) axial indices -> (B, k, C, D, H) bags of slices x[..., idx]."""
    b, c, d, hgt, _ = x.shape
    gather_idx = idx[:, None, None, None, :].expand(b, c, d, hgt, idx.shape[1])
    return torch.gather(x, 4, gather_idx).permute(0, 4, 1, 2, 3)


class MILResNet2D(nn.Module):
    def __init__(
        self,
        depth: int = 18,
        in_channels: int = 4,
        num_classes: int = 2,
        k: int = 16,
        pooling: str = "attention",
        dropout: float = 0.0,
        min_gap: int = 0,
        bins: int = 32,
        entropy_channel: int | None = None,
    ):
        super().__init__()
        if depth not in ARCHS_2D:
            raise ValueError(f"depth {depth} is not one of {sorted(ARCHS_2D)}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
        if k < 1:
            raise ValueError(f"k {k} must be at least 1")
        if min_gap < 0:
            raise ValueError(f"min_gap {min_gap} must be >= 0")
        if bins < 1:
            raise ValueError(f"bins {bins} must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout {dropout} must lie in [0, 1)")
        self.depth, self.in_channels, self.num_classes = depth, in_channels, num_classes
        self.k, self.pooling, self.min_gap, self.bins = k, pooling, min_gap, bins
        self.entropy_channel = entropy_channel  # the input channel the slices are ranked on; None: all, averaged
        self.backbone = ResNet2D(depth, in_channels)
        self.num_features = self.backbone.num_features
        self.attention = GatedAttention(self.num_features) if pooling == "attention" else None
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        self.last_attention: torch.Tensor | None = None  # (B, k), detached
        self.last_slices: torch.Tensor | None = None  # (B, k), detached, sorted axial indices

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return select_slice_indices(x, self.k, self.min_gap, self.bins, self.entropy_channel)

    def instance_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, D, H, W) -> (instance features (B, k, F), slice indices (B, k))."""
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, D, H, W), got shape {tuple(x.shape)}")
        idx = self.select(x)
        bags = make_bags(x, idx)  # (B, k, C, D, H)
        b, k = idx.shape
        h = self.backbone(bags.reshape(b * k, *bags.shape[2:]))
        return h.view(b, k, -1), idx

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k, F) -> (bag (B, F), instance weights (B, k), each row summing to 1).

        mean: uniform weights; max: the share of feature channels whose maximum each instance holds.
        """
        if self.pooling == "attention":
            return self.attention(h)
        k = h.shape[1]
        if self.pooling == "mean":
            return h.mean(1), torch.full(h.shape[:2], 1.0 / k, device=h.device, dtype=h.dtype)
        bag, arg = h.max(1)  # (B, F)
        share = torch.zeros(h.shape[:2], device=h.device, dtype=torch.float32)
        share.scatter_add_(1, arg, torch.ones_like(arg, dtype=torch.float32))
        return bag, (share / arg.shape[1]).to(h.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, idx = self.instance_features(x)
        bag, a = self.pool(h)
        self.last_attention, self.last_slices = a.detach(), idx.detach()
        return bag

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def head_parameters(self) -> list[nn.Parameter]:
        params = list(self.fc.parameters())
        if self.attention is not None:
            params = list(self.attention.parameters()) + params
        return params

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The 2D ResNet by depth, input first (layer-wise learning-rate decay): the stem (conv1, bn1), layer1..4."""
        b = self.backbone
        return [[*b.conv1.parameters(), *b.bn1.parameters()]] + [list(getattr(b, f"layer{i}").parameters())
                                                                  for i in range(1, 5)]  # fmt: skip

    def arch_record(self) -> dict:
        return {
            "model": "mil2d",
            "depth": self.depth,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "k": self.k,
            "pooling": self.pooling,
            "min_gap": self.min_gap,
            "bins": self.bins,
            "entropy_channel": self.entropy_channel,
        }

    def describe(self) -> str:
        gap = f", min_gap {self.min_gap}" if self.min_gap else ""
        return (
            f"MIL ResNet{self.depth}-2D ({self.k} entropy-selected axial slices{gap}, {self.pooling} pooling, "
            f"{self.in_channels} input channels)"
        )
