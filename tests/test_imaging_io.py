"""Image I/O (lib.imaging.io): formats, geometry, value conventions, refusals, derived DICOM output.

Real files only: pydicom's and pydicom-data's DICOM files, series built from them on disk, SimpleITK/nibabel
images written to tmp_path, and ../shared/data when present (those tests skip without it).
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from lib.imaging import (
    CT_AIR_HU,
    ImageReadError,
    ImageWriteError,
    Volume,
    denoising_derivation,
    guess_modality,
    list_dicom_series,
    read_volume,
    value_range_for_output,
    write_dicom_derived_series,
    write_volume,
)
from lib.imaging.errors import ImageTooLargeError

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
SLAB = "dicom/ct_abdomen_siemens_j2k_slab"
TILTED = "dicom/ct_head_ge_tilted"


def _pydicom_data(name: str) -> Path:
    data_store = pytest.importorskip("data_store")
    path = Path(os.path.dirname(data_store.__file__)) / "data" / name
    if not path.is_file():
        pytest.skip(f"pydicom-data file {name} not installed")
    return path


def _rotation(angle_x: float, angle_y: float, angle_z: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([angle_x, angle_y, angle_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# An oblique, non-RAS direction (rotation times axis flips, determinant -1) and non-trivial spacing/origin.
OBLIQUE = _rotation(-17.0, 9.0, 23.0) @ np.diag([-1.0, 1.0, 1.0])
SPACING = (0.7031, 0.8125, 2.5)
ORIGIN = (-120.123456789, 35.5, -812.25)


def _ct_like(shape=(6, 24, 20), seed=0) -> np.ndarray:
    """int16 HU: air around a water-ish ellipse with noise and a bone dot."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    body = ((y - shape[1] / 2) / (0.4 * shape[1])) ** 2 + ((x - shape[2] / 2) / (0.4 * shape[2])) ** 2 < 1
    img = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, shape)
    img[:, shape[1] // 2, shape[2] // 2] = 1200
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


def _sitk_file(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=OBLIQUE) -> Path:
    image = sitk.GetImageFromArray(array)
    nd = array.ndim
    image.SetSpacing(spacing[:nd])
    image.SetOrigin(origin[:nd])
    image.SetDirection(np.asarray(direction)[:nd, :nd].ravel().tolist())
    sitk.WriteImage(image, str(path))
    return path


def _make_series(
    folder: Path,
    n: int = 5,
    *,
    gaps: list[float] | None = None,
    iop: np.ndarray | None = None,
    shear_per_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    tilt_tag: float | None = None,
    series_uid: str | None = None,
    description: str = "synthetic",
    series_number: int = 7,
) -> dict:
    """A CT series on disk built from pydicom's CT_small slice: slice k = CT_small + 10*k (so order is
    checkable), positions along the normal (plus an optional shear), file names in reverse slice order."""
    base = pydicom.dcmread(CT_SMALL)
    folder.mkdir(parents=True, exist_ok=True)
    stored = base.pixel_array.astype(np.int16)
    iop = np.asarray(iop if iop is not None else [1, 0, 0, 0, 1, 0], dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    origin = np.asarray(base.ImagePositionPatient, dtype=float)
    offsets = np.concatenate([[0.0], np.cumsum(gaps if gaps is not None else [2.5] * (n - 1))])
    uid = series_uid or generate_uid()
    paths = []
    for k, s in enumerate(offsets):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = uid
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + s * normal + s * np.asarray(shear_per_mm)]
        if tilt_tag is not None:
            ds.GantryDetectorTilt = tilt_tag
        ds.PixelData = (stored + 10 * k).astype("<i2").tobytes()
        path = folder / f"slice_{n - k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return {"uid": uid, "paths": paths, "stored": stored, "normal": normal, "origin": origin}


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_geometry(volume: Volume, image: sitk.Image, atol: float) -> None:
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=atol, rtol=0)
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=atol, rtol=0)
    np.testing.assert_allclose(volume.direction, image.GetDirection(), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# SimpleITK formats
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_round_trip_oblique_geometry_exact(tmp_path, ext):
    src = _sitk_file(tmp_path / f"in{ext}", _ct_like())
    on_disk = sitk.ReadImage(str(src))
    vol = read_volume(src)
    assert vol.array.shape == (6, 24, 20) and vol.array.dtype == np.float32
    assert vol.modality == "CT" and vol.source_dtype == np.int16  # guessed from the air at -1000
    assert vol.metadata["modality_source"] == "guessed"
    # what we read is what the file says, bit for bit
    assert vol.spacing == on_disk.GetSpacing() and vol.origin == on_disk.GetOrigin()
    assert vol.direction == on_disk.GetDirection()
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(on_disk))

    out = write_volume(vol, tmp_path / f"out{ext}")
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(on_disk))
    # MetaImage: bit-exact; NRRD stores direction x spacing, so exact to the last bit or two; NIfTI stores the
    # geometry in float32 (direction as a float32 quaternion): ~1e-7 on a re-write, ~1e-6 mm vs the design.
    if ext in (".mha", ".mhd"):
        assert back.GetSpacing() == vol.spacing and back.GetOrigin() == vol.origin
        assert back.GetDirection() == vol.direction
    else:
        _assert_geometry(vol, back, atol=1e-6 if ext == ".nii.gz" else 1e-12)
    design_tol = 1e-5 if ext == ".nii.gz" else 1e-12
    np.testing.assert_allclose(back.GetDirection(), OBLIQUE.ravel(), atol=design_tol)
    np.testing.assert_allclose(back.GetOrigin(), ORIGIN, atol=design_tol)
    np.testing.assert_allclose(back.GetSpacing(), SPACING, atol=design_tol)
    assert np.linalg.det(np.reshape(back.GetDirection(), (3, 3))) == pytest.approx(-1.0)


def test_a_sheared_grid_round_trips_in_nrrd_and_is_never_written_as_nifti(tmp_path):
    """A gantry tilt kept in an NRRD (axes not perpendicular): NIfTI holds perpendicular axes only, and SimpleITK
    wrote it with other ones (a voxel of the 4th slice 2.7 mm off); refused for NIfTI, exact in NRRD / MetaImage."""
    image = sitk.GetImageFromArray(_ct_like())
    image.SetSpacing((0.9, 0.9, 1.5))
    image.SetDirection((1, 0, 0, 0, 1, 0.3162278, 0, 0, 0.9486833))  # the slice axis tilted by 18.4 degrees
    sitk.WriteImage(image, str(tmp_path / "tilted.nrrd"))
    vol = read_volume(tmp_path / "tilted.nrrd")
    for ext in (".nii.gz", ".nii"):
        with pytest.raises(ImageWriteError, match="not perpendicular"):
            write_volume(vol, tmp_path / f"out{ext}")
        assert not (tmp_path / f"out{ext}").exists()
    for ext in (".nrrd", ".mha"):
        back = sitk.ReadImage(str(write_volume(vol, tmp_path / f"out{ext}")))
        np.testing.assert_allclose(back.TransformIndexToPhysicalPoint((3, 5, 4)),
                                   image.TransformIndexToPhysicalPoint((3, 5, 4)), atol=1e-6)


@pytest.mark.parametrize("codes", [(1, 4), (2, 1), (0, 2), (1, 0)])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", "uncompressed .nii.gz"])
def test_a_nifti_output_keeps_the_qform_and_sform_of_its_input(tmp_path, codes, ext):
    """ITK reads one transform of a NIfTI file and wrote it as both, with code 1: an input whose sform (a
    registration to a template, code 4) differs from its qform came back with the qform's matrix as sform, and other
    codes, and viewers that use the sform (nibabel, FSLeyes, nilearn) placed the denoised output 7 mm from its
    input. The output keeps the input's transforms, codes, voxel sizes and units; its values are the new ones. So
    does a NIfTI stored uncompressed under a ``.nii.gz`` name (ITK reads it; nibabel, by its name, did not, and its
    sform was lost unsaid)."""
    import gzip

    import nibabel

    uncompressed = ext.startswith("uncompressed")
    ext = ext.split()[-1]

    qcode, scode = codes
    rng = np.random.default_rng(5)
    data = rng.integers(0, 900, size=(20, 24, 6)).astype(np.int16)
    angle = np.radians(10.0)  # an oblique, left-right flipped grid of 0.9 x 0.8 x 1.4 mm voxels
    rotation = np.diag([-1.0, 1.0, 1.0]) @ np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                                                     [0, np.sin(angle), np.cos(angle)]])
    qform = np.eye(4)
    qform[:3, :3], qform[:3, 3] = rotation @ np.diag([0.9, 0.8, 1.4]), [90.0, -125.0, -71.0]
    sform = qform.copy()
    sform[:3, 3] += [3.0, -2.0, 5.0]  # e.g. after a registration: another place than the scanner's
    source = nibabel.Nifti1Image(data, None)
    source.header.set_qform(qform, qcode)
    source.header.set_sform(sform, scode)
    source.header.set_xyzt_units("mm", "sec")
    nibabel.save(source, tmp_path / f"in{ext}")
    read_in = nibabel.load(tmp_path / f"in{ext}")
    if uncompressed:
        (tmp_path / f"in{ext}").write_bytes(gzip.decompress((tmp_path / f"in{ext}").read_bytes()))

    volume = read_volume(tmp_path / f"in{ext}", modality="MR")
    denoised = volume.with_array(volume.array * 0.5 + 10)
    written = nibabel.load(write_volume(denoised, tmp_path / f"out{ext}"))
    for coded in (lambda h: h.get_qform(coded=True), lambda h: h.get_sform(coded=True)):
        (matrix_in, code_in), (matrix_out, code_out) = coded(read_in.header), coded(written.header)
        assert int(code_out) == int(code_in)
        if code_in:
            np.testing.assert_allclose(matrix_out, matrix_in, atol=1e-5)
    np.testing.assert_allclose(written.affine, read_in.affine, atol=1e-5)  # where nibabel-based viewers place it
    np.testing.assert_allclose(written.header.get_zooms(), read_in.header.get_zooms(), atol=1e-6)
    assert written.header.get_xyzt_units() == read_in.header.get_xyzt_units()
    np.testing.assert_allclose(np.asarray(written.dataobj), data * 0.5 + 10, atol=0.51)  # int16, rounded
    back, front = sitk.ReadImage(str(tmp_path / f"out{ext}")), sitk.ReadImage(str(tmp_path / f"in{ext}"))
    for index in ((0, 0, 0), (19, 23, 5)):  # and where ITK (3D Slicer) places it: as the input
        np.testing.assert_allclose(back.TransformIndexToPhysicalPoint(index),
                                   front.TransformIndexToPhysicalPoint(index), atol=1e-4)
    # a volume on another grid (here: moved) is written with its own geometry, never with the input's header
    moved = Volume(array=denoised.array, spacing=denoised.spacing, origin=tuple(np.add(denoised.origin, 10.0)),
                   direction=denoised.direction, modality="MR", source_dtype=denoised.source_dtype,
                   metadata=dict(denoised.metadata))
    elsewhere = sitk.ReadImage(str(write_volume(moved, tmp_path / f"moved{ext}")))
    np.testing.assert_allclose(elsewhere.GetOrigin(), moved.origin, atol=1e-4)


def test_round_trip_2d_and_volume_api(tmp_path):
    src = _sitk_file(tmp_path / "slice.mha", _ct_like()[2], direction=np.diag([-1.0, 1.0, 1.0]))
    vol = read_volume(src)
    assert vol.ndim == 2 and not vol.is_3d and vol.shape == (24, 20)
    assert vol.direction == (-1.0, 0.0, 0.0, 1.0) and vol.spacing == SPACING[:2]
    image = vol.to_sitk()
    assert image.GetPixelID() == sitk.sitkFloat32 and image.GetDirection() == vol.direction
    again = Volume.from_sitk(image, modality="CT", source_dtype=np.int16)
    np.testing.assert_array_equal(again.array, vol.array)
    with pytest.raises(ValueError, match="shape"):
        vol.with_array(np.zeros((3, 3)))
    smoothed = vol.with_array(vol.array.astype(np.float64) + 0.4)  # float64 in -> float32 stored
    assert smoothed.array.dtype == np.float32 and smoothed.spacing == vol.spacing
    assert smoothed.metadata == vol.metadata and smoothed.metadata is not vol.metadata
    out = write_volume(smoothed, tmp_path / "slice_out.nii.gz")
    back = sitk.ReadImage(str(out))
    assert back.GetDimension() == 2 and back.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), np.rint(vol.array + 0.4).astype(np.int16))


def test_constant_image_reads_and_is_flagged(tmp_path):
    src = _sitk_file(tmp_path / "blank.nrrd", np.zeros((3, 8, 8), np.float32))
    vol = read_volume(src, modality="MR")
    assert vol.is_constant and vol.modality == "MR" and vol.metadata["modality_source"] == "argument"
    assert not read_volume(_sitk_file(tmp_path / "ct.nrrd", _ct_like())).is_constant


def test_ct_int16_output_and_explicit_dtype(tmp_path):
    vol = read_volume(_sitk_file(tmp_path / "ct.nii.gz", _ct_like()), modality="CT")
    assert vol.source_dtype == np.int16
    denoised = vol.with_array(vol.array * 0.5 + 0.3)
    denoised.array[0, 0, 0] = 40000.0  # out of int16 range: clipped, not wrapped
    denoised.array[0, 0, 1] = -40000.0
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(write_volume(denoised, tmp_path / "d.nii.gz"))))
    assert back.dtype == np.int16
    assert back[0, 0, 0] == 32767 and back[0, 0, 1] == -32768
    np.testing.assert_array_equal(back[1:], np.rint(vol.array[1:] * 0.5 + 0.3).astype(np.int16))
    as_float = write_volume(denoised, tmp_path / "f.nrrd", output_dtype="float32")
    assert sitk.ReadImage(str(as_float)).GetPixelID() == sitk.sitkFloat32
    assert value_range_for_output(vol).dtype == np.int16


def test_mr_range_preserved(tmp_path):
    rng = np.random.default_rng(1)
    mr_float = (rng.random((4, 16, 16)) * 900).astype(np.float32)
    vol = read_volume(_sitk_file(tmp_path / "mr.nii.gz", mr_float))
    assert vol.modality == "MR" and vol.source_dtype == np.float32 and vol.metadata["input_min"] >= 0
    undershoot = vol.with_array(vol.array - 50.0)  # a denoiser's negative ringing near 0
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(write_volume(undershoot, tmp_path / "o.nii.gz"))))
    assert back.dtype == np.float32 and back.min() == 0.0
    np.testing.assert_allclose(back[back > 0], (mr_float - 50.0)[mr_float - 50.0 > 0], rtol=1e-6)

    mr_int = rng.integers(0, 1800, (4, 16, 16)).astype(np.uint16)
    vol_i = read_volume(_sitk_file(tmp_path / "mr_i.nrrd", mr_int), modality="MR")
    assert vol_i.source_dtype == np.uint16
    back_i = sitk.ReadImage(str(write_volume(vol_i.with_array(vol_i.array - 3.4), tmp_path / "o.mha")))
    assert back_i.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back_i), np.clip(np.rint(mr_int - 3.4), 0, None))


def test_ct_padding_in_nifti_becomes_air(tmp_path):
    array = _ct_like()
    array[:, :2, :] = -3024
    vol = read_volume(_sitk_file(tmp_path / "pad.nii.gz", array))
    assert vol.array.min() == CT_AIR_HU and vol.metadata["n_padded"] == 2 * 20 * 6
    raw = read_volume(tmp_path / "pad.nii.gz", fill_padding=False)
    assert raw.array.min() == -3024 and raw.metadata["n_padded"] == 0


