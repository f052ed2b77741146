"""Every registered attack against the closed-form oracles of specs/attacks.md §0.4, from one parameter table:
a new attack must add a row here (or say why the oracles do not apply to it) or this file fails.

The harness gives every attack what it may require around the oracle: captions and a text encoder, pixels and a
decoder, and a parametric network for gradient attacks (tests/eval/oracles.py).
"""

import pytest
import torch

from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples, missing_requirements
from privtune.eval.attacks.base import member_labels
from privtune.eval.metrics import auc

from . import oracles
from .oracles import (GaussianOracle, MemorizingOracle, OracleUNet, TextEncoder, image_samples, pooled_embed,
                      upsample_decode)

# fast settings, and the UNet evaluations per scored sample the spec gives for them
ORACLE_TABLE = {
    "loss": ({"timesteps": [100], "draws": 2}, 2),
    "secmi": ({"t_sec": 60, "k": 20}, 4),
    "secmi_nn": ({"t_sec": 60, "k": 20, "epochs": 15}, 4),
    "pia": ({"timesteps": [200]}, 2),
    "pian": ({"timesteps": [200]}, 2),
    "quantile": ({"t_sec": 60, "k": 20, "n_models": 3}, 4),
    "clid_th": ({}, 15),
    "clid_vec": ({}, 15),
    "gsa1": ({"n_timesteps": 5}, 5),
    "gsa2": ({"n_timesteps": 5}, 5),
    "structural": ({"timesteps": [40]}, 2),
}
NOT_ORACLE = {
    name: "prompt-level memorization detector: it scores a caption's generations, not the sample's image, so the "
          "image oracles do not apply (tests/test_memorization_detection.py trains caption-memorizing models instead)"
    for name in ("wen", "wen_trajectory", "ren", "ren_trajectory")
}
# black-box attacks: fast settings and UNet passes per query with PASSES_PER_IMAGE per generated image
PASSES_PER_IMAGE = 50
BLACKBOX_TABLE = {
    "rediffuse": ({"t": 50, "stride": 10, "n": 4}, 4 * 5),
    "miagm": ({"per_prompt": 8}, 0),
    "wu": ({}, 3 * PASSES_PER_IMAGE),
    "pang_wang": ({}, 3 * PASSES_PER_IMAGE),
}


def test_every_registered_attack_is_in_the_table():
    tables = set(ORACLE_TABLE) | set(NOT_ORACLE) | set(BLACKBOX_TABLE)
    assert set(ATTACKS.names()) == tables, "add the new attack to ORACLE_TABLE or BLACKBOX_TABLE"
    assert len(tables) == len(ORACLE_TABLE) + len(NOT_ORACLE) + len(BLACKBOX_TABLE)


def dataset(n, prefix, seed, encode):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    captions = [f"{prefix} sample {i}, a portrait" for i in range(n)]
    return EncodedSamples(latents, encode(captions), [f"{prefix}{i}" for i in range(n)], captions=captions,
                          pixels=upsample_decode(latents))


def full_target(predictor, alphas_cumprod, encode):
    return AttackTarget(predictor, alphas_cumprod, encode_text=encode, decode=upsample_decode,
                        unet=OracleUNet(predictor).eval().requires_grad_(False))


def calibrated_auc(name, target, members, nonmembers, half):
    attack = ATTACKS.get(name)(**ORACLE_TABLE[name][0])
    attack.calibrate(target, members.subset(range(half)), nonmembers.subset(range(half)), batch_size=16, progress=False)
    report = EncodedSamples.concat([members.subset(range(half, 2 * half)), nonmembers.subset(range(half, 2 * half))])
    res = attack.score(target, report, batch_size=16, progress=False)
    return res, member_labels(half, half)


@pytest.mark.parametrize("name", sorted(ORACLE_TABLE))
def test_memorizing_oracle_is_detected_and_role_swap_inverts(name, alphas_cumprod):
    encode = TextEncoder()
    members, nonmembers = dataset(32, "m", 1, encode), dataset(32, "n", 2, encode)
    oracle = MemorizingOracle(members.latents, alphas_cumprod, conds=members.cond)  # conditional: CLiD has a signal
    target = full_target(oracle, alphas_cumprod, encode)
    assert missing_requirements(ATTACKS.get(name), target, members) == []
    res, y = calibrated_auc(name, target, members, nonmembers, 16)
    value = auc(res.scores, y)
    assert value >= 0.9, f"{name}: AUC {value:.3f} on a model that memorized its members"
    assert auc(res.scores, 1 - y) == pytest.approx(1 - value)
    assert res.nfe_per_sample == ORACLE_TABLE[name][1], f"{name}: NFE per sample"


@pytest.mark.parametrize("name", sorted(ORACLE_TABLE))
def test_generalizing_oracle_is_chance(name, alphas_cumprod):
    encode = TextEncoder()
    members, nonmembers = dataset(64, "a", 11, encode), dataset(64, "b", 12, encode)
    target = full_target(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod, encode)
    res, y = calibrated_auc(name, target, members, nonmembers, 32)
    assert abs(auc(res.scores, y) - 0.5) <= 0.2, f"{name} separates two samples of one population"


