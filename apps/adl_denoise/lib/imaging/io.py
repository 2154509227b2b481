"""Reading and writing medical images with their geometry and value conventions: :func:`read_volume` and
:func:`write_volume`.

Supported inputs (chosen by path, see :func:`read_volume`):
  * a folder             -> one DICOM series (:mod:`lib.imaging.dicom_read`: pydicom decodes, including JPEG 2000
                            via pylibjpeg; we sort and validate the slices and build the geometry ourselves);
  * a single DICOM file  -> a 2D slice, or a 3D volume when it is a multi-frame (enhanced) object;
  * .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd -> SimpleITK.

Supported outputs (see :func:`write_volume`): .nii, .nii.gz, .nrrd, .mha, .mhd via SimpleITK, and a folder ->
a derived DICOM series built on the headers of the DICOM input (:mod:`lib.imaging.dicom_write`).

Conventions: see :mod:`lib.imaging.volume` (arrays (z, y, x) float32, SimpleITK-order geometry in LPS mm, CT in
HU with padding set to air).

Deliberate refusals (each an :class:`ImageReadError` with a one-line message naming the path):
  * 4D or multi-component images, NaN/Inf values, finite values no scanner writes (a CT beyond +-1e6 HU, other
    modalities beyond +-1e15: :func:`~lib.imaging.guards.check_plausible`), zero-size images, images above the
    voxel limit;
  * a header that declares more voxel data than its file holds (refused from the header, before any voxel is
    read and allocated), a cut or corrupt gzip stream (ITK's NIfTI reader would fill the missing slices with 0);
  * DICOM series with gantry tilt (sheared slice stack), uneven slice spacing, or several volumes in one
    series (duplicate slice positions; slices that differ in modality, echo, time point, kernel, slice
    thickness or MR complex component; a localizer among the slices). We never resample silently: the caller
    decides what to do.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..runtime.atomic import fsync_path
from . import guards
from .dicom_geometry import slice_as_3d_geometry
from .dicom_read import (check_pixel_data, declared_shape, is_dicom_file, list_dicom_series, probe_dicom_header,
                         read_dicom_file, read_dicom_folder)
from .dicom_write import write_dicom_derived_series
from .errors import ImageReadError, ImageWriteError, one_line
from .guards import (check_compressed_length, check_finite, check_gzip_stream, check_metaimage_compressed_size,
                     check_not_input, check_plausible, check_size, check_stored_size, check_values, make_temp_dir)
from .volume import (ImageGrid, Volume, fill_padding, guess_modality, integral_dtype_for, normalise_modality,
                     values_for_output)

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "check_image_file", "check_voxels", "header_modality",
           "nifti_grid_problem", "read_grid", "read_volume", "write_volume"]

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _suffix(path: Path) -> str:
    """Lower-case image suffix, treating .nii.gz as one suffix."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def read_volume(
    path: str | Path,
    series_uid: str | None = None,
    modality: str | None = None,
    *,
    fill_padding: bool = True,
    max_voxels: int | None = None,
) -> Volume:
    """Read a 2D or 3D image as a :class:`Volume` (float32 array (z, y, x) or (y, x); CT in HU).

    Args:
        path: a DICOM series folder, a single DICOM file (any name; .dcm or none), or a .nii/.nii.gz/.nrrd/
            .nhdr/.mha/.mhd file.
        series_uid: which series to read when a folder holds several (see :func:`list_dicom_series`); "" selects
            the files whose SeriesInstanceUID is empty (hard-anonymised data).
        modality: "CT", "MR" or "OT" for formats without a modality tag; None guesses (:func:`guess_modality`).
            DICOM files use their Modality tag (the argument only fills in when the tag is not CT or MR).
        fill_padding: set padded pixels (PixelPaddingValue, CT values <= -2000 HU) to air (CT) or 0; the count
            is in ``metadata["n_padded"]``.
        max_voxels: largest image accepted (voxels), checked from the header before any pixel is loaded; None
            uses :func:`max_voxels` (``ADL_MAX_VOXELS`` or the default).

    Raises:
        ImageReadError: missing/empty path, unsupported or corrupt file, 4D/multi-component, NaN/Inf,
            ambiguous folder (several series), tilted or unevenly spaced DICOM series, above the voxel limit.
    """
    p = Path(path).expanduser()
    modality = normalise_modality(modality)
    limit = guards.max_voxels() if max_voxels is None else int(max_voxels)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file or folder")
    if p.is_dir():
        return read_dicom_folder(p, series_uid, modality, fill_padding, limit)
    if not p.is_file():
        raise ImageReadError(f"{p} is neither a regular file nor a folder")
    suffix = _suffix(p)
    if suffix in READ_SUFFIXES:
        return _read_with_sitk(p, modality, fill_padding, limit)
    if is_dicom_file(p):
        return read_dicom_file(p, series_uid, modality, fill_padding, limit)
    if suffix in _DICOM_SUFFIXES or suffix == "" or os.path.getsize(p) == 0:
        raise ImageReadError(f"{p} is not a DICOM file (no DICOM header found)")
    raise ImageReadError(
        f"{p}: unsupported file type {suffix!r} and not a DICOM file "
        f"(supported: DICOM file or folder, {', '.join(READ_SUFFIXES)})"
    )


