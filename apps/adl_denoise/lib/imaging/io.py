"""Reading and writing medical images with their geometry and value conventions.

Supported inputs (chosen by path, see :func:`read_volume`):
  * a folder             -> one DICOM series (pydicom decodes, including JPEG 2000 via pylibjpeg; we sort and
                            validate the slices and build the geometry ourselves);
  * a single DICOM file  -> a 2D slice, or a 3D volume when it is a multi-frame (enhanced) object;
  * .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd -> SimpleITK.

Supported outputs (see :func:`write_volume`): .nii, .nii.gz, .nrrd, .mha, .mhd via SimpleITK, and a folder ->
a derived DICOM series built on the headers of the DICOM input (:func:`write_dicom_derived_series`).

Conventions (shared with the rest of ``lib``):
  * arrays in numpy/SimpleITK index order: (z, y, x) for volumes, (y, x) for 2D slices, float32;
  * spacing (mm), origin (mm) and direction in SimpleITK (x, y, z) order, LPS patient coordinates as in DICOM;
  * direction is the flattened row-major ndim x ndim matrix whose columns are the index axes' directions;
  * CT values in Hounsfield units (after DICOM rescale), padding outside the field of view set to air.

Deliberate refusals (each an :class:`ImageReadError` with a one-line message naming the path):
  * 4D or multi-component images, NaN/Inf values, zero-size images;
  * DICOM series with gantry tilt (sheared slice stack), uneven slice spacing, or several volumes in one
    series (duplicate slice positions). We never resample silently: the caller decides what to do.
"""
from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

__all__ = [
    "ImageReadError",
    "ImageWriteError",
    "Volume",
    "OutputValueRange",
    "read_volume",
    "write_volume",
    "list_dicom_series",
    "guess_modality",
    "write_dicom_derived_series",
    "value_range_for_output",
    "CT_AIR_HU",
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
]

# --------------------------------------------------------------------------------------------------------------
# Constants (documented tolerances)
# --------------------------------------------------------------------------------------------------------------

#: Value written into CT pixels that lie outside the reconstruction field of view (air; most scanners clip to it).
CT_AIR_HU = -1024.0
#: CT values at or below this are not physical (air is -1000 HU; even low-dose noise stays far above): they are
#: padding outside the field of view (-2000, -2048, -3024 ...), also when PixelPaddingValue is absent. Padding
#: closer to air (GE's -1500) is recognised through PixelPaddingValue only, so that a noisy (e.g. simulated
#: low-dose) image read back from NIfTI keeps its genuine air noise.
CT_PADDING_THRESHOLD_HU = -2000.0
#: Slice gaps may differ from the median gap by max(SLICE_GAP_ABS_TOL_MM, SLICE_GAP_REL_TOL * median) before the
#: series is called unevenly spaced (covers the rounding of ImagePositionPatient in DS strings).
SLICE_GAP_REL_TOL = 0.01
SLICE_GAP_ABS_TOL_MM = 0.01
#: Two slices closer than this along the normal are at the same position (several volumes in one series).
DUPLICATE_POSITION_TOL_MM = 1e-3
#: A slice stack is sheared (gantry tilt) when a slice lies more than SHEAR_ABS_TOL_MM off the line through the
#: first slice along the normal AND that offset corresponds to an angle above TILT_TOL_DEG.
SHEAR_ABS_TOL_MM = 0.01
TILT_TOL_DEG = 0.05
#: When GantryDetectorTilt is non-zero, the orientation must show the same tilt (within this) for the stack to be
#: accepted as a regular oblique grid; otherwise the pixel content is sheared without the header saying so.
TILT_MATCH_TOL_DEG = 0.5
#: Derived DICOM series get SeriesNumber = original + this (1000 when the original has none), capped to IS range.
DERIVED_SERIES_NUMBER_OFFSET = 1000
# Largest image read (voxels), checked from the header before any pixel is loaded: 1e9 voxels is 4 GB as
# float32, several times a whole-body CT (512 x 512 x 2000 = 5e8). Override with ADL_MAX_VOXELS.
MAX_VOXELS_DEFAULT = 1_000_000_000

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_MODALITIES = ("CT", "MR", "OT")
_INT32_MAX = 2**31 - 1


class ImageReadError(ValueError):
    """An image could not be read or is not acceptable (message: what is wrong, which path; one line)."""


class ImageWriteError(ValueError):
    """An image could not be written (message: what is wrong, which path; one line)."""


# --------------------------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """An image with its geometry, in the project's conventions.

    Attributes:
        array: float32 values in the modality's units (CT: HU after rescale), shape (z, y, x) or (y, x).
        spacing: voxel size in mm, SimpleITK (x, y[, z]) order, len == array.ndim.
        origin: position of voxel index 0 in mm (LPS patient coordinates), SimpleITK order.
        direction: flattened row-major ndim x ndim direction cosine matrix (columns = index axes).
        modality: "CT", "MR" or "OT" (other/unknown).
        source_dtype: dtype the values were stored in (after rescale): int16 for typical CT, float32 for float
            NIfTI ...; drives the output dtype in :func:`write_volume`.
        source_path: file or folder the volume was read from (None when built in memory).
        dicom_headers: pydicom Datasets without pixel data, one per slice in array z order (one per file; a
            multi-frame source has a single header and ``metadata["multiframe"]`` True); templates for derived
            series. None when not read from DICOM.
        metadata: free-form facts about the source (series/study/patient ids, window, padding counts,
            ``input_min``/``input_max`` of the values as read ...).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    modality: str = "OT"
    source_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    source_path: Path | None = None
    dicom_headers: list | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # float32 everywhere downstream; only copies when the input is not already float32
        self.array = np.asarray(self.array, dtype=np.float32)
        if self.array.ndim not in (2, 3):
            raise ValueError(f"Volume array must be 2D (y, x) or 3D (z, y, x), got shape {self.array.shape}")
        nd = self.array.ndim
        self.spacing = tuple(float(v) for v in self.spacing)
        self.origin = tuple(float(v) for v in self.origin)
        self.direction = tuple(float(v) for v in self.direction)
        if len(self.spacing) != nd or len(self.origin) != nd or len(self.direction) != nd * nd:
            raise ValueError(
                f"Volume geometry does not match a {nd}D array: spacing {self.spacing}, origin {self.origin}, "
                f"direction of {len(self.direction)} values (need {nd}, {nd}, {nd * nd})"
            )
        if not all(s > 0 and math.isfinite(s) for s in self.spacing):
            raise ValueError(f"Volume spacing must be positive and finite, got {self.spacing}")
        modality = str(self.modality).upper()
        self.modality = modality if modality in _MODALITIES else "OT"
        self.source_dtype = np.dtype(self.source_dtype)
        if self.source_path is not None:
            self.source_path = Path(self.source_path)

    @property
    def ndim(self) -> int:
        """2 for a slice (y, x), 3 for a volume (z, y, x)."""
        return int(self.array.ndim)

    @property
    def is_3d(self) -> bool:
        return self.array.ndim == 3

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def is_constant(self) -> bool:
        """True when every voxel has the same value (an empty/blank image: allowed, but useless to denoise)."""
        return bool(self.array.size == 0 or float(self.array.min()) == float(self.array.max()))

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction as an (ndim, ndim) float64 matrix whose columns are the x, y[, z] index axes."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    def to_sitk(self) -> sitk.Image:
        """A float32 SimpleITK image with this volume's spacing, origin and direction."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array, dtype=np.float32))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(
        cls, image: sitk.Image, modality: str = "OT", source_dtype: np.dtype | str | None = None, **kw: Any
    ) -> "Volume":
        """Wrap a scalar 2D/3D SimpleITK image; ``source_dtype`` defaults to the image's pixel dtype
        (float types become float32). Extra keywords (source_path, dicom_headers, metadata) go to the Volume."""
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"image has {image.GetNumberOfComponentsPerPixel()} components per pixel; only scalar images"
            )
        if image.GetDimension() not in (2, 3):
            raise ValueError(f"image is {image.GetDimension()}D; only 2D and 3D images")
        array = sitk.GetArrayViewFromImage(image)
        if source_dtype is None:
            source_dtype = array.dtype if np.issubdtype(array.dtype, np.integer) else np.dtype(np.float32)
        return cls(
            array=np.array(array, dtype=np.float32),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
            modality=modality,
            source_dtype=np.dtype(source_dtype),
            **kw,
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, modality, headers and metadata (copied dict), new values of the same shape."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"new array has shape {array.shape}, the volume has {self.array.shape}")
        return replace(self, array=array, metadata=dict(self.metadata))

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when ``other`` has the same shape, spacing, origin and direction (within ``tol``)."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol, rtol=0)
            and np.allclose(self.origin, other.origin, atol=tol, rtol=0)
            and np.allclose(self.direction, other.direction, atol=tol, rtol=0)
        )


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    """A readable single line from an exception (SimpleITK ones are multi-line with C++ file names)."""
    text = str(exc)
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
        text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = " ".join(text.split())
    if not text:
        text = type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suffix(path: Path) -> str:
    """Lower-case image suffix, treating .nii.gz as one suffix."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _normalise_modality(modality: str | None) -> str | None:
    if modality is None:
        return None
    value = str(modality).strip().upper()
    if value not in _MODALITIES:
        raise ValueError(f"modality must be one of {_MODALITIES} or None, got {modality!r}")
    return value


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_dicom_header(path: Path) -> Dataset | None:
    """The header (no pixel data) when ``path`` is a DICOM file, else None.

    Files with the 'DICM' marker are DICOM; files without the 128-byte preamble are accepted only when they
    start with a group 0002/0008 tag and parse into something with an SOP class or image size, so that junk
    next to a series is ignored instead of being force-parsed into garbage."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    magic = len(head) == 132 and head[128:132] == b"DICM"
    if not magic and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=not magic)
    except Exception:  # noqa: BLE001 - any parse failure means "not a usable DICOM file"
        return None
    if not magic and "SOPClassUID" not in ds and "Rows" not in ds:
        return None
    return ds


def _is_image_header(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds


def _float_list(value: Any, n: int) -> list[float] | None:
    """A DICOM multi-valued numeric element as n floats, or None when absent/malformed."""
    if value is None:
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _float_or(value: Any, default: float) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def _str_or_empty(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _first_number(value: Any) -> float | None:
    """First value of a possibly multi-valued DS (e.g. WindowCenter '40\\300')."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    return _float_or(value, float("nan")) if value is not None else None


