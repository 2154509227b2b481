"""The :class:`Volume` type (an image with its geometry) and the value conventions that go with it: modality,
CT padding to air, and the dtype and range values are written in.

Conventions (shared with the rest of ``lib``):
  * arrays in numpy/SimpleITK index order: (z, y, x) for volumes, (y, x) for 2D slices, float32;
  * spacing (mm), origin (mm) and direction in SimpleITK (x, y, z) order, LPS patient coordinates as in DICOM;
  * direction is the flattened row-major ndim x ndim matrix whose columns are the index axes' directions;
  * CT values in Hounsfield units (after DICOM rescale), padding outside the field of view set to air.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk

from .errors import ImageWriteError

__all__ = [
    "CT_AIR_HU",
    "CT_PADDING_THRESHOLD_HU",
    "ImageGrid",
    "MODALITIES",
    "OutputValueRange",
    "Volume",
    "fill_padding",
    "guess_modality",
    "integral_dtype_for",
    "normalise_modality",
    "value_range_for_output",
    "values_for_output",
]

#: Value written into CT pixels that lie outside the reconstruction field of view (air; most scanners clip to it).
CT_AIR_HU = -1024.0
#: CT values at or below this are not physical (air is -1000 HU; even low-dose noise stays far above): they are
#: padding outside the field of view (-2000, -2048, -3024 ...), also when PixelPaddingValue is absent. Padding
#: closer to air (GE's -1500) is recognised through PixelPaddingValue only, so that a noisy (e.g. simulated
#: low-dose) image read back from NIfTI keeps its genuine air noise.
CT_PADDING_THRESHOLD_HU = -2000.0
#: The modalities a Volume knows; anything else is "OT" (other/unknown).
MODALITIES = ("CT", "MR", "OT")


class ImageGrid(NamedTuple):
    """A voxel grid: ``shape`` in array order ((z,) y, x); ``spacing``, ``origin`` (mm) and the flattened
    ``direction`` in SimpleITK (x, y, z) order."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def flips_onto(self, other: "ImageGrid", tol: float = 1e-3) -> tuple[int, ...] | None:
        """The array axes to reverse so that voxels on this grid lie on ``other``: () for the same grid, e.g.
        (0,) when this grid holds the same voxel centres with the slice order reversed (Slicer and other tools
        that keep the index-to-RAS matrix right-handed save a left-handed grid that way); None when the grids
        hold different voxel centres (shape, spacing, origin or direction differ otherwise). ``tol`` in mm
        (origin, spacing) and in direction cosines."""
        ndim = len(self.shape)
        if tuple(self.shape) != tuple(other.shape) or len(self.spacing) != ndim:
            return None
        if not np.allclose(self.spacing, other.spacing, atol=tol, rtol=0):
            return None
        mine = np.asarray(self.direction, np.float64).reshape(ndim, ndim)
        theirs = np.asarray(other.direction, np.float64).reshape(ndim, ndim)
        expected_origin = np.asarray(other.origin, np.float64).copy()
        flips = []
        for axis in range(ndim):  # SimpleITK axis (x, y, z) is array axis ndim - 1 - axis
            if np.allclose(mine[:, axis], theirs[:, axis], atol=tol):
                continue
            if not np.allclose(mine[:, axis], -theirs[:, axis], atol=tol):
                return None
            flips.append(ndim - 1 - axis)
            expected_origin += theirs[:, axis] * other.spacing[axis] * (other.shape[ndim - 1 - axis] - 1)
        if not np.allclose(self.origin, expected_origin, atol=tol, rtol=0):
            return None
        return tuple(sorted(flips))

    def describe(self) -> str:
        return (f"size {' x '.join(map(str, self.shape[::-1]))}, spacing {[round(v, 4) for v in self.spacing]} mm, "
                f"origin {[round(v, 2) for v in self.origin]} mm, direction {[round(v, 3) for v in self.direction]}")


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
            NIfTI ...; drives the output dtype in :func:`~lib.imaging.write_volume`.
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
        self.modality = modality if modality in MODALITIES else "OT"
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

    @property
    def grid(self) -> "ImageGrid":
        """The voxel grid: array shape, spacing, origin, direction."""
        return ImageGrid(tuple(self.array.shape), tuple(self.spacing), tuple(self.origin), tuple(self.direction))


# --------------------------------------------------------------------------------------------------------------
# Modality and values as read
# --------------------------------------------------------------------------------------------------------------


def normalise_modality(modality: str | None) -> str | None:
    """``modality`` upper-cased and checked against :data:`MODALITIES` (None stays None: guess later)."""
    if modality is None:
        return None
    value = str(modality).strip().upper()
    if value not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES} or None, got {modality!r}")
    return value


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


def integral_dtype_for(lo: float, hi: float) -> np.dtype:
    """Smallest of int16 / uint16 / int32 that holds the integer range [lo, hi] (float32 when none does)."""
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    if lo >= 0 and hi <= 65535:
        return np.dtype(np.uint16)
    int32 = np.iinfo(np.int32)
    if lo >= int32.min and hi <= int32.max:
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def fill_padding(
    values: np.ndarray, modality: str, pad_mask: np.ndarray | None, fill: bool
) -> tuple[np.ndarray, dict]:
    """Set padding (from PixelPaddingValue, and for CT anything <= CT_PADDING_THRESHOLD_HU) to a neutral value.

    CT padding becomes air (CT_AIR_HU) so that noise simulation and metrics do not see -2000/-3024 "tissue";
    other modalities get 0 when their real values are >= 0, else their real minimum. ``pad_mask`` (bool, the
    shape of ``values``) marks padding known from the header; with ``fill`` False only the counts are reported.
    Returns (values, metadata facts: ``n_padded``, ``n_padded_by_tag``, ``padding_fill_value``)."""
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
# Values as written
# --------------------------------------------------------------------------------------------------------------


class OutputValueRange(NamedTuple):
    """How values are written: output dtype and the clip bounds applied before the cast (None = unbounded)."""

    dtype: np.dtype
    low: float | None
    high: float | None


def value_range_for_output(volume: Volume, output_dtype: str | np.dtype | None = None) -> OutputValueRange:
    """Output dtype and clip range for ``volume`` (see :func:`~lib.imaging.write_volume` for the conventions).

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


def values_for_output(volume: Volume, output_dtype: str | np.dtype | None) -> np.ndarray:
    """The volume's values as written: rounded for integer dtypes, clipped and cast per
    :func:`value_range_for_output` (same shape as ``volume.array``)."""
    vr = value_range_for_output(volume, output_dtype)
    values = volume.array.astype(np.float64)
    if np.issubdtype(vr.dtype, np.integer):
        values = np.rint(values)
    if vr.low is not None or vr.high is not None:
        values = np.clip(values, vr.low, vr.high)
    return values.astype(vr.dtype)