@contextlib.contextmanager
def _nifti_image(path: Path):
    """``path`` as a nibabel NIfTI-1 or -2 image (header read, voxels read on demand while the context is open),
    read by its content as ITK reads it: a ``.nii.gz`` whose bytes do not start with gzip's magic is a NIfTI stored
    uncompressed under that name, read as it is by ITK (zlib's gzread), which nibabel (choosing gzip by the name)
    refuses as "not a gzip file".

    Raises:
        ImageReadError: nibabel cannot read it (every caller needs what it reads: NaN/Inf, stored bytes, transforms).
    """
    import nibabel

    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {one_line(exc)}") from exc
    with handle:
        try:
            head = handle.read(4)
            if _suffix(path) != ".nii.gz" or head[:2] == b"\x1f\x8b":
                image = nibabel.load(str(path))
            else:
                handle.seek(0)
                wide = head in (struct.pack("<i", 540), struct.pack(">i", 540))  # sizeof_hdr: NIfTI-2, else -1
                image = (nibabel.Nifti2Image if wide else nibabel.Nifti1Image).from_stream(handle)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types; each means the same here
            raise ImageReadError(f"cannot read {path}: SimpleITK reads it but nibabel cannot ({one_line(exc)}), "
                                 "and its NaN/Inf values (which ITK reads as 0) and its transforms are checked with "
                                 "nibabel; save it again with nibabel, 3D Slicer or SimpleITK") from exc
        yield image


def _check_nifti_finite(path: Path) -> dict:
    """ITK's NIfTI reader silently turns NaN and Inf into 0, so count them in the raw data with nibabel. Returns the
    fields of its header that place its voxels (:func:`_nifti_geometry_of`), read in the same opening of the file.

    Raises:
        ImageReadError: NaN or Inf stored, or nibabel cannot read the file (:func:`_nifti_image`).
    """
    with _nifti_image(path) as image:
        geometry = _geometry_fields(image.header)
        if not np.issubdtype(image.header.get_data_dtype(), np.floating):
            return geometry
        try:
            data = np.asanyarray(image.dataobj)
        except Exception as exc:  # noqa: BLE001 - not checked is not taken as finite
            raise ImageReadError(f"cannot read {path}: nibabel cannot read its voxels ({one_line(exc)}), so their "
                                 "NaN/Inf values (which ITK reads as 0) cannot be counted") from exc
    check_values(np.asarray(data), path)
    return geometry


def _nifti_stored_bytes_per_voxel(path: Path) -> int | None:
    """Bytes of one stored voxel of a NIfTI file (``bitpix``, times the vector components), read with nibabel; None
    if its header cannot be read (ITK's own answer, or error, then stands). ITK reports the *scaled* type instead: a
    uint8 volume with a ``scl_slope`` is float32 to ITK, four times the bytes the file stores."""
    try:
        with _nifti_image(path) as image:
            header = image.header
    except ImageReadError:
        return None
    per_voxel = max(1, int(header["bitpix"]) // 8)
    dims = header["dim"]
    return per_voxel * (max(1, int(dims[5])) if int(dims[0]) >= 5 else 1)


#: the NIfTI header fields that place the voxels (both transforms, their codes, voxel sizes and units): kept from the
#: input in an output on the same grid (see :func:`_nifti_geometry_of`)
_NIFTI_GEOMETRY_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                          "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")
#: the header of a NIfTI-1 file (what ITK writes), in bytes
_NIFTI1_HEADER_BYTES = 348


