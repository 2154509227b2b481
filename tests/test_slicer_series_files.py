"""The Slicer module's Slicer-free DICOM code (``ADLDenoiseLib.series_files``: the reference a DICOM volume is
compared with before its first identification) against what Slicer's readers make of the same files (PyPI's
slicer-core, in .venv-slicer, in a subprocess): real series (GE with gantry tilt, Siemens JPEG 2000), one rescale
per file, JPEG Lossless decoded by SimpleITK's GDCM, MONOCHROME1, enhanced multi-frame files (their frames' own
rescales that Slicer's reader ignores), colour and float files. Imports neither the server's ``lib`` nor MONAI Label,
so that it also runs in .venv-slicer, whose pydicom is the one Slicer bundles (3.x), where .venv has pydicom 2
(``test_slicer_module.test_slicer_free_dicom_code_under_slicers_pydicom``)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import processes
from conftest import REPO_ROOT
from pydicom_write import write_dicom

MODULE_DIR = REPO_ROOT / "slicer_extension" / "ADLDenoise"


#: loads a DICOM series as Slicer's DICOMScalarVolumePlugin does with its Archetype reader (loadFilesWithArchetype,
#: then setVolumeNodeProperties: a left-handed series' slices reversed), in PyPI's slicer-core; saves the array
_LOAD_LIKE_SLICER = """
import sys
import numpy as np
import slicer, vtk
files, out = sys.argv[1:-1], sys.argv[-1]
node = slicer.vtkMRMLScalarVolumeNode()
storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
storage.SetFileName(files[0])
for name in files:
    storage.AddFileName(name)
storage.SetSingleFile(0)
assert storage.ReadData(node)
matrix = vtk.vtkMatrix4x4()
node.GetIJKToRASMatrix(matrix)
if not slicer.vtkMRMLVolumeNode.IsIJKCoordinateSystemRightHanded(matrix):
    slicer.vtkMRMLVolumeNode.ReverseSliceOrder(node.GetImageData(), matrix)
np.save(out, slicer.util.arrayFromVolume(node))
"""


def test_series_files_are_the_reference_of_a_dicom_volume_as_slicer_loads_it(shared_data, tmp_path):
    """The reference a DICOM volume is compared with before its first identification (``series_files``): the
    values of its files, read with pydicom, match the volume Slicer's reader makes of them (slicer-core's archetype
    storage node, as the DICOM plugin loads a series: a real GE series with gantry tilt and a JPEG 2000 Siemens
    slab); a "Mask volume" edit or one voxel changed does not, nor other files; any slice order matches."""
    from ADLDenoiseLib.series_files import NoReference, read_series_values

    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    series = {name: sorted(p for p in (shared_data / "dicom" / name).iterdir() if p.is_file())
              for name in ("ct_head_ge_tilted", "ct_abdomen_siemens_j2k_slab")}
    for name, files in series.items():
        out = tmp_path / f"{name}.npy"
        loaded = _load_in_slicer_core(_LOAD_LIKE_SLICER, files, out)
        values = read_series_values(files)
        assert values is not None and values.voxels == loaded.size
        assert values.matches(loaded), name
        assert values.matches(loaded[::-1]) and values.matches(loaded.astype(np.float32))  # order, float type
        masked = loaded.copy()  # Segment Editor's Mask volume: outside a region set to the fill value
        masked[:, :100] = -1000
        assert not values.matches(masked)
        touched = loaded.copy()
        touched.flat[touched.size // 2] += 1
        assert not values.matches(touched) and not values.matches(loaded[1:])
        assert not values.matches(loaded.astype(np.float32) + 0.5)  # a value no stored value gives
    tilted, slab = (read_series_values(files) for files in series.values())
    assert not tilted.matches(np.load(tmp_path / "ct_abdomen_siemens_j2k_slab.npy"))
    # files that cannot be read as Slicer reads them give no reference (the first voxels seen stay it), and say why
    assert isinstance(read_series_values([]), NoReference)
    missing = read_series_values([*series["ct_head_ge_tilted"], tmp_path / "missing.dcm"])
    assert isinstance(missing, NoReference) and "missing.dcm cannot be read" in missing.reason
    assert missing.matches(loaded) is None
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"not a DICOM file")
    assert isinstance(read_series_values([not_dicom]), NoReference)


#: the DICOM plugin's default reader settings (``loadFilesWithSeriesReader("GDCM")``) of ``reader`` for ``files``,
#: read and checked: shared by the scalar and vector series-reader scripts below
_SERIES_READER_SETUP = """reader.SetArchetype(files[0])
for name in files:
    reader.AddFileName(name)
