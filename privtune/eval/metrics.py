"""MIA metrics of specs/attacks.md §0.3, from higher-is-member scores and labels (1 = member).

* AUC: area under the exact ROC (every unique score is a threshold).
* ASR: best balanced accuracy (TPR + TNR)/2 over all thresholds; on a balanced set this is the
  spec's max_τ (TP+TN)/(N_m+N_n), and unlike it it does not reward predicting the majority class.
* TPR@FPR: TPR at the largest ROC FPR that is <= the target (1% and 0.1%).
* Confidence intervals: stratified percentile bootstrap (members and non-members resampled
  separately, seeded).
* `calibrated_accuracy`: a threshold fitted on calibration scores, applied to the report split,
  so the reported accuracy is not the optimistic best-threshold-on-test of the official codes.

Every function returns plain floats / lists / dicts, ready for JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import auc as _area
from sklearn.metrics import roc_curve

from ..errors import DataError

FPR_TARGETS = {"tpr@1%fpr": 0.01, "tpr@0.1%fpr": 0.001}
METRIC_NAMES = ("auc", "asr", *FPR_TARGETS)
MIN_NONMEMBERS = {"tpr@1%fpr": 100, "tpr@0.1%fpr": 1000}


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if s.shape != y.shape:
        raise DataError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise DataError(f"{int(np.isnan(s).sum())} attack scores are NaN")
    if not set(np.unique(y)) <= {0, 1}:
        raise DataError("labels must be 1 (member) or 0 (non-member)")
    if y.sum() == 0 or y.sum() == y.size:
        raise DataError("metrics need at least one member and one non-member")
    return s, y


def _roc(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return roc_curve(y, s, drop_intermediate=False)


def _from_roc(fpr: np.ndarray, tpr: np.ndarray) -> dict[str, float]:
    out = {"auc": float(_area(fpr, tpr)), "asr": float(np.max((tpr + 1.0 - fpr) / 2.0))}
    for name, target in FPR_TARGETS.items():
        out[name] = float(tpr[fpr <= target + 1e-12].max())
    return out


def roc_metrics(scores, labels) -> dict[str, float]:
    """AUC, ASR, TPR@1%FPR and TPR@0.1%FPR of one score set."""
    s, y = _check(scores, labels)
    fpr, tpr, _ = _roc(s, y)
    return _from_roc(fpr, tpr)


def auc(scores, labels) -> float:
    return roc_metrics(scores, labels)["auc"]


def asr(scores, labels) -> float:
    return roc_metrics(scores, labels)["asr"]


def tpr_at_fpr(scores, labels, target_fpr: float) -> float:
    """TPR at the largest FPR <= target_fpr on the exact ROC."""
    s, y = _check(scores, labels)
    fpr, tpr, _ = _roc(s, y)
    return float(tpr[fpr <= target_fpr + 1e-12].max())


def bootstrap_ci(
    scores, labels, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals [lo, hi] for each metric of `roc_metrics`."""
    s, y = _check(scores, labels)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws = {name: np.empty(n_resamples) for name in METRIC_NAMES}
    for b in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        fpr, tpr, _ = _roc(s[idx], y[idx])
        for name, value in _from_roc(fpr, tpr).items():
            draws[name][b] = value
    q = [50.0 * (1.0 - level), 50.0 * (1.0 + level)]
    return {name: [float(v) for v in np.percentile(d, q)] for name, d in draws.items()}


def small_sample_warnings(n_nonmembers: int) -> list[str]:
    """Texts saying which low-FPR numbers rest on too few non-members to mean anything."""
    out = []
    for name, need in MIN_NONMEMBERS.items():
        if n_nonmembers < need:
            out.append(
                f"{name} is unreliable: only {n_nonmembers} non-members (need >= {need}); "
                f"one non-member above the threshold already moves the FPR by {100.0 / max(n_nonmembers, 1):.2g}%"
            )
    return out


def evaluate_scores(scores, labels, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Point estimates with bootstrap CIs, sample counts and small-sample warnings."""
    s, y = _check(scores, labels)
    point = roc_metrics(s, y)
    ci = bootstrap_ci(s, y, n_resamples, seed, level) if n_resamples > 0 else {}
    n_non = int((y == 0).sum())
    out: dict[str, Any] = {"n_members": int(y.sum()), "n_nonmembers": n_non, "ci_level": level, "n_resamples": n_resamples}
    for name in METRIC_NAMES:
        out[name] = {"value": point[name], "ci": ci.get(name)}
    out["warnings"] = small_sample_warnings(n_non)
    return out


def best_threshold(scores, labels) -> tuple[float, float]:
    """(τ, balanced accuracy) of the rule "member iff score >= τ" that is best on these scores;
    τ is the midpoint to the next lower score, so it transfers without ties at the boundary."""
    s, y = _check(scores, labels)
    fpr, tpr, thr = _roc(s, y)
    bal = (tpr + 1.0 - fpr) / 2.0
    bal[0] = -np.inf
    i = int(np.argmax(bal))
    tau = thr[i] if i + 1 >= thr.size else (thr[i] + thr[i + 1]) / 2.0
    return float(tau), float(bal[i])


def calibrated_accuracy(cal_scores, cal_labels, eval_scores, eval_labels) -> dict[str, float]:
    """Fits τ on calibration (best balanced accuracy) and reports it on the evaluation split."""
    tau, cal_bal = best_threshold(cal_scores, cal_labels)
    s, y = _check(eval_scores, eval_labels)
    pred = s >= tau
    tpr = float(pred[y == 1].mean())
    fpr = float(pred[y == 0].mean())
    return {
        "threshold": tau,
        "calibration_balanced_accuracy": cal_bal,
        "accuracy": float((pred == (y == 1)).mean()),
        "balanced_accuracy": (tpr + 1.0 - fpr) / 2.0,
        "tpr": tpr,
        "fpr": fpr,
    }