def test_absurd_finite_values_are_refused_naming_count_extreme_and_range(tmp_path):
    """A CT holding one voxel of 1e30 (or -1e20) HU was denoised: the restoration spread it over ~49 voxels (and
    the padding fill silently made -1e20 air). Real extremes pass: padding (-3024, -32768), extended-HU metal
    (30710, a 16-bit 65535)."""
    for value, shown in ((1e30, "1e+30"), (-1e20, "-1e+20")):
        array = _ct_like().astype(np.float32)
        array[1, 2, 3] = value
        path = _sitk_file(tmp_path / "absurd.nii.gz", array)
        for modality in (None, "CT"):
            with pytest.raises(ImageReadError, match=rf"holds 1 voxel\(s\).*CT in Hounsfield units.*-1e\+06 to "
                                                     rf"1e\+06.*most extreme is {re.escape(shown)}"):
                read_volume(path, modality=modality)
    real = _ct_like().astype(np.int32)
    real[0, :2, :] = -32768
    real[0, 2, :] = -3024
    real[1, 2, :3] = (30710, 65535, 64511)
    volume = read_volume(_sitk_file(tmp_path / "metal.nii.gz", real))
    assert volume.modality == "CT" and volume.array.max() == 65535
    # MR has no physical scale: bright values pass, values beyond float32's arithmetic (squares overflow) do not
    mr = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32) * 1e7
    assert read_volume(_sitk_file(tmp_path / "mr.nii.gz", mr), modality="MR").array.max() > 1e6
    mr[0, 1, 1] = 1e20
    with pytest.raises(ImageReadError, match=r"1 voxel\(s\).*MR \(or other\) image.*-1e\+15 to 1e\+15"):
        read_volume(_sitk_file(tmp_path / "mr.nii.gz", mr), modality="MR")


def test_absurd_rescaled_dicom_values_are_refused_but_declared_padding_passes(tmp_path):
    """DICOM values are checked after the rescale (a slope of 1e25 makes every voxel absurd); pixels the header
    declares as padding (PixelPaddingValue) are air whatever their value."""
    folder = tmp_path / "slope"
    info = _make_series(folder, 3)
    for path in info["paths"]:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "1e25"
        ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"voxel\(s\) with values far outside what a CT in Hounsfield units"):
        read_volume(folder)
    padded = tmp_path / "padded.dcm"
    ds = pydicom.dcmread(CT_SMALL)
    stored = ds.pixel_array.astype(np.int16)
    stored[:4] = -32768
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 100, 0  # the padding is -3.3e6 after the rescale
    ds.PixelPaddingValue = -32768
    ds.save_as(padded)
    volume = read_volume(padded)
    assert volume.array.min() == CT_AIR_HU and volume.metadata["n_padded_by_tag"] == 4 * stored.shape[1]
    ds.PixelPaddingValue = -32767  # declares another value: the -3.3e6 pixels are not padding then
    ds.save_as(padded)
    with pytest.raises(ImageReadError, match=r"holds 512 voxel\(s\).*most extreme is -3.277e\+06"):
        read_volume(padded)


@pytest.mark.parametrize("keyword, raw, words", [
    ("RescaleSlope", b"0       ", "RescaleSlope is '0', not a usable value (a slope of 0 maps every pixel"),
    ("RescaleSlope", b"abc.def ", "RescaleSlope is 'abc.def', not a usable value:"),
    ("RescaleIntercept", b"nan     ", "RescaleIntercept is 'nan', not a usable value:"),
    ("RescaleIntercept", b"inf     ", "RescaleIntercept is 'inf'"),
])
def test_a_broken_rescale_fails_the_series_instead_of_reading_as_1_and_0(tmp_path, keyword, raw, words):
    """A RescaleSlope of 0 was read as 1 and a non-finite or unparseable slope or intercept as 1 / 0: the CT came
    out 1024 HU off (or in another scale) and was denoised and written back as if right. The series fails, naming
    the file; an absent rescale still reads as (1, 0)."""
    info = _make_series(tmp_path / "series", 3)
    broken = info["paths"][1]
    ds = pydicom.dcmread(broken)
    setattr(ds, keyword, "9.876543")  # a placeholder of the raw value's length, replaced in the bytes below
    ds.save_as(broken)
    data = broken.read_bytes()
    assert data.count(b"9.876543") == 1
    broken.write_bytes(data.replace(b"9.876543", raw))
    with pytest.raises(ImageReadError) as err:
        read_volume(tmp_path / "series")
    assert words in str(err.value) and broken.name in str(err.value) and "physical units" in str(err.value)
    with pytest.raises(ImageReadError, match=re.escape(words)):
        read_volume(broken)
    for path in info["paths"]:  # no rescale at all: stored values as they are (signed, in HU)
        ds = pydicom.dcmread(path)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.PixelData = (ds.pixel_array.astype(np.int16) - 1024).astype("<i2").tobytes()
        ds.save_as(path)
    volume = read_volume(tmp_path / "series")
    assert volume.metadata["rescale_slope"] == 1.0 and volume.metadata["rescale_intercept"] == 0.0


def test_a_ct_without_rescale_whose_values_are_all_positive_is_refused(tmp_path):
    """A CT that declares no rescale (Type 1 in a CT image; an anonymiser or converter dropped it) and holds only
    values >= 0 is in the scanner's unsigned units (air near 0): read as HU it was denoised 1024 HU off, air taken
    for water. Refused naming the file and the likely rescale; the same series with its rescale reads."""
    info = _make_series(tmp_path / "series", 3)
    assert read_volume(tmp_path / "series").array.min() < -500  # CT_small's air, in HU through its rescale
    for path in info["paths"]:
        ds = pydicom.dcmread(path)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"a CT without RescaleIntercept.*all >= 0.*RescaleIntercept -1024"):
        read_volume(tmp_path / "series")
    with pytest.raises(ImageReadError, match=r"a CT without RescaleIntercept"):
        read_volume(info["paths"][0])
    for path in info["paths"]:  # an MR's values have no such origin: read as they are
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    assert read_volume(tmp_path / "series").array.min() >= 0


def test_guess_modality():
    assert guess_modality(_ct_like().astype(np.float32)) == "CT"
    assert guess_modality(np.random.default_rng(0).random((8, 8)) * 1000) == "MR"
    assert guess_modality(np.random.default_rng(0).normal(0, 1, (8, 8))) == "MR"  # z-scored MR
    assert guess_modality(np.zeros((0,))) == "MR"


# ------------------------------------------------------------------------------------------------------------
# Single DICOM files (pydicom / pydicom-data)
# ------------------------------------------------------------------------------------------------------------


def test_ct_small_slice_in_hu():
    ds = pydicom.dcmread(CT_SMALL)
    vol = read_volume(CT_SMALL)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.array, expected.astype(np.float32))
    assert vol.shape == (128, 128) and vol.modality == "CT" and vol.source_dtype == np.int16
    ps = [float(v) for v in ds.PixelSpacing]
    assert vol.spacing == (ps[1], ps[0])
    assert vol.origin == tuple(float(v) for v in ds.ImagePositionPatient[:2])
    assert vol.metadata["series_instance_uid"] == ds.SeriesInstanceUID
    assert vol.metadata["patient_id"] == ds.PatientID
    assert len(vol.dicom_headers) == 1 and "PixelData" not in vol.dicom_headers[0]


@pytest.mark.parametrize("signed", [True, False])
def test_bits_above_bits_stored_are_masked_and_signed_values_sign_extended(tmp_path, signed):
    """12-bit pixels in 16-bit words: a signed value written without sign extension (-5 as 0x0FFB) and bits
    above HighBit (old overlay planes) are read as GDCM (SimpleITK, Slicer) reads them, not as 4091 / 61416."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
    true_stored = np.full((int(ds.Rows), int(ds.Columns)), -5 if signed else 1000, dtype=np.int32)
    true_stored[0, :8] = 2047 if signed else 4095
    true_stored[1, :8] = -2048 if signed else 0
    words = true_stored & 0x0FFF  # no sign extension
    if not signed:
        words |= 0xF000  # garbage in the unused high bits
    ds.PixelData = words.astype("<u2").tobytes()
    path = tmp_path / "bits12.dcm"
    ds.save_as(path)
    volume = read_volume(path, fill_padding=False)
    expected = true_stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0])


@pytest.mark.filterwarnings("ignore:The \\(0028,0101\\) 'Bits Stored' value:UserWarning")  # header says 16, J2K 14
def test_j2k_lossless_equals_uncompressed_and_padding_to_air():
    j2k = read_volume(_pydicom_data("693_J2KR.dcm"))
    raw = read_volume(_pydicom_data("693_UNCR.dcm"))
    np.testing.assert_array_equal(j2k.array, raw.array)
    assert j2k.shape == (512, 512) and j2k.modality == "CT" and j2k.source_dtype == np.int16
    # the file pads outside the field of view with PixelPaddingValue -2000 (-3024 HU after rescale)
    assert j2k.metadata["n_padded_by_tag"] > 0 and j2k.array.min() == CT_AIR_HU
    stored = pydicom.dcmread(_pydicom_data("693_UNCR.dcm")).pixel_array
    assert np.count_nonzero(stored == -2000) == j2k.metadata["n_padded_by_tag"]
    unfilled = read_volume(_pydicom_data("693_UNCR.dcm"), fill_padding=False)
    assert unfilled.array.min() == -3024


@pytest.mark.parametrize("compressed,reference", [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless against the uncompressed original
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),  # the same, a 10-frame MR
    ("JPEG-LL.dcm", None),  # JPEG Lossless, Process 14 SV1 (the usual PACS lossless syntax) against GDCM/ITK
])
def test_jpeg_lossless_and_jpeg_ls_dicom_are_read(compressed, reference):
    # with pylibjpeg-openjpeg alone these failed ("pylibjpeg-libjpeg plugin is not installed"); python-gdcm reads them
    def find(name: str) -> Path:
        own = Path(pydicom.__file__).parent / "data" / "test_files" / name
        return own if own.is_file() else _pydicom_data(name)

    volume = read_volume(find(compressed))
    if reference is not None:
        np.testing.assert_array_equal(volume.array, read_volume(find(reference)).array)
    else:
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(find(compressed)))).reshape(volume.shape)
        np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
    assert np.ptp(volume.array) > 0


def test_dicom_slice_written_with_patient_geometry(tmp_path):
    path = _pydicom_data("693_UNCR.dcm")
    vol = read_volume(path)
    out = write_volume(vol.with_array(vol.array + 0.2), tmp_path / "slice.nii.gz")
    back, direct = sitk.ReadImage(str(out)), sitk.ReadImage(str(path))  # SimpleITK reads the slice as 1-slice 3D
    assert back.GetSize() == direct.GetSize() == (512, 512, 1) and back.GetPixelID() == sitk.sitkInt16
    _assert_geometry(read_volume(out), direct, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back)[0], np.rint(vol.array + 0.2))
    flat = write_volume(vol, tmp_path / "flat.mha", dicom_slice_as_3d=False)
    assert sitk.ReadImage(str(flat)).GetDimension() == 2


def test_enhanced_multiframe_ct_is_3d_sorted_along_normal():
    path = _pydicom_data("eCT_Supplemental.dcm")
    vol = read_volume(path)
    ds = pydicom.dcmread(path)
    assert vol.shape == (2, 512, 512) and vol.metadata["multiframe"]
    # IOP (-1,0,0 / 0,1,0): normal is -z, so the frame at z=-149 comes first; spacing 10 mm
    assert vol.metadata["frame_order"] == [1, 0]
    assert vol.origin == (99.5, -301.5, -149.0) and vol.spacing[2] == pytest.approx(10.0)
    assert vol.direction == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    np.testing.assert_array_equal(vol.array[0], ds.pixel_array[1].astype(np.float32) - 1024.0)


def test_one_frame_enhanced_ct_takes_rescale_and_plane_from_its_functional_groups(tmp_path):
    """An enhanced CT object of one frame keeps RescaleIntercept and its plane in the functional groups: it read
    1024 above HU with 1 mm pixels at the origin, and its derived slice had no ImagePositionPatient."""
    ds = pydicom.dcmread(_pydicom_data("eCT_Supplemental.dcm"))
    frame = ds.pixel_array[0]
    ds.NumberOfFrames = 1
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[0]]
    ds.PixelData = frame.astype("<u2").tobytes()
    path = tmp_path / "one_frame.dcm"
    ds.save_as(path)
    vol = read_volume(path, fill_padding=False)
    np.testing.assert_array_equal(vol.array, frame.astype(np.float32) - 1024.0)
    assert vol.spacing == (0.388672, 0.388672) and vol.origin == (99.5, -301.5)
    assert vol.metadata["image_position_patient"] == [99.5, -301.5, -159.0]
    out = write_volume(vol, tmp_path / "derived")
    derived = pydicom.dcmread(next(out.iterdir()))
    assert [float(v) for v in derived.ImagePositionPatient] == [99.5, -301.5, -159.0]
    assert [float(v) for v in derived.ImageOrientationPatient] == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    again = read_volume(out, fill_padding=False)
    assert again.same_grid(vol)
    np.testing.assert_array_equal(again.array, vol.array)


def test_a_series_of_one_frame_enhanced_files_reads_as_the_multiframe_object(tmp_path):
    """Each file's plane and rescale are in its functional groups: the folder was refused ("no
    ImagePositionPatient") although it is one regular volume."""
    source = _pydicom_data("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(source)
    frames = ds.pixel_array
    (tmp_path / "s").mkdir()
    for k in range(2):
        one = copy.deepcopy(ds)
        one.NumberOfFrames = 1
        one.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[k]]
        one.PixelData = frames[k].astype("<u2").tobytes()
        one.SOPInstanceUID = one.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        one.save_as(tmp_path / "s" / f"frame{k}.dcm")
    folder, whole = read_volume(tmp_path / "s", fill_padding=False), read_volume(source, fill_padding=False)
    assert folder.same_grid(whole) and "spacing_note" not in folder.metadata
    np.testing.assert_array_equal(folder.array, whole.array)


def test_derived_series_of_an_enhanced_ct_keeps_its_window_and_slice_thickness(tmp_path):
    """Both are in the functional groups of the source, which are not copied: the derived slices had no window and
    the slice step (10 mm) as their thickness (5 mm)."""
    ds = pydicom.dcmread(_pydicom_data("eCT_Supplemental.dcm"))
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness = "5.0"
    ds.save_as(tmp_path / "enhanced.dcm")
    vol = read_volume(tmp_path / "enhanced.dcm")
    assert (vol.metadata["window_center"], vol.metadata["window_width"]) == (49.0, 102.0)
    out = write_volume(vol, tmp_path / "derived")
    for path in sorted(out.iterdir()):
        derived = pydicom.dcmread(path)
        assert (float(derived.WindowCenter), float(derived.WindowWidth)) == (49.0, 102.0)
        assert float(derived.SliceThickness) == 5.0


