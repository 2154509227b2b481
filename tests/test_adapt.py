"""``cli.py adapt``: TDDL self-adaptation from low-dose scans alone, and its non-circular J-invariant check.

Real files only: a 10-slice slab of the sample quarter-dose head CT (sample_data, built by ./run.sh) and the tiny
real weights of tests/mlserver.py as the starting model.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import processes
from conftest import APP_DIR, SAMPLE_STUDIES, import_cli

from lib.evaluation.planted_lesions import lesion_contrast_check, plant_lesions, planted_contrast_kept
from lib.evaluation.self_supervised import blind_spot, grid_mask, grid_shifts, j_invariant_loss, mask_pixels
from lib.noise_learning.adaptation import holdout_indices
from lib.predict import denoise_array, load_denoiser
from lib.weights.format import RESTORATION_KEY
from mlserver import TINY_GCN_RESTORATION

CLI = APP_DIR / "cli.py"
LOW_DOSE = SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz"
#: a tiny run: seconds of noise learning and fine-tuning on 32-pixel patches, 4 of the 16 check shifts
TINY = ["--noise-steps", "20", "--steps", "6", "--patch-size", "32", "--samples-per-epoch", "32",
        "--check-shifts", "4", "--device", "cpu", "--seed", "0"]


def run_cli(*args: str | Path, timeout: float = 600):
    return processes.run([sys.executable, CLI, *args], timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def low_dose_slab(tmp_path_factory) -> Path:
    """Slices 50-59 of the real quarter-dose head CT (256 x 256, HU)."""
    if not LOW_DOSE.is_file():
        pytest.skip(f"{LOW_DOSE} missing: build the sample data with ./run.sh")
    image = sitk.ReadImage(str(LOW_DOSE))
    path = tmp_path_factory.mktemp("lowdose") / "site" / "ld_slab.nii.gz"
    path.parent.mkdir()
    sitk.WriteImage(image[:, :, 50:60], str(path))
    return path


@pytest.fixture(scope="module")
def slab_array(low_dose_slab) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(low_dose_slab))).astype(np.float32)


# ------------------------------------------------------------------------------------------ the criterion
@pytest.mark.parametrize("grid,radius", [(2, 0), (4, 0), (4, 1), (6, 2)])
def test_every_pixel_is_scored_exactly_once_over_the_shifts(grid, radius):
    shape = (37, 41)  # not multiples of the grid: the border sets are ragged
    count = np.zeros(shape, dtype=int)
    for shift in grid_shifts(grid):
        count += grid_mask(shape, grid, shift)
    assert (count == 1).all()


@pytest.mark.parametrize("radius", [0, 1])
def test_masked_pixels_never_see_their_own_value(slab_array, radius):
    y = slab_array[3, 100:164, 90:154].copy()
    rng = np.random.default_rng(0)
    for shift in grid_shifts(4):
        masked, mask = mask_pixels(y, 4, shift, radius)
        blind = blind_spot(y.shape, 4, shift, radius)
        assert mask.sum() > 0 and (blind >= mask).all()
        assert np.array_equal(masked[~blind], y[~blind])  # the rest of the slice is untouched
        # perturbing y anywhere inside the blinded squares (the scored pixels included) changes nothing the
        # denoiser sees
        perturbed = y.copy()
        perturbed[blind] += rng.normal(0, 500, int(blind.sum())).astype(np.float32)
        again, _ = mask_pixels(perturbed, 4, shift, radius)
        assert np.array_equal(again, masked)
        # and the masked value is not the noisy value (it is an interpolation from outside)
        assert not np.allclose(masked[mask], y[mask])


def test_radius_one_blinds_the_neighbours_of_each_scored_pixel(slab_array):
    """Correlated CT noise: the 8 neighbours of a scored pixel carry part of its noise, so with radius 1 the whole
    input within one pixel of it must be independent of those neighbours (defined here without blind_spot)."""
    y = slab_array[3, 100:164, 90:154].copy()
    for shift in [(0, 0), (1, 2), (3, 3)]:
        masked, mask = mask_pixels(y, 4, shift, radius=1)
        near = ndimage.binary_dilation(mask, np.ones((3, 3), dtype=bool))
        perturbed = y.copy()
        perturbed[near] += 300.0
        again, _ = mask_pixels(perturbed, 4, shift, radius=1)
        assert np.array_equal(again[near], masked[near])
        assert np.array_equal(again[~near], perturbed[~near])


def test_a_real_denoiser_beats_the_identity_on_real_low_dose_ct(slab_array):
    """Brain tissue of the real quarter-dose CT: a moderate Gaussian filter is a better denoiser than doing nothing
    (against the sample's full-dose scan its MSE is ~240 HU^2, the input's ~1400), and the J-invariant loss (default
    blind square, radius 1) must say so, on each slice; erasing the anatomy of a whole slice must lose badly."""
    y = slab_array[[2, 7], 96:160, 96:160]
    identity = j_invariant_loss(lambda a: a, y)
    gaussian = j_invariant_loss(lambda a: ndimage.gaussian_filter(a, (0, 1.5, 1.5)), y)
    assert all(g < i for g, i in zip(gaussian["per_slice"], identity["per_slice"]))
    assert 100 < gaussian["loss"] < identity["loss"] < 10_000  # HU^2: tens of HU of noise
    whole = slab_array[[2, 7]]
    flat = j_invariant_loss(lambda a: np.full_like(a, a.mean()), whole)["loss"]
    assert flat > 10 * j_invariant_loss(lambda a: a, whole)["loss"]


# ------------------------------------------------------------------------------------------ the lesion check
SPACING = (0.957, 0.957)  # the sample CT's pixel (mm)


def _gaussian(sigma: float):
    return lambda stack: ndimage.gaussian_filter(stack, (0, sigma, sigma)) if sigma else stack


def test_lesions_are_planted_in_uniform_soft_tissue_deterministically(slab_array):
    slices = list(slab_array[[4, 9]])
    planted = plant_lesions(slices, SPACING, seed=3)
    assert planted.count >= 8 and planted == plant_lesions(slices, SPACING, seed=3)
    assert planted != plant_lesions(slices, SPACING, seed=4)
    kinds = {(l.diameter_mm, l.contrast) for per in planted.lesions for l in per}
    assert {d for d, _ in kinds} == {4.0, 6.0, 10.0} and {c for _, c in kinds} == {-25.0, 25.0}
    for image, per in zip(slices, planted.lesions):
        smooth = ndimage.gaussian_filter(image, 1.5 / SPACING[0])
        for lesion in per:  # brain tissue of the head CT, never air, bone or the skull's edge
            y, x = (int(c) for c in lesion.centre)
            assert 0 <= smooth[y, x] <= 120
        centres = [np.array(l.centre) for l in per]
        assert all(np.hypot(*(a - b)) * SPACING[0] >= 15 for i, a in enumerate(centres) for b in centres[i + 1:])


def test_a_size_without_room_gives_its_turn_to_the_next_one(slab_array):
    """A lesion size that finds no room left in a slice loses its turn there, the next size takes the slot: each slice
    is filled, the contrasts stay balanced within each size, and lesions stay apart in soft tissue. (The cycle used
    to wait on a size without room, so every later slot of every later slice asked for it again: 22 lesions instead
    of 24 here, and none at all beside a size that never fits.)"""
    slices = list(slab_array[[4, 9]])
    planted = plant_lesions(slices, SPACING, per_slice=12)
    assert [len(per) for per in planted.lesions] == [12, 12] and planted == plant_lesions(slices, SPACING, per_slice=12)
    lesions = [lesion for per in planted.lesions for lesion in per]
    for diameter in (4.0, 6.0, 10.0):
        signs = [lesion.contrast for lesion in lesions if lesion.diameter_mm == diameter]
        assert signs and abs(signs.count(-25.0) - signs.count(25.0)) <= 1
    for image, per in zip(slices, planted.lesions):
        smooth = ndimage.gaussian_filter(image, 1.5 / SPACING[0])
        assert all(0 <= smooth[int(l.centre[0]), int(l.centre[1])] <= 120 for l in per)
        for i, a in enumerate(per):  # no overlap: a profile reaches its radius plus 4 edge widths (2 mm)
            for b in per[i + 1:]:
                gap = np.hypot(*(np.subtract(a.centre, b.centre))) * SPACING[0]
                assert gap >= a.diameter_mm / 2 + b.diameter_mm / 2 + 4.0 and gap >= 15.0
    # a 25 mm lesion needs a 50 mm disc of uniform tissue, which these slices lack: the 4 mm ones take every slot
    beside = plant_lesions(slices, SPACING, diameters_mm=(25.0, 4.0))
    assert [len(per) for per in beside.lesions] == [6, 6]
    kinds = sorted((l.diameter_mm, l.contrast) for per in beside.lesions for l in per)
    assert kinds == [(4.0, -25.0)] * 6 + [(4.0, 25.0)] * 6


def test_planted_contrast_kept_ranks_blurring_and_size(slab_array):
    """On the real quarter-dose noise: doing nothing keeps 100 %, more smoothing keeps less, and a small lesion
    loses more of its contrast than a large one under the same blur."""
    slices = list(slab_array[[4, 9]])
    planted = plant_lesions(slices, SPACING)
    identity = planted_contrast_kept(_gaussian(0), slices, planted)
    assert identity["mean_percent"] == pytest.approx(100.0, abs=1e-3)
    mild, strong = (planted_contrast_kept(_gaussian(s), slices, planted) for s in (0.7, 2.0))
    assert strong["mean_percent"] < mild["mean_percent"] - 10 < 90
    assert strong["by_diameter_percent"]["4"] < strong["by_diameter_percent"]["10"]
    # a denoiser that ignores the lesions (the output without them, whatever the input) keeps nothing
    erasing = planted_contrast_kept(lambda stack: np.stack([s for s in slices]), slices, planted)
    assert erasing["mean_percent"] == pytest.approx(0.0, abs=1e-6)


def test_lesion_check_refuses_a_candidate_that_blurs_lesions_more(slab_array):
    groups = [(list(slab_array[[4, 9]]), SPACING)]
    worse = lesion_contrast_check(_gaussian(0.7), _gaussian(1.5), groups)
    assert not worse["passed"] and worse["candidate_percent"] < worse["baseline_percent"] - 2
    better = lesion_contrast_check(_gaussian(1.5), _gaussian(0.7), groups)
    assert better["passed"] and better["lesions"] == worse["lesions"] >= 8
    same = lesion_contrast_check(_gaussian(1.0), _gaussian(1.0), groups)
    assert same["passed"] and same["candidate_percent"] == same["baseline_percent"]
    nan = lesion_contrast_check(_gaussian(1.0), lambda stack: stack * np.nan, groups)
    assert not nan["passed"]
    # nowhere to put a lesion (air only): nothing is known, so the check fails
    air = lesion_contrast_check(_gaussian(1.0), _gaussian(1.0), [([np.full((64, 64), -1000.0, np.float32)], SPACING)])
    assert air["lesions"] == 0 and not air["passed"]


def test_the_gate_refuses_an_over_smoother_that_the_j_invariant_loss_alone_would_publish(slab_array):
    """Brain tissue of the real quarter-dose CT: a Gaussian of sigma 3 px has a LOWER J-invariant loss than one of
    sigma 1 (the loss rewards smoothing flat tissue) but erases half of a small lesion's contrast: the adapted
    model must not be published."""
    from lib.noise_learning.adaptation import AdaptSettings, no_worse_checks

    held_out = [(list(slab_array[[4, 9], 96:160, 96:160]), SPACING)]
    verdict = no_worse_checks(_gaussian(1.0), _gaussian(3.0), held_out, AdaptSettings(check_shifts=4))
    assert verdict["check"]["passed"] and verdict["check"]["adapted_loss"] < verdict["check"]["baseline_loss"]
    lesions = verdict["lesion_check"]
    assert not lesions["passed"] and lesions["lesions"] >= 4
    assert lesions["candidate_percent"] < lesions["baseline_percent"] - 20
    assert not verdict["passed"]
    # the other way round both checks pass
    assert no_worse_checks(_gaussian(3.0), _gaussian(1.0), held_out, AdaptSettings(check_shifts=4))["lesion_check"][
        "passed"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_held_out_low_dose_check_scores_lesions_as_served_and_the_loss_on_the_networks(tmp_path, slab_array):
    """The app's self-adaptation check (:func:`held_out_low_dose_check`): two files holding the shipped CT ADL
    network, one served at its own width, one with the restoration off. Their J-invariant losses are equal (the
    loss sees the bare networks); served, the second keeps less of the planted lesions' contrast and is refused."""
    import torch

    from lib.noise_learning.adaptation import AdaptSettings, held_out_low_dose_check

    shipped = APP_DIR / "model" / "pretrained_adl_ct.pt"
    payload = torch.load(shipped, map_location="cpu", weights_only=True)
    off = tmp_path / "off.pt"
    torch.save(dict(payload, low_frequency_restoration={"sigma_px": 0.0, "chosen": "test"}), off)
    held_out = [(slab_array[[3, 8]], SPACING)]
    settings = AdaptSettings(check_shifts=2)
    worse = held_out_low_dose_check(shipped, off, held_out, settings, max_slices=1)
    loss = worse["j_invariant"]
    assert worse["check"] == "held_out_low_dose" and worse["slices"] == 1
    assert loss["passed"] and loss["adapted_loss"] == pytest.approx(loss["baseline_loss"], rel=1e-6)
    lesions = worse["lesions"]
    assert lesions["lesions"] >= 4 and lesions["candidate_percent"] < lesions["baseline_percent"] - 5
    assert worse["passed"] is False
    assert worse["reason"].startswith("worse than the served model on the held-out low-dose images (contrast kept")
    assert held_out_low_dose_check(off, shipped, held_out, settings, max_slices=1)["passed"] is True