def _nifti_geometry_of(path: Path) -> dict:
    """The fields of ``path``'s NIfTI header that place its voxels (:data:`_NIFTI_GEOMETRY_FIELDS` and
    ``pixdim[0:4]``, as plain numbers).

    ITK reads one transform of a NIfTI file (the qform or the sform) and writes it as both, with code 1 (scanner
    anatomical): an input whose sform differs from its qform (a registration to a template, code 2 to 4) came back
    with another sform and other codes, so that the viewers that use the sform (FSLeyes, nibabel, nilearn...) placed
    the denoised output millimetres away from its input. The writer puts these fields back
    (:func:`_restore_nifti_geometry`) when the output has the input's grid.

    Raises:
        ImageReadError: nibabel cannot read its header (:func:`_nifti_image`): its sform would be lost unsaid.
    """
    with _nifti_image(path) as image:
        return _geometry_fields(image.header)


def _geometry_fields(header) -> dict:
    """The fields of a nibabel NIfTI ``header`` that :func:`_nifti_geometry_of` gives."""
    fields = {name: np.asarray(header[name]).tolist() for name in _NIFTI_GEOMETRY_FIELDS}
    fields["pixdim"] = np.asarray(header["pixdim"], dtype=float)[:4].tolist()
    return fields


def _restore_nifti_geometry(path: Path, fields: dict) -> None:
    """Put the input's header ``fields`` (:func:`_nifti_geometry_of`) into the uncompressed NIfTI-1 file ``path``
    that ITK just wrote, in place (the header only; the voxels are not read)."""
    import io

    import nibabel

    with open(path, "r+b") as handle:
        header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(handle.read(_NIFTI1_HEADER_BYTES)))
        for name in _NIFTI_GEOMETRY_FIELDS:
            header[name] = fields[name]
        pixdim = np.asarray(header["pixdim"], dtype=np.float32).copy()
        pixdim[:4] = fields["pixdim"]
        header["pixdim"] = pixdim
        block = header.binaryblock
        if len(block) != _NIFTI1_HEADER_BYTES:  # pragma: no cover - nibabel writes the NIfTI-1 header it read
            raise ImageWriteError(f"cannot write {path}: unexpected NIfTI header size {len(block)}")
        handle.seek(0)
        handle.write(block)


def _kept_nifti_geometry(volume: Volume, array: np.ndarray, geometry: tuple, out: Path) -> dict | None:
    """The input's NIfTI header fields to write into ``out`` (:func:`_nifti_geometry_of`): only for a NIfTI output of a
    volume read from a NIfTI file (``volume.metadata`` "nifti_geometry") whose values are on the grid read (same
    shape, spacing, origin and direction), else None (ITK's header, from the volume's geometry)."""
    fields, grid = volume.metadata.get("nifti_geometry"), volume.metadata.get("nifti_grid")
    if not fields or not grid or _suffix(out) not in (".nii", ".nii.gz"):
        return None
    if list(array.shape) != list(grid["shape"]):
        return None
    for now, read in zip(geometry, (grid["spacing"], grid["origin"], grid["direction"])):
        if len(now) != len(read) or not np.allclose(now, read, rtol=0, atol=1e-9):
            return None
    return fields


def _bytes_per_voxel(reader: sitk.ImageFileReader) -> int:
    """Bytes of one STORED voxel (all its components) of the image ``reader`` has read the header of; 1 if unknown
    (a lower bound: the size checks then refuse less, never wrongly)."""
    if _suffix(Path(reader.GetFileName())) in (".nii", ".nii.gz"):
        stored = _nifti_stored_bytes_per_voxel(Path(reader.GetFileName()))
        if stored is not None:
            return stored
    try:
        probe = sitk.Image([1, 1], reader.GetPixelID(), max(1, reader.GetNumberOfComponents()))
        return int(sitk.GetArrayViewFromImage(probe).dtype.itemsize) * max(1, reader.GetNumberOfComponents())
    except (RuntimeError, TypeError, ValueError):
        return 1