def _sequence_item(ds: Dataset, *keywords: str) -> Dataset | None:
    """ds.K1[0].K2[0]... or None."""
    item: Any = ds
    for keyword in keywords:
        seq = item.get(keyword) if item is not None else None
        if not seq:
            return None
        item = seq[0]
    return item


def _as_signed_stored(value: Any, pixel_representation: int, bits: int) -> int | None:
    """PixelPaddingValue & co. as a stored integer; pydicom may hand us raw bytes or an unsigned reading of an
    ambiguous 'US or SS' element."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 2:
            return None
        value = int.from_bytes(bytes(value[:2]), "little", signed=bool(pixel_representation))
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    if pixel_representation == 1 and value >= 2 ** (bits - 1) and value < 2**bits:
        value -= 2**bits
    return value


# --------------------------------------------------------------------------------------------------------------
# Modality guess and value post-processing
# --------------------------------------------------------------------------------------------------------------


def guess_modality(array: np.ndarray) -> str:
    """'CT' when the values look like Hounsfield units, else 'MR'.

    HU images contain air (about -1000 HU) around or inside the body, so their 1st percentile is far below
    zero; MR magnitudes are >= 0 and normalised MR stays within a few units of 0. Rule: CT when the 1st
    percentile of the finite values is <= -500 and the 99.9th percentile is below 40000 (no HU image goes
    higher; guards against arbitrary signed data), otherwise MR.
    """
    values = np.asarray(array)
    if values.size == 0:
        return "MR"
    flat = values.reshape(-1)
    if flat.size > 2_000_000:  # a strided sample is plenty for percentiles and keeps this cheap
        flat = flat[:: flat.size // 1_000_000]
    flat = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if flat.size == 0:
        return "MR"
    p1, p999 = np.percentile(flat.astype(np.float64), [1.0, 99.9])
    return "CT" if (p1 <= -500.0 and p999 < 40000.0) else "MR"


def _integral_dtype_for(lo: float, hi: float) -> np.dtype:
    """Smallest of int16 / uint16 / int32 that holds the integer range [lo, hi]."""
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    if lo >= 0 and hi <= 65535:
        return np.dtype(np.uint16)
    if lo >= -(2**31) and hi <= _INT32_MAX:
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def _check_values(values: np.ndarray, path: Path) -> None:
    if values.size == 0 or 0 in values.shape:
        raise ImageReadError(f"{path} holds an empty image (shape {values.shape})")
    if np.issubdtype(values.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(values)))
        n_inf = int(np.count_nonzero(np.isinf(values)))
        if n_nan or n_inf:
            parts = (f"{n_nan} NaN values" if n_nan else "", f"{n_inf} Inf values" if n_inf else "")
            what = " and ".join(part for part in parts if part)
            raise ImageReadError(f"{path} contains {what}; replace them before denoising")


def _fill_padding(
    values: np.ndarray, modality: str, pad_mask: np.ndarray | None, fill: bool
) -> tuple[np.ndarray, dict]:
    """Set padding (from PixelPaddingValue, and for CT anything <= CT_PADDING_THRESHOLD_HU) to a neutral value.

    CT padding becomes air (CT_AIR_HU) so that noise simulation and metrics do not see -2000/-3024 "tissue";
    other modalities get 0 when their real values are >= 0, else their real minimum.
    Returns (values, metadata facts)."""
    info: dict = {}
    mask = np.zeros(values.shape, dtype=bool) if pad_mask is None else pad_mask.copy()
    n_tag = int(np.count_nonzero(mask))
    if modality == "CT":
        mask |= values <= CT_PADDING_THRESHOLD_HU
    n_total = int(np.count_nonzero(mask))
    info["n_padded"] = n_total if fill else 0
    info["n_padded_by_tag"] = n_tag if fill else 0
    if not fill or n_total == 0:
        return values, info
    if modality == "CT":
        fill_value = CT_AIR_HU
    else:
        real = values[~mask]
        real_min = float(real.min()) if real.size else 0.0
        fill_value = 0.0 if real_min >= 0 else real_min
    values = values.copy()
    values[mask] = fill_value
    info["padding_fill_value"] = float(fill_value)
    return values, info


# --------------------------------------------------------------------------------------------------------------
# Reading: entry point
# --------------------------------------------------------------------------------------------------------------


def read_volume(
    path: str | Path,
    series_uid: str | None = None,
    modality: str | None = None,
    *,
    fill_padding: bool = True,
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

    Raises:
        ImageReadError: missing/empty path, unsupported or corrupt file, 4D/multi-component, NaN/Inf,
            ambiguous folder (several series), tilted or unevenly spaced DICOM series.
    """
    p = Path(path).expanduser()
    modality = _normalise_modality(modality)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_dicom_folder(p, series_uid, modality, fill_padding)
    if not p.is_file():
        raise ImageReadError(f"{p} is neither a regular file nor a folder")
    suffix = _suffix(p)
    if suffix in READ_SUFFIXES:
        return _read_with_sitk(p, modality, fill_padding)
    if _has_dicom_magic(p) or _read_dicom_header(p) is not None:
        return _read_dicom_single_file(p, series_uid, modality, fill_padding)
    if suffix in _DICOM_SUFFIXES or suffix == "" or os.path.getsize(p) == 0:
        raise ImageReadError(f"{p} is not a DICOM file (no DICOM header found)")
    raise ImageReadError(
        f"{p}: unsupported file type {suffix!r} and not a DICOM file "
        f"(supported: DICOM file or folder, {', '.join(READ_SUFFIXES)})"
    )


