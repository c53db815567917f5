"""Exponential moving average of the weights (and buffers), updated without a host synchronisation.

torch.optim.swa_utils.AveragedModel tests its tensor counter `n_averaged` on the host at every update, a device sync
per optimizer step. Here the count lives in Python (the buffer is kept for the state dict, with the same keys as
AveragedModel's: "module.<name>" and "n_averaged"), and the update is one foreach lerp over the float tensors.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        device = next(model.parameters()).device
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self._count = 0

    def _pairs(self, model: nn.Module):
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        return mine, theirs

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine, theirs = self._pairs(model)
        floats = [(a, b.detach()) for a, b in zip(mine, theirs, strict=True) if a.is_floating_point()]
        others = [(a, b.detach()) for a, b in zip(mine, theirs, strict=True) if not a.is_floating_point()]
        if self._count == 0:  # the first update copies, as AveragedModel does
            torch._foreach_copy_([a for a, _ in floats], [b for _, b in floats])
        else:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - self.decay)
        for a, b in others:  # BatchNorm step counters: the model's own
            a.copy_(b)
        self.n_averaged.add_(1)
        self._count += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._count = int(self.n_averaged)  # once, at resume
        return out

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
