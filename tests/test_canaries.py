"""Canary auditing: exposure, its never-inserted baseline, its rise with repetitions, epsilon bounds, errors."""

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from privtune.data.canaries import make_canaries
from privtune.eval.canaries import (LOG2E, audit, epsilon_from_rates, exposure, one_run_audit, reference_exposure,
                                    steinke_epsilon)
from privtune.errors import ConfigError

from .conftest import prepare_trainer, train_args


def node(**kw):
    base = dict(enabled=True, count=16, repetitions=[0, 1, 4, 16], references=200, design="references", timestep=100, draws=8)
    return OmegaConf.create({**base, **kw})


def test_exposure_definition():
    ref = np.arange(10.0)
    assert exposure(np.array([100.0]), ref)[0] == pytest.approx(math.log2(11))  # beats every reference: maximum
    assert exposure(np.array([-1.0]), ref)[0] == pytest.approx(0.0)           # beaten by all: rank R + 1
    assert exposure(np.array([4.5]), ref)[0] == pytest.approx(math.log2(11) - math.log2(6))
    r = 500
    loo = reference_exposure(np.random.default_rng(0).normal(size=r))
    assert loo.mean() == pytest.approx(math.log2(r) - math.lgamma(r + 1) / math.log(2) / r)


def test_never_inserted_exposure_is_log2e_by_monte_carlo():
    rng = np.random.default_rng(1)
    draws = [exposure(rng.normal(size=1), rng.normal(size=500))[0] for _ in range(4000)]  # fresh references per trial
    assert np.mean(draws) == pytest.approx(LOG2E, abs=0.06)


def test_candidates_seeded_unique_and_errors():
    a, b = make_canaries(node(), 0, 32), make_canaries(node(), 0, 32)
    assert [c.id for c in a.candidates] == [c.id for c in b.candidates] and a.repeats == b.repeats
    assert len({c.caption for c in a.candidates}) == 216
    assert sorted(r for r, role in zip(a.repeats, a.roles) if role == "canary") == sorted([0, 1, 4, 16] * 4)
    assert all(r == 0 for r, role in zip(a.repeats, a.roles) if role == "reference")
    assert len(a.rows()) == 4 * (1 + 4 + 16)
    assert make_canaries(node(enabled=False), 0, 32) is None
    with pytest.raises(ConfigError, match="exceeds canaries.references"):
        make_canaries(node(count=50, references=20), 0, 32)
    with pytest.raises(ConfigError, match="repetitions"):
        make_canaries(node(repetitions=[-1]), 0, 32)


def test_epsilon_bounds():
    # all of r confident guesses right: (e^eps / (1 + e^eps))^r = beta
    p = 0.05 ** (1 / 100)
    assert steinke_epsilon(100, 100) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    assert steinke_epsilon(50, 100) == 0.0
    rng = np.random.default_rng(0)
    inserted = rng.random(400) < 0.5
    same = epsilon_from_rates(rng.normal(size=400), inserted)
    separated = epsilon_from_rates(np.where(inserted, 10.0, 0.0) + rng.normal(size=400), inserted)
    assert same["epsilon_lb"] < 0.5 < separated["epsilon_lb"]
    assert one_run_audit(np.where(inserted, 10.0, 0.0), inserted)["epsilon_lb"] > 3.0
    assert one_run_audit(rng.normal(size=400), inserted)["epsilon_lb"] < 0.5


def _trainer(run_dir, *extra, steps=1):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    return prepare_trainer(get_trainer("lora")(load_config("lora", train_args(run_dir, *extra, steps=steps)[1:])))


def _audit(trainer, privacy=None):
    from privtune.eval.primitives import UNetPredictor

    unet = trainer.accelerator.unwrap_model(trainer.components.unet)
    unet.eval()
    alphas = trainer.components.noise_scheduler.alphas_cumprod.to(float)
    return audit(UNetPredictor(unet), alphas, trainer.components, trainer.data_stage.canaries, trainer.cfg.canaries,
                 resolution=32, seed=0, device="cpu", privacy=privacy, batch_size=64)


def test_never_inserted_canaries_score_near_log2e_on_a_real_model(tmp_path, base_model):
    """i.i.d. candidates scored by the model: the never-inserted ones sit at ~1.44 bits (within the CI)."""
    t = _trainer(tmp_path / "run", f"model.base={base_model}", "canaries.enabled=true", "canaries.count=100",
                 "canaries.references=100", "canaries.repetitions=[0]", "canaries.draws=1")
    assert len(t.train_records) == 8  # nothing inserted
    section = _audit(t, privacy={"epsilon": 8.0, "delta": 1e-5})
    level = section["by_repetitions"][0]
    assert level["repeats"] == 0 and level["n"] == 100
    assert level["ci95"][0] - 0.1 <= LOG2E <= level["ci95"][1] + 0.1
    assert abs(level["mean_exposure"] - LOG2E) < 0.5
    assert section["claimed_epsilon"] == 8.0 and section["empirical_epsilon"]["delta"] == 1e-5


@pytest.mark.slow
def test_exposure_rises_with_repetitions_on_overfit_model(tmp_path, base_model):
    t = _trainer(tmp_path / "run", f"model.base={base_model}", "canaries.enabled=true", "canaries.count=12",
                 "canaries.references=48", "canaries.repetitions=[0,2,12]", "canaries.draws=4",
                 "data.members=4", "train.batch_size=8", "lora.rank=8", "lora.alpha=8", "optim.lr=3e-3", steps=80)
    assert len(t.train_records) == 4 + 4 * (2 + 12)
    t.train()
    section = _audit(t)
    means = {lv["repeats"]: lv["mean_exposure"] for lv in section["by_repetitions"]}
    print("mean exposure by repetitions", means)
    assert means[0] < means[2] < means[12]
    assert means[12] > 3.0
