import numpy as np
import pytest
import torch

from ldseg.model.config import PRESETS, DiffusionConfig
from ldseg.model.diffusion import (
    alpha_bar_table,
    cosine_alpha_bar,
    renormalize,
    sampler_table,
    sampling_times,
)
from ldseg.model.network import LDSeg


def test_cosine_schedule_formula():
    t = np.array([0.0, 250.0, 999.0])
    f = lambda x: np.cos(((x / 1000 + 0.008) / 1.008) * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(cosine_alpha_bar(t, 1000), f(t) / f(0.0))
    assert cosine_alpha_bar(np.array([0.0]), 1000)[0] == 1.0


def test_linear_and_quadratic_schedules_formulas():
    lin = alpha_bar_table(DiffusionConfig(schedule="linear"))
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(lin, np.cumprod(1 - betas))
    quad = alpha_bar_table(DiffusionConfig(schedule="quadratic"))
    qbetas = (np.linspace(0.02**0.5, 1e-4**0.5, 1000) ** 2)[::-1]
    np.testing.assert_allclose(quad, np.cumprod(1 - qbetas))
    assert np.all(np.diff(lin) < 0) and np.all(np.diff(quad) < 0)


def test_sampling_times_are_official_linspace():
    np.testing.assert_allclose(sampling_times(DiffusionConfig(), 15), np.linspace(0, 999, 15))


def _official_loop(z, eps_fn, sampler, noises, steps=15):
    """The official sampler3D.segment loop, transcribed (numpy, batch-wide renorm at batch 1)."""
    times = np.linspace(0, 999, steps)
    f = lambda x: np.cos(((x / 1000 + 0.008) / 1.008) * np.pi / 2) ** 2  # noqa: E731
    acum = f(times) / f(np.zeros_like(times))
    alphas = acum / np.append(1.0, acum[:-1])
    betas = 1 - alphas
    acum1s = np.roll(acum, 1)
    for i, (t, beta, a, a1) in enumerate(reversed(list(zip(times, betas, acum, acum1s)))):
        zn = eps_fn(z, t)
        noise = noises[i]
        if t == times[0]:
            z = (z - np.sqrt(1 - a) * zn) / np.sqrt(a) + np.sqrt(beta) * noise
        else:
            s = np.sqrt(((1 - a1) / (1 - a)) * (1 - a / a1)) if sampler == "ddpm" else 0
            z = np.sqrt(a1) * ((z - np.sqrt(1 - a) * zn) / np.sqrt(a)) + np.sqrt(1 - a1 - s**2) * zn + s * noise
        z = (z - z.mean()) / (z.std() + 1e-5)
    return z


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_table_reproduces_the_official_loop(sampler):
    rng = np.random.default_rng(1)
    z0 = rng.normal(size=(1, 1, 4, 4))
    noises = rng.normal(size=(15, 1, 1, 4, 4))
    eps_fn = lambda z, t: np.tanh(z) * (t / 999 + 0.5)  # noqa: E731  any deterministic "denoiser"
    expected = _official_loop(z0, eps_fn, sampler, noises)
    table = sampler_table(DiffusionConfig(), 15, sampler).rows
    assert table[0, 0] == 999 and table[-1, 0] == 0
    z = z0
    for (t, a, b, c), noise in zip(table, noises):
        z = a * z + b * eps_fn(z, t) + c * noise
        z = (z - z.mean()) / (z.std() + 1e-5)
    np.testing.assert_allclose(z, expected, rtol=1e-10, atol=1e-10)
    assert np.all(table[:, 3] == 0) == (sampler == "ddim"), "only DDPM adds noise"


def test_renormalize_is_per_sample():
    z = torch.randn(3, 1, 4, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).reshape(3, 1, 1, 1, 1) + 2
    out = renormalize(z)
    torch.testing.assert_close(out.reshape(3, -1).mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:2], renormalize(z[1:2]))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_deterministic_and_batch_invariant(sampler):
    torch.manual_seed(0)
    model = LDSeg(PRESETS["demo"]).eval()
    image = torch.rand(3, *PRESETS["demo"].image_shape)
    batch = model.segment(image, [1, 2, 3], steps=5, sampler=sampler)
    again = model.segment(image, [1, 2, 3], steps=5, sampler=sampler)
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    single = model.segment(image[2:], [3], steps=5, sampler=sampler)
    torch.testing.assert_close(batch[2:], single, atol=1e-5, rtol=1e-5)
    other_seed = model.segment(image[2:], [4], steps=5, sampler=sampler)
    assert not torch.allclose(single, other_seed)
