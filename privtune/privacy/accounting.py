"""Privacy budgets for DP-SGD through the Opacus accountants.

RDP: Mironov, "Renyi Differential Privacy", CSF 2017, and Mironov, Talwar & Zhang, "Renyi Differential
Privacy of the Sampled Gaussian Mechanism", 2019. PRV: Gopi, Lee & Wutschitz, "Numerical Composition of
Differential Privacy", NeurIPS 2021. GDP: Dong, Roth & Su, "Gaussian Differential Privacy", JRSS-B 2022.
All three assume Poisson subsampling at rate q.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..errors import ConfigError

ACCOUNTANTS = ("rdp", "prv", "gdp")
MAX_NOISE_MULTIPLIER = 100.0


def make_accountant(name: str, history=()):
    """An Opacus accountant (rdp | prv | gdp), optionally with a history of (sigma, q, steps)."""
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ConfigError(f"dp.accountant must be one of {', '.join(ACCOUNTANTS)} (got {name!r})")
    accountant = create_accountant(mechanism=name)
    accountant.history = [tuple(h) for h in history]
    return accountant


def epsilon_spent(accountant, delta: float) -> float:
    """Epsilon of the accountant's history at `delta`; 0 before the first step, inf once a step had no noise.

    The RDP conversion can dip below 0 when the optimal order is the largest one; epsilon is at least 0.
    """
    if not accountant.history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in accountant.history):
        return math.inf
    history = tuple(tuple(float(x) for x in step) for step in accountant.history)
    return _epsilon(accountant.mechanism(), history, float(delta))


# Opacus's RDP conversion is pure Python over ~150 orders (about 0.7 s per call at q = 0.5, and a sigma
# calibration makes ~18 calls); the same budget recurs within a process (resume, re-evaluation, the
# per-step progress line), so both are memoised on their exact inputs.
@functools.lru_cache(maxsize=512)
def _epsilon(mechanism: str, history: tuple, delta: float) -> float:
    return max(0.0, float(make_accountant(mechanism, history).get_epsilon(delta=delta)))


@functools.lru_cache(maxsize=128)
def _calibrated_sigma(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                      accountant=accountant))


@dataclass
class Budget:
    """The resolved budget of one run."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    target_epsilon: float | None
    planned_steps: int
    accountant: str


def plan_budget(dp, num_examples: int, expected_batch: int, steps: int) -> Budget:
    """Check the `dp` section against the data size and calibrate sigma; ConfigError on a bad budget."""
    if dp.accountant not in ACCOUNTANTS:
        raise ConfigError(f"dp.accountant must be one of {', '.join(ACCOUNTANTS)} (got {dp.accountant!r})")
    if num_examples < 1:
        raise ConfigError("dpsgd needs at least one training example")
    if expected_batch > num_examples:
        raise ConfigError(f"the expected batch ({expected_batch} = train.batch_size x gradient_accumulation_steps) exceeds "
                          f"the {num_examples} training examples; lower train.batch_size")
    q = expected_batch / num_examples
    delta = 1.0 / (10 * num_examples) if dp.delta is None else float(dp.delta)
    if not 0 < delta < 1:
        raise ConfigError(f"dp.delta must be in (0, 1) (got {delta})")
    if delta >= 1.0 / num_examples:
        raise ConfigError(f"dp.delta={delta:g} is not below 1/N = {1.0 / num_examples:g} for N={num_examples} training "
                          f"examples: such a delta allows publishing an example outright; use dp.delta=null (1/(10N)) or smaller")
    target = None if dp.target_epsilon is None else float(dp.target_epsilon)
    if target is not None and not (target > 0 and math.isfinite(target)):
        raise ConfigError(f"dp.target_epsilon must be a positive finite number (got {dp.target_epsilon})")
    if not (float(dp.max_grad_norm) > 0):
        raise ConfigError(f"dp.max_grad_norm must be > 0 (got {dp.max_grad_norm}); .inf disables clipping")
    if math.isinf(float(dp.max_grad_norm)) and (dp.noise_multiplier is None or float(dp.noise_multiplier) != 0):
        raise ConfigError("dp.max_grad_norm=inf (no clipping) has unbounded sensitivity: it only works with "
                          "dp.noise_multiplier=0 and dp.target_epsilon=null, i.e. non-private training")
    if dp.noise_multiplier is not None:
        sigma = float(dp.noise_multiplier)
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ConfigError(f"dp.noise_multiplier must be a finite number >= 0 (got {dp.noise_multiplier})")
        if target is not None:
            first = epsilon_spent(make_accountant(dp.accountant, [(sigma, q, 1)]), delta)
            if first > target:
                raise ConfigError(f"dp.noise_multiplier={sigma:g} spends epsilon={first:.3g} in its first step, over "
                                  f"dp.target_epsilon={target:g}; raise the noise multiplier or the target")
    elif target is None:
        raise ConfigError("set dp.target_epsilon (sigma is calibrated) or dp.noise_multiplier (epsilon is only reported)")
    else:
        if epsilon_spent(make_accountant(dp.accountant, [(MAX_NOISE_MULTIPLIER, q, steps)]), delta) > target:
            raise ConfigError(f"dp.target_epsilon={target:g} at delta={delta:g} over {steps} steps at sample rate {q:.3g} "
                              f"needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}; nothing useful would be learned. "
                              f"Raise the target, or lower train.max_steps or the batch size")
        sigma = _calibrated_sigma(target, delta, q, int(steps), dp.accountant)
    return Budget(sigma, q, delta, target, steps, dp.accountant)


HEAVY_NOISE = 20.0  # sigma at which the Gaussian noise is 20x the clipping norm per step


def budget_warnings(budget: Budget) -> list[str]:
    """Plain words for a budget that trains but learns next to nothing (said before training, not found after)."""
    sigma = budget.noise_multiplier
    if budget.target_epsilon is None or sigma < HEAVY_NOISE:
        return []
    return [f"dp.target_epsilon={budget.target_epsilon:g} needs noise multiplier {sigma:.3g}: each step's noise is "
            f"{sigma:.3g}x the clipping norm, so the LoRA will learn next to nothing, and epsilon may be reported as 0 "
            f"(below the accountant's precision). Raise dp.target_epsilon, train longer on more rows, or use a larger "
            f"expected batch"]

