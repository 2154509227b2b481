"""The adversarial game of ADL's training engine reaches G (:func:`lib.engines.train_adl`).

Two regressions that the loss-level tests and the phase test in ``test_adl_training.py`` do not see, because the
logged ``g_adversarial`` stays non-zero under both:

- the fake sample that G's adversarial term hands to D is detached from G's graph (then that term is a constant for
  G and ``lambda_adversarial`` changes nothing);
- D is trained on the noisy input as its fake instead of G's output (the released code's mistake), in the
  discriminator warm-up or in the adversarial phase.

Both are checked on real (tiny) training runs on a real CT crop; the networks are watched with torch's global
forward hooks, the engine is not patched.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from lib.data import ADLPatchDataset, SyntheticNoiseSource
from lib.engines import ADLTrainingConfig, train_adl
from lib.networks import EfficientUNetDenoiser, EfficientUNetDiscriminator

TINY = dict(filters=(8, 12, 16, 20), disc_filters=(4, 8, 8, 8), enhancer_filters=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**overrides) -> ADLTrainingConfig:
    # amp off: float32 everywhere, so that tensors can be compared exactly; no validation, checkpoints or
    # batch-norm recalibration: only the training steps call the networks
    base = dict(modality="CT", batch_size=2, steps_g_warmup=1, steps_d_warmup=2, steps_adversarial=2,
                validation_every=0, checkpoint_every=0, bn_recalibration_batches=0, amp=False, device="cpu", seed=0,
                **TINY)
    base.update(overrides)
    return ADLTrainingConfig(**base)


@pytest.fixture(scope="module")
def ct_dataset(tmp_path_factory: pytest.TempPathFactory) -> ADLPatchDataset:
    """32 x 32 patches (Gaussian noise, 5-50 HU) of a 128 x 128 crop of pydicom-data's real CT slice."""
    import data_store

    image = sitk.ReadImage(str(Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"))
    image = image[128:256, 96:224, 0] if image.GetDimension() == 3 else image[128:256, 96:224]
    path = tmp_path_factory.mktemp("ct") / "head_crop.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(path))
    source = SyntheticNoiseSource([path], "CT", noise="gaussian", seed=0, progress=False)
    return ADLPatchDataset(source, spatial_dims=2, patch_size=32, samples_per_epoch=16, seed=0)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


class _Recorder:
    """Every call of ADL's G and D during a run, in order, through torch's global forward hook.

    ``calls`` holds ``("G", full-resolution output)`` and ``("D", candidates, condition, grad_enabled)`` entries;
    D's candidates are the concatenated batch ``[clean; fake]`` of :mod:`lib.losses.adversarial`.
    """

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        if isinstance(module, EfficientUNetDenoiser):
            full = output[0] if isinstance(output, (list, tuple)) else output
            self.calls.append(("G", full.detach().float().clone()))
        elif isinstance(module, EfficientUNetDiscriminator):
            candidates = args[0]
            condition = args[1] if len(args) > 1 else None
            self.calls.append(("D", candidates.detach().float().clone(),
                               None if condition is None else condition.detach().float().clone(),
                               candidates.requires_grad))

    def __enter__(self) -> "_Recorder":
        self.handle = torch.nn.modules.module.register_module_forward_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_the_adversarial_term_moves_the_denoiser(ct_dataset):
    """G after one adversarial step depends on lambda_adversarial: D's judgement of G(y) reaches G's gradients.

    Same seed, data and D update in both runs; only the weight of the adversarial term differs. With the fake
    detached from G's graph the term is a constant for G and both runs give G bit for bit equal."""
    kwargs = dict(steps_g_warmup=1, steps_d_warmup=1, steps_adversarial=1)
    without = train_adl(_config(lambda_adversarial=0.0, **kwargs), ct_dataset, progress=False)
    with_term = train_adl(_config(lambda_adversarial=1.0, **kwargs), ct_dataset, progress=False)
    assert without.history[-1]["phase"] == with_term.history[-1]["phase"] == "adversarial"
    # D's update comes first in the step and does not see lambda: D is the same in both runs
    assert _max_diff(without.discriminator, with_term.discriminator) == 0
    # an Adam step moves each weight by about lr (5e-5) in the direction of its gradient's sign
    assert _max_diff(without.generator, with_term.generator) > 1e-6
    # the logged term is D's score of the same G(y) in both runs (G and D equal up to then)
    assert with_term.history[-1]["g_adversarial"] == pytest.approx(without.history[-1]["g_adversarial"])


def test_the_discriminator_judges_the_denoisers_output_not_the_noisy_input(ct_dataset):
    """In the discriminator warm-up and in both updates of the adversarial phase, D's fake half is G's output of
    that step (never the noisy input), and only in G's update does it carry G's graph."""
    config = _config()
    batch = config.batch_size
    with _Recorder() as recorder:
        result = train_adl(config, ct_dataset, progress=False)
    assert [h["phase"] for h in result.history] == ["g_warmup"] + ["d_warmup"] * 2 + ["adversarial"] * 2
    kinds = "".join(call[0] for call in recorder.calls)
    # g_warmup: G; d_warmup: G then D, twice; adversarial: G, D (D's update), D (G's update), twice
    assert kinds == "G" + "GD" * 2 + "GDD" * 2, kinds

    last_g: torch.Tensor | None = None
    d_calls = []
    for call in recorder.calls:
        if call[0] == "G":
            last_g = call[1]
            continue
        _, candidates, condition, needs_grad = call
        assert candidates.shape[0] == 2 * batch and condition is not None
        clean, fake = candidates[:batch], candidates[batch:]
        noisy = condition[:batch]
        # the fake is G(y) of this step, exactly; not the noisy input it was made from, not the clean target
        assert last_g is not None and fake.shape == last_g.shape
        assert torch.equal(fake, last_g)
        assert not torch.equal(fake, noisy) and not torch.equal(fake, clean)
        # the condition is the noisy input for both halves
        assert torch.equal(condition[batch:], noisy)
        d_calls.append(needs_grad)
    # d_warmup (x2): G(y) without G's graph; adversarial (x2): D's update detached, G's update through G's graph
    assert d_calls == [False, False, False, True, False, True]
