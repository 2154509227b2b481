"""TDDL noise learning: extraction from low-dose images alone, the conditional noise VAE, noise fields, pseudo
pairs, save/load, the `learn-noise` command and `train --noise-model`.

Real arrays and files, no mocks; tiny networks and few steps, so the module stays short on one thread.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

import processes
from conftest import APP_DIR, SAMPLE_STUDIES, import_cli
from lib.noise import LowDoseCTSettings, radial_noise_power_spectrum, simulate_low_dose_ct, soft_tissue_mask
from lib.noise_learning import (
    LearnedNoiseSource,
    NoiseModel,
    NoiseSamples,
    TileLayout,
    air_policy_for,
    compare_noise,
    extract_noise_samples,
    plot_noise_comparison,
    remove_trend,
    synthesise_pseudo_low_dose,
    train_noise_model,
)

torch.set_num_threads(1)

CLI = APP_DIR / "cli.py"
TINY = dict(batch_size=32, width=16, progress=False)


def _correlated_noise(shape: tuple[int, ...], std: float, sigma_px: float, seed: int) -> np.ndarray:
    """Gaussian-filtered white noise (stationary, correlated) with the given pixel std, float32."""
    rng = np.random.default_rng(seed)
    sig = (0,) * (len(shape) - 2) + (sigma_px, sigma_px)
    w = ndimage.gaussian_filter(rng.standard_normal(shape), sig, mode="wrap")
    return (w / w.std() * std).astype(np.float32)


def _write_nifti(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.0)) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def _disc_phantom(n: int = 128, slices: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free water disc in air (clean) and a 'low-dose' version with 25 HU correlated noise everywhere."""
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    clean = np.where(np.hypot(yy, xx) < 0.42 * n, 0.0, -1000.0).astype(np.float32)
    clean = np.repeat(clean[None], slices, axis=0)
    return clean, clean + _correlated_noise(clean.shape, 25.0, 1.0, seed)


def _rms_std(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))


@pytest.fixture(scope="module")
def stationary_case():
    """Noise samples of stationary correlated noise (20 HU, Gaussian sigma 1 px) and a model trained on them."""
    noise = _correlated_noise((6, 128, 128), 20.0, 1.0, seed=1)
    samples = extract_noise_samples(noise, 32, stride=8, max_patches=None, pixel_size_mm=1.0)
    model = train_noise_model(samples, steps=120, seed=0, **TINY)
    return samples, model


# ------------------------------------------------------------------------------------------------- extraction
def test_extraction_on_pure_noise_keeps_most_patches_without_bias() -> None:
    noise = _correlated_noise((4, 128, 128), 20.0, 1.2, seed=2)
    samples = extract_noise_samples(noise, 32, stride=8, max_patches=None, pixel_size_mm=1.0, detrend="mean")
    assert samples.patches.shape[1:] == (32, 32) and len(samples) == samples.stats["kept"]
    assert samples.stats["accepted"] > 0.6 * samples.stats["candidates"]
    assert np.allclose(samples.patches.mean(axis=(1, 2)), 0.0, atol=1e-3)
    every = np.lib.stride_tricks.sliding_window_view(noise, (32, 32), axis=(1, 2))[:, ::8, ::8].reshape(-1, 32, 32)
    every = every - every.mean(axis=(1, 2), keepdims=True)
    assert abs(samples.noise_std_hu / _rms_std(every) - 1) < 0.03
    f_all = radial_noise_power_spectrum(every, 1.0, detrend=False).mean_frequency
    f_sel = radial_noise_power_spectrum(samples.patches, 1.0, detrend=False).mean_frequency
    assert abs(f_sel / f_all - 1) < 0.06


