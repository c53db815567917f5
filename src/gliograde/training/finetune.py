"""Fine-tuning a pretrained encoder on a small cohort: which parameters train in which epoch.

- `--probe` (linear probing): the backbone frozen for the whole run; only the head trains.
- `--freeze-epochs N`: the backbone frozen for epochs 1..N (the head alone fits the pretrained features), then
  unfrozen and fine-tuned with the head from epoch N + 1.
- `--layer-decay F` (optim.py): the backbone's layer groups at lr x F^(n-1-i).

A frozen backbone is frozen twice: its parameters get no gradient (requires_grad False: the optimizer skips a
parameter whose .grad is None, decoupled weight decay included), and its BatchNorm and Dropout modules run in eval
mode while the rest of the network trains, so that its running statistics, estimated on the pretraining data, do not
drift towards the statistics of a few training batches: a frozen backbone is a fixed feature extractor.

With none of these options nothing here touches the network (`backbone_trains` is True for every epoch, and
requires_grad is never set).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from gliograde.config import TrainConfig


def backbone_trains(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the backbone trains in `epoch` (1-based)."""
    return not cfg.probe and epoch > cfg.freeze_epochs


def freezes(cfg: TrainConfig) -> bool:
    """Whether the backbone is frozen in some epoch of the run."""
    return cfg.probe or cfg.freeze_epochs > 0


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for p in model.backbone_parameters():
        p.requires_grad_(trainable)


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters all belong to the backbone (ResNet3D: conv1, bn1, layer1..4; MIL: its
    2D ResNet; EncoderClassifier: its encoder). A module without parameters outside them (the head's Dropout, the
    pooling) is not the backbone's."""
    backbone = {id(p) for p in model.backbone_parameters()}
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        own = [id(p) for p in module.parameters()]
        if own and all(i in backbone for i in own):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def hold_frozen(model: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    """After model.train() at the start of an epoch: a frozen backbone's BatchNorm and Dropout back in eval mode.
    BatchNorm in train mode would normalise with each batch's statistics and update its running mean and variance
    even with requires_grad False (they are buffers, not parameters): the frozen features would drift."""
    if not backbone_trains(cfg, epoch):
        for module in backbone_modules(model):
            module.eval()


def prepare(model: nn.Module, cfg: TrainConfig, log: logging.Logger) -> None:
    """Before the optimizer and DDP are made: --probe freezes the backbone here, for good, so that DDP registers the
    head alone (DDP ignores the parameters that require no gradient when it is built) and needs no search for unused
    parameters. --freeze-epochs leaves the backbone trainable here: DDP must register it, to all-reduce its gradients
    once it is unfrozen; `enter_epoch` freezes it for the first epochs (see `ddp_options`)."""
    head = sum(p.numel() for p in model.head_parameters())
    body = sum(p.numel() for p in model.backbone_parameters())
    if cfg.probe:
        set_backbone_trainable(model, False)
        log.info("Linear probing (--probe): the backbone (%.2fM parameters) frozen for the whole run, its BatchNorm "
                 "statistics included; the head (%d parameters) trains at lr %.2e (--lr x --classifier-lr-mult)",
                 body / 1e6, head, cfg.lr * cfg.classifier_lr_mult)  # fmt: skip
    elif cfg.freeze_epochs > 0:
        log.info("The backbone (%.2fM parameters) frozen for epochs 1-%d, its BatchNorm statistics included; the "
                 "head (%d parameters) trains alone until then", body / 1e6, cfg.freeze_epochs, head)  # fmt: skip


def ddp_options(cfg: TrainConfig) -> dict:
    """DistributedDataParallel's keywords for this run. With --freeze-epochs DDP is built over every parameter (the
    backbone will train) while the backbone gets no gradient in the first epochs: its reducer would wait for those
    gradients and fail at the next step ("Expected to have finished reduction in the prior iteration").
    find_unused_parameters=True has it mark the parameters outside the autograd graph ready each step, and a
    parameter unused on every rank keeps .grad None, so the optimizer skips it (tested with gloo). static_graph is
    not set: the set of parameters that get a gradient changes at the unfreeze. --probe needs neither: DDP is built
    after the backbone is frozen and ignores it. Without these options: DDP's defaults, as before."""
    return {"find_unused_parameters": True} if cfg.freeze_epochs > 0 and not cfg.probe else {}


def enter_epoch(model: nn.Module, cfg: TrainConfig, epoch: int, log: logging.Logger) -> None:
    """At the start of each epoch (a resumed run's first too): --freeze-epochs sets the backbone's requires_grad for
    this epoch, and says when it is unfrozen."""
    if cfg.probe or cfg.freeze_epochs <= 0:
        return
    trains = backbone_trains(cfg, epoch)
    set_backbone_trainable(model, trains)
    if epoch == cfg.freeze_epochs + 1:
        log.info("Backbone unfrozen at epoch %d (frozen for epochs 1-%d): it fine-tunes with the head from now on",
                 epoch, cfg.freeze_epochs)  # fmt: skip


def group_lrs(optimizer) -> tuple[float, float]:
    """(backbone, head) learning rates of an epoch's record: the backbone's is its top layer group's (the full
    rate under --layer-decay), 0 while it is frozen or under --probe (it has no group then)."""
    head = next((g["lr"] for g in optimizer.param_groups if g.get("name") == "head"), optimizer.param_groups[-1]["lr"])
    body = [g for g in optimizer.param_groups if str(g.get("name", "")).startswith("backbone")]
    if not body or not any(p.requires_grad for p in body[-1]["params"]):
        return 0.0, head
    return body[-1]["lr"], head
