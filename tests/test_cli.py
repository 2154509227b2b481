"""The command line as a user runs it: real processes, real DICOM and NIfTI files."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import processes
from conftest import APP_DIR

CLI = APP_DIR / "cli.py"


def run_cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return processes.run([sys.executable, CLI, *args], timeout, env=dict(os.environ, OMP_NUM_THREADS="2"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ct_slice_dicom() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"


@pytest.fixture(scope="module")
def ct_crop_nifti(tmp_path_factory, ct_slice_dicom) -> Path:
    """A 192x192 crop of the real head CT slice (brain and skull), as NIfTI, to keep runs short."""
    image = sitk.ReadImage(str(ct_slice_dicom))
    image = image[160:352, 160:352, 0] if image.GetDimension() == 3 else image[160:352, 160:352]
    path = tmp_path_factory.mktemp("ct") / "head_crop.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(path))
    return path


def test_help_for_every_verb():
    top = run_cli("--help")
    assert top.returncode == 0 and "simulate" in top.stdout and "denoise" in top.stdout
    for verb, option in (("simulate", "--dose"), ("denoise", "--model")):
        result = run_cli(verb, "--help")
        assert result.returncode == 0, result.stderr
        assert option in result.stdout and "--input" in result.stdout and "--overwrite" in result.stdout


@pytest.mark.slow
def test_simulate_low_dose_from_real_dicom_keeps_geometry_and_hu(tmp_path, ct_slice_dicom):
    out = tmp_path / "ld.nii.gz"
    result = run_cli("simulate", "--input", ct_slice_dicom, "--output", out, "--dose", "0.25",
                     "--target-noise-hu", "30", "--seed", "3")
    assert result.returncode == 0, result.stderr
    original = sitk.ReadImage(str(ct_slice_dicom))
    simulated = sitk.ReadImage(str(out))
    assert simulated.GetPixelID() == sitk.sitkInt16  # integer CT in, HU int16 out
    np.testing.assert_allclose(simulated.GetSpacing()[:2], original.GetSpacing()[:2], rtol=1e-6)
    np.testing.assert_allclose(simulated.GetOrigin(), original.GetOrigin(), atol=1e-4)
    a = sitk.GetArrayFromImage(original).astype(np.float32).squeeze()
    b = sitk.GetArrayFromImage(simulated).astype(np.float32).squeeze()
    tissue = (a > 0) & (a < 80)  # brain parenchyma
    added = (b - a)[tissue]
    assert abs(float(added.mean())) < 3.0, "low-dose simulation must not shift mean HU in tissue"
    assert 20.0 < float(added.std()) < 45.0, "added noise should be near the 30 HU asked for"


@pytest.mark.slow
def test_simulate_writes_derived_dicom_series(tmp_path, ct_slice_dicom):
    import pydicom

    out_dir = tmp_path / "ld_series"
    result = run_cli("simulate", "--input", ct_slice_dicom, "--output", out_dir, "--dose", "0.5")
    assert result.returncode == 0, result.stderr
    files = sorted(out_dir.iterdir())
    assert len(files) == 1
    derived, source = pydicom.dcmread(files[0]), pydicom.dcmread(ct_slice_dicom)
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert derived.SOPInstanceUID != source.SOPInstanceUID
    assert derived.StudyInstanceUID == source.StudyInstanceUID and derived.PatientID == source.PatientID
    assert "DERIVED" in derived.ImageType
    assert "50% dose" in derived.SeriesDescription
    # a simulated series never reads as a denoised one
    assert derived.ImageType[-1] == "SIMULATED" and derived.DerivationDescription == (
        f"Noise simulation: simulated 50% dose from series {source.SeriesInstanceUID}")


@pytest.mark.slow
def test_denoised_dicom_series_names_the_model_weights_and_restoration(tmp_path, ct_slice_dicom):
    import pydicom

    from lib.lesions.low_frequency_restoration import default_sigma_px
    from lib.weights.format import restoration_of_file

    weights = APP_DIR / "model" / "pretrained_adl_ct.pt"
    result = run_cli("denoise", "--input", ct_slice_dicom, "--output", tmp_path / "denoised", "--model", "adl",
                     "--modality", "ct", "--weights", weights)
    assert result.returncode == 0, result.stderr
    derived = pydicom.dcmread(next((tmp_path / "denoised").iterdir()))
    source = pydicom.dcmread(ct_slice_dicom)
    assert derived.ImageType[-1] == "DENOISED" and derived.SeriesDescription.endswith(" [denoised adl]")
    text = derived.DerivationDescription
    assert text.startswith("Denoised with adl (weights ") and text.endswith(f" from series {source.SeriesInstanceUID}")
    assert f"sha256 {sha256(weights)[:16]}" in text
    width = default_sigma_px("CT", restoration_of_file(weights))  # the file's own width
    assert f"low-frequency restoration {width:g} px" in text


@pytest.mark.parametrize("model", ["adl", "tddl_gcn"])
def test_denoising_ct_with_a_2d_network_does_not_import_monai(tmp_path, ct_crop_nifti, model):
    """Importing any part of MONAI imports all of it, seconds per command on a small CPU (bench/cli_speed.py); a 2D
    network on slices of up to 512 pixels needs none of it, so ``cli.py denoise`` must not load it."""
    result = processes.run([sys.executable, "-X", "importtime", CLI, "denoise", "--input", ct_crop_nifti, "--output",
                            tmp_path / "out.nii.gz", "--model", model, "--modality", "ct"], 600,
                           env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"torch", "lib.predict", "lib.networks.efficient_unet"} <= imported  # the denoising path was seen
    assert sorted(m for m in imported if m.split(".")[0] == "monai") == []


@pytest.mark.slow
def test_rician_simulation_and_denoise_improve_psnr(tmp_path, ct_crop_nifti):
    noisy = tmp_path / "noisy.nii.gz"
    result = run_cli("simulate", "--input", ct_crop_nifti, "--output", noisy, "--noise", "gaussian", "--sigma", "40")
    assert result.returncode == 0, result.stderr
    denoised = tmp_path / "denoised.nii.gz"
    result = run_cli("denoise", "--model", "nlm", "--input", noisy, "--output", denoised, "--modality", "ct")
    assert result.returncode == 0, result.stderr
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_crop_nifti))).astype(np.float32)
    window = lambda x: np.clip(x, -160, 240)  # noqa: E731

    def psnr(path: Path) -> float:
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
        return 10 * np.log10(400.0**2 / np.mean((window(x) - window(ref)) ** 2))

    assert psnr(denoised) > psnr(noisy) + 3.0


def _text_file(folder: Path) -> Path:
    path = folder / "upload.dcm"
    path.write_text("this is not an image\n")
    return path


def _text_named_nifti(folder: Path) -> Path:
    path = folder / "scan.nii.gz"
    path.write_text("this is not an image\n")
    return path


def _empty_folder(folder: Path) -> Path:
    path = folder / "folder"
    path.mkdir()
    return path


def _nan_volume(folder: Path) -> Path:
    array = np.zeros((8, 16, 16), np.float32)
    array[2, 3, 4] = np.nan
    path = folder / "values.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _absurd_value_volume(folder: Path) -> Path:
    """A real CT crop with one voxel of 1e30 HU (a corrupt file): denoised, the restoration spread it around."""
    array = np.full((8, 16, 16), 40.0, np.float32)
    array[:, :4] = -1000.0
    array[2, 8, 8] = 1e30
    path = folder / "values.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _four_d_volume(folder: Path) -> Path:
    path = folder / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.ones((4, 8, 8), np.float32))] * 3), str(path))
    return path


def _vector_volume(folder: Path) -> Path:
    """A valid NIfTI of 3-vectors (NIfTI's 5th axis): intact, but not one scalar volume."""
    import nibabel

    path = folder / "field.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((32, 32, 8, 1, 3), np.float32), np.eye(4)), str(path))
    return path


def _float64_beyond_float32(folder: Path) -> Path:
    array = np.full((4, 16, 16), 50.0)
    array[1, 2, 3] = 1e300
    path = folder / "values64.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


# name: (input made in a folder, words of the reason); the inputs' names share no words with the reasons
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "non-image": (_text_file, "dicom"),
    "non-image named .nii.gz": (_text_named_nifti, "not a nifti, nrrd or metaimage image"),
    "empty folder": (_empty_folder, "empty folder"),
    "NaN": (_nan_volume, "nan"),
    "absurd value": (_absurd_value_volume, "far outside what a ct in hounsfield units can hold"),
    "4D": (_four_d_volume, "4d"),
    "missing": (lambda folder: folder / "absent.nii.gz", "no such file"),
    "vectors (5D NIfTI)": (_vector_volume, "only scalar 2d or 3d images"),
    "float64 beyond float32": (_float64_beyond_float32, "beyond what float32 holds"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_reason(tmp_path, case):
    make, word = BAD_INPUTS[case]
    path = make(tmp_path)
    result = run_cli("denoise", "--input", path, "--output", tmp_path / "out.nii.gz", "--model", "gaussian")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert word in lines[0].replace(str(tmp_path), "").lower(), lines[0]  # in the reason, not in a path
    assert ".cxx" not in lines[0], lines[0]  # no library internals (SimpleITK's source file names)
    assert not (tmp_path / "out.nii.gz").exists()


def test_never_overwrites_existing_output_or_input(tmp_path, ct_crop_nifti):
    existing = tmp_path / "existing.nii.gz"
    existing.write_bytes(ct_crop_nifti.read_bytes())
    before = sha256(existing)
    result = run_cli("denoise", "--input", ct_crop_nifti, "--output", existing, "--model", "gaussian")
    assert result.returncode == 2 and "exists" in result.stderr
    assert sha256(existing) == before
    copy = tmp_path / "input.nii.gz"
    copy.write_bytes(ct_crop_nifti.read_bytes())
    result = run_cli("denoise", "--input", copy, "--output", copy, "--model", "gaussian", "--overwrite")
    assert result.returncode == 2 and "input" in result.stderr
    assert sha256(copy) == before


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, ct_crop_nifti):
    """Reading and denoising a series can take hours: an output whose extension no writer takes, a folder (a
    derived DICOM series) for a NIfTI input, or a parent that is a file is refused first, in one line."""
    (tmp_path / "a_file").write_text("x")
    cases = {tmp_path / "typo.nii.gz.png": "unsupported extension '.png'",
             tmp_path / "series_folder": "is not dicom",
             tmp_path / "a_file" / "out.nii.gz": "is a file, not a folder"}
    for output, words in cases.items():
        for verb, extra in (("denoise", ("--model", "bm3d")), ("simulate", ("--dose", "0.25"))):
            result = run_cli(verb, "--input", ct_crop_nifti, "--output", output, *extra, timeout=120)
            assert result.returncode == 2, (verb, output, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and words in lines[0].lower(), (verb, lines)
            assert "modality:" not in result.stdout  # refused before the input was read
            assert not output.exists()


def test_simulate_takes_a_one_slice_volume_and_names_a_bad_seed(tmp_path, ct_crop_nifti):
    """A 3D file of one slice (what a single-slice series becomes) is simulated slice by slice like any volume."""
    image = sitk.ReadImage(str(ct_crop_nifti))
    one_slice = sitk.JoinSeries([image])  # (1, 192, 192)
    sitk.WriteImage(one_slice, str(tmp_path / "one.nii.gz"))
    result = run_cli("simulate", "--input", tmp_path / "one.nii.gz", "--output", tmp_path / "ld.nii.gz",
                     "--dose", "0.25", "--modality", "ct")
    assert result.returncode == 0, result.stderr
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ld.nii.gz"))).shape == (1, 192, 192)
    result = run_cli("simulate", "--input", tmp_path / "one.nii.gz", "--output", tmp_path / "x.nii.gz", "--seed", "-1")
    assert result.returncode == 2 and "--seed: must be an integer >= 0, got -1" in result.stderr, result.stderr


def test_modality_argument_contradicting_the_dicom_tag_is_refused(tmp_path, ct_slice_dicom, ct_crop_nifti):
    """A CT forced through as MR would be denoised as MR and written as an MR object of a CT (or the reverse):
    the Modality tag decides for DICOM input. --series-uid on a file that is no DICOM folder is refused too."""
    from pydicom.data import get_testdata_file

    for source, wrong, tag in ((ct_slice_dicom, "mr", "CT"), (Path(get_testdata_file("MR_small.dcm")), "ct", "MR")):
        result = run_cli("denoise", "--input", source, "--output", tmp_path / f"{wrong}.nii.gz", "--model", "gaussian",
                         "--modality", wrong)
        assert result.returncode == 2 and f"is a DICOM {tag} (its Modality tag)" in result.stderr, result.stderr
        assert not (tmp_path / f"{wrong}.nii.gz").exists()
    nifti = run_cli("denoise", "--input", ct_crop_nifti, "--output", tmp_path / "n.nii.gz", "--model", "gaussian",
                    "--series-uid", "1.2.3")
    assert nifti.returncode == 2 and "--series-uid picks a series of a DICOM folder" in nifti.stderr, nifti.stderr
    agreeing = run_cli("denoise", "--input", ct_slice_dicom, "--output", tmp_path / "ok.nii.gz", "--model",
                       "gaussian", "--modality", "ct")
    assert agreeing.returncode == 0, agreeing.stderr


def test_batch_output_that_is_a_file_or_a_tree_without_series_is_refused(tmp_path):
    (tmp_path / "tree" / "notes").mkdir(parents=True)
    (tmp_path / "tree" / "notes" / "readme.txt").write_text("no images here")
    (tmp_path / "taken.nii.gz").write_text("x")
    result = run_cli("denoise-batch", "--input", tmp_path / "tree", "--output", tmp_path / "taken.nii.gz",
                     "--model", "gaussian")
    assert result.returncode == 2 and "is a file: give a folder" in result.stderr, result.stderr
    result = run_cli("denoise-batch", "--input", tmp_path / "tree", "--output", tmp_path / "out", "--model",
                     "gaussian", "--no-progress")
    assert result.returncode == 2 and "error: no series found" in result.stderr, result.stdout + result.stderr
    # a filter that matches nothing today is a query, not a mistake
    result = run_cli("denoise-batch", "--input", tmp_path / "tree", "--output", tmp_path / "out2", "--model",
                     "gaussian", "--modality", "CT", "--no-progress")
    assert result.returncode == 0 and "no series" in result.stderr, result.stdout + result.stderr


def test_a_guessed_modality_is_said_with_the_option_that_overrides_it(tmp_path, ct_slice_dicom, ct_crop_nifti):
    """A NIfTI carries no modality: the values decide (air near -1000 HU: CT). A CT stored without its rescale
    (air near 0) or cropped inside the body (no air) looks like MR: the user must see the guess and how to override
    it, not only a model name."""
    image = sitk.Cast(sitk.ReadImage(str(ct_slice_dicom)), sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "hu.nii.gz"))
    raw = sitk.GetImageFromArray(np.clip(sitk.GetArrayFromImage(image).astype(np.int32) + 1024, 0, 4095)
                                 .astype(np.uint16))
    raw.CopyInformation(image)
    sitk.WriteImage(raw, str(tmp_path / "raw.nii.gz"))
    for name, source, guess, other in (("a", tmp_path / "hu.nii.gz", "CT", "mr"),
                                       ("b", tmp_path / "raw.nii.gz", "MR", "ct"),
                                       ("c", ct_crop_nifti, "MR", "ct")):
        result = run_cli("denoise", "--input", source, "--output", tmp_path / f"{name}.nii.gz", "--model", "gaussian")
        assert result.returncode == 0, result.stderr
        assert f"modality: {guess} (guessed from the values" in result.stdout, result.stdout
        assert f"add --modality {other} if it is {other.upper()}" in result.stdout, result.stdout
    result = run_cli("denoise", "--input", tmp_path / "raw.nii.gz", "--output", tmp_path / "d.nii.gz",
                     "--model", "gaussian", "--modality", "ct")
    assert result.returncode == 0 and "modality:" not in result.stdout, result.stdout


@pytest.mark.slow
def test_auto_model_falls_back_to_bm3d_without_weights_and_says_so(tmp_path, ct_crop_nifti, monkeypatch):
    monkeypatch.setenv("ADL_MODEL_DIR", str(tmp_path / "no_weights_here"))
    out = tmp_path / "auto.nii.gz"
    result = run_cli("denoise", "--input", ct_crop_nifti, "--output", out, "--modality", "ct")
    assert result.returncode == 0, result.stderr
    assert "model: bm3d (no ADL weights installed for CT)" in result.stdout
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(ct_crop_nifti)).GetSize()