def test_trend_removal_takes_slow_trends_not_noise() -> None:
    noise = _correlated_noise((50, 32, 32), 10.0, 0.7, seed=8)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    trend = 40.0 * yy - 25.0 * xx + 60.0 * (xx - 0.5) ** 2 + 100.0
    for mode, trended in (("plane", 40.0 * yy - 25.0 * xx + 100.0), ("quadratic", trend)):
        cleaned = remove_trend(noise + trended.astype(np.float32), mode)
        assert np.allclose(cleaned, remove_trend(noise, mode), atol=1e-3)
        assert np.allclose(cleaned.mean(axis=(1, 2)), 0.0, atol=1e-4)
        assert 0.9 < _rms_std(cleaned) / _rms_std(noise - noise.mean(axis=(1, 2), keepdims=True)) <= 1.0


def test_extraction_recovers_simulated_low_dose_noise() -> None:
    """Real head CT slice (pydicom test data), simulated low dose: extracted noise vs the true added noise."""
    data_store = pytest.importorskip("data_store")
    path = os.path.join(os.path.dirname(data_store.__file__), "data", "693_UNCR.dcm")
    if not os.path.isfile(path):
        pytest.skip("pydicom-data CT slice not installed")
    from lib.imaging import read_volume

    volume = read_volume(path)
    crop = volume.array[170:426, 130:386].copy()  # 256 x 256 of brain and skull, 0.48 mm pixels
    pixel = float(volume.spacing[0])
    settings = LowDoseCTSettings(dose_fraction=0.25, target_noise_std_hu=40.0, reconstruction_filter="hann")
    low = simulate_low_dose_ct(crop, pixel, settings, seed=1)
    true_noise = low - crop
    samples = extract_noise_samples(low, 32, pixel_size_mm=pixel)
    soft = (samples.condition_hu > -100) & (samples.condition_hu < 200)
    assert soft.sum() >= 30
    extracted = _rms_std(samples.patches[soft])
    truth_band = float(true_noise[soft_tissue_mask(crop)].std())
    assert abs(extracted / truth_band - 1) < 0.15
    same = np.stack([true_noise[y:y + 32, x:x + 32] for _, _, y, x in samples.positions[soft]])
    same = same - same.mean(axis=(1, 2), keepdims=True)
    assert abs(extracted / _rms_std(same) - 1) < 0.06  # what the selection lets through besides noise
    f_ext = radial_noise_power_spectrum(samples.patches[soft], pixel, detrend=False).mean_frequency
    f_true = radial_noise_power_spectrum(same, pixel, detrend=False).mean_frequency
    assert abs(f_ext / f_true - 1) < 0.10


def test_extraction_rejects_structure_and_clipped_air() -> None:
    clean, low = _disc_phantom(128, 2, seed=3)
    low = np.maximum(low, -1024.0)  # air clipped like many scanners store it
    low[:, 60:68, 20:108] += 300.0  # a bright bar through the disc: structure
    samples = extract_noise_samples(low, 32, stride=8, pixel_size_mm=0.8)
    assert samples.stats["clip_values_hu"] == [-1024.0] and samples.stats["rejected_clipped"] > 0
    for _, z, y, x in samples.positions:
        assert not (y < 68 and y + 32 > 60 and x < 108 and x + 32 > 20), "a patch on the bar was accepted"
    assert np.all(samples.condition_hu > -900)  # every air patch touches the clip value
    assert air_policy_for(samples) == "none"  # so a model of this scanner adds no noise in air
    assert abs(samples.noise_std_hu / 25.0 - 1) < 0.1


def test_extraction_finds_clipped_air_behind_field_of_view_padding() -> None:
    """Padding (-3024 HU) is the image minimum; air clipped at -1024 HU must still be found: clipped air passed as
    noise before (air policy "learned", a half-rectified 21 HU instead of 25 HU, pseudo pairs not clipped like the
    scanner's images)."""
    n = 192
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    clean = np.repeat(np.where(np.hypot(yy, xx) < 50, 0.0, -1000.0).astype(np.float32)[None], 3, axis=0)
    low = np.maximum(clean + _correlated_noise(clean.shape, 25.0, 1.0, 3), -1024.0)
    low[:, :, :2] = -3024.0  # padding outside the field of view
    samples = extract_noise_samples(low, 32, stride=8, pixel_size_mm=0.8)
    assert samples.stats["clip_values_hu"] == [-3024.0, -1024.0]
    assert not any((low[z, y:y + 32, x:x + 32] == -1024.0).any() for _, z, y, x in samples.positions)
    assert air_policy_for(samples) == "none"


