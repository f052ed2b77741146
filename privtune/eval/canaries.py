"""Canary auditing after training: exposure in bits against repetitions, and an empirical epsilon.

Exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019), adapted to diffusion as in
specs/defenses.md section 7: every candidate x is scored s(x) = -(1/K) sum_k ||eps_k - eps_theta(z_t, t, c_x)||^2
at a fixed t (100, Carlini et al. 2023) with noises eps_k shared by all candidates;
rank(x) = 1 + #{references with score >= s(x)}; exposure(x) = log2(R + 1) - log2 rank(x). A
never-inserted canary has a uniform rank, so its expected exposure is ~log2 e = 1.44 bits.

Empirical epsilon: (i) from the canaries' TPR / FPR at a score threshold, eps >= log((TPR - delta) / FPR)
(and the symmetric bound), with one-sided 95% Clopper-Pearson limits (Jagielski et al. 2020;
Nasr et al. 2021), maximised over thresholds; (ii) where the candidates were inserted independently
with probability 1/2 (`canaries.design=bernoulli`), the one-run audit of Steinke, Nasr & Jagielski
("Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv 2305.08846), pure-DP form: with
W correct of r confident guesses, eps-DP implies W is dominated by Binomial(r, e^eps / (1 + e^eps)).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ..io import atomic_path
from .encode import encode_records
from .primitives import seeded_noise, single_step_loss

PLOT = "canary_exposure.png"
LOG2E = math.log2(math.e)


def exposure(scores: np.ndarray, references: np.ndarray) -> np.ndarray:
    """log2(R + 1) - log2(1 + #{references scoring >= s}) for each score s."""
    ref = np.sort(np.asarray(references, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    rank = 1 + (len(ref) - np.searchsorted(ref, s, side="left"))
    return math.log2(len(ref) + 1) - np.log2(rank)


def reference_exposure(references: np.ndarray) -> np.ndarray:
    """Each reference's exposure among the other R - 1 (leave one out)."""
    ref = np.asarray(references, dtype=np.float64)
    return np.array([exposure(ref[i:i + 1], np.delete(ref, i))[0] for i in range(len(ref))])


@torch.no_grad()
def candidate_scores(predictor, alphas_cumprod, samples, timestep: int, draws: int, seed: int, batch_size: int = 32) -> np.ndarray:
    """-(mean over `draws` shared noises) of the summed squared epsilon error at `timestep`."""
    out = []
    for batch in samples.batches(batch_size):
        total = 0.0
        for k in range(draws):
            noise = seeded_noise(batch.latents.shape[1:], seed, f"canary/draw{k}", None, batch.latents.device, batch.latents.dtype)
            total = total + single_step_loss(predictor, batch.latents, int(timestep), noise.expand_as(batch.latents),
                                             batch.cond, alphas_cumprod)
        out.append(-(total / draws).cpu().numpy())
    return np.concatenate(out)


def _cp(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided (1 - alpha) Clopper-Pearson lower and upper limits of a binomial proportion."""
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def epsilon_from_rates(scores: np.ndarray, inserted: np.ndarray, delta: float = 0.0, alpha: float = 0.05) -> dict:
    """max over thresholds of log((TPR_lo - delta) / FPR_hi) and log((1 - FPR_hi - delta) / (1 - TPR_lo)), CP limits."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(inserted, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    best = {"epsilon_lb": 0.0, "threshold": None, "tpr": None, "fpr": None}
    if n_pos == 0 or n_neg == 0:
        return {**best, "delta": delta, "note": "needs inserted and never-inserted candidates"}
    for tau in np.unique(s):
        tp, fp = int((s[y] >= tau).sum()), int((s[~y] >= tau).sum())
        tpr_lo, _ = _cp(tp, n_pos, alpha)
        _, fpr_hi = _cp(fp, n_neg, alpha)
        cands = []
        if tpr_lo - delta > 0:
            cands.append(math.log((tpr_lo - delta) / fpr_hi))
        if 1 - fpr_hi - delta > 0 and tpr_lo < 1:
            cands.append(math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
        eps = max(cands, default=0.0)
        if eps > best["epsilon_lb"]:
            best = {"epsilon_lb": eps, "threshold": float(tau), "tpr": tp / n_pos, "fpr": fp / n_neg}
    return {**best, "confidence": 1 - alpha, "delta": delta,
            "method": "Clopper-Pearson TPR/FPR bound, maximised over thresholds (optimistic by the choice of threshold)"}


def steinke_epsilon(correct: int, guesses: int, beta: float = 0.05) -> float:
    """Largest eps such that P[Binomial(guesses, e^eps/(1+e^eps)) >= correct] <= beta (pure-DP one-run bound)."""
    if guesses == 0 or stats.binom.sf(correct - 1, guesses, 0.5) > beta:
        return 0.0
    lo, hi = 0.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        p = math.exp(mid) / (1 + math.exp(mid))
        if stats.binom.sf(correct - 1, guesses, p) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_audit(scores: np.ndarray, inserted: np.ndarray, beta: float = 0.05) -> dict:
    """Steinke et al.: guess 'in' for the k highest and 'out' for the k lowest scores; best k of a small grid."""
    order = np.argsort(-np.asarray(scores))
    y = np.asarray(inserted, dtype=bool)[order]
    m = len(y)
    best = {"epsilon_lb": 0.0, "guesses": 0, "correct": 0}
    for k in sorted({max(1, int(f * m / 2)) for f in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)}):
        correct = int(y[:k].sum() + (~y[m - k:]).sum())
        eps = steinke_epsilon(correct, 2 * k, beta)
        if eps > best["epsilon_lb"]:
            best = {"epsilon_lb": eps, "guesses": 2 * k, "correct": correct}
    return {**best, "confidence": 1 - beta, "method": "Steinke, Nasr & Jagielski 2023 one-run audit (pure-DP bound, delta = 0)"}


def audit(predictor, alphas_cumprod, components, canaries, node, *, resolution: int, seed: int, device,
          privacy: dict | None = None, batch_size: int = 32) -> dict:
    """Score every candidate and build the report's `canaries` section."""
    samples = encode_records(components, canaries.candidates, resolution, device)
    scores = candidate_scores(predictor, alphas_cumprod, samples, int(node.timestep), int(node.draws), seed, batch_size)
    repeats = np.asarray(canaries.repeats)
    is_ref = np.array([role == "reference" for role in canaries.roles]) if canaries.design == "references" else repeats == 0
    is_canary = ~is_ref if canaries.design == "references" else np.ones(len(repeats), bool)
    ref_scores = scores[is_ref]
    exp = exposure(scores, ref_scores)
    exp[is_ref] = reference_exposure(ref_scores)
    levels = []
    for r in sorted(set(repeats[is_canary].tolist())):
        v = exp[is_canary & (repeats == r)]
        se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
        levels.append({"repeats": int(r), "n": int(len(v)), "mean_exposure": float(v.mean()), "se": se,
                       "ci95": [float(v.mean() - 1.96 * se), float(v.mean() + 1.96 * se)] if se is not None else None})
    inserted = repeats > 0
    delta = float((privacy or {}).get("delta") or 0.0)
    section = {
        "design": canaries.design, "n_candidates": int(len(scores)), "n_references": int(is_ref.sum()),
        "timestep": int(node.timestep), "draws": int(node.draws),
        "max_exposure_bits": math.log2(int(is_ref.sum()) + 1), "expected_exposure_never_inserted_bits": LOG2E,
        "reference_mean_exposure_loo": float(exp[is_ref].mean()),
        "by_repetitions": levels,
        "empirical_epsilon": epsilon_from_rates(scores, inserted, delta),
        "per_candidate": [{"id": c.id, "role": role, "repeats": int(r), "score": float(s), "exposure": float(e)}
                          for c, role, r, s, e in zip(canaries.candidates, canaries.roles, repeats, scores, exp)],
    }
    if canaries.design == "bernoulli":
        section["one_run_audit"] = one_run_audit(scores, inserted)
    if privacy and privacy.get("epsilon") is not None:
        section["claimed_epsilon"] = privacy.get("epsilon")
    return section


def plot_exposure(section: dict, path: Path) -> Path:
    """Per-canary exposure against repetitions with per-level means, the log2 e line and the maximum."""
    from .report import _figure

    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot()
    rows = [c for c in section["per_candidate"] if c["role"] == "canary"]
    levels = section["by_repetitions"]
    xs = {lv["repeats"]: k for k, lv in enumerate(levels)}
    rng = np.random.default_rng(0)
    ax.scatter([xs[c["repeats"]] + rng.uniform(-0.15, 0.15) for c in rows if c["repeats"] in xs],
               [c["exposure"] for c in rows if c["repeats"] in xs], s=12, alpha=0.6, color="C0", label="canaries")
    means = [lv["mean_exposure"] for lv in levels]
    errs = [1.96 * (lv["se"] or 0.0) for lv in levels]
    ax.errorbar(range(len(levels)), means, yerr=errs, color="C3", marker="o", capsize=4, lw=1.5, label="mean (95% CI)")
    ax.axhline(LOG2E, ls="--", color="0.4", lw=1, label="never inserted: log2 e = 1.44")
    ax.axhline(section["max_exposure_bits"], ls=":", color="0.6", lw=1, label=f"max = log2(R+1) = {section['max_exposure_bits']:.2f}")
    ax.set_xticks(range(len(levels)), [str(lv["repeats"]) for lv in levels])
    ax.set_xlabel("repetitions in the training rows")
    ax.set_ylabel("exposure (bits)")
    eps = section["empirical_epsilon"]["epsilon_lb"]
    ax.set_title(f"Canary exposure ({section['n_references']} references); empirical eps >= {eps:.2f}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
