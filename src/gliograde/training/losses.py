"""Losses: cross-entropy, LDAM (Cao et al., NeurIPS 2019) and its deferred re-weighting (DRW) schedule, and the
table of losses (`LOSSES`) that everything else asks: the config check, the command line, the trainer (the module,
the plot label, DRW), the checkpoint (the logit scale that `evaluate` and `predict` then read back).

A new loss is one `register_loss(LossSpec(...))`, in this file or in the researcher's own (nnU-Net's `_build_loss`,
timm's registries)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gliograde.config import ConfigError, register_choices
from gliograde.errors import unknown_name


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


@dataclass(frozen=True)
class LossSpec:
    """One loss: `build(class_counts, cfg)` -> the nn.Module (logits, targets) -> loss; `logit_scale(cfg)` -> s, where
    P(HGG) = softmax(s x logits) (the scale the loss itself applied to the logits; 1 for plain logits), recorded in
    every checkpoint; `drw`: deferred re-weighting applies (the module then has a `weight` buffer that the trainer
    sets from --drw-start-epoch on)."""

    name: str
    display: str  # how plots and logs name it
    build: Callable[[list[int], Any], nn.Module]
    logit_scale: Callable[[Any], float] = lambda cfg: 1.0
    drw: bool = False


LOSSES: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    """Add (or replace) a loss in the table; `--loss NAME` and configuration files may then name it."""
    LOSSES[spec.name] = spec
    return spec


def get_loss(name: str, where: str = "--loss") -> LossSpec:
    """The spec of a registered loss; `where`: what gave the name, for the one-line error."""
    if name not in LOSSES:
        raise ConfigError(unknown_name(where, name, LOSSES, "loss"))
    return LOSSES[name]


register_loss(LossSpec("ce", "cross-entropy", lambda counts, cfg: CrossEntropy()))
register_loss(
    LossSpec(
        "ldam",
        "LDAM",
        lambda counts, cfg: LDAMLoss(counts, max_m=cfg.max_m, s=cfg.ldam_s),
        logit_scale=lambda cfg: float(cfg.ldam_s),  # its probabilities come from the scaled logits s x z it used
        drw=True,
    )
)
register_choices("loss", "loss", LOSSES)


def make_loss(cfg, cls_num_list, where: str = "--loss") -> nn.Module:
    """The loss module `cfg.loss` names, for a training set of `cls_num_list` cases per class."""
    return get_loss(cfg.loss, where).build(list(cls_num_list), cfg)


def drw_active(loss: str, drw_start_epoch: int | None, epoch: int) -> bool:
    """DRW applies to a loss whose spec says so (LDAM) from the 1-based epoch `drw_start_epoch` on."""
    return get_loss(loss).drw and drw_start_epoch is not None and epoch >= drw_start_epoch
