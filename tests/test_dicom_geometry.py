"""DICOM geometry maths (lib.imaging.dicom_geometry) alone, on hand-computed cases: no files, only the numbers a
header holds (ImageOrientationPatient, ImagePositionPatient, PixelSpacing, GantryDetectorTilt).

Conventions checked: normal = row x column; slices sorted by their projection on the normal, ascending; origin =
the first sorted slice's position; spacing (x, y, z) = (column spacing, row spacing, step along the normal);
direction = row-major 3 x 3 with columns (row, column, normal).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from lib.imaging import ImageReadError
from lib.imaging.dicom_geometry import (
    grid_slice_plane,
    orientation_axes,
    orientation_direction,
    plane_geometry_2d,
    slice_as_3d_geometry,
    stack_geometry,
)

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
# columns (row, col, normal) written out row by row
AXIAL_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
CORONAL_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)  # normal (0, 1, 0)
SAGITTAL_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # normal (-1, 0, 0)


def _stack(positions, iop, pixel_spacing=(0.5, 0.7), tilts=None):
    n = len(positions)
    return stack_geometry(
        np.asarray(positions, dtype=np.float64),
        np.asarray([iop] * n, dtype=np.float64),
        np.asarray([pixel_spacing] * n, dtype=np.float64),
        tilts if tilts is not None else [None] * n,
        "test series",
        None,
    )


@pytest.mark.parametrize(
    "iop, normal",
    [(AXIAL, (0, 0, 1)), (CORONAL, (0, 1, 0)), (SAGITTAL, (-1, 0, 0)), ([-1, 0, 0, 0, 1, 0], (0, 0, -1))],
    ids=["axial", "coronal", "sagittal", "axial-flipped"],
)
def test_orientation_axes_normal_is_row_cross_column(iop, normal):
    row, col, n = orientation_axes(iop, "slice")
    np.testing.assert_allclose(row, iop[:3], atol=1e-12)
    np.testing.assert_allclose(col, iop[3:], atol=1e-12)
    np.testing.assert_allclose(n, normal, atol=1e-12)


def test_orientation_axes_normalises_and_refuses_bad_orientations():
    row, col, normal = orientation_axes([2.0, 0.0, 0.0, 0.0, 0.0, -3.0], "slice")
    np.testing.assert_allclose(row, (1, 0, 0))
    np.testing.assert_allclose(col, (0, 0, -1))
    np.testing.assert_allclose(normal, (0, 1, 0))
    with pytest.raises(ImageReadError, match="slice: .* has a zero vector"):
        orientation_axes([0, 0, 0, 0, 1, 0], "slice")
    with pytest.raises(ImageReadError, match="not orthogonal"):
        orientation_axes([1, 0, 0, 0.1, 1, 0], "slice")


@pytest.mark.parametrize(
    "iop, direction", [(AXIAL, AXIAL_DIRECTION), (CORONAL, CORONAL_DIRECTION), (SAGITTAL, SAGITTAL_DIRECTION)]
)
def test_orientation_direction_columns_are_row_column_normal(iop, direction):
    np.testing.assert_allclose(orientation_direction(iop, "slice"), direction, atol=1e-12)


@pytest.mark.parametrize(
    "iop, positions, order, origin, step, direction",
    [
        # file order z = 10, 0, 5
        (AXIAL, [(-100, 50, 10), (-100, 50, 0), (-100, 50, 5)], [1, 2, 0], (-100, 50, 0), 5.0, AXIAL_DIRECTION),
        # files written head first (z decreasing): the array still runs along +normal, from z = -5
        (AXIAL, [(0, 0, 0), (0, 0, -2.5), (0, 0, -5)], [2, 1, 0], (0, 0, -5), 2.5, AXIAL_DIRECTION),
        # normal (0, 1, 0)
        (CORONAL, [(0, 3, 0), (0, 1, 0), (0, 2, 0)], [1, 2, 0], (0, 1, 0), 1.0, CORONAL_DIRECTION),
        # normal (-1, 0, 0): projections -0, -10, -20, so the slice at x = 20 comes first
        (SAGITTAL, [(0, 0, 0), (10, 0, 0), (20, 0, 0)], [2, 1, 0], (20, 0, 0), 10.0, SAGITTAL_DIRECTION),
    ],
    ids=["axial", "axial-negative-order", "coronal", "sagittal"],
)
def test_stack_sorted_along_the_normal(iop, positions, order, origin, step, direction):
    # PixelSpacing is (row spacing 0.5, column spacing 0.7): x spacing 0.7, y spacing 0.5
    geom = _stack(positions, iop, pixel_spacing=(0.5, 0.7))
    assert list(geom.order) == order
    assert geom.origin == pytest.approx(origin)
    assert geom.spacing == pytest.approx((0.7, 0.5, step))
    assert geom.direction == pytest.approx(direction)


def _tilted_orientation(theta_deg: float) -> list[float]:
    """Row (1, 0, 0), column tilted about x: normal = (0, sin t, cos t), a plane tilted t from axial."""
    t = math.radians(theta_deg)
    return [1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t)]


def test_tilted_plane_with_positions_along_its_normal_is_a_regular_oblique_grid():
    t = math.radians(20.0)
    normal = np.array([0.0, math.sin(t), math.cos(t)])
    positions = [list(k * 3.0 * normal) for k in (2, 0, 1)]
    geom = _stack(positions, _tilted_orientation(20.0), tilts=[20.0] * 3)  # tag and orientation agree
    assert list(geom.order) == [1, 2, 0]
    assert geom.spacing[2] == pytest.approx(3.0)
    assert geom.origin == pytest.approx((0.0, 0.0, 0.0))
    d = np.asarray(geom.direction).reshape(3, 3)
    np.testing.assert_allclose(d[:, 2], normal, atol=1e-12)


def test_sheared_stack_is_refused_as_gantry_tilt_with_its_angle():
    # axial planes whose positions move 1 mm in y per 5 mm in z: sheared by atan(1/5) = 11.31 degrees
    positions = [[0.0, 1.0 * k, 5.0 * k] for k in range(4)]
    with pytest.raises(ImageReadError, match=r"gantry tilt of 11\.3° \(slice positions are sheared"):
        _stack(positions, AXIAL)
    # the same stack with the tag: the tag's angle is reported
    with pytest.raises(ImageReadError, match=r"gantry tilt of 12\.0°"):
        _stack(positions, AXIAL, tilts=[-12.0] * 4)


def test_tilt_tag_that_the_orientation_does_not_show_is_refused():
    positions = [[0.0, 0.0, 2.0 * k] for k in range(3)]  # a straight axial stack ...
    with pytest.raises(ImageReadError, match=r"gantry tilt of 15\.0° \(the orientation does not show the tilt"):
        _stack(positions, AXIAL, tilts=[15.0] * 3)  # ... whose header says the gantry was tilted
    # a tag below the tolerance is no tilt
    assert _stack(positions, AXIAL, tilts=[0.01] * 3).spacing[2] == pytest.approx(2.0)


def test_uneven_spacing_is_refused_and_small_rounding_accepted():
    with pytest.raises(ImageReadError, match=r"uneven slice spacing: gaps range from 1\.000 to 2\.000 mm .*"
                                             r"first between sorted slices 3 and 4: 2\.000 mm"):
        _stack([[0.0, 0.0, z] for z in (0.0, 1.0, 2.0, 4.0)], AXIAL)
    # 0.005 mm off the median gap is within the 0.01 mm tolerance: step = (last - first) / (n - 1)
    geom = _stack([[0.0, 0.0, z] for z in (0.0, 1.0, 2.005, 3.0)], AXIAL)
    assert geom.spacing[2] == pytest.approx(1.0)


def test_duplicate_positions_are_refused_as_several_volumes():
    with pytest.raises(ImageReadError, match="3 slices share a position out of 4"):
        _stack([[0.0, 0.0, z] for z in (0.0, 0.0, 1.0, 1.0)], AXIAL)


def test_mixed_orientations_or_pixel_spacings_are_refused():
    positions = np.asarray([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ImageReadError, match="different ImageOrientationPatient"):
        stack_geometry(positions, np.asarray([AXIAL, CORONAL]), np.asarray([[1.0, 1.0]] * 2), [None] * 2, "s", None)
    with pytest.raises(ImageReadError, match="different PixelSpacing"):
        stack_geometry(positions, np.asarray([AXIAL] * 2), np.asarray([[1.0, 1.0], [1.0, 2.0]]), [None] * 2, "s", None)


def test_plane_geometry_2d_exact_for_axial_planes_only():
    assert plane_geometry_2d([10.0, 20.0, 30.0], AXIAL, "s") == ((10.0, 20.0), (1.0, 0.0, 0.0, 1.0), "axial")
    origin, direction, plane = plane_geometry_2d([10.0, 20.0, 30.0], [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "s")
    assert (origin, plane) == ((10.0, 20.0), "axial")
    assert direction == pytest.approx((-1.0, 0.0, 0.0, 1.0))  # (row x, col x, row y, col y)
    # an axial plane rotated 30 degrees in-plane: row (c, s, 0), column (-s, c, 0), normal (0, 0, 1)
    c, s = math.sqrt(3.0) / 2.0, 0.5
    origin, direction, plane = plane_geometry_2d([10.0, 20.0, 30.0], [c, s, 0.0, -s, c, 0.0], "s")
    assert plane == "axial"
    assert direction == pytest.approx((c, -s, s, c))
    origin, direction, plane = plane_geometry_2d([10.0, 20.0, 30.0], CORONAL, "s")
    assert (origin, direction) == ((0.0, 0.0), (1.0, 0.0, 0.0, 1.0)) and plane.startswith("oblique")
    assert plane_geometry_2d(None, AXIAL, "s")[2] == "no ImagePositionPatient/ImageOrientationPatient"


def test_slice_as_3d_geometry_places_a_slice_in_patient_space():
    spacing, origin, direction = slice_as_3d_geometry((0.5, 0.6), [1.0, 2.0, 3.0], CORONAL, 2.0)
    assert spacing == (0.5, 0.6, 2.0)
    assert origin == (1.0, 2.0, 3.0)
    assert direction == pytest.approx(CORONAL_DIRECTION)


def test_grid_slice_plane_steps_along_the_normal_and_round_trips():
    origin, spacing = (20.0, -5.0, 7.0), (0.7, 0.5, 10.0)
    position, iop = grid_slice_plane(origin, spacing, SAGITTAL_DIRECTION, 3)
    np.testing.assert_allclose(position, (20.0 - 30.0, -5.0, 7.0))  # 3 slices of 10 mm along (-1, 0, 0)
    np.testing.assert_allclose(iop, SAGITTAL)
    # positions written for every slice, read back as a stack, give the grid again
    planes = [grid_slice_plane(origin, spacing, SAGITTAL_DIRECTION, k) for k in (4, 0, 2, 1, 3)]
    geom = _stack([p for p, _ in planes], list(planes[0][1]), pixel_spacing=(spacing[1], spacing[0]))
    assert list(geom.order) == [1, 3, 2, 4, 0]
    assert geom.origin == pytest.approx(origin)
    assert geom.spacing == pytest.approx(spacing)
    assert geom.direction == pytest.approx(SAGITTAL_DIRECTION)
