"""The operating point of a trained model: probabilities corrected for the sampler's prior, optionally temperature
scaled, and a decision threshold, all fitted on the selection part of the training patients and then applied
unchanged to the outer fold (and to new cases in `predict`).

Prior correction. A class-balanced sampler trains the network on a 50/50 prior, so its P(HGG) answers "HGG or LGG in
a balanced population". Logit adjustment maps it back to the training prior pi: logit p' = logit p + logit pi -
logit 1/2 (Menon et al., ICLR 2021). With plain shuffling the sampled prior is the training prior: no change. The
AUC is unchanged (a monotone map); probabilities, Brier score, ECE and the 0.5 point are not.

Temperature (optional). Fitted by NLL on the selection part; where that part is separable (every HGG above every
LGG) the maximum-likelihood T is 0, so T = 1 is kept instead, with a warning and the reason in `temperature_rule`.

Threshold. Youden's J (sensitivity + specificity - 1, maximal) on the selection part by default, or the lowest
threshold reaching a required specificity there (`--threshold-at-specificity`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from gliograde.evaluation import stats

log = logging.getLogger("gliograde")


@dataclass
class OperatingPoint:
    train_prior: float  # P(HGG) among the training (fit) patients
    sampled_prior: float  # P(HGG) the sampler showed the network: 0.5 when class-balanced
    temperature: float = 1.0
    threshold: float = 0.5
    threshold_rule: str = "0.5"  # youden | specificity>=S | 0.5
    fitted_on: str = "none"  # select (n=..) | none
    temperature_rule: str = "none"  # not fitted | fitted (...) | 1 (fallback: why)

    def apply(self, probs) -> np.ndarray:
        """Raw softmax P(HGG) -> corrected, calibrated P(HGG): one shift and one scale of the float64 logit, no
        clipping, so distinct probabilities stay distinct and in order (the AUC is the raw probabilities')."""
        p = stats.prob_array(np.asarray(probs, dtype=np.float64))
        for name in ("train_prior", "sampled_prior"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie strictly in (0, 1), got {getattr(self, name)}")
        shift = float(stats.logit(self.train_prior) - stats.logit(self.sampled_prior))
        z = stats.logit(p) + shift
        return stats.sigmoid(z / self.temperature if self.temperature != 1.0 else z)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def sampled_prior(sampler: str, train_prior: float) -> float:
    """The prior of the batches: inverse-frequency sampling draws both grades equally often."""
    return 0.5 if sampler == "weighted" else train_prior


def seeds_point(train_counts) -> OperatingPoint:
    """The seeds' operating point (--selection outer): the raw softmax probabilities and the 0.5 threshold."""
    prior = train_counts[1] / max(sum(train_counts), 1)
    return OperatingPoint(prior, prior, fitted_on="none (raw probabilities, threshold 0.5: the seeds' protocol)")


def fit_operating_point(
    labels,
    raw_probs,
    train_counts,
    sampler: str,
    *,
    specificity: float | None = None,
    temperature: bool = False,
) -> OperatingPoint:
    """Fit on the selection part: prior correction from the training counts, then an optional temperature, then
    the threshold on the corrected probabilities."""
    labels = np.asarray(labels)
    prior = train_counts[1] / max(sum(train_counts), 1)
    op = OperatingPoint(prior, sampled_prior(sampler, prior), fitted_on=f"select (n={len(labels)})")
    probs = op.apply(raw_probs)
    if len(np.unique(labels)) < 2:  # cannot happen with the persisted splits (both grades in every part)
        op.threshold_rule = "0.5 (the selection part holds one grade)"
        return op
    if temperature:
        fit = stats.temperature_fit(labels, probs)
        op.temperature, op.temperature_rule = float(fit["temperature"]), fit["rule"]
        if fit["rule"].startswith("1 (fallback"):
            log.warning("Temperature scaling skipped: T = %s", fit["rule"])
        probs = op.apply(raw_probs)
    if specificity is not None:
        op.threshold = float(stats.threshold_at_specificity(labels, probs, specificity))
        op.threshold_rule = f"specificity>={specificity:g}"
    else:
        op.threshold = float(stats.youden_threshold(labels, probs))
        op.threshold_rule = "youden"
    if not math.isfinite(op.threshold):
        op.threshold, op.threshold_rule = 0.5, "0.5 (no finite threshold)"
    return op
