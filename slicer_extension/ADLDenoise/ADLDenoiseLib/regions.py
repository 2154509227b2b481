"""Marked regions of a correction: what a clinician asks for where (no Slicer, no Qt).

A clinician marks regions with Segment Editor segments and says, per segment, what must happen there:

* ``keep``: keep this structure (a lesion or vessel the denoiser blurred);
* ``strength`` ``s`` in [0, 2]: the local denoising strength (0 = the original input, 1 = as corrected,
  2 = smoother than the correction).

The module sends them with the correction as the datastore label ``regions`` of the image (the wire contract of
the app's :mod:`lib.data.regions`): a uint8 label map on the image's grid (NIfTI), value ``i`` = the ``i``-th
marked segment in segment order (0 = no region), and the form field ``params``::

    {"regions": [{"value": 1, "name": "lesion 1", "intent": "keep"},
                 {"value": 2, "name": "liver", "intent": "strength", "strength": 0.5}]}

Where segments overlap, the LATER segment wins (the same rule as Slicer's own merged labelmap export).

Arrays are (z, y, x) = (k, j, i) as ``slicer.util.arrayFromVolume`` gives them. Geometry is held as an IJK-to-LPS
matrix (ITK / file convention, mm); Slicer nodes give IJK-to-RAS, converted by :meth:`Grid.from_ijk_to_ras`.
SimpleITK (bundled with Slicer) writes the NIfTI file; it is imported only where a file is read or written.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["CHOICES", "INTENTS", "MAX_STRENGTH", "REGIONS_TAG", "Grid", "Region", "RegionsError", "SegmentMarks",
           "align_to_grid", "build_region_map", "prepare_region_file", "regions_params", "write_region_map"]

#: datastore label tag of the region map (the correction itself is the ``final`` label)
REGIONS_TAG = "regions"
#: intents on the wire
INTENTS = ("keep", "strength")
#: the largest local strength (2 = smoother than the correction)
MAX_STRENGTH = 2.0
#: what the table's intent combo offers -> intent on the wire (None: the segment is not sent)
CHOICES: dict[str, str | None] = {"ignore": None, "keep structure": "keep", "strength": "strength"}
#: LPS = FLIP @ RAS
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


class RegionsError(ValueError):
    """Marked regions that cannot be sent (the message says which segment and what to do)."""


@dataclass(frozen=True)
class Region:
    """One marked region: ``name`` (the segment's name), ``intent`` (``keep`` or ``strength``) and, for
    ``strength`` regions only, ``strength`` in [0, 2] (0 = original input, 1 = as corrected, 2 = smoother)."""

    name: str
    intent: str
    strength: float | None = None

    def __post_init__(self) -> None:
        if self.intent not in INTENTS:
            raise RegionsError(f"region {self.name!r}: unknown intent {self.intent!r}; known: {', '.join(INTENTS)}")
        if self.intent == "strength":
            s = self.strength
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)) \
                    or not 0.0 <= float(s) <= MAX_STRENGTH:
                raise RegionsError(f"region {self.name!r}: the strength must be within [0, {MAX_STRENGTH:g}] (0 = "
                                   f"original input, 1 = as corrected, 2 = smoother), got {s!r}")
            object.__setattr__(self, "strength", float(s))
        elif self.strength is not None:
            raise RegionsError(f"region {self.name!r}: 'keep structure' takes no strength")

    def to_params(self, value: int) -> dict:
        """The region's entry in ``params["regions"]`` with label ``value``."""
        entry: dict = {"value": int(value), "name": self.name, "intent": self.intent}
        if self.intent == "strength":
            entry["strength"] = self.strength
        return entry


def regions_params(regions: Sequence[Region]) -> dict:
    """``{"regions": [...]}`` with values 1..N in the given order (the form field ``params``)."""
    if not regions:
        raise RegionsError("no region is marked")
    if len(regions) > 255:
        raise RegionsError(f"{len(regions)} regions marked; a uint8 label map holds at most 255")
    return {"regions": [r.to_params(i + 1) for i, r in enumerate(regions)]}


def build_region_map(masks: Sequence[np.ndarray], regions: Sequence[Region],
                     shape: Sequence[int]) -> tuple[np.ndarray, dict]:
    """The uint8 label map and its ``params`` from one boolean mask per region.

    Args:
        masks: per region, a (z, y, x) array on the image's grid, nonzero inside the segment.
        regions: the declarations, in segment order (value ``i + 1`` for ``regions[i]``).
        shape: the image's (z, y, x) shape.

    Returns:
        (map, params): map (z, y, x) uint8, 0 outside every region; where masks overlap the later one wins.

    Raises:
        RegionsError: counts differ; a mask not of ``shape``; a segment without a voxel, or all of whose voxels
            lie under later segments.
    """
    params = regions_params(regions)
    shape = tuple(int(n) for n in shape)
    if len(masks) != len(regions):
        raise RegionsError(f"{len(masks)} masks for {len(regions)} regions")
    region_map = np.zeros(shape, np.uint8)
    for value, (mask, region) in enumerate(zip(masks, regions), start=1):
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise RegionsError(f"segment {region.name!r} has shape {mask.shape} but the image has {shape}: it must "
                               "be on the image's grid")
        inside = mask != 0
        if not inside.any():
            raise RegionsError(f"segment {region.name!r} is empty (no voxel inside the image): paint it or set it "
                               "to 'ignore'")
        region_map[inside] = value  # later segments overwrite earlier ones where they overlap
    present = set(np.unique(region_map).tolist())
    for value, region in enumerate(regions, start=1):
        if value not in present:
            raise RegionsError(f"segment {region.name!r} lies entirely under later segments (where segments "
                               "overlap the later one wins): move it after them or set it to 'ignore'")
    return region_map, params


# ------------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (z, y, x) and ``ijk_to_lps`` (4x4, mm; column ``c`` = direction * spacing of
    index axis ``c`` = i, j, k; last column = the first voxel's centre)."""

    shape: tuple[int, int, int]
    ijk_to_lps: np.ndarray

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras: np.ndarray, shape: Sequence[int]) -> "Grid":
        """From a Slicer node's IJK-to-RAS matrix (4x4) and its array's (z, y, x) shape."""
        m = np.asarray(ijk_to_ras, np.float64)
        if m.shape != (4, 4):
            raise RegionsError(f"IJK-to-RAS must be 4x4, got {m.shape}")
        lps = np.eye(4)
        lps[:3, :4] = _RAS_TO_LPS @ m[:3, :4]
        return cls(tuple(int(n) for n in shape), lps)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Grid":
        """The grid of a volume file (NRRD, NIfTI, ... anything SimpleITK reads), from its header only."""
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise RegionsError(f"cannot read the geometry of {Path(path).name}: {error}") from None
        if reader.GetDimension() != 3:
            raise RegionsError(f"{Path(path).name} is not a 3D volume")
        return cls.from_itk(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())

    @classmethod
    def from_itk(cls, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                 direction: Sequence[float]) -> "Grid":
        """From ITK's (x, y, z) size, spacing (mm), origin (LPS mm) and row-major 3x3 direction."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(direction, np.float64).reshape(3, 3) * np.asarray(spacing, np.float64)[None, :]
        m[:3, 3] = origin
        return cls(tuple(int(n) for n in reversed(tuple(size))), m)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.ijk_to_lps[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        return self.ijk_to_lps[:3, :3] / self.spacing[None, :]

    @property
    def origin(self) -> np.ndarray:
        return self.ijk_to_lps[:3, 3].copy()

    def describe(self) -> str:
        r = lambda v: [round(float(x), 3) for x in v]  # noqa: E731
        return f"shape {self.shape}, spacing {r(self.spacing)} mm, origin {r(self.origin)} (LPS)"


def align_to_grid(array: np.ndarray, source: Grid, target: Grid, tol: float = 1e-3) -> np.ndarray:
    """``array`` (on ``source``) in ``target``'s voxel order: the same array when the grids are equal, axes
    reversed where ``target`` runs the other way over the same voxels (Slicer reads a mirrored file with its
    last axis reversed).

    Raises:
        RegionsError: the grids hold different voxels (size, spacing, direction or position).
    """
    array = np.asarray(array)
    if array.shape != source.shape:
        raise RegionsError(f"the map has shape {array.shape} but its grid {source.shape}")
    mismatch = RegionsError(f"the marked regions are not on the study's grid (segments exported on "
                            f"{source.describe()}; the study on the server has {target.describe()})")
    if source.shape != target.shape:
        raise mismatch
    s, t = source.ijk_to_lps, target.ijk_to_lps
    origin = t[:3, 3].copy()
    flips = []
    for axis in range(3):  # index axis i, j, k
        if np.allclose(s[:3, axis], t[:3, axis], atol=tol):
            continue
        if not np.allclose(s[:3, axis], -t[:3, axis], atol=tol):
            raise mismatch
        flips.append(axis)
        origin += t[:3, axis] * (target.shape[2 - axis] - 1)
    if not np.allclose(s[:3, 3], origin, atol=tol):
        raise mismatch
    for axis in flips:  # index axis i, j, k is array axis 2, 1, 0
        array = np.flip(array, axis=2 - axis)
    return np.ascontiguousarray(array)


def write_region_map(region_map: np.ndarray, grid: Grid, path: str | os.PathLike) -> Path:
    """Write a (z, y, x) uint8 label map on ``grid`` as NIfTI (``.nii.gz``) with that exact geometry."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.endswith((".nii.gz", ".nii")):
        raise RegionsError(f"the region map is sent as NIfTI: name it .nii.gz, got {path.name}")
    array = np.asarray(region_map)
    if array.dtype != np.uint8 or array.shape != grid.shape:
        raise RegionsError(f"the region map must be uint8 of shape {grid.shape}, got {array.dtype} {array.shape}")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(v) for v in grid.spacing])
    image.SetOrigin([float(v) for v in grid.origin])
    image.SetDirection([float(v) for v in grid.direction.reshape(-1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def prepare_region_file(region_map: np.ndarray, grid: Grid, path: str | os.PathLike,
                        study_file: str | os.PathLike | None = None) -> Path:
    """The region map file to upload: ``region_map`` (z, y, x) uint8 on ``grid`` (the volume node's) written as
    NIfTI on the grid of ``study_file`` (the image file the server holds: uploaded or downloaded), so that the
    server finds it on the image's grid; on ``grid`` itself when no file is known.

    Raises:
        RegionsError: the study file is unreadable or holds other voxels than ``grid``.
    """
    target = Grid.from_file(study_file) if study_file else grid
    return write_region_map(align_to_grid(region_map, grid, target), target, path)


# ------------------------------------------------------------------------------------------------- table state
class SegmentMarks:
    """What the "Marked regions" table shows and the user chose, per segment, in the segmentation's order.

    The widget calls :meth:`sync` whenever the segmentation's segments change (choices of segments that stay
    are kept), :meth:`choose` / :meth:`set_strength` when the user edits a row, and :meth:`marked` on "Submit".
    """

    def __init__(self, default_strength: float = 1.0) -> None:
        self.default_strength = float(default_strength)
        self._segments: list[tuple[str, str]] = []  # (segment id, name) in segment order
        self._choice: dict[str, str] = {}
        self._strength: dict[str, float] = {}

    def sync(self, segments: Sequence[tuple[str, str]]) -> None:
        """``segments``: (segment id, name) in the segmentation's order."""
        self._segments = [(str(i), str(n)) for i, n in segments]
        ids = {i for i, _ in self._segments}
        self._choice = {i: c for i, c in self._choice.items() if i in ids}
        self._strength = {i: s for i, s in self._strength.items() if i in ids}

    def choose(self, segment_id: str, choice: str) -> None:
        if choice not in CHOICES:
            raise RegionsError(f"unknown choice {choice!r}; choose from {', '.join(CHOICES)}")
        self._require(segment_id)
        self._choice[segment_id] = choice

    def set_strength(self, segment_id: str, strength: float) -> None:
        self._require(segment_id)
        s = float(strength)
        if not math.isfinite(s) or not 0.0 <= s <= MAX_STRENGTH:
            raise RegionsError(f"the strength must be within [0, {MAX_STRENGTH:g}], got {strength!r}")
        self._strength[segment_id] = s

    def _require(self, segment_id: str) -> None:
        if segment_id not in {i for i, _ in self._segments}:
            raise RegionsError(f"no segment {segment_id!r} in the table")

    def rows(self) -> list[dict]:
        """``[{"id", "name", "choice", "strength"}]`` in segment order, for the table."""
        return [{"id": i, "name": n, "choice": self._choice.get(i, "ignore"),
                 "strength": self._strength.get(i, self.default_strength)} for i, n in self._segments]

    def marked(self) -> list[tuple[str, Region]]:
        """(segment id, :class:`Region`) of every segment not set to ``ignore``, in segment order."""
        out = []
        for row in self.rows():
            intent = CHOICES[row["choice"]]
            if intent is not None:
                out.append((row["id"], Region(row["name"], intent,
                                              row["strength"] if intent == "strength" else None)))
        return out