@pytest.mark.usefixtures("one_torch_thread")
def test_held_out_slices_without_a_lesion_site_refuse_as_not_checkable_not_as_worse(tmp_path, tiny_weights,
                                                                                   slab_array):
    """Held-out slices with no site for a synthetic lesion (a corner of air): the check cannot measure lesion
    contrast, so it refuses, and the decision says that, not that the candidate was worse."""
    from lib.engines.gated_fine_tuning import FineTuneResult, decide_publication
    from lib.noise_learning.adaptation import AdaptSettings, held_out_low_dose_check
    from lib.weights.store import ModelStore

    served = tiny_weights / "pretrained_adl_ct.pt"
    held_out = [(slab_array[[3, 8], :32, :32], SPACING)]
    check = held_out_low_dose_check(served, served, held_out, AdaptSettings(check_shifts=1))
    assert check["j_invariant"]["passed"] and check["lesions"]["lesions"] == 0 and not check["passed"]
    assert check["reason"].startswith("not checkable") and "no site for a synthetic lesion" in check["reason"]
    assert "worse" not in check["reason"]
    scores = {"psnr": 30.0, "psnr_input": 20.0, "images": {"a": {}}}
    decision = decide_publication(FineTuneResult(served, scores, dict(scores)), ModelStore(tmp_path / "model"),
                                  "adl", "CT", checks=[check], validation_psnr_decides=False)
    assert decision["published"] is False and decision["rejected_by"] == ["held_out_low_dose"]
    assert decision["reason"] == check["reason"]


