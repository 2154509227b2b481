"""DICOM geometry as plain maths: from ImageOrientationPatient (IOP), ImagePositionPatient (IPP) and
PixelSpacing numbers to SimpleITK spacing / origin / direction, and back to per-slice IPP/IOP.

No file is read here: callers pass numbers taken from the headers. Conventions:
  * IOP: 6 direction cosines (row direction x, y, z, then column direction x, y, z) in LPS patient space;
  * IPP: the (x, y, z) position in mm of a slice's first pixel;
  * PixelSpacing: (row spacing, column spacing) in mm, i.e. (y, x): the reverse of SimpleITK's (x, y);
  * direction: the flattened row-major 3 x 3 matrix whose columns are the row, column and normal directions
    (the index axes x, y, z), as SimpleITK's series reader builds it.

Geometry that cannot be a regular grid (gantry tilt, uneven or duplicate slice positions) is refused with an
:class:`~lib.imaging.ImageReadError`; nothing is resampled.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .errors import ImageReadError

__all__ = [
    "DUPLICATE_POSITION_TOL_MM",
    "SHEAR_ABS_TOL_MM",
    "SLICE_GAP_ABS_TOL_MM",
    "SLICE_GAP_REL_TOL",
    "TILT_MATCH_TOL_DEG",
    "TILT_TOL_DEG",
    "StackGeometry",
    "grid_slice_plane",
    "orientation_axes",
    "orientation_direction",
    "plane_geometry_2d",
    "slice_as_3d_geometry",
    "stack_geometry",
]

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

_IDENTITY_2D = (1.0, 0.0, 0.0, 1.0)


class StackGeometry(NamedTuple):
    """A slice stack on a regular 3D grid."""

    order: np.ndarray  # indices of the input slices/frames in array z order
    spacing: tuple[float, float, float]  # (x, y, z) in mm
    origin: tuple[float, float, float]  # IPP of the first slice in z order, mm
    direction: tuple[float, ...]  # 9 values, columns (row, col, normal)


def orientation_axes(iop: Sequence[float], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit (row, column, normal) vectors, each shape (3,), of an IOP; normal = row x column.

    Raises ImageReadError (naming ``where``) for a zero vector or a row/column pair that is not orthogonal."""
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


def orientation_direction(iop: Sequence[float], where: str) -> tuple[float, ...]:
    """The 3D direction (9 values, columns row, column, normal) of an IOP."""
    row, col, normal = orientation_axes(iop, where)
    return tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())


def stack_geometry(
    positions: np.ndarray,
    orientations: np.ndarray,
    pixel_spacings: np.ndarray,
    tilts: Sequence[float | None],
    where: str,
    example_file: Path | None,
    names: Sequence[str] | None = None,
) -> StackGeometry:
    """Order slices along the normal and validate that they form a regular 3D grid.

    positions (n, 3) ImagePositionPatient; orientations (n, 6) ImageOrientationPatient; pixel_spacings (n, 2)
    PixelSpacing (row spacing, column spacing) in mm; tilts: GantryDetectorTilt per slice (degrees or None).
    ``where`` names the source in error messages; ``example_file`` (a slice, or None) is suggested there as
    something that can be read as 2D; ``names`` (one per slice, e.g. file names) say which slices differ.
    Geometry as SimpleITK's series reader builds it: slices sorted by their projection on
    normal = row x col (ascending), origin = first slice's position, direction columns (row, col, normal),
    z spacing = (last - first projection) / (n - 1).

    Raises ImageReadError: orientations or pixel spacings differ between slices, duplicate positions (several
    volumes), gantry tilt (a sheared stack, or a tilt tag the orientation does not show), uneven gaps.
    """
    n = positions.shape[0]
    names = list(names) if names is not None else [f"slice {k + 1}" for k in range(n)]
    for keyword, values in (("ImageOrientationPatient", orientations), ("PixelSpacing", pixel_spacings)):
        differs = np.flatnonzero(np.any(np.abs(np.asarray(values) - values[0]) > 1e-4, axis=1))
        if differs.size:
            k = int(differs[0])
            shown = "; ".join(f"{[round(float(v), 4) for v in values[i]]} in {names[i]}" for i in (0, k))
            raise ImageReadError(f"{where}: slices have different {keyword} ({shown}; {differs.size} of {n} slices "
                                 "differ from the first); not one volume")
    row, col, normal = orientation_axes(orientations[0], where)
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
    return StackGeometry(
        order=order,
        spacing=(float(pixel_spacings[0][1]), float(pixel_spacings[0][0]), step),
        origin=tuple(float(v) for v in pos[0]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def plane_geometry_2d(
    ipp: Sequence[float] | None, iop: Sequence[float] | None, where: str
) -> tuple[tuple, tuple, str]:
    """2D (origin (x, y), direction (4 values), description) for one slice.

    Exact when the plane is axial (its x/y axes are patient x/y); an oblique plane cannot be described in 2D
    patient coordinates, so it gets origin 0 / identity and the caller keeps the full geometry (IPP/IOP)
    elsewhere. Without IPP or IOP: origin 0 / identity."""
    if ipp is None or iop is None:
        return (0.0, 0.0), _IDENTITY_2D, "no ImagePositionPatient/ImageOrientationPatient"
    row, col, normal = orientation_axes(iop, where)
    if abs(abs(float(normal[2])) - 1.0) < 1e-6:
        return (ipp[0], ipp[1]), (row[0], col[0], row[1], col[1]), "axial"
    return (0.0, 0.0), _IDENTITY_2D, "oblique (see image_position_patient/image_orientation_patient)"


def slice_as_3d_geometry(
    spacing_2d: Sequence[float], ipp: Sequence[float], iop: Sequence[float], slice_spacing: float
) -> tuple[tuple[float, float, float], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) of one 2D slice as a one-slice 3D image in patient coordinates, the way
    SimpleITK reads a single DICOM slice: spacing (x, y from ``spacing_2d`` in SimpleITK order, z =
    ``slice_spacing`` mm), origin = IPP, direction columns (row, column, normal) of the IOP."""
    direction = orientation_direction(iop, "slice")
    return (spacing_2d[0], spacing_2d[1], slice_spacing), tuple(float(v) for v in ipp), direction


def grid_slice_plane(
    origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(IPP shape (3,), IOP shape (6,)) of slice ``k`` of a 3D grid (origin, spacing (x, y, z) in mm, direction
    9 values): the slice's first voxel is ``origin + k * spacing_z * normal``; the IOP is the grid's x and y
    axes."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    position = np.asarray(origin) + k * spacing[2] * d[:, 2]
    return position, np.concatenate([d[:, 0], d[:, 1]])
