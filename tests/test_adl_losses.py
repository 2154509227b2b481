"""ADL losses: pyramidal textural (all levels), differentiable histogram, hinge GAN, total loss, training."""
from __future__ import annotations

import math

import pytest
import torch

from lib.losses import (
    ADLDenoiserLoss,
    HistogramLoss,
    PyramidalTexturalLoss,
    atrous_wavelet_decomposition,
    discriminator_hinge_loss,
    discriminator_loss,
    generator_adversarial_loss,
    log_cosh,
    soft_histogram,
)
from lib.networks import EfficientUNetDenoiser, EfficientUNetDiscriminator

TINY = dict(filters=(8, 12, 16, 20), enhancer_filters=4)
TINY_D = dict(filters=(4, 6, 8, 10))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that
    # wait for each other make small convolutions ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _pair(shape=(2, 1, 32, 32)):
    clean = torch.rand(shape) * 0.6 + 0.2
    noisy = (clean + 0.1 * torch.randn(shape)).clamp(0, 1)
    return noisy, clean


def _grad_norm(model: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)


# --- pyramidal textural loss -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 24, 20), (1, 2, 8, 12, 10)])
def test_atrous_decomposition_reconstructs_exactly(shape):
    x = torch.rand(shape, dtype=torch.float64)
    bands, lowpass = atrous_wavelet_decomposition(x, levels=3, spatial_dims=len(shape) - 2)
    assert len(bands) == 3 and all(b.shape == x.shape for b in bands)
    torch.testing.assert_close(sum(bands) + lowpass, x)


def test_pyramid_loss_counts_the_finest_band_not_only_the_last():
    # A +-eps checkerboard is annihilated by the B3-spline kernel (1 - 4 + 6 - 4 + 1 = 0): it lives in
    # band w_0 only. The released code's last-level-only loss is blind to it.
    target = torch.full((1, 1, 32, 32), 0.5)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    pred = target + 0.05 * ((-1.0) ** (yy + xx))[None, None]
    loss = PyramidalTexturalLoss(levels=3)
    bands = loss.band_losses(pred, target)
    assert float(bands[0]) == pytest.approx(0.05, rel=1e-2)  # the whole checkerboard
    assert float(bands[2]) < 0.01 * float(bands[0])  # only border effects of the padding
    assert float(loss(pred, target)) == pytest.approx(float(sum(bands)))
    assert float(loss(pred, target)) > 10 * float(bands[-1])


def test_pyramid_loss_sees_a_coarse_change_in_the_coarse_bands():
    target = torch.zeros(1, 1, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    bump = torch.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / (2 * 4.0**2))[None, None]
    bands = PyramidalTexturalLoss(levels=3).band_losses(0.2 * bump, target)
    assert float(bands[2]) > float(bands[0])


@pytest.mark.parametrize("dims", [2, 3])
def test_pyramid_loss_every_level_has_gradient(dims):
    shape = (1, 1, 16, 16) if dims == 2 else (1, 1, 8, 8, 8)
    target = torch.rand(shape)
    pred = torch.rand(shape, requires_grad=True)
    loss = PyramidalTexturalLoss(levels=3, spatial_dims=dims, include_lowpass=True)
    terms = loss.band_losses(pred, target)
    assert len(terms) == 4
    for j, term in enumerate(terms):
        (grad,) = torch.autograd.grad(term, pred, retain_graph=True)
        assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0, f"level {j}"


def test_pyramid_loss_is_zero_for_identical_inputs():
    x = torch.rand(2, 1, 16, 16)
    assert float(PyramidalTexturalLoss()(x, x.clone())) == 0.0


# --- histogram loss ----------------------------------------------------------------------------------


def test_soft_histogram_sums_to_one_also_for_values_out_of_range():
    x = torch.cat([torch.rand(2, 1, 500), torch.tensor([-0.3, 1.4, 0.0, 1.0]).expand(2, 1, 4)], dim=-1)
    hist = soft_histogram(x, bins=32)
    assert hist.shape == (2, 1, 32)
    assert (hist >= 0).all()
    torch.testing.assert_close(hist.sum(-1), torch.ones(2, 1))


