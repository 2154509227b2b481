"""NNPACK's Winograd / FFT convolutions for float32 inference on CPUs without native bfloat16
(``lib.runtime.cpu_convolution``): the same function as the usual convolution, used only where it applies, and
what ``load_denoiser`` gives the 2D ADL network on such a CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import APP_DIR, SAMPLE_STUDIES
from lib.networks.blocks import _ImageInputConv2d
from lib.predict import denoise_array, load_denoiser
from lib.runtime.cpu_convolution import NNPACKConv2d, nnpack_available, use_nnpack_convolutions
from lib.runtime.precision import cpu_has_native_bf16

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not nnpack_available(), reason="this PyTorch build has no NNPACK for this CPU")]


@pytest.fixture
def nnpack_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Weight shapes of the NNPACK calls made while the test runs."""
    calls: list[tuple[int, ...]] = []
    real = torch._nnpack_spatial_convolution

    def counted(x, weight, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", counted)
    return calls


@pytest.mark.parametrize("kernel, bias", [(3, True), (5, False), (7, True)])
def test_nnpack_convolution_equals_the_usual_one_and_runs_only_for_inference(nnpack_calls, kernel, bias):
    torch.manual_seed(kernel)
    usual = nn.Conv2d(12, 10, kernel, padding=kernel // 2, bias=bias)
    fast = nn.Conv2d(12, 10, kernel, padding=kernel // 2, bias=bias)
    fast.load_state_dict(usual.state_dict())
    assert use_nnpack_convolutions(fast) == 1 and type(fast) is NNPACKConv2d
    assert fast.state_dict().keys() == usual.state_dict().keys()
    x = torch.randn(2, 12, 37, 50)
    with torch.inference_mode():
        expected, got = usual(x), fast(x)
    assert nnpack_calls == [(10, 12, kernel, kernel)]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # training (autograd on) and autocast take the usual convolution: gradients as before
    fast(x.requires_grad_()).square().mean().backward()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x)
    assert len(nnpack_calls) == 1 and fast.weight.grad is not None


def test_only_the_convolutions_nnpack_speeds_up_are_turned():
    network = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),  # turned
        nn.Conv2d(8, 8, 1),  # 1 x 1: faster in oneDNN
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # strided
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),  # dilated
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # grouped
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        _ImageInputConv2d(1, 8, 7, padding=3),  # its own forward (float32 under autocast)
        nn.Conv2d(8, 8, 7, padding=3),  # turned
    )
    assert use_nnpack_convolutions(network) == 2
    assert [type(m) is NNPACKConv2d for m in network] == [True] + [False] * 6 + [True]


def test_an_input_nnpack_declines_gets_the_usual_convolution():
    conv = nn.Conv2d(3, 4, 7, padding=0)
    usual = conv(torch.randn(1, 3, 9, 9)).shape
    use_nnpack_convolutions(conv)
    with torch.inference_mode():
        out = conv(torch.randn(1, 3, 9, 9))
        assert out.shape == usual
        with pytest.raises(RuntimeError):  # and a wrong input still fails, as with the usual convolution
            conv(torch.randn(1, 2, 9, 9))


def test_load_denoiser_uses_nnpack_where_the_cpu_has_no_native_bfloat16(nnpack_calls):
    """On a CPU without native bfloat16 the shipped 2D ADL network runs in float32 through NNPACK (NCHW weights), and
    its output on a real quarter-dose CT slice is oneDNN's within a hundredth of a HU; with native bfloat16 it keeps
    channels-last weights and oneDNN."""
    import SimpleITK as sitk

    loaded = load_denoiser(APP_DIR / "model" / "pretrained_adl_ct.pt")
    turned = [m for m in loaded.network.modules() if type(m) is NNPACKConv2d]
    if cpu_has_native_bf16():
        assert not turned
        wide = next(m for m in loaded.network.modules() if type(m) is nn.Conv2d and m.kernel_size[0] > 1)
        assert wide.weight.is_contiguous(memory_format=torch.channels_last)
        return
    assert len(turned) >= 10
    head = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz")))
    image = head[0, 64:192, 64:192].astype(np.float32) if head.ndim == 3 else head[64:192, 64:192].astype(np.float32)
    fast = denoise_array(loaded, image, "CT", skip_air=False)
    assert len(nnpack_calls) == len(turned)  # one pass, every turned convolution through NNPACK
    for module in turned:
        module.__class__ = nn.Conv2d
    usual = denoise_array(loaded, image, "CT", skip_air=False)
    assert np.abs(fast - usual).max() < 0.01
    assert np.abs(fast - image).mean() > 1.0  # and it denoised


def test_nnpack_can_be_switched_off(monkeypatch):
    import lib.runtime.cpu_convolution as cpu_convolution

    monkeypatch.setenv("ADL_NNPACK_CONVOLUTIONS", "0")
    cpu_convolution.nnpack_available.cache_clear()
    try:
        conv = nn.Conv2d(3, 4, 3, padding=1)
        assert use_nnpack_convolutions(conv) == 0 and type(conv) is nn.Conv2d
    finally:
        cpu_convolution.nnpack_available.cache_clear()