def _header_checks(path: Path, limit: int, whole_stream: bool = True) -> sitk.ImageFileReader:
    """Read ``path``'s header only and refuse, before any voxel is read: more than ``limit`` voxels, more voxel
    data declared than the file holds, a cut or corrupt gzip stream of a NIfTI file, a MetaImage file's compressed
    data cut short (:func:`~lib.imaging.guards.check_compressed_length`; ITK reads it as zeros or garbage) or
    stored in the ``.mha`` file without a ``CompressedDataSize`` ITK can use (ITK reads garbage); without
    ``whole_stream``, a NIfTI gzip stream is not read through where its trailer says it is whole, and the compressed
    data of a NRRD file is checked too (ITK's reader fails on it when it reads it)."""
    reader = _sized_header(path, limit)
    per_voxel = _bytes_per_voxel(reader)
    header = _text_header(path)  # read once for the checks below
    check_stored_size(path, reader.GetSize(), per_voxel, header)
    declared = int(np.prod([int(v) for v in reader.GetSize()], dtype=np.float64)) * per_voxel
    if not whole_stream or _suffix(path) in (".mha", ".mhd"):
        # MetaImage: ITK's reader turns compressed data cut short into zeros (only "Uncompress failed" on stderr)
        check_compressed_length(path, declared, header)
        if _suffix(path) in (".mha", ".mhd"):
            check_metaimage_compressed_size(path, header)  # after the cut check: a cut stream is named as cut
    elif _suffix(path) == ".nii.gz":
        # the stream is verified before ITK reads it: ITK's NIfTI reader turns a cut stream into zero slices
        check_gzip_stream(path, declared, nifti=True)
    return reader


def _text_header(path: Path) -> guards.TextHeader | None:
    """The text header of a NRRD or MetaImage file (:func:`~lib.imaging.guards.text_header`); None for another
    format, or where it cannot be read (each check then reads it, and leaves what it cannot open to the reader)."""
    if _suffix(path) not in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return None
    try:
        return guards.text_header(path)
    except OSError:
        return None


