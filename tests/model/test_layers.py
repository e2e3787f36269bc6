import pytest
import torch
import torch.nn.functional as F

from ldseg.model.layers import (
    GroupNorm,
    ResConvBlock,
    SameConv,
    SameConvTranspose,
    SelfAttention,
    Upsample,
    folded_batchnorm,
    fused_attention,
    phase_upsampling,
)


def test_same_conv_stride2_pads_after_only():
    conv = SameConv(2, 1, 1, 3, stride=2)
    x = torch.randn(1, 1, 8, 8)
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.conv.weight, conv.conv.bias, stride=2)
    assert conv(x).shape == (1, 1, 4, 4)
    torch.testing.assert_close(conv(x), expected)


def test_same_conv_even_kernel_pads_after_only():
    conv = SameConv(3, 2, 1, 2)
    x = torch.randn(1, 2, 4, 4, 6)
    expected = F.conv3d(F.pad(x, [0, 1, 0, 1, 0, 1]), conv.conv.weight, conv.conv.bias)
    torch.testing.assert_close(conv(x), expected)


def test_transpose_conv_same_doubles_and_crops_the_tail():
    layer = SameConvTranspose(2, 3, 2)
    x = torch.randn(1, 3, 5, 7)
    full = layer.conv(x)
    assert full.shape[-2:] == (11, 15)
    torch.testing.assert_close(layer(x), full[..., :10, :14])


def test_group_norm_matches_torch_with_keras_epsilon():
    gn = GroupNorm(4, 16).eval()  # the written-out form (inference, export)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(2, 16, 3, 4, 5) * 5 + 2
    expected = F.group_norm(x, 4, gn.weight, gn.bias, eps=1e-3)
    torch.testing.assert_close(gn(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 16, 4, 4, 8), (2, 8, 5, 7)])
def test_group_norm_training_kernel_equals_the_written_out_form(shape):
    """Training uses PyTorch's fused group_norm; values and gradients equal the inference form's
    up to float rounding (channels-last input included, as the CPU trainer feeds it)."""
    torch.manual_seed(0)
    gn = GroupNorm(4, shape[1])
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(*shape) * 3 + 1
    if x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    results = []
    for training in (True, False):
        gn.train(training)
        xi = x.detach().clone().requires_grad_(True)
        out = gn(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), xi.grad, gn.weight.grad.clone(), gn.bias.grad.clone()))
        gn.zero_grad(set_to_none=True)
    for fused, written in zip(*results):
        torch.testing.assert_close(fused, written, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["knee3d", "glas2d", "demo"])
def test_only_the_denoisers_group_norms_are_fused(preset):
    """The denoiser's latent-sized groups take PyTorch's group_norm at inference (one kernel, one
    InstanceNormalization in ONNX); the image encoder's full-resolution ones keep the written-out form."""
    from ldseg.model.config import get_preset
    from ldseg.model.network import LDSeg

    model = LDSeg(get_preset(preset))
    denoiser = [m.fused for m in model.denoiser.modules() if isinstance(m, GroupNorm)]
    others = [m.fused for m in model.modules() if isinstance(m, GroupNorm) and not m.fused]
    assert denoiser and all(denoiser)
    assert len(others) == sum(isinstance(m, GroupNorm) for m in model.modules()) - len(denoiser) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_group_norm_at_inference_equals_the_written_out_form(dtype):
    """On a knee3d latent's shape at the denoiser's widest level (64 channels, 4 groups), in FP32
    and as the FP32 island under BF16 autocast."""
    torch.manual_seed(0)
    gn = GroupNorm(4, 64).eval()
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = (torch.randn(2, 64, 8, 8, 16) * 3 + 1).to(dtype)
    results = []
    for fused in (True, False):
        gn.fused = fused
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            results.append(gn(x))
    assert results[0].dtype == dtype
    # BF16: the two FP32 results round to the same BF16 value or a neighbour (2^-7 relative)
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(results[0].float(), results[1].float(), atol=2e-5, rtol=rtol)