@pytest.mark.slow
def test_self_adaptation_data_learns_nothing_from_the_held_out_low_dose_images(tmp_path, tiny_weights):
    """The app's ``adapt_noise`` without normal-dose images: the validation ids' low-dose images judge the
    candidate, so neither the noise model nor the pseudo pairs may come from them."""
    from lib.noise_learning.workflow import adaptation_data
    from mlserver import shared_studies

    studies = shared_studies(tmp_path / "studies")
    low_dose = {i: str(studies / f"{i}.nii.gz") for i in ("ct_slice_a", "ct_slab_b", "ct_slab_c")}
    data = adaptation_data(low_dose, tmp_path / "work", denoiser_weights=tiny_weights / "pretrained_tddl_gcn_ct.pt",
                           noise_steps=2)  # what is learnt is not checked here, only what it is learnt from
    held = set(data.held_out_low_dose)
    assert held and held == set(data.description["validation_images"]) == set(data.description["held_out_low_dose"])
    assert data.held_out_low_dose == {i: low_dose[i] for i in held}
    assert set(data.noise_model.info["images"]) == set(data.description["train_images"]) == set(low_dose) - held
    assert {v.name for v in data.source.volumes} == set(low_dose) - held  # stand-ins are named by their ids


@pytest.mark.slow
def test_self_adaptation_validates_on_central_slices_of_a_long_held_out_volume(tmp_path, tiny_weights):
    """A held-out volume gives its circular validation PSNR on its central slices only (denoising whole volumes for a
    figure that decides nothing would cost minutes per volume on a CPU); the check still gets the whole image."""
    from lib.noise_learning.workflow import HELD_OUT_STAND_IN_SLICES, adaptation_data
    from mlserver import write_crop

    low_dose = {"short": tmp_path / "short.nii.gz", "long": tmp_path / "long.nii.gz"}
    write_crop(LOW_DOSE, low_dose["short"], z=slice(40, 44))
    write_crop(LOW_DOSE, low_dose["long"], z=slice(50, 50 + HELD_OUT_STAND_IN_SLICES + 4))
    data = adaptation_data({k: str(v) for k, v in low_dose.items()}, tmp_path / "work", noise_steps=2,
                           denoiser_weights=tiny_weights / "pretrained_tddl_gcn_ct.pt",
                           split=lambda names: ([n for n in names if n != "long"], ["long"]))
    [pair] = data.validation_pairs
    assert pair.name == "long" and pair.clean.shape == (HELD_OUT_STAND_IN_SLICES, 256, 256)
    assert data.held_out_low_dose == {"long": str(low_dose["long"])}
    assert [v.name for v in data.source.volumes] == ["short"]


def test_adaptation_data_keeps_normal_dose_images_of_the_same_file_name_apart(tmp_path):
    """The app's ``adapt_noise`` with ``normal_dose`` folders of one patient each: two images both named
    ``scan.nii.gz`` are two patients' scans, each used once; keyed by file name one silently replaced the other."""
    from lib.noise_learning.workflow import adaptation_data
    from mlserver import write_crop

    low_dose = {"ld": str(write_crop(LOW_DOSE, tmp_path / "ld.nii.gz", z=slice(40, 42), yx=(slice(64, 192),) * 2))}
    normal = [write_crop(LOW_DOSE, tmp_path / "normal" / folder / "scan.nii.gz", z=slice(z, z + 2),
                         yx=(slice(64, 192),) * 2) for folder, z in (("A", 50), ("B", 60), ("C", 70))]
    data = adaptation_data(low_dose, tmp_path / "work", noise_steps=2, noise_patch_size=32,
                           normal_dose=",".join(str(p.parent) for p in normal))  # the conf's form
    used = data.description["train_images"] + data.description["validation_images"]
    assert len(used) == 3 and len(set(used)) == 3
    for folder in ("A", "B", "C"):
        assert sum(os.path.join(folder, "scan.nii.gz") in image for image in used) == 1
    assert len(data.source.volumes) + len(data.validation_pairs) == 3
    # each image's own noise, taken off the learnt noise, and what was added, in the status the server shows
    rows = data.description["noise_per_image"]
    assert sorted(row["image"] for row in rows) == sorted(used)
    for row in rows:
        assert row["own_noise_std_hu"] > 5 and row["learnt_noise_std_hu"] > 5, row
        # the three are rounded to 0.1 HU apart: sqrt(learnt^2 - own^2) within what those roundings allow (where
        # own is close to learnt, 0.05 HU on each moves it by several tenths)
        learnt, own, r = row["learnt_noise_std_hu"], row["own_noise_std_hu"], 0.05
        low = np.sqrt(max(0.0, (learnt - r) ** 2 - (own + r) ** 2)) - r
        high = np.sqrt(max(0.0, (learnt + r) ** 2 - (own - r) ** 2)) + r
        assert low - 1e-9 <= row["added_noise_std_hu"] <= high + 1e-9, (row, low, high)
    assert data.description["noise_added"].startswith("pseudo pairs: learnt noise ") and \
        "less each clean image's own noise" in data.description["noise_added"], data.description["noise_added"]