LEARNED = sorted(n for n in ORACLE_TABLE if ATTACKS.get(n).learned)


@pytest.mark.parametrize("name", LEARNED)
def test_learned_parts_never_see_a_report_sample(name, alphas_cumprod, monkeypatch):
    """Through the runner, an attack's learned part is fitted on calibration samples only (what `calibrate` is given
    and what it says it fitted on), never on the report half."""

    encode = TextEncoder()
    members, nonmembers = dataset(16, "m", 1, encode), dataset(16, "n", 2, encode)
    target = full_target(MemorizingOracle(members.latents, alphas_cumprod, conds=members.cond), alphas_cumprod, encode)
    assert_fitted_on_calibration_only(target, members, nonmembers, name, ORACLE_TABLE[name][0], monkeypatch)


def assert_fitted_on_calibration_only(target, members, nonmembers, name, params, monkeypatch) -> dict:
    """Runs `name` through the runner with calibrate() spied on: what it was given and what it says it fitted on
    are calibration samples, never report ones. Returns the runner's output."""
    from privtune.eval import runner

    seen, built = [], []
    real_build = runner.build_attack

    def spy(*args, **kwargs):
        attack = real_build(*args, **kwargs)
        calibrate = attack.calibrate

        def recording(tg, m, n, **kw):
            seen.extend(m.ids + n.ids)
            return calibrate(tg, m, n, **kw)

        attack.calibrate = recording
        built.append(attack)
        return attack

    monkeypatch.setattr(runner, "build_attack", spy)
    out = runner.run_attacks(target, members, nonmembers, [name], {name: params}, batch_size=16, n_bootstrap=20,
                             progress=False)
    report = set(out["attacks"][name]["samples"]["ids"])
    assert seen and not set(seen) & report
    assert set(built[-1].fit_ids) and set(built[-1].fit_ids) <= set(seen)
    return out


def test_runner_refuses_an_attack_that_fitted_on_a_report_sample(alphas_cumprod, members, nonmembers, monkeypatch):
    from privtune.errors import DataError
    from privtune.eval import runner

    real_build = runner.build_attack

    def leaky(*args, **kwargs):
        attack = real_build(*args, **kwargs)
        calibrate = attack.calibrate

        def peeking(tg, m, n, **kw):
            out = calibrate(tg, m, n, **kw)
            attack.fit_ids = [*m.ids, *(i for i in members.ids if i not in m.ids)]  # one look at the report half
            return out

        attack.calibrate = peeking
        return attack

    monkeypatch.setattr(runner, "build_attack", leaky)
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    with pytest.raises(DataError, match="fitted on samples outside the calibration split"):
        runner.run_attacks(target, members, nonmembers, ["secmi_nn"], {"secmi_nn": {"t_sec": 60, "k": 20, "epochs": 2}},
                           progress=False)


class _Routed:
    """A predictor that counts the rows it evaluates and checks it is only called while its model is live."""

    def __init__(self, predictor, live: dict, name: str):
        self.predictor, self.live, self.name, self.rows = predictor, live, name, 0

    def __call__(self, x, t, cond):
        assert self.live.get(self.name), f"model {self.name} queried outside its own context"
        self.rows += x.shape[0]
        return self.predictor(x, t, cond)


@pytest.mark.parametrize("name", LEARNED)
def test_pooled_shadows_fit_once_on_every_models_own_samples(name, alphas_cumprod):
    """`calibrate_pooled` over two shadow models: each model's features come from that model alone (inside its
    context, the same work per sample), the learned part is fitted on both models' samples, and it transfers to a
    third model that memorized its own members."""
    from contextlib import contextmanager

    from privtune.eval.attacks.base import CalibrationPart

    encode, live = TextEncoder(), {}
    parts, routed = [], []
    for k, name_k in enumerate(("a", "b")):
        m, n = dataset(16, f"{name_k}m", 30 + k, encode), dataset(16, f"{name_k}n", 40 + k, encode)
        pred = _Routed(MemorizingOracle(m.latents, alphas_cumprod, conds=m.cond), live, name_k)

        @contextmanager
        def context(key=name_k):
            live[key] = True
            try:
                yield
            finally:
                live[key] = False

        routed.append(pred)
        parts.append(CalibrationPart(full_target(pred, alphas_cumprod, encode), m, n, context))
    attack = ATTACKS.get(name)(**ORACLE_TABLE[name][0])
    cal = attack.calibrate_pooled(parts, batch_size=16, progress=False)
    assert routed[0].rows > 0 and routed[0].rows == routed[1].rows  # 32 samples each, the same work per sample
    fitted = set(attack.fit_ids)
    for part in parts:
        assert fitted & {*part.members.ids, *part.nonmembers.ids}, f"{name} fitted on one shadow model only"
    assert set(cal.ids) <= {i for p in parts for i in (*p.members.ids, *p.nonmembers.ids)}
    assert cal.nfe_per_sample == ORACLE_TABLE[name][1]

    members, nonmembers = dataset(16, "cm", 50, encode), dataset(16, "cn", 51, encode)
    live["c"] = True
    target = full_target(_Routed(MemorizingOracle(members.latents, alphas_cumprod, conds=members.cond), live, "c"),
                         alphas_cumprod, encode)
    res = attack.score(target, EncodedSamples.concat([members, nonmembers]), batch_size=16, progress=False)
    value = auc(res.scores, member_labels(16, 16))
    oriented = max(value, 1 - value)  # the runner fits the direction on the target's calibration half
    assert oriented >= 0.9, f"{name}: pooled shadow fit transfers with AUC {value:.3f}"