def test_derived_slice_of_a_monochrome1_image_stays_monochrome1(tmp_path):
    """The derived values are the source's: written as MONOCHROME2 the image showed inverted next to its source."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME1"
    ds.save_as(tmp_path / "dx.dcm")
    vol = read_volume(tmp_path / "dx.dcm", fill_padding=False)
    derived = pydicom.dcmread(next(write_volume(vol, tmp_path / "derived").iterdir()))
    assert derived.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(read_volume(tmp_path / "derived", fill_padding=False).array, vol.array)


def test_modality_lut_sequence_maps_the_stored_values(tmp_path):
    """An image with a Modality LUT Sequence instead of RescaleSlope/Intercept (XA, DX, SC) was read in raw stored
    values."""
    ds = pydicom.dcmread(CT_SMALL)
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.Modality, ds.PixelRepresentation = "DX", 0
    lut = pydicom.Dataset()
    lut.LUTDescriptor, lut.ModalityLUTType = [256, 0, 16], "OD"
    lut.LUTData = [3 * i + 7 for i in range(256)]
    lut["LUTDescriptor"].VR = lut["LUTData"].VR = "US"
    ds.ModalityLUTSequence = [lut]
    stored = (np.arange(128 * 128) % 256).reshape(128, 128).astype(np.uint16)
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(tmp_path / "lut.dcm")
    np.testing.assert_array_equal(read_volume(tmp_path / "lut.dcm", fill_padding=False).array, 3.0 * stored + 7)


# ------------------------------------------------------------------------------------------------------------
# DICOM series (synthetic, on disk)
# ------------------------------------------------------------------------------------------------------------


def test_series_order_and_geometry_match_simpleitk_on_oblique_series(tmp_path):
    rot = _rotation(20.0, -10.0, 5.0)
    iop = np.concatenate([rot[:, 0], rot[:, 1]])
    made = _make_series(tmp_path / "s", n=5, iop=iop)
    (tmp_path / "s" / "notes.txt").write_text("not a DICOM file")  # junk is ignored
    vol = read_volume(tmp_path / "s")
    image = _sitk_series(tmp_path / "s")
    _assert_geometry(vol, image, atol=1e-4)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(image), atol=0.5)
    # array z order = position along the normal = the order the slices were made
    for k in range(5):
        np.testing.assert_array_equal(vol.array[k], made["stored"] + 10 * k - 1024)
    assert vol.shape == (5, 128, 128) and vol.spacing[2] == pytest.approx(2.5, abs=1e-5)
    assert vol.metadata["n_files_ignored"] == 1 and len(vol.dicom_headers) == 5
    assert [int(h.InstanceNumber) for h in vol.dicom_headers] == [1, 2, 3, 4, 5]


def test_multi_series_folder_lists_and_selects(tmp_path):
    a = _make_series(tmp_path / "a", n=3, description="first", series_number=2)
    b = _make_series(tmp_path / "b", n=4, description="second", series_number=3)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, p in enumerate(a["paths"] + b["paths"]):
        shutil.copy(p, mixed / f"f{i}")  # names without extension
    series = list_dicom_series(mixed)
    assert [(s["uid"], s["description"], s["modality"], s["n_files"]) for s in series] == [
        (a["uid"], "first", "CT", 3),
        (b["uid"], "second", "CT", 4),
    ]
    with pytest.raises(ImageReadError) as err:
        read_volume(mixed)
    message = str(err.value)
    assert "2 DICOM series" in message and "series_uid" in message and "\n" not in message
    assert a["uid"] in message and b["uid"] in message and "first" in message and "4 files" in message
    assert read_volume(mixed, series_uid=b["uid"]).shape == (4, 128, 128)
    assert read_volume(mixed, series_uid=a["uid"]).shape == (3, 128, 128)
    with pytest.raises(ImageReadError, match="no series with uid"):
        read_volume(mixed, series_uid="1.2.3")


@pytest.mark.parametrize("shared_uid", ["", "1.2.826.0.1.3680043.8.498.4242"])
def test_two_patients_slices_under_one_series_uid_are_never_one_volume(tmp_path, shared_uid):
    """Hard-anonymised series (empty SeriesInstanceUID) or copies with the same UID group together by that UID:
    slices of two patients or studies in one folder must not become one volume, nor a derived series that gives
    the second patient's slices the first's PatientID and study."""
    a = _make_series(tmp_path / "a", n=3, series_uid=shared_uid or None)
    b = _make_series(tmp_path / "b", n=3, gaps=[2.5, 2.5], series_uid=shared_uid or None)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for k, path in enumerate(a["paths"]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = shared_uid
        ds.save_as(mixed / f"a{k}.dcm")
    for k, path in enumerate(b["paths"]):  # patient B: 7.5 mm further along, so the six slices stack evenly
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = shared_uid
        ds.PatientID, ds.PatientName, ds.StudyInstanceUID = "PAT_B", "Beta^Bob", generate_uid()
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + \
            [float(ds.ImagePositionPatient[2]) + 7.5]
        ds.save_as(mixed / f"b{k}.dcm")
    with pytest.raises(ImageReadError, match=r"PatientID differs between slices .*PAT_B.* b\d\.dcm.*not one patient"):
        read_volume(mixed)
    # same patient, another study: refused too
    for path in sorted(mixed.glob("b*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = pydicom.dcmread(a["paths"][0]).PatientID, pydicom.dcmread(a["paths"][0]).PatientName
        ds.save_as(path)
    with pytest.raises(ImageReadError, match="StudyInstanceUID differs"):
        read_volume(mixed)
    # the writer refuses a reference whose headers disagree, however it was made
    vol = read_volume(tmp_path / "a")
    forged = copy.deepcopy(vol)
    forged.dicom_headers[1].PatientID = "PAT_B"
    with pytest.raises(ImageWriteError, match="not one patient's series: PatientID differs"):
        write_dicom_derived_series(vol, tmp_path / "out", forged)
    assert not (tmp_path / "out").exists()


def test_a_slice_copied_twice_into_a_series_is_named_not_read_as_two_volumes(tmp_path):
    made = _make_series(tmp_path / "s", n=4)
    shutil.copy(made["paths"][1], tmp_path / "s" / "copy of a slice.dcm")
    with pytest.raises(ImageReadError, match=r"copy of a slice\.dcm and slice_\d+\.dcm are the same image"):
        read_volume(tmp_path / "s")


def _set_on_slices(paths: list[Path], values: dict) -> None:
    """Set ``{keyword: [value per slice]}`` on the files of a series (in slice order)."""
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        for keyword, per_slice in values.items():
            setattr(ds, keyword, per_slice[k])
        ds.save_as(path)


@pytest.mark.parametrize(
    "values, message",
    [
        # a scout in the other orientation kept in the CT series: was "slices have different ImageOrientationPatient"
        ({"ImageType": [["ORIGINAL", "PRIMARY", "LOCALIZER"]] + [["ORIGINAL", "PRIMARY", "AXIAL"]] * 5,
          "ImageOrientationPatient": [[1, 0, 0, 0, 0, -1]] + [[1, 0, 0, 0, 1, 0]] * 5},
         r"1 of 6 slices are localizer \(scout\) images \(slice_006\.dcm"),
        # two echoes whose positions interleave evenly: were stacked into one volume, echo 2 between echo 1's slices
        ({"Modality": ["MR"] * 6, "EchoNumbers": [1, 2] * 3, "EchoTime": [10, 40] * 3},
         r"EchoNumbers differs between slices \('2' in slice_001\.dcm; '1' in slice_002\.dcm\).*several volumes"),
        ({"ConvolutionKernel": ["B30f", "B70f"] * 3}, r"ConvolutionKernel differs between slices"),
        ({"Modality": ["MR"] * 6, "ImageType": [["ORIGINAL", "PRIMARY", "M", "ND"], ["ORIGINAL", "PRIMARY", "P", "ND"]] * 3},
         r"ImageType \(complex component\) differs"),
        ({"TemporalPositionIdentifier": [1, 2] * 3}, r"TemporalPositionIdentifier differs"),
        ({"Modality": ["CT", "MR"] * 3}, r"Modality differs"),
        # a 1 mm and a 5 mm reconstruction under one uid whose positions interleave evenly: were stacked into one
        ({"SliceThickness": ["1", "5.0"] * 3},
         r"SliceThickness differs between slices at interleaved positions \('5.0' mm in slice_001\.dcm; '1' mm in "
         r"slice_002\.dcm\).*several reconstructions"),
        ({"SliceThickness": ["1"] * 3 + ["5"] + ["1"] * 2}, r"SliceThickness differs .*'5' mm in slice_003\.dcm"),
    ],
    ids=["localizer", "echoes", "kernels", "magnitude-phase", "time-points", "modalities", "thicknesses",
         "one thick slice"],
)
def test_several_volumes_under_one_series_uid_are_named_not_stacked(tmp_path, values, message):
    series = _make_series(tmp_path / "s", n=6)
    _set_on_slices(series["paths"], values)
    with pytest.raises(ImageReadError, match=message):
        read_volume(tmp_path / "s")


def test_one_thickness_written_differently_is_one_volume(tmp_path):
    """Scanners write one thickness as "1" and "1.0", 0.625 and 0.6250, or a rounded float: numerically one
    thickness, one volume; a slice without the tag is no other thickness."""
    series = _make_series(tmp_path / "s", n=6)
    _set_on_slices(series["paths"], {"SliceThickness": ["0.625", "0.6250", "0.62500001", "0.625", ".625", "0.625"]})
    ds = pydicom.dcmread(series["paths"][5])
    del ds.SliceThickness
    ds.save_as(series["paths"][5])
    assert read_volume(tmp_path / "s").array.shape == (6, 128, 128)


def test_thin_and_thick_blocks_of_one_sequential_scan_are_left_to_the_geometry(tmp_path):
    """A sequential head CT: thin slices through the posterior fossa, thick ones above (the real GE head series
    does this), one block each. Not two reconstructions: evenly spaced it reads, else its spacing is the reason."""
    series = _make_series(tmp_path / "even", n=6)
    _set_on_slices(series["paths"], {"SliceThickness": ["2.5"] * 3 + ["5"] * 3})
    assert read_volume(tmp_path / "even").array.shape == (6, 128, 128)
    series = _make_series(tmp_path / "uneven", n=6, gaps=[2.5, 2.5, 5, 5, 5])
    _set_on_slices(series["paths"], {"SliceThickness": ["2.5"] * 3 + ["5"] * 3})
    with pytest.raises(ImageReadError, match="uneven slice spacing") as err:
        read_volume(tmp_path / "uneven")
    assert "SliceThickness" not in str(err.value)


@pytest.mark.parametrize(
    "keyword, value, message",
    [
        ("ImageOrientationPatient", [1, 0, 0, 0, 0, -1],
         r"different ImageOrientationPatient \(\[1\.0, 0\.0, 0\.0, 0\.0, 1\.0, 0\.0\] in slice_\d+\.dcm; "
         r"\[1\.0, 0\.0, 0\.0, 0\.0, 0\.0, -1\.0\] in slice_003\.dcm; 1 of 5 slices"),
        ("PixelSpacing", [0.5, 0.5], r"different PixelSpacing \(.* in slice_\d+\.dcm; \[0\.5, 0\.5\] in slice_003\.dcm"),
        ("Rows", 64, r"different sizes \(rows x columns: 128 x 128 in slice_\d+\.dcm; 64 x 128 in slice_003\.dcm\)"),
    ],
)
def test_a_slice_that_does_not_fit_the_series_is_named(tmp_path, keyword, value, message):
    """e.g. a scout or a dose report kept in the series without ImageType LOCALIZER: the message said only
    "different sizes" / "different ImageOrientationPatient", not which file to move out."""
    series = _make_series(tmp_path / "s", n=5)
    odd = pydicom.dcmread(series["paths"][2])  # slice_003.dcm
    setattr(odd, keyword, value)
    if keyword == "Rows":
        odd.PixelData = odd.PixelData[: 64 * 128 * 2]
    odd.save_as(series["paths"][2])
    with pytest.raises(ImageReadError, match=message):
        read_volume(tmp_path / "s")


def test_acquisition_numbers_may_change_within_a_series(tmp_path):
    """Axial (step-and-shoot) CT numbers each rotation as an acquisition: still one volume."""
    series = _make_series(tmp_path / "s", n=6)
    _set_on_slices(series["paths"], {"AcquisitionNumber": [1, 1, 2, 2, 3, 3]})
    assert read_volume(tmp_path / "s").shape[0] == 6


def test_sheared_series_refused_as_gantry_tilt(tmp_path):
    # positions move along z while the slice plane is tilted about x: a classic tilted CT stack
    tilt = np.deg2rad(12.0)
    iop = np.array([1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)])
    normal = np.cross(iop[:3], iop[3:])
    shear = np.array([0, 0, 1.0]) / normal[2] - normal  # so that the slice step is purely along z
    made = _make_series(tmp_path / "t", n=4, iop=iop, shear_per_mm=tuple(shear), tilt_tag=12.0)
    with pytest.raises(ImageReadError) as err:
        read_volume(tmp_path / "t")
    assert "gantry tilt of 12.0°" in str(err.value) and "regular grid" in str(err.value)
    assert "2D" in str(err.value)
    single = read_volume(made["paths"][0])  # one slice of it is a fine 2D image
    assert single.ndim == 2 and single.metadata["image_orientation_patient"] == pytest.approx(list(iop))


def test_tilt_tag_without_tilted_orientation_refused_but_consistent_oblique_accepted(tmp_path):
    _make_series(tmp_path / "hidden", n=3, tilt_tag=15.0)  # axial IOP but the gantry was tilted
    with pytest.raises(ImageReadError, match="gantry tilt of 15.0°"):
        read_volume(tmp_path / "hidden")
    tilt = np.deg2rad(15.0)
    iop = np.array([1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)])
    _make_series(tmp_path / "oblique", n=3, iop=iop, tilt_tag=15.0)  # positions along the tilted normal
    vol = read_volume(tmp_path / "oblique")
    assert vol.shape == (3, 128, 128) and vol.metadata["gantry_tilt_deg"] == 15.0


def test_uneven_and_duplicate_slices_refused(tmp_path):
    _make_series(tmp_path / "gap", n=4, gaps=[2.5, 5.0, 2.5])  # a missing slice
    with pytest.raises(ImageReadError) as err:
        read_volume(tmp_path / "gap")
    assert "uneven slice spacing" in str(err.value) and "5.000" in str(err.value)
    _make_series(tmp_path / "ok", n=3, gaps=[2.5, 2.505])  # within the documented 1 % tolerance
    assert read_volume(tmp_path / "ok").shape[0] == 3
    _make_series(tmp_path / "dup", n=3, gaps=[2.5, 0.0])
    with pytest.raises(ImageReadError, match="share a position.*4D is not supported"):
        read_volume(tmp_path / "dup")


# ------------------------------------------------------------------------------------------------------------
# Refusals on bad input
# ------------------------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import gzip

    text = tmp_path / "notes.dcm"
    text.write_text("this is a text file, not an image\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("hello")
    (junk / "data.bin").write_bytes(b"\x08\x00\x10\x00garbage")
    four_d = tmp_path / "fourd.nii.gz"
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 4, 3), np.int16), np.eye(4)), str(four_d))
    nan = tmp_path / "nan.nii.gz"
    nan_array = np.zeros((3, 5, 5), np.float32)
    nan_array[1, 2, :3] = np.nan
    _sitk_file(nan, nan_array)
    nan_uncompressed = tmp_path / "nan_uncompressed.nii.gz"  # ITK reads it as it is (and its NaN as 0)
    nan_uncompressed.write_bytes(gzip.decompress(nan.read_bytes()))
    # vox_offset 348: ITK reads it (its NaN as 0); nibabel refuses it, and its NaN check was skipped unsaid
    nan_unchecked = tmp_path / "nan_unchecked.nii"
    nan_unchecked.write_bytes(gzip.decompress(nan.read_bytes()))
    with open(nan_unchecked, "r+b") as handle:
        handle.seek(108)
        handle.write(np.float32(348).tobytes())
    truncated = tmp_path / "truncated.dcm"
    data = CT_SMALL.read_bytes()
    truncated.write_bytes(data[: len(data) - 5000])
    zero_size = tmp_path / "zero.mha"
    zero_size.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 0\nElementType = MET_SHORT\n"
                         "ElementDataFile = LOCAL\n")
    header_only = tmp_path / "header_only.dcm"
    header_only.write_bytes(CT_SMALL.read_bytes()[:400])
    unsupported = tmp_path / "image.png"
    unsupported.write_bytes(b"\x89PNG\r\n")
    return {
        "text .dcm": (text, "is not a DICOM file"),
        "empty folder": (empty, "empty folder"),
        "junk folder": (junk, "contains no DICOM image files"),
        "missing": (tmp_path / "nope", "no such file or folder"),
        "4D": (four_d, "4D images are not supported, give one 3D volume"),
        "NaN": (nan, "contains 3 NaN values"),
        "NaN, uncompressed .nii.gz": (nan_uncompressed, "contains 3 NaN values"),
        "NaN, unchecked": (nan_unchecked, "SimpleITK reads it but nibabel cannot (vox offset 348 too low"),
        "truncated": (truncated, "is truncated or corrupt: its header declares 1 x 128 x 128 voxels (32,768 bytes"),
        "pydicom truncated": (Path(get_testdata_file("MR_truncated.dcm")),
                              "is truncated or corrupt: its header declares 1 x 64 x 64 voxels (8,192 bytes"),
        "zero size": (zero_size, "empty image (shape (0, 4, 4))"),
        "header only": (header_only, "DICOM file without image attributes"),
        "unsupported": (unsupported, "unsupported file type '.png'"),
    }


def test_bad_inputs_give_clear_read_errors(tmp_path):
    for name, (path, expected) in _bad_inputs(tmp_path).items():
        with pytest.raises(ImageReadError) as err:
            read_volume(path)
        message = str(err.value)
        assert expected in message, (name, message)
        assert str(path) in message and "\n" not in message, (name, message)


def test_colour_dicom_refused():
    path = _pydicom_data("SC_rgb.dcm")
    with pytest.raises(ImageReadError, match="3 samples per pixel.*not supported, give one 3D volume"):
        read_volume(path)


# ------------------------------------------------------------------------------------------------------------
# Write guarantees
# ------------------------------------------------------------------------------------------------------------


def test_no_overwrite_no_write_onto_input_and_atomic(tmp_path):
    src = _sitk_file(tmp_path / "in.nii.gz", _ct_like())
    vol = read_volume(src)
    with pytest.raises(ImageWriteError, match="onto the input"):
        write_volume(vol, src, overwrite=True)
    out = write_volume(vol, tmp_path / "out.nrrd")
    before = out.read_bytes()
    with pytest.raises(ImageWriteError, match="already exists.*overwrite=True"):
        write_volume(vol.with_array(vol.array + 5), out)
    assert out.read_bytes() == before
    write_volume(vol.with_array(vol.array + 5), out, overwrite=True)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out)))[0, 0, 0] == vol.array[0, 0, 0] + 5

    # a failure after the data were written (companion .zraw of a .mhd exists) leaves nothing behind
    (tmp_path / "x.zraw").write_bytes(b"keep me")
    with pytest.raises(ImageWriteError, match="x.zraw"):
        write_volume(vol, tmp_path / "x.mhd")
    assert not (tmp_path / "x.mhd").exists() and (tmp_path / "x.zraw").read_bytes() == b"keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    with pytest.raises(ImageWriteError, match="contains 1 NaN"):
        bad = vol.with_array(vol.array.copy())
        bad.array[0, 0, 0] = np.nan
        write_volume(bad, tmp_path / "nan.nii.gz")
    with pytest.raises(ImageWriteError, match="unsupported output extension"):
        write_volume(vol, tmp_path / "out.png")
    with pytest.raises(ImageWriteError, match="DICOM output needs a DICOM input.*nii.gz"):
        write_volume(vol, tmp_path / "dicom_out")
    assert not (tmp_path / "dicom_out").exists()


def test_derived_series_from_synthetic_series(tmp_path):
    _make_series(tmp_path / "src", n=4)
    vol = read_volume(tmp_path / "src")
    denoised = vol.with_array(vol.array * 0.9 + 0.2)
    with pytest.raises(ImageWriteError, match="onto the input"):
        write_volume(denoised, tmp_path / "src", overwrite=True)
    one_slice = read_volume(next((tmp_path / "src").iterdir()))
    with pytest.raises(ImageWriteError, match="holds the input"):  # would replace the folder of the input file
        write_volume(one_slice, tmp_path / "src", overwrite=True)
    assert len(list((tmp_path / "src").iterdir())) == 4
    out = write_volume(denoised, tmp_path / "out")
    files = sorted(out.iterdir())
    assert len(files) == 4
    image = _sitk_series(out)
    _assert_geometry(vol, image, atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), np.rint(denoised.array), atol=0.5)
    again = read_volume(out)
    np.testing.assert_array_equal(again.array, np.rint(denoised.array))
    assert again.metadata["series_description"] == "synthetic [denoised]"
    assert again.metadata["series_number"] == 1007
    for key in ("study_instance_uid", "patient_id", "patient_name", "frame_of_reference_uid", "study_date"):
        assert again.metadata[key] == vol.metadata[key], key
    assert again.metadata["series_instance_uid"] not in ("", vol.metadata["series_instance_uid"])
    sop_uids = {h.SOPInstanceUID for h in again.dicom_headers} | {h.SOPInstanceUID for h in vol.dicom_headers}
    assert len(sop_uids) == 8
    with pytest.raises(ImageWriteError, match="already exists"):
        write_volume(denoised, out)
    write_volume(denoised, out, overwrite=True)  # replaces the whole series atomically
    assert len(list(out.iterdir())) == 4 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    cropped = Volume(denoised.array[:2], vol.spacing, vol.origin, vol.direction, "CT")
    with pytest.raises(ImageWriteError, match="not on the reference DICOM grid"):
        write_dicom_derived_series(cropped, tmp_path / "c", vol)


def test_derived_series_for_float_mr_uses_rescale(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    vol = read_volume(get_testdata_file("MR_small.dcm"))
    assert vol.modality == "MR" and vol.ndim == 2
    smooth = vol.with_array(vol.array / 7.3)  # non-integral values
    smooth = Volume(smooth.array, vol.spacing, vol.origin, vol.direction, "MR", np.float32, None, None,
                    dict(vol.metadata))
    out = write_dicom_derived_series(smooth, tmp_path / "mr", vol)
    written = pydicom.dcmread(next(out.iterdir()))
    slope = float(written.RescaleSlope)
    assert written.PixelRepresentation == 0 and slope < 1
    np.testing.assert_allclose(written.pixel_array * slope + float(written.RescaleIntercept), smooth.array,
                               atol=slope / 2 + 1e-6)
    assert written.SOPClassUID == pydicom.uid.MRImageStorage and written.PatientID == ds.PatientID


#: writes a derived series of pydicom's CT_small.dcm (values + 3) into sys.argv[1], with the server's lib
_WRITE_DERIVED = """
import sys
from pydicom.data import get_testdata_file
from lib.imaging import read_volume, write_dicom_derived_series
volume = read_volume(get_testdata_file("CT_small.dcm"))
write_dicom_derived_series(volume.with_array(volume.array + 3), sys.argv[1], volume)
"""


def test_a_derived_series_is_written_alike_under_pydicom_3_without_what_pydicom_4_removes(tmp_path):
    """The server's .venv has pydicom 2 (pinned by MONAI Label's pydicom-seg); a site may run pydicom 3 (Slicer's,
    in .venv-slicer, here). Writing a derived series set the dataset's ``is_little_endian`` / ``is_implicit_VR`` and
    passed ``write_like_original``: deprecated in pydicom 3 (a warning there), removed in pydicom 4 (an error here,
    as in test_slicer_module's pydicom 3 run). The file written under pydicom 3 is the one written under pydicom 2:
    a preamble of zeros, Explicit VR Little Endian as its transfer syntax says, the same elements and values but for
    the new UIDs and the dates and times of the write."""
    import processes
    from conftest import REPO_ROOT

    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    result = processes.run([python, "-W", "error::DeprecationWarning:pydicom.dataset",
                            "-W", "error::DeprecationWarning:pydicom.filewriter", "-c", _WRITE_DERIVED,
                            tmp_path / "pydicom3"], 300, cwd=REPO_ROOT,
                           env=dict(os.environ, PYTHONPATH=str(REPO_ROOT / "apps" / "adl_denoise")))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    volume = read_volume(get_testdata_file("CT_small.dcm"))
    write_dicom_derived_series(volume.with_array(volume.array + 3), tmp_path / "pydicom2", volume)
    written = [next((tmp_path / name).iterdir()) for name in ("pydicom3", "pydicom2")]
    datasets = [pydicom.dcmread(path) for path in written]
    for path, ds in zip(written, datasets):
        assert path.read_bytes()[:132] == b"\0" * 128 + b"DICM"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.is_implicit_VR, ds.is_little_endian) == (False, True)  # as read from the file
        np.testing.assert_array_equal(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                                      np.rint(volume.array + 3))
    differing = {element.keyword for element in datasets[0] if datasets[1].get(element.tag) != element}
    now = {f"{what}{unit}" for what in ("InstanceCreation", "Content", "Series") for unit in ("Date", "Time")}
    assert differing - now == {"SOPInstanceUID", "SeriesInstanceUID"}, differing
    assert [element.tag for element in datasets[0]] == [element.tag for element in datasets[1]]
    assert {element.keyword for element in datasets[0].file_meta if datasets[1].file_meta.get(element.tag) != element} \
        == {"MediaStorageSOPInstanceUID"}


# ------------------------------------------------------------------------------------------------------------
# Real data in ../shared/data
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slab(shared_data):
    folder = shared_data / SLAB
    return folder, read_volume(folder)


def test_j2k_slab_matches_simpleitk(slab):
    folder, vol = slab
    image = _sitk_series(folder)
    assert vol.shape == (20, 512, 512) and vol.modality == "CT" and vol.source_dtype == np.int16
    _assert_geometry(vol, image, atol=1e-4)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(image), atol=0.5)
    assert vol.metadata["series_instance_uid"] == "" and vol.metadata["study_instance_uid"] == ""
    assert vol.metadata["window_center"] == 40.0 and vol.metadata["rescale_intercept"] == -1024.0


def test_j2k_slab_derived_series_is_valid(slab, tmp_path):
    folder, vol = slab
    rng = np.random.default_rng(0)
    denoised = vol.with_array(vol.array + rng.normal(0, 0.3, vol.shape))
    out = write_volume(denoised, tmp_path / "denoised")
    files = sorted(out.iterdir())
    assert len(files) == 20
    datasets = [pydicom.dcmread(f) for f in files]
    expected = np.rint(denoised.array)
    by_instance = sorted(datasets, key=lambda d: int(d.InstanceNumber))
    for k, ds in enumerate(by_instance):
        assert ds.preamble == b"\0" * 128 and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
        np.testing.assert_array_equal(ds.pixel_array, expected[k])
        src = vol.dicom_headers[k]
        assert [float(v) for v in ds.ImagePositionPatient] == [float(v) for v in src.ImagePositionPatient]
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.file_meta.MediaStorageSOPInstanceUID
        assert "PixelPaddingValue" not in ds and not any(e.tag.is_private for e in ds)
    uids = {d.SOPInstanceUID for d in datasets}
    assert len(uids) == 20 and all(u for u in uids)
    assert len({d.SeriesInstanceUID for d in datasets}) == 1 and datasets[0].SeriesInstanceUID
    assert len({d.StudyInstanceUID for d in datasets}) == 1 and datasets[0].StudyInstanceUID  # filled once
    assert {d.SOPClassUID for d in datasets} == {pydicom.uid.CTImageStorage}
    assert {d.PatientID for d in datasets} == {""}  # as the source: a made-up ID would be another patient
    first = datasets[0]
    assert list(first.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert first.SeriesDescription == "CT Body 3.0 [denoised]" and first.SeriesNumber == 1000
    assert first.FrameOfReferenceUID == vol.dicom_headers[0].FrameOfReferenceUID
    assert first.StudyDate == vol.dicom_headers[0].StudyDate
    image = _sitk_series(out)
    _assert_geometry(vol, image, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    assert not (folder / "denoised").exists()


def test_ge_tilted_folder_refused_single_slice_reads(shared_data, tmp_path):
    folder = shared_data / TILTED
    with pytest.raises(ImageReadError) as err:
        read_volume(folder)
    assert "tilt" in str(err.value) and "18.5°" in str(err.value) and str(folder) in str(err.value)
    vol = read_volume(folder / "05.dcm")
    stored = pydicom.dcmread(folder / "05.dcm").pixel_array
    assert vol.ndim == 2 and vol.shape == (512, 512) and vol.modality == "CT"
    # GE pads outside the field of view with -1500 before rescale; those pixels become air
    assert vol.metadata["n_padded_by_tag"] == np.count_nonzero(stored == -1500) > 0
    assert vol.array.min() >= CT_AIR_HU and np.all(vol.array[stored == -1500] == CT_AIR_HU)
    # the oblique (tilted) plane keeps its patient geometry when written as NIfTI
    back = sitk.ReadImage(str(write_volume(vol, tmp_path / "ge.nii.gz")))
    direct = sitk.ReadImage(str(folder / "05.dcm"))
    assert back.GetSize() == (512, 512, 1)
    np.testing.assert_allclose(back.GetOrigin(), direct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), direct.GetDirection(), atol=1e-6)
    # in-plane as SimpleITK; along the normal the slice thickness (4 mm; SimpleITK says 1 without SpacingBetweenSlices)
    np.testing.assert_allclose(back.GetSpacing(), [*direct.GetSpacing()[:2], 4.0], atol=1e-6)


def test_real_multi_series_folder(shared_data, tmp_path):
    for p in (shared_data / SLAB).iterdir():
        shutil.copy(p, tmp_path / p.name)
    shutil.copy(shared_data / TILTED / "01.dcm", tmp_path / "01.dcm")
    series = list_dicom_series(tmp_path)
    assert sorted(s["n_files"] for s in series) == [1, 20]
    with pytest.raises(ImageReadError, match="2 DICOM series.*empty SeriesInstanceUID"):
        read_volume(tmp_path)
    assert read_volume(tmp_path, series_uid="").shape == (20, 512, 512)
    ge_uid = next(s["uid"] for s in series if s["n_files"] == 1)
    assert read_volume(tmp_path, series_uid=ge_uid).ndim == 2


def test_oversized_images_are_refused_from_the_header(tmp_path, monkeypatch):
    """A volume above the voxel limit is refused before its pixels are loaded, for every reader path."""
    nifti = tmp_path / "big.nii.gz"
    sitk.WriteImage(sitk.Image(64, 64, 20, sitk.sitkInt16), str(nifti))
    folder = tmp_path / "series"
    folder.mkdir()
    source = Path(get_testdata_file("CT_small.dcm"))
    for i in range(3):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"{i}.dcm")
    assert read_volume(nifti).array.size == 64 * 64 * 20  # within the default limit
    monkeypatch.setenv("ADL_MAX_VOXELS", "10000")
    for path, voxels in ((nifti, "81,920"), (folder, "49,152"), (source, "16,384")):
        with pytest.raises(ImageReadError, match=rf"too large: .*{voxels} voxels exceeds the limit of 10,000"):
            read_volume(path)


@pytest.mark.parametrize("value,problem", [("abc", "not a number"), ("0", "below 1"), ("-1", "below 1"),
                                           ("nan", "not a number"), ("inf", "not a whole number"),
                                           ("2.5", "not a whole number"), ("0.5", "not a whole number")])
def test_a_bad_voxel_limit_in_the_environment_is_an_error_naming_it(tmp_path, monkeypatch, value, problem):
    """ADL_MAX_VOXELS=abc failed every read with "could not convert string to float: 'abc'", and 0 or -1 refused
    every image as too large: now the error names the variable. A fraction (2.5) was cut to 2 voxels, every image
    refused as "too large"; it is an error, with the message of the server's --conf max_voxels (one parser)."""
    from lib.configs.conf import ConfError, conf_voxels

    nifti = tmp_path / "small.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 2, sitk.sitkInt16), str(nifti))
    monkeypatch.setenv("ADL_MAX_VOXELS", value)
    with pytest.raises(ValueError) as raised:
        read_volume(nifti)
    assert str(raised.value) == (f"ADL_MAX_VOXELS '{value}': {problem}; give a whole number of voxels >= 1, e.g. 1e9 "
                                 "or 500000000")
    with pytest.raises(ConfError) as conf_raised:
        conf_voxels({"max_voxels": value})
    assert str(conf_raised.value) == str(raised.value).replace("ADL_MAX_VOXELS", "--conf max_voxels")


@pytest.mark.parametrize("value,limit", [("1.5e8", 150_000_000), ("1e9", 1_000_000_000), (" 250000 ", 250_000),
                                         ("2.5e6", 2_500_000), ("1000.0", 1000)])
def test_the_environment_and_the_conf_take_the_same_voxel_limits(monkeypatch, value, limit):
    """ADL_MAX_VOXELS and --conf max_voxels are read by one parser: the same values, the same limits."""
    from lib.configs.conf import conf_voxels
    from lib.imaging import max_voxels

    monkeypatch.setenv("ADL_MAX_VOXELS", value)
    assert max_voxels() == conf_voxels({"max_voxels": value}) == limit


def test_voxel_limit_argument_takes_precedence_over_the_environment(tmp_path, monkeypatch):
    """read_volume(max_voxels=...) (how the server passes its conf setting) overrides ADL_MAX_VOXELS."""
    nifti = tmp_path / "small.nii.gz"
    sitk.WriteImage(sitk.Image(64, 64, 20, sitk.sitkInt16), str(nifti))
    monkeypatch.setenv("ADL_MAX_VOXELS", "10000")
    assert read_volume(nifti, max_voxels=100_000).array.size == 81_920
    monkeypatch.delenv("ADL_MAX_VOXELS")
    for path, voxels in ((nifti, "81,920"), (CT_SMALL, "16,384")):
        with pytest.raises(ImageReadError, match=rf"{voxels} voxels exceeds the limit of 16,000"):
            read_volume(path, max_voxels=16_000)


def _multiframe(path: Path, n_frames: int, declared: int | None = None) -> Path:
    """A legacy multi-frame CT of ``n_frames`` real frames (CT_small's 128 x 128 stored values plus 10 k), whose
    header declares ``declared`` frames (default: as many as it holds)."""
    ds = pydicom.dcmread(CT_SMALL)
    stored = ds.pixel_array.astype(np.int16)
    ds.NumberOfFrames = n_frames if declared is None else declared
    ds.PixelData = np.stack([stored + 10 * k for k in range(n_frames)]).astype("<i2").tobytes()
    ds.save_as(path)
    return path


def _cut_after_pixel_header(path: Path, keep: int) -> Path:
    """``path`` cut ``keep`` bytes into its pixel data: the header whole, the pixels almost all gone."""
    raw = path.read_bytes()
    start = raw.rindex(b"\xe0\x7f\x10\x00OW") + 12  # tag, VR, 2 reserved bytes, 4-byte length
    path.write_bytes(raw[: start + keep])
    return path


def _peak_bytes(function) -> tuple[BaseException | None, int]:
    """(what ``function()`` raised, None if nothing; the peak of Python's allocations while it ran, bytes)."""
    tracemalloc.start()
    try:
        function()
        raised = None
    except Exception as exc:  # noqa: BLE001 - returned for the caller's assertions
        raised = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return raised, peak


def test_a_multiframe_dicom_over_the_limit_is_refused_before_its_pixel_data_is_read(tmp_path, monkeypatch):
    """A multi-frame file was read whole (its pixel data in memory) before Rows x Columns x NumberOfFrames was
    compared with the limit: a huge one was loaded to be refused. The limit is now checked from the header: the
    peak of memory stays far below the pixel data, as a file or as the one file of a folder, with the limit from
    the argument or from ADL_MAX_VOXELS."""
    path = _multiframe(tmp_path / "frames.dcm", 64)
    pixel_bytes = 64 * 128 * 128 * 2
    assert read_volume(path).shape == (64, 128, 128)  # within the default limit
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(path, folder / "frames.dcm")
    expected = r"too large: 64 x 128 x 128 = 1,048,576 voxels exceeds the limit of 100,000"
    for source in (path, folder):
        raised, peak = _peak_bytes(lambda: read_volume(source, max_voxels=100_000))
        assert isinstance(raised, ImageTooLargeError) and re.search(expected, str(raised)), (source, raised)
        assert (raised.shape, raised.voxels, raised.limit) == ((64, 128, 128), 1_048_576, 100_000)
        assert peak < pixel_bytes / 8, (source, peak, pixel_bytes)
    monkeypatch.setenv("ADL_MAX_VOXELS", "100000")
    raised, peak = _peak_bytes(lambda: read_volume(path))
    assert isinstance(raised, ImageTooLargeError) and peak < pixel_bytes / 8, (raised, peak)


def test_the_size_refusal_comes_before_the_pixel_data_is_looked_at(tmp_path):
    """A file over the limit whose pixel data is cut away after the header (as a file, or as slices of a folder) is
    refused for its size, not for its pixels: they are never read. Within the limit, the same files are refused as
    cut, with the sizes."""
    path = _cut_after_pixel_header(_multiframe(tmp_path / "frames.dcm", 8), keep=100)
    with pytest.raises(ImageTooLargeError, match=r"too large: 8 x 128 x 128 = 131,072 voxels exceeds the limit"):
        read_volume(path, max_voxels=100_000)
    with pytest.raises(ImageReadError, match=r"frames.dcm is truncated or corrupt: its header declares 8 x 128 x 128 "
                                             r"voxels \(262,144 bytes of pixel data at 16 bits\), but the file holds "
                                             r"100 bytes") as raised:
        read_volume(path)
    assert not isinstance(raised.value, ImageTooLargeError)
    series = _make_series(tmp_path / "series", n=3)
    for slice_path in series["paths"]:
        _cut_after_pixel_header(slice_path, keep=64)
    with pytest.raises(ImageTooLargeError, match=r"too large: 3 x 128 x 128 = 49,152 voxels exceeds the limit"):
        read_volume(tmp_path / "series", max_voxels=40_000)
    with pytest.raises(ImageReadError, match=r"slice_\d+\.dcm is truncated or corrupt: its header declares "
                                             r"1 x 128 x 128 voxels \(32,768 bytes"):
        read_volume(tmp_path / "series")


def test_the_header_only_size_check_refuses_what_the_reader_refuses_as_too_large(tmp_path):
    """:func:`lib.imaging.io.check_voxels` (a fine-tune request's check of its correction pairs) refuses an image
    over the limit with the reader's own error, from headers alone: a multi-frame DICOM file, a folder's series of
    slices and a NIfTI file, each with its voxel data cut away after the header. Within the limit it refuses them
    as the reader does, as truncated, with the reader's message (it gave their sizes: the request was accepted and
    the run failed on them); intact, it gives their sizes."""
    from lib.imaging.io import check_voxels

    frames = _cut_after_pixel_header(_multiframe(tmp_path / "frames.dcm", 8), keep=100)
    series = _make_series(tmp_path / "series", n=3)
    for slice_path in series["paths"]:
        _cut_after_pixel_header(slice_path, keep=64)
    nifti = tmp_path / "volume.nii"
    sitk.WriteImage(sitk.Image(64, 64, 20, sitk.sitkInt16), str(nifti))
    nifti.write_bytes(nifti.read_bytes()[:2000])
    for path, shape, limit in ((frames, (8, 128, 128), 100_000), (tmp_path / "series", (3, 128, 128), 40_000),
                               (nifti, (64, 64, 20), 80_000)):
        with pytest.raises(ImageTooLargeError) as read:
            read_volume(path, max_voxels=limit)
        with pytest.raises(ImageTooLargeError) as checked:
            check_voxels(path, max_voxels=limit)
        assert str(checked.value) == str(read.value) and checked.value.shape == read.value.shape, (path, checked)
        with pytest.raises(ImageReadError, match="is truncated or corrupt") as read:
            read_volume(path, max_voxels=1_000_000)
        with pytest.raises(ImageReadError) as checked:
            check_voxels(path, max_voxels=1_000_000)
        # a series' files are checked in their listing's order, read in their slice order: either names a cut one
        same = re.sub(r"slice_\d+\.dcm", "slice.dcm", str(checked.value)) == \
            re.sub(r"slice_\d+\.dcm", "slice.dcm", str(read.value))
        assert same, (path, checked.value, read.value)
    intact = _make_series(tmp_path / "intact", n=3)
    assert check_voxels(intact["paths"][0]) == (1, 128, 128) and check_voxels(tmp_path / "intact") == (3, 128, 128)
    sitk.WriteImage(sitk.Image(64, 64, 20, sitk.sitkInt16), str(nifti))
    assert check_voxels(nifti) == (64, 64, 20)
    with pytest.raises(ImageReadError, match="no such"):
        check_voxels(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_the_header_only_check_refuses_compressed_data_cut_short_as_the_reader_does(tmp_path, suffix):
    """A compressed file (gzip NIfTI, gzip NRRD, zlib MetaImage) cut in half passed
    :func:`lib.imaging.io.check_voxels` (its header and the 1100 : 1 bound on its size are fine), and the reader (a
    fine-tune run) failed on it: it is refused, the intact file taken (a gzip file from its trailer, without reading
    the stream), and a NIfTI written as several gzip members (no trailer giving the whole length) taken after its
    stream is read through."""
    import gzip

    from lib.imaging.io import check_voxels

    values = np.random.default_rng(0).normal(0, 100, (12, 64, 64)).astype(np.int16)
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(whole), True)
    assert check_voxels(whole) == (64, 64, 12)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageReadError):
        read_volume(cut)
    with pytest.raises(ImageReadError, match=r"cut\.(nii\.gz|nrrd|mha) is truncated or corrupt"):
        check_voxels(cut)
    if suffix == ".nii.gz":
        raw = gzip.decompress(whole.read_bytes())
        members = tmp_path / "members.nii.gz"
        members.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
        assert check_voxels(members) == (64, 64, 12)


