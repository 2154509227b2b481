"""The weights and the noise model shipped in ``apps/adl_denoise/model/`` load without network access, say how
they were trained, never came from the held-out split, and do their job on the sample data (built by
``sample_data/build_sample_data.py``, which test.sh runs first)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import APP_DIR, SAMPLE_STUDIES

from lib.data import check_not_heldout
from lib.evaluation.metrics import CT_WINDOWS, psnr
from lib.imaging import read_volume
from lib.predict import denoise_array, denoise_as_served, load_denoiser, uses_orthogonal_planes
from lib.noise_learning import NoiseModel
from lib.runtime.precision import cpu_has_native_bf16

MODEL_DIR = APP_DIR / "model"
SOFT_TISSUE = CT_WINDOWS["soft_tissue"]
# the gains measured with the shipped files on these samples (bench/README.md) minus a margin for other CPUs'
# arithmetic (float32 where bfloat16 is not native)
ADL_CT_SAMPLE_GAIN_DB = 8.0
ADL_MR_SAMPLE_GAIN_DB = 4.5
ADL_3D_MR_SAMPLE_GAIN_DB = 4.0
ADL_MR_ORTHOGONAL_GAIN_DB = 0.15


def _sample_ct_pair() -> tuple[np.ndarray, np.ndarray]:
    noisy = read_volume(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", modality="CT").array
    reference = read_volume(SAMPLE_STUDIES / "ct_head_pydicom693.nii.gz", modality="CT").array
    return noisy, reference


@pytest.mark.slow
def test_shipped_tddl_gcn_ct_weights_denoise_the_sample_quarter_dose_slice() -> None:
    loaded = load_denoiser(MODEL_DIR / "pretrained_tddl_gcn_ct.pt", device="cpu")
    assert loaded.metadata["network_class"] == "GCNDenoiser" and loaded.modality == "CT"
    record = loaded.metadata["training"]
    assert record["steps"] >= 1000 and record["hardware"] and record["data"]["images"]
    check_not_heldout(record["data"]["images"])  # names of the training images; raises on held-out ones

    noisy, reference = _sample_ct_pair()
    denoised = denoise_array(loaded, noisy, modality="CT", device="cpu")
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32
    gain = psnr(denoised, reference, SOFT_TISSUE) - psnr(noisy, reference, SOFT_TISSUE)
    assert gain > 1.0, f"the shipped TDDL-GCN gains only {gain:.2f} dB on the sample quarter-dose slice"
    tissue = (reference > -100) & (reference < 200)  # brain and soft tissue of the head slice
    bias = float((denoised - reference)[tissue].mean())
    assert abs(bias) < 5.0, f"mean HU shift {bias:+.1f} HU in soft tissue"


def _check_adl_record(loaded, modality: str, spatial_dims: int) -> dict:
    assert loaded.metadata["network_class"] == "EfficientUNetDenoiser"
    assert loaded.modality == modality and loaded.spatial_dims == spatial_dims
    record = loaded.metadata["training"]
    assert record["hardware"] and record["data"]["images"]
    check_not_heldout(record["data"]["images"])
    # all three phases of the paper ran: denoiser warm-up, discriminator warm-up, adversarial; a file fine-tuned
    # from earlier shipped weights (e.g. the lesion-aware CT run) carries their records in "lineage"
    phases = record["steps_per_phase"]
    assert record["steps"] == sum(phases.values()) and record["phase"] == "adversarial"
    assert phases["d_warmup"] > 0 and phases["adversarial"] > 0
    for earlier in record.get("lineage") or []:
        check_not_heldout(earlier["data"]["images"])
    warmup = phases["g_warmup"] + sum(e["steps_per_phase"]["g_warmup"] for e in record.get("lineage") or [])
    assert warmup >= 1000
    assert record["validation"] and record["validation"][-1]["psnr"] > record["validation"][-1]["psnr_noisy"]
    return record


def test_shipped_adl_ct_weights_denoise_the_sample_quarter_dose_slice() -> None:
    loaded = load_denoiser(MODEL_DIR / "pretrained_adl_ct.pt", device="cpu")
    _check_adl_record(loaded, "CT", 2)
    noisy, reference = _sample_ct_pair()
    denoised = denoise_array(loaded, noisy, modality="CT", device="cpu")
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32
    gain = psnr(denoised, reference, SOFT_TISSUE) - psnr(noisy, reference, SOFT_TISSUE)
    assert gain > ADL_CT_SAMPLE_GAIN_DB, f"the shipped ADL CT weights gain only {gain:.2f} dB on the sample slice"
    tissue = (reference > -100) & (reference < 200)
    bias = float((denoised - reference)[tissue].mean())
    assert abs(bias) < 5.0, f"mean HU shift {bias:+.1f} HU in soft tissue"


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("model", ["adl", "tddl_gcn"])
def test_metal_above_the_ct_range_keeps_its_value_and_adds_no_halo_around_it(model: str) -> None:
    """A 3 x 3 pixel object at 8000 HU (metal on an extended-HU scale) in a real low-dose head slice, served as the
    app serves it (network + the file's restoration width): it came out at about 7500 HU with +960 HU (ADL) added
    to the tissue one pixel around it, the restoration spreading the excess above 3072 HU that the network never
    saw. Now the object keeps its value and its surroundings change no more than around a 3000 HU object."""
    loaded = load_denoiser(MODEL_DIR / f"pretrained_{model}_ct.pt", device="cpu")
    head = read_volume(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", modality="CT").array[54, 80:176, 96:192]
    head = head.astype(np.float32)  # 96 x 96 pixels of brain and skull
    assert head.max() < 3072  # only the planted object lies above the range
    ring = np.zeros(head.shape, bool)
    ring[43:48, 43:48] = True
    ring[44:47, 44:47] = False  # the pixels right around the object
    served = {}
    for value in (None, 3000.0, 8000.0):
        image = head.copy()
        if value is not None:
            image[44:47, 44:47] = value
        served[value] = denoise_as_served(loaded, image, "CT", device="cpu", amp=False)
    halo = {v: float((served[v] - served[None])[ring].mean()) for v in (3000.0, 8000.0)}
    assert abs(float(served[8000.0][45, 45]) - 8000.0) < 200.0, served[8000.0][44:47, 44:47]
    assert halo[8000.0] < halo[3000.0] + 50.0, f"halo around the 8000 HU object {halo}"


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("model", "orthogonal"), [("adl", True), ("adl", False), ("adl_3d", False)])
def test_mr_vessel_above_the_mr_range_keeps_its_value_and_adds_no_halo_around_it(model: str, orthogonal: bool) -> None:
    """A 3 x 3 x 3 voxel vessel at three times the top of MR's range (2 x the block's 99.5th percentile: a bright
    gadolinium-enhanced vessel) in a real Rician head block, through every MR path (the 2.5D file over the three
    orthogonal planes and slice by slice, the 3D file), then the restoration a reader may ask for (1 px): it was
    served at the ceiling (846 -> 282 on this block, all three paths) and the restoration spread the lost excess
    over the tissue around it (+55 to +57 on average one voxel out, against +2 to +3.5 around a vessel just under
    the ceiling). Now the vessel keeps its value and its surroundings change no more than around the dimmer one."""
    from lib.lesions.low_frequency_restoration import apply_restoration

    loaded = load_denoiser(MODEL_DIR / f"pretrained_{model}_mr.pt", device="cpu")
    study = read_volume(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz", modality="MR").array.astype(np.float32)
    head = study[74:106, 60:124, 56:120].copy()  # 32 x 64 x 64 voxels of brain
    ceiling = 2.0 * float(np.percentile(head, 99.5))  # intensity_scaling_for's top: offset 0 for a magnitude image
    assert head.max() < ceiling  # only the planted vessel lies above the range
    vessel = (slice(15, 18), slice(31, 34), slice(31, 34))
    ring = np.zeros(head.shape, bool)
    ring[14:19, 30:35, 30:35] = True
    ring[vessel] = False  # the voxels right around the vessel
    served = {}
    for value in (None, 0.95 * ceiling, 3.0 * ceiling):
        image = head.copy()
        if value is not None:
            image[vessel] = value
        denoised = denoise_array(loaded, image, "MR", device="cpu", amp=False, orthogonal_planes=orthogonal)
        served[value] = (denoised, apply_restoration(image, denoised, "MR", 1.0)[0])
    bright = 3.0 * ceiling
    halo = {v: float((served[v][1] - served[None][1])[ring].mean()) for v in (0.95 * ceiling, bright)}
    assert halo[bright] < halo[0.95 * ceiling] + 10.0, f"halo around the vessel {halo} (ceiling {ceiling:.0f})"
    assert abs(float(served[bright][0][16, 32, 32]) - bright) < 0.05 * bright, served[bright][0][vessel]
    assert abs(float(served[bright][1][16, 32, 32]) - bright) < 0.05 * bright, served[bright][1][vessel]


@pytest.mark.slow
def test_shipped_adl_mr_weights_denoise_the_sample_rician_slice() -> None:
    loaded = load_denoiser(MODEL_DIR / "pretrained_adl_mr.pt", device="cpu")
    _check_adl_record(loaded, "MR", 2)
    noisy = read_volume(SAMPLE_STUDIES / "mr_slice_pydicom_mr2_rician5.nii.gz", modality="MR").array
    reference = read_volume(SAMPLE_STUDIES / "mr_slice_pydicom_mr2.nii.gz", modality="MR").array
    window = (0.0, float(reference.max()))
    denoised = denoise_array(loaded, noisy, modality="MR", device="cpu")
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32
    gain = psnr(denoised, reference, window) - psnr(noisy, reference, window)
    assert gain > ADL_MR_SAMPLE_GAIN_DB, f"the shipped ADL MR weights gain only {gain:.2f} dB on the sample slice"


@pytest.mark.slow
def test_shipped_adl_mr_weights_gain_from_the_orthogonal_plane_average_on_the_sample_mr_volume() -> None:
    """The app's default for a 1 mm MR volume (lib.predict.uses_orthogonal_planes): the mean of the axial,
    coronal and sagittal passes beats the axial pass alone. Colin27 is a training subject (another noise
    realisation here); the held-out brain's figures are in bench/README.md."""
    loaded = load_denoiser(MODEL_DIR / "pretrained_adl_mr.pt", device="cpu")
    block = (slice(70, 110), slice(60, 156), slice(40, 136))  # 40 x 96 x 96 voxels through the brain
    study = read_volume(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz", modality="MR")
    noisy = study.array[block]
    whole_reference = read_volume(SAMPLE_STUDIES / "mr_head_colin27.nii.gz", modality="MR").array
    reference = whole_reference[block]
    window = (0.0, float(whole_reference.max()))
    assert uses_orthogonal_planes(loaded, "MR", noisy.shape, study.spacing)
    slices = denoise_array(loaded, noisy, modality="MR", device="cpu")
    planes = denoise_array(loaded, noisy, modality="MR", device="cpu", orthogonal_planes=True)
    gain = psnr(planes, reference, window) - psnr(slices, reference, window)
    assert gain > ADL_MR_ORTHOGONAL_GAIN_DB, f"the orthogonal-plane average gains only {gain:.2f} dB"


@pytest.mark.slow
def test_shipped_adl_3d_mr_weights_denoise_a_block_of_the_sample_mr_volume() -> None:
    """The 3D Efficient-UNet, whole through MONAI's 3D sliding window. Colin27 is one of its two training subjects
    (another noise realisation here), so this checks the file and the 3D path; the held-out brain is in
    bench/README.md."""
    loaded = load_denoiser(MODEL_DIR / "pretrained_adl_3d_mr.pt", device="cpu")
    _check_adl_record(loaded, "MR", 3)
    block = (slice(70, 102), slice(60, 156), slice(40, 136))  # 32 x 96 x 96 voxels through the brain
    noisy = read_volume(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz", modality="MR").array[block]
    whole_reference = read_volume(SAMPLE_STUDIES / "mr_head_colin27.nii.gz", modality="MR").array
    reference = whole_reference[block]
    window = (0.0, float(whole_reference.max()))  # the 5 % of the Rician noise refer to the volume's maximum
    denoised = denoise_array(loaded, noisy, modality="MR", device="cpu", roi_size=(32, 96, 96))
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32 and np.isfinite(denoised).all()
    gain = psnr(denoised, reference, window) - psnr(noisy, reference, window)
    assert gain > ADL_3D_MR_SAMPLE_GAIN_DB, f"the shipped ADL 3D MR weights gain only {gain:.2f} dB on the block"


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16 (AMX / AVX512-BF16): the "
                    "app runs float32 here, so there is no bfloat16 path to check")
@pytest.mark.slow
def test_shipped_adl_ct_weights_give_the_same_hu_in_bfloat16_as_in_float32() -> None:
    loaded = load_denoiser(MODEL_DIR / "pretrained_adl_ct.pt", device="cpu")
    noisy, reference = _sample_ct_pair()
    fast = denoise_array(loaded, noisy, modality="CT", device="cpu")  # bfloat16 autocast on this CPU
    exact = denoise_array(loaded, noisy, modality="CT", device="cpu", amp=False)
    difference = np.abs(fast - exact)
    body = reference > -900
    assert float(difference[body].mean()) < 0.5, f"mean |bf16 - fp32| {difference[body].mean():.2f} HU"
    assert float(np.percentile(difference[body], 99.9)) < 5.0
    assert psnr(fast, reference, SOFT_TISSUE) == pytest.approx(psnr(exact, reference, SOFT_TISSUE), abs=0.05)


def test_shipped_ct_noise_model_makes_ct_like_noise() -> None:
    model = NoiseModel.load(MODEL_DIR / "pretrained_noise_model_ct.pt")
    check_not_heldout(model.info["inputs"])
    _, reference = _sample_ct_pair()
    field = model.synthesise_noise_field(reference, np.random.SeedSequence(7), pixel_size_mm=(0.488, 0.488))
    assert field.shape == reference.shape and np.isfinite(field).all()
    tissue = (reference > -100) & (reference < 200)
    # learnt from simulated quarter-dose thorax slices: tens of HU, zero mean
    assert 15.0 < float(field[tissue].std()) < 80.0
    assert abs(float(field[tissue].mean())) < 3.0
    again = model.synthesise_noise_field(reference, np.random.SeedSequence(7), pixel_size_mm=(0.488, 0.488))
    assert np.array_equal(field, again)


def test_shipped_files_name_no_folders_of_the_machine_they_were_trained_on() -> None:
    """A shipped file goes to every site: its record names its inputs and checkpoints by file name only (what
    ``lib.weights.portable_record`` writes), never a folder of the machine it was trained on."""
    import re

    import torch

    from lib.weights.format import map_record_strings

    absolute = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")
    files = sorted(MODEL_DIR.glob("*.pt"))
    assert len(files) >= 5
    for path in files:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        found: list[str] = []
        for key, value in payload.items():
            if key != "state_dict":
                map_record_strings(value, lambda text: found.append(text) if absolute.match(text) else text,
                                   keys=True)
        assert not found, f"{path.name} names folders: {found[:3]}"


def test_shipped_files_name_the_restoration_width_chosen_for_them():
    """Each shipped denoiser file carries the low-frequency restoration width it is served with by default, the one
    the lesion benchmark chose for that network (bench/README.md): the TDDL-GCN CT file's differs from ADL's."""
    from lib.weights.format import RESTORATION_KEY, restoration_of_file

    widths = {path.name: restoration_of_file(path) for path in sorted(MODEL_DIR.glob("pretrained_*.pt"))
              if "noise_model" not in path.name}
    assert widths == {"pretrained_adl_3d_mr.pt": 0.0, "pretrained_adl_ct.pt": 0.8, "pretrained_adl_mr.pt": 0.0,
                      "pretrained_tddl_gcn_ct.pt": 0.6}
    gcn = load_denoiser(MODEL_DIR / "pretrained_tddl_gcn_ct.pt").metadata[RESTORATION_KEY]
    assert "bench/README.md" in gcn["chosen"]


def test_model_card_script_prints_the_shipped_denoisers_and_refuses_other_files_in_one_line():
    """``scripts/write_model_card.py FILE`` (model/README.md) prints a card per shipped denoiser; a file that is not
    one (the noise model) or ``--help`` gave a traceback."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    model = REPO_ROOT / "apps" / "adl_denoise" / "model"
    script = str(REPO_ROOT / "scripts" / "write_model_card.py")
    done = subprocess.run([sys.executable, script, str(model / "pretrained_adl_ct.pt")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("### `pretrained_adl_ct.pt`"), done.stderr
    done = subprocess.run([sys.executable, script, str(model / "pretrained_noise_model_ct.pt")], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "not a denoiser weight file" in done.stderr
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage:")