def test_extraction_rejects_patches_holding_one_small_bright_dot() -> None:
    """A calcification-sized dot lies in one block of a patch: the block-variance test must see that one block (the
    former std of the log block variances let 18 % of the kept patches hold a dot)."""
    noise = _correlated_noise((4, 256, 256), 25.0, 1.0, seed=4)
    dots = np.zeros_like(noise)
    rng = np.random.default_rng(1)
    for z in range(4):
        for _ in range(12):
            y, x = rng.integers(0, 255, 2)
            dots[z, y, x] = 300.0
    samples = extract_noise_samples(noise + dots, 32, stride=8, max_patches=None, pixel_size_mm=1.0)
    holding = sum(bool(dots[z, y:y + 32, x:x + 32].any()) for _, z, y, x in samples.positions)
    assert len(samples) > 0.5 * samples.stats["candidates"]
    assert holding < 0.1 * len(samples), f"{holding} of {len(samples)} kept patches hold a bright dot"


# ------------------------------------------------------------------------------------------------- VAE
def test_vae_samples_match_stationary_noise_level_and_texture(stationary_case) -> None:
    samples, model = stationary_case
    gen = model.sample_patches(samples.condition_hu, seed=5)
    assert gen.shape == samples.patches.shape and gen.dtype == np.float32
    assert abs(_rms_std(gen) / samples.noise_std_hu - 1) < 0.10
    f_gen = radial_noise_power_spectrum(gen, 1.0, detrend=False).mean_frequency
    f_real = radial_noise_power_spectrum(samples.patches, 1.0, detrend=False).mean_frequency
    assert abs(f_gen / f_real - 1) < 0.15
    fit = model.training_stats["fit"]
    assert abs(fit["std_relative_error"]) < 0.10 and abs(fit["mean_frequency_relative_error"]) < 0.15
    # the decoder MEAN alone (what a plain-L2 VAE would output) carries little of the variance: sampling the
    # learned coloured decoder noise is what keeps the level and texture
    with torch.no_grad():
        e = model.vae.embedding(torch.zeros(256))
        mean_only = model.vae.decode_mean(torch.randn(256, 4, 4, 4, generator=torch.Generator().manual_seed(0)), e)
    assert float(mean_only.std()) * model.noise_scale_hu < 0.5 * samples.noise_std_hu


@pytest.mark.slow
def test_vae_reproduces_noise_that_depends_on_intensity() -> None:
    rng = np.random.default_rng(4)
    n = 600
    cond = np.where(rng.random(n) < 0.5, rng.uniform(-100, 0, n), rng.uniform(100, 200, n)).astype(np.float32)
    std = np.where(cond < 50, 10.0, 30.0)
    patches = _correlated_noise((n, 32, 32), 1.0, 1.0, seed=5) * std[:, None, None]
    patches -= patches.mean(axis=(1, 2), keepdims=True)
    samples = NoiseSamples(patches, cond, np.zeros((n, 4)), 32, (1.0, 1.0))
    model = train_noise_model(samples, steps=150, seed=1, **TINY)
    low = model.sample_patches(np.full(300, -50.0), seed=1)
    high = model.sample_patches(np.full(300, 150.0), seed=2)
    low_real = _rms_std(patches[cond < 50])
    high_real = _rms_std(patches[cond >= 50])
    assert abs(_rms_std(low) / low_real - 1) < 0.15
    assert abs(_rms_std(high) / high_real - 1) < 0.15
    band = model.training_stats["fit"]["std_by_band"]["-100..200 HU (soft tissue)"]
    assert np.isfinite(band["sampled_std_hu"])