@pytest.mark.parametrize("case,verdict", [
    ("newline", "ok"), ("text", "ok"), ("gzip magic", "ok"), ("members then text", "ok"), ("gzip data unnamed", "ok"),
    ("cut then text", "cut"), ("half then text", "short"), ("corrupt member", "corrupt"),
])
def test_a_nifti_gzip_followed_by_other_bytes_is_read_where_all_its_voxels_are_there(tmp_path, case, verdict):
    """A ``.nii.gz`` whose gzip data is followed by bytes that are no gzip member (a newline, text, a broken member
    a transfer tool appended) was refused as "its gzip stream is broken (Not a gzipped file)", by the upload check
    and the reader alike, though SimpleITK (zlib's gzread) and nibabel read it exactly, and so was a NIfTI stored
    without compression under a ``.nii.gz`` name (gzread reads it as it is). Both are read; what follows the member
    holding the last voxel is never read. A stream cut before its end, a member ending short of the declared voxels,
    a member whose CRC fails (ITK reads its corrupt voxels) are still refused."""
    import gzip

    from lib.imaging.io import check_voxels

    # 1.3 MB of voxels: ITK inflates a smaller file whole when it reads its header, and refuses a bad CRC there
    values = np.random.default_rng(0).normal(0, 100, (40, 128, 128)).astype(np.int16)
    whole = tmp_path / "whole.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(whole), True)
    stream = whole.read_bytes()
    raw = gzip.decompress(stream)
    half = len(raw) // 2
    corrupt = bytearray(stream)
    corrupt[-5000] ^= 0x55  # a bit flipped in the deflate data: it still inflates, to other voxels
    content = {"newline": stream + b"\n", "text": stream + b"checksum 0123abcd\n",
               "gzip magic": stream + b"\x1f\x8b not a member", "gzip data unnamed": raw,
               "members then text": gzip.compress(raw[:half]) + gzip.compress(raw[half:]) + b"\n",
               "cut then text": stream[: len(stream) // 2] + b"\n", "half then text": gzip.compress(raw[:half]) + b"\n",
               "corrupt member": bytes(corrupt)}[case]
    path = tmp_path / "study.nii.gz"
    path.write_bytes(content)
    try:
        read = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        read = None
    if verdict == "ok":
        assert read is not None and np.array_equal(read, values), case
        assert check_voxels(path) == (128, 128, 40)
        assert np.array_equal(read_volume(path, modality="CT").array, values.astype(np.float32))
        return
    assert read is None or not np.array_equal(read, values), case  # what ITK would read is not the image
    words = {"cut": r"its gzip stream is broken \(Compressed file ended before the end-of-stream marker",
             "short": rf"its header declares {values.nbytes:,} bytes of voxels, the file decompresses to "
                      rf"{half - (len(raw) - values.nbytes):,}",
             "corrupt": r"its gzip stream is broken \((CRC check failed|.*incorrect data check)"}[verdict]
    with pytest.raises(ImageReadError, match=r"study\.nii\.gz is truncated or corrupt: " + words):
        read_volume(path, modality="CT")
    if verdict != "corrupt":  # the fine-tune check takes a gzip trailer that gives the declared length as whole
        with pytest.raises(ImageReadError, match=r"study\.nii\.gz is truncated or corrupt: " + words):
            check_voxels(path)


@pytest.mark.parametrize("tail", [b"\x1f\x8b", b"\x1f\x8b\x08\x00" + b"\xff" * 40],
                         ids=["cut member", "corrupt member"])
def test_a_tiny_nifti_gzip_followed_by_a_broken_member_is_refused_as_broken(tmp_path, tail):
    """An image whose header and voxels end inside the first 540 bytes out (a NIfTI-2 header's length, what the
    header checks inflate) followed by a cut or corrupt gzip member: the stream check stopped after the first member
    and passed it, and nibabel then refused it as "cannot work out file type"; it is refused as a broken gzip stream
    by the upload check and the reader alike (ITK inflates so small a file whole)."""
    import gzip

    import nibabel as nib

    from lib.imaging.io import check_voxels

    path = tmp_path / "tiny.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).to_bytes()) + tail)
    for check in (check_voxels, read_volume):
        with pytest.raises(ImageReadError, match=r"tiny\.nii\.gz is truncated or corrupt: its gzip stream is broken"):
            check(path)


_HAND_VALUES = np.random.default_rng(3).normal(0, 50, (20, 64, 64)).astype(np.int16)  # (z, y, x), little-endian


def _nrrd_header(extra: str = "", encoding: str = "gzip") -> bytes:
    return (f"NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 20\nendian: little\nencoding: {encoding}\n"
            f"{extra}").encode()


def _mha_header(extra: str, data_file: str = "LOCAL") -> bytes:
    return ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"CompressedData = True\n{extra}DimSize = 64 64 20\nElementType = MET_SHORT\n"
            f"ElementDataFile = {data_file}\n").encode()


