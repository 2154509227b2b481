"""Low-frequency restoration (lib.lesions.low_frequency_restoration): the shipped CT model's lost lesion contrast
given back, as ``cli.py denoise`` and ``denoise-batch`` apply it (the app's route: tests/test_monailabel_app.py).

The physics case is real: 6 mm, -25 HU lesions in a liver-like phantom, quarter dose simulated in the sinogram
domain with and without the lesions from the same seed, denoised by the shipped ADL weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import processes
from conftest import APP_DIR, SAMPLE_STUDIES

CLI = APP_DIR / "cli.py"
PIXEL_MM = 0.7


@pytest.fixture(scope="module")
def lesion_case():
    """(clean, low-dose present, low-dose absent, lesion core mask, uniform-tissue mask), 256 x 256 at 0.7 mm."""
    from lib.lesions import Lesion, insert_lesions, lesion_mask
    from lib.noise import LowDoseCTSettings, simulate_low_dose_ct

    h = w = 256
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    plane = np.full((h, w), -1000.0, np.float32)
    plane[((yy - 128) / 120) ** 2 + ((xx - 128) / 124) ** 2 <= 1] = -100.0  # fat
    plane[((yy - 128) / 110) ** 2 + ((xx - 128) / 114) ** 2 <= 1] = 40.0  # muscle
    plane[((yy - 128) / 80) ** 2 + ((xx - 128) / 90) ** 2 <= 1] = 60.0  # liver
    centres = [(128 + dy, 128 + dx) for dy in (-45, -15, 15, 45) for dx in (-50, -17, 17, 50)]
    lesions = [Lesion(c, 6.0, -25.0) for c in centres]
    present = insert_lesions(plane, lesions, PIXEL_MM)
    settings = LowDoseCTSettings(dose_fraction=0.25, full_dose_photons=1e6, reference_has_noise=False)
    low_present = simulate_low_dose_ct(present, PIXEL_MM, settings, seed=3)
    low_absent = simulate_low_dose_ct(plane, PIXEL_MM, settings, seed=3)
    core = lesion_mask(plane.shape, lesions, PIXEL_MM) > 0.5
    near = lesion_mask(plane.shape, [Lesion(c, 14.0, 1.0) for c in centres], PIXEL_MM) > 0
    uniform = (((yy - 128) / 80) ** 2 + ((xx - 128) / 90) ** 2 <= 0.8) & ~near
    return plane, low_present, low_absent, core, uniform


def _contrast_kept(present: np.ndarray, absent: np.ndarray, core: np.ndarray) -> float:
    """Lesion contrast in the output (same noise with and without the lesions) over the true -25 HU."""
    return float(np.mean((present - absent)[core])) / -25.0


def test_restoration_gives_back_lesion_contrast_for_part_of_the_noise(lesion_case):
    from lib.lesions.low_frequency_restoration import default_sigma_px, restore_low_frequencies
    from lib.predict import denoise_array, load_denoiser
    from lib.weights import find_weights

    clean, low_present, low_absent, core, uniform = lesion_case
    model = load_denoiser(find_weights("adl", "CT"))
    net_present, net_absent = denoise_array(model, low_present, "CT"), denoise_array(model, low_absent, "CT")

    def noise(image: np.ndarray) -> float:
        return float(np.std((image - clean)[uniform]))

    default = default_sigma_px("CT")
    assert 0.0 < default < 2.0 and default_sigma_px("MR") == 0.0
    kept = {"network": _contrast_kept(net_present, net_absent, core)}
    noise_hu = {"input": noise(low_absent), "network": noise(net_absent)}
    for sigma in (default, 2.0):
        restored = (restore_low_frequencies(low_present, net_present, sigma),
                    restore_low_frequencies(low_absent, net_absent, sigma))
        kept[sigma], noise_hu[sigma] = _contrast_kept(*restored, core), noise(restored[1])
    # the network loses a quarter of a 6 mm lesion's contrast (72 % kept when written); the default width gives
    # back most of what was lost, a wider Gaussian less of it
    assert kept["network"] < 0.85
    assert kept[default] > kept["network"] + 0.07 and kept[2.0] > kept["network"] + 0.03
    assert kept[default] > kept[2.0]
    # at a price in noise, which stays well below the low-dose input's
    assert noise_hu["network"] < noise_hu[2.0] < noise_hu[default] < 0.8 * noise_hu["input"]


def test_zero_width_is_the_network_output_and_bad_input_is_refused():
    from lib.lesions.low_frequency_restoration import restore_low_frequencies

    rng = np.random.default_rng(0)
    noisy = rng.normal(0, 20, (3, 32, 40)).astype(np.float32)
    denoised = np.zeros_like(noisy)
    assert np.array_equal(restore_low_frequencies(noisy, denoised, 0), denoised)
    once = restore_low_frequencies(noisy, denoised, 1.5)
    # per slice, in-plane: each slice's result depends on that slice alone
    assert np.allclose(restore_low_frequencies(noisy[1], denoised[1], 1.5), once[1], atol=1e-5)
    # the removed content's mean (its zero frequency) comes back whole
    assert np.allclose(once.mean(axis=(1, 2)), noisy.mean(axis=(1, 2)), atol=1e-3)
    with pytest.raises(ValueError, match="differ in shape"):
        restore_low_frequencies(noisy, denoised[:2], 1.0)
    with pytest.raises(ValueError, match="pixels"):
        restore_low_frequencies(noisy, denoised, -1.0)
    with pytest.raises(ValueError, match="pixels"):
        restore_low_frequencies(noisy, denoised, float("nan"))
    bad = noisy.copy()
    bad[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="slice 2: non-finite"):
        restore_low_frequencies(bad, denoised, 1.0)
    with pytest.raises(ValueError, match=r"\(Z, H, W\)"):
        restore_low_frequencies(noisy[0, 0], denoised[0, 0], 1.0)


def run_cli(*args) -> subprocess.CompletedProcess[str]:
    return processes.run([sys.executable, CLI, *map(str, args)], 600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_denoise_restores_by_default_for_ct_and_can_turn_it_off(lesion_case, tmp_path):
    from lib.lesions.low_frequency_restoration import default_sigma_px, restore_low_frequencies
    from lib.predict import denoise_array, load_denoiser
    from lib.weights import find_weights
    from lib.weights.format import restoration_of_file

    _, low_present, _, _, _ = lesion_case
    source = tmp_path / "ld.nii.gz"
    image = sitk.GetImageFromArray(low_present[None])
    image.SetSpacing((PIXEL_MM, PIXEL_MM, 2.0))
    sitk.WriteImage(image, str(source))
    network = denoise_array(load_denoiser(find_weights("adl", "CT")), low_present[None], "CT")
    outputs = {}
    for name, extra in (("default", ()), ("off", ("--low-frequency-restoration", "0")),
                        ("wide", ("--low-frequency-restoration", "2.5"))):
        out = tmp_path / f"{name}.nii.gz"
        done = run_cli("denoise", "--model", "adl", "--modality", "ct", "--device", "cpu", "--input", source,
                       "--output", out, *extra)
        assert done.returncode == 0, done.stderr
        outputs[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    np.testing.assert_allclose(outputs["off"], network, atol=1e-3)
    width = default_sigma_px("CT", restoration_of_file(find_weights("adl", "CT")))  # the shipped file's own
    np.testing.assert_allclose(outputs["default"], restore_low_frequencies(low_present[None], network, width),
                               atol=1e-2)
    np.testing.assert_allclose(outputs["wide"], restore_low_frequencies(low_present[None], network, 2.5), atol=1e-2)
    assert float(np.abs(outputs["default"] - outputs["off"]).max()) > 1.0  # HU: not a rounding difference

    too_wide = run_cli("denoise", "--model", "adl", "--modality", "ct", "--input", source, "--output",
                       tmp_path / "x.nii.gz", "--low-frequency-restoration", "40")
    assert too_wide.returncode == 2 and "[0, 16] pixels" in too_wide.stderr
    classical = run_cli("denoise", "--model", "nlm", "--modality", "ct", "--input", source, "--output",
                        tmp_path / "y.nii.gz", "--low-frequency-restoration", "1")
    assert classical.returncode == 2 and "only applies to the learned models" in classical.stderr
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "y.nii.gz").exists()


@pytest.mark.slow
def test_tddl_gcn_gets_its_files_own_default_width_in_the_cli_and_the_batch(lesion_case, tmp_path):
    """The shipped TDDL-GCN CT file's own width (not the modality's) in ``cli.py denoise`` and ``denoise-batch``; a
    batch run again with the same settings skips the series (its recorded width is the one this run would apply).
    A GCN file that names no width (a site's file fine-tuned from the earlier GCN file, which was measured at the
    CT default) gets the modality's default, not the shipped file's: the width belongs to the file, not the name."""
    import torch

    from lib.lesions.low_frequency_restoration import default_sigma_px, restore_low_frequencies
    from lib.predict import denoise_array, load_denoiser
    from lib.weights import find_weights
    from lib.weights.format import RESTORATION_KEY, restoration_of_file

    _, low_present, _, _, _ = lesion_case
    slab = low_present[None, 64:192, 64:192]
    gcn_width = restoration_of_file(find_weights("tddl_gcn", "CT"))
    assert gcn_width is not None and gcn_width != default_sigma_px("CT")
    source = tmp_path / "in" / "ct.nii.gz"
    source.parent.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(slab), str(source))
    done = run_cli("denoise", "--model", "tddl_gcn", "--modality", "ct", "--device", "cpu", "--input", source,
                   "--output", tmp_path / "gcn.nii.gz")
    assert done.returncode == 0, done.stderr
    network = denoise_array(load_denoiser(find_weights("tddl_gcn", "CT")), slab, "CT")
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "gcn.nii.gz"))),
                               restore_low_frequencies(slab, network, gcn_width), atol=1e-2)

    def batch() -> str:
        run = run_cli("denoise-batch", "--input", source.parent, "--output", tmp_path / "out", "--model", "tddl_gcn",
                      "--file-modality", "ct")
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    assert "1 done" in batch()
    assert "1 skipped" in batch()
    rows = (tmp_path / "out" / "_denoise_batch" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(rows[0]).get("low_frequency_restoration") == gcn_width

    # the same network in a file that names no width of its own: the modality's default
    payload = torch.load(find_weights("tddl_gcn", "CT"), map_location="cpu", weights_only=True)
    del payload[RESTORATION_KEY]
    unnamed = tmp_path / "site_tddl_gcn_ct.pt"
    torch.save(payload, unnamed)
    done = run_cli("denoise", "--model", "tddl_gcn", "--modality", "ct", "--device", "cpu", "--input", source,
                   "--output", tmp_path / "site.nii.gz", "--weights", unnamed)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "site.nii.gz"))),
                               restore_low_frequencies(slab, network, default_sigma_px("CT")), atol=1e-2)


@pytest.mark.slow
def test_batch_records_the_width_and_redoes_a_series_when_it_changes(lesion_case, tmp_path):
    from lib.lesions.low_frequency_restoration import default_sigma_px

    _, low_present, _, _, _ = lesion_case
    tree = tmp_path / "in"
    tree.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(low_present[None, 64:192, 64:192]), str(tree / "ct.nii.gz"))
    out = tmp_path / "out"

    def batch(*extra) -> str:
        done = run_cli("denoise-batch", "--input", tree, "--output", out, "--model", "adl", "--file-modality", "ct",
                       *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    batch()
    assert "1 skipped" in batch()  # the same job again
    assert "1 done" in batch("--low-frequency-restoration", "0")  # another width: another job
    rows = [json.loads(line) for line in (out / "_denoise_batch" / "manifest.jsonl").read_text().splitlines()]
    widths = [r.get("low_frequency_restoration") for r in rows if r["status"] == "done"]
    assert widths == [default_sigma_px("CT"), 0.0]


# ---- one helper for every caller; MR restored inside the head only ---------------------------------------------

@pytest.fixture(scope="module")
def mr_head_case():
    """A real head (sample Colin27 T1, 7 axial slices at 1 mm, 217 x 181) with six 6 mm +20 % lesions in its
    central slice, Rician 5 % from the same seed with and without them, and a denoiser that loses lesion contrast:
    the shipped ADL MR weights' outputs smoothed in-plane by 1.5 px. The shipped MR network is lesion-aware and keeps
    about 95 % of these lesions' contrast on its own (bench/README.md "Lesion-aware ADL MR"), so the smoothing stands
    in for a denoiser that does not (the MR network before it kept 85 % here); like the network it leaves the air at
    ~0, which is what the mask is for.
    (clean, noisy present, noisy absent, denoised present, denoised absent, lesion core (H, W), far air (H, W))."""
    from scipy import ndimage

    from lib.lesions import Lesion, insert_lesions, lesion_mask, lesion_sites
    from lib.noise import add_rician_noise
    from lib.predict import denoise_array, load_denoiser
    from lib.weights import find_weights

    clean = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_STUDIES / "mr_head_colin27.nii.gz")))
    clean = np.ascontiguousarray(clean[87:94], dtype=np.float32)
    mid, spacing = 3, (1.0, 1.0, 1.0)
    sites = lesion_sites(clean[mid], 1.0, 6.0, 6, np.random.default_rng(0), modality="MR")
    assert len(sites) >= 4
    lesions = [Lesion((mid, y, x), 6.0, 0.2) for y, x in sites]
    present = insert_lesions(clean, lesions, spacing, "MR")
    top = float(clean.max())
    noisy_p = add_rician_noise(present, 5.0, seed=7, reference_max=top)
    noisy_a = add_rician_noise(clean, 5.0, seed=7, reference_max=top)
    model = load_denoiser(find_weights("adl", "MR"))
    net_p, net_a = denoise_array(model, noisy_p, "MR"), denoise_array(model, noisy_a, "MR")
    net_p, net_a = (ndimage.gaussian_filter(v, (0, 1.5, 1.5)).astype(np.float32) for v in (net_p, net_a))
    core = lesion_mask(clean.shape, lesions, spacing)[mid] > 0.5
    air = ndimage.distance_transform_edt(clean[mid] < 0.02 * top) > 15  # air, 15 px or more from the head
    return clean, noisy_p, noisy_a, net_p, net_a, core, air


def test_mr_restoration_gives_lesion_contrast_back_inside_the_head_and_leaves_the_air_alone(mr_head_case):
    from lib.lesions.low_frequency_restoration import apply_restoration, restore_low_frequencies

    clean, noisy_p, noisy_a, net_p, net_a, core, air = mr_head_case
    mid = 3

    def kept(present: np.ndarray, absent: np.ndarray) -> float:
        return float(np.mean((present - absent)[mid][core]) / np.mean((noisy_p - noisy_a)[mid][core]))

    # the network removes the Rician floor in the air (mean ~1.25 sigma = 11 of 255 here) and part of the lesions
    floor = float(noisy_a[mid][air].mean())
    assert floor > 8.0 and abs(float(net_a[mid][air].mean())) < 1.0
    assert kept(net_p, net_a) < 0.9
    restored_p, width = apply_restoration(noisy_p, net_p, "MR", 1.0)
    restored_a, _ = apply_restoration(noisy_a, net_a, "MR", 1.0)
    assert width == 1.0 and restored_p.shape == noisy_p.shape and restored_p.dtype == np.float32
    # inside the head the lesions get their contrast back (0.66 -> 0.85 when written) ...
    assert kept(restored_p, restored_a) > kept(net_p, net_a) + 0.04
    # ... while the air stays as the network left it, where an unmasked restoration gives the floor back
    np.testing.assert_allclose(restored_a[mid][air], net_a[mid][air], atol=1e-3)
    assert float(restore_low_frequencies(noisy_a, net_a, 1.0)[mid][air].mean()) > 0.9 * floor


def test_foreground_threshold_keeps_dark_tissue_and_skips_slices_of_air():
    """A real shoulder MR slice (fat bright, muscle dark): the mask holds the muscle, which Otsu's threshold alone
    cuts off (a third of the tissue kept when written); a slice of air above an object gets no mask."""
    from lib.lesions.low_frequency_restoration import foreground_threshold, foreground_weight
    from lib.noise import add_rician_noise

    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_STUDIES / "mr_slice_pydicom_mr2.nii.gz")))[0]
    noisy = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_STUDIES / "mr_slice_pydicom_mr2_rician5.nii.gz")))[0]
    noisy = noisy.astype(np.float32)
    weight = foreground_weight(noisy, foreground_threshold(noisy))
    assert weight.shape == noisy.shape and weight.dtype == np.float32
    assert 0.0 <= float(weight.min()) and float(weight.max()) <= 1.0
    tissue = reference > 0.1 * reference.max()
    assert float(np.mean(weight[tissue] > 0.95)) > 0.9
    assert float(np.mean(weight[reference < 0.01 * reference.max()] < 0.05)) > 0.8  # the air outside: off

    yy, xx = np.mgrid[0:64, 0:64]
    disc = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2, 1000.0, 0.0).astype(np.float32)
    volume = add_rician_noise(np.stack([disc, np.zeros_like(disc)]), 5.0, seed=1, reference_max=1000.0)
    threshold = foreground_threshold(volume)
    assert float(foreground_weight(volume[1], threshold).max()) == 0.0
    assert float(foreground_weight(volume[0], threshold)[32, 32]) > 0.99
    assert float(foreground_weight(volume[0], threshold)[1, 1]) == 0.0
    # a dark hole (ventricles, CSF at the floor's level) is inside; a second piece of 1/13 of the first's
    # area (a slice through the skull base) is kept too
    ring = np.where((yy - 32) ** 2 + (xx - 24) ** 2 < 8 ** 2, 0.0, disc).astype(np.float32)
    ring[54:63, 1:10] = 1000.0
    noisy_ring = add_rician_noise(ring, 5.0, seed=2, reference_max=1000.0)
    weight = foreground_weight(noisy_ring, foreground_threshold(noisy_ring))
    assert float(weight[32, 24]) > 0.99 and float(weight[58, 5]) > 0.99


def test_apply_restoration_is_the_weight_files_or_modality_default_ct_unmasked_and_zero_is_the_network_itself():
    from lib.lesions.low_frequency_restoration import (apply_restoration, default_sigma_px, foreground_only,
                                                       restore_low_frequencies)

    # the mask is for magnitude images (MR); on HU its floor rule would take everything in, but say it plainly
    assert foreground_only("MR") and not foreground_only("CT") and not foreground_only(None)
    rng = np.random.default_rng(0)
    # CT: air at -1000 HU around a body; restored everywhere, air included (zero-mean noise, nothing to mask)
    noisy = np.full((2, 48, 48), -1000.0, np.float32)
    noisy[:, 12:36, 12:36] = 40.0
    noisy += rng.normal(0, 20, noisy.shape).astype(np.float32)
    denoised = noisy - rng.normal(0, 5, noisy.shape).astype(np.float32) - 3.0
    out, width = apply_restoration(noisy, denoised, "CT")
    assert width == default_sigma_px("CT") > 0.0
    np.testing.assert_array_equal(out, restore_low_frequencies(noisy, denoised, default_sigma_px("CT")))
    # a weight file that names its own width (the TDDL-GCN CT file: 0.6) gets it; one that names none the modality's
    out, width = apply_restoration(noisy, denoised, "CT", weights_sigma_px=0.6)
    assert width == default_sigma_px("CT", 0.6) == 0.6 != default_sigma_px("CT")
    np.testing.assert_array_equal(out, restore_low_frequencies(noisy, denoised, 0.6))
    assert default_sigma_px("ct", None) == default_sigma_px("CT") and default_sigma_px("MR", 1.5) == 1.5
    assert apply_restoration(noisy, denoised, "CT", 2.5, weights_sigma_px=0.6)[1] == 2.5  # asked beats default
    assert apply_restoration(noisy, denoised, "CT", weights_sigma_px=0.0)[0] is denoised  # a file may say off
    with pytest.raises(ValueError, match="pixels"):
        default_sigma_px("CT", 40.0)  # a file naming a width out of range is refused, not served
    out, width = apply_restoration(noisy, denoised, "ct", 2.5)
    assert width == 2.5
    np.testing.assert_array_equal(out, restore_low_frequencies(noisy, denoised, 2.5))
    same, width = apply_restoration(noisy, denoised, "CT", 0)
    assert same is denoised and width == 0.0
    mr, width = apply_restoration(noisy, denoised, "MR")
    assert width == default_sigma_px("MR") and (mr is denoised) == (width == 0.0)
    with pytest.raises(ValueError, match="pixels"):
        apply_restoration(noisy, denoised, "CT", -1.0)
