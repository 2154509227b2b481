"""ADL training and inference plumbing: data sources, patches, the three phases, checkpoints and resume,
weight export, sliding-window inference, the `train` / `denoise --model adl` command line, and the training
engine under torchrun (ADL and TDDL-GCN).

Everything runs on tiny networks (filters 8-20) and 32-pixel patches on real files in tmp_path.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

import processes
from conftest import APP_DIR, SAMPLE_STUDIES, import_cli

from lib.data import ADLPatchDataset, PairedFolderSource, SyntheticNoiseSource, ValidationPair, discover_images
from lib.predict import LoadedDenoiser, denoise_array, load_denoiser
from lib.networks import EfficientUNetDenoiser, pad_to_multiple
from lib.engines import ADLTrainingConfig, build_networks, load_adl_checkpoint, load_gcn_checkpoint, train_adl
from lib.weights import export_weights
from lib.runtime.cpu_convolution import NNPACKConv2d, nnpack_available
from lib.runtime.precision import cpu_has_native_bf16
from lib.weights.format import RESTORATION_KEY, restoration_of

CLI = APP_DIR / "cli.py"
TINY = dict(filters=(8, 12, 16, 20), disc_filters=(4, 8, 8, 8), enhancer_filters=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> ADLTrainingConfig:
    base = dict(modality="CT", batch_size=2, steps_g_warmup=2, steps_d_warmup=2, steps_adversarial=2,
                validation_every=0, checkpoint_every=0, device="cpu", seed=0, **TINY)
    base.update(overrides)
    return ADLTrainingConfig(**base)


def write_nifti(array: np.ndarray, path: Path, spacing=None) -> Path:
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def ct_crop(tmp_path_factory) -> Path:
    """128x128 crop (top of the head: skull, brain and air) of the real pydicom-data CT slice, as NIfTI."""
    import data_store

    dicom = Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"
    image = sitk.ReadImage(str(dicom))
    image = image[128:256, 96:224, 0] if image.GetDimension() == 3 else image[128:256, 96:224]
    path = tmp_path_factory.mktemp("ct") / "head_crop.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(path))
    return path


@pytest.fixture(scope="module")
def ct_source(ct_crop) -> SyntheticNoiseSource:
    return SyntheticNoiseSource([ct_crop], "CT", noise="gaussian", seed=0, progress=False)


@pytest.fixture(scope="module")
def ct_dataset(ct_source) -> ADLPatchDataset:
    return ADLPatchDataset(ct_source, spatial_dims=2, patch_size=32, samples_per_epoch=16, seed=0)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


# ----------------------------------------------------------------------------------------------- data
def test_patch_dataset_samples_are_normalised_deterministic_and_not_air(ct_dataset, ct_source):
    sample = ct_dataset[3]
    assert set(sample) == {"noisy", "clean"}
    for value in sample.values():
        assert value.shape == (1, 32, 32) and value.dtype == torch.float32
        assert float(value.min()) >= 0.0 and float(value.max()) <= 1.0
    again = ct_dataset[3]
    assert torch.equal(sample["noisy"], again["noisy"]) and torch.equal(sample["clean"], again["clean"])
    assert not torch.equal(ct_dataset[4]["clean"], sample["clean"])
    # CT scaling is the fixed HU range: -800 HU (the foreground limit) -> (1024 - 800) / 4096
    threshold = (1024.0 - 800.0) / 4096.0
    fractions = [float((ct_dataset[i]["clean"] > threshold).float().mean()) for i in range(12)]
    assert min(fractions) >= ct_dataset.min_foreground
    # Gaussian noise in HU (5-50 HU): the noisy patch differs from the clean one by that order
    diff_hu = (sample["noisy"] - sample["clean"]).std() * 4096
    assert 2.0 < float(diff_hu) < 80.0


def test_patch_dataset_3d_mr_rician(tmp_path):
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 40, 40), np.float32)
    volume[2:18, 5:35, 5:35] = 400 + 50 * rng.random((16, 30, 30))
    path = write_nifti(volume, tmp_path / "mr_vol.nii.gz", spacing=(1.0, 1.0, 1.5))
    source = SyntheticNoiseSource([path], "MR", spatial_dims=3, seed=1, progress=False)
    assert source.noise == "rician"
    dataset = ADLPatchDataset(source, spatial_dims=3, patch_size=(16, 24, 24), samples_per_epoch=4, seed=0)
    sample = dataset[0]
    assert sample["noisy"].shape == (1, 16, 24, 24) == sample["clean"].shape
    # Rician noise raises the background floor; clean background stays 0
    background = sample["clean"] == 0
    if background.any():
        assert float(sample["noisy"][background].mean()) > 0
    with pytest.raises(ValueError, match="multiples of 8"):
        ADLPatchDataset(source, spatial_dims=3, patch_size=12)


def test_paired_folder_source_matches_by_stem_and_reports_problems(tmp_path, ct_crop):
    clean = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_crop))).astype(np.float32)
    noisy = clean + np.random.default_rng(0).normal(0, 20, clean.shape).astype(np.float32)
    (tmp_path / "noisy").mkdir()
    (tmp_path / "clean").mkdir()
    write_nifti(noisy, tmp_path / "noisy" / "case1.nii.gz")
    write_nifti(clean, tmp_path / "clean" / "case1.nrrd")  # another format, same stem
    source = PairedFolderSource(tmp_path / "noisy", tmp_path / "clean", modality="CT")
    assert [name for name, _, _ in source.pairs] == ["case1"]
    dataset = ADLPatchDataset(source, spatial_dims=2, patch_size=32, seed=0)
    sample = dataset[0]
    # one scaling for both (fixed HU range): the difference is the added noise, not a rescaling
    assert abs(float((sample["noisy"] - sample["clean"]).mean()) * 4096) < 10
    assert 10 < float((sample["noisy"] - sample["clean"]).std()) * 4096 < 30
    pairs = source.validation_pairs()
    assert isinstance(pairs[0], ValidationPair) and pairs[0].clean.shape == clean.shape

    write_nifti(clean, tmp_path / "noisy" / "case2.nii.gz")
    write_nifti(clean, tmp_path / "clean" / "case3.nii.gz")
    with pytest.raises(ValueError, match=r"noisy only: case2; clean only: case3"):
        PairedFolderSource(tmp_path / "noisy", tmp_path / "clean", modality="CT")
    os.remove(tmp_path / "noisy" / "case2.nii.gz")
    os.remove(tmp_path / "clean" / "case3.nii.gz")
    write_nifti(clean[:64], tmp_path / "noisy" / "case4.nii.gz")
    write_nifti(clean, tmp_path / "clean" / "case4.nii.gz")
    with pytest.raises(ValueError, match="case4.*shape"):
        PairedFolderSource(tmp_path / "noisy", tmp_path / "clean", modality="CT")


def test_low_dose_ct_pool_is_cached_and_reused(tmp_path, ct_crop):
    cache = tmp_path / "cache"
    kwargs = dict(noise="ct-lowdose", realisations=2, cache_dir=cache, seed=5, progress=False,
                  ct_settings={"n_views_range": (180, 240)})
    first = SyntheticNoiseSource([ct_crop], "CT", **kwargs)
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 2  # one 2D slice x 2 realisations
    pool = first.noisy_volume(0, 0), first.noisy_volume(0, 1)
    assert not np.array_equal(pool[0], pool[1])  # independent settings and noise per realisation
    assert np.abs(pool[0] - first.volumes[0].clean).std() > 1.0  # HU of added noise
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = SyntheticNoiseSource([ct_crop], "CT", **kwargs)
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.npy"))] == mtimes  # read, not rewritten
    assert np.array_equal(second.noisy_volume(0, 1), pool[1])
    other_seed = SyntheticNoiseSource([ct_crop], "CT", **{**kwargs, "seed": 6})
    assert not np.array_equal(other_seed.noisy_volume(0, 0), pool[0])
    assert len(list(cache.glob("*.npy"))) == 4
    sample = ADLPatchDataset(first, patch_size=32, seed=0)[0]
    assert sample["noisy"].shape == (1, 32, 32)
    (pair,) = first.validation_pairs()  # a fixed realisation of the whole (single-slice) image
    assert pair.noisy.shape == pair.clean.shape == (128, 128) and not np.array_equal(pair.noisy, pair.clean)
    assert np.array_equal(first.validation_pairs()[0].noisy, pair.noisy)


def test_heldout_and_missing_inputs_are_refused(tmp_path, ct_crop):
    heldout = tmp_path / "ct_abdomen_siemens_j2k_slab"
    heldout.mkdir()
    shutil.copy(ct_crop, heldout / "slice.nii.gz")
    with pytest.raises(ValueError, match="held-out"):
        SyntheticNoiseSource([heldout], "CT", noise="gaussian", progress=False)
    mr = tmp_path / "mr_t1gd_brain_skullstripped.nii.gz"
    shutil.copy(ct_crop, mr)
    with pytest.raises(ValueError, match="held-out"):
        SyntheticNoiseSource([mr], "MR", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        discover_images([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no such file"):
        discover_images([tmp_path / "missing.nii.gz"])


# ----------------------------------------------------------------------------------------------- training
def test_phases_run_in_order_and_freeze_the_right_network(ct_dataset, tmp_path):
    ckpt = tmp_path / "ck"
    # (no batch-norm recalibration at the end of each leg: it would change G's statistics between the legs)
    base = dict(checkpoint_dir=str(ckpt), bn_recalibration_batches=0)
    # phase 1 only: G changes, D stays at its initialisation
    g_only = train_adl(tiny_config(steps_d_warmup=0, steps_adversarial=0, **base), ct_dataset, progress=False)
    torch.manual_seed(0)
    g_init, d_init = build_networks(tiny_config())
    assert _max_diff(g_only.generator, g_init) > 0
    assert _max_diff(g_only.discriminator, d_init) == 0
    # + discriminator warm-up: D changes, G (parameters AND batch-norm statistics) frozen
    d_warm = train_adl(tiny_config(steps_adversarial=0, **base), ct_dataset, resume=ckpt, progress=False)
    assert _max_diff(d_warm.generator, g_only.generator) == 0
    assert _max_diff(d_warm.discriminator, g_only.discriminator) > 0
    # + adversarial: both change
    full = train_adl(tiny_config(**base), ct_dataset, resume=ckpt, progress=False)
    assert _max_diff(full.generator, d_warm.generator) > 0
    assert _max_diff(full.discriminator, d_warm.discriminator) > 0

    phases = [h["phase"] for h in full.history]
    assert phases == ["g_warmup"] * 2 + ["d_warmup"] * 2 + ["adversarial"] * 2
    assert [h["step"] for h in full.history] == [1, 2, 3, 4, 5, 6]
    assert all("d_loss" not in h for h in full.history[:2]) and all("g_total" not in h for h in full.history[2:4])
    assert all(h["g_adversarial"] != 0 for h in full.history[4:])  # the adversarial term reaches G
    assert full.history[0]["lr_g"] == pytest.approx(1e-4) and full.history[2]["lr_d"] == pytest.approx(1e-4)
    assert full.history[4]["lr_g"] == pytest.approx(5e-5) and full.history[4]["lr_d"] == pytest.approx(5e-5)


def test_resume_continues_exactly(ct_dataset, tmp_path):
    config = dict(steps_g_warmup=2, steps_d_warmup=2, steps_adversarial=2, lr_step_size=1, lr_gamma=0.9)
    straight = train_adl(tiny_config(**config, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=3,
                                     keep_all_checkpoints=True), ct_dataset, progress=False)
    mid = load_adl_checkpoint(tmp_path / "a" / "step_0000003.pt")
    assert mid["step"] == 3 and mid["phase"] == "d_warmup"
    assert mid["schedulers"]["phase"] == "d_warmup" and mid["schedulers"]["D"]["last_epoch"] == 1
    assert {"generator", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d", "rng"} <= set(mid)

    resumed = train_adl(tiny_config(**config, checkpoint_dir=str(tmp_path / "b")), ct_dataset,
                        resume=tmp_path / "a" / "step_0000003.pt", progress=False)
    assert resumed.step == 6 and resumed.phase == "adversarial"
    # CPU, fixed seeds, data addressed by global sample id: bit-identical continuation
    assert _max_diff(straight.generator, resumed.generator) == 0
    assert _max_diff(straight.discriminator, resumed.discriminator) == 0
    keys = ("step", "phase", "lr_g", "lr_d", "g_total", "d_loss")
    assert [{k: h.get(k) for k in keys} for h in straight.history] == [{k: h.get(k) for k in keys} for h in resumed.history]
    assert (tmp_path / "b" / "last.pt").is_file()

    with pytest.raises(ValueError, match="other networks"):
        train_adl(tiny_config(**{**config, "filters": (8, 12, 16, 24)}), ct_dataset, resume=tmp_path / "a",
                  progress=False)


def test_batch_norm_recalibration_gives_the_plain_average_of_the_batch_statistics():
    from lib.engines.batch_norm import recalibrate_batch_norm

    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1),
                            nn.BatchNorm2d(2))
    network[1].running_mean.fill_(7.0)  # stale statistics, as a training run leaves them
    network[4].running_var.fill_(9.0)
    network.eval()
    weights = {k: v.clone() for k, v in network.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = [torch.randn(2, 1, 8, 8) * (1 + i) + i for i in range(5)]

    assert recalibrate_batch_norm(network, iter(batches)) == 5
    # the expected statistics: each layer's input batch by batch (layer 1 normalises by the batch's own statistics)
    with torch.no_grad():
        firsts = [network[0](x) for x in batches]
        seconds = [network[3](torch.relu((f - f.mean((0, 2, 3), keepdim=True)) /
                                         torch.sqrt(f.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
                                         * network[1].weight[None, :, None, None]
                                         + network[1].bias[None, :, None, None])) for f in firsts]
    for layer, inputs in ((network[1], firsts), (network[4], seconds)):
        mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-4, atol=1e-5)
        assert layer.momentum == 0.1  # the training momentum is back
    assert not network.training  # left in the mode it was in
    for key, value in weights.items():
        assert torch.equal(network.state_dict()[key], value)  # no weight touched
    before = {k: v.clone() for k, v in network.state_dict().items()}
    assert recalibrate_batch_norm(network, iter([])) == 0  # nothing seen: the statistics stay as they were
    assert all(torch.equal(network.state_dict()[k], v) for k, v in before.items())


def test_training_ends_with_recalibrated_batch_norm_statistics_and_validates_them(ct_dataset, ct_source, tmp_path):
    from lib.engines import DistributedContext, dataset_batches
    from lib.engines.batch_norm import batch_norm_layers, recalibrate_batch_norm

    pairs = ct_source.validation_pairs()
    common = dict(steps_d_warmup=0, steps_adversarial=2, validation_every=1, amp=False)  # float32: exact comparison
    plain = train_adl(tiny_config(**common, bn_recalibration_batches=0), ct_dataset, val_pairs=pairs, progress=False)
    config = tiny_config(**common, bn_recalibration_batches=3, checkpoint_dir=str(tmp_path))
    tuned = train_adl(config, ct_dataset, val_pairs=pairs, progress=False)
    # the same weights; the statistics are those of the three batches after the last step, not the moving averages
    params = lambda net: {k: v for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}  # noqa: E731
    assert all(torch.equal(v, params(tuned.generator)[k]) for k, v in params(plain.generator).items())
    moving_average = batch_norm_layers(plain.generator)[0].running_mean.clone()
    expected = plain.generator  # recalibrated here by hand
    extra = dataset_batches(ct_dataset, config, config.total_steps, config.total_steps + 3, DistributedContext(),
                            False)
    assert recalibrate_batch_norm(expected, (b["noisy"] for _, b in extra)) == 3
    for got, want in zip(batch_norm_layers(tuned.generator), batch_norm_layers(expected)):
        torch.testing.assert_close(got.running_mean, want.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.running_var, want.running_var, rtol=1e-4, atol=1e-5)
    assert float((batch_norm_layers(tuned.generator)[0].running_mean - moving_average).abs().max()) > 1e-4
    # the final validation is the recalibrated network's (the earlier ones match), and the checkpoint holds it
    steps = [v["step"] for v in tuned.validation]
    assert steps == [1, 2, 3, 4] == [v["step"] for v in plain.validation]
    assert tuned.validation[:3] == plain.validation[:3] and tuned.validation[-1] != plain.validation[-1]
    checkpoint = load_adl_checkpoint(tmp_path)
    assert checkpoint["validation"][-1]["psnr"] == pytest.approx(tuned.validation[-1]["psnr"])
    assert all(torch.equal(v, checkpoint["generator"][k]) for k, v in tuned.generator.state_dict().items()
               if k.endswith(("running_mean", "running_var")))
    with pytest.raises(ValueError, match="bn_recalibration_batches"):
        tiny_config(bn_recalibration_batches=-1)


def test_validation_is_recorded_in_result_and_checkpoint(ct_dataset, ct_source, tmp_path):
    pairs = ct_source.validation_pairs()
    result = train_adl(tiny_config(steps_d_warmup=0, steps_adversarial=1, validation_every=2,
                                   checkpoint_dir=str(tmp_path)), ct_dataset, val_pairs=pairs, progress=False)
    assert [v["step"] for v in result.validation] == [2, 3]
    assert np.isfinite(result.validation[-1]["psnr"]) and result.best_psnr == max(v["psnr"] for v in result.validation)
    assert result.validation[-1]["images"]["head_crop"]["window"] == [-160.0, 240.0]
    assert load_adl_checkpoint(tmp_path)["validation"][-1]["psnr"] == pytest.approx(result.validation[-1]["psnr"])


@pytest.mark.slow
def test_3d_training_validation_and_inference(tmp_path):
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 40, 40), np.float32)
    volume[2:18, 5:35, 5:35] = 400 + 50 * rng.random((16, 30, 30))
    path = write_nifti(volume, tmp_path / "mr.nii.gz")
    source = SyntheticNoiseSource([path], "MR", spatial_dims=3, seed=0, progress=False)
    dataset = ADLPatchDataset(source, spatial_dims=3, patch_size=16, samples_per_epoch=4, seed=0)
    config = tiny_config(modality="MR", spatial_dims=3, steps_g_warmup=1, steps_d_warmup=1, steps_adversarial=1,
                         num_workers=1)
    result = train_adl(config, dataset, val_pairs=source.validation_pairs(), progress=False)
    assert [h["phase"] for h in result.history] == ["g_warmup", "d_warmup", "adversarial"]
    window = result.validation[-1]["images"]["mr"]["window"]
    assert window[0] == 0.0 and window[1] == pytest.approx(float(volume.max()))  # MR window 0 .. max
    weights = export_weights(result.generator, tmp_path / "w3d.pt", config)
    model = load_denoiser(weights)
    assert model.spatial_dims == 3 and model.modality == "MR"
    expected = denoise_array(model, volume, roi_size=16, overlap=0.25)
    assert expected.shape == volume.shape and np.isfinite(expected).all()
    # the command line's 3D model: the same result from a file; a 2D weight file is refused for it
    out = tmp_path / "mr_adl_3d.nii.gz"
    done = run_cli("denoise", "--model", "adl_3d", "--weights", weights, "--input", path, "--output", out,
                   "--modality", "mr", "--roi-size", "16")
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), expected, rtol=1e-4,
                               atol=1e-3 * float(np.abs(expected).max()))
    config_2d = tiny_config(modality="MR", steps_d_warmup=0, steps_adversarial=0)
    flat = export_weights(build_networks(config_2d)[0], tmp_path / "w2d.pt", config_2d)
    refused = run_cli("denoise", "--model", "adl_3d", "--weights", flat, "--input", path, "--output",
                      tmp_path / "never.nii.gz", "--modality", "mr")
    assert refused.returncode == 2 and "2D network: use --model adl" in refused.stderr
    assert not (tmp_path / "never.nii.gz").exists()


# ----------------------------------------------------------------------------------------------- export / load
def test_2p5d_network_starts_as_the_2d_one_and_learns_from_the_neighbouring_slices(tmp_path):
    """--slices 3: adjacent slices as input channels. A 2D weight file starts it as exactly the 2D network (the
    neighbours' input weights start at zero); training then uses the neighbours; inference feeds the stacks."""
    from conftest import SAMPLE_STUDIES
    from lib.weights import load_initial_weights

    slab = sitk.ReadImage(str(SAMPLE_STUDIES / "ct_head_invesalius.nii.gz"))[96:160, 96:160, 40:46]
    path = tmp_path / "slab.nii.gz"
    sitk.WriteImage(slab, str(path))
    source = SyntheticNoiseSource([path], "CT", noise="gaussian", noise_level_range=(20, 40), seed=0, progress=False)
    single = train_adl(tiny_config(steps_d_warmup=0, steps_adversarial=0),
                       ADLPatchDataset(source, 2, 32, samples_per_epoch=16, seed=0), progress=False)
    weights_2d = export_weights(single.generator, tmp_path / "w2d.pt", single.config, half=False)
    noisy = sitk.GetArrayFromImage(slab).astype(np.float32) + np.random.default_rng(1).normal(0, 30, (6, 64, 64)).astype(
        np.float32)
    out_2d = denoise_array(load_denoiser(weights_2d), noisy, "CT", amp=False)

    config = tiny_config(slices=3, steps_g_warmup=15, lr_warmup=3e-3)  # enough to move off the 2D network
    assert config.generator_kwargs()["in_channels"] == 3 and config.generator_kwargs()["slice_context"] == 1
    inflated, _ = build_networks(config)
    load_initial_weights(inflated, weights_2d)
    assert inflated.backbone.enc0.conv1.weight.shape[1] == 3
    np.testing.assert_allclose(denoise_array(inflated, noisy, "CT", amp=False), out_2d, atol=1e-3)

    stacks = ADLPatchDataset(source, 2, 32, samples_per_epoch=16, seed=0, slice_context=1)
    assert stacks[0]["noisy"].shape == (3, 32, 32)
    result = train_adl(config, stacks, progress=False, initial_weights=weights_2d)  # all three phases
    assert result.step == config.total_steps
    loaded = load_denoiser(export_weights(result.generator, tmp_path / "w25d.pt", config, half=False,
                                          low_frequency_restoration={"sigma_px": 1.2, "chosen": "test"}))
    assert loaded.network.slice_context == 1 and loaded.spatial_dims == 2
    out = denoise_array(loaded, noisy, "CT", amp=False)
    assert out.shape == noisy.shape and np.isfinite(out).all()
    assert float(np.abs(out - out_2d).mean()) > 0.01  # trained on: no longer the 2D network
    # training moved the neighbours' input weights off zero, and inference feeds slice z with z - 1 and z + 1
    assert float(loaded.network.backbone.enc0.conv1.weight.detach()[:, [0, 2]].abs().max()) > 1e-4
    from lib.data import intensity_scaling_for

    network = loaded.network
    with torch.no_grad():  # make the neighbours count as much as the centre, so that a wrong stack would show
        for conv in (network.backbone.enc0.conv1, network.backbone.enc0.shortcut, *network.enhancer.branches):
            conv.weight[:, 0] = conv.weight[:, 2] = conv.weight[:, 1]
    out = denoise_array(loaded, noisy, "CT", amp=False)
    scaling = intensity_scaling_for(noisy, "CT")

    def manual(slices: list[int]) -> np.ndarray:
        with torch.no_grad():
            stack = torch.from_numpy(scaling.normalise(noisy[slices]))[None]
            return scaling.denormalise(network(stack)[0, 0].numpy())

    np.testing.assert_allclose(out[3], manual([2, 3, 4]), atol=1e-3)
    np.testing.assert_allclose(out[0], manual([0, 0, 1]), atol=1e-3)  # the end slice stands in for its missing one
    assert float(np.abs(manual([3, 3, 3]) - out[3]).max()) > 0.1
    assert denoise_array(loaded, noisy[3], "CT").shape == (64, 64)  # a single slice: itself as its neighbours

    # the app's fine-tuning keeps the 2.5D network and trains it on slice stacks
    from lib.engines.gated_fine_tuning import FineTuneSettings, fine_tune

    tuned = fine_tune(tmp_path / "w25d.pt", source, source.validation_pairs(), tmp_path / "tuned.pt",
                      FineTuneSettings(steps=4, patch_size=32, batch_size=2, device="cpu"))
    assert load_denoiser(tuned.candidate).network.slice_context == 1
    # served at its start file's restoration width (saying where it came from), or at the width measured on lesions
    # planted in its validation images where that gives more back
    served = load_denoiser(tuned.candidate).metadata[RESTORATION_KEY]
    assert served["inherited_from"].startswith("w25d.pt (sha256 ")
    measured = served["measured_on"]["sigma_px"]
    assert served["sigma_px"] == (1.2 if measured in (None, 0) else min(1.2, measured))

    with pytest.raises(ValueError, match="slice"):  # a single-slice dataset for a 3-slice network
        train_adl(config, ADLPatchDataset(source, 2, 32, samples_per_epoch=16, seed=0), progress=False)
    for bad in (dict(slices=2), dict(slices=3, spatial_dims=3)):
        with pytest.raises(ValueError, match="slices"):
            tiny_config(**bad)


def test_a_3_slice_network_starts_a_5_slice_one_as_itself(tmp_path):
    """--slices 5 fine-tuned from 3-slice weights: the kernels stay on the centre three channels, the outer two
    start at zero, so before any training the wider network gives exactly the narrower one's output."""
    from lib.weights import load_initial_weights

    torch.manual_seed(0)
    three = tiny_config(modality="MR", slices=3)
    narrow = build_networks(three)[0]
    with torch.no_grad():  # away from the residual identity, so that the channel placement shows
        for parameter in narrow.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    weights = export_weights(narrow, tmp_path / "w3.pt", three, half=False)
    wide = build_networks(tiny_config(modality="MR", slices=5))[0]
    load_initial_weights(wide, weights)
    conv = wide.backbone.enc0.conv1.weight.detach()
    assert conv.shape[1] == 5 and float(conv[:, [0, 4]].abs().max()) == 0.0
    torch.testing.assert_close(conv[:, 1:4], narrow.backbone.enc0.conv1.weight)
    volume = 300 + 100 * np.random.default_rng(0).random((7, 32, 40)).astype(np.float32)
    np.testing.assert_allclose(denoise_array(wide, volume, "MR", amp=False),
                               denoise_array(load_denoiser(weights), volume, "MR", amp=False), atol=1e-3)


def test_orthogonal_planes_average_the_axial_coronal_and_sagittal_passes():
    from lib.data import intensity_scaling_for

    torch.manual_seed(0)
    network = build_networks(tiny_config(modality="MR"))[0].eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    rng = np.random.default_rng(0)
    volume = (200 + 400 * rng.random((16, 24, 32))).astype(np.float32)
    scaling = intensity_scaling_for(volume, "MR")  # one scaling for the whole volume, every plane

    def slice_pass(image: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scaling.denormalise(network(torch.from_numpy(scaling.normalise(image))[None, None])[0, 0].numpy())

    axial = np.stack([slice_pass(volume[z]) for z in range(16)])
    coronal = np.stack([slice_pass(volume[:, y]) for y in range(24)], axis=1)
    sagittal = np.stack([slice_pass(volume[:, :, x]) for x in range(32)], axis=2)
    got = denoise_array(network, volume, "MR", amp=False, orthogonal_planes=True)
    assert got.shape == volume.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, (axial + coronal + sagittal) / 3, rtol=1e-4, atol=1e-2)
    assert float(np.abs(coronal - axial).mean()) > 0.1  # the planes really differ
    with pytest.raises(ValueError, match="volume"):
        denoise_array(network, volume[0], "MR", orthogonal_planes=True)
    with pytest.raises(ValueError, match="3D model"):
        denoise_array(build_networks(tiny_config(modality="MR", spatial_dims=3))[0], volume, "MR",
                      orthogonal_planes=True)


def test_the_app_averages_orthogonal_planes_only_for_2d_adl_on_near_isotropic_mr_volumes():
    from lib.predict import uses_orthogonal_planes
    from lib.networks import GCNDenoiser

    adl_2d = build_networks(tiny_config(modality="MR", slices=3))[0]
    adl_3d = build_networks(tiny_config(modality="MR", spatial_dims=3))[0]
    assert uses_orthogonal_planes(adl_2d, "MR", (40, 96, 96), (1.0, 1.0, 1.2))
    assert uses_orthogonal_planes(adl_2d, "mr", (32, 32, 32), (0.9, 0.9, 1.1))
    assert not uses_orthogonal_planes(adl_2d, "CT", (40, 96, 96), (1.0, 1.0, 1.0))  # CT: axial FBP texture
    assert not uses_orthogonal_planes(adl_2d, "MR", (40, 96, 96), (0.5, 0.5, 1.5))  # anisotropic voxels
    assert not uses_orthogonal_planes(adl_2d, "MR", (5, 96, 96), (1.0, 1.0, 1.0))  # a thin slab
    assert not uses_orthogonal_planes(adl_2d, "MR", (96, 96), (1.0, 1.0))  # a single slice
    assert not uses_orthogonal_planes(adl_2d, "MR", (40, 96, 96), None)  # spacing unknown
    assert not uses_orthogonal_planes(adl_3d, "MR", (40, 96, 96), (1.0, 1.0, 1.0))
    assert not uses_orthogonal_planes(GCNDenoiser(), "MR", (40, 96, 96), (1.0, 1.0, 1.0))


def test_export_and_load_round_trip(ct_dataset, tmp_path):
    result = train_adl(tiny_config(steps_d_warmup=0, steps_adversarial=0), ct_dataset, progress=False)
    config = result.config
    path16 = export_weights(result.generator, tmp_path / "w16.pt", config, None, result.training_record())
    path32 = export_weights(result.generator, tmp_path / "w32.pt", config, None, result.training_record(), half=False)
    assert path16.stat().st_size < 0.7 * path32.stat().st_size

    exact = load_denoiser(path32)
    half = load_denoiser(path16, device="cpu")
    assert isinstance(half, LoadedDenoiser) and half.modality == "CT" and half.spatial_dims == 2
    assert not half.network.training and half.metadata["training"]["steps"] == 2
    assert half.metadata["scaling_rule"]["range_hu"] == [-1024.0, 3072.0]
    reference = result.generator.state_dict()
    for name, value in exact.network.state_dict().items():
        assert torch.equal(value, reference[name]), name
    for name, value in half.network.state_dict().items():
        assert value.dtype == reference[name].dtype
        assert torch.allclose(value.double(), reference[name].double(), rtol=2e-3, atol=1e-4), name
    assert not any(k.startswith("heads.1.") for k in half.network.state_dict())  # training-only heads dropped
    fuse = half.network.enhancer.fuse
    if nnpack_available() and not cpu_has_native_bf16():  # float32 through NNPACK, which reads NCHW weights
        assert type(fuse) is NNPACKConv2d and fuse.weight.is_contiguous()
    else:  # 2D networks are loaded NHWC (faster oneDNN kernels)
        assert fuse.weight.is_contiguous(memory_format=torch.channels_last) and not fuse.weight.is_contiguous()

    image = np.random.default_rng(0).normal(40, 30, (40, 48)).astype(np.float32)
    out16, out32 = denoise_array(half, image), denoise_array(exact, image)
    assert np.abs(out16 - out32).max() < 2.0  # HU: fp16 weights change the output only slightly

    result_ckpt = train_adl(tiny_config(steps_d_warmup=0, steps_adversarial=0, checkpoint_dir=str(tmp_path / "ck")),
                            ct_dataset, progress=False)
    from_checkpoint = load_denoiser(tmp_path / "ck" / "last.pt")  # a training checkpoint loads too
    # the same network (the loaded one may take NNPACK's convolutions where the bare one takes oneDNN's)
    np.testing.assert_allclose(denoise_array(from_checkpoint, image), denoise_array(result_ckpt.generator, image, "CT"),
                               rtol=0, atol=0.01)
    # a weight file travels: its record names files, never the folders of the machine that trained it
    record = dict(result_ckpt.training_record(), data={"inputs": [{"input": "/data/DOE_JOHN/ct_low.nii.gz"},
                                                                    {"input": "C:\\scans\\DOE_JANE\\low.nii"}],
                                                         "kind": "ct-lowdose", "initial_weights": "adl_ct.pt"})
    portable = load_denoiser(export_weights(result_ckpt.generator, tmp_path / "w.pt", config, None, record))
    training = portable.metadata["training"]
    assert training["config"]["checkpoint_dir"] == "ck"
    assert [i["input"] for i in training["data"]["inputs"]] == ["ct_low.nii.gz", "low.nii"]
    assert training["data"]["kind"] == "ct-lowdose" and training["data"]["initial_weights"] == "adl_ct.pt"
    assert str(tmp_path) not in json.dumps(training) and "DOE_" not in json.dumps(training)

    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable ADL weight file"):
        load_denoiser(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_denoiser(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------- inference
def _whole_image(network: nn.Module, image: np.ndarray, modality: str) -> np.ndarray:
    from lib.data import intensity_scaling_for

    scaling = intensity_scaling_for(image, modality)
    x = torch.from_numpy(scaling.normalise(image))
    x = x[:, None] if network.spatial_dims == 2 else x[None, None]
    network.eval()
    with torch.no_grad():
        padded, crop = pad_to_multiple(x)
        y = network(padded)[crop]
    y = y[:, 0] if network.spatial_dims == 2 else y[0, 0]
    return scaling.denormalise(y.numpy())


@pytest.mark.parametrize("spatial_dims, shape", [(2, (3, 44, 52)), (3, (12, 20, 28))])
def test_sliding_window_equals_whole_image(spatial_dims, shape):
    torch.manual_seed(0)
    network = EfficientUNetDenoiser(spatial_dims=spatial_dims, filters=(8, 12, 16, 20), enhancer_filters=4)
    network.train()
    with torch.no_grad():  # give batch norm non-trivial running statistics
        network(torch.rand((2, 1) + (16,) * spatial_dims))
    image = np.random.default_rng(1).normal(50, 100, shape).astype(np.float32)
    expected = _whole_image(network, image, "CT")
    # the window covers the padded image: one window, same padding, constant blending
    result = denoise_array(network, image, "CT", roi_size=256, overlap=0.25, mode="constant")
    assert result.shape == image.shape and result.dtype == np.float32
    assert np.abs(result - expected).max() / 4096 < 1e-4
    if spatial_dims == 2:  # a single slice (H, W) gives the same as that slice of the stack
        single = denoise_array(network, image[1], "CT", roi_size=256, mode="constant")
        assert np.abs(single - expected[1]).max() / 4096 < 1e-4


class _Pointwise(nn.Module):
    """A per-pixel network: tiling must not change its output at all."""

    def __init__(self, spatial_dims: int):
        super().__init__()
        self.spatial_dims = spatial_dims
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(1, 1, 1)
        nn.init.constant_(self.conv.weight, 1.7)
        nn.init.constant_(self.conv.bias, -0.4)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


@pytest.mark.parametrize("spatial_dims, shape, roi", [(2, (2, 70, 90), 32), (3, (20, 36, 44), 16)])
def test_tiled_sliding_window_blends_without_seams(spatial_dims, shape, roi):
    network = _Pointwise(spatial_dims)
    image = np.random.default_rng(2).uniform(0, 800, shape).astype(np.float32)
    whole = _whole_image(network, image, "MR")
    for mode in ("gaussian", "constant"):
        tiled = denoise_array(network, image, "MR", roi_size=roi, overlap=0.5, sw_batch_size=3, mode=mode)
        assert np.abs(tiled - whole).max() / np.abs(whole).max() < 1e-4


@pytest.mark.parametrize("size", [(1024, 1024), (768, 640), (520, 1030), (2048, 600), (513, 9000)])
def test_even_windows_cover_a_large_slice_in_the_fewest_bounded_windows(size):
    """A slice larger than the 512-pixel window: the windows MONAI places with the returned sizes and overlaps are at
    most 512 pixels (memory bound), cover the slice, overlap by at least 128 pixels (0.25) and are the fewest that
    can (MONAI's own placement at 0.25 takes 3 x 3 of 512 for a 1024 slice: 2.25 times its pixels)."""
    import math

    from monai.data.utils import dense_patch_slices

    from lib.predict import even_windows

    roi, overlaps = even_windows((512, 512), size, 0.25)
    intervals = [r if r == n else int(r * (1 - o)) for r, n, o in zip(roi, size, overlaps)]
    windows = dense_patch_slices(size, roi, intervals)
    for axis, (r, n) in enumerate(zip(roi, size)):
        assert r <= 512 and r % 8 == 0 or r == n
        starts = sorted({w[axis].start for w in windows})
        assert starts[0] == 0 and starts[-1] + r == n  # covered, the last window flush with the end
        assert all(b - a <= r - 128 for a, b in zip(starts, starts[1:]))  # overlap >= 128 pixels
        assert len(starts) == (1 if n <= 512 else math.ceil((n - 128) / (512 - 128)))  # the fewest that can
    monai_default = math.prod(1 if n <= 512 else math.ceil((n - 512) / 384) + 1 for n in size)
    assert math.prod(r for r in roi) * len(windows) <= 512 * 512 * monai_default


def test_denoise_array_tiles_with_even_windows():
    """denoise_array places the even windows (not MONAI's default 0.25 steps): a (200, 136) slice in 64-pixel windows
    takes 4 x 3 windows of 64 x 56 instead of 4 x 3 of 64 x 64, with the same seamless result."""
    seen = []

    class Recording(_Pointwise):
        def forward(self, x):
            seen.append(tuple(x.shape[2:]))
            return super().forward(x)

    network = Recording(2)
    image = np.random.default_rng(3).uniform(0, 800, (200, 136)).astype(np.float32)
    tiled = denoise_array(network, image, "MR", roi_size=64, overlap=0.25, mode="gaussian")
    assert seen == [(64, 56)] * 12
    whole = _whole_image(network, image[None], "MR")[0]
    assert np.abs(tiled - whole).max() / np.abs(whole).max() < 1e-4


def test_denoise_array_rejects_bad_input():
    network = EfficientUNetDenoiser(spatial_dims=2, filters=(8, 12, 16, 20), enhancer_filters=4)
    bad = np.zeros((16, 16), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        denoise_array(network, bad, "CT")
    with pytest.raises(ValueError, match="2D slice"):
        denoise_array(network, np.zeros(16, np.float32), "CT")
    with pytest.raises(ValueError, match="2D slice"):
        denoise_array(network, np.zeros((2, 2, 16, 16), np.float32), "CT")
    with pytest.raises(ValueError, match="multiples of 8"):
        denoise_array(network, np.zeros((16, 16), np.float32), "CT", roi_size=12)
    with pytest.raises(ValueError, match="modality"):
        denoise_array(network, np.zeros((16, 16), np.float32))


def _ct_volume_with_air(slices: int = 7, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) CT volumes (slices, size, size) in HU: a body whose extent and intensity change from slice to
    slice, in air, so that a body box or an intensity scaling taken from some of the slices differs from the whole
    volume's."""
    rng = np.random.default_rng(4)
    clean = np.full((slices, size, size), -1000.0, np.float32)
    for z in range(slices):
        clean[z, 80:140, 60 + 8 * z:150 - z] = 40.0 + 30.0 * z
    return (clean + rng.normal(0, 40, clean.shape)).astype(np.float32), clean


class _NeighbourMean(nn.Module):
    """A per-pixel 2.5D network: a weighted mean of a slice and its two neighbours."""

    spatial_dims = 2
    slice_context = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.3, 0.4, 0.3]).reshape(1, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def test_denoise_array_on_a_share_of_the_slices_gives_them_as_the_whole_volume_pass():
    """``denoise_array(..., slices=...)`` (one rank's share of a validation volume) gives those slices as the whole
    volume's pass gives them: the body box, the intensity scaling and a 2.5D network's neighbouring slices are the
    whole volume's, and a share of whole batches goes through the network in the whole pass's batches."""
    torch.manual_seed(0)
    unet = EfficientUNetDenoiser(spatial_dims=2, filters=(8, 12, 16, 20), enhancer_filters=4)
    unet.train()
    with torch.no_grad():  # give batch norm non-trivial running statistics
        unet(torch.rand((2, 1, 16, 16)))
    noisy, _ = _ct_volume_with_air()
    mr = np.abs(noisy + 1000.0)
    for network in (unet, _NeighbourMean()):
        for image, modality in ((noisy, "CT"), (mr, "MR")):
            for batch, share in ((1, [2, 3, 4, 6]), (2, [2, 3, 6]), (3, [6])):
                whole = denoise_array(network, image, modality, sw_batch_size=batch)
                part = denoise_array(network, image, modality, sw_batch_size=batch, slices=share)
                assert part.shape == (len(share), *image.shape[1:]) and part.dtype == np.float32
                assert np.array_equal(part, whole[share]), (type(network).__name__, modality, batch, share)
            # a share that cuts the whole pass's batches: smaller batches, the same values but for float rounding
            cut = denoise_array(network, image, modality, sw_batch_size=2, slices=[1, 2])
            assert np.abs(cut - denoise_array(network, image, modality, sw_batch_size=2)[[1, 2]]).max() < 1e-2
    with pytest.raises(ValueError, match="increasing"):
        denoise_array(unet, noisy, "CT", slices=[3, 1])
    with pytest.raises(ValueError, match="increasing"):
        denoise_array(unet, noisy, "CT", slices=[7])
    with pytest.raises(ValueError, match="volume"):
        denoise_array(unet, noisy[0], "CT", slices=[0])


def test_validation_shares_give_every_slice_batch_and_image_to_exactly_one_rank():
    from lib.engines.engine import validation_shares

    def pair(shape):
        return ValidationPair("p", np.zeros(shape, np.float32), np.zeros(shape, np.float32), "CT")

    pairs = [pair((7, 8, 8)), pair((8, 8)), pair((3, 8, 8)), pair((8, 8))]
    for world in (1, 2, 3, 5):
        shares = [validation_shares(pairs, 2, 2, rank, world) for rank in range(world)]
        for k, p in enumerate(pairs):
            if p.noisy.ndim == 3:
                taken = [set(s.tolist()) for rank in range(world) if (s := shares[rank][k]) is not False]
                assert sorted(i for t in taken for i in t) == list(range(p.noisy.shape[0]))
                batches = [set(range(i, min(i + 2, p.noisy.shape[0]))) for i in range(0, p.noisy.shape[0], 2)]
                assert all(b <= t or not b & t for t in taken for b in batches)  # whole batches of 2 slices
            else:
                assert [shares[rank][k] for rank in range(world)].count(True) == 1
    # 8 units (4 + 1 + 2 + 1 batches and images) go round: 6 slices each on 2 ranks
    assert [sum(1 if s is True else 0 if s is False else len(s) for s in validation_shares(pairs, 2, 2, r, 2))
            for r in range(2)] == [6, 6]
    # a 3D network validates whole images
    assert validation_shares(pairs, 3, 2, 0, 2) == [True, False, True, False]


def test_one_process_validation_gives_each_image_its_pooled_psnr():
    """:func:`lib.engines.engine.validate` in one process: each image's PSNR is :func:`lib.evaluation.psnr` of the
    whole image's denoising (the MSE pooled over all its voxels), whatever the shares' sums are made of."""
    from lib.engines.engine import validate
    from lib.evaluation import psnr, window_for

    torch.manual_seed(0)
    network = EfficientUNetDenoiser(spatial_dims=2, filters=(8, 12, 16, 20), enhancer_filters=4)
    noisy, clean = _ct_volume_with_air()
    pairs = [ValidationPair("volume", noisy, clean, "CT"), ValidationPair("slice", noisy[2], clean[2], "CT")]
    record = validate(network, pairs, tiny_config(), torch.device("cpu"), 5)
    assert record["step"] == 5 and list(record["images"]) == ["volume", "slice"]
    for p in pairs:
        window = window_for("CT")
        got = record["images"][p.name]
        assert got["psnr"] == pytest.approx(psnr(denoise_array(network, p.noisy, "CT"), p.clean, window), abs=1e-5)
        assert got["psnr_noisy"] == pytest.approx(psnr(p.noisy, p.clean, window), abs=1e-5)
        assert got["window"] == [-160.0, 240.0]
    assert record["psnr"] == pytest.approx(np.mean([v["psnr"] for v in record["images"].values()]))


# ----------------------------------------------------------------------------------------------- command line
def run_cli(*args, timeout: float = 240, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_train_then_denoise_keeps_geometry(tmp_path, ct_crop):
    weights = tmp_path / "adl_tiny.pt"
    train = run_cli("train", "--model", "adl", "--output", weights, "--clean", ct_crop, "--modality", "ct",
                    "--noise", "gaussian", "--patch-size", "32", "--batch-size", "2", "--steps-g-warmup", "2",
                    "--steps-d-warmup", "1", "--steps-adversarial", "1", "--filters", "8,12,16,20",
                    "--disc-filters", "4,8,8,8", "--enhancer-filters", "4", "--val", ct_crop, "--device", "cpu",
                    "--seed", "3")
    assert train.returncode == 0, train.stderr
    assert weights.is_file() and "validation PSNR" in train.stdout
    assert "ADL adversarial" in train.stderr  # tqdm progress with the phase
    assert (tmp_path / "adl_tiny_checkpoints" / "last.pt").is_file()

    out = tmp_path / "denoised.nii.gz"
    denoise = run_cli("denoise", "--model", "adl", "--weights", weights, "--input", ct_crop, "--output", out,
                      "--modality", "ct", "--device", "cpu", "--roi-size", "64", "--overlap", "0.5")
    assert denoise.returncode == 0, denoise.stderr
    original, result = sitk.ReadImage(str(ct_crop)), sitk.ReadImage(str(out))
    assert result.GetSize() == original.GetSize()
    assert np.allclose(result.GetSpacing(), original.GetSpacing()) and np.allclose(result.GetOrigin(), original.GetOrigin())
    values = sitk.GetArrayFromImage(result)
    assert np.isfinite(values).all() and -1100 <= values.min() and values.max() <= 3100  # HU


def test_cli_bad_inputs_exit_2(tmp_path, ct_crop, monkeypatch, capsys):
    heldout = tmp_path / "ct_abdomen_siemens_j2k_slab"
    heldout.mkdir()
    shutil.copy(ct_crop, heldout / "a.nii.gz")
    result = run_cli("train", "--model", "adl", "--output", tmp_path / "w.pt", "--clean", heldout, "--modality", "ct")
    assert result.returncode == 2 and "held-out" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    cli = import_cli()  # in-process for the remaining cases (same main(), no interpreter start-up)

    (tmp_path / "empty").mkdir()
    (tmp_path / "noisy").mkdir()
    (tmp_path / "clean").mkdir()
    shutil.copy(ct_crop, tmp_path / "noisy" / "a.nii.gz")
    shutil.copy(ct_crop, tmp_path / "clean" / "b.nii.gz")
    cases = {
        "no image files": ["--clean", tmp_path / "empty"],
        "no training data": [],
        "unmatched": ["--noisy-dir", tmp_path / "noisy", "--clean-dir", tmp_path / "clean"],
    }
    for message, extra in cases.items():
        code = cli.main(["train", "--output", str(tmp_path / "w.pt"), "--modality", "ct", *map(str, extra)])
        assert code == 2, message
    monkeypatch.setenv("ADL_MODEL_DIR", str(tmp_path / "no_models"))
    denoise = ["denoise", "--model", "adl", "-i", str(ct_crop), "-o", str(tmp_path / "o.nii.gz")]
    assert cli.main(denoise + ["--modality", "ct"]) == 2  # no default weights installed
    weights = export_weights(build_networks(tiny_config())[0], tmp_path / "ct.pt", tiny_config())
    assert cli.main(denoise + ["--modality", "mr", "--weights", str(weights)]) == 2  # CT weights, MR input
    assert cli.main(denoise + ["--modality", "ct", "--weights", str(tmp_path / "nope.pt")]) == 2
    assert cli.main(["denoise", "--model", "bm3d", "--weights", str(weights), "-i", str(ct_crop), "-o",
                     str(tmp_path / "o.nii.gz")]) == 2  # --weights is for adl only
    assert cli.main(denoise + ["--modality", "ct", "--weights", str(weights), "--planes", "orthogonal"]) == 2  # a slice
    assert cli.main(["denoise", "--model", "nlm", "--planes", "slices", "-i", str(ct_crop), "-o",
                     str(tmp_path / "o.nii.gz")]) == 2  # --planes is for the learned models
    damaged = build_networks(tiny_config())[0]  # a negative batch-norm variance: NaN everywhere
    next(v for k, v in damaged.state_dict().items() if k.endswith("running_var")).fill_(-1.0)
    damaged_weights = export_weights(damaged, tmp_path / "damaged.pt", tiny_config())
    capsys.readouterr()
    assert cli.main(denoise + ["--modality", "ct", "--weights", str(damaged_weights)]) == 2
    err = capsys.readouterr().err
    assert "not denoised" in err and "NaN" in err, err
    assert not (tmp_path / "o.nii.gz").exists()


def test_cli_planes_auto_averages_the_orthogonal_planes_of_a_1mm_mr_volume(tmp_path):
    cli = import_cli()
    torch.manual_seed(0)
    config = tiny_config(modality="MR")
    network = build_networks(config)[0]
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    weights = export_weights(network, tmp_path / "mr.pt", config, half=False)
    volume = (200 + 400 * np.random.default_rng(0).random((32, 40, 32))).astype(np.float32)
    path = write_nifti(volume, tmp_path / "mr_1mm.nii.gz", spacing=(1.0, 1.0, 1.0))
    model = load_denoiser(weights)
    expected = {"auto": denoise_array(model, volume, "MR", orthogonal_planes=True),
                "slices": denoise_array(model, volume, "MR")}
    for planes, want in expected.items():
        out = tmp_path / f"{planes}.nii.gz"
        assert cli.main(["denoise", "--model", "adl", "--weights", str(weights), "--planes", planes,
                         "--modality", "mr", "-i", str(path), "-o", str(out), "--device", "cpu"]) == 0
        np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), want, rtol=1e-4, atol=1e-2)
    assert float(np.abs(expected["auto"] - expected["slices"]).mean()) > 0.1


def test_cli_fine_tunes_from_initial_weights_on_one_ct_filter(tmp_path, ct_crop):
    """`train --initial-weights` starts from the given network (here with a learning rate too small to move it),
    `--ct-filters` restricts the simulated low-dose noise to one reconstruction filter; both go into the record."""
    cli = import_cli()
    tiny = ["--modality", "ct", "--clean", str(ct_crop), "--patch-size", "32", "--batch-size", "2",
            "--filters", "8,12,16,20", "--disc-filters", "4,8,8,8", "--enhancer-filters", "4", "--device", "cpu",
            "--validation-every", "0", "--checkpoint-every", "0"]
    start = tmp_path / "start.pt"
    assert cli.main(["train", "--output", str(start), "--noise", "gaussian", "--steps-g-warmup", "3",
                     "--steps-d-warmup", "0", "--steps-adversarial", "0", "--seed", "1", *tiny]) == 0
    tuned = tmp_path / "tuned.pt"
    ct_noise = ["--noise", "ct-lowdose", "--ct-filters", "shepp-logan", "--realisations", "1",
                "--noise-cache", str(tmp_path / "pool")]
    assert cli.main(["train", "--output", str(tuned), *ct_noise, "--initial-weights", str(start),
                     "--steps-g-warmup", "1", "--steps-d-warmup", "1", "--steps-adversarial", "0",
                     "--lr-warmup", "1e-12", "--seed", "2", *tiny]) == 0
    before, after = load_denoiser(start).network.state_dict(), load_denoiser(tuned).network.state_dict()
    # parameters only: batch-norm running statistics move with any forward pass in training mode
    parameters = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(parameters) > 20 and all(torch.equal(before[k], after[k]) for k in parameters)
    record = load_denoiser(tuned).metadata["training"]["data"]
    assert record["initial_weights"] == "start.pt" and record["ct_settings"]["filters"] == ["shepp-logan"]
    # a file trained from scratch names no restoration width (its modality's default serves it); one trained from
    # a file that names one inherits it
    assert restoration_of(load_denoiser(start).metadata) is None
    assert restoration_of(load_denoiser(tuned).metadata) is None
    payload = torch.load(start, map_location="cpu", weights_only=True)
    torch.save(dict(payload, **{RESTORATION_KEY: {"sigma_px": 1.3, "chosen": "test"}}), tmp_path / "start_w.pt")
    assert cli.main(["train", "--output", str(tmp_path / "tuned_w.pt"), *ct_noise, "--initial-weights",
                     str(tmp_path / "start_w.pt"), "--steps-g-warmup", "1", "--steps-d-warmup", "0",
                     "--steps-adversarial", "0", "--lr-warmup", "1e-12", "--seed", "2", *tiny]) == 0
    assert restoration_of(load_denoiser(tmp_path / "tuned_w.pt").metadata) == 1.3

    fresh = tmp_path / "fresh.pt"  # the same run without --initial-weights starts elsewhere
    assert cli.main(["train", "--output", str(fresh), *ct_noise, "--steps-g-warmup", "1", "--steps-d-warmup", "0",
                     "--steps-adversarial", "0", "--lr-warmup", "1e-12", "--seed", "2", *tiny]) == 0
    other = load_denoiser(fresh).network.state_dict()
    assert not all(torch.equal(before[k], other[k]) for k in parameters)

    bad = {"--ct-filters", "--initial-weights"}
    wider = ["--filters", "8,12,16,24"]
    for extra in (["--noise", "ct-lowdose", "--ct-filters", "sharp-ish"],  # unknown filter
                  ["--noise", "gaussian", "--ct-filters", "shepp-logan"],  # not low-dose CT noise
                  ["--noise", "gaussian", "--initial-weights", str(tmp_path / "none.pt")],  # missing file
                  ["--noise", "gaussian", "--initial-weights", str(start), *wider]):  # another architecture
        code = cli.main(["train", "--output", str(tmp_path / "w.pt"), "--steps-g-warmup", "1", "--steps-d-warmup",
                         "0", "--steps-adversarial", "0", *tiny, *extra])
        assert code == 2, [e for e in extra if e in bad]
    assert not (tmp_path / "w.pt").exists()


@pytest.mark.slow
def test_cli_train_from_scratch_measures_its_own_restoration_width(tmp_path, ct_crop):
    """A CT network trained from scratch is served at a width measured for it, not at the CT default chosen for
    other networks: the widest width at which lesions planted in its noisy validation slice keep 90 % of a 6 mm
    lesion's contrast; the file records the figures it was chosen on."""
    from lib.evaluation.restoration_width import CANDIDATE_WIDTHS_PX

    cli = import_cli()
    out = tmp_path / "scratch.pt"
    common = ["--modality", "ct", "--clean", str(ct_crop), "--noise", "ct-lowdose", "--ct-filters", "shepp-logan",
              "--realisations", "1", "--val", str(SAMPLE_STUDIES / "ct_head_pydicom693.nii.gz"), "--patch-size",
              "32", "--batch-size", "4", "--filters", "8,12,16,20", "--disc-filters", "4,8,8,8",
              "--enhancer-filters", "4", "--device", "cpu", "--validation-every", "0", "--checkpoint-every", "0"]
    assert cli.main(["train", "--output", str(out), *common, "--steps-g-warmup", "80", "--lr-warmup", "3e-3",
                     "--steps-d-warmup", "0", "--steps-adversarial", "0", "--seed", "4"]) == 0
    metadata = load_denoiser(out).metadata
    entry = metadata[RESTORATION_KEY]
    width = restoration_of(metadata)
    assert entry["chosen"].startswith("cli.py train") and "1 noisy validation slice" in entry["chosen"]
    assert entry["lesions"] >= 6 and entry["target"]["diameter_mm"] == 6.0 and entry["target"]["kept_percent"] == 90.0
    six_mm = {w: by_diameter["6"] for w, by_diameter in entry["kept_percent"].items()}
    assert six_mm["0"] < 90.0 or width == 0.0
    if width > 0:  # the widest meeting the target: every wider width tried misses it
        assert entry["lesion_target_met"] == (six_mm[f"{width:g}"] >= 90.0)
        assert all(six_mm[f"{w:g}"] < 90.0 for w in CANDIDATE_WIDTHS_PX if w > width)
        assert entry["lesion_target_met"] or width == min(CANDIDATE_WIDTHS_PX)
    # trained from that file with validation images: its width, or the one measured for the new network where that
    # gives more back (never less restoration than the start file)
    tuned = tmp_path / "tuned.pt"
    assert cli.main(["train", "--output", str(tuned), "--initial-weights", str(out), *common, "--steps-g-warmup",
                     "5", "--lr-warmup", "1e-4", "--steps-d-warmup", "0", "--steps-adversarial", "0",
                     "--seed", "5"]) == 0
    entry = load_denoiser(tuned).metadata[RESTORATION_KEY]
    assert entry["inherited_from"].startswith("scratch.pt (sha256 ")
    assert entry["measured_on"]["slices"] == "1 noisy validation slice(s)" and entry["measured_on"]["lesions"] >= 6
    giving_back = [w for w in (width, entry["measured_on"]["sigma_px"]) if w]  # 0 = off gives nothing back
    assert entry["sigma_px"] == (min(giving_back) if giving_back else 0.0)
    # no validation image to plant lesions in: no width of its own (the CT default serves it)
    no_val = tmp_path / "no_val.pt"
    assert cli.main(["train", "--output", str(no_val), "--modality", "ct", "--clean", str(ct_crop), "--noise",
                     "gaussian", "--patch-size", "32", "--batch-size", "2", "--filters", "8,12,16,20",
                     "--disc-filters", "4,8,8,8", "--enhancer-filters", "4", "--device", "cpu", "--checkpoint-every",
                     "0", "--steps-g-warmup", "1", "--steps-d-warmup", "0", "--steps-adversarial", "0"]) == 0
    assert RESTORATION_KEY not in load_denoiser(no_val).metadata


def test_cli_train_from_a_file_with_a_lineage_carries_it_and_grows_it(tmp_path, ct_crop):
    """`train --initial-weights` keeps the start file's record in the new record's `lineage` (oldest first, the
    start last, named by file name and sha256) after the start's own lineage: a chain of three runs reads back."""
    import hashlib
    import json

    cli = import_cli()
    tiny = ["--modality", "ct", "--clean", str(ct_crop), "--noise", "gaussian", "--patch-size", "32",
            "--batch-size", "2", "--filters", "8,12,16,20", "--disc-filters", "4,8,8,8", "--enhancer-filters", "4",
            "--device", "cpu", "--checkpoint-every", "0", "--steps-g-warmup", "1", "--steps-d-warmup", "0",
            "--steps-adversarial", "0"]
    first, middle, last = tmp_path / "first.pt", tmp_path / "middle.pt", tmp_path / "last.pt"
    assert cli.main(["train", "--output", str(first), "--seed", "1", "--val", str(ct_crop),
                     "--validation-every", "1", *tiny]) == 0
    assert "lineage" not in load_denoiser(first).metadata["training"]  # a fresh run has none
    assert cli.main(["train", "--output", str(middle), "--initial-weights", str(first), "--seed", "2",
                     "--validation-every", "0", *tiny]) == 0
    assert cli.main(["train", "--output", str(last), "--initial-weights", str(middle), "--seed", "3",
                     "--validation-every", "0", *tiny]) == 0
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, middle)}
    first_record = load_denoiser(first).metadata
    middle_record = load_denoiser(middle).metadata["training"]
    assert [e["file"] for e in middle_record["lineage"]] == ["first.pt"]
    entry = middle_record["lineage"][0]
    assert entry["sha256"] == sha["first.pt"] and entry["created_utc"] == first_record["created_utc"]
    assert entry["model"] == "adl" and entry["modality"] == "CT" and entry["steps"] == 1
    assert entry["steps_per_phase"] == {"g_warmup": 1, "d_warmup": 0, "adversarial": 0}
    assert entry["config"]["filters"] == [8, 12, 16, 20] and "checkpoint_dir" not in entry["config"]
    assert entry["data"] == first_record["training"]["data"]
    assert entry["best_psnr"] == first_record["training"]["best_psnr"]
    assert entry["validation_best"]["step"] == 1 and entry["validation_best"]["psnr"] == entry["best_psnr"]
    assert middle_record["initial_weights"] == f"first.pt (sha256 {sha['first.pt'][:12]})"
    record = load_denoiser(last).metadata["training"]
    # the start (middle.pt) last, after its own lineage (first.pt): the chain grows by one entry per run
    assert [e["file"] for e in record["lineage"]] == ["first.pt", "middle.pt"]
    assert record["lineage"][-1]["sha256"] == sha["middle.pt"]
    assert record["lineage"][:-1] == middle_record["lineage"]
    assert record["data"]["initial_weights"] == "middle.pt"
    assert str(tmp_path) not in json.dumps(record["lineage"])  # file names only, no path of this machine


