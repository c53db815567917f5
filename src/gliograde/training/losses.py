"""Losses: cross-entropy, LDAM (Cao et al., NeurIPS 2019) and its deferred re-weighting (DRW) schedule."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss.

    Margins m_j = C / n_j^(1/4), with C chosen so that the largest margin is `max_m`, are subtracted from the
    logit of the true class, then cross-entropy is taken on s * logits (optionally class-weighted).
    """

    def __init__(self, cls_num_list, max_m: float = 0.5, s: float = 30.0, weight: torch.Tensor | None = None):
        super().__init__()
        counts = np.asarray(cls_num_list, dtype=np.float64)
        if (counts <= 0).any():
            raise ValueError(f"LDAM needs at least one sample per class, got counts {counts.tolist()}")
        margins = 1.0 / np.sqrt(np.sqrt(counts))
        margins = margins * (max_m / margins.max())
        self.register_buffer("margins", torch.tensor(margins, dtype=torch.float32))
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.s = s

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        margin = F.one_hot(target, logits.shape[1]).to(logits.dtype) * self.margins[target, None]
        return F.cross_entropy(self.s * (logits - margin), target, weight=self.weight)


class CrossEntropy(nn.Module):
    """nn.CrossEntropyLoss computed in fp32 (logits may come out of autocast in bf16/fp16)."""

    def __init__(self, weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight)


def drw_weights(cls_num_list) -> torch.Tensor:
    """DRW class weights proportional to sqrt(n_max / n_j), scaled to average 1."""
    counts = np.asarray(cls_num_list, dtype=np.float64)
    w = np.sqrt(counts.max() / counts)
    return torch.tensor(w * len(w) / w.sum(), dtype=torch.float32)


def make_loss(name: str, cls_num_list, max_m: float = 0.5, s: float = 30.0) -> nn.Module:
    if name == "ldam":
        return LDAMLoss(cls_num_list, max_m=max_m, s=s)
    return CrossEntropy()


def drw_active(loss: str, drw_start_epoch: int | None, epoch: int) -> bool:
    """DRW applies to LDAM from the 1-based epoch `drw_start_epoch` on."""
    return loss == "ldam" and drw_start_epoch is not None and epoch >= drw_start_epoch