def _hand_written(folder: Path, case: str) -> Path:
    """A file written by hand as other tools write it (SimpleITK reads them all: the ``ok`` cases exactly)."""
    import gzip
    import zlib

    data = _HAND_VALUES.tobytes()
    members = gzip.compress(data[:30000]) + gzip.compress(data[30000:])
    long_header = "".join(f"key{k}:={'v' * 100}\n" for k in range(700))  # ~75 KiB: past the 64 KiB read of a header
    files: dict[str, bytes] = {
        # several gzip members (pigz, bgzip, a file appended to): NRRD's reader reads on through them
        "members.nrrd": _nrrd_header("\n") + members,
        "members.nhdr": _nrrd_header("data file: members.raw.gz\n\n"), "members.raw.gz": members,
        # bytes after the gzip data that start no gzip member (a newline an editor added): the reader ignores them
        "trailing.nrrd": _nrrd_header("\n") + gzip.compress(data) + b"\n",
        # MetaIO inflates zlib and gzip data alike
        "gzip.mhd": _mha_header("", "gzip.zraw"), "gzip.zraw": gzip.compress(data),
        "gzip.mha": _mha_header(f"CompressedDataSize = {len(gzip.compress(data))}\n") + gzip.compress(data),
        # line skip: lines of the data file before its gzip data
        "skip.nhdr": _nrrd_header("line skip: 2\ndata file: skip.raw.gz\n\n"),
        "skip.raw.gz": b"line one\ntext\n" + gzip.compress(data) + b"\n",
        "skip_cut.nhdr": _nrrd_header("line skip: 2\ndata file: skip_cut.raw.gz\n\n"),
        "skip_cut.raw.gz": b"line one\ntext\n" + gzip.compress(data)[:-3000],
        # a header over 64 KiB: its data file named past 64 KiB (raw), its byte skip (gzip attached)
        "long.nhdr": _nrrd_header(long_header + "data file: long.raw\n\n", encoding="raw"), "long.raw": data,
        "long.nrrd": _nrrd_header("byte skip: 10\n" + long_header + "\n") + gzip.compress(b"\0" * 10 + data) + b"\n",
        # encoding gzip, data stored raw: NRRD's reader reads it as it is (not this check's to judge)
        "plain.nrrd": _nrrd_header("\n") + data,
        # cut: the second gzip member, a zlib stream
        "members_cut.nrrd": _nrrd_header("\n") + members[:-2000],
        "zlib_cut.mha": _mha_header("") + zlib.compress(data)[:-2000],
        "gzip_cut.mha": _mha_header("") + gzip.compress(data)[:-2000],
        # a whole zlib stream of half the voxels: SimpleITK reads the rest as zeros
        "zlib_short.mha": _mha_header(f"CompressedDataSize = {len(zlib.compress(data[:81920]))}\n")
        + zlib.compress(data[:81920]),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder / case


@pytest.mark.parametrize("case,verdict", [
    ("members.nrrd", "ok"), ("members.nhdr", "ok"), ("trailing.nrrd", "ok"), ("gzip.mhd", "ok"), ("gzip.mha", "ok"),
    ("skip.nhdr", "ok"), ("long.nhdr", "ok"), ("long.nrrd", "ok"), ("plain.nrrd", "ok"),
    ("skip_cut.nhdr", "cut"), ("members_cut.nrrd", "cut"), ("zlib_cut.mha", "cut"),
    ("gzip_cut.mha", "cut"),
])
def test_the_header_only_check_takes_what_simpleitk_reads_and_refuses_what_is_cut(tmp_path, case, verdict):
    """:func:`lib.imaging.io.check_voxels` (a fine-tune request's check) refused valid files, and one refused file
    made every ``POST /train`` a 422: NRRD gzip data in several members (it stopped at the first), followed by a
    newline, or stored raw (it would not parse where the check looked); MetaImage data gzip-wrapped (zlib only was
    taken); a NRRD data file's ``line skip`` (ignored) and a header over 64 KiB (the data placed inside it). Each is
    taken as SimpleITK reads it, exactly; data cut short (a gzip member, a zlib stream, after skipped lines) is still
    refused, and SimpleITK does not read it whole (the cut ``.mha`` files, which give no CompressedDataSize, in a new
    process: ITK leaves their voxels as its memory held, in this process often the image)."""
    from lib.imaging.io import check_voxels

    path = _hand_written(tmp_path, case)
    if verdict == "ok":
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), _HAND_VALUES), case
        assert check_voxels(path) == (64, 64, 20)
    elif path.suffix == ".mha":
        assert _itk_reads_exactly_in_a_new_process([path], _HAND_VALUES) == [False], case
    else:
        with pytest.raises(RuntimeError, match="expected 163840 bytes"):  # NRRD's reader fails on it
            sitk.ReadImage(str(path))
    if verdict == "cut":
        with pytest.raises(ImageReadError, match="is truncated or corrupt"):
            check_voxels(path)


