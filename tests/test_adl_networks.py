"""ADL networks: Efficient-UNet denoiser and discriminator (shapes, value ranges, sizes, padding)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lib.networks import (
    EfficientUNetDenoiser,
    EfficientUNetDiscriminator,
    ResidualBlock,
    count_parameters,
    pad_to_multiple,
)

TINY = dict(filters=(8, 12, 16, 20), enhancer_filters=4)
TINY_D = dict(filters=(4, 6, 8, 10))
SHAPES = {2: (2, 1, 32, 24), 3: (1, 1, 16, 16, 8)}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that
    # wait for each other make small convolutions far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dims", [2, 3])
def test_residual_denoiser_starts_as_the_identity_and_learns_a_correction(dims):
    import torch.nn.functional as F

    model = EfficientUNetDenoiser(spatial_dims=dims, **TINY).train()
    x = 0.05 + 0.9 * torch.rand(SHAPES[dims])
    outputs = model(x)
    assert isinstance(outputs, list) and len(outputs) == 3  # deep supervision: full, half and quarter scale
    for k, out in enumerate(outputs):
        expected = F.interpolate(x, size=tuple(s // 2**k for s in x.shape[2:]), mode="area") if k else x
        torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=0)
    # the zero-initialised heads still receive gradients, so training moves the output away from the input
    outputs[0].mean().backward()
    assert float(model.heads[0].out.weight.grad.abs().sum()) > 0
    assert float(model.heads[0].out.bias.grad.abs().sum()) > 0
    plain = EfficientUNetDenoiser(spatial_dims=dims, residual=False, **TINY).eval()
    with torch.no_grad():
        out = plain(x)
    assert float((out - x).abs().mean()) > 1e-3  # the paper's plain heads start anywhere
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0  # ... as sigmoid images


@pytest.mark.parametrize("residual", [True, False])
def test_bfloat16_autocast_output_stays_float32_and_close_to_float32(residual):
    """lib.runtime.precision runs the network under bfloat16 autocast on CPUs with native bfloat16: the heads' sigmoid (and
    the residual heads' input logit) must stay float32, or the image itself would be rounded to bfloat16 (8
    mantissa bits: ~1/256 of the value, 4 HU in soft tissue)."""
    model = EfficientUNetDenoiser(residual=residual, **TINY).eval()
    with torch.no_grad():
        nn.init.normal_(model.heads[0].out.weight, std=1.0)  # a non-trivial correction
    x = 0.2 + 0.1 * torch.rand(2, 1, 32, 32)  # soft-tissue-like values of the CT scaling
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = model(x)
    assert reduced.dtype == torch.float32
    # not rounded to bfloat16 as a whole: most values are not representable in it
    assert float((reduced != reduced.bfloat16().float()).float().mean()) > 0.9
    # the convolutions that read the image compute in float32 (autocast would round the image itself to
    # bfloat16) and hand their features on in bfloat16: exactly the float32 result, rounded once
    for conv in (model.backbone.enc0.conv1, model.backbone.enc0.shortcut, *model.enhancer.branches):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            reduced_features = conv(x)
        assert reduced_features.dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.equal(reduced_features, conv(x).bfloat16())
    correction = (reference - x).abs() if residual else reference.abs()
    error = (reduced - reference).abs()
    assert float(correction.mean()) > 1e-3  # the test would say nothing about a zero correction
    assert float(error.mean()) < 0.05 * float(correction.mean())


@pytest.mark.parametrize("dims", [2, 3])
def test_denoiser_eval_mode_returns_full_resolution_tensor(dims):
    model = EfficientUNetDenoiser(spatial_dims=dims, in_channels=2, out_channels=3, residual=False, **TINY).eval()
    x = torch.rand((SHAPES[dims][0], 2) + SHAPES[dims][2:])
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (x.shape[0], 3) + x.shape[2:]
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_without_deep_supervision_training_returns_the_full_resolution_output_only():
    full = EfficientUNetDenoiser(**TINY)
    model = EfficientUNetDenoiser(deep_supervision=False, **TINY).train()
    assert count_parameters(model) < count_parameters(full)  # the 1/2 and 1/4 heads are not even built
    x = 0.05 + 0.9 * torch.rand(2, 1, 16, 16)
    out = model(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out.detach(), x, atol=1e-5, rtol=0)  # the residual full-scale head, at identity


def test_denoiser_building_blocks_follow_the_paper():
    model = EfficientUNetDenoiser(spatial_dims=2, **TINY)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    # 4 encoder, 3 decoder, 3 heads x 2 channel-halving blocks
    assert len(blocks) == 4 + 3 + 3 * 2
    for block in blocks:
        assert all(c.bias is None for c in (block.conv1, block.conv2, block.shortcut))
        assert isinstance(block.norm1, nn.BatchNorm2d)
    assert [b.dilation for b in model.enhancer.branches] == [(1, 1), (2, 2), (4, 4)]
    assert [b.kernel_size for b in model.enhancer.branches] == [(7, 7)] * 3
    assert model.enhancer.fuse.kernel_size == (7, 7)
    model3d = EfficientUNetDenoiser(spatial_dims=3, **TINY)
    assert model3d.enhancer.fuse.kernel_size == (5, 5, 5)  # documented 3D default (cost)
    assert EfficientUNetDenoiser(spatial_dims=3, enhancer_kernel_size=7, **TINY).enhancer.fuse.kernel_size == (7, 7, 7)


def test_default_parameter_counts():
    count_2d = count_parameters(EfficientUNetDenoiser(spatial_dims=2))
    count_3d = count_parameters(EfficientUNetDenoiser(spatial_dims=3))
    count_d = count_parameters(EfficientUNetDiscriminator(spatial_dims=2))
    print(f"ADL denoiser parameters: 2D {count_2d:,}, 3D {count_3d:,}; discriminator 2D {count_d:,}")
    assert 3_000_000 < count_2d < 7_000_000  # paper: ~4.7 M
    assert 8_000_000 < count_3d < 16_000_000
    assert 300_000 < count_d < 1_000_000  # released code: ~0.6-0.7 M


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("conditional", [True, False])
def test_discriminator_returns_logit_maps_at_four_scales(dims, conditional):
    disc = EfficientUNetDiscriminator(spatial_dims=dims, conditional=conditional, **TINY_D)
    x = torch.rand(SHAPES[dims])
    logits = disc(x, torch.rand_like(x)) if conditional else disc(x)
    assert len(logits) == 4
    for k, logit in enumerate(logits):
        assert logit.shape == (x.shape[0], 1) + tuple(s // 2**k for s in x.shape[2:])
    # logits, not probabilities: nothing squashes them into [0, 1]
    disc.mappers[0].bias.data.fill_(-5.0)
    with torch.no_grad():
        logits = disc(x, torch.rand_like(x)) if conditional else disc(x)
    assert float(logits[0].max()) < 0.0


def test_discriminator_condition_is_checked():
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="conditional"):
        EfficientUNetDiscriminator(**TINY_D)(x)
    with pytest.raises(ValueError, match="unconditional"):
        EfficientUNetDiscriminator(conditional=False, **TINY_D)(x, x)


@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: EfficientUNetDenoiser(spatial_dims=2, **TINY), (1, 1, 30, 32)),
        (lambda: EfficientUNetDenoiser(spatial_dims=3, **TINY), (1, 1, 16, 16, 12)),
        (lambda: EfficientUNetDiscriminator(spatial_dims=2, conditional=False, **TINY_D), (1, 1, 32, 20)),
    ],
)
def test_sizes_not_divisible_by_8_raise(factory, shape):
    with pytest.raises(ValueError, match="divisible by 8"):
        factory()(torch.rand(shape))


def test_wrong_rank_raises():
    with pytest.raises(ValueError, match="expected a 4D tensor"):
        EfficientUNetDenoiser(spatial_dims=2, **TINY)(torch.rand(1, 1, 8, 8, 8))


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("shape", [(2, 1, 30, 37), (1, 2, 5, 16, 9), (1, 1, 3, 8), (1, 1, 16, 8)])
def test_pad_to_multiple_round_trip(shape, mode):
    x = torch.rand(shape)
    padded, crop = pad_to_multiple(x, 8, mode=mode)
    assert all(s % 8 == 0 and s >= t for s, t in zip(padded.shape[2:], x.shape[2:]))
    assert padded.shape[:2] == x.shape[:2]
    assert torch.equal(padded[crop], x)


def test_3d_forward_backward_reaches_every_parameter():
    model = EfficientUNetDenoiser(spatial_dims=3, **TINY).train()
    outputs = model(torch.rand(1, 1, 16, 16, 16))
    sum(o.mean() for o in outputs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.gpu
def test_cuda_forward_matches_cpu():
    model = EfficientUNetDenoiser(spatial_dims=3, **TINY)
    disc = EfficientUNetDiscriminator(spatial_dims=3, **TINY_D)
    with torch.no_grad():
        nn.init.normal_(model.heads[0].out.weight, std=1.0)  # a non-trivial correction
    model.eval(), disc.eval()
    x = torch.rand(2, 1, 16, 16, 16)
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    try:
        with torch.no_grad():
            on_cpu = model(x), disc(x, x)
            model.cuda(), disc.cuda()
            on_gpu = model(x.cuda()), disc(x.cuda(), x.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.testing.assert_close(on_gpu[0].cpu(), on_cpu[0], atol=1e-4, rtol=0)
    for gpu_logit, cpu_logit in zip(on_gpu[1], on_cpu[1]):
        torch.testing.assert_close(gpu_logit.cpu(), cpu_logit, atol=1e-3, rtol=1e-3)


def test_precision_policy_per_device():
    from lib.runtime.precision import autocast_dtype, autocast_for, cpu_has_native_bf16

    assert autocast_dtype("cuda") == torch.float16
    assert autocast_dtype("cpu") == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("cuda", enabled=False) is None and autocast_dtype("cpu", enabled=False) is None
    with autocast_for("cpu", enabled=False):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for("cpu"):
        assert torch.is_autocast_enabled("cpu") == cpu_has_native_bf16()


@pytest.mark.parametrize("name, spatial_dims", [("batch", 2), ("batch", 3), ("instance", 2), ("INSTANCE", 3),
                                                ("batch", 1), (("group", {"num_groups": 2}), 2)])
def test_norm_layers_are_the_ones_monai_makes(name, spatial_dims):
    """The networks build their layers without importing MONAI where they can (lib.networks.layers): the same classes
    and arguments as MONAI's factories, hence the same state-dict keys for weight files written either way."""
    from monai.networks.layers.utils import get_norm_layer

    from lib.networks.layers import norm_layer

    ours, theirs = norm_layer(name, spatial_dims, 4), get_norm_layer(name, spatial_dims=spatial_dims, channels=4)
    assert type(ours) is type(theirs) and repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("name", ["relu", "LeakyReLU", "prelu", ("leakyrelu", {"negative_slope": 0.2}), "gelu"])
def test_activation_layers_are_the_ones_monai_makes(name):
    from monai.networks.layers.utils import get_act_layer

    from lib.networks.layers import act_layer

    ours, theirs = act_layer(name), get_act_layer(name)
    assert type(ours) is type(theirs) and repr(ours) == repr(theirs)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_convolution_and_pooling_types_are_the_ones_monai_makes(spatial_dims):
    from monai.networks.layers.factories import Conv, Pool

    from lib.networks.layers import conv_transpose_type, conv_type, max_pool_type

    assert conv_type(spatial_dims) is Conv[Conv.CONV, spatial_dims]
    assert conv_transpose_type(spatial_dims) is Conv[Conv.CONVTRANS, spatial_dims]
    assert max_pool_type(spatial_dims) is Pool[Pool.MAX, spatial_dims]
