"""SIDE: guidance beats unguided sampling on a weighted memorizing oracle, the classifier is time-dependent, errors, end to end."""

import json

import numpy as np
import pytest
import torch

from privtune.errors import ConfigError
from privtune.eval import side

SHAPE = (3, 8, 8)


def alphas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def planted():
    """4 well-separated groups: group 0 one member with 85% of the mass, groups 1-3 eight members each (5% per group):
    unguided sampling keeps returning the dominant member and misses many rare ones."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, *SHAPE, generator=g).sign() * 0.8
    xs, w = [centers[0]], [0.85]
    for k in range(1, 4):
        for _ in range(8):
            xs.append((centers[k] + 0.5 * torch.randn(SHAPE, generator=g)).clamp(-1, 1))
            w.append(0.05 / 8)
    return torch.stack(xs).double(), torch.tensor(w, dtype=torch.float64)


def oracle(xs, w, ac):
    def eps(x, t, cond):
        a, s = ac[t].sqrt().view(-1, 1), (1 - ac[t]).sqrt().view(-1, 1)
        xf = x.double().flatten(1)
        d = ((xf[:, None] - a[:, None] * xs.flatten(1)[None]) ** 2).sum(-1)
        logit = w.log()[None] - d / (2 * s ** 2)
        m = torch.softmax(logit, 1) @ xs.flatten(1)
        return ((xf - a * m) / s).view_as(x).float()
    return eps


def decode(z):
    return ((z.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def test_side_extracts_more_unique_members_than_unguided_at_equal_generations():
    xs, w = planted()
    ac = alphas()
    cfg = side.SideConfig(generations=160, pool=60, clusters=4, guidance=2.0, steps=15, classifier_steps=300, delta=0.05,
                          tiles=4, seed=0)
    out = side.run_side(oracle(xs, w, ac), ac, torch.zeros(1, 1, 1), decode, decode(xs.float()),
                        [f"m{i}" for i in range(len(xs))], SHAPE, cfg, progress=False)
    s, u = out["side"], out["unguided"]
    print(s, u)
    assert s["generations"] == u["generations"] == 160
    assert u["matched_generations"] >= 150  # the oracle reproduces training points
    assert s["unique_members"] > u["unique_members"]
    json.dumps(out)
    assert "SIDE extraction" in side.card_line(out) and len(side.markdown_lines(out)) == 5


def test_classifier_is_time_dependent():
    xs, w = planted()
    ac = alphas()
    groups = np.array([0] + [1] * 8 + [2] * 8 + [3] * 8)
    z0 = xs.float().repeat(8, 1, 1, 1)
    clf = side.train_time_classifier(z0, np.tile(groups, 8), ac, steps=300, hidden=64, seed=0)
    g = torch.Generator().manual_seed(1)

    def acc(t):
        x = xs.float().repeat(20, 1, 1, 1)
        xt = side.add_noise(x, torch.randn(x.shape, generator=g), t, ac)
        with torch.no_grad():
            return float((clf(xt, torch.full((len(x),), t)).argmax(1).numpy() == np.tile(groups, 20)).mean())

    mid, end = acc(300), acc(999)
    print(mid, end)
    assert mid > 0.8 and end < 0.5 and end < mid - 0.3


@pytest.mark.parametrize("kw,match", [(dict(clusters=1), "clusters"), (dict(pool=64, generations=64), "pool"),
                                       (dict(embedding="sscd"), "embedding"), (dict(delta=0.0), "delta"),
                                       (dict(guidance=-1.0), "guidance"), (dict(tiles=5), "divide")])
def test_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        side.SideConfig(**kw).check(32)


def test_end_to_end_tiny_model(base_model):
    from privtune.data.sources import load_source  # noqa: F401
    from PIL import Image

    from privtune.data.sources import Record, content_hash

    from .conftest import load_tiny

    comps = load_tiny(base_model)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(3)]
    recs = [Record(f"m{i}", "c", im, f"m{i}", content_hash(im)) for i, im in enumerate(ims)]
    cfg = side.SideConfig(generations=8, pool=4, clusters=2, steps=2, classifier_steps=5, batch_size=8)
    out = side.side_on_pipeline(comps, comps.unet, recs, cfg, 32, progress=False)
    out = json.loads(json.dumps(out))
    assert out["side"]["generations"] == out["unguided"]["generations"] == 8
    for arm in ("side", "unguided"):
        assert {"unique_members", "matched_generations", "extracted_members", "seconds"} <= set(out[arm])


def test_classifier_is_reproducible_whatever_the_global_rng_did():
    xs, _ = planted()
    labels = np.array([0] + [1] * 8 + [2] * 8 + [3] * 8)
    a = side.train_time_classifier(xs.float(), labels, alphas(), steps=3, hidden=16, seed=5)
    torch.randn(100)  # anything else drawing from the global stream in between
    b = side.train_time_classifier(xs.float(), labels, alphas(), steps=3, hidden=16, seed=5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
