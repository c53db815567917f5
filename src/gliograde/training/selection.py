"""Model selection during training: which epoch is best (raw weights and EMA weights), and when to stop.

The monitor is the AUC of the monitored set, F1 breaking ties. With `--selection inner` (the default of `cv`) the
monitored set is the selection part of the training patients, never the outer fold that is reported; with
`--selection outer` (the seeds' protocol) it is the reported fold itself, and the summary says that this is optimistic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


def improved(auc: float, f1: float, best: dict, min_delta: float) -> bool:
    """Validation AUC is the monitor, F1 breaks ties."""
    if math.isnan(auc):
        return False
    return auc > best["auc"] + min_delta or (abs(auc - best["auc"]) <= 1e-12 and f1 > best["f1"])


def _nothing() -> dict:
    return {"auc": -math.inf, "f1": -math.inf, "epoch": 0}


@dataclass
class Tracker:
    """The best epoch of the raw and of the EMA weights, and the epochs since either last improved."""

    min_delta: float = 0.0
    best: dict = field(default_factory=_nothing)
    best_ema: dict = field(default_factory=_nothing)
    bad_epochs: int = 0

    def update(self, epoch: int, metrics: dict, ema_metrics: dict | None) -> tuple[bool, bool]:
        """Record an epoch's monitored metrics; returns (raw weights improved, EMA weights improved)."""
        is_best = improved(metrics["auc"], metrics["f1"], self.best, self.min_delta)
        if is_best:
            self.best = {"auc": metrics["auc"], "f1": metrics["f1"], "epoch": epoch}
        ema_best = ema_metrics is not None and improved(
            ema_metrics["auc"], ema_metrics["f1"], self.best_ema, self.min_delta
        )
        if ema_best:
            self.best_ema = {"auc": ema_metrics["auc"], "f1": ema_metrics["f1"], "epoch": epoch}
        self.bad_epochs = 0 if (is_best or ema_best) else self.bad_epochs + 1
        return is_best, ema_best

    def should_stop(self, epoch: int, min_epochs: int, patience: int) -> bool:
        return epoch >= min_epochs and self.bad_epochs >= patience

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, min_delta: float) -> Tracker:
        return cls(min_delta, ckpt["best"], ckpt["best_ema"], ckpt["bad_epochs"])