def test_a_metaimage_whose_compressed_data_is_short_is_refused_not_read_as_zeros(tmp_path):
    """SimpleITK reads a MetaImage whose zlib data inflates to fewer voxels than its header declares as zeros (only
    "Uncompress failed" on stderr) or other bytes: denoise, uploads and the server read such a file as an image whose
    second half is not its own. It is refused, naming the bytes declared and held."""
    path = _hand_written(tmp_path, "zlib_short.mha")
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert np.array_equal(read[:10], _HAND_VALUES[:10]) and not np.array_equal(read[10:], _HAND_VALUES[10:])
    with pytest.raises(ImageReadError, match=r"zlib_short\.mha is truncated or corrupt: its header declares 163,840 "
                                             r"bytes of voxels, its compressed data decompresses to 81,920"):
        read_volume(path)


def _itk_reads_exactly_in_a_new_process(paths: list[Path], values: np.ndarray) -> list[bool]:
    """Whether SimpleITK reads each of ``paths`` (in that order) as ``values``, in a new process that is given only
    their SHA-256: where ITK leaves voxels uninitialised, they cannot be the image by chance there. In this process
    they often are: memory freed by an earlier read, or by the copy SimpleITK made to write the file, held it."""
    import hashlib
    import subprocess
    import sys

    code = ("import hashlib, sys, numpy as np, SimpleITK as sitk\n"
            "for path in sys.argv[2:]:\n"
            "    try:\n"
            "        read = np.ascontiguousarray(sitk.GetArrayFromImage(sitk.ReadImage(path)))\n"
            "        print(int(hashlib.sha256(read.tobytes()).hexdigest() == sys.argv[1]))\n"
            "    except RuntimeError:\n"
            "        print(0)\n")
    digest = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
    done = subprocess.run([sys.executable, "-c", code, digest, *map(str, paths)], capture_output=True, text=True,
                          check=True)
    return [line == "1" for line in done.stdout.split()]


def test_a_metaimage_whose_inline_compressed_data_has_no_size_is_refused_not_read_as_garbage(tmp_path):
    """A ``.mha`` file SimpleITK wrote compressed, its ``CompressedDataSize`` line then removed (other tools leave it
    out), set to 0, spelt in lower case (MetaIO reads its keys case included) or to half the data, passed every
    check, and ITK's MetaIO read it as garbage: without a size it inflates the file from its header text, which
    fails at once, and leaves every voxel as the memory it allocated held; with half, the second half. Each is
    refused, naming the line to write (the size to give), and read exactly once it is written; a size larger than
    the data (ITK: "No such file or directory") or negative (ITK: bad_alloc) is refused naming it, and so is
    compressed data that does not inflate (ITK keeps what it had). A size that
    leaves out only the end of the stream (its Adler-32) is read exactly by ITK, and taken. A ``.mhd`` header
    without it is read right (MetaIO takes its data file's size) and is taken."""
    from lib.imaging.io import check_voxels

    values = np.random.default_rng(0).normal(0, 100, (12, 64, 64)).astype(np.int16)
    for suffix in (".mha", ".mhd"):
        sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / f"written{suffix}"), True)
    written = (tmp_path / "written.mha").read_bytes()
    size_line = re.search(rb"CompressedDataSize = (\d+)\n", written)
    size = int(size_line.group(1))  # SimpleITK writes nothing after the compressed data: all the bytes after it
    unusable = "cannot be read as it is: its header says CompressedData = True but "
    add = rf"add the line 'CompressedDataSize = {size}' to its header"
    short = (rf"cannot be read as it is: its header gives CompressedDataSize = {size // 2}, but its compressed data "
             rf"is longer: ITK's MetaImage reader inflates only those {size // 2:,} bytes, to [\d,]+ of the "
             rf"{values.nbytes:,} bytes of voxels its header declares, and reads the rest as garbage; set it to {size}")
    cases = {  # name: (size line, refusal)
        "no size": (b"", unusable + r"gives no CompressedDataSize, .*" + add),
        "size 0": (b"CompressedDataSize = 0\n", unusable + r"gives CompressedDataSize = '0', not a number of bytes "
                   r"above 0, .*" + add),
        "lower case": (b"compresseddatasize = %d\n" % size, unusable + r"spells its size 'compresseddatasize', which "
                       r"MetaIO does not read \(it reads 'CompressedDataSize', case included\), .*" + add),
        "half": (b"CompressedDataSize = %d\n" % (size // 2), short),
        "negative": (b"CompressedDataSize = -5\n", unusable + r"gives CompressedDataSize = '-5', not a number.*"
                     + add),
        "over": (b"CompressedDataSize = %d\n" % (size + 1), rf"cannot be read: its header gives CompressedDataSize = "
                 rf"{size + 1}, but only {size:,} bytes follow its header \(a cut copy, or a wrong size: ITK's "
                 rf"MetaImage reader fails on it\); if the image is whole, set it to {size}"),
        "corrupt": (size_line.group(0), r"is truncated or corrupt: its compressed data does not inflate \(Error -3 "
                    rf"while decompressing data: [^)]+\) to the {values.nbytes:,} bytes of voxels its header declares"),
        "no Adler-32": (b"CompressedDataSize = %d\n" % (size - 4), None),
        "no spaces": (b"CompressedDataSize=%d\n" % size, None),
    }
    paths = {}
    for name, (line, refusal) in cases.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.mha"
        paths[name].write_bytes(written.replace(size_line.group(0), line))
    corrupt = bytearray(paths["corrupt"].read_bytes())
    corrupt[-size + 100:-size + 108] = b"\xff" * 8  # 100 bytes into the compressed data (ITK: "Uncompress failed")
    paths["corrupt"].write_bytes(bytes(corrupt))
    garbage, taken = ["no size", "size 0", "lower case", "half"], ["no Adler-32", "no spaces"]
    # the garbage first: an exact read before it would leave the image in the new process's memory
    assert _itk_reads_exactly_in_a_new_process([paths[k] for k in garbage + taken], values) == [False] * 4 + [True] * 2
    for name, (line, refusal) in cases.items():
        if refusal is None:
            assert np.array_equal(read_volume(paths[name], modality="CT").array, values.astype(np.float32)), name
            assert check_voxels(paths[name]) == (64, 64, 12), name
            continue
        words = re.escape(paths[name].name) + " " + refusal
        with pytest.raises(ImageReadError, match=words):
            read_volume(paths[name], modality="CT")
        with pytest.raises(ImageReadError, match=words):
            check_voxels(paths[name])
    unsized = paths["no size"]
    with pytest.raises(ImageReadError) as refused:
        check_voxels(unsized)
    added = re.search(r"add the line '([^']+)'", str(refused.value)).group(1)
    unsized.write_bytes(unsized.read_bytes().replace(b"ElementDataFile", f"{added}\nElementDataFile".encode(), 1))
    assert np.array_equal(read_volume(unsized, modality="CT").array, values.astype(np.float32))
    header = (tmp_path / "written.mhd").read_text()
    (tmp_path / "unsized.mhd").write_text(re.sub(r"CompressedDataSize = \d+\n", "", header))
    assert "CompressedDataSize" not in (tmp_path / "unsized.mhd").read_text()
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "unsized.mhd"))), values)
    assert np.array_equal(read_volume(tmp_path / "unsized.mhd", modality="CT").array, values.astype(np.float32))
    assert check_voxels(tmp_path / "unsized.mhd") == (64, 64, 12)


def test_a_metaimage_size_without_the_adler32_is_taken_where_the_voxels_end_just_past_a_mib(tmp_path):
    """A ``.mha`` file SimpleITK wrote compressed, its ``CompressedDataSize`` then lowered by 4 (the Adler-32 left
    out, which ITK's MetaIO reads exactly), was refused ("inflates only those ... bytes, to 7,340,032 of the
    7,340,060 ... set it to ...") where its voxels end a few bytes past a 1 MiB boundary inside the stream's last
    match: the check inflates 1 MiB a call, and called the data cut when its bytes ran out with zlib still holding
    the last voxels. Both volumes here land there (checked); both are read exactly and taken."""
    import zlib

    from lib.imaging.io import check_voxels

    noisy = np.full((370, 91, 109), -1024, np.int16)  # 7 MiB + 28 bytes: air, a few noise rows at the start
    noisy[:1, :10] = np.random.default_rng(0).normal(40, 30, (1, 10, 109)).astype(np.int16)
    volumes = {"noisy": noisy, "air": np.full((5, 113, 928), -1024, np.int16)}  # 1 MiB + 64 bytes
    for name, values in volumes.items():
        path = tmp_path / f"{name}.mha"
        sitk.WriteImage(sitk.GetImageFromArray(values), str(path), True)
        written = path.read_bytes()
        size_line = re.search(rb"CompressedDataSize = (\d+)\n", written)
        size = int(size_line.group(1))
        path.write_bytes(written.replace(size_line.group(0), b"CompressedDataSize = %d\n" % (size - 4)))
        # it lands on the boundary: all its bytes in, 1 MiB out a call, zlib still holds voxels
        inflater, out = zlib.decompressobj(), 0
        pending = written[-size:-4]
        while pending:
            out += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
        assert out < values.nbytes and out + len(inflater.decompress(b"")) == values.nbytes, name
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), values), name
        assert np.array_equal(read_volume(path, modality="CT").array, values.astype(np.float32)), name
        assert check_voxels(path) == values.shape[::-1], name


