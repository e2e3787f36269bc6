"""The numpy sampler side (ldseg.model.sampling): what the runtime draws and renormalizes with."""

import subprocess
import sys

import numpy as np
import torch

from ldseg.model import diffusion, sampling


def test_noise_is_philox_per_seed():
    z, noise = sampling.draw_noise([7], 3, (1, 2, 2))
    gen = np.random.Generator(np.random.Philox(7))
    raw = gen.standard_normal((1, 2, 2), dtype=np.float32)
    np.testing.assert_allclose(z[0], sampling.renormalize(raw[None])[0], rtol=0, atol=0)
    np.testing.assert_array_equal(noise[:, 0], gen.standard_normal((3, 1, 2, 2), dtype=np.float32))
    assert z.dtype == noise.dtype == np.float32 and noise.flags.c_contiguous


def test_noise_depends_only_on_its_seed():
    z, n = sampling.draw_noise([5, 6], 15, (1, 4, 8, 8))
    z1, n1 = sampling.draw_noise([6], 15, (1, 4, 8, 8))
    np.testing.assert_array_equal(z[1:], z1)
    np.testing.assert_array_equal(n[:, 1:], n1)
    assert not np.array_equal(z[0], z[1])


def test_numpy_renormalize_matches_the_torch_one():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((3, 1, 4, 4, 4)) * np.array([1.0, 5.0, 0.1]).reshape(3, 1, 1, 1, 1) + 2).astype(np.float32)
    out = sampling.renormalize(z)
    np.testing.assert_allclose(out, diffusion.renormalize(torch.from_numpy(z)).numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(out.reshape(3, -1).std(axis=1), 1.0, atol=2e-4)  # eps 1e-5 on std 0.1


def test_torch_draw_noise_gives_the_same_numbers():
    z, n = sampling.draw_noise([3, 4], 5, (1, 2, 2, 2))
    zt, nt = diffusion.draw_noise([3, 4], 5, (1, 2, 2, 2))
    np.testing.assert_array_equal(zt.numpy(), z)
    np.testing.assert_array_equal(nt.numpy(), n)


def test_sampling_imports_no_torch():
    code = "import sys, ldseg.model.sampling; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