def test_soft_histogram_matches_a_hard_histogram_for_a_narrow_bandwidth():
    x = torch.rand(1, 1, 4000)
    soft = soft_histogram(x, bins=10, bandwidth=1e-4)[0, 0]
    hard = torch.histc(x, bins=10, min=0, max=1) / x.numel()
    torch.testing.assert_close(soft, hard, atol=2e-3, rtol=0)


def test_histogram_loss_zero_for_identical_inputs_and_grows_with_shift():
    loss = HistogramLoss(bins=64)
    x = torch.rand(2, 1, 32, 32) * 0.2 + 0.2
    assert float(loss(x, x.clone())) == 0.0
    values = [float(loss(x + shift, x)) for shift in (0.02, 0.05, 0.1, 0.3)]
    assert all(v > 0 for v in values)
    assert values == sorted(values)


def test_histogram_loss_gradient_is_finite_and_nonzero():
    target = torch.rand(2, 1, 16, 16)
    pred = (torch.rand(2, 1, 16, 16) * 0.5).requires_grad_()
    HistogramLoss()(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad.abs().sum()) > 0


def test_histogram_loss_subsamples_large_inputs_reproducibly():
    loss = HistogramLoss(max_voxels=1000)
    pred, target = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    assert float(loss(pred, pred.clone())) == 0.0
    torch.manual_seed(3)
    first = float(loss(pred, target))
    torch.manual_seed(3)
    assert float(loss(pred, target)) == first
    exact = float(HistogramLoss(max_voxels=None)(pred, target))
    assert first == pytest.approx(exact, abs=0.01)


def test_log_cosh_is_accurate_and_stable():
    x = torch.linspace(-20, 20, 401, dtype=torch.float64)
    torch.testing.assert_close(log_cosh(x), torch.log(torch.cosh(x)))
    small = torch.tensor([1e-4, -0.05], dtype=torch.float32)
    torch.testing.assert_close(log_cosh(small), small**2 / 2, rtol=1e-3, atol=0)
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    value = log_cosh(big)
    value.sum().backward()
    torch.testing.assert_close(value.detach(), torch.full((2,), 1e4 - math.log(2)))
    torch.testing.assert_close(big.grad, torch.tensor([1.0, -1.0]))


# --- adversarial losses ------------------------------------------------------------------------------


def test_hinge_losses_on_known_logits():
    ones = torch.ones(2, 1, 4, 4)
    assert float(discriminator_hinge_loss([2 * ones], [-2 * ones])) == 0.0  # separated with margin
    assert float(discriminator_hinge_loss([0 * ones], [0 * ones])) == 2.0
    # mean over scales
    assert float(discriminator_hinge_loss([0 * ones, 2 * ones], [0 * ones, -2 * ones])) == 1.0
    assert float(generator_adversarial_loss([3 * ones, ones[..., :2, :2]])) == -2.0
    assert float(generator_adversarial_loss(3 * ones)) == -3.0


def test_discriminator_loss_trains_d_and_does_not_reach_the_denoiser():
    denoiser = EfficientUNetDenoiser(**TINY).train()
    disc = EfficientUNetDiscriminator(**TINY_D)
    noisy, clean = _pair((2, 1, 16, 16))
    denoised = denoiser(noisy)[0]
    discriminator_loss(disc, clean, denoised, noisy).backward()
    assert all(p.grad is None for p in denoiser.parameters())  # fake was detached
    assert _grad_norm(disc) > 0


