"""The model's lean form (ldseg.model.rewrites): the exports' rewrites, scoped or for good."""

from __future__ import annotations

import pytest
import torch

from ldseg.model.config import PRESETS
from ldseg.model.layers import BatchNorm, SelfAttention, Upsample
from ldseg.model.network import LDSeg
from ldseg.model.rewrites import is_lean, lean_form, make_lean


@pytest.fixture
def model() -> LDSeg:
    """The demo architecture with non-trivial BatchNorm statistics and q/k/v biases, so that each
    rewrite changes numbers when it is wrong."""
    torch.manual_seed(0)
    model = LDSeg(PRESETS["demo"]).eval()
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.bn.running_mean.normal_()
            module.bn.running_var.uniform_(0.2, 3.0)
            torch.nn.init.normal_(module.bn.weight)
            torch.nn.init.normal_(module.bn.bias)
        if isinstance(module, SelfAttention):
            for layer in (module.query, module.key, module.value):
                torch.nn.init.normal_(layer.bias)
    return model


def _outputs(model: LDSeg) -> tuple[torch.Tensor, ...]:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, *cfg.image_shape, generator=gen)
    z = torch.randn(2, *cfg.latent_shape, generator=gen)
    coeffs = torch.tensor([[500.0, 0.9, 0.3, 0.0]] * 2)
    with torch.no_grad():
        z_image = model.encode_image(image)
        return z_image, model.step(z, z_image, coeffs, torch.zeros_like(z)), model.label_decoder(z)


def test_lean_form_is_the_same_function_and_restores_the_model_bit_exact(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _outputs(model)
    with lean_form(model) as counts:
        assert is_lean(model)
        ups = sum(isinstance(m, Upsample) for m in model.modules())
        attention = sum(isinstance(m, SelfAttention) for m in model.modules())
        assert counts["phase_upsampling"] == ups > 0 and counts["fused_attention"] == attention > 0
        assert counts["folded_batchnorm"] > 0
        lean = _outputs(model)
    for a, b in zip(lean, reference):
        assert not torch.equal(a, b)  # computed another way: the rewrites were in effect
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not is_lean(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_make_lean_is_for_good_and_idempotent(model):
    reference = _outputs(model)
    first = make_lean(model)
    assert is_lean(model) and all(first.values())
    once = _outputs(model)
    # Nothing rewritten twice: a BatchNorm folded twice would scale its conv again.
    assert make_lean(model) == dict.fromkeys(first, 0)
    twice = _outputs(model)
    for a, b, ref in zip(once, twice, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)
    with lean_form(model) as counts:  # an export of a lean model changes nothing and restores nothing
        assert counts == dict.fromkeys(first, 0)
    assert is_lean(model)