# ------------------------------------------------------------------------------------------------- fields and pairs
def test_overlap_add_preserves_variance_without_seams() -> None:
    layout = TileLayout(100, 90, 32, 16)
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((120, layout.n_tiles, 32, 32)).astype(np.float32)
    fields = np.stack([layout.overlap_add(t) for t in tiles])
    assert abs(fields.std() - 1) < 0.02
    # variance at every position relative to the tile grid (pixels of the same phase pooled): uniform
    phase = (np.arange(100)[:, None] % 16) * 16 + np.arange(90)[None, :] % 16
    var = np.bincount(phase.ravel(), (fields ** 2).mean(axis=0).ravel()) / np.bincount(phase.ravel())
    assert var.min() > 0.88 and var.max() < 1.12  # sampling error of each phase: 2.2 %


def test_pseudo_low_dose_keeps_mean_and_has_no_seams(stationary_case, tmp_path) -> None:
    _, model = stationary_case
    clean = np.zeros((3, 160, 160), np.float32)  # uniform water
    pseudo = synthesise_pseudo_low_dose(clean, model, seed=3)
    field = pseudo - clean
    assert pseudo.shape == clean.shape and pseudo.dtype == np.float32
    assert abs(float(field.mean())) < 1.5
    assert abs(_rms_std(field) / model.training_stats["noise_std_hu"] - 1) < 0.12
    # tile borders (multiples of the stride, 16 px) against tile centres
    pos = np.arange(160) % 16
    border = np.isin(pos, (15, 0, 1))
    centre = np.isin(pos, (7, 8, 9))
    std_border = field[:, border, :][:, :, border].std()
    std_centre = field[:, centre, :][:, :, centre].std()
    assert abs(std_border / std_centre - 1) < 0.15
    # reproducible for a seed, different for another
    assert np.array_equal(pseudo, synthesise_pseudo_low_dose(clean, model, seed=3))
    assert not np.array_equal(pseudo, synthesise_pseudo_low_dose(clean, model, seed=4))
    # compare_noise / plot on two realisations of the same model: small errors, PNG written
    other = synthesise_pseudo_low_dose(clean, model, seed=5) - clean
    result = compare_noise(field, other, clean, 1.0, n_rois=100)
    soft = result["std_by_band"]["-100..200 HU (soft tissue)"]
    assert abs(soft["relative_error"]) < 0.05
    assert abs(result["nps"]["-100..200 HU (soft tissue)"]["mean_frequency_relative_error"]) < 0.05
    png = plot_noise_comparison(result, tmp_path / "cmp.png", "two realisations")
    assert png.stat().st_size > 10_000


