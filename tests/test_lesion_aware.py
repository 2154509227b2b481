"""Lesion-aware (LIDnet-style) training: synthetic lesions in the training data, their ROI in the patches, the
ROI losses, the lesion detector, and the terms reaching the denoiser in both engines and the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lib.data import ADLPatchDataset, SyntheticNoiseSource
from lib.engines import ADLTrainingConfig, GCNTrainingConfig, train_adl, train_gcn
from lib.lesions import Lesion, insert_lesions, lesion_mask, lesion_profile, random_lesions
from lib.lesions.detector import load_lesion_detector, save_lesion_detector, train_lesion_detector
from lib.losses import ROIPerceptualLoss, roi_l1_loss
from lib.networks import LesionDetector

APP = Path(__file__).resolve().parents[1] / "apps" / "adl_denoise"
TISSUE_HU = 60.0


def _phantom(path: Path, slices: int = 3, size: int = 96) -> Path:
    """A CT phantom: a disc of uniform 60 HU soft tissue in air (0.8 mm pixels), written as NIfTI."""
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.46 * size) ** 2
    volume = np.where(body, TISSUE_HU, -1000.0).astype(np.float32)
    image = sitk.GetImageFromArray(np.repeat(volume[None], slices, axis=0))
    image.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(image, str(path))
    return path


# ---------------------------------------------------------------------------------------------- synthesis
def test_lesion_profile_has_the_diameter_and_a_smooth_edge():
    lesion = Lesion(centre=(50.0, 50.0), diameter_mm=8.0, contrast=-20.0, edge_mm=0.5)
    profile = lesion_profile((101, 101), lesion, 0.5)
    assert profile[50, 50] == pytest.approx(1.0, abs=1e-3)
    # half height at the radius (4 mm = 8 pixels), nothing 2 mm beyond it
    assert profile[50, 58] == pytest.approx(0.5, abs=0.05)
    assert profile[50, 62] < 1e-3
    area_mm2 = float(profile.sum()) * 0.25
    assert area_mm2 == pytest.approx(np.pi * 16.0, rel=0.05)


def test_lesions_sit_in_uniform_soft_tissue_and_do_not_overlap():
    image = np.full((128, 128), -1000.0, np.float32)
    image[20:108, 20:108] = TISSUE_HU
    image[60:64, :] = 400.0  # a "vessel" the sites must avoid
    lesions = random_lesions(image, 0.8, np.random.default_rng(3), count=6)
    assert len(lesions) >= 3
    for lesion in lesions:
        y, x = lesion.centre
        r = lesion.diameter_mm / 0.8  # the site's disc: twice the diameter
        assert 20 + r <= y <= 108 - r and 20 + r <= x <= 108 - r
        assert abs(y - 62) > r
    mask = lesion_mask(image.shape, lesions, 0.8)
    assert float(mask.max()) <= 1.0
    total = sum(float(lesion_profile(image.shape, l, 0.8).sum()) for l in lesions)
    assert float(mask.sum()) == pytest.approx(total, rel=1e-3)  # disjoint


def test_insert_lesions_adds_hu_for_ct_and_relative_signal_for_mr():
    lesion = Lesion(centre=(32.0, 32.0), diameter_mm=10.0, contrast=-25.0)
    ct = insert_lesions(np.full((64, 64), 50.0, np.float32), [lesion], 1.0, "CT")
    assert ct[32, 32] == pytest.approx(25.0, abs=0.1)
    mr = insert_lesions(np.full((64, 64), 200.0, np.float32), [Lesion((32.0, 32.0), 10.0, 0.3)], 1.0, "MR")
    assert mr[32, 32] == pytest.approx(260.0, abs=0.5)
    with pytest.raises(ValueError, match="NaN"):
        insert_lesions(np.full((8, 8), np.nan, np.float32), [lesion], 1.0)


# ---------------------------------------------------------------------------------------------- training data
def test_lesion_aware_source_inserts_lesions_before_the_noise_and_keeps_validation_clean(tmp_path):
    path = _phantom(tmp_path / "phantom.nii.gz")
    source = SyntheticNoiseSource([path], "CT", "gaussian", noise_level_range=(5.0, 5.0), lesions_per_slice=3,
                                  seed=1, progress=False)
    vol = source.volumes[0]
    assert vol.roi is not None and vol.roi.shape == vol.clean.shape
    changed = np.abs(vol.clean - sitk.GetArrayFromImage(sitk.ReadImage(str(path)))) > 0.5
    assert changed.any()
    assert np.all(vol.roi[changed] > 0.01)  # every changed pixel lies in the ROI
    assert sum(len(v) for v in vol.lesions.values()) >= 3
    pair = source.validation_pairs()[0]
    assert set(np.unique(pair.clean)) <= {TISSUE_HU, -1000.0}  # validation images carry no synthetic lesion



@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_lesion_aware_training_data_has_darker_and_brighter_lesions(tmp_path, modality):
    """Both signs of contrast in the training lesions: an ROI loss on brighter lesions only teaches the network
    that bright blobs are likely, and it then brightens uniform tissue (measured on MR: bench/README.md)."""
    size = 160
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    if modality == "CT":
        volume = np.where(r2 < (0.46 * size) ** 2, TISSUE_HU, -1000.0)
    else:  # brain-like tissue at 200 inside a bright rim (scalp fat at 400), air 0
        volume = np.where(r2 < (0.40 * size) ** 2, 200.0, np.where(r2 < (0.46 * size) ** 2, 400.0, 0.0))
    image = sitk.GetImageFromArray(np.repeat(volume.astype(np.float32)[None], 4, axis=0))
    image.SetSpacing((0.8, 0.8, 2.0))
    path = tmp_path / "phantom.nii.gz"
    sitk.WriteImage(image, str(path))
    noise = "gaussian" if modality == "CT" else "rician"
    source = SyntheticNoiseSource([path], modality, noise, noise_level_range=(5.0, 5.0), lesions_per_slice=6,
                                  seed=4, progress=False)
    vol = source.volumes[0]
    contrasts = [lesion["contrast"] for lesions in vol.lesions.values() for lesion in lesions]
    assert len(contrasts) >= 8
    assert min(contrasts) < 0 < max(contrasts), contrasts
    tissue = TISSUE_HU if modality == "CT" else 200.0
    inside = vol.roi > 0.9
    assert (vol.clean[inside] < tissue - 1.0).any() and (vol.clean[inside] > tissue + 1.0).any()

def test_patches_carry_the_roi_aligned_with_the_lesions_through_crop_and_augmentation(tmp_path):
    path = _phantom(tmp_path / "phantom.nii.gz")
    source = SyntheticNoiseSource([path], "CT", "gaussian", noise_level_range=(5.0, 5.0), lesions_per_slice=4,
                                  seed=2, progress=False)
    dataset = ADLPatchDataset(source, patch_size=48, augment=True, seed=0)
    tissue = source.volumes[0].scaling.normalise(np.float32(TISSUE_HU))
    seen = 0
    for i in range(40):
        item = dataset[i]
        assert set(item) == {"noisy", "clean", "roi"}
        assert item["roi"].shape == item["clean"].shape
        lesion_pixels = (item["clean"] - float(tissue)).abs() > 2.0 / 4096  # > 2 HU away from the tissue
        lesion_pixels &= (item["clean"] > 0.1)  # not air
        if lesion_pixels.any():
            seen += 1
            assert float(item["roi"][lesion_pixels].min()) > 0.01
        air = item["clean"] < 0.1
        if air.any():
            assert float(item["roi"][air].max()) == 0.0  # no ROI in the air
    assert seen >= 5


def test_roi_fraction_draws_patches_around_a_small_marked_region(tmp_path):
    """A 3 x 3-pixel marked structure on one slice of three 192 x 192 slices: random 32-pixel patches almost never
    hold it; with roi_fraction 0.5 about half do, aligned with the structure through crop and augmentation."""
    path = _phantom(tmp_path / "phantom.nii.gz", slices=3, size=192)
    source = SyntheticNoiseSource([path], "CT", "gaussian", noise_level_range=(5.0, 5.0), seed=2, progress=False)
    vol = source.volumes[0]
    vol.clean[1, 120:123, 70:73] = 400.0  # the structure, and the clinician's mark on it
    vol.roi = np.zeros(vol.clean.shape, np.float32)
    vol.roi[1, 120:123, 70:73] = 1.0
    structure = float(vol.scaling.normalise(np.float32(400.0)))

    def hits(fraction: float) -> int:
        dataset = ADLPatchDataset(source, patch_size=32, augment=True, seed=0, roi_fraction=fraction)
        count = 0
        for i in range(60):
            item = dataset[i]
            marked = item["roi"] > 0.5
            if marked.any():
                count += 1
                assert torch.equal(marked, (item["clean"] - structure).abs() < 1e-4)  # aligned
                assert int(marked.sum()) <= 9
        return count

    assert hits(0.0) <= 6
    assert 20 <= hits(0.5) <= 45
    assert hits(1.0) == 60
    plain = ADLPatchDataset(source, patch_size=32, seed=0)
    off = ADLPatchDataset(source, patch_size=32, seed=0, roi_fraction=0.0)
    assert all(torch.equal(plain[i]["noisy"], off[i]["noisy"]) for i in range(5))  # off: the same samples
    with pytest.raises(ValueError, match="roi_fraction"):
        ADLPatchDataset(source, patch_size=32, roi_fraction=1.5)


def test_lesions_need_synthetic_2d_training(tmp_path):
    path = _phantom(tmp_path / "phantom.nii.gz")
    with pytest.raises(ValueError, match="2D"):
        SyntheticNoiseSource([path], "CT", "gaussian", spatial_dims=3, lesions_per_slice=2, progress=False)


# ---------------------------------------------------------------------------------------------- losses
def test_roi_l1_counts_only_the_roi():
    target = torch.zeros(1, 1, 16, 16)
    roi = torch.zeros(1, 1, 16, 16)
    roi[..., 4:8, 4:8] = 1.0
    output = torch.zeros(1, 1, 16, 16, requires_grad=True)
    with torch.no_grad():
        output[..., 12:, 12:] = 1.0  # error outside the ROI only
    assert float(roi_l1_loss(output, target, roi).detach()) == 0.0
    with torch.no_grad():
        output[..., 4:8, 4:8] = 0.5
    loss = roi_l1_loss(output, target, roi)
    assert float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    assert float(output.grad[..., 12:, 12:].abs().sum()) == 0.0
    assert float(output.grad[..., 4:8, 4:8].abs().sum()) > 0.0
    assert float(roi_l1_loss(output, target, torch.zeros_like(roi)).detach()) == 0.0


def test_roi_perceptual_loss_sees_an_erased_lesion_and_leaves_the_detector_alone():
    torch.manual_seed(0)
    detector = LesionDetector(window=(0.0, 1.0))
    target = torch.full((1, 1, 32, 32), 0.5)
    target[..., 12:20, 12:20] = 0.3  # the lesion
    roi = torch.zeros_like(target)
    roi[..., 10:22, 10:22] = 1.0
    loss = ROIPerceptualLoss(detector)
    assert float(loss(target.clone(), target, roi)) == pytest.approx(0.0, abs=1e-6)
    erased = torch.full_like(target, 0.5).requires_grad_(True)
    value = loss(erased, target, roi)
    assert float(value.detach()) > 0.01
    value.backward()
    assert erased.grad is not None and float(erased.grad.abs().sum()) > 0
    assert all(p.grad is None for p in detector.parameters())
    assert all(p.requires_grad for p in detector.parameters())  # flags restored


# ---------------------------------------------------------------------------------------------- detector
def test_detector_learns_to_find_lesions_and_round_trips_through_its_file(tmp_path):
    path = _phantom(tmp_path / "phantom.nii.gz", slices=4, size=96)
    source = SyntheticNoiseSource([path], "CT", "gaussian", noise_level_range=(10.0, 10.0), lesions_per_slice=5,
                                  seed=3, progress=False)
    dataset = ADLPatchDataset(source, patch_size=64, seed=0, min_foreground=0.6)

    def batches():
        i = 0
        while True:
            items = [dataset[i + j] for j in range(4)]
            i += 4
            yield {k: torch.stack([item[k] for item in items]) for k in items[0]}

    torch.set_num_threads(1)
    detector, record = train_lesion_detector(batches(), "CT", 150, lr=3e-3, features=(8, 8, 16, 32, 64, 8),
                                             progress=False)
    assert record["dice_clean_last50"] > 0.5, record
    path = save_lesion_detector(detector, tmp_path / "detector.pt", record)
    loaded = load_lesion_detector(path)
    x = next(batches())["clean"][:, :1]
    with torch.no_grad():
        assert torch.allclose(loaded(x), detector(x), atol=1e-5)
    (tmp_path / "bad.pt").write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match="not a readable lesion detector"):
        load_lesion_detector(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------- engines
def _tiny_detector(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_lesion_detector(LesionDetector(features=(4, 4, 8, 8, 8, 4), window=(0.2, 0.31)),
                                tmp_path / "detector.pt")


def _lesion_dataset(tmp_path: Path) -> ADLPatchDataset:
    path = _phantom(tmp_path / "phantom.nii.gz")
    source = SyntheticNoiseSource([path], "CT", "gaussian", noise_level_range=(10.0, 10.0), lesions_per_slice=4,
                                  seed=4, progress=False)
    return ADLPatchDataset(source, patch_size=32, seed=0, min_foreground=0.6)


def _adl_generator_after(dataset, steps: dict, **lesion) -> dict:
    config = ADLTrainingConfig(filters=(8, 8, 8, 8), disc_filters=(4, 4, 4, 4), enhancer_filters=4, batch_size=2,
                               device="cpu", amp=False, validation_every=0, checkpoint_every=0,
                               bn_recalibration_batches=0, seed=0, **steps, **lesion)
    result = train_adl(config, dataset, progress=False)
    return result, {k: v.detach().clone() for k, v in result.generator.state_dict().items()}


@pytest.mark.parametrize("phase", ["g_warmup", "adversarial"])
def test_adl_lesion_terms_reach_the_generator(tmp_path, phase):
    torch.set_num_threads(1)
    dataset = _lesion_dataset(tmp_path)
    detector = _tiny_detector(tmp_path)
    steps = ({"steps_g_warmup": 1, "steps_d_warmup": 0, "steps_adversarial": 0} if phase == "g_warmup" else
             {"steps_g_warmup": 0, "steps_d_warmup": 0, "steps_adversarial": 1})
    _, plain = _adl_generator_after(dataset, steps)
    result, aware = _adl_generator_after(dataset, steps, roi_l1_weight=50.0, roi_perceptual_weight=5.0,
                                         lesion_detector=str(detector))
    assert {"roi_l1", "roi_perceptual"} <= set(result.history[-1])
    changed = [k for k in plain if plain[k].dtype.is_floating_point and not torch.equal(plain[k], aware[k])]
    assert changed, "the lesion terms did not change G's update"


def test_collaborative_schedule_updates_the_detector_and_checkpoints_it(tmp_path):
    torch.set_num_threads(1)
    dataset = _lesion_dataset(tmp_path)
    detector = _tiny_detector(tmp_path)
    before = {k: v.clone() for k, v in load_lesion_detector(detector).state_dict().items()}
    config = ADLTrainingConfig(filters=(8, 8, 8, 8), disc_filters=(4, 4, 4, 4), enhancer_filters=4, batch_size=2,
                               device="cpu", amp=False, validation_every=0, checkpoint_every=2,
                               checkpoint_dir=str(tmp_path / "ckpt"), bn_recalibration_batches=0,
                               steps_g_warmup=2, steps_d_warmup=0, steps_adversarial=0, roi_l1_weight=1.0,
                               roi_perceptual_weight=1.0, lesion_detector=str(detector), collaborative_every=1)
    result = train_adl(config, dataset, progress=False)
    assert all("detector_loss" in h for h in result.history)
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    state = ckpt["lesion_detector"]["detector"]
    assert any(not torch.equal(before[k], state[k]) for k in before if before[k].dtype.is_floating_point)
    with pytest.raises(ValueError, match="collaborative_every needs"):
        ADLTrainingConfig(collaborative_every=2)
    with pytest.raises(ValueError, match="needs lesion_detector"):
        GCNTrainingConfig(roi_perceptual_weight=1.0)


def test_gcn_lesion_terms_reach_the_denoiser(tmp_path):
    torch.set_num_threads(1)
    dataset = _lesion_dataset(tmp_path)

    def run(**lesion):
        config = GCNTrainingConfig(features=8, k=4, search_window=7, n_blocks=1, layers_per_block=1, rank=2,
                                   batch_size=2, steps=1, device="cpu", amp=False, validation_every=0,
                                   checkpoint_every=0, patch_size=32, seed=0, **lesion)
        result = train_gcn(config, dataset, progress=False)
        return result, {k: v.detach().clone() for k, v in result.network.state_dict().items()}

    _, plain = run()
    result, aware = run(roi_l1_weight=50.0)
    assert "roi_l1" in result.history[-1]
    assert any(not torch.equal(plain[k], aware[k]) for k in plain if plain[k].dtype.is_floating_point)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_trains_a_detector_and_a_lesion_aware_model(tmp_path):
    phantom = _phantom(tmp_path / "phantom.nii.gz", slices=2, size=96)
    env_python = sys.executable
    detector = tmp_path / "detector.pt"
    run = subprocess.run([env_python, str(APP / "cli.py"), "train-lesion-detector", "--clean", str(phantom),
                          "--modality", "ct", "--output", str(detector), "--steps", "4", "--batch-size", "2",
                          "--patch-size", "32", "--noise-cache", str(tmp_path / "cache"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_lesion_detector(detector).kwargs()["spatial_dims"] == 2
    output = tmp_path / "aware.pt"
    run = subprocess.run([env_python, str(APP / "cli.py"), "train", "--model", "adl", "--modality", "ct",
                          "--clean", str(phantom), "--output", str(output), "--lesion-aware", "--lesion-detector",
                          str(detector), "--filters", "8,8,8,8", "--disc-filters", "4,4,4,4",
                          "--enhancer-filters", "4", "--patch-size", "32", "--batch-size", "2",
                          "--steps-g-warmup", "2", "--steps-d-warmup", "1", "--steps-adversarial", "1",
                          "--realisations", "1", "--noise-cache", str(tmp_path / "cache"), "--device", "cpu",
                          "--bn-recalibration-batches", "0", "--validation-every", "0"],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    record = torch.load(output, map_location="cpu", weights_only=True)["training"]
    assert record["data"]["synthetic_lesions"]["inserted"] >= 2
    # the detector by file name: a weight file's record never holds folders (lib.weights.portable_record)
    assert record["config"]["roi_l1_weight"] > 0 and record["config"]["lesion_detector"] == detector.name
    refused = subprocess.run([env_python, str(APP / "cli.py"), "train", "--model", "adl", "--modality", "ct",
                              "--clean", str(phantom), "--output", str(tmp_path / "x.pt"), "--roi-l1-weight", "3"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "needs --lesion-aware" in refused.stderr
