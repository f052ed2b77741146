"""The attacker's advantages: score direction fitted on calibration, every released model attacked,
and the per-sample best of several released files; the card reports the strongest of them."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

from privtune.eval.attacks import AttackTarget
from privtune.eval.card import render_card
from privtune.eval.report import build_report, render_markdown
from privtune.eval.runner import Release, run_attacks, run_release_attacks, score_entry
from privtune.models.alternation import ddim_timesteps, step_index

from .oracles import GaussianOracle, MemorizingOracle

FAST = {"loss": {"timesteps": [100, 200], "draws": 1}, "pia": {"timesteps": [100, 200]}}


def test_perfectly_reversed_score_is_oriented_and_flagged(alphas_cumprod, members, nonmembers):
    """A model that fits its *non-members*: every spec score points the wrong way (AUC ~0); an attacker
    who fits the direction on calibration separates perfectly, and the report says it flipped."""
    target = AttackTarget(MemorizingOracle(nonmembers.latents, alphas_cumprod), alphas_cumprod)
    out = run_attacks(target, members, nonmembers, ["loss", "pia"], FAST, batch_size=16, n_bootstrap=50, progress=False)
    for name, res in out["attacks"].items():
        assert res["metrics_spec"]["auc"]["value"] <= 0.05, name
        assert res["metrics"]["auc"]["value"] == pytest.approx(1.0), name
        assert res["orientation"]["inverted"] and res["orientation"]["sign"] == -1
        assert "members have larger" in res["orientation"]["note"]
        assert res["calibrated_threshold"]["balanced_accuracy"] >= 0.95
    report = build_report(config={"trainer": "lora"}, attacks_result=out, utility=None, privacy=None, split_sizes={},
                          command="python -m privtune.train recipe=lora", defense={"trainer": "lora"}, baseline=None)
    assert report["summary"]["best_attack"]["auc"]["value"] == pytest.approx(1.0)
    assert report["summary"]["best_attack"]["inverted"]
    md = render_markdown(report)
    assert "loss (inverted)" in md and "members have larger denoising loss" in md


def test_spec_direction_is_kept_when_it_is_right(alphas_cumprod, members, nonmembers):
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    out = run_attacks(target, members, nonmembers, ["loss"], FAST, batch_size=16, n_bootstrap=20, progress=False)
    res = out["attacks"]["loss"]
    assert res["orientation"]["sign"] == 1 and not res["orientation"]["inverted"]
    assert res["metrics"]["auc"]["value"] == res["metrics_spec"]["auc"]["value"] >= 0.95


def test_null_target_has_no_optimistic_bias_over_many_seeds():
    """Members and non-members from one distribution: the direction is fitted on calibration only, so
    the report-half AUC stays centred on 0.5; choosing it on the report half would not."""
    fitted, on_report = [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        cal, rep = rng.normal(size=64), rng.normal(size=64)
        labels = np.r_[np.ones(32), np.zeros(32)].astype(int)
        value = score_entry(cal, labels, rep, labels, n_bootstrap=0)["metrics"]["auc"]["value"]
        fitted.append(value)
        raw = score_entry(rep, labels, rep, labels, n_bootstrap=0)["metrics"]["auc"]["value"]  # direction fitted on the report half
        on_report.append(raw)
    fitted, on_report = np.asarray(fitted), np.asarray(on_report)
    assert abs(fitted.mean() - 0.5) < 0.01
    assert np.mean(np.abs(fitted - 0.5) <= 0.1) >= 0.8
    assert on_report.mean() > 0.54 and (on_report >= 0.5).all()  # the bias the protocol avoids


def test_null_oracle_stays_near_chance(alphas_cumprod):
    from .conftest import make_samples

    m, n = make_samples(64, "m", 11), make_samples(64, "n", 12)
    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    out = run_attacks(target, m, n, ["loss", "pia"], FAST, batch_size=32, n_bootstrap=20, progress=False)
    for name, res in out["attacks"].items():
        assert abs(res["metrics"]["auc"]["value"] - 0.5) <= 0.15, name


class TwoAdapterModel:
    """A DualMD stand-in: adapter A memorizes nothing, adapter B memorizes every member; `mode` is
    "A", "B" or "alternating" (A on even DDIM steps, B on odd, chosen from the timestep)."""

    def __init__(self, members, alphas_cumprod, steps=5):
        self.adapters = {"A": GaussianOracle(0.0, 1.0, alphas_cumprod), "B": MemorizingOracle(members.latents, alphas_cumprod)}
        from diffusers import DDPMScheduler

        self.schedule = ddim_timesteps(DDPMScheduler(num_train_timesteps=len(alphas_cumprod)).config, steps)
        self.mode = "alternating"

    def __call__(self, x, t, cond):
        name = self.mode
        if name == "alternating":
            name = "AB"[int(step_index(self.schedule, t.reshape(-1)[:1])[0]) % 2]
        return self.adapters[name](x, t, cond)

    @contextmanager
    def using(self, mode):
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous


def test_only_adapter_b_memorizes_and_the_card_catches_it(alphas_cumprod, members, nonmembers):
    model = TwoAdapterModel(members, alphas_cumprod)
    target = AttackTarget(model, alphas_cumprod)
    releases = [Release("alternating", target, "deployed sampler", lambda: model.using("alternating"), True),
                Release("adapter_a", target, "adapter A alone", lambda: model.using("A"), False),
                Release("adapter_b", target, "adapter B alone", lambda: model.using("B"), False)]
    # The 5-step schedule is 800, 600, 400, 200, 0: t = 300 belongs to step 2, an A step, so attacking
    # the deployed sampler alone at t = 300 sees only the adapter that memorized nothing.
    params = {"loss": {"timesteps": [300], "draws": 1}, "pia": {"timesteps": [300]}}
    out = run_release_attacks(releases, members, nonmembers, ["loss", "pia"], params,
                              combinations=[("adapter_a", "adapter_b")], batch_size=16, n_bootstrap=20, progress=False,
                              threat_model="white-box over the released files (adapter_a, adapter_b)")
    attacks = out["attacks"]
    expected = {f"{a}@{r}" for a in ("loss", "pia") for r in ("alternating", "adapter_a", "adapter_b", "best(adapter_a,adapter_b)")}
    assert set(attacks) == expected
    auc = {k: v["metrics"]["auc"]["value"] for k, v in attacks.items()}
    assert auc["loss@adapter_b"] >= 0.95 and auc["loss@best(adapter_a,adapter_b)"] >= 0.95
    assert max(auc["loss@adapter_a"], auc["loss@alternating"]) <= 0.8  # chance, within 16 + 16 samples' noise
    assert model.mode == "alternating"  # every context restored the model
    report = build_report(config={"trainer": "dualmd"}, attacks_result=out, utility=None, privacy=None,
                          split_sizes={"members": 32, "nonmembers": 32}, command="python -m privtune.train recipe=dualmd",
                          defense={"trainer": "dualmd"}, baseline=None)
    best = report["summary"]["best_attack"]
    assert best["auc"]["value"] == max(auc.values()) >= 0.95
    assert best["release"] in ("adapter_b", "best(adapter_a,adapter_b)")
    card = render_card(report, base_model="privtune/tiny-sd (embedded)", license="other", repro_command="x")
    assert "Threat model: white-box over the released files" in card
    assert f"Strongest attack: **{best['name']}**" in card


def test_combination_is_the_per_sample_best(alphas_cumprod, members, nonmembers):
    """best(A, B) scores each sample by the more member-like of the two releases' oriented scores."""
    model = TwoAdapterModel(members, alphas_cumprod)
    target = AttackTarget(model, alphas_cumprod)
    releases = [Release("adapter_a", target, context=lambda: model.using("A")),
                Release("adapter_b", target, context=lambda: model.using("B"), deployed=False)]
    out = run_release_attacks(releases, members, nonmembers, ["loss"], FAST, combinations=[("adapter_a", "adapter_b")],
                              batch_size=16, n_bootstrap=0, progress=False)
    a, b = out["attacks"]["loss@adapter_a"]["samples"], out["attacks"]["loss@adapter_b"]["samples"]
    best = out["attacks"]["loss@best(adapter_a,adapter_b)"]
    assert best["orientation"]["sign"] == 1
    np.testing.assert_allclose(best["samples"]["scores"], np.maximum(a["scores"], b["scores"]))
    assert best["nfe_per_sample"] == 2


def test_bad_release_settings(alphas_cumprod, members, nonmembers):
    from privtune.errors import ConfigError

    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    with pytest.raises(ConfigError, match="unique"):
        run_release_attacks([Release("x", target), Release("x", target)], members, nonmembers, ["loss"], progress=False)
    with pytest.raises(ConfigError, match="combination"):
        run_release_attacks([Release("x", target)], members, nonmembers, ["loss"], combinations=[("x", "y")], progress=False)
