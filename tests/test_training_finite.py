"""The tiny 3D ADL training ends with finite, reproducible weights, whatever the process ran before.

Cause of the NaN weights of issue 20 ("3D"): under CPU bfloat16 autocast, oneDNN's weight gradient of a 3D
convolution whose input is narrower than its kernel (the 3x3x3 convolutions of the 1/8 bridge on 16^3 patches
see 2^3 voxels) reads, and writes, memory outside its buffers (PyTorch 2.13). The gradient held whatever the heap
held, so it depended on what the process had run and freed before: sometimes NaN, which Adam wrote into the
weights and batch-norm recalibration into the running statistics, with every loss finite. Such convolutions now
run in float32 (:class:`lib.networks.blocks._NarrowInputSafeConv3d`).

These tests fill freed heap memory with NaN before the computations (allocating NaN tensors and freeing them,
so that the allocator hands those chunks out again), which turns any read of uninitialised memory into a NaN
instead of leaving it to chance. Before the fix both went red: NaN weight gradients in nearly every trial, and
NaN weights (or runs differing from each other) in the training sequence.
"""
from __future__ import annotations

import pytest
import torch

MR_VOLUME = "mr_head_colin27.nii.gz"


def poison_freed_heap() -> None:
    """Allocate and free NaN-filled float32 tensors of 64 B .. 512 KiB (below glibc's mmap threshold, so their
    chunks return to the heap and are handed out again): later uninitialised reads then see NaN."""
    chunks = [torch.full((size // 4,), float("nan")) for size in (64 * 2**k for k in range(14)) for _ in range(3)]
    del chunks


def test_3d_block_convolution_weight_gradient_under_bf16_autocast_is_finite_and_right_on_a_narrow_input():
    """The block convolution of the 3D bridge (16 -> 20 channels, 3x3x3) on a 2^3 input, channels-last as the
    trainer keeps it: under bfloat16 autocast its weight gradient is finite and close to float32's, trial after
    trial with NaN left in the freed heap."""
    from lib.networks.blocks import _conv

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        conv = _conv(3, 16, 20, 3).to(memory_format=torch.channels_last_3d)
        x = torch.randn(2, 16, 2, 2, 2).contiguous(memory_format=torch.channels_last_3d)
        upstream = torch.randn(2, 20, 2, 2, 2).contiguous(memory_format=torch.channels_last_3d)
        conv(x).backward(upstream)
        reference = conv.weight.grad.clone()  # float32
        for trial in range(8):
            conv.weight.grad = None
            poison_freed_heap()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = conv(x)
            poison_freed_heap()
            y.backward(upstream.to(y.dtype))
            grad = conv.weight.grad
            assert torch.isfinite(grad).all(), f"trial {trial}: non-finite weight gradient"
            error = float((grad - reference).abs().max() / reference.abs().max())
            assert error < 0.05, f"trial {trial}: weight gradient off by {error:.3g} of its maximum"
    finally:
        torch.set_num_threads(threads)


def train_tiny_3d(seed: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The recipe of tests/test_adl_3d_serving.py::make_tiny_3d_weights: 5 warm-up steps of the tiny 3D network
    on 16^3 patches of the sample MR volume, batch 2, lr 1e-3, CPU (with batch-norm recalibration at the end).
    Returns G's state dict and the per-step total losses."""
    from conftest import SAMPLE_STUDIES
    from lib.data import ADLPatchDataset, SyntheticNoiseSource
    from lib.engines import ADLTrainingConfig, train_adl
    from mlserver import TINY_ADL

    torch.manual_seed(seed)
    source = SyntheticNoiseSource([SAMPLE_STUDIES / MR_VOLUME], "MR", "rician", seed=0, progress=False)
    dataset = ADLPatchDataset(source, 3, 16, samples_per_epoch=16, seed=0)
    config = ADLTrainingConfig(modality="MR", spatial_dims=3, patch_size=16, batch_size=2, steps_g_warmup=5,
                               steps_d_warmup=0, steps_adversarial=0, lr_warmup=1e-3, device="cpu",
                               validation_every=0, checkpoint_every=0, **TINY_ADL)
    result = train_adl(config, dataset, progress=False)
    return result.generator.state_dict(), [h["g_total"] for h in result.history]


def test_tiny_3d_trainings_in_one_process_end_finite_and_identical():
    """Six runs of the serving tests' 3D recipe, one after another in this process (the sequence that gave NaN
    weights for seeds 1 and 3), NaN left in the freed heap before each: every state tensor (weights, batch-norm
    statistics) is finite, and every run equals the first (the trainer seeds itself from its config, so an
    earlier run's leftovers must not change anything)."""
    from lib.weights import non_finite_tensors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first_state, first_losses = None, None
        for seed in range(6):
            poison_freed_heap()
            state, losses = train_tiny_3d(seed)
            broken = non_finite_tensors(state)
            assert not broken, f"run {seed}: non-finite {len(broken)} tensors, e.g. {broken[:4]}; losses {losses}"
            if first_state is None:
                first_state, first_losses = state, losses
                continue
            assert losses == first_losses, f"run {seed}: losses {losses} differ from the first run's {first_losses}"
            differing = [k for k, v in state.items() if not torch.equal(v, first_state[k])]
            assert not differing, f"run {seed}: {len(differing)} tensors differ from the first run's: {differing[:4]}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(2, 8, 8), (4, 4, 4)])
def test_narrow_input_rule_names_the_axes_shorter_than_the_kernel(shape):
    from lib.networks.blocks import _conv, narrower_than_kernel

    conv = _conv(3, 4, 4, 3)
    assert narrower_than_kernel(conv, torch.zeros(1, 4, *shape)) == (min(shape) < 3)
    assert not narrower_than_kernel(_conv(3, 4, 4, 1), torch.zeros(1, 4, 1, 1, 1))