# --------------------------------------------------------------------------------------------------------------
# Reading: SimpleITK formats
# --------------------------------------------------------------------------------------------------------------


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN and Inf into 0, so count them in the raw data with nibabel."""
    try:
        import nibabel
    except ImportError:  # pragma: no cover - nibabel is a project requirement
        return
    try:
        image = nibabel.load(str(path))
        if not np.issubdtype(image.header.get_data_dtype(), np.floating):
            return
        data = np.asanyarray(image.dataobj)
    except Exception:  # noqa: BLE001 - SimpleITK already read the file; nibabel is only a second opinion
        return
    _check_values(np.asarray(data), path)


def max_voxels() -> int:
    """The largest number of voxels :func:`read_volume` accepts (``ADL_MAX_VOXELS`` or the default)."""
    value = os.environ.get("ADL_MAX_VOXELS", "").strip()
    return int(float(value)) if value else MAX_VOXELS_DEFAULT


def _check_size(shape: Sequence[int], path: Path) -> None:
    n_voxels = int(np.prod([int(v) for v in shape], dtype=np.float64))
    limit = max_voxels()
    if n_voxels > limit:
        raise ImageReadError(
            f"{path} is too large: {' x '.join(str(int(v)) for v in shape)} = {n_voxels:,} voxels exceeds the limit "
            f"of {limit:,} (set ADL_MAX_VOXELS to raise it, or crop the volume)"
        )


def _read_with_sitk(path: Path, modality: str | None, fill_padding: bool) -> Volume:
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # header only: refuse a huge image before loading its pixels
        _check_size(reader.GetSize(), path)
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read {path}: {_one_line(exc)}") from exc
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
    if _suffix(path) in (".nii", ".nii.gz") and np.issubdtype(array.dtype, np.floating):
        _check_nifti_finite(path)
    _check_values(array, path)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        source_dtype = np.dtype(array.dtype) if array.dtype != bool else np.dtype(np.uint8)
    else:
        source_dtype = np.dtype(np.float32)  # float64 NIfTI etc. are written back as float32
    values = array.astype(np.float32)
    if modality is None:
        modality = guess_modality(values)
        modality_source = "guessed"
    else:
        modality_source = "argument"
    values, pad_info = _fill_padding(values, modality, None, fill_padding)
    metadata: dict = {
        "format": _suffix(path).lstrip("."),
        "modality_source": modality_source,
        "input_min": float(values.min()),
        "input_max": float(values.max()),
        **pad_info,
    }
    if pad_info["n_padded"] and np.issubdtype(source_dtype, np.integer):
        # the fill value must stay representable in the source dtype (e.g. -1024 in an unsigned CT file)
        lo, hi = float(values.min()), float(values.max())
        if lo < np.iinfo(source_dtype).min or hi > np.iinfo(source_dtype).max:
            source_dtype = _integral_dtype_for(lo, hi)
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
# Reading: DICOM series listing
# --------------------------------------------------------------------------------------------------------------


def _scan_dicom_folder(folder: Path) -> tuple[list[tuple[Path, Dataset]], int]:
    """(path, header) of every DICOM image file directly in ``folder`` (sorted by name), and the number of
    other files ignored (junk, DICOMDIR, non-image DICOM objects)."""
    found: list[tuple[Path, Dataset]] = []
    ignored = 0
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        header = _read_dicom_header(entry)
        if header is None or not _is_image_header(header):
            ignored += 1
            continue
        found.append((entry, header))
    return found, ignored


def _group_series(files: list[tuple[Path, Dataset]]) -> list[dict]:
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, header in files:
        # hard-anonymised data has an empty SeriesInstanceUID: those files form one series with uid ""
        groups.setdefault(_str_or_empty(header.get("SeriesInstanceUID")), []).append((path, header))
    series = []
    for uid, members in groups.items():
        first = members[0][1]
        number = first.get("SeriesNumber")
        series.append(
            {
                "uid": uid,
                "description": _str_or_empty(first.get("SeriesDescription")),
                "modality": _str_or_empty(first.get("Modality")),
                "n_files": len(members),
                "series_number": int(number) if number not in (None, "") else None,
                "files": [m[0] for m in members],
                "_headers": [m[1] for m in members],
            }
        )
    series.sort(key=lambda s: (s["series_number"] is None, s["series_number"] or 0, s["uid"]))
    return series


def _describe_series(s: dict) -> str:
    uid = s["uid"] or '"" (empty SeriesInstanceUID)'
    return f"{uid} ({s['description'] or 'no description'!r}, {s['modality'] or '?'}, {s['n_files']} files)"


def list_dicom_series(folder: str | Path) -> list[dict]:
    """The DICOM image series directly inside ``folder`` (subfolders are not searched).

    Each entry: ``uid`` (SeriesInstanceUID, "" when empty), ``description``, ``modality``, ``n_files``,
    ``series_number`` (int or None) and ``files`` (paths). Non-DICOM files are ignored.

    Raises:
        ImageReadError: the folder is missing, not a folder, or holds no DICOM image file.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ImageReadError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ImageReadError(f"{folder} is not a folder")
    files, ignored = _scan_dicom_folder(folder)
    if not files:
        entries = list(folder.iterdir())
        if not entries:
            raise ImageReadError(f"{folder} is an empty folder (no DICOM files)")
        subdirs = [e.name for e in entries if e.is_dir()]
        hint = (
            f"; subfolders are not searched, point to the one holding the slices (e.g. {subdirs[0]})" if subdirs else ""
        )
        raise ImageReadError(f"{folder} contains no DICOM image files ({ignored} other files ignored){hint}")
    return [{k: v for k, v in s.items() if not k.startswith("_")} for s in _group_series(files)]


# --------------------------------------------------------------------------------------------------------------
# Reading: DICOM geometry
# --------------------------------------------------------------------------------------------------------------