@pytest.mark.slow
def test_adaptation_data_keeps_the_learnt_noise_level_when_asked(tmp_path):
    """The app's ``adapt_noise`` with ``calibrate_noise_level`` false: the noise model file written has
    ``level_correction`` 1.0 and says why, and so does the description the run's status shows; by default the same
    data calibrates the level."""
    from lib.noise_learning.noise_model import NoiseModel
    from lib.noise_learning.workflow import LEVEL_CALIBRATION_OFF, adaptation_data
    from mlserver import write_crop

    low_dose = {"ld": str(write_crop(LOW_DOSE, tmp_path / "ld.nii.gz", z=slice(40, 42)))}
    normal = [str(write_crop(LOW_DOSE, tmp_path / "normal" / f"{z}.nii.gz", z=slice(z, z + 1))) for z in (50, 60)]
    models = {}
    for calibrate in (False, True):
        work = tmp_path / f"work_{calibrate}"
        data = adaptation_data(low_dose, work, noise_steps=2, noise_patch_size=32, normal_dose=normal,
                               calibrate_noise_level=calibrate)
        models[calibrate] = NoiseModel.load(work / "noise_model.pt")
        assert data.description["noise_level"] == models[calibrate].level_record()
    assert models[False].level_correction == 1.0
    assert models[False].training_stats["level_calibration_skipped"] == LEVEL_CALIBRATION_OFF
    assert models[False].level_record() == {"level_correction": 1.0, "skipped": LEVEL_CALIBRATION_OFF}
    assert models[True].training_stats["level_calibration"]["level_correction"] == models[True].level_correction != 1.0


@pytest.mark.parametrize("weights", ["tiny 2D CT", "shipped 2.5D MR"])
def test_held_out_stand_ins_are_central_slices_denoised_with_their_neighbours(tmp_path, tiny_weights, low_dose_slab,
                                                                              weights):
    """The held-out images' stand-ins (they give only the circular validation PSNR) are a few central slices, not
    whole volumes: each as denoising the whole volume gives it (a 2.5D network sees its real neighbours), written
    where those slices lie."""
    from lib.noise_learning.workflow import denoised_stand_ins

    path = (tiny_weights / "pretrained_adl_ct.pt" if weights == "tiny 2D CT"
            else APP_DIR / "model" / "pretrained_adl_mr.pt")
    source = sitk.ReadImage(str(low_dose_slab))[64:192, 64:192, :]  # 10 slices of 128 x 128, origin moved
    crop = tmp_path / "held_out.nii.gz"
    sitk.WriteImage(source, str(crop))
    central = sitk.ReadImage(denoised_stand_ins({"held": crop}, path, tmp_path / "few", max_slices=4)["held"])
    whole = denoise_array(load_denoiser(path), sitk.GetArrayFromImage(source).astype(np.float32), "CT", skip_air=False)
    assert central.GetSize() == (128, 128, 4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(central), whole[3:7], atol=1e-3)
    assert np.allclose(central.GetOrigin(), source.TransformIndexToPhysicalPoint((0, 0, 3)), atol=1e-4)
    assert central.GetSpacing() == pytest.approx(source.GetSpacing())
    full = sitk.ReadImage(denoised_stand_ins({"held": crop}, path, tmp_path / "all")["held"])
    np.testing.assert_allclose(sitk.GetArrayFromImage(full), whole, atol=1e-3)


def test_stand_ins_are_denoised_in_the_air_around_the_patient_too(tmp_path, tiny_weights, shared_data):
    """A stand-in is the clean side of pseudo pairs: unlike a served output, its air around the patient is denoised
    too (left as acquired, patches of it would teach the network to keep the noise there). A real abdomen series
    with air above the patient, the arms at the sides and the table below."""
    from lib.imaging import read_volume
    from lib.noise_learning.workflow import denoised_stand_ins
    from lib.predict import body_crop

    series = shared_data / "dicom" / "ct_abdomen_siemens_j2k_slab"
    path = tiny_weights / "pretrained_adl_ct.pt"
    stand_in = sitk.GetArrayFromImage(sitk.ReadImage(denoised_stand_ins({"site": series}, path, tmp_path,
                                                                       max_slices=2)["site"]))
    acquired = read_volume(series).array.astype(np.float32)[9:11]  # the 2 central of 20 slices
    rows, columns = body_crop(acquired)
    outside = np.ones(acquired.shape, bool)
    outside[:, rows, columns] = False
    expected = denoise_array(load_denoiser(path), acquired, "CT", skip_air=False)
    np.testing.assert_allclose(stand_in, expected, atol=1e-3)
    # the air went through the network (this series' air is a flat -1024 HU, which the network moves a little),
    # not returned as acquired
    assert (stand_in[outside] != acquired[outside]).mean() > 0.5


def test_holdout_split_every_fifth_slice_at_least_one():
    assert holdout_indices([10], 5) == [[4, 9]]
    assert holdout_indices([3, 4], 5) == [[], [1]]  # counted over all inputs
    assert holdout_indices([3], 5) == [[2]]  # fewer slices than the period: the last one
    with pytest.raises(ValueError, match="at least 2"):
        holdout_indices([1], 5)


