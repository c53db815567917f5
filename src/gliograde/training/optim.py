"""The optimizer (two parameter groups: backbone and classifier head; the head alone with --probe; one group per
layer of the backbone with --layer-decay) and the learning-rate schedule (linear warmup, then cosine / step /
constant), stepped once per optimizer step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gliograde.config import ConfigError, TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The optimizer's groups, through the network's contract (networks/classifier.py): the head always at
    lr x classifier_lr_mult, last;
    - by default (today's, unchanged): the backbone at lr, then the head;
    - --probe: the head alone (the backbone is frozen for the whole run and has no group);
    - --layer-decay F < 1: the backbone's `layer_groups()` (input first), group i of n at lr x F^(n-1-i) (BEiT, MAE
      fine-tuning), named backbone.0 .. backbone.n-1, then the head.
    --freeze-epochs keeps the default (or layer) groups from the first step: see `make_optimizer`."""
    head = {"params": model.head_parameters(), "lr": cfg.lr * cfg.classifier_lr_mult, "name": "head"}
    if cfg.probe:
        return [head]
    if cfg.layer_decay == 1:
        return [{"params": model.backbone_parameters(), "lr": cfg.lr, "name": "backbone"}, head]
    if not hasattr(model, "layer_groups"):
        raise ConfigError(f"--layer-decay: {type(model).__name__} has no layer_groups() (networks/classifier.py)")
    layers = [list(g) for g in model.layer_groups() if len(g)]
    flat = [id(p) for g in layers for p in g]
    if len(flat) != len(set(flat)) or set(flat) != {id(p) for p in model.backbone_parameters()}:
        raise ConfigError(f"--layer-decay: the layer_groups() of {type(model).__name__} do not hold each backbone "
                          "parameter exactly once")  # fmt: skip
    n = len(layers)
    groups = [{"params": g, "lr": cfg.lr * cfg.layer_decay ** (n - 1 - i), "name": f"backbone.{i}"}
              for i, g in enumerate(layers)]  # fmt: skip
    return [*groups, head]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The groups of `param_groups`. With --freeze-epochs every group is in the optimizer from the first step, the
    frozen backbone's included: a parameter whose .grad is None (requires_grad False, and zero_grad(set_to_none=True))
    is skipped by Adam, AdamW and SGD, fused or not: no update, no decoupled weight decay, no state. So nothing is
    rebuilt at the unfreeze: the head keeps its Adam moments, the one LambdaLR drives every group (the backbone joins
    at the point of the warmup + cosine the run has reached), the GradScaler and EMA are untouched, and the state
    dict has the same layout before and after it (a --resume on either side loads last.pt as it is). Rebuilding
    would reset the head's moments, need a fresh scheduler fast-forwarded to the step, and give last.pt two layouts.
    The backbone's Adam moments start at its first gradient, as a fresh optimizer's would."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # one kernel for all parameters, on a GPU and on the CPU too (torch >= 2.4): the per-tensor loop took a fifth of
    # the CPU demo's training time (0.8 s against 0.25 s a step for ResNet-10), for the same update to float rounding
    fused = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    return cls(groups, weight_decay=cfg.weight_decay, fused=fused or None)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Stepped once per optimizer step: linear warmup, then cosine to zero / steps of gamma / constant."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if cfg.scheduler == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