# ----------------------------------------------------------------------------------------------- multi-process
DDP_SCRIPTS = {
    "adl": textwrap.dedent("""
        import os
        import torch
        torch.set_num_threads(1)
        from lib.data import ADLPatchDataset, SyntheticNoiseSource
        from lib.engines import ADLTrainingConfig, train_adl
        source = SyntheticNoiseSource([{image!r}], "CT", noise="gaussian", seed=0, progress=False)
        dataset = ADLPatchDataset(source, 2, 32, samples_per_epoch=8, seed=0)
        config = ADLTrainingConfig(modality="CT", filters=(8, 12, 16, 20), disc_filters=(4, 8, 8, 8),
                                   enhancer_filters=4, batch_size=2, steps_g_warmup=1, steps_d_warmup=1,
                                   steps_adversarial=1, device="cpu", checkpoint_dir={ckpt!r}, validation_every=0)
        result = train_adl(config, dataset, progress=False)
        rank = os.environ["RANK"]
        torch.save({{n: p.detach() for n, p in result.generator.named_parameters()}}, {out!r} + f"/g{{rank}}.pt")
        torch.save([h.get("g_total") for h in result.history], {out!r} + f"/h{{rank}}.pt")
    """),
    "tddl_gcn": textwrap.dedent("""
        import os
        import torch
        torch.set_num_threads(1)
        from lib.data import ADLPatchDataset, SyntheticNoiseSource
        from lib.engines import GCNTrainingConfig, train_gcn
        source = SyntheticNoiseSource([{image!r}], "CT", noise="gaussian", seed=0, progress=False)
        dataset = ADLPatchDataset(source, 2, 24, samples_per_epoch=8, seed=0)
        config = GCNTrainingConfig(features=8, k=8, search_window=7, n_blocks=1, layers_per_block=1, rank=2,
                                   batch_size=2, steps=2, device="cpu", checkpoint_dir={ckpt!r}, validation_every=0,
                                   patch_size=24)
        result = train_gcn(config, dataset, progress=False)
        rank = os.environ["RANK"]
        torch.save({{n: p.detach() for n, p in result.network.named_parameters()}}, {out!r} + f"/g{{rank}}.pt")
        torch.save([h["loss"] for h in result.history], {out!r} + f"/h{{rank}}.pt")
    """),
}
CHECKPOINT_READERS = {"adl": load_adl_checkpoint, "tddl_gcn": load_gcn_checkpoint}
#: Records every collective called from Python in a training script; the script fails if the engine called any (see
#: the test's docstring).
COLLECTIVE_GUARD = textwrap.dedent("""
    import torch.distributed as dist
    python_collectives = []
    for name in ("broadcast", "all_reduce", "reduce", "all_gather", "gather", "scatter", "broadcast_object_list",
                 "all_gather_object"):
        def counted(*args, _name=name, _call=getattr(dist, name), **kwargs):
            python_collectives.append(_name)
            return _call(*args, **kwargs)
        setattr(dist, name, counted)
""")
#: Seconds for the whole torchrun job: headroom for a slow, loaded CI machine (a hang fails the test, not the suite).
TORCHRUN_TIMEOUT = 600
#: Each worker prints every thread's Python stack to its stderr a minute before the job is killed, so that a hang
#: says where it waits in the test's failure message (one seen on a heavily loaded machine was a teardown deadlock:
#: test_torchrun_ends_while_gloo_still_holds_a_work_of_the_backward).
HANG_DUMP = textwrap.dedent(f"""
    import faulthandler
    faulthandler.dump_traceback_later({TORCHRUN_TIMEOUT - 60}, exit=False)
""")