# ------------------------------------------------------------------------------------------ the command
def _slices_of(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


@pytest.mark.slow
def test_adapt_end_to_end_writes_weights_and_report_held_out_slices_unused(tmp_path, tiny_weights, low_dose_slab,
                                                                         slab_array):
    output = tmp_path / "out" / "adl_site.pt"
    work = tmp_path / "work"
    start = tiny_weights / "pretrained_adl_ct.pt"
    # a tiny run may move the loss either way by a hair: accept 5 % here; the numbers are checked below
    done = run_cli("adapt", "--lowdose", low_dose_slab.parent, "--model", "adl", "--initial-weights", start,
                   "--output", output, "--work-dir", work, "--tolerance", "0.05", *TINY)
    assert done.returncode == 0, done.stderr
    assert output.is_file() and "wrote" in done.stdout and "planted-lesion contrast kept" in done.stdout
    report = json.loads((output.parent / "adl_site.pt.adapt.json").read_text())
    check = report["check"]
    assert check["passed"] and report["written"] and "J-invariant" in check["criterion"]
    lesions = report["lesion_check"]  # the same held-out slices, lesions planted in their real noise
    assert lesions["passed"] and report["passed"] and lesions["lesions"] >= 8
    assert lesions["candidate_percent"] >= lesions["baseline_percent"] - lesions["tolerance_pp"]
    assert "lesion check, as served (contrast kept of" in done.stdout
    assert check["adapted_loss"] <= check["baseline_loss"] * 1.05
    assert check["relative_change"] == pytest.approx((check["adapted_loss"] - check["baseline_loss"])
                                                     / check["baseline_loss"])
    assert report["held_out"][0]["slices"] == [4, 9]
    assert report["train_slices"][0]["slices"] == [0, 1, 2, 3, 5, 6, 7, 8]
    assert set(report["seconds"]) >= {"learn_noise", "pseudo_pairs", "fine_tune", "check", "total"}
    # by construction: the files that noise learning and fine-tuning read hold exactly the training slices
    trained_on = sorted((work / "train_low_dose").glob("*.nii.gz"))
    seen = np.concatenate([_slices_of(p) for p in trained_on])
    assert len(seen) == 8
    for z in (4, 9):
        assert not any(np.array_equal(s, slab_array[z]) for s in seen)
    assert np.array_equal(seen, slab_array[[0, 1, 2, 3, 5, 6, 7, 8]])

    # the weight file names the inputs by file name only (it travels); the report keeps the full paths
    held_in_weights = load_denoiser(output).metadata["training"]["data"]["held_out"]
    assert held_in_weights == [dict(h, input=Path(h["input"]).name) for h in report["held_out"]]
    assert str(tmp_path) not in json.dumps(load_denoiser(output).metadata["training"])
    # the starting file's record is carried in the adapted file's lineage (the start last, by name and sha256)
    lineage = load_denoiser(output).metadata["training"]["lineage"]
    assert [e["file"] for e in lineage] == ["pretrained_adl_ct.pt"] and lineage[-1]["model"] == "adl"
    assert lineage[-1]["sha256"] == hashlib.sha256(start.read_bytes()).hexdigest()
    # the starting weights are never touched
    assert start.is_file()


#: rows, columns of the slab that ``test_adapt_compares_planted_lesions_as_each_file_is_served`` adapts on
CROP = (slice(64, 192), slice(64, 192))


@pytest.mark.slow
def test_adapt_compares_planted_lesions_as_each_file_is_served(tmp_path, low_dose_slab, slab_array):
    """From the shipped CT ADL file (its network alone keeps far less of a small lesion's contrast than it does
    served with its restoration width): the lesion verdict in adapt's report is what the starting file and the
    written file give as served, on the held-out slices, and not what their bare networks give."""
    from lib.noise_learning.adaptation import AdaptSettings
    from lib.predict import slice_denoiser

    start = tmp_path / "start" / "pretrained_adl_ct.pt"
    start.parent.mkdir()
    start.write_bytes((APP_DIR / "model" / "pretrained_adl_ct.pt").read_bytes())
    output = tmp_path / "out" / "adl_site.pt"
    # --force: the verdict is not what this test is about; the written file is needed to score it independently.
    # One held-out slice and one mask shift keep the shipped network's passes few, and so do the three last slices
    # of the slab (two to adapt on: the shipped network denoises each for the pseudo pairs), cropped to the brain
    # and skull (CROP, a quarter of the pixels of each pass), and 2 steps of noise learning and of fine-tuning (what
    # is learnt is not checked here: the written file is scored as it is)
    slab = tmp_path / "slab" / "ld_last3.nii.gz"
    slab.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(low_dose_slab))[CROP[1], CROP[0], 7:10], str(slab))
    done = run_cli("adapt", "--lowdose", slab, "--model", "adl", "--initial-weights", start,
                   "--output", output, *TINY, "--check-shifts", "1", "--holdout-every", "3", "--noise-steps", "2",
                   "--steps", "2", "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((output.parent / "adl_site.pt.adapt.json").read_text())
    lesions = report["lesion_check"]
    assert report["held_out"][0]["slices"] == [2] and lesions["lesions"] >= 4  # slice 9 of the slab

    settings = AdaptSettings()
    held_out = [(list(slab_array[[9], CROP[0], CROP[1]]), SPACING)]
    files = [load_denoiser(path) for path in (start, output)]

    def contrast_kept(served: bool) -> dict:
        start_net, adapted_net = (slice_denoiser(m, "CT", served=served) for m in files)
        return lesion_contrast_check(start_net, adapted_net, held_out, per_slice=settings.lesions_per_slice,
                                     tolerance_pp=settings.lesion_tolerance_pp, seed=settings.seed)

    as_served, bare = contrast_kept(served=True), contrast_kept(served=False)
    # the two ways of comparing differ clearly here, so the report can only match one of them
    assert as_served["baseline_percent"] > bare["baseline_percent"] + 10, (as_served, bare)
    assert lesions["baseline_percent"] == pytest.approx(as_served["baseline_percent"], abs=1e-3)
    assert lesions["candidate_percent"] == pytest.approx(as_served["candidate_percent"], abs=1e-3)
    # the start's 0.8 px or a narrower width measured on the held-out slices (narrower gives more back)
    assert 0 < report["low_frequency_restoration"]["sigma_px"] <= 0.8


#: the fine-tuned ADL network's output logit raised by this much (``_wreck``): soft tissue comes out hundreds of HU
#: too bright, whatever the few fine-tuning steps did
WRECK_LOGIT = 0.5


def _wreck(generator) -> None:
    """Make a fine-tuned ADL network worse by a known amount, whatever its training did: its full-resolution head's
    last bias raised by :data:`WRECK_LOGIT` adds that to every output logit (the network is
    ``sigmoid(logit(input) + head)``), a bright offset over the whole image."""
    import torch

    with torch.no_grad():
        generator.heads[0].out.bias.add_(WRECK_LOGIT)


def _run_wrecked(monkeypatch, capsys, *args: str | Path):
    """``cli.py adapt *args`` in-process, the fine-tuned network wrecked (``_wreck``, through
    ``adapt_to_low_dose``'s test hook) before it is exported and checked: (exit status, stdout, stderr)."""
    import functools

    import lib.noise_learning.adaptation as adaptation

    monkeypatch.setattr(adaptation, "adapt_to_low_dose",
                        functools.partial(adaptation.adapt_to_low_dose, tamper_for_tests=_wreck))
    code = import_cli().main(["adapt", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_adapt_refuses_a_worse_model_and_writes_nothing(tmp_path, tiny_weights, low_dose_slab, monkeypatch, capsys):
    """A fine-tuned network made worse (``_wreck``; finite, so not the diverged refusal) is refused by the check on
    the held-out slices: exit 3, nothing written but the report."""
    output = tmp_path / "adl_site.pt"
    code, out, err = _run_wrecked(monkeypatch, capsys, "--lowdose", low_dose_slab, "--model", "adl",
                                  "--initial-weights", tiny_weights / "pretrained_adl_ct.pt", "--output", output,
                                  *TINY, "--noise-steps", "2", "--steps", "2")
    assert code == 3, out + err
    assert "worse than the starting one on the held-out low-dose slices" in err
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adl_site.pt")]  # no temp file left
    report = json.loads((tmp_path / "adl_site.pt.adapt.json").read_text())
    assert not report["passed"] and not report["written"]
    assert report["passed"] == (report["check"]["passed"] and report["lesion_check"]["passed"])
    assert not report["check"]["passed"]
    assert report["check"]["adapted_loss"] > 2 * report["check"]["baseline_loss"]  # the wreck, not a hair
    # the report of a refused run does not block the next attempt; weights that exist do
    from lib.noise_learning.adaptation import blocking_files

    assert blocking_files(output) == []
    output.write_bytes(b"weights")
    assert blocking_files(output)[0] == output


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_refused_overwrite_leaves_the_weights_in_place_and_their_report(tmp_path, tiny_weights, low_dose_slab,
                                                                          monkeypatch, capsys):
    """Weights adapted earlier sit at the output with their report; a new run with --overwrite is refused (its
    fine-tuned network wrecked, ``_wreck``): both files stay as they were, and the refusal's report goes to another
    name, printed. (The refusal used to write its "written": false over the report of the weights still in place.)"""
    output = tmp_path / "adl_site.pt"
    output.write_bytes((tiny_weights / "pretrained_adl_ct.pt").read_bytes())  # stands for the earlier run's weights
    in_place = tmp_path / "adl_site.pt.adapt.json"
    in_place.write_text(json.dumps({"passed": True, "written": True, "note": "the report of the weights in place"}))
    before = {p.name: p.read_bytes() for p in (output, in_place)}
    code, out, err = _run_wrecked(monkeypatch, capsys, "--lowdose", low_dose_slab, "--model", "adl",
                                  "--initial-weights", tiny_weights / "pretrained_adl_ct.pt", "--output", output,
                                  *TINY, "--noise-steps", "2", "--steps", "2", "--overwrite")
    assert code == 3, out + err
    assert {p.name: p.read_bytes() for p in (output, in_place)} == before
    refused = tmp_path / "adl_site.pt.adapt.refused.json"
    assert f"report {refused}" in err and "kept as they were" in err
    report = json.loads(refused.read_text())
    assert not report["written"] and not report["check"]["passed"]
    # that report blocks nothing: the weights and their report do
    from lib.noise_learning.adaptation import blocking_files

    assert blocking_files(output) == [output, in_place]


@pytest.mark.usefixtures("one_torch_thread")
def test_adapt_killed_after_writing_the_weights_leaves_no_earlier_report_beside_them(tmp_path, tiny_weights,
                                                                                     low_dose_slab, monkeypatch):
    """An earlier refused run left ``"written": false``; this run is killed (Ctrl-C) between writing its weights
    and its report: that old report must not sit beside the new weights and describe them as never written."""
    import lib.noise_learning.adaptation as adaptation

    output = tmp_path / "adl_site.pt"
    stale = adaptation.report_path(output)
    stale.write_text(json.dumps({"passed": False, "written": False, "note": "an earlier refused run"}))
    real_write = adaptation.atomic_write_json

    def killed_at_the_report(path, *args, **kwargs):
        if Path(path) == stale and output.exists():  # the weights are out: the kill comes now
            raise KeyboardInterrupt
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(adaptation, "atomic_write_json", killed_at_the_report)
    settings = adaptation.AdaptSettings(noise_steps=2, steps=2, patch_size=32, samples_per_epoch=8, check_shifts=1,
                                        lesions_per_slice=1)
    with pytest.raises(KeyboardInterrupt):
        adaptation.adapt_to_low_dose([low_dose_slab], "adl", tiny_weights / "pretrained_adl_ct.pt", output,
                                     settings, force=True, work_dir=tmp_path / "work")
    assert load_denoiser(output).metadata["network_class"]  # the new weights were written
    assert not stale.exists(), stale.read_text()


@pytest.mark.slow
def test_adapt_never_writes_a_diverged_model_even_when_forced(tmp_path, tiny_weights, low_dose_slab):
    """A run whose weights end up NaN or infinite (here: Adam at lr 1e6 moves every trained weight by about 1e6,
    beyond float16) would answer NaN for every voxel: refused with exit 3 and nothing written, even with --force.
    One fine-tuning step does it (and 2 of noise learning: what is learnt does not matter here)."""
    output = tmp_path / "adl_site.pt"
    done = run_cli("adapt", "--lowdose", low_dose_slab, "--model", "adl", "--initial-weights",
                   tiny_weights / "pretrained_adl_ct.pt", "--output", output, *TINY, "--lr", "1e6", "--force",
                   "--noise-steps", "2", "--steps", "1")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "training diverged" in done.stderr and "NaN or infinite" in done.stderr
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adl_site.pt")]
    report = json.loads((tmp_path / "adl_site.pt.adapt.json").read_text())
    assert not report["passed"] and not report["written"] and "not written" in report["diverged"]


@pytest.mark.slow
def test_adapt_tddl_gcn_to_a_real_abdomen_ct_at_simulated_lower_dose(tmp_path, tiny_weights, shared_data):
    """Another scanner (Philips, upper abdomen of the thorax scan in ../shared/data), its dose lowered to a quarter by
    the sinogram-domain simulation; the TDDL-GCN adapted to it end to end, both checks reported."""
    image = sitk.ReadImage(str(shared_data / "ct_thorax_philips_2mm.nii.gz"))[160:352, 150:342, 2:12]
    full = tmp_path / "full.nii.gz"
    sitk.WriteImage(image, str(full))
    site = tmp_path / "site"
    site.mkdir()
    simulated = run_cli("simulate", "--input", full, "--output", site / "ld.nii.gz", "--dose", "0.25", "--seed", "1")
    assert simulated.returncode == 0, simulated.stderr
    output = tmp_path / "gcn_site.pt"
    done = run_cli("adapt", "--lowdose", site, "--model", "tddl_gcn", "--initial-weights",
                   tiny_weights / "pretrained_tddl_gcn_ct.pt", "--output", output, "--force", "--lesion-tolerance", "5",
                   "--lesions-per-slice", "4", *TINY, "--noise-steps", "2")  # what the noise learns is not checked
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gcn_site.pt.adapt.json").read_text())
    assert report["held_out"][0]["slices"] == [4, 9] and report["written"]
    # served at the start file's restoration width, or at the width measured on lesions planted in the held-out
    # low-dose slices where that gives more back (the lesion check compared the networks alone)
    served = load_denoiser(output).metadata[RESTORATION_KEY]
    assert served["inherited_from"].startswith("pretrained_tddl_gcn_ct.pt (sha256 ") and served["chosen"]
    measured = served["measured_on"]
    assert measured["lesions"] >= 6 and "0" in measured["kept_percent"]
    start_width = TINY_GCN_RESTORATION["sigma_px"]
    assert served["sigma_px"] in (start_width, measured["sigma_px"]) and served["sigma_px"] <= start_width
    assert measured["sigma_px"] == 0 or served["sigma_px"] <= measured["sigma_px"]
    assert report["low_frequency_restoration"] == served
    assert np.isfinite(report["check"]["baseline_loss"]) and np.isfinite(report["check"]["adapted_loss"])
    lesions = report["lesion_check"]
    assert lesions["tolerance_pp"] == 5.0 and report["settings"]["lesions_per_slice"] == 4
    assert lesions["lesions"] >= 4 and 0 < lesions["baseline_percent"] <= 110 and 0 < lesions["candidate_percent"] <= 110
    assert report["passed"] == (report["check"]["passed"] and lesions["passed"])
    assert report["forced"] == (not report["passed"])
    adapted = load_denoiser(output)
    assert adapted.metadata["network_class"] == "GCNDenoiser" and adapted.modality == "CT"


def test_existing_output_without_overwrite_is_a_clear_error_and_nothing_changes(tmp_path, tiny_weights,
                                                                                 low_dose_slab):
    output = tmp_path / "adl_site.pt"
    output.write_bytes(b"precious")
    before = hashlib.sha256(output.read_bytes()).hexdigest()
    done = run_cli("adapt", "--lowdose", low_dose_slab, "--model", "adl", "--initial-weights",
                   tiny_weights / "pretrained_adl_ct.pt", "--output", output, *TINY)
    assert done.returncode == 2
    assert "already exists (add --overwrite" in done.stderr
    assert hashlib.sha256(output.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adl_site.pt"]


def test_model_must_match_the_starting_weights(tmp_path, tiny_weights, low_dose_slab):
    done = run_cli("adapt", "--lowdose", low_dose_slab, "--model", "tddl_gcn", "--initial-weights",
                   tiny_weights / "pretrained_adl_ct.pt", "--output", tmp_path / "x.pt", *TINY)
    assert done.returncode == 2 and "not the tddl_gcn model" in done.stderr
    assert not (tmp_path / "x.pt").exists()


def test_adapt_refuses_an_mr_or_values_that_cannot_be_hu(tmp_path, tiny_weights):
    """Adaptation learns CT noise in HU: MR magnitudes (nothing below 0) are refused in one line before any work,
    not adapted on as if they were HU."""
    import numpy as np
    import SimpleITK as sitk

    folder = tmp_path / "lowdose"
    folder.mkdir()
    magnitudes = np.random.default_rng(0).uniform(0, 400, (4, 48, 48)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(magnitudes), str(folder / "mr.nii.gz"))
    result = run_cli("adapt", "--lowdose", folder, "--model", "adl", "--initial-weights",
                     tiny_weights / "pretrained_adl_ct.pt", "--output", tmp_path / "out.pt", *TINY)
    assert result.returncode == 2 and "holds no value below 0" in result.stderr, result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_adapt_refuses_a_scan_given_twice_before_any_work(tmp_path, tiny_weights, low_dose_slab):
    """The same scan twice (its folder and the file in it, or a copy under another name): the held-out check slices
    are counted over all inputs, so each copy's would be trained on through the other, and the no-worse check
    would score slices the model was tuned on. Refused in one line, nothing written."""
    copy = tmp_path / "copy_of_slab.nii.gz"
    copy.write_bytes(low_dose_slab.read_bytes())
    for given in ([low_dose_slab.parent, low_dose_slab], [low_dose_slab, copy]):
        result = run_cli("adapt", "--lowdose", *given, "--model", "adl", "--initial-weights",
                         tiny_weights / "pretrained_adl_ct.pt", "--output", tmp_path / "out.pt", *TINY)
        assert result.returncode == 2 and "hold the same scan" in result.stderr, result.stderr
        assert "noise patches" not in result.stdout  # refused before the noise model was learnt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy_of_slab.nii.gz"]


def test_adapt_refuses_a_work_dir_that_is_a_file_before_any_work(tmp_path, tiny_weights, low_dose_slab):
    """--work-dir naming a file failed after the inputs were read with "[Errno 20] Not a directory:
    '.../train_low_dose'", not naming the option; now a one-line error naming it, nothing written."""
    scratch = tmp_path / "scratch"
    scratch.write_text("not a folder")
    for given, expected in ((scratch, "--work-dir {} is a file, not a folder"),
                            (scratch / "sub", "--work-dir {}/sub: {} is a file, not a folder")):
        result = run_cli("adapt", "--lowdose", low_dose_slab, "--model", "adl", "--initial-weights",
                         tiny_weights / "pretrained_adl_ct.pt", "--output", tmp_path / "out.pt", "--work-dir",
                         given, *TINY)
        assert result.returncode == 2 and expected.format(scratch, scratch) in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]


def test_adapt_checks_the_normal_dose_images_before_learning_anything(tmp_path, tiny_weights, low_dose_slab):
    """--normal-dose was read only after the noise model's training (minutes at the default steps): a missing or
    MR folder failed then, and a normal-dose image that is a low-dose input was used as the clean side of the
    pairs, its held-out check slices included. Now each is refused in one line before any work."""
    mr = tmp_path / "mr"
    mr.mkdir()
    magnitudes = np.random.default_rng(0).uniform(0, 400, (4, 48, 48)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(magnitudes), str(mr / "mr.nii.gz"))
    cases = {"no such file or folder": tmp_path / "missing", "holds no value below 0": mr,
             "is the low-dose input": low_dose_slab.parent}
    for expected, normal_dose in cases.items():
        result = run_cli("adapt", "--lowdose", low_dose_slab, "--model", "adl", "--initial-weights",
                         tiny_weights / "pretrained_adl_ct.pt", "--output", tmp_path / "out.pt",
                         "--normal-dose", normal_dose, *TINY)
        assert result.returncode == 2 and expected in result.stderr, (expected, result.stderr)
        assert "noise patches" not in result.stdout, expected
        assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.pt.adapt.json").exists()


def test_a_nan_or_implausible_input_is_refused_without_naming_denoising(tmp_path, capsys, tiny_weights, slab_array):
    """The image reader's refusals end "replace them before denoising": 'adapt' said so of its low-dose and
    normal-dose inputs, a step it never takes. Now it names what it does with them."""
    for name, value in (("nan", np.nan), ("huge", 1e20)):
        bad = slab_array.copy()
        bad[2, 5, 5] = value
        sitk.WriteImage(sitk.GetImageFromArray(bad), str(tmp_path / f"{name}.nii.gz"))
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(slab_array), str(good))
    cli = import_cli()
    common = ["--model", "adl", "--initial-weights", str(tiny_weights / "pretrained_adl_ct.pt"),
              "--output", str(tmp_path / "out.pt"), *TINY]
    for given, expected in ((["--lowdose", str(tmp_path / "nan.nii.gz")], "1 NaN values; replace them"),
                            (["--lowdose", str(tmp_path / "huge.nii.gz")], "fix or replace those values"),
                            (["--lowdose", str(good), "--normal-dose", str(tmp_path / "nan.nii.gz")],
                             "1 NaN values; replace them")):
        capsys.readouterr()
        code = cli.main(["adapt", *given, *common])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], err
        assert "denoising" not in err[0] and err[0].endswith("before adaptation uses it"), err[0]
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_adapt_takes_the_noise_of_real_normal_dose_images_off_the_learnt_noise(tmp_path, tiny_weights, low_dose_slab,
                                                                              shared_data):
    """--normal-dose images are real scans with noise of their own (the Philips thorax about 30 HU): the learnt
    noise (the scanner's whole low-dose noise) was added on top of it. The pseudo pairs now take each image's own
    noise off (lib.noise_learning.LearnedNoiseSource(reference_noise_std_hu="estimate")), recorded in the report;
    the mechanism is checked on the pseudo images in test_noise_learning.py."""
    thorax = sitk.ReadImage(str(shared_data / "ct_thorax_philips_2mm.nii.gz"))
    normal_dose = tmp_path / "nd" / "thorax.nii.gz"
    normal_dose.parent.mkdir()
    sitk.WriteImage(thorax[128:384, 128:384, 80:82], str(normal_dose))
    output = tmp_path / "adl_site.pt"
    done = run_cli("adapt", "--lowdose", low_dose_slab, "--normal-dose", normal_dose, "--model", "adl",
                   "--initial-weights", tiny_weights / "pretrained_adl_ct.pt", "--output", output, *TINY,
                   "--noise-steps", "2", "--steps", "1", "--check-shifts", "1", "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    pairs = json.loads((tmp_path / "adl_site.pt.adapt.json").read_text())["pseudo_pairs"]
    assert pairs["clean_side"] == "given normal-dose images" and len(pairs["clean_noise_std_hu"]) == 1
    assert 24 < pairs["clean_noise_std_hu"][0] < 36, pairs
    # the report (and the console) say the learnt noise, the image's own noise taken off it and the noise added
    [row] = pairs["noise_per_image"]
    assert row["image"] == str(normal_dose) and row["own_noise_std_hu"] == round(pairs["clean_noise_std_hu"][0], 1)
    assert row["added_noise_std_hu"] == pytest.approx(
        np.sqrt(max(0.0, row["learnt_noise_std_hu"] ** 2 - row["own_noise_std_hu"] ** 2)), abs=0.15)
    assert pairs["noise_added"] in done.stdout, done.stdout


@pytest.mark.slow
def test_adapt_no_level_calibration_keeps_the_learnt_noise_level(tmp_path, tiny_weights, low_dose_slab, capsys):
    """``adapt --no-level-calibration``: the noise model is used at its learnt level (level_correction 1.0), and
    the report says so (settings and noise_level), as does the noise model kept in --work-dir."""
    from lib.noise_learning.noise_model import NoiseModel
    from lib.noise_learning.workflow import LEVEL_CALIBRATION_OFF

    output, work = tmp_path / "adl_site.pt", tmp_path / "work"
    code = import_cli().main(["adapt", "--lowdose", str(low_dose_slab), "--model", "adl", "--initial-weights",
                              str(tiny_weights / "pretrained_adl_ct.pt"), "--output", str(output), "--work-dir",
                              str(work), *TINY, "--noise-steps", "2", "--steps", "1", "--check-shifts", "1",
                              "--force", "--no-level-calibration"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "adl_site.pt.adapt.json").read_text())
    assert report["settings"]["calibrate_noise_level"] is False
    assert report["noise_level"] == {"level_correction": 1.0, "skipped": LEVEL_CALIBRATION_OFF}
    assert "NOT calibrated (turned off by request)" in out
    model = NoiseModel.load(work / "noise_model.pt")
    assert model.level_correction == 1.0
    assert model.training_stats["level_calibration_skipped"] == LEVEL_CALIBRATION_OFF


@pytest.mark.slow
def test_adapt_takes_single_slice_2d_inputs(tmp_path, tiny_weights):
    """Two 2D low-dose slices (single DICOM files, 2D NIfTI): adapted on, checked and answered (written or
    refused as worse), not failed with an internal geometry message."""
    import SimpleITK as sitk

    folder = tmp_path / "lowdose"
    folder.mkdir()
    image = sitk.ReadImage(str(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz"))
    for name, rows in (("upper", slice(0, 256)), ("lower", slice(256, 512))):  # of the head's middle columns
        sitk.WriteImage(image[128:384, rows, 0], str(folder / f"{name}.nii.gz"))  # 2D: 256 x 256
    result = run_cli("adapt", "--lowdose", folder / "upper.nii.gz", folder / "lower.nii.gz", "--model", "adl",
                     "--initial-weights", tiny_weights / "pretrained_adl_ct.pt", "--output", tmp_path / "out.pt",
                     "--holdout-every", "2", *TINY, "--noise-steps", "2")  # what the noise learns is not checked
    assert result.returncode in (0, 3), result.stderr  # 3: refused as worse by its check, which is an answer
    assert "check" in result.stdout.lower(), result.stdout
