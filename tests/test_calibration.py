"""The operating point: prior correction, temperature and threshold fitted on the selection part only."""

import numpy as np
import pytest
import torch

from gliograde.evaluation import stats
from gliograde.evaluation.calibration import OperatingPoint, fit_operating_point, sampled_prior, seeds_point
from gliograde.evaluation.scoring import score_loader


def balanced_trained_probs(n=4000, prior=0.74, seed=0):
    """Labels with HGG prior `prior`, and the probabilities a well-calibrated model trained on a 50/50 sampler
    outputs: the true posterior's odds divided by the prior odds."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior).astype(int)
    z = rng.normal(0, 1, n) + 1.5 * (2 * y - 1) / 2  # a score with class-conditional means +-0.75
    true_logit = 1.5 * z + stats.logit(prior)  # the Bayes posterior of this score
    balanced = stats.sigmoid(true_logit - stats.logit(prior))
    return y, balanced, stats.sigmoid(true_logit)


def test_the_prior_correction_undoes_the_balanced_sampler():
    y, balanced, true = balanced_trained_probs()
    prior = y.mean()
    point = fit_operating_point(y, balanced, [int((y == 0).sum()), int(y.sum())], "weighted")
    assert point.sampled_prior == 0.5 and point.train_prior == pytest.approx(prior)
    np.testing.assert_allclose(point.apply(balanced), true, atol=0.02)  # the population posterior again
    assert stats.ece(y, point.apply(balanced)) < stats.ece(y, balanced)  # better calibrated
    # the AUC is that of the raw probabilities: a monotone map
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, point.apply(balanced)) == pytest.approx(roc_auc_score(y, balanced))
    assert sampled_prior("shuffle", 0.7) == 0.7  # plain shuffling: nothing to correct


def test_threshold_rules_and_temperature():
    y, balanced, _ = balanced_trained_probs(seed=1)
    counts = [int((y == 0).sum()), int(y.sum())]
    youden = fit_operating_point(y, balanced, counts, "weighted")
    assert youden.threshold_rule == "youden" and youden.threshold == pytest.approx(
        stats.youden_threshold(y, youden.apply(balanced))
    )
    strict = fit_operating_point(y, balanced, counts, "weighted", specificity=0.9)
    spec = ((strict.apply(balanced) < strict.threshold) & (y == 0)).sum() / (y == 0).sum()
    assert strict.threshold_rule == "specificity>=0.9" and spec >= 0.9
    hot = stats.sigmoid(3 * stats.logit(balanced))  # overconfident by a factor 3
    tempered = fit_operating_point(y, hot, counts, "weighted", temperature=True)
    assert tempered.temperature == pytest.approx(3, rel=0.2)
    assert OperatingPoint.from_dict(tempered.to_dict()) == tempered
    assert seeds_point(counts).apply(balanced) == pytest.approx(balanced)  # the seeds' protocol: raw, 0.5


def test_ldam_probabilities_come_from_the_scaled_logits():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros(len(x)), x.flatten(1).mean(1)], 1)

    x = torch.linspace(-0.1, 0.1, 6).view(6, 1, 1, 1, 1)
    batches = [(x, torch.tensor([0, 0, 0, 1, 1, 1]))]
    loss = torch.nn.CrossEntropyLoss()
    _, plain, _ = score_loader(Fixed(), batches, torch.device("cpu"), None, loss)
    _, scaled, _ = score_loader(Fixed(), batches, torch.device("cpu"), None, loss, logit_scale=30.0)
    z = x.flatten().numpy()
    np.testing.assert_allclose(plain, stats.sigmoid(z), rtol=1e-5)
    np.testing.assert_allclose(scaled, stats.sigmoid(30 * z), rtol=1e-5)


def test_the_operating_point_never_changes_the_ranking():
    """The former arithmetic clipped P(HGG) to [1e-6, 1 - 1e-6] before the logit: the five values beyond the clip
    tied, and the AUC fell from 0.6875 to 0.53125 on this input. The float64 logit, shifted and scaled unclipped,
    keeps them apart."""
    from scipy.special import expit, logit
    from sklearn.metrics import roc_auc_score

    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    raw = np.array([0.9, 5e-7, 2e-7, 1 - 1e-8, 1e-8, 0.5, 1e-7, 1 - 1e-7])
    clipped = expit(logit(np.clip(raw, 1e-6, 1 - 1e-6)) + logit(0.75))  # what apply() did before
    assert roc_auc_score(y, raw) == 0.6875 and roc_auc_score(y, clipped) == 0.53125
    for point in (OperatingPoint(0.75, 0.5), OperatingPoint(0.75, 0.5, temperature=0.5), OperatingPoint(0.2, 0.5, 3.0)):
        calibrated = point.apply(raw)
        assert roc_auc_score(y, calibrated) == roc_auc_score(y, raw) == 0.6875
        assert (np.argsort(calibrated, kind="stable") == np.argsort(raw, kind="stable")).all()
    assert OperatingPoint(0.75, 0.5).apply([0.0, 1.0]).tolist() == [0.0, 1.0]  # the ends stay the ends


def test_a_separable_selection_part_keeps_temperature_one_and_says_why(caplog):
    y = np.array([0] * 6 + [1] * 14)
    raw = np.r_[np.linspace(0.05, 0.4, 6), np.linspace(0.6, 0.97, 14)]  # every HGG above every LGG
    assert stats.fit_temperature(y, raw) == pytest.approx(0.05, rel=0.01)  # the fit runs to its bound
    with caplog.at_level("WARNING", logger="gliograde"):
        point = fit_operating_point(y, raw, [30, 70], "weighted", temperature=True)
    assert point.temperature == 1.0 and point.temperature_rule.startswith("1 (fallback: the selection part is sep")
    assert "Temperature scaling skipped" in caplog.text
    assert point.to_dict()["temperature_rule"] == point.temperature_rule  # recorded in the operating point
    assert OperatingPoint.from_dict(point.to_dict()) == point
    overlapping = np.r_[raw[:5], 0.7, raw[6:]]  # one LGG among the HGG: a finite temperature exists
    fitted = fit_operating_point(y, overlapping, [30, 70], "weighted", temperature=True)
    assert fitted.temperature_rule.startswith("fitted") and 0.05 < fitted.temperature < 20