TINY_ADL = ("--patch-size", "32", "--batch-size", "2", "--steps-g-warmup", "2", "--steps-d-warmup", "1",
            "--steps-adversarial", "1", "--filters", "8,8,8,8", "--disc-filters", "8,8,8,8", "--enhancer-filters",
            "8", "--device", "cpu", "--bn-recalibration-batches", "1", "--samples-per-epoch", "8")


@pytest.mark.slow
def test_training_refuses_what_would_overwrite_a_run_or_pair_other_anatomy(tmp_path, ct_slice_dicom, ct_crop_nifti,
                                                                          capsys):
    """A rerun without --resume would replace an interrupted run's checkpoint; --resume must not replace an existing
    output; a cut checkpoint, a folder as output, a DICOM CT trained as MR and pairs on two grids are refused in
    one line; DICOM files named by UID (dots in the name) are found."""
    from conftest import import_cli

    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "head.nii.gz").write_bytes(ct_crop_nifti.read_bytes())
    # the run whose files are to be kept, as a user starts it (its noise: Gaussian, not seconds of low-dose CT
    # simulation; what it trained on is not checked here)
    first = run_cli("train", "--model", "adl", "--modality", "ct", "--clean", clean, "--output", tmp_path / "a.pt",
                    "--noise", "gaussian", *TINY_ADL)
    assert first.returncode == 0, first.stderr
    checkpoints = tmp_path / "a_checkpoints"
    assert (checkpoints / "last.pt").is_file()
    kept = (checkpoints / "last.pt").read_bytes()
    cli = import_cli()

    def refused(*args: str | Path) -> tuple[int, str, str]:
        """``cli.py train *args`` in this process (each refusal in a process of its own cost seconds of imports):
        (exit status, stdout, stderr)."""
        capsys.readouterr()
        code = cli.main(["train", *map(str, args), *TINY_ADL])
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = refused("--model", "adl", "--modality", "ct", "--clean", clean, "--output", tmp_path / "b.pt",
                           "--checkpoint-dir", checkpoints)
    assert code == 2 and "holds the checkpoint of an earlier run" in err, err
    assert (checkpoints / "last.pt").read_bytes() == kept
    precious = tmp_path / "precious.pt"
    precious.write_bytes((tmp_path / "a.pt").read_bytes())
    code, _, err = refused("--model", "adl", "--modality", "ct", "--clean", clean, "--output", precious,
                           "--resume", checkpoints)
    assert code == 2 and "already exists" in err, err
    assert precious.read_bytes() == (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "last.pt").write_bytes(kept[: len(kept) // 3])
    code, out, err = refused("--model", "adl", "--modality", "ct", "--clean", clean, "--output", tmp_path / "c.pt",
                             "--resume", tmp_path / "cut")
    assert code == 2 and "cannot be read as a checkpoint" in err, err
    assert "training ADL" not in out, out  # said before the training data are built, not after
    (tmp_path / "folder.pt").mkdir()
    code, _, err = refused("--model", "adl", "--modality", "ct", "--clean", clean, "--output", tmp_path / "folder.pt",
                           "--overwrite")
    assert code == 2 and "is a folder" in err, err
    # a CT series named by UID: found (dots in the name), and refused as MR by its Modality tag
    series = tmp_path / "series"
    series.mkdir()
    (series / "CT.1.2.840.99.7").write_bytes(ct_slice_dicom.read_bytes())
    code, _, err = refused("--model", "adl", "--modality", "mr", "--clean", series, "--output", tmp_path / "m.pt")
    assert code == 2 and "is a DICOM CT (its Modality tag)" in err, err
    # pairs: the noisy image mirrored (its array reversed, its direction flipped: the same anatomy in another order)
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    image = sitk.ReadImage(str(ct_crop_nifti))
    flipped = sitk.Flip(image, [False, True])
    sitk.WriteImage(flipped, str(noisy / "head.nii.gz"))
    code, _, err = refused("--model", "adl", "--modality", "ct", "--noisy-dir", noisy, "--clean-dir", clean,
                           "--output", tmp_path / "p.pt")
    assert code == 2 and "pair 'head'" in err and "save both on one grid" in err, err
    assert sorted(p.name for p in tmp_path.glob("*.pt") if p.is_file()) == ["a.pt", "precious.pt"]  # none written


def test_top_level_help_lists_every_verb():
    """``cli.py --help`` opens with a line per verb: every verb the parser has (train-lesion-detector and
    share-weights were missing from it)."""
    import argparse

    from conftest import import_cli

    cli = import_cli()

    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    listed = cli.__doc__.split("Verbs:", 1)[1].split("\n\n", 1)[0]
    named = {line.split()[0] for line in listed.splitlines() if line.startswith("  ") and not line.startswith("   ")}
    assert named == set(verbs)