@pytest.mark.parametrize("case,words", [
    ("cut", r"is truncated or corrupt: its header declares 4 x 128 x 128 voxels \(131,072 bytes of pixel data at "
            r"16 bits\), but the file holds 111,072 bytes \(a cut copy, or NumberOfFrames / Rows / Columns are "
            r"wrong\)"),
    ("more frames declared", r"is truncated or corrupt: its header declares 6 x 128 x 128 voxels \(196,608 bytes "
                             r"of pixel data at 16 bits\), but its pixel data element holds 131,072 bytes"),
    ("fewer frames declared", r"is corrupt: its pixel data holds 131,072 bytes, 1 whole frame\(s\) more than its "
                              r"header declares \(3 x 128 x 128 voxels, 98,304 bytes\): NumberOfFrames \(or Rows / "
                              r"Columns\) is wrong, and reading it would leave frames out"),
])
def test_a_multiframe_whose_pixel_data_disagrees_with_its_header_is_refused_naming_both(tmp_path, case, words):
    """Pixel data shorter than its header declares (a cut copy, a NumberOfFrames too large) was a pydicom decoder
    message; longer by a whole frame (NumberOfFrames too small) was read without the last frame, which pydicom drops
    as "excess padding" with a warning. Both are refused from the header and the element's length, naming the
    declared shape and the bytes there are."""
    path = tmp_path / "frames.dcm"
    if case == "cut":
        _cut_after_pixel_header(_multiframe(path, 4), keep=131_072 - 20_000)
    else:
        _multiframe(path, 4, declared=6 if case == "more frames declared" else 3)
    with pytest.raises(ImageReadError, match=words) as raised:
        read_volume(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_slice_holding_a_second_frame_is_refused_not_read_without_it(tmp_path):
    """A slice of a series whose pixel data holds two frames (NumberOfFrames missing) was read as its first frame,
    the second dropped as padding; it is refused, naming the slice."""
    series = _make_series(tmp_path / "series", n=3)
    ds = pydicom.dcmread(series["paths"][1])
    ds.PixelData = ds.PixelData * 2
    ds.save_as(series["paths"][1])
    with pytest.raises(ImageReadError, match=rf"{series['paths'][1].name} is corrupt: its pixel data holds 65,536 "
                                             r"bytes, 1 whole frame\(s\) more than its header declares"):
        read_volume(tmp_path / "series")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", "uncompressed .nii.gz"])
def test_a_scaled_uint8_nifti_is_read_and_a_cut_one_refused(tmp_path, suffix):
    """A NIfTI file stores uint8 with scl_slope 2: ITK reads it as float32, but the file holds one byte per voxel. The
    size check must count the stored bytes (it once refused the real held-out MR as truncated), and still refuse
    the same file cut short. So for a NIfTI stored uncompressed under a ``.nii.gz`` name (ITK reads it): nibabel
    refused it by its name, and it was refused as "truncated"."""
    import gzip

    from lib.imaging.io import check_voxels

    nibabel = pytest.importorskip("nibabel")
    uncompressed = suffix.startswith("uncompressed")
    suffix = suffix.split()[-1]
    data = (np.arange(32 * 40 * 24) % 251).astype(np.uint8).reshape(32, 40, 24)
    image = nibabel.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    image.header.set_slope_inter(2.0, 0.0)
    path = tmp_path / f"scaled{suffix}"
    nibabel.save(image, str(path))
    if uncompressed:
        path.write_bytes(gzip.decompress(path.read_bytes()))
    volume = read_volume(path, modality="MR")
    assert volume.array.shape == (24, 40, 32)
    assert check_voxels(path) == (32, 40, 24)
    assert float(volume.array.max()) == 2.0 * 250
    cut = tmp_path / f"cut{suffix}"
    raw = path.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt|cannot read"):
        read_volume(cut, modality="MR")


def test_derived_series_says_what_made_it_and_keeps_its_suffix_after_a_long_description(tmp_path):
    """A derived series must read as derived in a PACS list: the suffix survives a 64-character original
    description (the original is cut), and DerivationDescription names the method and weights it came from."""
    long_description = "CT ABDOMEN PELVIS W CONTRAST PORTAL VENOUS 1.0 B30f iDose 3 AX!!"
    assert len(long_description) == 64
    series = _make_series(tmp_path / "in", n=3, description=long_description)
    volume = read_volume(tmp_path / "in")
    derivation = denoising_derivation("tddl_gcn", "file:pretrained_tddl_gcn_ct.pt", "ab" * 32, 0.6)
    out = write_volume(volume.with_array(volume.array + 1.0), tmp_path / "out",
                       series_description_suffix=" [denoised tddl_gcn]", derivation=derivation)
    for path in sorted(out.iterdir()):
        ds = pydicom.dcmread(path)
        assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.endswith(" [denoised tddl_gcn]")
        assert ds.SeriesDescription.startswith("CT ABDOMEN PELVIS")
        assert ds.DerivationDescription == (
            "Denoised with tddl_gcn (weights file:pretrained_tddl_gcn_ct.pt sha256 abababababababab; low-frequency "
            f"restoration 0.6 px) from series {series['uid']}")
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"] and ds.ImageType[-1] == "DENOISED"
    assert denoising_derivation("bm3d") == "Denoised with bm3d"


def test_header_modality_is_what_read_volume_gives_read_from_headers_alone(tmp_path):
    """The review queue reads an oversized study's modality with :func:`header_modality`: a DICOM file's or
    single-series folder's Modality, as :func:`read_volume` gives it, without its pixel data; None where the values
    decide it (NIfTI) or the headers do not tell (a folder of two series)."""
    from lib.imaging.dicom_read import probe_dicom_header
    from lib.imaging.io import header_modality

    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    assert header_modality(ct) == read_volume(ct).modality == "CT"
    header, problem = probe_dicom_header(Path(ct))  # the public header read header_modality uses
    assert problem is None and header.Modality == "CT" and "PixelData" not in header
    one = tmp_path / "one_series"
    one.mkdir()
    shutil.copy(mr, one / "a.dcm")
    assert header_modality(one) == read_volume(one).modality == "MR"
    two = tmp_path / "two_series"
    two.mkdir()
    shutil.copy(mr, two / "a.dcm")
    shutil.copy(ct, two / "b.dcm")
    assert header_modality(two) is None
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.ReadImage(ct), str(nifti))
    assert header_modality(nifti) is None and read_volume(nifti).modality == "CT"


def _rle_multiframe(path: Path, n_frames: int, declared: int | None = None, table: str = "basic",
                   fragments: int = 1) -> Path:
    """:func:`_multiframe`'s ``n_frames`` frames compressed by pydicom's RLE Lossless encoder, ``fragments``
    fragments a frame, with a Basic Offset Table (``table`` "basic"), an Extended one ("extended": the Basic one
    empty) or none ("none"); the header declares ``declared`` frames (default: as many as it holds)."""
    import struct

    from pydicom.encaps import decode_data_sequence, encapsulate, get_frame_offsets
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(_multiframe(path, n_frames))
    ds.compress(RLELossless, encapsulate_ext=table == "extended")
    if table == "none" or fragments > 1:
        frames = decode_data_sequence(ds.PixelData)
        ds.PixelData = encapsulate(frames, fragments_per_frame=fragments, has_bot=table == "basic")
        if table == "extended":  # the frames' starts as a Basic table would list them (the same bytes follow it)
            listed = DicomBytesIO(encapsulate(frames, fragments_per_frame=fragments))
            listed.is_little_endian = True
            offsets = get_frame_offsets(listed)[1]
            ds.ExtendedOffsetTable = struct.pack(f"<{len(offsets)}Q", *offsets)
            ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(frames)}Q", *(len(f) for f in frames))
    if declared is not None:
        ds.NumberOfFrames = declared
    ds.save_as(path)
    return path


def _without_last_fragment(path: Path) -> Path:
    """``path`` cut at the item tag of its last fragment: that frame's bytes and the sequence delimiter gone, every
    other fragment whole (a copy cut at a fragment's boundary)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.rindex(b"\xfe\xff\x00\xe0")])
    return path


@pytest.mark.parametrize("table", ["basic", "extended", "none"])
def test_compressed_pixel_data_with_fewer_frames_than_declared_is_refused_naming_both(tmp_path, table):
    """The check of the pixel data's length covered uncompressed data only: an RLE Lossless multi-frame file cut
    at a frame's fragment read as "a DICOM file without pixel data" (or the reshape error of the decoder), one whose
    NumberOfFrames is larger than its frames as "cannot reshape array"; with an offset table listing more frames than
    declared, the decoder would return the first ones. The frames are counted from the offset table (Basic or
    Extended), or from the fragments without one, never decoded, and a file holding fewer is refused naming the
    frames declared and those there; a whole file reads as its uncompressed twin."""
    whole = _rle_multiframe(tmp_path / "whole.dcm", 4, table=table)
    assert np.array_equal(read_volume(whole).array, read_volume(_multiframe(tmp_path / "raw.dcm", 4)).array)
    counted = (r"holds 3 whole fragment\(s\)" if table == "none" else
               r"holds 3 whole frame\(s\) of the 4 its offset table lists")
    cut = _without_last_fragment(_rle_multiframe(tmp_path / "cut.dcm", 4, table=table))
    with pytest.raises(ImageReadError, match=r"cut.dcm is truncated or corrupt: its header declares 4 frame\(s\) "
                                             r"\(4 x 128 x 128 voxels\), but its compressed \(RLE Lossless\) pixel "
                                             rf"data {counted}.*\(a cut copy, or NumberOfFrames is wrong\)"):
        read_volume(cut)
    more = _rle_multiframe(tmp_path / "more.dcm", 4, declared=5, table=table)
    with pytest.raises(ImageReadError, match=r"more.dcm is truncated or corrupt: its header declares 5 frame\(s\) "
                                             r"\(5 x 128 x 128 voxels\), but its compressed \(RLE Lossless\) pixel "
                                             r"data holds 4 whole"):
        read_volume(more)
    if table != "none":  # without a table the fragments of 3 frames may be 4: left to the decoder
        fewer = _rle_multiframe(tmp_path / "fewer.dcm", 4, declared=3, table=table)
        with pytest.raises(ImageReadError, match=r"fewer.dcm is corrupt: its compressed \(RLE Lossless\) pixel data "
                                                 r"holds 4 frames by its offset table, 1 more than its header "
                                                 r"declares \(3 x 128 x 128 voxels\)"):
            read_volume(fewer)


def _without_delimiter(path: Path) -> Path:
    """``path`` cut at its pixel data's Sequence Delimitation Item (FFFE,E0DD): every fragment whole, the file ending
    without the delimiter (and whatever followed it)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.rindex(b"\xfe\xff\xdd\xe0")])
    return path


@pytest.mark.parametrize("table", ["basic", "none"])
@pytest.mark.parametrize("cut", ["delimiter", "last fragment"])
def test_compressed_pixel_data_ending_without_its_delimiter_is_refused_naming_the_frames(tmp_path, cut, table):
    """A multi-frame RLE file of 3 frames, 2 fragments a frame, that ends before its Sequence Delimitation Item
    (only the delimiter cut off, or the last fragment with it) was counted as holding its last frame whole; pydicom
    then dropped the whole pixel data and the read failed as "a DICOM file without pixel data". The file is refused
    as truncated, naming the frames declared and those whole (the last frame's end is the delimiter); as a slice
    of a folder too. The whole file reads as its uncompressed twin (its table says where each frame starts), or is
    refused naming why without a table (the RLE decoder took each fragment for a frame: a message about segment
    lengths)."""
    whole = _rle_multiframe(tmp_path / "whole.dcm", 3, table=table, fragments=2)
    if table == "basic":
        assert np.array_equal(read_volume(whole).array, read_volume(_multiframe(tmp_path / "raw.dcm", 3)).array)
    else:
        with pytest.raises(ImageReadError, match=r"whole.dcm cannot be read: its compressed \(RLE Lossless\) pixel "
                                                 r"data holds 6 fragments for the 3 frames its header declares "
                                                 r"\(3 x 128 x 128 voxels\) and no offset table: RLE Lossless puts "
                                                 r"each frame in one fragment"):
            read_volume(whole)
    path = _rle_multiframe(tmp_path / "cut.dcm", 3, table=table, fragments=2)
    _without_delimiter(path) if cut == "delimiter" else _without_last_fragment(path)
    counted = (rf"holds {6 if cut == 'delimiter' else 5} whole fragment\(s\)" if table == "none" else
               r"holds 2 whole frame\(s\) of the 3 its offset table lists")
    with pytest.raises(ImageReadError, match=r"cut.dcm is truncated or corrupt: its header declares 3 frame\(s\) "
                                             r"\(3 x 128 x 128 voxels\), but its compressed \(RLE Lossless\) pixel "
                                             rf"data {counted}.*; it ends without its sequence delimiter \(FFFE,E0DD\).*"
                                             r"\(a cut copy"):
        read_volume(path)
    if cut == "delimiter" and table == "basic":
        from pydicom.uid import RLELossless

        series = _make_series(tmp_path / "series", n=3)
        for slice_path in series["paths"]:
            ds = pydicom.dcmread(slice_path)
            ds.compress(RLELossless)
            ds.save_as(slice_path)
        _without_delimiter(series["paths"][1])
        with pytest.raises(ImageReadError, match=rf"{series['paths'][1].name} is truncated or corrupt: its header "
                                                 r"declares 1 frame\(s\) \(1 x 128 x 128 voxels\), but its "
                                                 r"compressed \(RLE Lossless\) pixel data holds 0 whole frame\(s\) "
                                                 r"of the 1 its offset table lists; it ends without its sequence "
                                                 r"delimiter"):
            read_volume(tmp_path / "series")


def test_a_compressed_slice_without_its_fragment_is_refused_naming_it(tmp_path):
    """A slice of a series whose compressed pixel data lost its one fragment (a copy cut at it) is refused naming
    the slice and what its header declares, as a cut uncompressed slice is."""
    from pydicom.uid import RLELossless

    series = _make_series(tmp_path / "series", n=3)
    for path in series["paths"]:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert read_volume(tmp_path / "series").shape == (3, 128, 128)
    _without_last_fragment(series["paths"][1])
    with pytest.raises(ImageReadError, match=rf"{series['paths'][1].name} is truncated or corrupt: its header "
                                             r"declares 1 frame\(s\) \(1 x 128 x 128 voxels\), but its compressed "
                                             r"\(RLE Lossless\) pixel data holds 0 whole frame"):
        read_volume(tmp_path / "series")


def _fragment_items(path: Path) -> list[tuple[int, int]]:
    """(file position of the item tag, value length) of each item of ``path``'s encapsulated pixel data, the Basic
    Offset Table first, read from the bytes as they lie (not through pydicom)."""
    import struct

    raw = path.read_bytes()
    # the pixel data's tag, VR (OB or OW), 2 reserved bytes and undefined length
    position = re.search(rb"\xe0\x7f\x10\x00O[BW]\x00\x00\xff\xff\xff\xff", raw).end()
    items = []
    while raw[position:position + 4] == b"\xfe\xff\x00\xe0":
        length = struct.unpack("<I", raw[position + 4:position + 8])[0]
        items.append((position, length))
        position += 8 + length
    return items


@pytest.mark.parametrize("table", ["basic", "extended"])
def test_compressed_frames_in_several_fragments_are_read_by_their_offset_table(tmp_path, table):
    """An RLE multi-frame file of 4 frames, 2 fragments a frame (3 with the Extended Offset Table), passed the frame
    check and failed in pydicom's RLE decoder, which takes each fragment for a frame ("The amount of decoded RLE
    segment data doesn't match"). The fragments of each frame are joined where the Basic or Extended Offset Table
    says the frames start, and the file reads as its uncompressed twin; the frames are counted by the table (one
    more declared than listed, or the last fragment cut off: refused naming both), and a table whose frame start is
    not a fragment's is refused as corrupt, naming the frame and the table (Basic or Extended: which one was
    wrong was not said)."""
    import struct

    fragments = 2 if table == "basic" else 3
    whole = _rle_multiframe(tmp_path / "whole.dcm", 4, table=table, fragments=fragments)
    assert len(_fragment_items(whole)) == 1 + 4 * fragments
    assert ("ExtendedOffsetTable" in pydicom.dcmread(whole)) == (table == "extended")
    assert np.array_equal(read_volume(whole).array, read_volume(_multiframe(tmp_path / "raw.dcm", 4)).array)
    more = _rle_multiframe(tmp_path / "more.dcm", 4, declared=5, table=table, fragments=fragments)
    with pytest.raises(ImageReadError, match=r"more.dcm is truncated or corrupt: its header declares 5 frame\(s\) "
                                             r"\(5 x 128 x 128 voxels\), but its compressed \(RLE Lossless\) pixel "
                                             r"data holds 4 whole frame\(s\) of the 4 its offset table lists"):
        read_volume(more)
    cut = _without_last_fragment(_rle_multiframe(tmp_path / "cut.dcm", 4, table=table, fragments=fragments))
    with pytest.raises(ImageReadError, match=r"cut.dcm is truncated or corrupt: its header declares 4 frame\(s\) "
                                             r"\(4 x 128 x 128 voxels\), but its compressed \(RLE Lossless\) pixel "
                                             r"data holds 3 whole frame\(s\) of the 4 its offset table lists; it ends "
                                             r"without its sequence delimiter"):
        read_volume(cut)
    wrong = _rle_multiframe(tmp_path / "wrong.dcm", 4, table=table, fragments=fragments)
    ds = pydicom.dcmread(wrong)
    if table == "extended":
        offsets = list(struct.unpack("<4Q", ds.ExtendedOffsetTable))
        ds.ExtendedOffsetTable = struct.pack("<4Q", *offsets[:2], offsets[2] + 2, offsets[3])
        ds.save_as(wrong)
    else:  # the third entry of the Basic table 2 bytes on: inside the third frame's first fragment
        raw = bytearray(wrong.read_bytes())
        entry = _fragment_items(wrong)[0][0] + 8 + 4 * 2
        raw[entry:entry + 4] = struct.pack("<I", struct.unpack("<I", raw[entry:entry + 4])[0] + 2)
        wrong.write_bytes(bytes(raw))
    named = "Extended Offset Table" if table == "extended" else "Basic Offset Table"
    with pytest.raises(ImageReadError, match=rf"wrong.dcm is corrupt: its {named} puts frame 3 of 4 at byte "
                                             r"\d+, not at the start of a fragment of its compressed pixel data "
                                             r"after the previous frame's"):
        read_volume(wrong)