@pytest.mark.parametrize(
    ("channels", "heads", "shape"), [(16, 1, (2, 16, 4, 4, 8)), (16, 8, (2, 16, 5, 6)), (1, 1, (1, 1, 4, 4))]
)
def test_fused_attention_is_the_same_function_and_restores_the_block(channels, heads, shape):
    """q, k, v as one matrix with the softmax scale folded into q (exports): the same outputs to
    float rounding, for one head, eight heads and the 1-channel block (scale 1)."""
    torch.manual_seed(0)
    block = SelfAttention(channels, groups=1 if channels == 1 else 4, heads=heads).eval()
    for layer in (block.query, block.key, block.value):
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(*shape)
    reference = block(x)
    with fused_attention(block) as count:
        assert count == 1 and block.frozen_qkv is not None
        fused = block(x)
    assert block.frozen_qkv is None
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_attention_residual_goes_to_normalized_or_raw_input():
    torch.manual_seed(0)
    normalized = SelfAttention(8, groups=4)
    raw = SelfAttention(8, groups=4, normalized_residual=False)
    raw.load_state_dict(normalized.state_dict())
    x = torch.randn(1, 8, 3, 3) * 3 + 1
    difference = normalized(x) - raw(x)
    torch.testing.assert_close(difference, normalized.norm(x) - x)


@pytest.mark.parametrize(
    "dims, shape", [(3, (2, 5, 3, 4, 7)), (3, (1, 3, 1, 1, 1)), (2, (2, 5, 6, 9)), (2, (1, 2, 1, 3))]
)
def test_upsample_phase_form_is_the_same_function(dims, shape):
    """Nearest x2 + 3-tap conv == one 2-tap conv per output parity, interleaved: on odd and
    size-1 grids (the borders are where a wrong offset would show), in float64."""
    torch.manual_seed(0)
    up = Upsample(dims, shape[1], 4).double()
    torch.nn.init.normal_(up.conv.conv.bias)
    x = torch.randn(shape, dtype=torch.float64)
    reference = up(x)
    with phase_upsampling(up) as count:
        assert count == 1 and up.phase_form
        fast = up(x)
    assert not up.phase_form and up.frozen_phase is None  # restored
    up.phase_form = True  # kernel derived on every call, as in training-mode use
    torch.testing.assert_close(up(x), reference, rtol=0, atol=1e-12)
    assert fast.shape == reference.shape == (shape[0], 4, *(2 * n for n in shape[2:]))
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-12)


def test_folded_batchnorm_is_the_same_function_and_restores_the_weights():
    """Every conv -> BatchNorm pair folded (exported graphs carry no BatchNormalization): same
    outputs, to float32 rounding, with non-trivial running statistics; the weights come back
    bit-exact."""
    from ldseg.model.config import PRESETS
    from ldseg.model.layers import BatchNorm
    from ldseg.model.network import LDSeg

    torch.manual_seed(0)
    model = LDSeg(PRESETS["demo"]).eval()
    for module in model.modules():
        if isinstance(module, BatchNorm):
            bn = module.bn
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.2, 3.0)
            torch.nn.init.normal_(bn.weight)
            torch.nn.init.normal_(bn.bias)
    cfg = model.cfg
    image = torch.rand(2, *cfg.image_shape)
    labels = torch.randint(0, cfg.num_classes, (2, *cfg.image_size))
    z = torch.randn(2, *cfg.latent_shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = (model.encode_image(image), model.encode_label(labels), model.label_decoder(z))
        with folded_batchnorm(model) as count:
            # 3 pairs per res block (label encoder and decoder), plus the decoder and image-encoder heads
            assert count == 3 * sum(isinstance(m, ResConvBlock) for m in model.modules()) + 2
            assert all(m.folded for m in model.modules() if isinstance(m, BatchNorm))
            folded = (model.encode_image(image), model.encode_label(labels), model.label_decoder(z))
    for a, b in zip(folded, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(m.folded for m in model.modules() if isinstance(m, BatchNorm))