# --- total loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("term", ["l1", "pyramid", "histogram", "adversarial"])
def test_every_term_reaches_the_denoiser(term):
    denoiser = EfficientUNetDenoiser(**TINY).train()
    disc = EfficientUNetDiscriminator(**TINY_D)
    weights = {f"lambda_{t}": float(t == term) for t in ("l1", "pyramid", "histogram", "adversarial")}
    criterion = ADLDenoiserLoss(**weights)
    noisy, clean = _pair((2, 1, 16, 16))
    total, terms = criterion(denoiser(noisy), clean, discriminator=disc, noisy=noisy)
    total.backward()
    assert terms[term] != 0.0
    # D judges the full-resolution output only, so the adversarial term skips the 1/2 and 1/4 heads
    parts = [denoiser] if term != "adversarial" else [denoiser.backbone, denoiser.enhancer, denoiser.heads[0]]
    grads = [p.grad for part in parts for p in part.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert _grad_norm(denoiser) > 0


def test_adversarial_term_changes_the_denoiser_gradients():
    denoiser = EfficientUNetDenoiser(**TINY).train()
    disc = EfficientUNetDiscriminator(**TINY_D).eval()  # fixed BN statistics: same D in both passes
    noisy, clean = _pair((2, 1, 16, 16))

    def grads(lambda_adversarial: float) -> torch.Tensor:
        denoiser.zero_grad()
        torch.manual_seed(1)  # same histogram subsampling and BN batch in both passes
        outputs = denoiser(noisy)
        criterion = ADLDenoiserLoss(lambda_adversarial=lambda_adversarial)
        total, _ = criterion(outputs, clean, discriminator=disc, noisy=noisy)
        total.backward()
        return torch.cat([p.grad.flatten() for p in denoiser.parameters()])

    without, with_adv = grads(0.0), grads(0.1)
    assert not torch.allclose(without, with_adv)


def test_precomputed_adversarial_term_is_weighted_and_reported():
    noisy, clean = _pair((2, 1, 16, 16))
    outputs = [clean, clean[..., ::2, ::2], clean[..., ::4, ::4]]
    criterion = ADLDenoiserLoss(lambda_adversarial=0.5)
    total, terms = criterion(outputs, clean, adversarial=torch.tensor(-2.0))
    assert terms["adversarial"] == -2.0
    assert float(total) == pytest.approx(terms["l1"] + terms["pyramid"] + terms["histogram"] - 1.0)
    assert set(terms) == {"l1", "pyramid", "histogram", "adversarial", "total"}
    assert all(isinstance(v, float) for v in terms.values())
    with pytest.raises(ValueError, match="not both"):
        criterion(outputs, clean, adversarial=torch.tensor(1.0), discriminator=torch.nn.Identity())


def test_targets_are_area_downsampled_to_each_scale():
    clean = torch.rand(1, 1, 16, 16)
    perfect = [clean, torch.nn.functional.avg_pool2d(clean, 2), torch.nn.functional.avg_pool2d(clean, 4)]
    total, terms = ADLDenoiserLoss()(perfect, clean)
    assert float(total) == pytest.approx(0.0, abs=1e-6)
    _, terms_single = ADLDenoiserLoss()(clean * 0.5, clean)  # a single tensor = full scale only
    assert terms_single["l1"] > 0


def test_tiny_denoiser_overfits_a_few_patches():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    clean = torch.stack([0.5 + 0.3 * torch.sin(2 * math.pi * (f * xx + (3 - f) * yy)) for f in range(4)])[:, None]
    noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
    denoiser = EfficientUNetDenoiser(**TINY).train()
    criterion = ADLDenoiserLoss()
    optimiser = torch.optim.Adam(denoiser.parameters(), lr=5e-3)
    history = []
    for _ in range(120):
        total, terms = criterion(denoiser(noisy), clean)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append(terms["total"])
    assert all(math.isfinite(v) for v in history)
    assert min(history[-10:]) < 0.5 * history[0], history[::10]
    denoiser.eval()
    with torch.no_grad():  # and it denoises these patches with its running BN statistics
        assert float((denoiser(noisy) - clean).abs().mean()) < 0.5 * float((noisy - clean).abs().mean())


def test_3d_training_step_with_discriminator():
    denoiser = EfficientUNetDenoiser(spatial_dims=3, **TINY).train()
    disc = EfficientUNetDiscriminator(spatial_dims=3, **TINY_D)
    noisy, clean = _pair((1, 1, 16, 16, 16))
    outputs = denoiser(noisy)
    d_loss = discriminator_loss(disc, clean, outputs[0], noisy)
    d_loss.backward()
    disc.zero_grad()
    total, terms = ADLDenoiserLoss(histogram_max_voxels=512)(outputs, clean, discriminator=disc, noisy=noisy)
    total.backward()
    assert all(math.isfinite(v) for v in terms.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in denoiser.parameters())