def _split_frames(source: Path, path: Path, table: bool = True, repeat: int = 1, declared: int | None = None,
                  damaged: int | None = None) -> Path:
    """``source``'s compressed frames (all of them ``repeat`` times over) written to ``path`` 2 fragments a frame,
    with a Basic Offset Table or none; frame ``damaged`` (0-based) without its first 2 bytes (its codestream's
    start marker) made 00 00; the header declares ``declared`` frames (default: as many as it holds)."""
    from pydicom.encaps import decode_data_sequence, encapsulate

    ds = pydicom.dcmread(source)
    frames = decode_data_sequence(ds.PixelData) * repeat
    if damaged is not None:
        frames[damaged] = b"\x00\x00" + frames[damaged][2:]
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=table)
    ds.NumberOfFrames = len(frames) if declared is None else declared
    ds.save_as(path)
    return path


def test_jpeg_ls_frames_in_several_fragments_are_read_by_their_offset_table(tmp_path):
    """A 10-frame JPEG-LS MR whose frames each lie in 2 fragments, listed by its Basic Offset Table, failed: GDCM's
    handler took each fragment for a frame, pylibjpeg has no JPEG-LS plugin here ("'pylibjpeg-libjpeg' plugin is
    not installed"). With each frame's fragments joined it reads as the file of one fragment a frame."""
    source = _pydicom_data("emri_small_jpeg_ls_lossless.dcm")
    split = _split_frames(source, tmp_path / "split.dcm")
    assert len(_fragment_items(split)) == 1 + 10 * 2
    np.testing.assert_array_equal(read_volume(split).array, read_volume(source).array)


@pytest.mark.parametrize("name", ["emri_small_jpeg_ls_lossless.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_jpeg_frames_in_several_fragments_without_an_offset_table_are_read_by_their_start_markers(tmp_path, name):
    """The JPEG-LS MR of 10 frames, 2 fragments a frame, without an offset table still failed as "'pylibjpeg-libjpeg'
    plugin is not installed" (JPEG 2000 read through pylibjpeg's search for end markers). Each frame's codestream
    begins with its codec's start marker (FFD8, FF4F): where the fragments that begin with it are one a frame, the
    first among them, each frame's fragments are joined and the file reads as its source. Where they are not
    (NumberOfFrames one too few or too many, a frame's start marker damaged; the first frame's with NumberOfFrames
    one too few: one a frame, but not the first fragment among them), the file is refused naming why, not left to a
    decoder's message (or read with the first frame's fragments left out)."""
    source = _pydicom_data(name)
    split = _split_frames(source, tmp_path / "split.dcm", table=False)
    assert len(_fragment_items(split)) == 1 + 10 * 2 and _fragment_items(split)[0][1] == 0  # an empty table
    np.testing.assert_array_equal(read_volume(split).array, read_volume(source).array)
    marker = (r"a start of image marker \(FFD8\)" if "jpeg_ls" in name else
              r"a start of codestream marker \(FF4F\) or a JP2 signature box")
    for declared, damaged, begin in ((9, None, "10"), (11, None, "10"), (10, 3, "9"), (9, 0, "9")):
        path = _split_frames(source, tmp_path / "wrong.dcm", table=False, declared=declared, damaged=damaged)
        first = ", not the first one" if damaged == 0 else ""
        with pytest.raises(ImageReadError, match=rf"wrong.dcm cannot be read: its compressed \(.*\) pixel data holds "
                                                 rf"20 fragments for the {declared} frames its header declares "
                                                 rf"\({declared} x 64 x 64 voxels\) and no offset table, and {begin} "
                                                 rf"of its fragments begin with {marker}, as each frame does{first}: "
                                                 r"where each frame starts is unknown"):
            read_volume(path)


def test_frames_whose_starts_are_unknown_are_refused_before_the_pixel_data_is_read(tmp_path):
    """An offset table entry that is not a fragment's start was refused only when the fragments were joined, after
    the whole pixel data had been read. The header check, which walks the fragments' items without reading them
    (their first 4 bytes apart), now refuses it, and JPEG fragments without a table whose start markers are not one
    a frame: a JPEG-LS file of 200 frames in 400 fragments is refused with the peak of memory far below its pixel
    data, whether its third frame's table entry is 2 bytes off or its header declares 199 frames."""
    import struct

    source = _pydicom_data("emri_small_jpeg_ls_lossless.dcm")
    wrong = _split_frames(source, tmp_path / "wrong.dcm", repeat=20)
    raw = bytearray(wrong.read_bytes())
    entry = _fragment_items(wrong)[0][0] + 8 + 4 * 2  # the third entry of the Basic table 2 bytes on
    raw[entry:entry + 4] = struct.pack("<I", struct.unpack("<I", raw[entry:entry + 4])[0] + 2)
    wrong.write_bytes(bytes(raw))
    unmarked = _split_frames(source, tmp_path / "unmarked.dcm", table=False, repeat=20, declared=199)
    for path, expected in ((wrong, r"wrong.dcm is corrupt: its Basic Offset Table puts frame 3 of 200 at byte \d+, not at "
                                   r"the start of a fragment"),
                           (unmarked, r"unmarked.dcm cannot be read: .* holds 400 fragments for the 199 frames its "
                                      r"header declares .* and 200 of its fragments begin with a start of image")):
        pixel_bytes = sum(length for _, length in _fragment_items(path))
        raised, peak = _peak_bytes(lambda: read_volume(path))
        assert isinstance(raised, ImageReadError) and re.search(expected, str(raised)), (path, raised)
        assert peak < pixel_bytes / 4, (path, peak, pixel_bytes)


def test_joining_a_frames_fragments_holds_the_pixel_data_about_twice(tmp_path):
    """Joining each frame's fragments copied them into a list, then each frame's into a new string, then all into
    pydicom's encapsulation buffer and its copy: the peak of memory while joining a JPEG-LS file of 200 frames in
    400 fragments was about 4 times its pixel data, on top of the pixel data read. The new pixel data is written
    once, at its full length, from views of the fragments: the join adds about one copy, and the file reads as its
    source."""
    from lib.imaging.dicom_read import _join_frame_fragments, declared_shape

    source = _pydicom_data("emri_small_jpeg_ls_lossless.dcm")
    split = _split_frames(source, tmp_path / "split.dcm", repeat=20)
    ds = pydicom.dcmread(split)
    pixel_bytes = len(ds.PixelData)
    raised, peak = _peak_bytes(lambda: _join_frame_fragments(ds, split, declared_shape(ds, split)))
    assert raised is None and peak < 1.6 * pixel_bytes, (raised, peak, pixel_bytes)
    ds.save_as(tmp_path / "joined.dcm")
    assert len(_fragment_items(tmp_path / "joined.dcm")) == 1 + 200
    np.testing.assert_array_equal(read_volume(tmp_path / "joined.dcm").array[:10], read_volume(source).array)


#: the JP2 signature box, first in a JPEG 2000 file in the JP2 format (ISO/IEC 15444-1 I.5.1)
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def test_jpeg_2000_frames_in_the_jp2_format_in_several_fragments_are_read_by_their_signature(tmp_path):
    """JPEG 2000 frames in the JP2 file format (PS3.5 A.4.4 wants the bare codestream, but some writers wrap it;
    GDCM and OpenJPEG read it) read one fragment a frame, but in 2 fragments a frame without an offset table they
    were refused as "0 of its fragments begin with a start of codestream marker (FF4F) ... NumberOfFrames is wrong,
    or the data is damaged". The JP2 signature box starts a frame too: the file reads as its source; with one
    frame's signature damaged, it is refused naming both starts."""
    import openjpeg
    from pydicom.encaps import encapsulate

    source = _pydicom_data("emri_small_jpeg_2k_lossless.dcm")
    expected = read_volume(source).array
    ds = pydicom.dcmread(source)
    frames = [openjpeg.encode(frame, bits_stored=int(ds.BitsStored), codec_format=1) for frame in ds.pixel_array]
    assert all(frame.startswith(_JP2_SIGNATURE) for frame in frames)
    for name, fragments, damaged in (("whole.dcm", 1, None), ("split.dcm", 2, None), ("damaged.dcm", 2, 3)):
        written = [b"\x00" * 12 + frame[12:] if k == damaged else frame for k, frame in enumerate(frames)]
        ds.PixelData = encapsulate(written, fragments_per_frame=fragments, has_bot=False)
        ds.save_as(tmp_path / name)
    np.testing.assert_array_equal(read_volume(tmp_path / "whole.dcm").array, expected)
    np.testing.assert_array_equal(read_volume(tmp_path / "split.dcm").array, expected)
    with pytest.raises(ImageReadError, match=r"damaged.dcm cannot be read: .* holds 20 fragments for the 10 frames "
                                             r".* and 9 of its fragments begin with a start of codestream marker "
                                             r"\(FF4F\) or a JP2 signature box, as each frame does"):
        read_volume(tmp_path / "damaged.dcm")


def _one_fragment_a_frame(source: Path, path: Path, table: str, entries, damaged: int | None = None) -> Path:
    """``source``'s compressed frames written to ``path`` one fragment a frame, with a Basic Offset Table (``table``
    "basic") or an Extended one ("extended", the Basic one empty) whose entries are ``entries(starts)`` (``starts``:
    the fragments' item tags, bytes from the first one's); frame ``damaged`` (0-based) without its first 2 bytes."""
    import struct

    from pydicom.encaps import decode_data_sequence, encapsulate

    ds = pydicom.dcmread(source)
    frames = decode_data_sequence(ds.PixelData)
    if damaged is not None:
        frames[damaged] = b"\x00\x00" + frames[damaged][2:]
    starts = [0]
    for frame in frames[:-1]:
        starts.append(starts[-1] + 8 + len(frame) + len(frame) % 2)
    listed = entries(starts)
    items = encapsulate(frames, has_bot=False)[8:]  # the fragments, after the empty Basic Offset Table
    if table == "basic":
        ds.PixelData = b"\xfe\xff\x00\xe0" + struct.pack(f"<I{len(listed)}I", 4 * len(listed), *listed) + items
    else:
        ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + items
        ds.ExtendedOffsetTable = struct.pack(f"<{len(listed)}Q", *listed)
        ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(frames)}Q", *(len(frame) for frame in frames))
    ds.save_as(path)
    return path


@pytest.mark.parametrize("table", ["basic", "extended"])
def test_a_wrong_offset_table_over_one_fragment_a_frame_is_set_aside_or_refused(tmp_path, monkeypatch, table):
    """A JPEG 2000 file of 10 frames, one fragment each, whose offset table disagrees with its fragments was not
    checked: decoded by pylibjpeg (python-gdcm absent, as here; GDCM ignores the table), a third entry 2 bytes on,
    or the second and third swapped, read frames 3 to 9 from other frames' bytes, silently; a table of one entry too
    few or too many was refused as "a cut copy, or NumberOfFrames is wrong". Fragments as many as the frames
    declared are one a frame: the table is set aside and the file reads as its source. A table of fewer frames is
    set aside only where each fragment begins a codestream; with frame 6's start marker damaged, the file is refused
    naming the table, the counts and the fragment."""
    from pydicom.pixel_data_handlers import numpy_handler, pylibjpeg_handler

    monkeypatch.setattr(pydicom.config, "pixel_data_handlers", [numpy_handler, pylibjpeg_handler])
    source = _pydicom_data("emri_small_jpeg_2k_lossless.dcm")
    expected = read_volume(source).array
    name = "Basic" if table == "basic" else "Extended"
    for wrong in (lambda starts: [*starts[:2], starts[2] + 2, *starts[3:]],
                  lambda starts: [starts[0], starts[2], starts[1], *starts[3:]],
                  lambda starts: starts[:-1],
                  lambda starts: [*starts, starts[-1] + 100]):
        path = _one_fragment_a_frame(source, tmp_path / "wrong.dcm", table, wrong)
        np.testing.assert_array_equal(read_volume(path).array, expected)
    path = _one_fragment_a_frame(source, tmp_path / "damaged.dcm", table, lambda starts: starts[:-1], damaged=5)
    with pytest.raises(ImageReadError, match=rf"damaged.dcm is corrupt: its {name} Offset Table lists 9 frame\(s\), "
                                             r"but its header declares 10 and its compressed \(JPEG 2000 .*\) pixel "
                                             r"data holds 10 fragments, one a frame, and its fragment 6 does not "
                                             r"begin with a start of codestream marker \(FF4F\) or a JP2 signature "
                                             r"box, as each frame does: whether the table or NumberOfFrames is wrong"):
        read_volume(path)


@pytest.mark.parametrize("table", ["basic", "extended", "none"])
def test_a_compressed_file_cut_inside_a_fragment_is_refused_naming_the_frame(tmp_path, table):
    """A multi-frame RLE file cut in the middle of a fragment of its second frame was refused naming voxels only
    ("ends inside a fragment (a cut copy); its header declares 3 x 128 x 128 voxels"), or, with an offset table, as
    "a cut copy, or NumberOfFrames is wrong". The refusal names the frame the cut is in and the frames declared and
    whole, by the offset table (Basic or Extended); without one, the fragment and at most how many frames are
    whole."""
    fragments = 1 if table == "none" else 2
    path = _rle_multiframe(tmp_path / "cut.dcm", 3, table=table, fragments=fragments)
    position, length = _fragment_items(path)[1 + 2 * fragments - 1]  # the second frame's last fragment
    path.write_bytes(path.read_bytes()[:position + 8 + length // 2])
    found = (r"ends inside its fragment 2, cut short \(a cut copy\): its header declares 3 frame\(s\) \(3 x 128 x "
             r"128 voxels\), at most 1 of them whole \(without an offset table" if table == "none" else
             r"ends inside frame 2 of the 3 its header declares \(3 x 128 x 128 voxels\), in a fragment cut short "
             r"\(a cut copy\): 1 whole frame\(s\) found, by its offset table")
    with pytest.raises(ImageReadError, match=rf"cut.dcm is truncated: its compressed \(RLE Lossless\) pixel data "
                                             rf"{found}"):
        read_volume(path)


def _colour(path: Path, position: bool = True) -> Path:
    """CT_small made an RGB image (3 samples of 8 bits a pixel, 128 x 128), with its ImagePositionPatient or
    without it, as a new instance."""
    ds = pydicom.dcmread(CT_SMALL)
    grey = (ds.pixel_array.astype(np.int32) % 256).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.stack([grey] * 3, axis=-1).tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if not position:
        del ds.ImagePositionPatient
    ds.save_as(path)
    return path


def test_colour_is_refused_for_that_before_size_or_geometry(tmp_path):
    """Colour (SamplesPerPixel 3) is refused whatever else holds, so it is said first, from the headers: a colour
    file over the voxel limit only by its 3 samples (128 x 128 x 3 = 49,152 values, limit 20,000) was refused as
    too large (raising the limit only led to the colour refusal); a folder of colour slices without
    ImagePositionPatient was refused as slices that cannot be ordered. Both now name the colour. A grey file of
    that size passes that limit; a folder over it by its slices is refused as too large."""
    colour_message = r"has 3 samples per pixel \(RGB\); 4D or multi-component \(colour\) images are not supported"
    path = _colour(tmp_path / "rgb.dcm")
    with pytest.raises(ImageReadError, match=colour_message) as raised:
        read_volume(path, max_voxels=20_000)
    assert not isinstance(raised.value, ImageTooLargeError) and "rgb.dcm" in str(raised.value)
    assert read_volume(CT_SMALL, max_voxels=20_000).shape == (128, 128)
    folder = tmp_path / "colour_series"
    folder.mkdir()
    for k in range(3):
        _colour(folder / f"slice_{k}.dcm", position=False)
    with pytest.raises(ImageReadError, match=r"slice_0.dcm " + colour_message):
        read_volume(folder)
    _make_series(tmp_path / "grey_series", n=3)
    with pytest.raises(ImageTooLargeError, match=r"too large: 3 x 128 x 128 = 49,152 voxels exceeds the limit"):
        read_volume(tmp_path / "grey_series", max_voxels=20_000)
