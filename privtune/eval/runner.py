"""Runs a set of MIAs on one target under the calibration / report protocol of specs/attacks.md §0.3:
members and non-members are each split by a seeded permutation into a calibration half (the only
data any attack may fit a timestep, classifier or threshold on) and a report half (the only data
metrics are reported on). Overlaps by sample id between members and non-members, or between the
calibration and report sets, raise a DataError before any model call.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .attacks import ATTACKS, Attack, AttackScores, AttackTarget, EncodedSamples
from .attacks.base import member_labels
from .metrics import calibrated_accuracy, evaluate_scores


@dataclass
class CalibrationSplit:
    calibration_members: EncodedSamples
    calibration_nonmembers: EncodedSamples
    report_members: EncodedSamples
    report_nonmembers: EncodedSamples


def split_calibration(
    members: EncodedSamples, nonmembers: EncodedSamples, fraction: float = 0.5, seed: int = 0
) -> CalibrationSplit:
    """Disjoint calibration / report parts of each class; round(fraction·n) samples calibrate."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"calibration_fraction must be in (0, 1), got {fraction}")
    parts = []
    for role, samples in enumerate((members, nonmembers)):
        n = len(samples)
        n_cal = int(round(fraction * n))
        if n_cal < 1 or n_cal >= n:
            raise DataError(
                f"cannot split {n} {'members' if role == 0 else 'non-members'} into calibration and report "
                f"parts with fraction {fraction}; each part needs at least one sample"
            )
        perm = np.random.default_rng([int(seed), role]).permutation(n)
        parts.append((samples.subset(np.sort(perm[:n_cal])), samples.subset(np.sort(perm[n_cal:]))))
    return CalibrationSplit(parts[0][0], parts[1][0], parts[0][1], parts[1][1])


def _unique_ids(samples: EncodedSamples, what: str) -> set[str]:
    ids = set(samples.ids)
    if len(ids) != len(samples.ids):
        raise DataError(f"{what} contain duplicate sample ids; every sample needs a unique id")
    return ids


def check_disjoint(split: CalibrationSplit) -> None:
    """Raises DataError if a sample id is both member and non-member, or both calibration and report."""
    cm = _unique_ids(split.calibration_members, "calibration members")
    cn = _unique_ids(split.calibration_nonmembers, "calibration non-members")
    rm = _unique_ids(split.report_members, "report members")
    rn = _unique_ids(split.report_nonmembers, "report non-members")
    both = (cm | rm) & (cn | rn)
    if both:
        raise DataError(f"{len(both)} sample ids are both members and non-members, e.g. {sorted(both)[:3]}")
    leak = (cm | cn) & (rm | rn)
    if leak:
        raise DataError(
            f"{len(leak)} sample ids are in both the calibration and the report set, e.g. {sorted(leak)[:3]}; "
            "thresholds and classifiers must never see report samples"
        )


def build_attack(name: str, params: Mapping[str, Any] | None = None, seed: int = 0) -> Attack:
    """Instantiates a registered attack; unknown names or settings raise ConfigError."""
    cls = ATTACKS.get(name)
    kwargs = dict(params or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"attack {name!r} has no setting(s) {unknown}; valid settings: {', '.join(accepted)}")
    kwargs.setdefault("seed", seed)
    return cls(**kwargs)


def _samples_dict(scores: AttackScores, labels: np.ndarray) -> dict[str, list]:
    return {
        "ids": list(scores.ids), "labels": [int(v) for v in labels],
        "scores": [float(v) for v in scores.scores], "raw": [float(v) for v in scores.raw],
    }


def run_attacks(
    target: AttackTarget,
    members: EncodedSamples,
    nonmembers: EncodedSamples,
    attack_names: Sequence[str],
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    n_bootstrap: int = 1000,
    progress: bool = True,
    split: CalibrationSplit | None = None,
) -> dict[str, Any]:
    """Calibrates each attack on the calibration split, scores the report split, returns a JSON-able
    dict. `attack_params[name]` holds constructor settings; `split` overrides the seeded split.

    {"protocol": {score_orientation, calibration_fraction, seed, batch_size, n_calibration, n_report},
     "attacks": {name: {"params": attack.params(), "nfe_per_sample", "calibration_nfe_per_sample",
                        "metrics": evaluate_scores(...) on the report split (value + CI per metric, warnings),
                        "calibrated_threshold": calibrated_accuracy(...) + n_threshold_fit,
                        "samples": {"ids", "labels", "scores", "raw"} of the report split, "seconds"}}}
    """
    attack_params = dict(attack_params or {})
    for name in attack_params:
        ATTACKS.get(name)
    attacks = {name: build_attack(name, attack_params.get(name), seed) for name in attack_names}
    if split is None:
        for what, s in (("members", members), ("non-members", nonmembers)):
            _unique_ids(s, what)
        split = split_calibration(members, nonmembers, calibration_fraction, seed)
    check_disjoint(split)
    cal_ids = set(split.calibration_members.ids) | set(split.calibration_nonmembers.ids)
    report = EncodedSamples.concat([split.report_members, split.report_nonmembers])
    report_labels = member_labels(len(split.report_members), len(split.report_nonmembers))

    results: dict[str, Any] = {}
    for name, attack in attacks.items():
        start = time.perf_counter()
        cal = attack.calibrate(
            target, split.calibration_members, split.calibration_nonmembers, batch_size=batch_size, progress=progress
        )
        if cal is None:
            cal_samples = EncodedSamples.concat([split.calibration_members, split.calibration_nonmembers])
            cal = attack.score(target, cal_samples, batch_size=batch_size, progress=progress)
            cal.labels = member_labels(len(split.calibration_members), len(split.calibration_nonmembers))
        fitted = set(getattr(attack, "fit_ids", [])) | set(cal.ids)
        if not fitted <= cal_ids:
            raise DataError(f"attack {name!r} fitted on samples outside the calibration split")
        rep = attack.score(target, report, batch_size=batch_size, progress=progress)
        results[name] = {
            "params": attack.params(),
            "nfe_per_sample": rep.nfe_per_sample,
            "calibration_nfe_per_sample": cal.nfe_per_sample,
            "metrics": evaluate_scores(rep.scores, report_labels, n_resamples=n_bootstrap, seed=seed),
            "calibrated_threshold": {
                **calibrated_accuracy(cal.scores, cal.labels, rep.scores, report_labels),
                "n_threshold_fit": int(len(cal.scores)),
            },
            "samples": _samples_dict(rep, report_labels),
            "seconds": time.perf_counter() - start,
        }
    return {
        "protocol": {
            "score_orientation": "higher score = more likely member",
            "calibration_fraction": calibration_fraction,
            "seed": seed,
            "batch_size": batch_size,
            "n_calibration": {"members": len(split.calibration_members), "nonmembers": len(split.calibration_nonmembers)},
            "n_report": {"members": len(split.report_members), "nonmembers": len(split.report_nonmembers)},
        },
        "attacks": results,
    }