reader.SetSingleFile(0)
reader.SetOutputScalarTypeToNative()
reader.SetDesiredCoordinateOrientationToNative()
reader.SetUseNativeOriginOn()
reader.SetDICOMImageIOApproachToGDCM()
reader.Update()
assert reader.GetErrorCode() == 0
"""


#: loads a DICOM series as the DICOM plugin's default reader approach does (``loadFilesWithSeriesReader("GDCM")``:
#: vtkITKArchetypeImageSeriesScalarReader, native scalar type, GDCM's ImageIO), in PyPI's slicer-core; saves the array
_LOAD_WITH_SERIES_READER = """
import sys
import numpy as np
import slicer
from vtk.util.numpy_support import vtk_to_numpy
files, out = sys.argv[1:-1], sys.argv[-1]
reader = slicer.vtkITKArchetypeImageSeriesScalarReader()
""" + _SERIES_READER_SETUP + """image = reader.GetOutput()
columns, rows, slices = image.GetDimensions()
np.save(out, vtk_to_numpy(image.GetPointData().GetScalars()).reshape(slices, rows, columns))
"""


@pytest.mark.parametrize("rescales", ["fractional", "whole"])
def test_series_files_with_one_rescale_per_file_are_the_reference_as_slicer_loads_them(shared_data, tmp_path,
                                                                                         rescales):
    """A series whose files each have their own slope and intercept (PET, some CT and MR exports): Slicer's readers
    (the DICOM plugin's default GDCM series reader and the archetype storage node, in slicer-core) give each file's
    ``slope * v + intercept`` in double precision, as doubles when a rescale is fractional, else integers; the
    files' values (:class:`RescaledValues`) match that volume in any slice order, also when the multiply-add is
    fused (Slicer built by clang for arm64); one voxel changed, one voxel given another file's value, a "Mask
    volume" edit or a slice less do not."""
    from fractions import Fraction

    import pydicom
    from ADLDenoiseLib.series_files import RescaledValues, read_series_values

    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    # 8 files of the real GE series (of 28: each check compares every voxel), each file given its own rescale
    files, expected, fused = [], [], []
    for k, source in enumerate(_ge_series(shared_data, 8)):
        dataset = pydicom.dcmread(source)
        if rescales == "fractional":
            dataset.RescaleSlope, dataset.RescaleIntercept = f"{0.37 + 0.0131 * k:.6g}", f"{-1024.5 + 0.25 * k:.6g}"
        else:
            dataset.RescaleSlope, dataset.RescaleIntercept = str(1 + k % 3), str(-1024 + 3 * k)
        files.append(tmp_path / source.name)
        dataset.save_as(files[-1])
        slope, intercept = float(dataset.RescaleSlope), float(dataset.RescaleIntercept)
        stored = dataset.pixel_array
        expected.append(slope * stored.astype(np.float64) + intercept)
        # fma(slope, v, intercept): the exact product and sum, rounded once
        distinct, inverse = np.unique(stored, return_inverse=True)
        once = [float(Fraction(slope) * int(v) + Fraction(intercept)) for v in distinct]
        fused.append(np.asarray(once)[inverse].reshape(stored.shape))
    expected, fused = np.stack(expected), np.stack(fused)
    values = read_series_values(files)
    assert isinstance(values, RescaledValues) and values.voxels == expected.size
    if rescales == "fractional":
        assert np.any(fused != expected)  # the fused values differ in the last bit somewhere
    assert values.matches(fused)
    loads = {}
    for script in (_LOAD_WITH_SERIES_READER, _LOAD_LIKE_SLICER):
        out = tmp_path / f"loaded{len(loads)}.npy"
        loads[script] = loaded = _load_in_slicer_core(script, files, out)
        assert loaded.dtype == (np.float64 if rescales == "fractional" else np.int32)
        # bit-exact: what Slicer's reader gives is the files' slope * v + intercept in double precision
        assert np.array_equal(np.sort(loaded, axis=None), np.sort(expected, axis=None))
        assert values.matches(loaded) and values.matches(loaded[::-1])
        touched = loaded.copy()
        touched.flat[touched.size // 2] += 1
        assert not values.matches(touched)
        swapped = loaded.copy()  # one voxel given a value of another file: the same values, counted otherwise
        swapped.flat[0] = loaded.flat[np.flatnonzero(loaded.ravel() != loaded.flat[0])[-1]]
        assert not values.matches(swapped)
        masked = loaded.copy()
        masked[:, :100] = -1000
        assert not values.matches(masked) and not values.matches(loaded[1:])
        assert not values.matches(loaded.astype(np.float64) + 0.5)
    # the series' original files (one rescale) are another volume
    original = read_series_values(_ge_series(shared_data, 8))
    assert not original.matches(loads[_LOAD_WITH_SERIES_READER])


#: reads a series' values in a Python whose pydicom has only the JPEG Lossless decoders Slicer's has, namely none
#: (Slicer ships pydicom with Pillow and numpy, neither pylibjpeg-libjpeg nor GDCM's Python wrapping): those packages
#: are made unimportable before pydicom is imported, which holds for pydicom 2's pixel data handlers and pydicom 3's
#: decoder plugins alike. Compares them there with the volume Slicer made of the files (an .npy, the last argument
#: but one) and prints, as JSON: pydicom's version, whether pydicom decodes the first file, the values' class, and
#: whether they match the volume, the volume in reverse slice order, the volume with one voxel changed, and the
#: volume less a slice (JSON, not a pickle: the two Pythons' numpy differ, 1 in .venv and 2 in .venv-slicer)
_READ_WITHOUT_JPEG_LOSSLESS_DECODERS = """
import json, sys
for name in ("gdcm", "pylibjpeg", "libjpeg"):
    sys.modules[name] = None
import numpy as np
import pydicom
from ADLDenoiseLib.series_files import read_series_values
files, loaded = sys.argv[1:-1], np.load(sys.argv[-1])
try:
    pydicom.dcmread(files[0]).pixel_array
    decoded = True
except Exception:
    decoded = False
values = read_series_values(files)
touched = loaded.copy()
touched.flat[touched.size // 2] += 1
print(json.dumps([pydicom.__version__, decoded, type(values).__name__, bool(values.matches(loaded)),
                  bool(values.matches(loaded[::-1])), bool(values.matches(touched)), bool(values.matches(loaded[1:]))]))
"""


def _slicer_core_python() -> Path:
    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    return python


def _load_in_slicer_core(script: str, files, out: Path) -> np.ndarray:
    """The array one of the loading scripts above (``_LOAD_LIKE_SLICER``, ``_LOAD_WITH_SERIES_READER``) makes of
    ``files`` in slicer-core: in a subprocess of .venv-slicer's Python, or in this one where the tests run there
    (test_slicer_module's pydicom 3 run: a start of slicer-core, with VTK, for each load doubled that run's time)."""
    python = _slicer_core_python()
    if Path(sys.prefix).resolve() == python.parent.parent.resolve():
        argv = sys.argv
        sys.argv = ["-c", *map(str, files), str(out)]
        try:
            exec(compile(script, "<slicer-core loading script>", "exec"), {"__name__": "__main__"})
        finally:
            sys.argv = argv
    else:
        result = processes.run([python, "-c", script, *map(str, files), str(out)], 600, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return np.load(out)


def _ge_series(shared_data: Path, count: int | None = None) -> list[Path]:
    return sorted(p for p in (shared_data / "dicom" / "ct_head_ge_tilted").iterdir() if p.is_file())[:count]


@pytest.mark.parametrize("rescales, photometric", [("one", "MONOCHROME2"), ("per file", "MONOCHROME2"),
                                                   ("one", "MONOCHROME1")])
def test_series_files_in_jpeg_lossless_are_decoded_by_gdcm_where_pydicom_has_no_decoder(shared_data, tmp_path,
                                                                                         rescales, photometric):
    """JPEG Lossless files in Slicer's Python, whose pydicom has no decoder for them (no pylibjpeg-libjpeg, no GDCM
    wrapping; here .venv's pydicom 2 and .venv-slicer's pydicom 3, Slicer's, where those cannot be imported): decoded
    by SimpleITK's GDCM,
    which Slicer ships, their values match the volume Slicer's default reader (slicer-core) makes of them, with the
    series' one rescale or one per file, and MONOCHROME1 (which GDCM inverts, here as in Slicer); one voxel changed
    does not."""
    gdcm = pytest.importorskip("gdcm")  # python-gdcm writes the JPEG Lossless files here
    pytest.importorskip("SimpleITK")
    import pydicom

    _slicer_core_python()
    files = []
    for k, source in enumerate(_ge_series(shared_data)):
        dataset = pydicom.dcmread(source)
        dataset.PhotometricInterpretation = photometric
        if rescales == "per file":
            dataset.RescaleSlope, dataset.RescaleIntercept = f"{0.37 + 0.0131 * k:.6g}", f"{-1024.5 + 0.25 * k:.6g}"
        plain = tmp_path / f"plain{k}.dcm"
        dataset.save_as(plain)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(plain))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        files.append(tmp_path / source.name)
        writer.SetFileName(str(files[-1]))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        plain.unlink()
    _load_in_slicer_core(_LOAD_WITH_SERIES_READER, files, tmp_path / "loaded.npy")
    first = pydicom.dcmread(files[0])
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70" and first.PhotometricInterpretation == \
        photometric
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")])))
    # read by this Python and by slicer-core's, whose pydicom is the one Slicer bundles (3 where .venv has 2)
    versions = set()
    for python in (sys.executable, _slicer_core_python()):
        result = processes.run([python, "-c", _READ_WITHOUT_JPEG_LOSSLESS_DECODERS, *map(str, files),
                                str(tmp_path / "loaded.npy")], 600, cwd=REPO_ROOT, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        version, decoded, kind, *matches = json.loads(result.stdout.strip().splitlines()[-1])
        assert not decoded, (python, version)  # as in Slicer's Python: no decoder, whatever the version
        assert kind == ("SeriesValues" if rescales == "one" else "RescaledValues"), (python, version)
        assert matches == [True, True, False, False], (python, version)
        versions.add(version)
    assert pydicom.__version__ in versions


def _monochrome1_series(sources: list[Path], folder: Path, layout: str) -> list[Path]:
    """``sources`` (the signed 16-bit GE series) as MONOCHROME1 files of ``layout``: "signed" (as they are, through
    a rescale of 2, -1024), "12 of 16 unsigned bits" or "7 of 8 unsigned bits" (the values shifted and clipped into
    that range)."""
    import pydicom

    folder.mkdir()
    files = []
    for source in sources:
        dataset = pydicom.dcmread(source)
        dataset.PhotometricInterpretation = "MONOCHROME1"
        if layout == "signed":
            dataset.RescaleSlope, dataset.RescaleIntercept = "2", "-1024"
        else:
            bits, stored_bits = (16, 12) if layout == "12 of 16 unsigned bits" else (8, 7)
            values = dataset.pixel_array.astype(np.int64) + 1500
            values = np.clip(values >> (16 - bits) // 2, 0, (1 << stored_bits) - 1)
            dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, stored_bits, stored_bits - 1
            dataset.PixelRepresentation = 0
            dataset.PixelData = values.astype(f"<u{bits // 8}").tobytes()
        files.append(folder / source.name)
        dataset.save_as(files[-1])
    return files


@pytest.mark.parametrize("layout", ["signed", "12 of 16 unsigned bits", "7 of 8 unsigned bits"])
def test_series_files_in_monochrome1_are_inverted_as_slicer_loads_them(shared_data, tmp_path, layout):
    """MONOCHROME1 (higher values darker: CR, DX, some exports): Slicer's reader (GDCM, in slicer-core's default
    series reader and archetype storage node) inverts the stored values to MONOCHROME2 before the rescale (the DICOM
    plugin itself does not): ``~v`` when signed, ``2**BitsStored - 1 - v`` for 16 unsigned bits, ``255 - v`` for 8.
    The files' values, inverted the same way, match that volume in any slice order; the values not inverted, one
    voxel changed or a "Mask volume" edit do not."""
    import pydicom
    from ADLDenoiseLib.series_files import SeriesValues, read_series_values

    files = _monochrome1_series(_ge_series(shared_data, 6), tmp_path / "files", layout)
    values = read_series_values(files)
    assert isinstance(values, SeriesValues) and values.slope == (2.0 if layout == "signed" else 1.0)
    datasets = [pydicom.dcmread(path) for path in files]
    as_stored = np.stack([values.slope * d.pixel_array.astype(np.float64) + values.intercept for d in datasets])
    scripts = [_LOAD_WITH_SERIES_READER] + ([_LOAD_LIKE_SLICER] if layout == "signed" else [])
    for k, script in enumerate(scripts):
        loaded = _load_in_slicer_core(script, files, tmp_path / f"loaded{k}.npy")
        assert not np.array_equal(np.sort(loaded, axis=None), np.sort(as_stored, axis=None))  # inverted
        assert values.matches(loaded) and values.matches(loaded[::-1])
        assert values.matches(loaded.astype(np.float32))
        assert not values.matches(as_stored)  # the reference as it was before: MONOCHROME1 read as MONOCHROME2
        touched = loaded.copy()
        touched.flat[touched.size // 2] += 1
        masked = loaded.copy()
        masked[:, :100] = loaded.min()
        assert not values.matches(touched) and not values.matches(masked)


def _enhanced_file(sources: list[Path], path: Path, sop_class: str, rescales: str) -> list[tuple[float, float]]:
    """One multi-frame file of ``sop_class`` (Enhanced CT or MR) holding the frames of ``sources`` (signed 16-bit
    slices), with per-frame functional groups (plane positions) and its rescale: "per frame, fractional" or "per
    frame, whole" (each frame its own Pixel Value Transformation) or "shared" (one, in the shared functional
    group), or "frames 4-5 their own" (per frame: 1, -1024 but frames 4 and 5, 1-based, 2 and -2048), or "shared,
    frame 3 its own" (the shared group's 2, -1024, and a per-frame one for frame 3 only), or "frames 3, 5, 7
    malformed" (per frame: 1, -1024, but frame 3's Rescale Slope missing, frame 5's "ab", frame 7's 0). Returns each
    frame's (slope, intercept) as DICOM defines it (its per-frame transformation, else the shared one; for a
    malformed one, frame 1's, which Slicer's reader applies to it)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = [pydicom.dcmread(source) for source in sources]
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.FrameOfReferenceUID = generate_uid()
    dataset.Modality = "CT" if sop_class.endswith(".2.1") else "MR"
    dataset.PatientName, dataset.PatientID = "Enhanced^Test", "enhanced"
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = frames[0].Rows, frames[0].Columns, len(frames)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    if rescales == "per frame, fractional":
        rescale = [(f"{0.37 + 0.0131 * k:.6g}", f"{-1024.5 + 0.25 * k:.6g}") for k in range(len(frames))]
    elif rescales == "per frame, whole":
        rescale = [(str(1 + k % 3), str(-1024 + 3 * k)) for k in range(len(frames))]
    elif rescales == "frames 4-5 their own":
        rescale = [("2", "-2048") if k in (3, 4) else ("1", "-1024") for k in range(len(frames))]
    elif rescales == "shared, frame 3 its own":
        rescale = [("1", "-1024") if k == 2 else ("2", "-1024") for k in range(len(frames))]
    elif rescales == "frames 3, 5, 7 malformed":
        rescale = [("1", "-1024")] * len(frames)
    else:
        rescale = [("2", "-1024")] * len(frames)

    def transformation(slope: str, intercept: str) -> Dataset:
        item = Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "US"
        return item

    shared, measures, orientation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 2.5
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    if rescales.startswith("shared"):
        shared.PixelValueTransformationSequence = [transformation("2", "-1024")]
    dataset.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(len(frames)):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, 2.5 * k]
        item.PlanePositionSequence = [position]
        if not rescales.startswith("shared") or rescale[k] != ("2", "-1024"):
            item.PixelValueTransformationSequence = [transformation(*rescale[k])]
        per_frame.append(item)
    if rescales == "frames 3, 5, 7 malformed":
        from pydicom.dataelem import RawDataElement
        from pydicom.tag import Tag

        del per_frame[2].PixelValueTransformationSequence[0].RescaleSlope
        # as a file holds it: pydicom refuses to set a DS that is not a number
        per_frame[4].PixelValueTransformationSequence[0][0x00281053] = RawDataElement(
            Tag(0x00281053), "DS", 2, b"ab", 0, False, True)
        per_frame[6].PixelValueTransformationSequence[0].RescaleSlope = "0"
    dataset.PerFrameFunctionalGroupsSequence = per_frame
    dataset.PixelData = np.stack([frame.pixel_array for frame in frames]).astype("<i2").tobytes()
    write_dicom(path, dataset)  # explicit VR little endian, as its transfer syntax says
    return [(float(slope), float(intercept)) for slope, intercept in rescale]


@pytest.mark.parametrize("sop_class, rescales", [
    ("1.2.840.10008.5.1.4.1.1.2.1", "per frame, fractional"),  # Enhanced CT
    ("1.2.840.10008.5.1.4.1.1.4.1", "per frame, whole"),  # Enhanced MR
    ("1.2.840.10008.5.1.4.1.1.2.1", "shared"),
])
def test_an_enhanced_multiframe_file_is_the_reference_as_slicer_loads_it(shared_data, tmp_path, sop_class,
                                                                         rescales):
    """An enhanced multi-frame file (all slices in one file, rescale in the functional groups): Slicer's reader
    (GDCM, slicer-core's default series reader) applies one rescale to every frame, the shared functional group's,
    else the first frame's, even where later frames carry their own (their values in Slicer are then not what
    those frames mean). The reference is what the node holds: all frames through that one rescale, which matches
    the loaded volume in any slice order; all frames through their own rescales (which Slicer does not give) and
    one voxel changed do not."""
    import pydicom
    from ADLDenoiseLib.series_files import SeriesValues, read_series_values

    path = tmp_path / "enhanced.dcm"
    rescale = _enhanced_file(_ge_series(shared_data, 8), path, sop_class, rescales)
    loaded = _load_in_slicer_core(_LOAD_WITH_SERIES_READER, [path], tmp_path / "loaded.npy")
    values = read_series_values([path])
    assert isinstance(values, SeriesValues) and (values.slope, values.intercept) == rescale[0]
    assert values.voxels == loaded.size == 8 * 512 * 512
    assert values.matches(loaded) and values.matches(loaded[::-1])
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    each_own = np.stack([slope * frame + intercept for frame, (slope, intercept) in zip(stored, rescale)])
    if rescales != "shared":
        assert not np.array_equal(np.sort(loaded, axis=None), np.sort(each_own, axis=None))  # Slicer's one rescale
        assert not values.matches(each_own)
    touched = loaded.copy()
    touched.flat[touched.size // 3] += 1
    assert not values.matches(touched) and not values.matches(loaded[1:])
    # the frames whose own rescale was ignored (all but the first, each its own) are named, from the headers
    ignored = [(item.file, item.frames, item.total, item.applied, len(item.rescales))
               for item in values.ignored_rescales]
    assert ignored == ([] if rescales == "shared" else [("enhanced.dcm", tuple(range(2, 9)), 8, rescale[0], 7)])


@pytest.mark.parametrize("rescales", ["frames 4-5 their own", "shared, frame 3 its own"])
def test_the_frames_whose_own_rescale_slicer_ignored_are_named_and_are_those_with_wrong_values(shared_data, tmp_path,
                                                                                              rescales):
    """The module warns of the frames of a multi-frame file that Slicer's reader loaded through another frame's (or
    the shared group's) rescale: named from the headers the reference reads (no second read), they are exactly the
    frames whose values in the volume slicer-core's default reader makes are not what their own rescale gives; the
    others are right. Told even where the pixel data cannot be decoded here (Slicer's GDCM may decode it)."""
    import pydicom
    from ADLDenoiseLib.series_files import IgnoredRescale, NoReference, SeriesValues, read_series_values

    path = tmp_path / "enhanced.dcm"
    rescale = _enhanced_file(_ge_series(shared_data, 8), path, "1.2.840.10008.5.1.4.1.1.2.1", rescales)
    values = read_series_values([path])
    applied = (1.0, -1024.0) if rescales == "frames 4-5 their own" else (2.0, -1024.0)
    wrong = (4, 5) if rescales == "frames 4-5 their own" else (3,)
    assert isinstance(values, SeriesValues) and (values.slope, values.intercept) == applied
    own = ((2.0, -2048.0),) if rescales == "frames 4-5 their own" else ((1.0, -1024.0),)
    assert values.ignored_rescales == (IgnoredRescale("enhanced.dcm", wrong, 8, applied, own),)
    # the volume Slicer makes of the file: the frames named are those whose values are not their own rescale's
    loaded = _load_in_slicer_core(_LOAD_WITH_SERIES_READER, [path], tmp_path / "loaded.npy")
    assert values.matches(loaded)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    right = {number for number, (frame, (slope, intercept)) in enumerate(zip(stored, rescale), 1)
             if any(np.array_equal(plane, slope * frame + intercept) for plane in loaded)}
    assert set(range(1, 9)) - right == set(wrong)
    text = values.ignored_rescales[0].describe()
    expected = ("frames 4-5 of enhanced.dcm (2 of 8) carry their own rescale (slope 2, intercept -2048)"
                if rescales == "frames 4-5 their own" else
                "frame 3 of enhanced.dcm (1 of 8) carries its own rescale (slope 1, intercept -1024)")
    assert text.startswith(expected + " that Slicer's reader ignored (it applied slope "
                           f"{applied[0]:g}, intercept {applied[1]:g} to all the file's frames)"), text
    # pixel data that cannot be decoded here: no reference, the frames still named
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEG2000Lossless
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51not a codestream"] * 8)
    dataset["PixelData"].is_undefined_length = True
    dataset.save_as(tmp_path / "undecodable.dcm")
    undecodable = read_series_values([tmp_path / "undecodable.dcm"])
    assert isinstance(undecodable, NoReference) and "cannot be decoded" in undecodable.reason
    assert [item.frames for item in undecodable.ignored_rescales] == [wrong]


def test_later_frames_whose_own_rescale_is_malformed_are_named_with_what_is_wrong(shared_data, tmp_path):
    """A multi-frame file whose later frames carry a malformed rescale (Rescale Slope missing, not a number, 0):
    Slicer's reader applies frame 1's rescale to them as to every frame (it never reads theirs), so the reference
    does too and the volume is compared with its files; those frames are named, each with what is wrong, so that
    the module warns of them, asks before sending the volume and refuses verdicts and corrections of it
    (ReviewSession.rescale_warning). Before, such a file gave no reference, its reason naming no frame, and the
    volume was sent with frame 1's values on those frames without a word."""
    import pydicom
    from ADLDenoiseLib.review_session import (
        RescaleNotApplied,
        ReviewSession,
        VolumeSnapshot,
        WorkflowError,
        content_identity,
        dicom_identity,
        snapshot_matches_files,
    )
    from ADLDenoiseLib.series_files import IgnoredRescale, SeriesValues, read_series_values

    path = tmp_path / "enhanced.dcm"
    _enhanced_file(_ge_series(shared_data, 8), path, "1.2.840.10008.5.1.4.1.1.2.1", "frames 3, 5, 7 malformed")
    values = read_series_values([path])
    assert isinstance(values, SeriesValues) and (values.slope, values.intercept) == (1.0, -1024.0)
    malformed = ((3, "no RescaleSlope"), (5, "RescaleSlope 'ab' is not a number"), (7, "RescaleSlope 0"))
    assert values.ignored_rescales == (IgnoredRescale("enhanced.dcm", (), 8, (1.0, -1024.0), (), malformed),)
    text = values.ignored_rescales[0].describe()
    assert text == ("frames 3, 5, 7 of enhanced.dcm (3 of 8) have a malformed rescale (frame 3: no RescaleSlope; "
                    "frame 5: RescaleSlope 'ab' is not a number; frame 7: RescaleSlope 0): Slicer's reader applied "
                    "slope 1, intercept -1024 to them as to all the file's frames, which may not be what they mean")
    # what slicer-core's reader makes of the file: frame 1's rescale on every frame, the malformed ones included
    loaded = _load_in_slicer_core(_LOAD_WITH_SERIES_READER, [path], tmp_path / "loaded.npy")
    assert values.matches(loaded)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert np.array_equal(np.sort(loaded, axis=None), np.sort(stored - 1024.0, axis=None))
    # the module: warned, sent only once confirmed, never judged or corrected
    session = ReviewSession()
    series = dicom_identity("1.2.840.77", "CT", "Enhanced CT", instance_uids="1.2.840.77.1")
    ticket = session.identifying("vtkMRMLScalarVolumeNode1", series, "Enhanced CT")
    snapshot = VolumeSnapshot(loaded, np.eye(4), "Enhanced CT", None, series)
    assert session.identified(ticket, content_identity(loaded, np.eye(4)),
                              lambda: snapshot_matches_files(snapshot, [str(path)])) == series
    with pytest.raises(RescaleNotApplied, match=r"frames 3, 5, 7 of enhanced.dcm \(3 of 8\) have a malformed"):
        session.require_study()
    for check in (session.require_judgeable, session.require_correctable):
        with pytest.raises(WorkflowError, match="not sent: frames 3, 5, 7 of enhanced.dcm"):
            check()
    # with frames carrying a well-formed rescale of their own as well: both said, those first
    both = IgnoredRescale("ct.dcm", (2,), 9, (1.0, -1024.0), ((2.0, -1024.0),), ((4, "no RescaleIntercept"),))
    assert both.describe().startswith("frame 2 of ct.dcm (1 of 9) carries its own rescale (slope 2, intercept "
                                      "-1024) that Slicer's reader ignored (it applied slope 1, intercept -1024 to "
                                      "all the file's frames); frame 4 of ct.dcm (1 of 9) has a malformed rescale "
                                      "(frame 4: no RescaleIntercept): Slicer's reader applied slope 1, intercept "
                                      "-1024 to it")


def test_a_malformed_rescale_of_frame_1_or_the_shared_group_gives_no_reference_naming_where(shared_data, tmp_path):
    """The rescale Slicer's reader applies to every frame of an enhanced multi-frame file (the shared functional
    group's, else frame 1's) malformed: Rescale Slope missing, not a number, 0, or Rescale Intercept missing. No
    reference (what the volume holds cannot be told from the file), and the reason names the group and what is
    wrong, as for later frames ("frame 3: no RescaleSlope"). It named neither: "has an incomplete Pixel Value
    Transformation (rescale)", "the image attributes of enhanced.dcm cannot be read (ValueError)", "a rescale slope
    of 0 or a rescale that is not a finite number"."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from ADLDenoiseLib.series_files import NoReference, read_series_values

    def not_a_number(item) -> None:  # as a file holds it: pydicom refuses to set a DS that is not a number
        item[0x00281053] = RawDataElement(Tag(0x00281053), "DS", 2, b"ab", 0, False, True)

    def no_slope(item) -> None:
        del item.RescaleSlope

    def no_intercept(item) -> None:
        del item.RescaleIntercept

    def slope_0(item) -> None:
        item.RescaleSlope = "0"

    sources = _ge_series(shared_data, 3)
    for group, rescales, change, wrong in (
            ("frame 1", "frames 4-5 their own", no_slope, "no RescaleSlope"),
            ("frame 1", "frames 4-5 their own", not_a_number, "RescaleSlope 'ab' is not a number"),
            ("shared functional group", "shared", no_intercept, "no RescaleIntercept"),
            ("shared functional group", "shared", slope_0, "RescaleSlope 0")):
        path = tmp_path / "enhanced.dcm"
        _enhanced_file(sources, path, "1.2.840.10008.5.1.4.1.1.2.1", rescales)
        dataset = pydicom.dcmread(path)
        groups = dataset.SharedFunctionalGroupsSequence if group.startswith("shared") else \
            dataset.PerFrameFunctionalGroupsSequence
        change(groups[0].PixelValueTransformationSequence[0])
        dataset.save_as(path)
        values = read_series_values([path])
        assert isinstance(values, NoReference), (group, wrong, values)
        assert values.reason == (f"enhanced.dcm has a malformed rescale ({group}: {wrong}), the one Slicer's reader "
                                 "applies to all its frames"), values.reason


#: loads a colour series as the DICOM plugin does (``loadFilesWithSeriesReader`` with grayscale false: the vector
#: reader, into a vtkMRMLVectorVolumeNode), in slicer-core; prints the number of components
_LOAD_AS_VECTOR = """
import sys
import slicer
files = sys.argv[1:]
reader = slicer.vtkITKArchetypeImageSeriesVectorReaderSeries()
""" + _SERIES_READER_SETUP + """print("components", reader.GetOutput().GetNumberOfScalarComponents())
"""


def test_colour_and_float_series_files_give_no_reference_and_say_why(shared_data, tmp_path):
    """Files Slicer's scalar volume reader does not load (slicer-core's default series reader and archetype storage
    node both fail on them): colour (RGB, loaded by the DICOM plugin as a vector volume, which the module does not
    take) and Float / Double Float Pixel Data (parametric maps: no ImageIO reads them; the Parametric Map plugin
    converts them with dcmqi). They give no reference, and the reason the module shows says which; 32-bit pixels
    too."""
    import pydicom
    from ADLDenoiseLib.series_files import NoReference, read_series_values

    _slicer_core_python()  # skipped, saying why, where there is no .venv-slicer
    series = {kind: [] for kind in ("colour", "float", "double", "32-bit")}
    for source in _ge_series(shared_data, 3):
        for kind, files in series.items():
            dataset = pydicom.dcmread(source)
            values = dataset.pixel_array.astype(np.float64)
            for name in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
                if name in dataset:
                    delattr(dataset, name)
            if kind == "colour":
                grey = np.clip((values + 1500) / 16, 0, 255).astype(np.uint8)
                dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 3, "RGB"
                dataset.PlanarConfiguration = 0
                dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
                dataset.PixelData = np.stack([grey, np.roll(grey, 7, 0), 255 - grey], -1).tobytes()
            elif kind == "32-bit":
                dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 32, 32, 31
                dataset.PixelData = (values * 1000).astype("<i4").tobytes()
            else:
                del dataset.PixelData
                for name in ("BitsStored", "HighBit", "PixelRepresentation"):
                    delattr(dataset, name)
                if kind == "float":
                    dataset.BitsAllocated, dataset.FloatPixelData = 32, (values * 0.37).astype("<f4").tobytes()
                else:
                    dataset.BitsAllocated, dataset.DoubleFloatPixelData = 64, (values * 0.37).astype("<f8").tobytes()
            files.append(tmp_path / kind / source.name)
            files[-1].parent.mkdir(exist_ok=True)
            dataset.save_as(files[-1])
    reasons = {kind: read_series_values(files) for kind, files in series.items()}
    assert all(isinstance(reason, NoReference) for reason in reasons.values()), reasons
    assert "colour" in reasons["colour"].reason and "vector" in reasons["colour"].reason
    for kind in ("float", "double"):
        assert "float pixel data" in reasons[kind].reason and "cannot be compared" in reasons[kind].reason
    assert "32-bit" in reasons["32-bit"].reason
    # Slicer's scalar reader does not load the colour or float files (each loading script stops at its check of the
    # reader), so no scalar volume holds their values as read; its vector reader loads the colour files
    runs = [(script, [*map(str, series[kind]), str(tmp_path / f"{kind}{k}.npy")])
            for kind in ("colour", "float", "double")
            for k, script in enumerate((_LOAD_WITH_SERIES_READER, _LOAD_LIKE_SLICER))]
    runs.append((_LOAD_AS_VECTOR, list(map(str, series["colour"]))))
    outcomes, printed = _outcomes_in_slicer_core(runs, tmp_path / "runs.json")
    assert outcomes == ["AssertionError"] * 6 + ["loaded"], outcomes
    assert not list(tmp_path.glob("*.npy"))
    assert "components 3" in printed, printed[-2000:]


#: runs loading scripts in turn in one Python (a JSON list of [script, its arguments] in the file named by the
#: first argument) and prints, last, a JSON list of their outcomes: "loaded", or the exception that stopped one
_RUN_IN_TURN = """
import json, sys
with open(sys.argv[1]) as handle:
    runs = json.load(handle)
outcomes = []
for script, argv in runs:
    sys.argv = ["-c", *argv]
    try:
        exec(compile(script, "<slicer-core loading script>", "exec"), {"__name__": "__main__"})
        outcomes.append("loaded")
    except Exception as error:
        outcomes.append(type(error).__name__)
print(json.dumps(outcomes))
"""


def _outcomes_in_slicer_core(runs: list[tuple[str, list[str]]], listing: Path) -> tuple[list[str], str]:
    """Each of ``runs`` (a loading script above and its arguments) run in turn in one slicer-core Python: a
    subprocess of .venv-slicer's (one start of slicer-core, with VTK, for them all: a start per script made 7), or
    this one where the tests run there. Returns each run's outcome ("loaded", or the name of the exception that
    stopped it) and what the runs printed."""
    import contextlib
    import io

    python = _slicer_core_python()
    listing.write_text(json.dumps(runs))
    if Path(sys.prefix).resolve() == python.parent.parent.resolve():
        argv, printed = sys.argv, io.StringIO()
        sys.argv = ["-c", str(listing)]
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(_RUN_IN_TURN, "<slicer-core runs>", "exec"), {"__name__": "__main__"})
        finally:
            sys.argv = argv
        stdout = printed.getvalue()
    else:
        result = processes.run([python, "-c", _RUN_IN_TURN, str(listing)], 600, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        stdout = result.stdout
    return json.loads(stdout.strip().splitlines()[-1]), stdout
