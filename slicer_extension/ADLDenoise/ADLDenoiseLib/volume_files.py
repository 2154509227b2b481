"""Volume files written off the GUI thread (no Slicer, no Qt).

Slicer's storage node (``mrml.export_volume``) writes from the node itself, so it has to run on the GUI thread,
where writing an uncompressed 512 x 512 x 400 volume froze Slicer at every Denoise, verdict and correction. The
module instead copies the node's voxels and IJK-to-RAS matrix on the GUI thread (``mrml.volume_snapshot`` /
``mrml.volume_copy``: a :class:`~ADLDenoiseLib.review_session.VolumeSnapshot`, which the request's identity check
hashes anyway) and writes that copy here, in its :class:`~ADLDenoiseLib.background.BackgroundTask`, then sends it.

The file is the NRRD Slicer's storage node writes for a scalar volume (``vtkITKImageWriter`` -> ITK's NRRD writer,
uncompressed): raw little-endian voxels in the node's scalar type, x fastest; ``space: left-posterior-superior``;
``space directions`` the IJK-to-LPS columns (direction times spacing, mm) of index axes i, j, k; ``space origin``
the first voxel's centre (LPS, mm). Slicer, ITK / SimpleITK and the server read it as the node's geometry and values.
It is written to a temporary file beside the target and renamed once complete: a failed or cancelled write leaves
no partial file. Not SimpleITK (which ``regions`` uses for the small region files): ``GetImageFromArray`` would add a
second full copy of the volume, and ``WriteImage`` can be neither cancelled nor interleaved with the GUI mid-file;
a raw NRRD is a short text header and the voxels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .client import cancel_check, stop_if, write_atomically
from .review_session import StudyIdentity, VolumeSnapshot, WorkflowError, verify_snapshot

__all__ = ["NRRD_TYPES", "ExportFailed", "VolumeExport", "nrrd_header", "prepare_upload", "write_nrrd"]

#: numpy dtype -> NRRD type name (the scalar types of a Slicer scalar volume)
NRRD_TYPES = {np.dtype(np.int8): "signed char", np.dtype(np.uint8): "unsigned char", np.dtype(np.int16): "short",
              np.dtype(np.uint16): "unsigned short", np.dtype(np.int32): "int", np.dtype(np.uint32): "unsigned int",
              np.dtype(np.int64): "long long", np.dtype(np.uint64): "unsigned long long",
              np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
#: LPS = FLIP @ RAS (NRRD and ITK files are in LPS; Slicer nodes in RAS)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


class ExportFailed(WorkflowError):
    """A volume file could not be written (disk full, folder gone, a value type NRRD has no name for): nothing was
    sent, and no partial file is left."""


def _vector(values: np.ndarray) -> str:
    return "(" + ",".join(f"{float(v):.17g}" for v in values) + ")"


def nrrd_header(dtype: np.dtype, shape: tuple[int, ...], ijk_to_ras: np.ndarray) -> bytes:
    """The header (with the blank line that ends it) of a raw NRRD holding a (z, y, x) array of ``dtype`` and
    ``shape`` on the grid ``ijk_to_ras`` (4x4, mm).

    Raises:
        ExportFailed: not a non-empty 3D array of a scalar type NRRD names, or a matrix that is not a finite 4x4.
    """
    dtype = np.dtype(dtype)
    name = NRRD_TYPES.get(dtype.newbyteorder("="))
    if name is None:
        raise ExportFailed(f"a volume of {dtype} values cannot be written as NRRD")
    if len(shape) != 3 or min(shape) < 1:
        raise ExportFailed(f"a volume file needs a non-empty 3D array, got shape {tuple(shape)}")
    matrix = np.asarray(ijk_to_ras, np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ExportFailed(f"the IJK-to-RAS matrix must be a finite 4x4 matrix, got shape {matrix.shape}")
    lps = _RAS_TO_LPS @ matrix[:3, :4]
    lines = ["NRRD0004", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html", f"type: {name}", "dimension: 3",
             "space: left-posterior-superior", "sizes: " + " ".join(str(int(n)) for n in reversed(shape)),
             "space directions: " + " ".join(_vector(lps[:, axis]) for axis in range(3)),
             "kinds: domain domain domain"]
    if dtype.itemsize > 1:
        lines.append("endian: little")
    lines += ["encoding: raw", "space origin: " + _vector(lps[:, 3])]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def write_nrrd(voxels: np.ndarray, ijk_to_ras: np.ndarray, path: str | os.PathLike,
               cancelled: Callable[[], bool] | None = None) -> Path:
    """Write ``voxels`` ((z, y, x), any scalar dtype of :data:`NRRD_TYPES`) on the grid ``ijk_to_ras`` (4x4, mm) to
    ``path`` as raw NRRD, one slice at a time (each write lets the GUI thread run), atomically: a temporary file in
    ``path``'s folder, renamed once complete. ``cancelled`` (default: the thread's ``client.cancel_scope``) is
    asked before each slice. Returns ``path``.

    Raises:
        ExportFailed: the file could not be written (the message says which and why); nothing is left behind.
        TransferCancelled: cancelled; nothing is left behind.
    """
    path = Path(path)
    voxels = np.asarray(voxels)
    header = nrrd_header(voxels.dtype, voxels.shape, ijk_to_ras)
    cancelled = cancel_check(cancelled)
    little = voxels.dtype.newbyteorder("<")

    def fill(out) -> None:
        out.write(header)
        for plane in voxels:
            stop_if(cancelled)
            out.write(memoryview(np.ascontiguousarray(plane, little)).cast("B"))

    try:
        return write_atomically(path, fill, cancelled)
    except OSError as error:
        raise ExportFailed(f"could not write {path.name} to {path.parent}: {error.strerror or error}") from error


@dataclass(frozen=True, eq=False)
class VolumeExport:
    """A volume file to be written in the background: ``snapshot``, the copy of a node's voxels and grid taken on
    the GUI thread (``mrml.volume_snapshot`` / ``mrml.volume_copy``), and the ``path`` it goes to. Making one does
    no file I/O; :meth:`write` does it all."""

    snapshot: VolumeSnapshot
    path: Path

    def write(self, report: Any = None, cancelled: Callable[[], bool] | None = None) -> Path:
        """Background: :func:`write_nrrd` of the snapshot to :attr:`path`; returns the path."""
        if report:
            report(None, f"writing {self.snapshot.name or 'the volume'} to a file ...")
        return write_nrrd(self.snapshot.voxels, self.snapshot.ijk_to_ras, self.path, cancelled)


def prepare_upload(check: tuple[VolumeSnapshot | None, StudyIdentity | None] | None,
                   upload: VolumeExport | Path | None, report: Any = None,
                   cancelled: Callable[[], bool] | None = None) -> Path | None:
    """Background, the first step of a request sent for a study (Denoise, a verdict, a correction): the volume must
    still hold the voxels it was identified from (``check``: :func:`review_session.verify_snapshot`'s arguments;
    :class:`review_session.VolumeChanged` otherwise, and nothing is written), then the file to send is written
    (``upload``: a :class:`VolumeExport`, written now from the same copy that was checked; a path: a file written
    already; None: nothing to send, the server holds the study). Returns the file to send, or None."""
    if check is not None:
        verify_snapshot(*check, report=report)
    if isinstance(upload, VolumeExport):
        return upload.write(report, cancelled)
    return None if upload is None else Path(upload)
