"""Shared fixtures: an SD-like ᾱ_t and small member / non-member latent sets."""

import pytest
import torch

from privtune.eval.attacks import EncodedSamples


@pytest.fixture(scope="session")
def alphas_cumprod():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def make_samples(n: int, prefix: str, seed: int, shape=(4, 8, 8), cond_dim=(8, 16)) -> EncodedSamples:
    g = torch.Generator().manual_seed(seed)
    return EncodedSamples(torch.randn(n, *shape, generator=g), torch.zeros(n, *cond_dim), [f"{prefix}{i}" for i in range(n)])


@pytest.fixture(scope="session")
def members():
    return make_samples(32, "m", 1)


@pytest.fixture(scope="session")
def nonmembers():
    return make_samples(32, "n", 2)
