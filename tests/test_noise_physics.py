"""Noise physics: projector units, low-dose CT statistics on phantoms and real slices, MR/generic noise, NPS.

Real behaviour, no mocks. Kept small for a 2-core machine: phantoms are 128-160 px with 180-360 views; the real
512x512 slices are simulated a few times each and shared through module-scoped fixtures.
"""
from __future__ import annotations

import math
import os

import numpy as np
from scipy import ndimage
import pytest
import torch

from lib.noise import (
    RECONSTRUCTION_FILTERS,
    LowDoseCTSettings,
    ParallelBeamGeometry,
    add_gaussian_noise,
    add_poisson_noise,
    add_rician_noise,
    add_speckle_noise,
    estimate_ct_noise_std_hu,
    estimate_noise_sigma,
    extract_noise_rois,
    flat_window_noise_std,
    filtered_back_project,
    forward_project,
    hu_to_mu,
    mu_to_hu,
    noise_std_by_band,
    plot_noise_power_spectra,
    radial_noise_power_spectrum,
    rician_expected_magnitude,
    sample_low_dose_settings,
    simulate_low_dose_ct,
    soft_tissue_mask,
)
from lib.noise.ct_lowdose import MU_WATER_PER_MM, poisson_by_inversion

torch.set_num_threads(min(2, torch.get_num_threads()))