def test_save_load_round_trip_gives_identical_samples(stationary_case, tmp_path) -> None:
    _, model = stationary_case
    path = model.save(tmp_path / "noise.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "tddl-noise-model" and "state_dict" in payload
    loaded = NoiseModel.load(path)
    cond = np.linspace(-50, 50, 17).astype(np.float32)
    assert np.array_equal(model.sample_patches(cond, seed=11), loaded.sample_patches(cond, seed=11))
    clean = np.zeros((70, 50), np.float32)
    assert np.array_equal(model.synthesise_noise_field(clean, 2), loaded.synthesise_noise_field(clean, 2))
    assert loaded.training_stats == model.training_stats or loaded.training_stats.keys() == model.training_stats.keys()
    assert loaded.pixel_size_mm == model.pixel_size_mm and loaded.air_policy == model.air_policy
    with pytest.raises(ValueError, match="noise-model"):
        NoiseModel.load(_write_nifti(tmp_path / "x.nii.gz", np.zeros((8, 8))))


@pytest.mark.gpu
def test_sampling_on_cuda_matches_cpu(stationary_case) -> None:
    _, model = stationary_case
    cond = np.zeros(8, np.float32)
    cpu = model.sample_patches(cond, seed=1)
    gpu = NoiseModel(model.vae.__class__(model.vae.config), model.pixel_size_mm, model.air_policy)
    gpu.vae.load_state_dict(model.vae.state_dict())
    gpu.to("cuda")
    assert np.allclose(cpu, gpu.sample_patches(cond, seed=1), atol=1e-3)


def test_learned_noise_source_feeds_the_adl_patch_dataset(stationary_case, tmp_path) -> None:
    from lib.data import ADLPatchDataset

    _, model = stationary_case
    model_path = model.save(tmp_path / "noise.pt")
    clean, _ = _disc_phantom(96, 2)
    image = _write_nifti(tmp_path / "clean.nii.gz", clean)
    source = LearnedNoiseSource(image, model_path, realisations=2, seed=1, progress=False)
    assert source.noise == "learned" and not source.noise_on_the_fly
    noisy = source.noisy_volume(0, 1)
    assert noisy.shape == clean.shape and not np.array_equal(noisy, source.noisy_volume(0, 0))
    disc = clean > -500
    assert abs(float((noisy - clean)[disc].mean())) < 2.0
    dataset = ADLPatchDataset(source, 2, 32, samples_per_epoch=4, seed=0)
    item = dataset[3]
    assert item["noisy"].shape == (1, 32, 32) and not torch.equal(item["noisy"], item["clean"])
    assert len(source.validation_pairs()) == 1
    heldout = tmp_path / "ct_abdomen_siemens_j2k_slab"
    heldout.mkdir()
    _write_nifti(heldout / "a.nii.gz", clean)
    with pytest.raises(ValueError, match="held-out"):
        LearnedNoiseSource(heldout, model_path, progress=False)
    # a noise model learnt from held-out low-dose scans: refused unless the domain-shift benchmark opts in
    saved_info = dict(model.info)
    try:
        model.info["inputs"] = [str(heldout / "a.nii.gz")]
        learnt_on_heldout = model.save(tmp_path / "noise_heldout.pt")
    finally:
        model.info = saved_info  # the fixture is shared by the module
    with pytest.raises(ValueError, match="held-out"):
        LearnedNoiseSource(image, learnt_on_heldout, progress=False)
    adapted = LearnedNoiseSource(image, learnt_on_heldout, realisations=1, progress=False,
                                 allow_heldout_noise_inputs=True)
    assert adapted.noisy_volume(0).shape == clean.shape
    with pytest.raises(ValueError, match="held-out"):  # the clean images are still checked
        LearnedNoiseSource(heldout, learnt_on_heldout, progress=False, allow_heldout_noise_inputs=True)


@pytest.mark.slow
def test_pseudo_low_dose_from_real_normal_dose_scans_has_the_scanners_noise_not_more(tmp_path, shared_data) -> None:
    """The learnt noise is the scanner's WHOLE low-dose noise; a real normal-dose scan carries noise of its own
    (the Philips thorax about 30 HU). Added on top of it, the pseudo low-dose image had both: 46 HU where the
    scanner's low-dose images have 33. The pseudo pairs made from real normal-dose images (the app's noise
    adaptation with normal_dose, and 'train --noise-model') take the scan's own noise off the learnt noise, so
    the pseudo low-dose image has the noise of the low-dose images the model learnt from (within 10 %)."""
    from lib.data import TrainingDataRecipe, build_training_data
    from lib.noise import estimate_ct_noise_std_hu
    from lib.noise_learning.workflow import adaptation_data

    studies = Path(__file__).resolve().parents[1] / "sample_data" / "studies"
    low_dose_ct = studies / "ct_head_invesalius_ld25.nii.gz"  # the real head CT at a simulated quarter dose
    if not low_dose_ct.is_file():
        pytest.skip(f"{low_dose_ct} missing: build the sample data with ./run.sh")
    low = sitk.ReadImage(str(low_dose_ct))
    low_dose = _write_nifti(tmp_path / "low_dose.nii.gz", sitk.GetArrayFromImage(low)[40:70:5],
                            low.GetSpacing())
    scanner_noise = estimate_ct_noise_std_hu(sitk.GetArrayFromImage(sitk.ReadImage(str(low_dose))))
    thorax = sitk.ReadImage(str(shared_data / "ct_thorax_philips_2mm.nii.gz"))
    normal_dose = [_write_nifti(tmp_path / f"thorax_z{z}.nii.gz",
                                sitk.GetArrayFromImage(thorax)[z:z + 2, 128:384, 128:384], thorax.GetSpacing())
                   for z in (80, 90)]
    own_noise = estimate_ct_noise_std_hu(sitk.GetArrayFromImage(sitk.ReadImage(str(normal_dose[0]))))
    assert 24 < own_noise < 36 and 28 < scanner_noise < 38, (own_noise, scanner_noise)

    data = adaptation_data({"site": low_dose}, tmp_path / "work", normal_dose=normal_dose, noise_steps=40)
    train_recipe = build_training_data(TrainingDataRecipe("CT", clean=[str(p) for p in normal_dose],
                                                          noise_model=str(tmp_path / "work" / "noise_model.pt")),
                                       progress=False)
    pseudo = {"adaptation": data.source.noisy_volume(0, 0), "adaptation validation": data.validation_pairs[0].noisy,
              "train --noise-model": train_recipe.source.noisy_volume(0, 0)}
    for where, image in pseudo.items():
        measured = estimate_ct_noise_std_hu(image)
        assert abs(measured / scanner_noise - 1) < 0.10, (where, measured, scanner_noise, own_noise)
    assert 24 < data.source.reference_noise_std_per_volume[0] < 36  # what was taken off is recorded
    assert train_recipe.record(32)["clean_noise_std_hu"] == train_recipe.source.reference_noise_std_per_volume


def test_learnt_soft_tissue_noise_level_matches_the_scans_known_noise(tmp_path) -> None:
    """A learnt model's soft-tissue noise must be the scans' own: the smooth patches of real scans hold weak
    anatomy and sit where the noise differs from the band's average, so the learnt level was off (a user's real
    quarter-dose scans: 52 HU learnt where they carry 36; the real Philips thorax: 59 where it carries 29; this
    head: 29 where it carries 36). learn_noise_model now measures the scans' soft-tissue noise
    (estimate_ct_noise_std_hu) and stores a level correction; the report states both levels. Real anatomy (the
    InVesalius head CT, ~7 HU of its own) with sinogram-domain quarter-dose noise of KNOWN std added."""
    from lib.noise_learning.workflow import learn_noise_model

    studies = Path(__file__).resolve().parents[1] / "sample_data" / "studies"
    full, low = studies / "ct_head_invesalius.nii.gz", studies / "ct_head_invesalius_ld25.nii.gz"
    if not (full.is_file() and low.is_file()):
        pytest.skip("sample studies missing: build the sample data with ./run.sh")
    low_image = sitk.ReadImage(str(low))
    clean = sitk.GetArrayFromImage(sitk.ReadImage(str(full))).astype(np.float32)[40:70:5]
    noisy = sitk.GetArrayFromImage(low_image).astype(np.float32)[40:70:5]
    soft = np.stack([soft_tissue_mask(x) for x in clean])
    truth = float(np.hypot((noisy - clean)[soft].std(), 7.0))  # added noise and the scan's own (about 7 HU)
    assert 30 < truth < 42, truth
    path = _write_nifti(tmp_path / "low_dose.nii.gz", noisy, low_image.GetSpacing())
    lines: list[str] = []
    model = learn_noise_model([path], steps=30, batch_size=32, progress=False, report=lines.append, force_ct=True)
    generated = _rms_std(model.sample_patches(np.linspace(-50.0, 100.0, 256), seed=1))
    assert abs(generated / truth - 1) < 0.10, (generated, truth, lines)
    cal = model.training_stats["level_calibration"]
    assert abs(cal["calibrated_soft_tissue_std_hu"] - cal["measured_soft_tissue_std_hu"]) < 0.5
    assert any("learnt" in line and "measured in the low-dose scans" in line for line in lines), lines
    assert "measured" in model.summary()
    # saved and loaded, it samples the same; a file without a correction (older models) samples as before
    saved = NoiseModel.load(model.save(tmp_path / "noise.pt"))
    assert np.array_equal(saved.sample_patches([0.0, 40.0], seed=3), model.sample_patches([0.0, 40.0], seed=3))
    payload = torch.load(tmp_path / "noise.pt", map_location="cpu", weights_only=True)
    del payload["level_correction"]
    torch.save(payload, tmp_path / "old.pt")
    old = NoiseModel.load(tmp_path / "old.pt")
    assert old.level_correction == 1.0
    assert np.allclose(old.sample_patches([40.0], seed=3) * model.level_correction,
                       model.sample_patches([40.0], seed=3), rtol=1e-5, atol=1e-4)


def test_cli_learn_noise_no_level_calibration_keeps_the_learnt_level(tmp_path, capsys) -> None:
    """``learn-noise --no-level-calibration`` keeps the learnt level (level_correction 1.0) and the model file says
    calibration was turned off by request; without it the same run calibrates (the level moves). Real anatomy: the
    InVesalius head CT at a simulated quarter dose, 4 slices."""
    from lib.noise_learning.workflow import LEVEL_CALIBRATION_OFF

    low = SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz"
    if not low.is_file():
        pytest.skip(f"{low} missing: build the sample data with ./run.sh")
    image = sitk.ReadImage(str(low))
    path = _write_nifti(tmp_path / "low_dose.nii.gz", sitk.GetArrayFromImage(image)[40:60:5], image.GetSpacing())
    cli = import_cli()
    common = ["learn-noise", "--input", str(path), "--modality", "ct", "--steps", "20", "--batch-size", "16",
              "--device", "cpu", "--seed", "0"]
    models = {}
    for name, extra in (("off", ["--no-level-calibration"]), ("on", [])):
        capsys.readouterr()
        assert cli.main([*common, "--output", str(tmp_path / f"{name}.pt"), *extra]) == 0
        models[name] = (NoiseModel.load(tmp_path / f"{name}.pt"), capsys.readouterr().out)
    off, out = models["off"]
    assert off.level_correction == 1.0
    assert off.training_stats["level_calibration_skipped"] == LEVEL_CALIBRATION_OFF
    assert "level_calibration" not in off.training_stats
    assert "NOT calibrated (turned off by request)" in out and "turned off by request" in off.summary()
    payload = torch.load(tmp_path / "off.pt", map_location="cpu", weights_only=True)
    assert payload["level_correction"] == 1.0
    on, out = models["on"]
    assert abs(on.level_correction - 1.0) > 0.02 and "level_calibration_skipped" not in on.training_stats
    assert "measured in the low-dose scans" in out
    # same seed, same training: the two differ by the level correction only
    assert np.allclose(off.sample_patches([40.0], seed=3) * on.level_correction, on.sample_patches([40.0], seed=3),
                       rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_cli_learn_noise_writes_a_model_and_refuses_a_non_image(tmp_path) -> None:
    _, low = _disc_phantom(128, 3, seed=6)
    patient_folder = tmp_path / "DOE_JANE_1961"  # a site's folders may name patients
    patient_folder.mkdir()
    low_path = _write_nifti(patient_folder / "low_dose.nii.gz", low)
    out = tmp_path / "noise.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = processes.run([sys.executable, CLI, "learn-noise", "--input", low_path, "--output", out, "--modality",
                            "ct", "--steps", "20", "--batch-size", "16", "--device", "cpu"], 600, env=env)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "wrote" in result.stdout and "noise model" in result.stderr  # tqdm bar
    model = NoiseModel.load(out)
    assert model.air_policy in ("learned", "nearest") and abs(model.training_stats["noise_std_hu"] / 25.0 - 1) < 0.15
    assert model.info["inputs"] == ["low_dose.nii.gz"]
    # the file may travel: no folder of the site anywhere in it
    stored = repr(torch.load(out, map_location="cpu", weights_only=False))
    assert "DOE_JANE" not in stored and str(tmp_path) not in stored

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    bad = processes.run([sys.executable, CLI, "learn-noise", "--input", text, "--output", tmp_path / "b.pt"], 600,
                        env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error:")


def _learn_noise_inputs(case: str, folder: Path) -> list[str]:
    """``learn-noise`` arguments (after ``--input``) that it must refuse, made in ``folder``."""
    _, low = _disc_phantom(128, 3, seed=6)
    if case == "empty":
        (folder / "empty").mkdir()
        return [str(folder / "empty")]
    if case == "non-CT":
        return [str(_write_nifti(folder / "mr.nii.gz", np.abs(_correlated_noise((2, 64, 64), 100.0, 1.0, 7)) + 200.0))]
    if case == "too few":
        return [str(_write_nifti(folder / "tiny.nii.gz", low[:1, :40, :40])), "--patch-size", "32"]
    if case == "held-out":
        heldout = folder / "ct_abdomen_siemens_j2k_slab"
        heldout.mkdir()
        _write_nifti(heldout / "a.nii.gz", low)
        return [str(heldout)]
    if case == "NaN":
        low = low.copy()
        low[1, 5, 5] = np.nan
        return [str(_write_nifti(folder / "nan.nii.gz", low))]
    if case == "output exists":
        (folder / "noise.pt").write_bytes(b"an earlier model")  # no --overwrite
        return [str(_write_nifti(folder / "low_dose.nii.gz", low))]
    raise ValueError(case)


@pytest.mark.parametrize("case, words", [("empty", "no image files"), ("non-CT", "not ct"),
                                         ("too few", "noise patches"), ("held-out", "held-out"),
                                         ("output exists", "exists"),
                                         ("NaN", "1 nan values; replace them before learning noise")])
def test_cli_learn_noise_refuses_bad_input_with_one_line_reason(tmp_path, capsys, case, words) -> None:
    arguments = _learn_noise_inputs(case, tmp_path)
    cli = import_cli()
    capsys.readouterr()
    code = cli.main(["learn-noise", "--output", str(tmp_path / "noise.pt"), "--steps", "2", "--input", *arguments])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert words in err[0].lower(), err[0]
    if case == "output exists":
        assert (tmp_path / "noise.pt").read_bytes() == b"an earlier model"
    if case == "NaN":  # the reader's wording is for denoising; learn-noise denoises nothing
        assert "denoising" not in err[0], err[0]


def test_cli_train_adl_on_learned_noise_pairs(stationary_case, tmp_path) -> None:
    _, model = stationary_case
    model_path = model.save(tmp_path / "noise.pt")
    clean, _ = _disc_phantom(64, 2)
    clean_path = _write_nifti(tmp_path / "clean.nii.gz", clean)
    cli = import_cli()
    weights = tmp_path / "adl.pt"
    code = cli.main(["train", "--model", "adl", "--output", str(weights), "--clean", str(clean_path), "--modality",
                     "ct", "--noise-model", str(model_path), "--patch-size", "32", "--batch-size", "2",
                     "--steps-g-warmup", "1", "--steps-d-warmup", "1", "--steps-adversarial", "1", "--filters",
                     "8,8,8,8", "--disc-filters", "4,4,4,4", "--enhancer-filters", "4", "--device", "cpu",
                     "--validation-every", "0", "--checkpoint-every", "0"])
    assert code == 0 and weights.is_file()
    record = torch.load(weights, map_location="cpu", weights_only=True)["training"]
    assert record["data"]["noise"].startswith("learned")
    assert cli.main(["train", "--output", str(tmp_path / "w2.pt"), "--clean", str(clean_path), "--modality", "ct",
                     "--noise-model", str(model_path), "--noise", "gaussian"]) == 2


def test_cli_train_noise_model_refuses_a_nan_clean_image_without_naming_denoising(stationary_case, tmp_path,
                                                                                   capsys) -> None:
    """The image reader's refusal ends "replace them before denoising": 'train --noise-model' said so of its clean
    images, a step it never takes."""
    _, model = stationary_case
    model_path = model.save(tmp_path / "noise.pt")
    clean, _ = _disc_phantom(64, 2)
    clean[1, 5, 5] = np.nan
    clean_path = _write_nifti(tmp_path / "clean.nii.gz", clean)
    cli = import_cli()
    capsys.readouterr()
    code = cli.main(["train", "--model", "adl", "--output", str(tmp_path / "adl.pt"), "--clean", str(clean_path),
                     "--modality", "ct", "--noise-model", str(model_path), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "1 NaN values; replace them before training on it" in err[0], err