def run_torchrun(script: Path, cwd: Path, timeout: float = TORCHRUN_TIMEOUT) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 script`` in a session of its own. torchrun starts each worker in
    a session of its own too, so the workers are tracked while the job runs; on a timeout torchrun's process group
    and every worker's are killed (none is left running, orphaned, after the test) and the test fails with the job's
    output (:data:`HANG_DUMP` in the script puts the workers' stacks there). The job's TMPDIR is ``cwd/tmp`` (the
    test's ``tmp_path``, which pytest removes): torchrun leaves a ``torchelastic_*`` folder there at every run."""
    import psutil

    env = processes.torchrun_env(cwd)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=cwd,
                                   start_new_session=True)
        seen: dict[int, psutil.Process] = {}
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            try:
                seen.update({c.pid: c for c in psutil.Process(process.pid).children(recursive=True)})
            except psutil.Error:
                pass
            if time.monotonic() > deadline:
                groups = {process.pid}
                for child in seen.values():
                    try:
                        if child.is_running():  # the same process (psutil compares start times), not a reused pid
                            groups.add(os.getpgid(child.pid))
                    except (psutil.Error, ProcessLookupError):
                        pass
                for group in groups:
                    try:
                        os.killpg(group, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                process.wait()
                out.seek(0)
                err.seek(0)
                pytest.fail(f"torchrun did not end in {timeout:.0f} s (killed); stdout:\n{out.read()[-3000:]}\n"
                            f"stderr (each worker's stacks a minute before):\n{err.read()[-12000:]}")
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("model", ["adl", "tddl_gcn"])
def test_torchrun_two_processes_gloo(model, tmp_path, ct_crop):
    """The training engine under torchrun (2 processes, gloo): DDP keeps the replicas identical while each rank
    trains on its own samples, and rank 0's checkpoint records the world size. Without validation images the engine
    calls no collective of its own besides the final barrier (a tensor it handed to Gloo could deadlock the teardown:
    lib.engines.engine)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / f"ddp_{model}.py"
    script.write_text(HANG_DUMP + COLLECTIVE_GUARD + DDP_SCRIPTS[model].format(image=str(ct_crop), ckpt=str(tmp_path / "ck"),
                                                                   out=str(tmp_path))
                      + "assert not python_collectives, python_collectives\n")
    result = run_torchrun(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # torchrun's scratch folder went to the job's TMPDIR (it was left in /tmp at every run)
    assert any(p.name.startswith("torchelastic_") for p in (tmp_path / "tmp").iterdir()), \
        sorted((tmp_path / "tmp").iterdir())
    g0, g1 = torch.load(tmp_path / "g0.pt"), torch.load(tmp_path / "g1.pt")
    assert all(torch.equal(g0[k], g1[k]) for k in g0)  # DDP kept the replicas identical
    h0, h1 = torch.load(tmp_path / "h0.pt"), torch.load(tmp_path / "h1.pt")
    assert h0[0] != h1[0]  # ...while each rank trained on its own samples
    assert CHECKPOINT_READERS[model](tmp_path / "ck")["world_size"] == 2


#: The state a loaded machine left a rank in when a torchrun job hung after its last step: Gloo's worker thread still
#: held a work from DDP's backward (its thread-local state carries a Python object, the backward's context) when the
#: process group was torn down. Here, after the engine's final barrier, each rank hands Gloo such a work and drops it,
#: rank 0 three seconds late, so rank 1's Gloo thread can release it only after rank 1 went on to its teardown. Set
#: before COLLECTIVE_GUARD, so that these collectives are not counted as the engine's.
LATE_GLOO_WORK = textwrap.dedent("""
    import contextvars
    import time
    import torch
    import torch.distributed as dist
    _barrier, _all_reduce = dist.barrier, dist.all_reduce
    def barrier_then_a_late_work(*args, **kwargs):
        _barrier(*args, **kwargs)
        if dist.get_rank() == 0:
            time.sleep(3)
        torch._C._stash_obj_in_tls("context", contextvars.copy_context())  # as torch's backward does
        try:
            _all_reduce(torch.zeros(1), async_op=True)  # not waited for: Gloo's thread releases it
        finally:
            torch._C._remove_obj_from_tls("context")
        print("left a work to Gloo", flush=True)
    dist.barrier = barrier_then_a_late_work
""")


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("model", ["adl", "tddl_gcn"])
def test_torchrun_ends_while_gloo_still_holds_a_work_of_the_backward(model, tmp_path, ct_crop):
    """A torchrun job hung after its last step on a loaded machine (rank 1 never ended; each worker's stacks: the
    main thread joining Gloo's threads in the process group's destructor, reached from the DDP wrapper's reducer as
    the trainer's frame was cleared, with the GIL held; Gloo's thread waiting for the GIL to release a work of the
    last backward). The trainers now drop their DDP wrappers before the engine destroys the group, whose Python
    handle releases the GIL while it waits: the job ends. :data:`LATE_GLOO_WORK` makes the state certain."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / f"ddp_{model}.py"
    script.write_text(HANG_DUMP + LATE_GLOO_WORK + COLLECTIVE_GUARD
                      + DDP_SCRIPTS[model].format(image=str(ct_crop), ckpt=str(tmp_path / "ck"), out=str(tmp_path))
                      + "assert not python_collectives, python_collectives\n")
    result = run_torchrun(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("left a work to Gloo") == 2  # the state was set up on both ranks
    assert (tmp_path / "g0.pt").is_file() and (tmp_path / "g1.pt").is_file()


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_job_fails_with_the_error_of_one_rank(tmp_path, ct_crop):
    """One rank that raises mid-run (here rank 1 cannot read a sample of its second step, while rank 0 waits for it
    in DDP's collectives) ends the whole job with that error, at once: not after Gloo's 30 min timeout (the job
    would be killed at TORCHRUN_TIMEOUT and the test fail)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    failing = textwrap.dedent("""
        class RankOneCannotRead(type(dataset)):
            def __getitem__(self, index):
                if os.environ["RANK"] == "1" and index >= 6:  # rank 1's samples of the second step: 6, 7
                    raise OSError(f"sample {index} cannot be read")
                return super().__getitem__(index)
        dataset.__class__ = RankOneCannotRead
    """)
    text = DDP_SCRIPTS["tddl_gcn"].format(image=str(ct_crop), ckpt=str(tmp_path / "ck"), out=str(tmp_path))
    text = text.replace("steps=2,", "steps=3,").replace("config = GCNTrainingConfig",
                                                        failing + "config = GCNTrainingConfig")
    script = tmp_path / "ddp_failing.py"
    script.write_text(HANG_DUMP + text)
    result = run_torchrun(script, tmp_path)
    assert result.returncode != 0
    assert "OSError: sample 6 cannot be read" in result.stdout + result.stderr
    assert not (tmp_path / "g0.pt").exists()  # rank 0 did not end as if the run were complete


#: Put before a DDP_SCRIPTS script: the validation images from {pairs!r} (an .npz), the collective timeout from {env!r},
#: and every validation forward of either network ({delay!r} s) made slower, as on full-size validation volumes.
VALIDATION_HEADER = textwrap.dedent("""
    import json
    import os
    import time
    import numpy as np
    import torch
    from lib.data import ValidationPair
    from lib.networks import EfficientUNetDenoiser, GCNDenoiser
    os.environ.update({env!r})
    validation_forwards = []
    for network_class in (EfficientUNetDenoiser, GCNDenoiser):
        def slow_in_validation(self, *args, _forward=network_class.forward, **kwargs):
            if torch.is_inference_mode_enabled():  # denoise_array's passes: validation (training never runs in it)
                validation_forwards.append(1)
                time.sleep({delay!r})
            return _forward(self, *args, **kwargs)
        network_class.forward = slow_in_validation
    arrays = np.load({pairs!r})
    pairs = [ValidationPair("volume", arrays["noisy_volume"], arrays["clean_volume"], "CT"),
             ValidationPair("slice", arrays["noisy_slice"], arrays["clean_slice"], "CT")]
""")
VALIDATION_FOOTER = textwrap.dedent("""
    print(f"rank {{rank}}: {{len(validation_forwards)}} validation forwards", flush=True)
    with open({out!r} + f"/v{{rank}}.json", "w") as f:
        json.dump(result.validation, f)
""")


def _validation_script(model: str, tmp_path: Path, ct_crop: Path, delay: float = 0.0, env: dict | None = None,
                       **config) -> Path:
    """A DDP_SCRIPTS training script that validates on a 7-slice CT volume and one slice (8 units of validation
    work for a 2D network on a CPU: 4 per rank) every ``validation_every`` steps and at the end; ``config``: more
    configuration arguments."""
    clean = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_crop))).astype(np.float32)
    clean = clean[0] if clean.ndim == 3 else clean
    rng = np.random.default_rng(0)
    volume = np.stack([np.roll(clean, 3 * z, axis=1) for z in range(7)])
    np.savez(tmp_path / "pairs.npz", clean_volume=volume, noisy_volume=volume + rng.normal(0, 40, volume.shape),
             clean_slice=clean, noisy_slice=clean + rng.normal(0, 40, clean.shape))
    text = DDP_SCRIPTS[model].format(image=str(ct_crop), ckpt=str(tmp_path / "ck"), out=str(tmp_path))
    extra = "".join(f"{k}={v!r}, " for k, v in config.items())
    text = text.replace("validation_every=0", extra.rstrip(", ")).replace("dataset, progress=False)",
                                                                           "dataset, val_pairs=pairs, progress=False)")
    header = VALIDATION_HEADER.format(env=dict(env or {}), delay=float(delay), pairs=str(tmp_path / "pairs.npz"))
    script = tmp_path / f"ddp_validation_{model}.py"
    script.write_text(HANG_DUMP + header + text + VALIDATION_FOOTER.format(out=str(tmp_path)))
    return script


def _one_process_validation(model: str, checkpoint: Path) -> dict:
    """:func:`lib.engines.engine.validate` in this process, of the network in a training checkpoint, on the images
    of :func:`_validation_script`."""
    from lib.engines import GCNTrainingConfig
    from lib.engines.engine import validate
    from lib.networks import GCNDenoiser

    state = CHECKPOINT_READERS[model](checkpoint)
    if model == "adl":
        config = ADLTrainingConfig.from_dict(state["config"])
        network = build_networks(config)[0].to(memory_format=torch.channels_last)  # as train_adl keeps it
        network.load_state_dict(state["generator"])
    else:
        config = GCNTrainingConfig.from_dict(state["config"])
        network = GCNDenoiser(**config.network_kwargs())
        network.load_state_dict(state["denoiser"])
    arrays = np.load(checkpoint.parent.parent / "pairs.npz")
    pairs = [ValidationPair("volume", arrays["noisy_volume"], arrays["clean_volume"], "CT"),
             ValidationPair("slice", arrays["noisy_slice"], arrays["clean_slice"], "CT")]
    return validate(network, pairs, config, torch.device("cpu"), int(state["step"]))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("model", ["adl", "tddl_gcn"])
def test_torchrun_validation_is_shared_out_and_equals_one_process_on_the_same_weights(model, tmp_path, ct_crop):
    """Under torchrun every rank validates its share of the slices (4 of the 8 units each) and gets the whole
    record, which is what one process gets on the same weights (rank 0's checkpoint of that step) at every
    validation: mid-run too, when each rank's batch-norm statistics are those of its own last batch (the ranks
    validate with rank 0's, as rank 0 alone did)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = _validation_script(model, tmp_path, ct_crop, validation_every=1, checkpoint_every=1,
                                keep_all_checkpoints=True)
    result = run_torchrun(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = 3 if model == "adl" else 2
    per_rank = steps * 4  # validations x this rank's 4 units
    assert f"rank 0: {per_rank} validation forwards" in result.stdout, result.stdout[-2000:]
    assert f"rank 1: {per_rank} validation forwards" in result.stdout, result.stdout[-2000:]
    v0 = json.loads((tmp_path / "v0.json").read_text())
    v1 = json.loads((tmp_path / "v1.json").read_text())
    assert [r["step"] for r in v0] == list(range(1, steps + 1)) and v1 == v0
    for record in v0:
        alone = _one_process_validation(model, tmp_path / "ck" / f"step_{record['step']:07d}.pt")
        for name in ("volume", "slice"):
            for key in ("psnr", "psnr_noisy"):
                assert record["images"][name][key] == pytest.approx(alone["images"][name][key], abs=1e-9), \
                    (record["step"], name, key)
        assert record["psnr"] == pytest.approx(alone["psnr"], abs=1e-9)


def test_collective_timeout_is_read_from_its_environment_variable(monkeypatch):
    import datetime

    from lib.engines.engine import COLLECTIVE_TIMEOUT, collective_timeout

    monkeypatch.delenv("ADL_COLLECTIVE_TIMEOUT_S", raising=False)
    assert collective_timeout() == COLLECTIVE_TIMEOUT == datetime.timedelta(minutes=30)
    monkeypatch.setenv("ADL_COLLECTIVE_TIMEOUT_S", " 7200 ")
    assert collective_timeout() == datetime.timedelta(hours=2)
    for bad in ("0", "-5", "nan", "inf", "2h"):
        monkeypatch.setenv("ADL_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="ADL_COLLECTIVE_TIMEOUT_S"):
            collective_timeout()


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_validation_longer_than_the_collective_timeout(tmp_path, ct_crop):
    """A validation that takes longer than the process group's timeout (here 30 s from ADL_COLLECTIVE_TIMEOUT_S,
    30 min by default; each validation forward made 5 s slower: 40 s for the 8 units) killed the job when rank 0
    validated alone: rank 1 timed out waiting in its next collective. Shared out, each rank does half the work
    and they wait for each other only for the difference: the job ends, with the record on both ranks. (The
    timeout is also every collective's, start-up included: 30 s leaves room for two ranks started apart on a
    loaded machine.)"""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = _validation_script("adl", tmp_path, ct_crop, delay=5.0, env={"ADL_COLLECTIVE_TIMEOUT_S": "30"},
                                validation_every=0)
    result = run_torchrun(script, tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "rank 0: 4 validation forwards" in result.stdout and "rank 1: 4 validation forwards" in result.stdout
    v0 = json.loads((tmp_path / "v0.json").read_text())
    assert [r["step"] for r in v0] == [3] and json.loads((tmp_path / "v1.json").read_text()) == v0


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_training_and_inference(ct_dataset, tmp_path):
    result = train_adl(tiny_config(device="cuda", amp=True, checkpoint_dir=str(tmp_path)), ct_dataset, progress=False)
    assert all(np.isfinite(h.get("g_total", 0.0)) for h in result.history)
    assert load_adl_checkpoint(tmp_path)["scaler_g"]  # the AMP scaler state is checkpointed
    path = export_weights(result.generator, tmp_path / "w.pt", result.config)
    model = load_denoiser(path, device="cuda")
    image = np.random.default_rng(0).normal(0, 50, (2, 64, 64)).astype(np.float32)
    on_gpu = denoise_array(model, image, device="cuda")
    on_cpu = denoise_array(load_denoiser(path), image, device="cpu", amp=False)
    assert np.abs(on_gpu - on_cpu).max() < 10.0  # HU; fp16 autocast on the GPU


def test_one_stray_negative_voxel_leaves_the_rest_of_an_mr_as_it_was():
    """The MR scale's low end is a low percentile, not the minimum: one negative voxel (a resampling's ringing, an
    outlier) moved the scale of the whole image, and every voxel's denoising with it (up to 30 of 255)."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz")))
    centre = image.shape[0] // 2
    image = image[centre - 1:centre + 1].astype(np.float32)
    network = load_denoiser(APP_DIR / "model" / "pretrained_adl_mr.pt")
    clean_run = denoise_array(network, image, "MR", amp=False)
    stray = image.copy()
    stray[0, 5, 5] = -50.0
    changed = np.abs(denoise_array(network, stray, "MR", amp=False) - clean_run)
    changed[0, :16, :16] = 0  # the voxel itself and its receptive field's reach may change
    assert float(changed.max()) < 1e-3 * float(image.max()), float(changed.max())
