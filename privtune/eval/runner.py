"""Runs a set of MIAs on every released model under the calibration / report protocol of
specs/attacks.md §0.3: members and non-members are each split by a seeded permutation into a
calibration half (the only data any attack may fit a timestep, classifier, threshold or score
direction on) and a report half (the only data metrics are reported on). Overlaps by sample id
between members and non-members, or between the calibration and report sets, raise a DataError
before any model call.

An attacker gets every advantage the release allows (privtune's first promise): each attack's score
direction is fitted on the calibration half like its threshold (an over-fitted LoRA can invert a
statistic, e.g. members with *larger* SecMI t-error), every released model is attacked (DualMD ships
two adapters and their alternating sampler), and for several released files their per-sample best
combination is attacked too.
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .attacks import ATTACKS, Attack, AttackTarget, EncodedSamples, missing_requirements
from .attacks.base import CalibrationPart, member_labels
from .metrics import auc, calibrated_accuracy, evaluate_scores
from ..rng import numpy_rng


@dataclass
class CalibrationSplit:
    calibration_members: EncodedSamples
    calibration_nonmembers: EncodedSamples
    report_members: EncodedSamples
    report_nonmembers: EncodedSamples


def calibration_order(seed: int, role: int, n: int) -> np.ndarray:
    """The seeded order that cuts members (role 0) or non-members (role 1) into calibration and report parts."""
    return numpy_rng(seed, "calibration", role).permutation(n)


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
        perm = calibration_order(seed, role, n)
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


ALL = "all"


def select_attacks(names: Sequence[str], target: AttackTarget | None = None,
                   samples: EncodedSamples | None = None) -> tuple[list[str], dict[str, str]]:
    """The attacks to run and the ones skipped, with why. `all` (alone or among names) stands for every
    registered attack whose requirements the target and samples meet; a named attack whose requirements
    are not met is a ConfigError naming what is missing."""
    names = [str(n) for n in names]
    chosen, skipped = [], {}
    for name in names:
        if name == ALL:
            for other in ATTACKS.names():
                missing = missing_requirements(ATTACKS.get(other), target, samples)
                if missing:
                    skipped[other] = "; ".join(missing)
                elif other not in chosen:
                    chosen.append(other)
            continue
        missing = missing_requirements(ATTACKS.get(name), target, samples)
        if missing:
            raise ConfigError(f"attack {name!r} cannot run on this target: {'; '.join(missing)}. Drop it from eval.attacks "
                              f"(or use eval.attacks=[all], which runs every attack the target allows)")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ConfigError("no attack to run: " + ("; ".join(skipped.values()) or "eval.attacks is empty"))
    return chosen, {k: v for k, v in skipped.items() if k not in chosen}


@dataclass
class Release:
    """One model an attacker can query: a released file (a LoRA, one DualMD adapter) or a deployed sampler.

    `context` puts the shared UNet into this release's state (e.g. activates one adapter) while it is
    attacked; `deployed` marks the release utility and memorization are measured on.
    """

    name: str
    target: AttackTarget | None = None
    description: str = ""
    context: Callable[[], ContextManager] = field(default=nullcontext)
    deployed: bool = True


@dataclass
class ShadowData:
    """Shadow models the attacker trained on data of the same source, disjoint from the target's split, each with its
    own members and non-members: a learned attack is fitted once on their pooled features (`<attack>~shadow`) instead
    of the target's calibration half."""

    models: list[CalibrationPart]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("ShadowData needs at least one shadow model")

    @property
    def ids(self) -> set[str]:
        return {i for m in self.models for i in (*m.members.ids, *m.nonmembers.ids)}

    def sizes(self) -> dict[str, int]:
        return {"models": len(self.models), "members": sum(len(m.members) for m in self.models),
                "nonmembers": sum(len(m.nonmembers) for m in self.models)}


SHADOW_SUFFIX = "~shadow"


def orientation(cal_scores, cal_labels) -> dict[str, Any]:
    """The score direction an attacker fits on labelled calibration data: +1 keeps the spec's
    "higher = member", -1 flips it when members score lower there (a tie keeps the spec's)."""
    spec_auc = auc(cal_scores, cal_labels)
    sign = 1 if spec_auc >= 0.5 else -1
    return {"sign": sign, "calibration_auc_spec": spec_auc, "inverted": sign < 0}