class _StackGeometry(NamedTuple):
    order: np.ndarray  # indices of the input slices/frames in array z order
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def _orientation_axes(iop: Sequence[float], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row = np.asarray(iop[:3], dtype=np.float64)
    col = np.asarray(iop[3:6], dtype=np.float64)
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        raise ImageReadError(f"{where}: ImageOrientationPatient {list(iop)} has a zero vector")
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    if abs(float(row @ col)) > 1e-3:
        raise ImageReadError(f"{where}: ImageOrientationPatient {list(iop)} is not orthogonal")
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _stack_geometry(
    positions: np.ndarray,
    orientations: np.ndarray,
    pixel_spacings: np.ndarray,
    tilts: Sequence[float | None],
    where: str,
    example_file: Path | None,
) -> _StackGeometry:
    """Order slices along the normal and validate that they form a regular 3D grid.

    positions (n, 3) ImagePositionPatient; orientations (n, 6) ImageOrientationPatient; pixel_spacings (n, 2)
    PixelSpacing (row spacing, column spacing) in mm; tilts: GantryDetectorTilt per slice (degrees or None).
    Geometry as SimpleITK's series reader builds it: slices sorted by their projection on
    normal = row x col (ascending), origin = first slice's position, direction columns (row, col, normal).
    """
    n = positions.shape[0]
    if not np.allclose(orientations, orientations[0], atol=1e-4, rtol=0):
        raise ImageReadError(f"{where}: slices have different ImageOrientationPatient; not one volume")
    if not np.allclose(pixel_spacings, pixel_spacings[0], atol=1e-4, rtol=0):
        found = sorted({tuple(np.round(p, 4)) for p in pixel_spacings})
        raise ImageReadError(f"{where}: slices have different PixelSpacing {found}; not one volume")
    row, col, normal = _orientation_axes(orientations[0], where)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    pos = positions[order]
    s = along[order]
    gaps = np.diff(s)
    n_dup = int(np.count_nonzero(gaps < DUPLICATE_POSITION_TOL_MM))
    if n_dup:
        raise ImageReadError(
            f"{where}: {n_dup + 1} slices share a position out of {n}; the series holds several volumes (echoes, "
            f"phases or time points); 4D is not supported, give one 3D volume (split the series first)"
        )

    # Gantry tilt: positions move along the table while the slice plane is tilted, i.e. the stack is sheared.
    offsets = (pos - pos[0]) - np.outer(s - s[0], normal)
    deviation = np.linalg.norm(offsets, axis=1)
    angles = np.degrees(np.arctan2(deviation, np.abs(s - s[0])))
    tag_tilts = [t for t in tilts if t is not None and abs(t) > TILT_TOL_DEG]
    tag_tilt = tag_tilts[0] if tag_tilts else None
    sheared = bool(np.any((deviation > SHEAR_ABS_TOL_MM) & (angles > TILT_TOL_DEG)))
    normal_tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))  # plane tilt w.r.t. the axial plane
    hidden_tilt = tag_tilt is not None and abs(normal_tilt - abs(tag_tilt)) > TILT_MATCH_TOL_DEG
    if sheared or hidden_tilt:
        tilt = abs(tag_tilt) if tag_tilt is not None else float(angles.max())
        why = (
            "slice positions are sheared relative to the slice normal"
            if sheared
            else "the orientation does not show the tilt, so the pixel content is sheared"
        )
        example = f" (e.g. read_volume('{example_file}'))" if example_file is not None else ""
        raise ImageReadError(
            f"{where}: the series has a gantry tilt of {tilt:.1f}° ({why}); the volume cannot be represented on a "
            f"regular grid; read individual slices as 2D{example} or correct the tilt with dedicated software"
        )

    median = float(np.median(gaps))
    tol = max(SLICE_GAP_ABS_TOL_MM, SLICE_GAP_REL_TOL * median)
    bad = np.flatnonzero(np.abs(gaps - median) > tol)
    if bad.size:
        k = int(bad[0])
        raise ImageReadError(
            f"{where}: uneven slice spacing: gaps range from {gaps.min():.3f} to {gaps.max():.3f} mm (median "
            f"{median:.3f} mm, tolerance {tol:.3f} mm; {bad.size} gaps off, first between sorted slices {k + 1} and "
            f"{k + 2}: {gaps[k]:.3f} mm); missing slices or mixed acquisitions? Not resampled: read slices as 2D "
            f"or resample with dedicated software"
        )
    step = float((s[-1] - s[0]) / (n - 1))
    direction = np.column_stack([row, col, normal])
    return _StackGeometry(
        order=order,
        spacing=(float(pixel_spacings[0][1]), float(pixel_spacings[0][0]), step),
        origin=tuple(float(v) for v in pos[0]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _plane_geometry_2d(ipp: list[float] | None, iop: list[float] | None, where: str) -> tuple[tuple, tuple, str]:
    """2D origin/direction for one slice. Exact when the plane is axial (its x/y axes are patient x/y); an
    oblique plane cannot be described in 2D patient coordinates, so it gets origin 0 / identity and the full
    geometry stays in metadata (image_position_patient / image_orientation_patient)."""
    if ipp is None or iop is None:
        return (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), "no ImagePositionPatient/ImageOrientationPatient"
    row, col, normal = _orientation_axes(iop, where)
    if abs(abs(float(normal[2])) - 1.0) < 1e-6:
        return (ipp[0], ipp[1]), (row[0], col[0], row[1], col[1]), "axial"
    return (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), "oblique (see image_position_patient/image_orientation_patient)"


# --------------------------------------------------------------------------------------------------------------
# Reading: DICOM pixel values
# --------------------------------------------------------------------------------------------------------------


def _check_pixel_format(ds: Dataset, path: Path) -> None:
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ImageReadError(
            f"{path} has {samples} samples per pixel ({ds.get('PhotometricInterpretation', '?')}); 4D or "
            f"multi-component (colour) images are not supported, give one 3D volume"
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{path} is a DICOM file without pixel data ({ds.get('SOPClassUID', 'unknown class')})")


def _decode_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored pixel values ((rows, cols) or (frames, rows, cols)); decoder failures become ImageReadError."""
    try:
        array = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data, missing decoder ... all mean "cannot read"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown transfer syntax"
        raise ImageReadError(f"cannot decode the pixel data of {path} ({name}): {_one_line(exc)}") from exc
    return np.asarray(array)


def _rescale_of(item: Dataset | None, fallback: Dataset) -> tuple[float, float]:
    source = item if item is not None and "RescaleSlope" in item else fallback
    slope = _float_or(source.get("RescaleSlope", 1.0), 1.0)
    intercept = _float_or(source.get("RescaleIntercept", 0.0), 0.0)
    return (slope if slope != 0 else 1.0), intercept


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or within [PixelPaddingValue, PixelPaddingRangeLimit]), in stored
    values (the tags are defined before rescale)."""
    if "PixelPaddingValue" not in ds:
        return None
    rep = int(ds.get("PixelRepresentation", 0) or 0)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    value = _as_signed_stored(ds["PixelPaddingValue"].value, rep, bits)
    if value is None:
        return None
    limit = _as_signed_stored(ds["PixelPaddingRangeLimit"].value, rep, bits) if "PixelPaddingRangeLimit" in ds else None
    if limit is None:
        return stored == value
    lo, hi = min(value, limit), max(value, limit)
    return (stored >= lo) & (stored <= hi)


def _modality_of(ds: Dataset, modality_arg: str | None) -> tuple[str, str]:
    tag = _str_or_empty(ds.get("Modality")).upper()
    if tag in ("CT", "MR"):
        return tag, "dicom"
    if modality_arg is not None:
        return modality_arg, "argument"
    return "OT", "dicom"


def _source_dtype_from_rescale(
    rescales: Sequence[tuple[float, float]], stored_integer: bool, lo: float, hi: float
) -> np.dtype:
    """Values are integers when stored integers go through integer slopes and intercepts (the common CT case
    slope 1, intercept -1024): then int16 if it fits (uint16 / int32 otherwise), else float32."""
    integral = stored_integer and all(float(s).is_integer() and float(i).is_integer() for s, i in rescales)
    return _integral_dtype_for(lo, hi) if integral else np.dtype(np.float32)


def _is_lossy_syntax(syntax: Any) -> bool:
    try:
        return syntax is not None and not syntax.is_lossless
    except (AttributeError, ValueError):  # private or unknown transfer syntax: no claim either way
        return False


def _dicom_metadata(ds: Dataset, path: Path) -> dict:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    meta = {
        "format": "dicom",
        "series_instance_uid": _str_or_empty(ds.get("SeriesInstanceUID")),
        "series_description": _str_or_empty(ds.get("SeriesDescription")),
        "series_number": ds.get("SeriesNumber"),
        "study_instance_uid": _str_or_empty(ds.get("StudyInstanceUID")),
        "study_description": _str_or_empty(ds.get("StudyDescription")),
        "study_date": _str_or_empty(ds.get("StudyDate")),
        "patient_id": _str_or_empty(ds.get("PatientID")),
        "patient_name": _str_or_empty(ds.get("PatientName")),
        "frame_of_reference_uid": _str_or_empty(ds.get("FrameOfReferenceUID")),
        "dicom_modality": _str_or_empty(ds.get("Modality")),
        "manufacturer": _str_or_empty(ds.get("Manufacturer")),
        "convolution_kernel": _str_or_empty(ds.get("ConvolutionKernel")),
        "slice_thickness": _first_number(ds.get("SliceThickness")),
        "transfer_syntax": str(syntax) if syntax is not None else "",
        "lossy_compressed": _str_or_empty(ds.get("LossyImageCompression")) == "01" or _is_lossy_syntax(syntax),
        "photometric_interpretation": _str_or_empty(ds.get("PhotometricInterpretation")),
    }
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and math.isfinite(center) and math.isfinite(width):
        meta["window_center"], meta["window_width"] = center, width
    tilt = ds.get("GantryDetectorTilt")
    if tilt not in (None, ""):
        meta["gantry_tilt_deg"] = _float_or(tilt, 0.0)
    return meta


def _strip_pixels(ds: Dataset) -> Dataset:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _finish_dicom_volume(
    stored_slices: list[np.ndarray],
    rescales: list[tuple[float, float]],
    pad_masks: list[np.ndarray | None],
    ds0: Dataset,
    path: Path,
    modality_arg: str | None,
    fill_padding: bool,
) -> tuple[np.ndarray, str, np.dtype, dict]:
    """Rescale stored slices to physical values, fill padding; returns (float32 values, modality, source
    dtype, metadata facts)."""
    stored = np.stack(stored_slices)
    stored_integer = np.issubdtype(stored.dtype, np.integer)
    _check_values(stored, path)
    values = np.empty(stored.shape, dtype=np.float64)
    for k, (slope, intercept) in enumerate(rescales):
        values[k] = stored[k].astype(np.float64) * slope + intercept  # float math, exact for 16-bit integers
    modality, modality_source = _modality_of(ds0, modality_arg)
    mask = None
    if any(m is not None for m in pad_masks):
        mask = np.stack([m if m is not None else np.zeros(stored.shape[1:], dtype=bool) for m in pad_masks])
    values, pad_info = _fill_padding(values, modality, mask, fill_padding)
    lo, hi = float(values.min()), float(values.max())
    source_dtype = _source_dtype_from_rescale(rescales, stored_integer, lo, hi)
    info = {
        "modality_source": modality_source,
        "rescale_slope": rescales[0][0],
        "rescale_intercept": rescales[0][1],
        "input_min": lo,
        "input_max": hi,
        **pad_info,
    }
    return values.astype(np.float32), modality, source_dtype, info


# --------------------------------------------------------------------------------------------------------------
# Reading: DICOM single file (2D slice or multi-frame)
# --------------------------------------------------------------------------------------------------------------


def _dcmread_full(path: Path) -> FileDataset:
    try:
        return pydicom.dcmread(str(path), force=not _has_dicom_magic(path))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ImageReadError(f"cannot parse the DICOM file {path}: {_one_line(exc)}") from exc


def _read_dicom_single_file(path: Path, series_uid: str | None, modality_arg: str | None, fill_padding: bool) -> Volume:
    ds = _dcmread_full(path)
    if not _is_image_header(ds):
        raise ImageReadError(
            f"{path} is a DICOM file without image attributes (no Rows/Columns: truncated, or not an image object; "
            f"SOP class {ds.get('SOPClassUID', 'unknown')})"
        )
    if series_uid is not None and _str_or_empty(ds.get("SeriesInstanceUID")) != series_uid:
        raise ImageReadError(
            f"{path} belongs to series {_str_or_empty(ds.get('SeriesInstanceUID'))!r}, not the requested {series_uid!r}"
        )
    _check_pixel_format(ds, path)
    n_frames = int(_float_or(ds.get("NumberOfFrames", 1), 1.0))
    _check_size((n_frames, int(ds.Rows), int(ds.Columns)), path)
    if n_frames > 1:
        return _read_multiframe(ds, path, modality_arg, fill_padding)

    stored = _decode_pixels(ds, path)
    if stored.ndim != 2:
        raise ImageReadError(f"{path}: unexpected pixel array shape {stored.shape} for a single-frame image")
    rescale = _rescale_of(None, ds)
    values, modality, source_dtype, info = _finish_dicom_volume(
        [stored], [rescale], [_padding_mask(ds, stored)], ds, path, modality_arg, fill_padding
    )
    ps = _float_list(ds.get("PixelSpacing"), 2) or _float_list(ds.get("ImagerPixelSpacing"), 2)
    ipp = _float_list(ds.get("ImagePositionPatient"), 3)
    iop = _float_list(ds.get("ImageOrientationPatient"), 6)
    origin, direction, plane = _plane_geometry_2d(ipp, iop, str(path))
    metadata = _dicom_metadata(ds, path)
    metadata.update(info)
    # a slice's extent along its normal, for writing it as a one-slice 3D image (the order SimpleITK uses, then
    # the nominal thickness)
    slice_step = _float_or(ds.get("SpacingBetweenSlices"), 0.0) or _float_or(ds.get("SliceThickness"), 0.0) or 1.0
    metadata.update(
        {
            "image_position_patient": ipp,
            "image_orientation_patient": iop,
            "plane_geometry": plane,
            "slice_spacing": abs(slice_step),
            "multiframe": False,
        }
    )
    if ps is None:
        metadata["spacing_note"] = "no PixelSpacing: 1 mm assumed"
    header = _strip_pixels(ds)
    return Volume(
        array=values[0],
        spacing=(ps[1], ps[0]) if ps else (1.0, 1.0),
        origin=origin,
        direction=direction,
        modality=modality,
        source_dtype=source_dtype,
        source_path=path,
        dicom_headers=[header],
        metadata=metadata,
    )


def _read_multiframe(ds: FileDataset, path: Path, modality_arg: str | None, fill_padding: bool) -> Volume:
    """A multi-frame object (enhanced CT/MR or legacy multi-frame) as a 3D volume."""
    frames = _decode_pixels(ds, path)
    n = int(_float_or(ds.get("NumberOfFrames", 1), 1.0))
    if frames.ndim != 3 or frames.shape[0] != n:
        raise ImageReadError(f"{path}: pixel array shape {frames.shape} does not match NumberOfFrames {n}")
    shared = _sequence_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []

    def frame_item(k: int, *keywords: str) -> Dataset | None:
        item = _sequence_item(per_frame[k], *keywords) if k < len(per_frame) else None
        return item if item is not None else (_sequence_item(shared, *keywords) if shared is not None else None)

    positions, orientations, spacings, rescales = [], [], [], []
    geometry_complete = True
    for k in range(n):
        pos_item = frame_item(k, "PlanePositionSequence")
        ori_item = frame_item(k, "PlaneOrientationSequence")
        mea_item = frame_item(k, "PixelMeasuresSequence")
        ipp = _float_list(pos_item.get("ImagePositionPatient") if pos_item else None, 3)
        iop = _float_list(ori_item.get("ImageOrientationPatient") if ori_item else ds.get("ImageOrientationPatient"), 6)
        ps = _float_list(mea_item.get("PixelSpacing") if mea_item else ds.get("PixelSpacing"), 2)
        if ipp is None or iop is None or ps is None:
            geometry_complete = False
        positions.append(ipp)
        orientations.append(iop)
        spacings.append(ps)
        rescales.append(_rescale_of(frame_item(k, "PixelValueTransformationSequence"), ds))

    metadata = _dicom_metadata(ds, path)
    if geometry_complete:
        geom = _stack_geometry(
            np.asarray(positions), np.asarray(orientations), np.asarray(spacings),
            [_float_or(ds.get("GantryDetectorTilt"), 0.0)], str(path), None,
        )
        order, spacing, origin, direction = geom
        metadata["geometry_source"] = "per-frame functional groups"
    else:
        # legacy multi-frame (e.g. NM) or incomplete headers: frames in file order, spacing from the header
        order = np.arange(n)
        ps = _float_list(ds.get("PixelSpacing"), 2) or [1.0, 1.0]
        step = _float_or(ds.get("SpacingBetweenSlices"), 0.0) or _float_or(ds.get("SliceThickness"), 0.0) or 1.0
        ipp = _float_list(ds.get("ImagePositionPatient"), 3) or [0.0, 0.0, 0.0]
        iop = _float_list(ds.get("ImageOrientationPatient"), 6)
        if iop is not None:
            row, col, normal = _orientation_axes(iop, str(path))
            direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
        else:
            direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        spacing, origin = (ps[1], ps[0], abs(step)), tuple(ipp)
        metadata["geometry_source"] = "header fallback (no per-frame positions): frames in file order"
    stored = [frames[k] for k in order]
    values, modality, source_dtype, info = _finish_dicom_volume(
        stored, [rescales[k] for k in order], [_padding_mask(ds, s) for s in stored], ds, path, modality_arg,
        fill_padding,
    )
    metadata.update(info)
    metadata.update({"multiframe": True, "frame_order": [int(k) for k in order]})
    return Volume(
        array=values,
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=modality,
        source_dtype=source_dtype,
        source_path=path,
        dicom_headers=[_strip_pixels(ds)],
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------------------------------
# Reading: DICOM folder
# --------------------------------------------------------------------------------------------------------------


def _read_dicom_folder(folder: Path, series_uid: str | None, modality_arg: str | None, fill_padding: bool) -> Volume:
    files, ignored = _scan_dicom_folder(folder)
    if not files:
        list_dicom_series(folder)  # raises the right "empty folder" / "no DICOM" message
    series = _group_series(files)
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(_describe_series(s) for s in series)
            raise ImageReadError(f"{folder} holds {len(series)} DICOM series, pass series_uid= one of: {listing}")
        chosen = series[0]
    else:
        matches = [s for s in series if s["uid"] == series_uid]
        if not matches:
            listing = "; ".join(_describe_series(s) for s in series)
            raise ImageReadError(f"{folder} has no series with uid {series_uid!r}; available: {listing}")
        chosen = matches[0]

    paths: list[Path] = chosen["files"]
    headers: list[Dataset] = chosen["_headers"]
    if len(paths) == 1:
        volume = _read_dicom_single_file(paths[0], None, modality_arg, fill_padding)
        volume.metadata["n_files_ignored"] = ignored
        return volume
    multi = [p for p, h in zip(paths, headers) if int(_float_or(h.get("NumberOfFrames", 1), 1.0)) > 1]
    if multi:
        raise ImageReadError(
            f"{folder}: series {chosen['uid']!r} mixes {len(multi)} multi-frame files with other files; read one "
            f"multi-frame file directly (e.g. {multi[0]})"
        )
    where = f"{folder} (series {chosen['uid'] or 'with empty SeriesInstanceUID'})"
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise ImageReadError(f"{where}: slices have different sizes {sorted(sizes)}; not one volume")
    _check_size((len(paths), *next(iter(sizes))), folder)

    positions, orientations, spacings, tilts = [], [], [], []
    for path, header in zip(paths, headers):
        ipp = _float_list(header.get("ImagePositionPatient"), 3)
        iop = _float_list(header.get("ImageOrientationPatient"), 6)
        ps = _float_list(header.get("PixelSpacing"), 2) or _float_list(header.get("ImagerPixelSpacing"), 2)
        if ipp is None or iop is None:
            raise ImageReadError(
                f"{where}: {path.name} has no ImagePositionPatient/ImageOrientationPatient, so the slices cannot be "
                f"ordered; read files one by one as 2D"
            )
        positions.append(ipp)
        orientations.append(iop)
        spacings.append(ps or [1.0, 1.0])
        tilt = header.get("GantryDetectorTilt")
        tilts.append(_float_or(tilt, 0.0) if tilt not in (None, "") else None)
    geom = _stack_geometry(
        np.asarray(positions), np.asarray(orientations), np.asarray(spacings), tilts, where, paths[0]
    )

    stored_slices, rescales, masks, full_headers = [], [], [], []
    for k in geom.order:
        ds = _dcmread_full(paths[k])
        _check_pixel_format(ds, paths[k])
        stored = _decode_pixels(ds, paths[k])
        if stored.shape != (int(ds.Rows), int(ds.Columns)):
            raise ImageReadError(f"{paths[k]}: pixel array shape {stored.shape} does not match Rows x Columns")
        stored_slices.append(stored)
        rescales.append(_rescale_of(None, ds))
        masks.append(_padding_mask(ds, stored))
        full_headers.append(_strip_pixels(ds))
    ds0 = full_headers[0]
    values, modality, source_dtype, info = _finish_dicom_volume(
        stored_slices, rescales, masks, ds0, folder, modality_arg, fill_padding
    )
    metadata = _dicom_metadata(ds0, folder)
    metadata.update(info)
    metadata.update(
        {
            "multiframe": False,
            "n_files_ignored": ignored,
            "files": [str(paths[k]) for k in geom.order],
        }
    )
    if any(s is None for s in _float_list_all(headers, "PixelSpacing")):
        metadata["spacing_note"] = "no PixelSpacing on some slices: ImagerPixelSpacing or 1 mm used"
    return Volume(
        array=values,
        spacing=geom.spacing,
        origin=geom.origin,
        direction=geom.direction,
        modality=modality,
        source_dtype=source_dtype,
        source_path=folder,
        dicom_headers=full_headers,
        metadata=metadata,
    )


def _float_list_all(headers: list[Dataset], keyword: str) -> list[list[float] | None]:
    return [_float_list(h.get(keyword), 2) for h in headers]


# --------------------------------------------------------------------------------------------------------------
# Writing: value conventions
# --------------------------------------------------------------------------------------------------------------


class OutputValueRange(NamedTuple):
    """How values are written: output dtype and the clip bounds applied before the cast (None = unbounded)."""

    dtype: np.dtype
    low: float | None
    high: float | None


def value_range_for_output(volume: Volume, output_dtype: str | np.dtype | None = None) -> OutputValueRange:
    """Output dtype and clip range for ``volume`` (see :func:`write_volume` for the conventions).

    * dtype: ``output_dtype`` if given, else the source dtype when it is an integer type, else float32;
    * integer dtypes: values are rounded and clipped to the dtype's range (CT stays in HU, int16 for CT);
    * MR whose input minimum (``metadata["input_min"]``, else the current minimum) was >= 0 is clipped at 0:
      magnitudes cannot be negative and a denoiser's undershoot must not wrap around in unsigned output.
    """
    if output_dtype is not None:
        dtype = np.dtype(output_dtype)
    elif np.issubdtype(volume.source_dtype, np.integer):
        dtype = np.dtype(volume.source_dtype)
    else:
        dtype = np.dtype(np.float32)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ImageWriteError(f"unsupported output dtype {dtype}")
    low: float | None = None
    high: float | None = None
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        low, high = float(info.min), float(info.max)
    if volume.modality == "MR":
        input_min = volume.metadata.get("input_min")
        if input_min is None and volume.array.size:
            input_min = float(volume.array.min())
        if input_min is not None and input_min >= 0:
            low = 0.0 if low is None else max(low, 0.0)
    return OutputValueRange(dtype, low, high)


def _values_for_output(volume: Volume, output_dtype: str | np.dtype | None) -> np.ndarray:
    vr = value_range_for_output(volume, output_dtype)
    values = volume.array.astype(np.float64)
    if np.issubdtype(vr.dtype, np.integer):
        values = np.rint(values)
    if vr.low is not None or vr.high is not None:
        values = np.clip(values, vr.low, vr.high)
    return values.astype(vr.dtype)


# --------------------------------------------------------------------------------------------------------------
# Writing: guards and atomic file system operations
# --------------------------------------------------------------------------------------------------------------


def _same_path(a: Path, b: Path | None) -> bool:
    if b is None:
        return False
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False


def _check_not_input(out: Path, *volumes: Volume | None) -> None:
    for volume in volumes:
        if volume is None:
            continue
        sources = [volume.source_path] + [Path(f) for f in volume.metadata.get("files", [])]
        for source in sources:
            if _same_path(out, source):
                raise ImageWriteError(f"refusing to write the output onto the input {source}; choose another path")
            if source is not None and _is_inside(Path(source), out):
                # e.g. a slice read from series/01.dcm written to series/ with overwrite=True
                raise ImageWriteError(f"refusing to write {out}: it holds the input {source}; choose another path")


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        return folder.resolve() in path.resolve().parents
    except OSError:
        return False


def _check_finite(volume: Volume, out: Path) -> None:
    if volume.array.size == 0:
        raise ImageWriteError(f"refusing to write an empty image to {out}")
    bad = int(np.count_nonzero(~np.isfinite(volume.array)))
    if bad:
        raise ImageWriteError(f"refusing to write {out}: the volume contains {bad} NaN/Inf values")


def _make_temp_dir(parent: Path, name: str) -> Path:
    # os.mkdir honours the umask (tempfile.mkdtemp would make the final folder 0700)
    temp = parent / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(temp)
    return temp


def _dicom_slice_geometry(volume: Volume) -> tuple[tuple, tuple, tuple] | None:
    """(spacing, origin, direction) of a 2D DICOM slice as a one-slice 3D image in patient coordinates, when the
    volume is a 2D slice read from DICOM with ImagePositionPatient/ImageOrientationPatient; else None."""
    ipp = volume.metadata.get("image_position_patient")
    iop = volume.metadata.get("image_orientation_patient")
    if volume.ndim != 2 or ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    row, col, normal = _orientation_axes(iop, "slice")
    step = float(volume.metadata.get("slice_spacing") or 1.0)
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
    return (volume.spacing[0], volume.spacing[1], step), tuple(float(v) for v in ipp), direction


def _write_with_sitk(
    volume: Volume, out: Path, output_dtype: str | np.dtype | None, overwrite: bool, slice_geometry: bool = True
) -> Path:
    if out.exists() and not overwrite:
        raise ImageWriteError(f"{out} already exists; pass overwrite=True to replace it")
    if out.is_dir():
        raise ImageWriteError(f"{out} is a folder; give a file name ending in {', '.join(WRITE_SUFFIXES)}")
    array = _values_for_output(volume, output_dtype)
    geometry = (volume.spacing, volume.origin, volume.direction)
    patient_geometry = _dicom_slice_geometry(volume) if slice_geometry else None
    if patient_geometry is not None:
        array, geometry = array[np.newaxis], patient_geometry
    try:
        image = sitk.GetImageFromArray(array)
    except RuntimeError as exc:
        raise ImageWriteError(f"cannot write {out}: dtype {array.dtype} not supported ({_one_line(exc)})") from exc
    image.SetSpacing(geometry[0])
    image.SetOrigin(geometry[1])
    image.SetDirection(geometry[2])
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        temp = _make_temp_dir(parent, out.name)
    except OSError as exc:
        raise ImageWriteError(f"cannot create {parent} for {out}: {_one_line(exc)}") from exc
    try:
        try:
            # compression: .nii.gz is gzipped by name; .nrrd/.mha/.mhd get zlib, .nii ignores the flag
            sitk.WriteImage(image, str(temp / out.name), True)
        except RuntimeError as exc:
            raise ImageWriteError(f"cannot write {out}: {_one_line(exc)}") from exc
        produced = sorted(temp.iterdir())  # .mhd writes a companion .zraw/.raw
        clashes = [parent / p.name for p in produced if (parent / p.name).exists() and p.name != out.name]
        if clashes and not overwrite:
            raise ImageWriteError(f"{clashes[0]} (written with {out.name}) already exists; pass overwrite=True")
        # the data file first and the header last, so a reader never sees a header without its data
        for item in sorted(produced, key=lambda p: p.name == out.name):
            os.replace(item, parent / item.name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# Writing: entry point
# --------------------------------------------------------------------------------------------------------------


def write_volume(
    volume: Volume,
    path: str | Path,
    *,
    output_dtype: str | np.dtype | None = None,
    overwrite: bool = False,
    series_description_suffix: str = " [denoised]",
    reference: Volume | None = None,
    dicom_slice_as_3d: bool = True,
) -> Path:
    """Write ``volume`` to ``path`` and return the path written.

    Format by path: .nii/.nii.gz/.nrrd/.mha/.mhd -> SimpleITK with origin, spacing and direction as in the
    volume (NIfTI stores them as float32: exact to ~1e-6 mm); a folder (existing, or a new name without
    extension) -> derived DICOM series (:func:`write_dicom_derived_series`) built on ``reference`` or, by
    default, on the volume's own ``dicom_headers``.

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
    failure leaves no partial output.

    Raises:
        ImageWriteError: unsupported extension, output exists, output is the input, DICOM output without a
            DICOM reference, NaN/Inf values, write failure.
    """
    out = Path(path).expanduser()
    _check_not_input(out, volume, reference)
    suffix = _suffix(out)
    if out.is_dir() or suffix == "":
        ref = reference if reference is not None else (volume if volume.dicom_headers else None)
        if ref is None or not ref.dicom_headers:
            raise ImageWriteError(
                f"{out}: DICOM output needs a DICOM input (the volume has no DICOM headers to derive a series from); "
                f"write .nii.gz instead"
            )
        return write_dicom_derived_series(
            volume, out, ref, series_description_suffix=series_description_suffix, overwrite=overwrite
        )
    if suffix not in WRITE_SUFFIXES:
        raise ImageWriteError(
            f"{out}: unsupported output extension {suffix!r}; use {', '.join(WRITE_SUFFIXES)} or a folder for DICOM"
        )
    _check_finite(volume, out)
    return _write_with_sitk(volume, out, output_dtype, overwrite, dicom_slice_as_3d)


# --------------------------------------------------------------------------------------------------------------
# Writing: derived DICOM series
# --------------------------------------------------------------------------------------------------------------

# Pixel-related or instance-specific elements of the source that no longer apply to derived pixels.
_DROP_KEYWORDS = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
    "NumberOfFrames", "FrameIncrementPointer", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    "DimensionOrganizationSequence", "DimensionIndexSequence", "IconImageSequence", "ModalityLUTSequence",
    "VOILUTSequence", "PlanarConfiguration", "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor", "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "PixelAspectRatio", "SourceImageSequence", "DerivationCodeSequence", "RescaleType", "PixelDataProviderURL",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "DataSetTrailingPadding",
    "RealWorldValueMappingSequence", "PresentationLUTShape",
)

_MULTIFRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
}


def _ds_text(value: float) -> str:
    """A DS string (<= 16 chars) for value; callers re-parse it so stored values use exactly what is written."""
    return str(DSfloat(float(value), auto_format=True))


class _Encoding(NamedTuple):
    stored: np.ndarray  # int16 or uint16, same shape as the values
    slope: float
    intercept: float
    signed: bool


def _encode_dicom_values(values: np.ndarray, integral: bool) -> _Encoding:
    """16-bit stored values with RescaleSlope/Intercept for physical ``values``.

    Integral data (CT in HU, integer MR): slope 1, intercept 0 when the rounded values fit int16 (uint16 for
    non-negative data); a wider integer range keeps slope 1 and shifts the intercept, and only a range beyond
    65535 needs an integer slope > 1. Non-integral (float) data: the full 16-bit range is used, uint16 with
    intercept 0 for non-negative data, else int16 centred on the data; precision is slope / 2.
    """
    v = values.astype(np.float64)
    if integral:
        r = np.rint(v)
        lo, hi = float(r.min()), float(r.max())
        if lo >= -32768 and hi <= 32767:
            return _Encoding(r.astype(np.int16), 1.0, 0.0, True)
        if lo >= 0 and hi <= 65535:
            return _Encoding(r.astype(np.uint16), 1.0, 0.0, False)
        slope = float(max(1, math.ceil((hi - lo) / 65535.0)))
        intercept = float(math.floor(lo + 32768 * slope))
        stored = np.clip(np.rint((r - intercept) / slope), -32768, 32767).astype(np.int16)
        return _Encoding(stored, slope, intercept, True)
    lo, hi = float(v.min()), float(v.max())
    if lo >= 0:
        slope = float(_ds_text(hi / 65535.0)) if hi > 0 else 1.0
        if slope * 65535.0 < hi:  # DS rounding went down: nudge so the maximum still fits
            slope = float(_ds_text(slope * (1 + 1e-6)))
        stored = np.clip(np.rint(v / slope), 0, 65535).astype(np.uint16)
        return _Encoding(stored, slope, 0.0, False)
    intercept = float(_ds_text((hi + lo) / 2.0))
    half = max(hi - intercept, intercept - lo)
    slope = float(_ds_text(half / 32767.0 * (1 + 1e-6))) if half > 0 else 1.0
    stored = np.clip(np.rint((v - intercept) / slope), -32768, 32767).astype(np.int16)
    return _Encoding(stored, slope, intercept, True)


def _sop_class_for(volume: Volume, source_class: str) -> str:
    if volume.modality == "CT":
        return str(CTImageStorage)
    if volume.modality == "MR":
        return str(MRImageStorage)
    if source_class and source_class not in _MULTIFRAME_SOP_CLASSES:
        return source_class
    return str(SecondaryCaptureImageStorage)


def _source_sop(header: Dataset) -> tuple[str, str]:
    """(SOPClassUID, SOPInstanceUID) of a source header, falling back to the file meta (hard-anonymised data)."""
    meta = getattr(header, "file_meta", None)
    sop_class = _str_or_empty(header.get("SOPClassUID")) or _str_or_empty(
        meta.get("MediaStorageSOPClassUID") if meta is not None else None
    )
    sop_uid = _str_or_empty(header.get("SOPInstanceUID")) or _str_or_empty(
        meta.get("MediaStorageSOPInstanceUID") if meta is not None else None
    )
    return sop_class, sop_uid


def _derived_series_number(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return DERIVED_SERIES_NUMBER_OFFSET
    return min(number + DERIVED_SERIES_NUMBER_OFFSET, _INT32_MAX)


def _build_derived_datasets(volume: Volume, reference: Volume, suffix: str) -> list[tuple[str, FileDataset]]:
    headers = reference.dicom_headers or []
    n_slices = 1 if volume.ndim == 2 else int(volume.array.shape[0])
    multiframe = bool(reference.metadata.get("multiframe")) or (len(headers) == 1 and n_slices > 1)
    if not multiframe and len(headers) != n_slices:
        raise ImageWriteError(
            f"the reference has {len(headers)} DICOM headers for {n_slices} slices; cannot derive a series"
        )
    first = headers[0]
    integral = volume.modality == "CT" or np.issubdtype(volume.source_dtype, np.integer)
    values = volume.array.astype(np.float64)
    vr = value_range_for_output(volume, np.float64)  # the MR >= 0 rule; the 16-bit encoding handles the rest
    if vr.low is not None:
        values = np.maximum(values, vr.low)
    encoding = _encode_dicom_values(values, integral)
    stored = encoding.stored if volume.ndim == 3 else encoding.stored[np.newaxis]

    # One set of UIDs per write: every slice shares the new series, the study and the frame of reference.
    series_uid = generate_uid()
    study_uid = _str_or_empty(first.get("StudyInstanceUID")) or generate_uid()
    frame_uid = _str_or_empty(first.get("FrameOfReferenceUID")) or generate_uid()
    patient_id = _str_or_empty(first.get("PatientID")) or "ANONYMOUS"
    source_series = _str_or_empty(first.get("SeriesInstanceUID")) or "(empty SeriesInstanceUID)"
    description = (_str_or_empty(first.get("SeriesDescription")) + suffix)[:64]
    series_number = _derived_series_number(first.get("SeriesNumber"))
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    lossy_source = bool(reference.metadata.get("lossy_compressed")) or any(
        _str_or_empty(h.get("LossyImageCompression")) == "01" for h in headers
    )
    d = np.asarray(volume.direction, dtype=np.float64).reshape(volume.ndim, volume.ndim)

    out: list[tuple[str, FileDataset]] = []
    for k in range(n_slices):
        src = headers[0 if multiframe else k]
        ds = Dataset()
        for elem in copy.deepcopy(src):
            if elem.tag.is_private or elem.tag.element == 0 or elem.tag.group == 0x0002:
                continue  # private tags describe the original reconstruction; group lengths would be stale
            if elem.keyword in _DROP_KEYWORDS:
                continue
            ds.add(elem)
        src_class, src_uid = _source_sop(src)
        sop_class = _sop_class_for(volume, src_class)
        sop_uid = generate_uid()

        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        if "PatientName" not in ds:
            ds.PatientName = ""
        ds.Modality = _str_or_empty(src.get("Modality")) or volume.modality
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        original_type = [str(v) for v in (src.get("ImageType") or [])]
        ds.ImageType = ["DERIVED", "SECONDARY"] + original_type[2:3] + ["DENOISED"]
        ds.DerivationDescription = f"Denoised (ADL denoising) from series {source_series}"[:1024]
        if src_uid and src_class:
            item = Dataset()
            item.ReferencedSOPClassUID = src_class
            item.ReferencedSOPInstanceUID = src_uid
            if multiframe:
                item.ReferencedFrameNumber = int(reference.metadata.get("frame_order", list(range(n_slices)))[k]) + 1
            ds.SourceImageSequence = [item]
        for keyword in ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
                        "PatientBirthDate", "PatientSex"):
            if keyword not in ds:
                setattr(ds, keyword, "")  # type 2 attributes must be present, possibly empty
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        if lossy_source:
            ds.LossyImageCompression = "01"  # once lossy, always flagged lossy (our pixels are uncompressed)

        if multiframe or "ImagePositionPatient" not in ds:
            # positions and orientation from the volume grid (multi-frame sources have them per frame only)
            if volume.ndim == 3:
                position = np.asarray(volume.origin) + k * volume.spacing[2] * d[:, 2]
                ds.ImagePositionPatient = [_ds_text(v) for v in position]
                ds.ImageOrientationPatient = [_ds_text(v) for v in (*d[:, 0], *d[:, 1])]
                if "SliceThickness" not in ds:
                    ds.SliceThickness = _ds_text(volume.spacing[2])
        ds.PixelSpacing = [_ds_text(volume.spacing[1]), _ds_text(volume.spacing[0])]
        if ds.SOPClassUID == str(SecondaryCaptureImageStorage) and "ConversionType" not in ds:
            ds.ConversionType = "WSD"
        if ds.SOPClassUID == str(CTImageStorage):
            for keyword in ("KVP", "AcquisitionNumber"):
                if keyword not in ds:
                    setattr(ds, keyword, None)
        if ds.SOPClassUID == str(MRImageStorage):
            # Type 1 MR Image Module attributes absent from enhanced sources: the generic "research mode" values
            defaults = {"ScanningSequence": "RM", "SequenceVariant": "NONE", "ScanOptions": "",
                        "MRAcquisitionType": "", "EchoTime": None, "EchoTrainLength": None,
                        "RepetitionTime": None}
            for keyword, value in defaults.items():
                if keyword not in ds:
                    setattr(ds, keyword, value)

        pixels = np.ascontiguousarray(stored[k])
        ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if encoding.signed else 0
        ds.RescaleIntercept = _ds_text(encoding.intercept)
        ds.RescaleSlope = _ds_text(encoding.slope)
        if volume.modality == "CT":
            ds.RescaleType = "HU"
        ds.PixelData = pixels.astype("<i2" if encoding.signed else "<u2").tobytes()
        ds["PixelData"].VR = "OW"

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "ADL_DENOISE"
        file_ds = FileDataset(f"IM{k + 1:05d}.dcm", ds, file_meta=meta, preamble=b"\0" * 128)
        file_ds.is_little_endian = True
        file_ds.is_implicit_VR = False
        out.append((f"IM{k + 1:05d}.dcm", file_ds))
    return out


def write_dicom_derived_series(
    volume: Volume,
    out_dir: str | Path,
    reference: Volume,
    *,
    series_description_suffix: str = " [denoised]",
    overwrite: bool = False,
) -> Path:
    """Write ``volume`` as a new DICOM series derived from ``reference`` (read from DICOM) into ``out_dir``.

    One file per slice (array z order = InstanceNumber order), Explicit VR Little Endian, 16-bit pixels:
    CT in HU as int16 with RescaleSlope 1 / RescaleIntercept 0 (a shifted intercept or integer slope only when
    the values exceed int16); float MR uses the full 16-bit range (see ``_encode_dicom_values``). New
    SeriesInstanceUID and SOPInstanceUIDs; patient, study and frame of reference kept (empty ones in
    hard-anonymised data are filled once per write: generated StudyInstanceUID/FrameOfReferenceUID, PatientID
    'ANONYMOUS'); ImageType DERIVED\\SECONDARY; SeriesDescription + suffix; SeriesNumber + 1000; private tags
    and pixel-specific tags (padding, LUTs, icon) dropped; SourceImageSequence points at the source slices.

    ``volume`` must be on the reference grid (same shape, spacing, origin, direction): the slices reuse the
    reference's positions. Written atomically (temporary folder renamed into place).

    Raises:
        ImageWriteError: no DICOM reference, different grid, NaN/Inf, output exists (overwrite=False) or is the
            input, write failure.
    """
    out_dir = Path(out_dir).expanduser()
    if reference is None or not reference.dicom_headers:
        raise ImageWriteError(
            f"{out_dir}: DICOM output needs a DICOM input (reference without DICOM headers); write .nii.gz instead"
        )
    _check_not_input(out_dir, volume, reference)
    if not volume.same_grid(reference):
        raise ImageWriteError(
            f"{out_dir}: the volume (shape {volume.shape}, spacing {volume.spacing}) is not on the reference DICOM "
            f"grid (shape {reference.shape}, spacing {reference.spacing}); write .nii.gz instead"
        )
    _check_finite(volume, out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ImageWriteError(f"{out_dir} exists and is a file; DICOM output needs a folder")
    existing = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise ImageWriteError(f"{out_dir} already exists and is not empty; pass overwrite=True to replace it")
    if existing:
        foreign = [p for p in existing if not (p.is_file() and _has_dicom_magic(p))]
        if foreign:
            raise ImageWriteError(
                f"refusing to replace {out_dir}: it holds non-DICOM entries (e.g. {foreign[0].name})"
            )

    datasets = _build_derived_datasets(volume, reference, series_description_suffix)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        temp = _make_temp_dir(parent, out_dir.name)
    except OSError as exc:
        raise ImageWriteError(f"cannot create a folder next to {out_dir}: {_one_line(exc)}") from exc
    backup: Path | None = None
    try:
        for name, ds in datasets:
            ds.save_as(str(temp / name), write_like_original=False)
        if out_dir.exists():
            if existing:  # overwrite: move the old series aside, put the new one in place, then delete the old
                backup = parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
                os.rename(out_dir, backup)
            else:
                os.rmdir(out_dir)  # an empty folder given as the destination
        os.rename(temp, out_dir)
    except ImageWriteError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any failure uniformly, after cleaning up
        if backup is not None and backup.exists() and not out_dir.exists():
            os.rename(backup, out_dir)
            backup = None
        raise ImageWriteError(f"cannot write the DICOM series {out_dir}: {_one_line(exc)}") from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    return out_dir
