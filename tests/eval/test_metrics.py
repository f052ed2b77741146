import json

import numpy as np
import pytest

from privtune.errors import DataError
from privtune.eval.metrics import (
    asr,
    auc,
    best_threshold,
    bootstrap_ci,
    calibrated_accuracy,
    evaluate_scores,
    roc_metrics,
    small_sample_warnings,
    tpr_at_fpr,
)


def test_perfect_separation():
    scores = np.r_[np.linspace(2, 3, 50), np.linspace(0, 1, 50)]
    labels = np.r_[np.ones(50), np.zeros(50)]
    m = roc_metrics(scores, labels)
    assert m == {"auc": 1.0, "asr": 1.0, "tpr@1%fpr": 1.0, "tpr@0.1%fpr": 1.0}
    assert auc(scores, 1 - labels) == 0.0


def test_hand_computed_example():
    # members 0.9, 0.8, 0.4; non-members 0.7, 0.3, 0.2: 8 of 9 pairs ordered -> AUC 8/9
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2])
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert auc(scores, labels) == pytest.approx(8 / 9)
    assert asr(scores, labels) == pytest.approx(5 / 6)
    assert tpr_at_fpr(scores, labels, 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, labels, 1 / 3) == pytest.approx(1.0)
    tau, bal = best_threshold(scores, labels)
    assert bal == pytest.approx(5 / 6) and 0.3 < tau <= 0.4


def test_ties_count_half():
    assert auc([1.0, 1.0], [1, 0]) == 0.5


def test_identical_distributions_near_half():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=4000)
    labels = np.r_[np.ones(2000), np.zeros(2000)]
    m = roc_metrics(scores, labels)
    assert abs(m["auc"] - 0.5) < 0.03 and m["asr"] < 0.55 and m["tpr@1%fpr"] < 0.05


def test_ci_contains_point_and_is_seeded():
    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(1, 1, 300), rng.normal(0, 1, 300)]
    labels = np.r_[np.ones(300), np.zeros(300)]
    res = evaluate_scores(scores, labels, n_resamples=300, seed=3)
    for name in ("auc", "asr", "tpr@1%fpr"):
        lo, hi = res[name]["ci"]
        assert lo <= res[name]["value"] <= hi and lo < hi
    assert bootstrap_ci(scores, labels, 50, seed=3) == bootstrap_ci(scores, labels, 50, seed=3)
    json.dumps(res)


def test_small_sample_warnings():
    assert len(small_sample_warnings(50)) == 2
    (only,) = small_sample_warnings(500)
    assert "tpr@0.1%fpr" in only
    assert small_sample_warnings(1000) == []
    res = evaluate_scores([1, 0], [1, 0], n_resamples=10)
    assert any("tpr@1%fpr" in w for w in res["warnings"])


def test_calibrated_accuracy_applies_calibration_threshold():
    cal_s, cal_y = np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0])
    ev_s, ev_y = np.array([2.4, 1.6, 1.4, 0.5]), np.array([1, 0, 1, 0])
    res = calibrated_accuracy(cal_s, cal_y, ev_s, ev_y)
    assert res["threshold"] == pytest.approx(1.5)
    assert res["tpr"] == 0.5 and res["fpr"] == 0.5 and res["accuracy"] == 0.5
    assert res["calibration_balanced_accuracy"] == 1.0


def test_bad_inputs():
    with pytest.raises(DataError):
        auc([1.0, 2.0], [1, 1])
    with pytest.raises(DataError):
        auc([np.nan, 2.0], [1, 0])