def _radius(n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2.0
    return np.hypot(yy, xx)


def _water_cylinder(n: int = 160, radius_px: float = 64.0) -> np.ndarray:
    """Uniform water (0 HU) disc in air (-1000 HU), float32 (n, n)."""
    return np.where(_radius(n) < radius_px, 0.0, -1000.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------- projector
def test_fbp_of_projection_recovers_mu_of_a_disc() -> None:
    n, pixel = 128, 1.5
    mu = np.where(_radius(n) < 45, MU_WATER_PER_MM, 0.0).astype(np.float32)
    geometry = ParallelBeamGeometry(n_views=180)
    sino = forward_project(torch.from_numpy(mu), pixel, geometry)
    assert sino.shape == (180, geometry.num_bins((n, n), pixel))
    # Line integral through the centre = diameter * mu (unitless), checks the mm scaling of the projector.
    centre = sino[:, sino.shape[1] // 2].numpy()
    assert np.allclose(centre, 2 * 45 * pixel * MU_WATER_PER_MM, rtol=0.03)
    rec = filtered_back_project(sino, pixel, geometry, "ramp", image_shape=(n, n)).numpy()
    inside = _radius(n) < 38
    assert abs(rec[inside].mean() / MU_WATER_PER_MM - 1) < 0.01
    assert np.all(np.abs(rec[inside] / MU_WATER_PER_MM - 1) < 0.02)
    assert abs(rec[_radius(n) > 52].mean()) < 0.01 * MU_WATER_PER_MM


def test_projection_of_an_off_centre_disc_follows_the_sinusoid() -> None:
    """Centroid of each projection = x0 cos(theta) + y0 sin(theta); mass = area * mu (odd view count)."""
    n, pixel, radius = 96, 0.8, 8.0
    x0, y0 = 14.0, -9.0  # mm, right of and above the centre (y grows with the row index)
    yy, xx = np.mgrid[0:n, 0:n]
    x_mm, y_mm = (xx - (n - 1) / 2) * pixel, (yy - (n - 1) / 2) * pixel
    mu = np.where(np.hypot(x_mm - x0, y_mm - y0) < radius, 0.02, 0.0).astype(np.float32)
    geometry = ParallelBeamGeometry(n_views=45)
    sino = forward_project(torch.from_numpy(mu), pixel, geometry).double().numpy()
    t = (np.arange(sino.shape[1]) - (sino.shape[1] - 1) / 2) * pixel
    theta = np.arange(45) * np.pi / 45
    centroid = (sino * t).sum(1) / sino.sum(1)
    cx, cy = (mu * x_mm).sum() / mu.sum(), (mu * y_mm).sum() / mu.sum()  # centroid of the pixelated disc
    assert abs(cx - x0) < 0.2 and abs(cy - y0) < 0.2
    assert np.allclose(centroid, cx * np.cos(theta) + cy * np.sin(theta), atol=0.05)
    mass = sino.sum(1) * pixel  # integral over t of the line integrals = integral of mu over the plane
    assert np.allclose(mass, mu.sum() * pixel * pixel, rtol=5e-3)


def test_fbp_recovers_hu_of_inserts_for_every_filter() -> None:
    n, pixel = 128, 1.0
    hu = np.where(_radius(n) < 55, 40.0, -1000.0).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n]
    inserts = {(44, 64): -100.0, (84, 64): 300.0, (64, 40): 1000.0, (64, 88): -500.0}
    for (cy, cx), value in inserts.items():
        hu[np.hypot(yy - cy, xx - cx) < 9] = value
    geometry = ParallelBeamGeometry(n_views=180)
    sino = forward_project(hu_to_mu(torch.from_numpy(hu)), pixel, geometry)
    for name in RECONSTRUCTION_FILTERS:
        rec_hu = mu_to_hu(filtered_back_project(sino, pixel, geometry, name, 1.0, image_shape=(n, n))).numpy()
        assert np.isfinite(rec_hu).all()
        for (cy, cx), value in inserts.items():
            centre = np.hypot(yy - cy, xx - cx) < 3
            assert abs(rec_hu[centre].mean() - value) < 15, (name, value, rec_hu[centre].mean())
        background = (_radius(n) < 50) & np.all(
            [np.hypot(yy - cy, xx - cx) > 16 for cy, cx in inserts], axis=0
        )
        assert abs(np.median(rec_hu[background]) - 40.0) < 6, name


def test_projector_batch_equals_per_slice_and_filters_differ() -> None:
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.random((3, 48, 40), dtype=np.float32) * 0.02)
    geometry = ParallelBeamGeometry(n_views=60)
    pixel = (1.0, 1.2)  # anisotropic pixels and a non-square image take the other code paths
    sino = forward_project(batch, pixel, geometry, memory_budget_bytes=200_000)  # many small view chunks
    for k in range(3):
        single = forward_project(batch[k], pixel, geometry)
        assert torch.allclose(sino[k], single, atol=1e-5)
    recs = {}
    for name in RECONSTRUCTION_FILTERS:
        rec = filtered_back_project(sino, pixel, geometry, name, 0.8, image_shape=(48, 40))
        assert rec.shape == (3, 48, 40)
        single = filtered_back_project(sino[1], pixel, geometry, name, 0.8, image_shape=(48, 40))
        assert torch.allclose(rec[1], single, atol=1e-6)
        recs[name] = rec
    assert not torch.allclose(recs["ramp"], recs["hann"])
    with pytest.raises(ValueError):
        filtered_back_project(sino, pixel, geometry, "no-such-filter", image_shape=(48, 40))
    with pytest.raises(ValueError):
        filtered_back_project(sino, pixel, geometry, "hann", cutoff=0.0, image_shape=(48, 40))


# ---------------------------------------------------------------------------------------- low-dose CT, phantom
PHANTOM_GEOMETRY = ParallelBeamGeometry(n_views=360)


def _phantom_settings(dose: float, **kw: object) -> LowDoseCTSettings:
    kw.setdefault("geometry", PHANTOM_GEOMETRY)
    return LowDoseCTSettings(dose_fraction=dose, reference_has_noise=False, **kw)


def test_water_cylinder_mean_preserved_and_noise_scales_with_dose() -> None:
    phantom = _water_cylinder()
    central = _radius(phantom.shape[0]) < 40
    stds = {}
    for dose in (1.0, 0.5, 0.25, 0.125):
        low = simulate_low_dose_ct(phantom, 1.25, _phantom_settings(dose, reconstruction_filter="hann"), seed=7)
        assert low.dtype == np.float32 and low.shape == phantom.shape
        noise = low - phantom
        stds[dose] = float(noise[central].std())
        if dose == 0.25:
            assert abs(float(low[central].mean())) < 3.0  # HU of water preserved (no log/clipping bias)
    assert stds[1.0] > 1.0
    for dose in (0.5, 0.25, 0.125):
        ratio = stds[dose] / stds[1.0]
        assert abs(ratio / math.sqrt(1 / dose) - 1) < 0.10, (dose, ratio)


def test_added_noise_has_no_log_bias_in_a_large_body() -> None:
    """-log of noisy counts is biased by ~(lam + sigma_e^2) / (2 lam^2): without its removal a 38 x 28 cm water
    ellipse at 60 HU of soft-tissue noise came out +3 HU brighter inside, +6 HU at the centre."""
    n, pixel = 256, 1.6
    y = (np.arange(n) - (n - 1) / 2) * pixel
    yy, xx = np.meshgrid(y, y, indexing="ij")
    phantom = np.where((xx / 190.0) ** 2 + (yy / 140.0) ** 2 <= 1, 40.0, -1000.0).astype(np.float32)
    inner = (xx / 150.0) ** 2 + (yy / 100.0) ** 2 <= 1
    centre = np.hypot(xx, yy) < 40.0
    volume = np.repeat(phantom[None], 3, axis=0)
    settings = LowDoseCTSettings(target_noise_std_hu=60.0, geometry=PHANTOM_GEOMETRY)
    noise = simulate_low_dose_ct(volume, pixel, settings, seed=1) - volume
    assert 50.0 < float(noise[:, inner].std()) < 90.0
    assert abs(float(noise[:, inner].mean())) < 1.5, float(noise[:, inner].mean())
    assert abs(float(noise[:, centre].mean())) < 3.5, float(noise[:, centre].mean())


def test_dose_ratio_of_a_noisy_reference_adds_the_variance_difference() -> None:
    """reference_has_noise=True adds (1/d - 1) / I0 worth of variance: at d = 0.5 the same as a full dose."""
    phantom = _water_cylinder()
    central = _radius(phantom.shape[0]) < 40
    full = LowDoseCTSettings(dose_fraction=1.0, reference_has_noise=False, geometry=PHANTOM_GEOMETRY)
    half = LowDoseCTSettings(dose_fraction=0.5, reference_has_noise=True, geometry=PHANTOM_GEOMETRY)
    std_full = (simulate_low_dose_ct(phantom, 1.25, full, seed=1) - phantom)[central].std()
    std_half = (simulate_low_dose_ct(phantom, 1.25, half, seed=2) - phantom)[central].std()
    assert abs(std_half / std_full - 1) < 0.15
    # A noisy reference at full dose gets nothing added.
    same = simulate_low_dose_ct(phantom, 1.25, LowDoseCTSettings(dose_fraction=1.0, geometry=PHANTOM_GEOMETRY))
    assert np.array_equal(same, phantom)


def test_seeding_is_reproducible_and_independent_of_batching() -> None:
    phantom = _water_cylinder(96, 36.0)
    settings = _phantom_settings(0.25, geometry=ParallelBeamGeometry(n_views=180))
    a = simulate_low_dose_ct(phantom, 2.0, settings, seed=11)
    b = simulate_low_dose_ct(phantom, 2.0, settings, seed=11)
    c = simulate_low_dose_ct(phantom, 2.0, settings, seed=12)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    volume = np.stack([phantom, phantom + 20.0, phantom])
    one = simulate_low_dose_ct(volume, (3.0, 2.0, 2.0), settings, seed=5, batch_size=1)
    three = simulate_low_dose_ct(volume, (3.0, 2.0, 2.0), settings, seed=5, batch_size=3, progress=True)
    assert one.shape == volume.shape
    assert np.allclose(one, three, atol=1e-3)
    assert not np.allclose(one[0], one[2])  # slices get independent noise
    rng_a = simulate_low_dose_ct(phantom, 2.0, settings, seed=np.random.default_rng(3))
    rng_b = simulate_low_dose_ct(phantom, 2.0, settings, seed=np.random.default_rng(3))
    assert np.array_equal(rng_a, rng_b)


def test_invalid_inputs_raise_value_errors() -> None:
    img = np.zeros((32, 32), dtype=np.float32)
    with pytest.raises(ValueError):
        LowDoseCTSettings(dose_fraction=0.0)
    with pytest.raises(ValueError):
        LowDoseCTSettings(dose_fraction=1.5)
    with pytest.raises(ValueError):
        LowDoseCTSettings(reconstruction_filter="sharpest")
    with pytest.raises(ValueError):
        LowDoseCTSettings(target_noise_std_hu=-5.0)
    with pytest.raises(ValueError):
        simulate_low_dose_ct(np.full((32, 32), np.nan), 1.0)
    with pytest.raises(ValueError):
        simulate_low_dose_ct(np.zeros(32), 1.0)
    with pytest.raises(ValueError):
        simulate_low_dose_ct(np.zeros((2, 2, 32, 32)), 1.0)
    with pytest.raises(ValueError):
        simulate_low_dose_ct(img, 0.0)
    with pytest.raises(ValueError):
        simulate_low_dose_ct(img, (1.0, -1.0))


def test_sample_low_dose_settings_ranges_and_reproducibility() -> None:
    draws = [sample_low_dose_settings(np.random.default_rng(k), pixel_size_mm=0.8) for k in range(40)]
    again = [sample_low_dose_settings(np.random.default_rng(k), pixel_size_mm=0.8) for k in range(40)]
    assert draws == again
    assert all(0.05 <= s.dose_fraction <= 0.5 and 0.5 <= s.filter_cutoff <= 1.0 for s in draws)
    assert all(360 <= s.geometry.n_views <= 1080 and 0.6 <= s.geometry.detector_bin_mm <= 1.2 for s in draws)
    assert len({s.reconstruction_filter for s in draws}) >= 5
    calibrated = sample_low_dose_settings(1, noise_std_range_hu=(10.0, 60.0))
    assert 10.0 <= calibrated.target_noise_std_hu <= 60.0
    with pytest.raises(ValueError):
        sample_low_dose_settings(0, dose_range=(0.0, 0.5))


def test_poisson_by_inversion_statistics() -> None:
    rng = np.random.default_rng(0)
    for lam in (0.7, 12.0, 39.0, 45.0, 900.0, 2e5):
        counts = poisson_by_inversion(np.full(200_000, lam), rng.random(200_000))
        assert abs(counts.mean() / lam - 1) < 0.01 + 3 / math.sqrt(200_000 * lam)
        assert abs(counts.var() / lam - 1) < 0.03
        assert np.all(counts == np.round(counts)) and counts.min() >= 0


# ------------------------------------------------------------------------------------ low-dose CT, real slices
REAL_GEOMETRY = ParallelBeamGeometry(n_views=360)  # half the default views: keeps the 512x512 tests quick


@pytest.fixture(scope="module")
def head_slice() -> np.ndarray:
    pydicom = pytest.importorskip("pydicom")
    data_store = pytest.importorskip("data_store")
    path = os.path.join(os.path.dirname(data_store.__file__), "data", "693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    return (ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(
        np.float32
    )


HEAD_PIXEL_MM = 0.4785


@pytest.fixture(scope="module")
def head_low_dose(head_slice: np.ndarray) -> dict[str, np.ndarray]:
    """Quarter-dose simulations of the head slice with three filters (same seed)."""
    out = {}
    for name in ("ramp", "hann", "smooth"):
        settings = LowDoseCTSettings(dose_fraction=0.25, reconstruction_filter=name, geometry=REAL_GEOMETRY)
        out[name] = simulate_low_dose_ct(head_slice, HEAD_PIXEL_MM, settings, seed=2024)
    return out


def test_real_head_slice_mean_hu_preserved(head_slice: np.ndarray, head_low_dose: dict[str, np.ndarray]) -> None:
    mask = soft_tissue_mask(head_slice)
    assert mask.sum() > 20_000  # the brain
    for name, low in head_low_dose.items():
        noise = low - head_slice
        assert noise[mask].std() > 2.0, name  # noise was added
        assert abs(float(low[mask].mean() - head_slice[mask].mean())) < 3.0, name
        # Also in a small uniform ROI (a 24 x 24 patch of brain).
        rois = extract_noise_rois(low, head_slice, 24, 8, hu_range=(0.0, 100.0), seed=1)
        assert len(rois) == 8
        assert abs(float(rois.mean())) < 5.0, name


def test_real_head_slice_texture_follows_the_filter(
    head_slice: np.ndarray, head_low_dose: dict[str, np.ndarray], tmp_path
) -> None:
    spectra = {}
    for name, low in head_low_dose.items():
        rois = extract_noise_rois(low, head_slice, 64, 24, hu_range=(0.0, 100.0), seed=0)
        spectra[name] = radial_noise_power_spectrum(rois, HEAD_PIXEL_MM)
    f = {name: s.mean_frequency for name, s in spectra.items()}
    assert f["ramp"] > 1.15 * f["hann"] > 1.15 * 1.0 * f["smooth"], f
    assert 0.2 < spectra["ramp"].mean_frequency_cycles_per_pixel() < 0.4
    path = plot_noise_power_spectra(spectra, tmp_path / "nps.png", title="head, quarter dose")
    assert path.stat().st_size > 5_000
    assert plot_noise_power_spectra(spectra, tmp_path / "sub" / "norm.png", normalize=True).exists()


def test_real_head_slice_calibrated_noise_std(head_slice: np.ndarray) -> None:
    settings = LowDoseCTSettings(target_noise_std_hu=20.0, reconstruction_filter="cosine", geometry=REAL_GEOMETRY)
    low, details = simulate_low_dose_ct(head_slice, HEAD_PIXEL_MM, settings, seed=3, return_details=True)
    mask = soft_tissue_mask(head_slice)
    measured = float((low - head_slice)[mask].std())
    assert abs(measured / 20.0 - 1) < 0.10, measured
    assert details.iterations[0] <= settings.max_calibration_iterations
    assert np.isfinite(details.photons[0]) and details.photons[0] > 0


def test_real_thorax_slice_mean_and_calibration(shared_data) -> None:
    sitk = pytest.importorskip("SimpleITK")
    path = shared_data / "ct_thorax_philips_2mm.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    hu = volume[volume.shape[0] // 2].astype(np.float32)
    mask = soft_tissue_mask(hu)
    assert mask.sum() > 5_000
    for target in (15.0, 45.0):
        settings = LowDoseCTSettings(target_noise_std_hu=target, reconstruction_filter="hann", geometry=REAL_GEOMETRY)
        low = simulate_low_dose_ct(hu, 0.977, settings, seed=4)
        noise = low - hu
        assert abs(float(noise[mask].std()) / target - 1) < 0.10, (target, noise[mask].std())
        assert abs(float(noise[mask].mean())) < 5.0
    bands = noise_std_by_band(noise, hu)
    assert np.isfinite(bands[(-100.0, 200.0)]) and bands[(-100.0, 200.0)] > 0


# ----------------------------------------------------------------------------------------------------------- MR
def test_rician_noise_bias_and_std() -> None:
    sigma_pct, peak = 5.0, 1000.0
    sigma = sigma_pct / 100 * peak
    image = np.zeros((256, 256), dtype=np.float32)
    image[:, 128:] = peak  # background left, high signal right
    noisy = add_rician_noise(image, sigma_pct, seed=0)
    assert noisy.dtype == np.float32 and noisy.shape == image.shape and noisy.min() >= 0
    background, bright = noisy[:, :128], noisy[:, 128:]
    assert abs(background.mean() / (sigma * math.sqrt(math.pi / 2)) - 1) < 0.02  # Rayleigh noise floor
    assert abs(bright.mean() - peak) < 0.01 * peak
    assert abs(bright.std() / sigma - 1) < 0.03
    assert np.isclose(rician_expected_magnitude(0.0, sigma), sigma * math.sqrt(math.pi / 2))
    assert np.isclose(rician_expected_magnitude(peak, sigma), bright.mean(), rtol=0.002)
    assert np.array_equal(noisy, add_rician_noise(image, sigma_pct, seed=0))
    assert not np.array_equal(noisy, add_rician_noise(image, sigma_pct, seed=1))
    # reference_max: the same sigma for a dimmer image.
    dim = add_rician_noise(image * 0.5, sigma_pct, seed=0, reference_max=peak)
    assert abs(dim[:, 128:].std() / sigma - 1) < 0.03
    with pytest.raises(ValueError):
        add_rician_noise(image - 1.0, 5.0)
    with pytest.raises(ValueError):
        add_rician_noise(image, -1.0)


# ------------------------------------------------------------------------------------------------------ generic
def test_generic_noise_statistics() -> None:
    image = np.full((300, 300), 100.0, dtype=np.float32)
    g = add_gaussian_noise(image, 7.0, seed=1)
    assert g.dtype == np.float32 and g.shape == image.shape
    assert abs(g.mean() - 100) < 0.1 and abs(g.std() / 7.0 - 1) < 0.02
    assert np.array_equal(g, add_gaussian_noise(image, 7.0, seed=1))

    ramp = np.tile(np.linspace(0, 200, 300, dtype=np.float32), (300, 1))
    p = add_poisson_noise(ramp, peak=50.0, seed=2)
    assert p.dtype == np.float32 and p.shape == ramp.shape
    scale = 50.0 / 200.0
    top = ramp > 190  # counts ~ 48-50, variance = value / scale
    assert abs(p[top].mean() / ramp[top].mean() - 1) < 0.02
    assert abs(p[top].var() / (ramp[top].mean() / scale) - 1) < 0.1
    assert np.array_equal(p, add_poisson_noise(ramp, 50.0, seed=2))
    with pytest.raises(ValueError):
        add_poisson_noise(ramp - 10, 50.0)
    with pytest.raises(ValueError):
        add_poisson_noise(ramp, 0.0)

    s = add_speckle_noise(image, 0.1, seed=3)
    assert abs(s.mean() - 100) < 0.2 and abs(s.std() / 10.0 - 1) < 0.03
    assert np.array_equal(s, add_speckle_noise(image, 0.1, seed=3))
    with pytest.raises(ValueError):
        add_gaussian_noise(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(ValueError):
        add_speckle_noise(image, -0.1)


# ---------------------------------------------------------------------------------------------------------- NPS
def test_nps_of_white_noise_is_flat_and_integrates_to_variance() -> None:
    rng = np.random.default_rng(0)
    sigma, pixel = 12.0, 0.7
    rois = rng.normal(0, sigma, size=(32, 64, 64))
    nps = radial_noise_power_spectrum(rois, pixel, n_bins=32, detrend=False)
    assert abs(nps.variance / sigma**2 - 1) < 0.05  # Parseval
    expected = sigma**2 * pixel * pixel  # flat level in HU^2 mm^2
    assert np.all(np.abs(nps.nps[1:] / expected - 1) < 0.15)
    assert np.all(np.diff(nps.frequencies) > 0) and nps.frequencies[-1] <= 0.5 / pixel + 1e-9
    # Mean frequency of a flat radial NPS up to Nyquist is about half of it.
    assert abs(nps.mean_frequency / (0.5 * 0.5 / pixel) - 1) < 0.1
    from scipy import ndimage

    smooth = np.stack([ndimage.gaussian_filter(r, 1.5) for r in rois])
    smooth_nps = radial_noise_power_spectrum(smooth, pixel, n_bins=32)
    assert smooth_nps.mean_frequency < 0.6 * nps.mean_frequency
    assert smooth_nps.peak_frequency < nps.frequencies[-1] / 2
    # Detrending removes a ramp that would otherwise dominate the low frequencies.
    tilted = rois + np.linspace(0, 200, 64)[None, None, :]
    assert radial_noise_power_spectrum(tilted, pixel, n_bins=32).mean_frequency > 0.9 * nps.mean_frequency


def test_noise_std_by_band_and_rois() -> None:
    rng = np.random.default_rng(1)
    reference = np.where(np.arange(100)[None, :] < 50, -800.0, 40.0) * np.ones((100, 1))
    noise = np.where(reference < 0, 5.0, 20.0) * rng.standard_normal((100, 100))
    bands = noise_std_by_band(noise, reference)
    assert abs(bands[(-1000.0, -500.0)] / 5.0 - 1) < 0.05
    assert abs(bands[(-100.0, 200.0)] / 20.0 - 1) < 0.05
    assert math.isnan(bands[(200.0, 3000.0)])
    rois = extract_noise_rois(reference + noise, reference, 16, 10, seed=0)
    assert rois.shape == (10, 16, 16)
    assert abs(rois.std() / 20.0 - 1) < 0.1  # all from the soft-tissue half


# --------------------------------------------------------------------------------------------------- estimation
def test_estimate_noise_sigma() -> None:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:128, 0:128]
    clean = 200.0 * (np.hypot(yy - 64, xx - 64) < 40)  # piecewise constant with edges
    noisy = clean + rng.normal(0, 15.0, clean.shape)
    assert abs(estimate_noise_sigma(noisy) / 15.0 - 1) < 0.1
    assert abs(estimate_noise_sigma(noisy, "local_std") / 15.0 - 1) < 0.15
    # A mask restricts the estimate (here: the flat background only, with different noise).
    two_level = clean + np.where(clean > 0, rng.normal(0, 40.0, clean.shape), rng.normal(0, 15.0, clean.shape))
    background = np.hypot(yy - 64, xx - 64) > 45
    assert abs(estimate_noise_sigma(two_level, "local_std", window=5, quantile=0.5, mask=background) / 15 - 1) < 0.1
    volume = np.stack([clean + rng.normal(0, 15.0, clean.shape) for _ in range(3)])
    assert abs(estimate_noise_sigma(volume) / 15.0 - 1) < 0.1
    with pytest.raises(ValueError):
        estimate_noise_sigma(noisy, "nope")


def _filtered_white_noise(shape: tuple[int, int], sigma_px: float, std: float, seed: int) -> np.ndarray:
    """Gaussian-filtered white noise of exactly ``std`` over the field (``sigma_px`` 0: white)."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal((shape[0] + 64, shape[1] + 64))
    field = (ndimage.gaussian_filter(white, sigma_px) if sigma_px > 0 else white)[32:-32, 32:-32]
    return (field / field.std() * std).astype(np.float32)


def test_ct_noise_estimate_reads_correlated_noise_on_a_real_slice(head_slice: np.ndarray,
                                                                   head_low_dose: dict[str, np.ndarray]) -> None:
    """estimate_ct_noise_std_hu gives the soft-tissue pixel noise std of correlated noise too. The median 5 x 5
    local std it used read low where the noise is correlated (a smooth reconstruction kernel): each small window's
    own mean took the noise's low frequencies away (24 HU for 30 HU of noise low-pass filtered over a pixel; 26 HU
    for 30 HU of FBP noise with the smooth filter). A real head slice (its own noise about 4 HU, counted in the
    truth) with noise of known std added: white, Gaussian-filtered over 1 and 1.5 pixels, and sinogram-domain
    quarter-dose noise reconstructed with the smooth filter; within 10 % of the truth."""
    mask = soft_tissue_mask(head_slice)
    own = estimate_ct_noise_std_hu(head_slice)
    assert own is not None and own < 6.0, own
    cases = {f"gaussian {sigma_px} px, {std} HU": _filtered_white_noise(head_slice.shape, sigma_px, std, seed)
             for seed, (sigma_px, std) in enumerate([(0.0, 15.0), (0.0, 45.0), (1.0, 30.0), (1.5, 30.0)])}
    cases["FBP smooth filter, quarter dose"] = head_low_dose["smooth"] - head_slice
    for name, added in cases.items():
        noisy = head_slice + added
        truth = float(np.hypot(added[soft_tissue_mask(noisy) & mask].std(), own))
        measured = estimate_ct_noise_std_hu(noisy)
        assert abs(measured / truth - 1) < 0.10, (name, measured, truth)


def test_flat_window_noise_std_on_a_flat_phantom() -> None:
    """Unbiased for white noise; correlated noise (Gaussian-filtered over 1.5 px) within 10 %; a gradient and
    sparse edges do not count; None where the mask holds too few windows of any size."""
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    ramp = 40.0 + 0.5 * xx - 0.3 * yy  # a plane: removed in every window
    for sigma_px, std, tolerance in ((0.0, 10.0, 0.03), (0.0, 60.0, 0.03), (1.5, 30.0, 0.10)):
        noisy = ramp + _filtered_white_noise(ramp.shape, sigma_px, std, 7)
        assert abs(flat_window_noise_std(noisy) / std - 1) < tolerance, (sigma_px, std)
    # a few vertical edges (100 HU steps every 64 px) touch under half the windows: the median ignores them
    edges = ramp + 100.0 * ((xx // 64) % 2) + _filtered_white_noise(ramp.shape, 0.0, 20.0, 8)
    assert abs(flat_window_noise_std(edges) / 20.0 - 1) < 0.05
    tiny = np.zeros((256, 256), bool)
    tiny[:6, :6] = True
    assert flat_window_noise_std(ramp, tiny) is None
    with pytest.raises(ValueError):
        flat_window_noise_std(ramp, window=24)


def test_ct_noise_estimate_reads_the_whole_mask_where_the_noise_level_varies() -> None:
    """Wide windows fit only in the wide parts of the soft-tissue mask; where the noise is higher there (FBP noise is
    highest in the middle of the body) the wide windows alone read the wide part's level, not the mask's. Soft
    tissue in air: a disc of 50 px radius and three 18 px rings around it (no 25 x 25 window fits in an eroded
    ring), noise std falling from 40 HU at the centre to 25 HU at the outer ring, white and Gaussian-filtered over
    1 px: within 8 % of the pixel std over the mask (the wide windows alone read it about 20 % high), and the
    correlated noise is still read whole."""
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    r = np.hypot(yy - 128, xx - 128)
    tissue = (r < 50) | ((r > 58) & (r < 76)) | ((r > 84) & (r < 102)) | ((r > 108) & (r < 126))
    std = 40.0 - 15.0 * np.minimum(r, 125.0) / 125.0
    for sigma_px in (0.0, 1.0):
        noise = _filtered_white_noise(tissue.shape, sigma_px, 1.0, 0) * std
        image = np.where(tissue, 40.0 + 0.1 * xx, -1000.0) + noise
        truth = float(noise[soft_tissue_mask(image) & tissue].std())
        measured = estimate_ct_noise_std_hu(image)
        assert measured is not None and abs(measured / truth - 1) < 0.08, (sigma_px, measured, truth)


def test_flat_window_noise_std_ignores_nan_outside_its_windows() -> None:
    """flat_window_noise_std uses the windows lying inside the mask only, so a NaN or inf outside them (padding
    outside a reconstruction's field of view, left out of the mask) must not change the estimate; the running
    sums of its box filters carried one along the whole row and the estimate came out NaN. A window holding one
    inside the mask is left out."""
    rng = np.random.default_rng(3)
    image = 40.0 + rng.normal(0.0, 10.0, (2, 200, 200))
    mask = np.ones(image.shape, bool)
    mask[:, :, :8] = False
    reference = flat_window_noise_std(image, mask)
    padded = image.copy()
    padded[:, :, :8] = np.nan
    padded[1, 150:, :4] = np.inf
    assert flat_window_noise_std(padded, mask) == pytest.approx(reference, rel=1e-9)
    inside = image.copy()
    inside[0, 100, 100] = np.nan  # inside the mask: its windows left out, the others read as before
    value = flat_window_noise_std(inside, mask)
    assert value is not None and abs(value / 10.0 - 1) < 0.03


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    phantom = _water_cylinder(96, 36.0)
    settings = _phantom_settings(0.25, geometry=ParallelBeamGeometry(n_views=180))
    cpu = simulate_low_dose_ct(phantom, 2.0, settings, seed=9, device="cpu")
    gpu = simulate_low_dose_ct(phantom, 2.0, settings, seed=9, device="cuda")
    assert np.allclose(cpu, gpu, atol=0.05)


def test_tube_current_modulation_removes_lateral_streaks_at_equal_dose():
    """An elongated body (a wide water ellipse) starves the lateral rays at a fixed flux: the added noise is
    streaky (it varies much more from row to row than along a row). Angular modulation (flux ~ sqrt of the
    view's attenuation, same mean flux) makes it far more isotropic and keeps the mean HU."""
    from lib.noise import LowDoseCTSettings, simulate_low_dose_ct, tube_current_modulation_factors

    yy, xx = np.mgrid[:128, :128]
    body = ((xx - 63.5) / 58.0) ** 2 + ((yy - 63.5) / 24.0) ** 2 <= 1.0
    phantom = np.where(body, 0.0, -1000.0).astype(np.float32)
    pixel_mm = 3.5  # 406 mm wide, 168 mm deep: an abdomen with arms down
    inside = ndimage.binary_erosion(body, iterations=4)
    anisotropy = {}
    for modulate in (False, True):
        settings = LowDoseCTSettings(dose_fraction=0.25, full_dose_photons=2e6, reconstruction_filter="hann",
                                     geometry=ParallelBeamGeometry(n_views=180), reference_has_noise=False,
                                     tube_current_modulation=modulate)
        noise = simulate_low_dose_ct(phantom, pixel_mm, settings, seed=5) - phantom
        assert abs(float(noise[inside].mean())) < 3.0
        across_rows = np.diff(noise, axis=0)[inside[1:] & inside[:-1]].var()
        along_rows = np.diff(noise, axis=1)[inside[:, 1:] & inside[:, :-1]].var()
        anisotropy[modulate] = across_rows / along_rows
    assert anisotropy[False] > 1.5, anisotropy
    assert anisotropy[True] < 0.75 * anisotropy[False], anisotropy
    factors = tube_current_modulation_factors(np.stack([np.linspace(0, 8, 50)] * 4)[None] * np.ones((1, 4, 1)))
    np.testing.assert_allclose(factors.mean(axis=-1), 1.0, rtol=1e-6)