def score_entry(cal_scores, cal_labels, rep_scores, rep_labels, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Orientation and threshold fitted on calibration scores, applied to the report split.

    `metrics` are the oriented metrics (what the report, the card and "best attack" use) and
    `metrics_spec` the same scores in the spec's fixed direction.
    """
    cal_scores, rep_scores = np.asarray(cal_scores, np.float64), np.asarray(rep_scores, np.float64)
    orient = orientation(cal_scores, cal_labels)
    sign = orient["sign"]
    return {
        "metrics": evaluate_scores(sign * rep_scores, rep_labels, n_resamples=n_bootstrap, seed=seed),
        "metrics_spec": evaluate_scores(rep_scores, rep_labels, n_resamples=n_bootstrap, seed=seed),
        "orientation": orient,
        "calibrated_threshold": {
            **calibrated_accuracy(sign * cal_scores, cal_labels, sign * rep_scores, rep_labels),
            "n_threshold_fit": int(len(cal_scores)),
        },
    }


def _samples_dict(ids, labels, scores, raw=None) -> dict[str, list]:
    out = {"ids": [str(i) for i in ids], "labels": [int(v) for v in labels], "scores": [float(v) for v in scores]}
    if raw is not None:
        out["raw"] = [float(v) for v in raw]
    return out


def entry_name(attack: str, release: str, single: bool) -> str:
    """`loss` for a run with one released model; `loss@adapter_a` when several are attacked."""
    return attack if single else f"{attack}@{release}"


def combination_name(parts: Sequence[str]) -> str:
    return f"best({','.join(parts)})"


def _attack_release(name: str, attack: Attack, release: Release, split: CalibrationSplit, cal_ids: set,
                    report: EncodedSamples, report_labels: np.ndarray, batch_size: int, n_bootstrap: int,
                    seed: int, progress: bool, shadow: ShadowData | None = None) -> dict[str, Any]:
    """One attack on one release. With `shadow`, the attack's learned parts are fitted on the shadow model and its
    data only; the target's calibration split then fits just the direction and threshold, as for every attack."""
    start = time.perf_counter()
    target = release.target
    cal_samples = EncodedSamples.concat([split.calibration_members, split.calibration_nonmembers])
    cal_labels = member_labels(len(split.calibration_members), len(split.calibration_nonmembers))
    cal = None
    if shadow is not None:
        attack.calibrate_pooled(shadow.models, batch_size=batch_size, progress=progress)
        if not set(getattr(attack, "fit_ids", [])) <= shadow.ids:
            raise DataError(f"attack {name!r} fitted on samples outside the shadow model's data")
    with release.context():
        if shadow is None:
            cal = attack.calibrate(target, split.calibration_members, split.calibration_nonmembers,
                                   batch_size=batch_size, progress=progress)
        if cal is None:
            cal = attack.score(target, cal_samples, batch_size=batch_size, progress=progress)
            cal.labels = cal_labels
        fitted = set(cal.ids) | (set() if shadow is not None else set(getattr(attack, "fit_ids", [])))
        if not fitted <= cal_ids:
            raise DataError(f"attack {name!r} fitted on samples outside the calibration split")
        rep = attack.score(target, report, batch_size=batch_size, progress=progress)
    entry = score_entry(cal.scores, cal.labels, rep.scores, report_labels, n_bootstrap, seed)
    sign = entry["orientation"]["sign"]
    entry["orientation"]["note"] = inversion_note(attack) if sign < 0 else ""
    params = attack.params()
    if shadow is not None:
        params["fitted_on"] = f"shadow model{': ' + shadow.description if shadow.description else ''}"
        params["n_shadow"] = shadow.sizes()
    return {
        "attack": name + (SHADOW_SUFFIX if shadow is not None else ""), "release": release.name, "params": params,
        "nfe_per_sample": rep.nfe_per_sample, "calibration_nfe_per_sample": cal.nfe_per_sample, **entry,
        "samples": _samples_dict(rep.ids, report_labels, sign * np.asarray(rep.scores), rep.raw),
        "calibration_samples": _samples_dict(cal.ids, cal.labels, cal.scores),
        "seconds": time.perf_counter() - start,
    }


def inversion_note(attack: Attack) -> str:
    """Why the fitted direction differs from the spec's, in the attack's own statistic."""
    statistic = getattr(attack, "statistic", "")
    if not statistic:
        return "inverted on this model: members score lower than non-members in the spec's direction; the fitted direction flips it"
    more = "larger" if getattr(attack, "members_lower", False) else "smaller"
    return f"inverted on this model: members have {more} {statistic} than non-members; the fitted direction flips it"


def _aligned(entry: Mapping[str, Any], key: str, ids: Sequence[str]) -> np.ndarray:
    """An entry's oriented `key` scores ("samples" or "calibration_samples") in the order of `ids`."""
    part = entry[key]
    sign = 1.0 if key == "samples" else float(entry["orientation"]["sign"])
    by_id = dict(zip(part["ids"], part["scores"]))
    return sign * np.asarray([by_id[i] for i in ids], dtype=np.float64)


def combine_best(entries: Sequence[Mapping[str, Any]], n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The attacker holding several released files: per sample, the most member-like of the releases'
    oriented scores (for the loss attack: the smaller of the adapters' losses); the combination's own
    direction and threshold are fitted on calibration again."""
    cal_ids = [i for i in entries[0]["calibration_samples"]["ids"]
               if all(i in set(e["calibration_samples"]["ids"]) for e in entries[1:])]
    labels_by_id = dict(zip(entries[0]["calibration_samples"]["ids"], entries[0]["calibration_samples"]["labels"]))
    cal_labels = np.asarray([labels_by_id[i] for i in cal_ids])
    cal = np.max([_aligned(e, "calibration_samples", cal_ids) for e in entries], axis=0)
    rep_ids = entries[0]["samples"]["ids"]
    rep_labels = np.asarray(entries[0]["samples"]["labels"])
    rep = np.max([_aligned(e, "samples", rep_ids) for e in entries], axis=0)
    entry = score_entry(cal, cal_labels, rep, rep_labels, n_bootstrap, seed)
    sign = entry["orientation"]["sign"]
    entry["orientation"]["note"] = "" if sign > 0 else "inverted: the best-of combination points away from members on calibration"
    parts = [e["release"] for e in entries]
    return {
        "attack": entries[0]["attack"], "release": combination_name(parts), "combines": parts,
        "params": {"rule": "per-sample max of the releases' oriented scores", "releases": ",".join(parts)},
        "nfe_per_sample": sum(e["nfe_per_sample"] for e in entries),
        "calibration_nfe_per_sample": sum(e["calibration_nfe_per_sample"] for e in entries), **entry,
        "samples": _samples_dict(rep_ids, rep_labels, sign * rep),
        "calibration_samples": _samples_dict(cal_ids, cal_labels, cal),
        "seconds": sum(e["seconds"] for e in entries),
    }


def run_release_attacks(
    releases: Sequence[Release],
    members: EncodedSamples,
    nonmembers: EncodedSamples,
    attack_names: Sequence[str],
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    combinations: Sequence[Sequence[str]] = (),
    calibration_fraction: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    n_bootstrap: int = 1000,
    progress: bool = True,
    split: CalibrationSplit | None = None,
    threat_model: str | None = None,
    shadow: ShadowData | None = None,
) -> dict[str, Any]:
    """Every attack on every release (a fresh attack object each, calibrated on that release), plus
    the per-sample best of each release combination in `combinations`; returns a JSON-able dict.

    {"protocol": {score_orientation, calibration_fraction, seed, batch_size, n_calibration, n_report,
                  releases, combinations, threat_model},
     "attacks": {entry name: {"attack", "release", "params", "nfe_per_sample", "calibration_nfe_per_sample",
                 "metrics" (oriented, on the report split), "metrics_spec" (the spec's direction),
                 "orientation" {sign, calibration_auc_spec, inverted, note}, "calibrated_threshold",
                 "samples" (report split, oriented scores + raw), "calibration_samples", "seconds"}}}
    Entry names are the attack names for one release, `attack@release` for several.
    """
    releases = list(releases)
    if not releases:
        raise ConfigError("no released model to attack")
    names = [r.name for r in releases]
    if len(set(names)) != len(names):
        raise ConfigError(f"release names must be unique, got {names}")
    for combo in combinations:
        unknown = [c for c in combo if c not in names]
        if unknown or len(combo) < 2:
            raise ConfigError(f"release combination {list(combo)} must name two or more of {names}")
    attack_params = dict(attack_params or {})
    for name in attack_params:
        ATTACKS.get(name)
    attack_names, skipped = select_attacks(attack_names, releases[0].target, members)
    for name in attack_names:
        build_attack(name, attack_params.get(name), seed)
    if split is None:
        for what, s in (("members", members), ("non-members", nonmembers)):
            _unique_ids(s, what)
        split = split_calibration(members, nonmembers, calibration_fraction, seed)
    check_disjoint(split)
    cal_ids = set(split.calibration_members.ids) | set(split.calibration_nonmembers.ids)
    if shadow is not None:
        shared = shadow.ids & (
            cal_ids | set(split.report_members.ids) | set(split.report_nonmembers.ids))
        if shared:
            raise DataError(f"{len(shared)} shadow-model samples are also target samples, e.g. {sorted(shared)[:3]}; a shadow "
                            "model must be trained and fitted on data disjoint from the target's split")
    report = EncodedSamples.concat([split.report_members, split.report_nonmembers])
    report_labels = member_labels(len(split.report_members), len(split.report_nonmembers))
    single = len(releases) == 1 and not combinations

    results: dict[str, Any] = {}
    by_release: dict[str, dict[str, dict]] = {r.name: {} for r in releases}
    for release in releases:
        if getattr(release.target, "generation", None) is not None:
            release.target.generation.clear_cache()  # one API may front another model in this release's context
        for name in attack_names:
            attack = build_attack(name, attack_params.get(name), seed)
            entry = _attack_release(name, attack, release, split, cal_ids, report, report_labels,
                                    batch_size, n_bootstrap, seed, progress)
            by_release[release.name][name] = entry
            results[entry_name(name, release.name, single)] = entry
            if shadow is not None and ATTACKS.get(name).learned:
                fresh = build_attack(name, attack_params.get(name), seed)
                entry = _attack_release(name, fresh, release, split, cal_ids, report, report_labels,
                                        batch_size, n_bootstrap, seed, progress, shadow=shadow)
                results[entry_name(name + SHADOW_SUFFIX, release.name, single)] = entry
    for combo in combinations:
        for name in attack_names:
            entry = combine_best([by_release[r][name] for r in combo], n_bootstrap, seed)
            results[entry_name(name, entry["release"], False)] = entry
    return {
        "protocol": {
            "score_orientation": "higher score = more likely member, in the direction fitted on the calibration half "
                                 "(metrics_spec keeps the spec's fixed direction)",
            "calibration_fraction": calibration_fraction,
            "seed": seed,
            "batch_size": batch_size,
            "n_calibration": {"members": len(split.calibration_members), "nonmembers": len(split.calibration_nonmembers)},
            "n_report": {"members": len(split.report_members), "nonmembers": len(split.report_nonmembers)},
            "releases": {r.name: r.description for r in releases},
            "combinations": [combination_name(c) for c in combinations],
            "threat_model": threat_model,
            "attacks_skipped": skipped,
            "shadow": None if shadow is None else {
                "description": shadow.description, **shadow.sizes(),
                "fits": "the learned parts of the <attack>~shadow entries, once on the shadows' pooled features; their "
                        "direction and threshold still come from the target's calibration half"},
        },
        "attacks": results,
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
    shadow: ShadowData | None = None,
) -> dict[str, Any]:
    """`run_release_attacks` on one target (entries named by attack)."""
    return run_release_attacks([Release("model", target)], members, nonmembers, attack_names, attack_params,
                               calibration_fraction=calibration_fraction, seed=seed, batch_size=batch_size,
                               n_bootstrap=n_bootstrap, progress=progress, split=split, shadow=shadow)