# ------------------------------------------------------------------ black-box attacks, against generator oracles
def blackbox_target(generator, alphas_cumprod):
    return oracles.blackbox_target(generator, alphas_cumprod, PASSES_PER_IMAGE)


def blackbox_auc(name, target, members, nonmembers, half):
    attack = ATTACKS.get(name)(**BLACKBOX_TABLE[name][0])
    attack.calibrate(target, members.subset(range(half)), nonmembers.subset(range(half)), batch_size=16, progress=False)
    report = EncodedSamples.concat([members.subset(range(half, 2 * half)), nonmembers.subset(range(half, 2 * half))])
    res = attack.score(target, report, batch_size=16, progress=False)
    return attack, res, member_labels(half, half)


@pytest.mark.parametrize("name", sorted(BLACKBOX_TABLE))
def test_blackbox_attack_detects_a_memorizing_generator_through_images_alone(name, alphas_cumprod):
    from .oracles import MemorizingGenerator

    members, nonmembers = image_samples(32, "m", 61), image_samples(32, "n", 62)
    target = blackbox_target(MemorizingGenerator(members.pixels, members.captions), alphas_cumprod)
    assert missing_requirements(ATTACKS.get(name), target, members) == []
    attack, res, y = blackbox_auc(name, target, members, nonmembers, 16)
    value = auc(res.scores, y)
    assert value >= 0.9, f"{name}: AUC {value:.3f} against a generator that memorized its members"
    assert auc(res.scores, 1 - y) == pytest.approx(1 - value)
    assert res.nfe_per_sample == BLACKBOX_TABLE[name][1] == attack.params()["passes_per_query"]
    assert not set(getattr(attack, "fit_ids", [])) & set(members.ids[16:] + nonmembers.ids[16:])


@pytest.mark.parametrize("name", sorted(BLACKBOX_TABLE))
def test_blackbox_attack_is_chance_on_a_generator_that_ignores_its_training_set(name, alphas_cumprod):
    from .oracles import IgnorantGenerator

    members, nonmembers = image_samples(128, "a", 71), image_samples(128, "b", 72)
    target = blackbox_target(IgnorantGenerator(members.pixels, members.captions), alphas_cumprod)
    _, res, y = blackbox_auc(name, target, members, nonmembers, 64)
    assert abs(auc(res.scores, y) - 0.5) <= 0.1, f"{name} separates members of a generator that ignores them"


def test_a_blackbox_attack_needs_the_generation_api(alphas_cumprod):
    members = image_samples(4, "m", 1)
    gray = AttackTarget(oracles.NoNoisePredictions(), alphas_cumprod)
    for name in BLACKBOX_TABLE:
        assert any("generation API" in m for m in missing_requirements(ATTACKS.get(name), gray, members)), name


@pytest.mark.parametrize("name", sorted(n for n in BLACKBOX_TABLE if ATTACKS.get(n).learned or n == "miagm"))
def test_blackbox_learned_parts_never_see_a_report_sample(name, alphas_cumprod, monkeypatch):
    """Through the runner, a black-box attack's classifier is fitted on calibration samples only."""
    from .oracles import MemorizingGenerator

    members, nonmembers = image_samples(16, "m", 81), image_samples(16, "n", 82)
    target = blackbox_target(MemorizingGenerator(members.pixels, members.captions), alphas_cumprod)
    out = assert_fitted_on_calibration_only(target, members, nonmembers, name, BLACKBOX_TABLE[name][0], monkeypatch)
    assert out["attacks"][name]["metrics"]["auc"]["value"] >= 0.8


def test_generation_api_serves_a_repeated_image_from_its_cache_and_still_counts_it():
    from privtune.eval.generation import GenerationAPI

    calls = []

    def generate(prompts, seeds):
        calls.append(len(prompts))
        return torch.stack([torch.full((3, 4, 4), float(s % 7) / 7) for s in seeds])

    api = GenerationAPI(generate=generate, embed=pooled_embed, passes_per_image=10)
    first = api.images(["a", "b", "a"], [1, 2, 1])
    again = api.images(["b", "c"], [2, 3])
    assert calls == [2, 1]  # ("a", 1) once, ("b", 2) from the cache
    assert torch.equal(first[1], again[0]) and torch.equal(first[0], first[2])
    assert api.counts["images"] == 5 and api.counts["passes"] == 50  # the cost asked for, cached or not