def _sized_header(path: Path, limit: int) -> sitk.ImageFileReader:
    """Read ``path``'s header only and refuse an unreadable one, vectors and time series, more than ``limit``
    voxels (the first of :func:`_header_checks`)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # header only: refuse a huge image before loading its pixels
    except RuntimeError as exc:
        if "Unable to determine ImageIO reader" in str(exc):  # no reader recognises the bytes, whatever the name
            raise ImageReadError(f"cannot read {path}: its content is not a NIfTI, NRRD or MetaImage image "
                                 "(no image reader recognises it)") from exc
        raise ImageReadError(f"cannot read {path}: {one_line(exc)}") from exc
    if reader.GetDimension() > 4 or reader.GetNumberOfComponents() > 1:
        # before the stored-size check: NIfTI's 5th axis (vector components) would read as a truncated file there
        raise ImageReadError(f"{path} holds a {reader.GetDimension()}D image of size "
                             f"{' x '.join(map(str, reader.GetSize()))} with {reader.GetNumberOfComponents()} "
                             "component(s) per voxel (vectors, RGB or a time series of volumes): only scalar 2D or 3D "
                             "images are denoised; save one scalar volume")
    check_size(reader.GetSize(), path, limit)
    return reader


def check_image_file(path: str | Path, max_voxels: int | None = None) -> tuple[int, ...]:
    """Check an image file (NIfTI, NRRD, MetaImage) without reading its voxels: readable header, at most
    ``max_voxels`` voxels (None: :func:`~lib.imaging.guards.max_voxels`), as much data as the header declares,
    an intact gzip stream. Returns its size (x, y[, z]) in SimpleITK order. Memory: O(1 MiB).

    Raises:
        ImageReadError: unsupported suffix, unreadable header, too large, truncated or corrupt.
    """
    p = Path(path)
    if _suffix(p) not in READ_SUFFIXES:
        raise ImageReadError(f"{p}: unsupported file type {_suffix(p)!r} (supported: {', '.join(READ_SUFFIXES)})")
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    limit = guards.max_voxels() if max_voxels is None else int(max_voxels)
    return tuple(int(v) for v in _header_checks(p, limit).GetSize())


def check_voxels(path: str | Path, max_voxels: int | None = None) -> tuple[int, ...]:
    """Refuse, without building a volume, an image that :func:`read_volume` would refuse as over ``max_voxels``
    (None: :func:`~lib.imaging.guards.max_voxels`) or as truncated: an image file (NIfTI, NRRD, MetaImage) declaring
    more voxel data than it holds or whose compressed data is provably cut short
    (:func:`~lib.imaging.guards.check_compressed_length`: a gzip stream's trailer where it gives the declared length,
    else the compressed data decompressed through and counted, MetaImage's always; data that does not parse where
    the header places it is left to the reader), a DICOM file whose pixel data is cut short
    (:func:`~lib.imaging.dicom_read.check_pixel_data`). Returns its size as the header gives it: (x, y[, z]) of an
    image file, (frames, rows, columns[, samples]) of a DICOM file, (slices, rows, columns) of a folder's DICOM
    series (each series of the folder checked). Memory: O(headers); time: a header a file (a compressed file whose
    trailer does not give its length: decompressed through, in 1 MiB chunks).

    Raises:
        lib.imaging.errors.ImageTooLargeError: over the limit (the reader's message);
        ImageReadError: the headers cannot be read (missing, not an image, corrupt), or the file is truncated.
    """
    p = Path(path).expanduser()
    limit = guards.max_voxels() if max_voxels is None else int(max_voxels)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file or folder")
    if p.is_dir():
        shape: tuple[int, ...] = ()
        for series in list_dicom_series(p):
            header = _dicom_header(Path(series["files"][0]))
            shape = declared_shape(header, Path(series["files"][0]))
            if len(series["files"]) > 1:  # one frame a file: counted as read_dicom_folder counts it
                shape = (len(series["files"]), *shape[1:])
            check_size(shape, p, limit)
            for file in series["files"]:
                check_pixel_data(Path(file))
        return shape
    if p.is_file() and _suffix(p) in READ_SUFFIXES:
        return tuple(int(v) for v in _header_checks(p, limit, whole_stream=False).GetSize())
    header = _dicom_header(p)
    shape = declared_shape(header, p)
    check_size(shape, p, limit)
    check_pixel_data(p)
    return shape


def _dicom_header(path: Path):
    """``path``'s DICOM header without pixel data (:func:`probe_dicom_header`); ImageReadError when it has none."""
    header, problem = probe_dicom_header(path)
    if header is None or "Rows" not in header or "Columns" not in header:
        raise ImageReadError(f"{path} {problem or 'is not a DICOM image file'}")
    return header


def read_grid(path: str | Path, max_voxels: int | None = None) -> ImageGrid:
    """The voxel grid of an image file from its header alone (after :func:`check_image_file`'s checks), or of a
    DICOM series or file (read whole: DICOM geometry needs every slice's position) as :func:`read_volume` gives it.

    Raises:
        ImageReadError: as :func:`read_volume` / :func:`check_image_file`.
    """
    p = Path(path).expanduser()
    if p.is_dir() or is_dicom_file(p):
        return read_volume(p, fill_padding=False, max_voxels=max_voxels).grid
    check_image_file(p, max_voxels)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()
    size = [int(v) for v in reader.GetSize()]
    if len(size) == 4 and size[3] == 1:  # a 4D file of one volume reads as 3D
        size = size[:3]
    ndim = len(size)
    direction = np.asarray(reader.GetDirection(), np.float64).reshape(len(reader.GetSize()), -1)[:ndim, :ndim]
    return ImageGrid(tuple(size[::-1]), tuple(reader.GetSpacing()[:ndim]), tuple(reader.GetOrigin()[:ndim]),
                     tuple(direction.ravel()))


def header_modality(path: str | Path) -> str | None:
    """The modality :func:`read_volume` gives the image at ``path`` (no ``modality`` argument), from headers alone:
    a DICOM file's or single-series folder's Modality (CT, MR; ``OT`` for another), read without pixel data; None
    when the voxels decide it (NIfTI, NRRD, MetaImage: :func:`guess_modality`) or the headers do not tell (a folder
    of several series, no DICOM file readable).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        try:
            series = list_dicom_series(p)
        except ImageReadError:
            return None
        if len(series) != 1:
            return None
        tag = series[0]["modality"]
    elif p.is_file() and _suffix(p) not in READ_SUFFIXES:
        header, _ = probe_dicom_header(p)
        if header is None:
            return None
        tag = header.get("Modality")
    else:
        return None
    tag = str(tag or "").strip().upper()
    return tag if tag in ("CT", "MR") else "OT"  # as the DICOM readers decide it (dicom_read._modality_of)


def _read_with_sitk(path: Path, modality: str | None, fill: bool, limit: int) -> Volume:
    """A NIfTI/NRRD/MetaImage file through SimpleITK (arguments as :func:`read_volume`; ``limit`` in voxels)."""
    reader = _header_checks(path, limit)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read {path}: {one_line(exc)}") from exc
    n_comp = image.GetNumberOfComponentsPerPixel()
    size = image.GetSize()
    if n_comp != 1:
        raise ImageReadError(
            f"{path} has {n_comp} components per pixel (vector/colour, size {size}); 4D or multi-component "
            f"images are not supported, give one 3D volume"
        )
    dim = image.GetDimension()
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]  # a 3D volume stored with a singleton time axis: drop it (direction kept)
        dim = 3
    if dim > 3:
        raise ImageReadError(
            f"{path} is {dim}D (size {size}); 4D images are not supported, give one 3D volume"
        )
    if dim < 2:
        raise ImageReadError(f"{path} is {dim}D (size {size}); only 2D and 3D images are supported")
    array = sitk.GetArrayFromImage(image)
    if np.iscomplexobj(array):
        raise ImageReadError(f"{path} holds complex values; only real scalar images are supported")
    nifti_geometry = None
    if _suffix(path) in (".nii", ".nii.gz") and np.issubdtype(array.dtype, np.floating):
        nifti_geometry = _check_nifti_finite(path)  # and its header's geometry: the file opened once for both
    check_values(array, path)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        source_dtype = np.dtype(array.dtype) if array.dtype != bool else np.dtype(np.uint8)
    else:
        source_dtype = np.dtype(np.float32)  # float64 NIfTI etc. are written back as float32
    if array.dtype.itemsize > 4 and np.issubdtype(array.dtype, np.floating):
        largest = float(np.abs(array).max())
        if largest > float(np.finfo(np.float32).max):
            raise ImageReadError(f"{path} holds values up to {largest:.3g}, beyond what float32 holds (3.4e38): "
                                 "not image intensities; rescale them before denoising")
    values = array.astype(np.float32)
    if modality is None:
        modality = guess_modality(values)
        modality_source = "guessed"
    else:
        modality_source = "argument"
    check_plausible(values, modality, path)  # before the padding fill would turn -1e20 HU into air
    values, pad_info = fill_padding(values, modality, None, fill)
    metadata: dict = {
        "format": _suffix(path).lstrip("."),
        "modality_source": modality_source,
        "input_min": float(values.min()),
        "input_max": float(values.max()),
        **pad_info,
    }
    if _suffix(path) in (".nii", ".nii.gz"):
        # what a NIfTI output on this grid keeps of the header (_kept_nifti_geometry)
        metadata["nifti_geometry"] = nifti_geometry or _nifti_geometry_of(path)
        metadata["nifti_grid"] = {"shape": list(values.shape), "spacing": list(image.GetSpacing()),
                                  "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}
    if pad_info["n_padded"] and np.issubdtype(source_dtype, np.integer):
        # the fill value must stay representable in the source dtype (e.g. -1024 in an unsigned CT file)
        lo, hi = float(values.min()), float(values.max())
        if lo < np.iinfo(source_dtype).min or hi > np.iinfo(source_dtype).max:
            source_dtype = integral_dtype_for(lo, hi)
    return Volume(
        array=values,
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=image.GetDirection(),
        modality=modality,
        source_dtype=source_dtype,
        source_path=path,
        dicom_headers=None,
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _dicom_slice_geometry(volume: Volume) -> tuple[tuple, tuple, tuple] | None:
    """(spacing, origin, direction) of a 2D DICOM slice as a one-slice 3D image in patient coordinates, when the
    volume is a 2D slice read from DICOM with ImagePositionPatient/ImageOrientationPatient; else None."""
    ipp = volume.metadata.get("image_position_patient")
    iop = volume.metadata.get("image_orientation_patient")
    if volume.ndim != 2 or ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    step = float(volume.metadata.get("slice_spacing") or 1.0)
    return slice_as_3d_geometry(volume.spacing, ipp, iop, step)


def nifti_grid_problem(direction) -> str | None:
    """Why a NIfTI file cannot hold a grid of this direction matrix (SimpleITK order, 2x2 or 3x3), None if it can:
    NIfTI keeps perpendicular axes only, so a sheared grid (a gantry tilt kept in an NRRD or MetaImage file) would be
    written with other axes, every voxel but the first row at another place (millimetres off)."""
    values = np.asarray(direction, dtype=float)
    n = int(round(values.size ** 0.5))
    d = values.reshape(n, n)
    if np.abs(d.T @ d - np.eye(n)).max() > 1e-3:  # a tilt of 1 degree is 0.017; rounded DICOM vectors 1e-5
        return ("its axes are not perpendicular (a sheared grid, e.g. a gantry tilt), which NIfTI cannot hold: "
                "write .nrrd or .mha")
    return None


def _write_with_sitk(
    volume: Volume, out: Path, output_dtype: str | np.dtype | None, overwrite: bool, slice_geometry: bool = True,
    durable: bool = False,
) -> Path:
    if out.exists() and not overwrite:
        raise ImageWriteError(f"{out} already exists; pass overwrite=True to replace it")
    if out.is_dir():
        raise ImageWriteError(f"{out} is a folder; give a file name ending in {', '.join(WRITE_SUFFIXES)}")
    array = values_for_output(volume, output_dtype)
    geometry = (volume.spacing, volume.origin, volume.direction)
    patient_geometry = _dicom_slice_geometry(volume) if slice_geometry else None
    if patient_geometry is not None:
        array, geometry = array[np.newaxis], patient_geometry
    problem = nifti_grid_problem(geometry[2]) if _suffix(out) in (".nii", ".nii.gz") else None
    if problem:
        raise ImageWriteError(f"cannot write {out}: {problem}")
    try:
        image = sitk.GetImageFromArray(array)
    except RuntimeError as exc:
        raise ImageWriteError(f"cannot write {out}: dtype {array.dtype} not supported ({one_line(exc)})") from exc
    image.SetSpacing(geometry[0])
    image.SetOrigin(geometry[1])
    image.SetDirection(geometry[2])
    # SimpleITK picks the format, and the name of a .mhd's companion data file, from the file name, so the
    # files are written under their final names in a temporary folder (not a temporary file name) and renamed.
    parent = out.parent
    temp = make_temp_dir(out, f"cannot create {parent} for {out}")
    kept = _kept_nifti_geometry(volume, array, geometry, out)
    # with the input's NIfTI header fields to put back: written uncompressed, the header patched, then gzipped
    written = temp / (out.name[:-3] if kept and out.name.lower().endswith(".gz") else out.name)
    try:
        try:
            # compression: .nii.gz is gzipped by name; .nrrd/.mha/.mhd get zlib, .nii ignores the flag
            sitk.WriteImage(image, str(written), True)
            if kept:
                _restore_nifti_geometry(written, kept)
                if written.name != out.name:
                    with open(written, "rb") as source, gzip.open(temp / out.name, "wb", compresslevel=6) as target:
                        shutil.copyfileobj(source, target, 1 << 20)
                    written.unlink()
        except (RuntimeError, OSError) as exc:
            raise ImageWriteError(f"cannot write {out}: {one_line(exc)}") from exc
        produced = sorted(temp.iterdir())  # .mhd writes a companion .zraw/.raw
        clashes = [parent / p.name for p in produced if (parent / p.name).exists() and p.name != out.name]
        if clashes and not overwrite:
            raise ImageWriteError(f"{clashes[0]} (written with {out.name}) already exists; pass overwrite=True")
        if durable:  # on the disk before their names point at them (see write_volume)
            for item in produced:
                fsync_path(item)
        # the data file first and the header last, so a reader never sees a header without its data
        for item in sorted(produced, key=lambda p: p.name == out.name):
            os.replace(item, parent / item.name)
        if durable:
            fsync_path(parent)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out


def write_volume(
    volume: Volume,
    path: str | Path,
    *,
    output_dtype: str | np.dtype | None = None,
    overwrite: bool = False,
    series_description_suffix: str = " [denoised]",
    derivation: str = "Denoised",
    derived_image_type: str = "DENOISED",
    reference: Volume | None = None,
    dicom_slice_as_3d: bool = True,
    durable: bool = False,
) -> Path:
    """Write ``volume`` to ``path`` and return the path written.

    Format by path: .nii/.nii.gz/.nrrd/.mha/.mhd -> SimpleITK with origin, spacing and direction as in the
    volume (NIfTI stores them as float32: exact to ~1e-6 mm; a NIfTI output of a volume read from a NIfTI file, on
    its grid, keeps that file's qform, sform, their codes, voxel sizes and units, so that every viewer places it
    exactly on its input); a folder (existing, or a new name without
    extension) -> derived DICOM series (:func:`write_dicom_derived_series`, which the series description suffix,
    ``derivation`` and ``derived_image_type`` go to) built on ``reference`` or, by default, on the volume's own
    ``dicom_headers``.

    A 2D slice read from a DICOM file is written (with ``dicom_slice_as_3d``, the default) as a one-slice 3D
    image in patient coordinates (origin ImagePositionPatient, direction from ImageOrientationPatient, z
    spacing SpacingBetweenSlices or SliceThickness), the way SimpleITK reads that DICOM file: 2D geometry cannot
    hold the slice's z position or an oblique plane. Reading the file back then gives shape (1, y, x).

    Values (:func:`value_range_for_output`): CT stays in HU; integer source dtypes (int16 for CT) or an
    explicit ``output_dtype`` -> rounded and clipped to that dtype; MR with a non-negative input is clipped at
    0; float inputs are written as float32. ``output_dtype`` applies to the file formats only: DICOM output is
    always 16-bit with a rescale (see :func:`write_dicom_derived_series`).

    Safety: an existing output is never replaced unless ``overwrite=True``; the input path is never
    overwritten; files are written in a temporary folder next to the output and renamed into place, so a
    failure leaves no partial output. ``durable``: the files are flushed to the disk (``fsync``) before they are
    renamed into place and the folder after, so that a power cut never leaves an empty or partial file under the
    final name (a batch rerun would take it for done); the batch and the command line write so.

    Raises:
        ImageWriteError: unsupported extension, output exists, output is the input, DICOM output without a
            DICOM reference, NaN/Inf values, write failure.
    """
    out = Path(path).expanduser()
    check_not_input(out, volume, reference)
    suffix = _suffix(out)
    if out.is_dir() or suffix == "":
        ref = reference if reference is not None else (volume if volume.dicom_headers else None)
        if ref is None or not ref.dicom_headers:
            raise ImageWriteError(
                f"{out}: DICOM output needs a DICOM input (the volume has no DICOM headers to derive a series from); "
                f"write .nii.gz instead"
            )
        return write_dicom_derived_series(
            volume, out, ref, series_description_suffix=series_description_suffix, derivation=derivation,
            derived_image_type=derived_image_type, overwrite=overwrite, durable=durable
        )
    if suffix not in WRITE_SUFFIXES:
        raise ImageWriteError(
            f"{out}: unsupported output extension {suffix!r}; use {', '.join(WRITE_SUFFIXES)} or a folder for DICOM"
        )
    check_finite(volume, out)
    return _write_with_sitk(volume, out, output_dtype, overwrite, dicom_slice_as_3d, durable)
