"""Volume files written and read off the GUI thread (no Slicer, no Qt).

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
second full copy of the volume, and ``WriteImage`` cannot be cancelled mid-file; a raw NRRD is a short text header
and the voxels.

The denoised result comes back the same way round: reading it with Slicer's storage node on the GUI thread froze
Slicer too, so the request's task reads it (:func:`read_result`: NRRD here, raw or gzip, as Slicer's reader and ITK
read it, chunk by chunk straight into the array, so that Cancel is heard and no second copy is made; other formats
with SimpleITK, which Slicer bundles) into an array and an IJK-to-RAS matrix, puts it in the original's voxel order
(:func:`align_to_grid`), and the GUI thread makes the array a new node's voxels, without copying it
(``mrml.load_result``, ``mrml.take_voxels``). A study
of the review queue likewise: its downloaded file is read in the request's task (:func:`read_study`, on the grid
Slicer's loader gives it), its content identity hashed there from the array read (:func:`study_content`, with the
grid as the node will report it: :func:`node_grid`), and the GUI thread makes its node from the array
(``mrml.load_study``).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .client import CHUNK, cancel_check, stop_if, write_atomically
from .review_session import StudyIdentity, VolumeSnapshot, WorkflowError, content_identity, verify_snapshot

__all__ = ["NRRD_TYPES", "ExportFailed", "ResultRead", "VolumeArray", "VolumeExport", "VolumeUnreadable",
           "align_to_grid", "nrrd_header", "prepare_upload", "read_nrrd", "read_result", "read_study", "read_volume",
           "node_grid", "right_handed", "study_content", "write_nrrd"]

#: numpy dtype -> NRRD type name (the scalar types of a Slicer scalar volume)
NRRD_TYPES = {np.dtype(np.int8): "signed char", np.dtype(np.uint8): "unsigned char", np.dtype(np.int16): "short",
              np.dtype(np.uint16): "unsigned short", np.dtype(np.int32): "int", np.dtype(np.uint32): "unsigned int",
              np.dtype(np.int64): "long long", np.dtype(np.uint64): "unsigned long long",
              np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
#: NRRD type name, with the aliases of the NRRD specification -> numpy dtype (native byte order)
_NRRD_READ_TYPES = {
    **{name: np.dtype(np.int8) for name in ("signed char", "int8", "int8_t")},
    **{name: np.dtype(np.uint8) for name in ("uchar", "unsigned char", "uint8", "uint8_t")},
    **{name: np.dtype(np.int16) for name in ("short", "short int", "signed short", "signed short int", "int16",
                                              "int16_t")},
    **{name: np.dtype(np.uint16) for name in ("ushort", "unsigned short", "unsigned short int", "uint16",
                                               "uint16_t")},
    **{name: np.dtype(np.int32) for name in ("int", "signed int", "int32", "int32_t")},
    **{name: np.dtype(np.uint32) for name in ("uint", "unsigned int", "uint32", "uint32_t")},
    **{name: np.dtype(np.int64) for name in ("longlong", "long long", "long long int", "signed long long",
                                              "signed long long int", "int64", "int64_t")},
    **{name: np.dtype(np.uint64) for name in ("ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                                               "uint64_t")},
    "float": np.dtype(np.float32), "double": np.dtype(np.float64)}
#: LPS = FLIP @ RAS (NRRD and ITK files are in LPS; Slicer nodes in RAS)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: a NRRD ``space`` -> the matrix that takes its coordinates to RAS (those ITK's NRRD reader takes for 3D)
_SPACE_TO_RAS = {"left-posterior-superior": _RAS_TO_LPS, "lps": _RAS_TO_LPS,
                 "right-anterior-superior": np.eye(3), "ras": np.eye(3),
                 "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]), "las": np.diag([-1.0, 1.0, 1.0])}
#: longest NRRD header read (the server's are a few hundred bytes)
_MAX_HEADER_BYTES = 1 << 20


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


# --------------------------------------------------------------------------------------------------- reading back
class VolumeUnreadable(WorkflowError):
    """A volume file could not be read: missing, cut off, damaged, not a 3D scalar volume, or a format no reader
    here takes. The message says which and why."""


@dataclass(frozen=True, eq=False)
class VolumeArray:
    """A volume read from a file: ``voxels`` ((z, y, x), the file's scalar type, native byte order, C-contiguous)
    and ``ijk_to_ras`` (4x4, mm: the column of index axis i, j, k and the first voxel's centre, RAS)."""

    voxels: np.ndarray
    ijk_to_ras: np.ndarray


def _nrrd_fields(stream) -> dict[str, str]:
    """The fields of a NRRD header (lower-case names), ``stream`` left at the first data byte."""
    magic = stream.readline(64)
    if not magic.startswith(b"NRRD000"):
        raise VolumeUnreadable("not a NRRD file (no NRRD magic line)")
    fields: dict[str, str] = {}
    read = len(magic)
    while True:
        line = stream.readline(_MAX_HEADER_BYTES)
        read += len(line)
        if not line:
            raise VolumeUnreadable("the NRRD header ends before its data (the file is cut off)")
        if read > _MAX_HEADER_BYTES:
            raise VolumeUnreadable("the NRRD header is not terminated (damaged file)")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            return fields
        if text.startswith("#") or ":=" in text.partition(": ")[0]:
            continue  # a comment, or a key/value pair (no geometry in them)
        name, sep, value = text.partition(": ")
        if not sep:
            raise VolumeUnreadable(f"the NRRD header has a malformed line {text[:80]!r}")
        fields[name.strip().lower()] = value.strip()


def _nrrd_vector(text: str, what: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.strip().strip("()").split(",")])
    except ValueError:
        raise VolumeUnreadable(f"the NRRD {what} {text!r} is not a vector of numbers") from None
    if values.shape != (3,) or not np.all(np.isfinite(values)):
        raise VolumeUnreadable(f"the NRRD {what} {text!r} is not a finite 3D vector")
    return values


def _nrrd_geometry(fields: dict[str, str]) -> tuple[np.dtype, tuple[int, int, int], np.ndarray]:
    """(dtype as stored, (z, y, x) shape, IJK-to-RAS) of a 3D scalar NRRD's header fields."""
    dtype = _NRRD_READ_TYPES.get(fields.get("type", "").lower())
    if dtype is None:
        raise VolumeUnreadable(f"the NRRD type {fields.get('type')!r} is no scalar type a volume holds")
    if fields.get("dimension") != "3":
        raise VolumeUnreadable(f"a 3D scalar volume was expected, the NRRD has dimension {fields.get('dimension')}")
    for name in ("data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip"):
        if name in fields and not (name.endswith("skip") and fields[name] == "0"):
            raise VolumeUnreadable(f"NRRD files with {name!r} are not read here (the server sends attached data)")
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise VolumeUnreadable(f"the NRRD sizes {fields.get('sizes')!r} are not 3 positive numbers")
    to_ras = _SPACE_TO_RAS.get(fields.get("space", "").lower())
    if to_ras is None:
        raise VolumeUnreadable(f"the NRRD space {fields.get('space')!r} is none of LPS, RAS, LAS")
    columns = fields.get("space directions", "").replace(")", ");").split(";")
    columns = [c for c in (c.strip() for c in columns) if c]
    if len(columns) != 3:
        raise VolumeUnreadable(f"the NRRD space directions {fields.get('space directions')!r} are not 3 vectors")
    matrix = np.eye(4)
    matrix[:3, :3] = to_ras @ np.stack([_nrrd_vector(c, "space direction") for c in columns], axis=1)
    if "space origin" in fields:
        matrix[:3, 3] = to_ras @ _nrrd_vector(fields["space origin"], "space origin")
    if dtype.itemsize > 1:
        endian = fields.get("endian", "").lower()
        if endian not in ("little", "big"):
            raise VolumeUnreadable(f"the NRRD endian {fields.get('endian')!r} is neither little nor big")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    return dtype, (sizes[2], sizes[1], sizes[0]), matrix


def read_nrrd(path: str | os.PathLike, cancelled: Callable[[], bool] | None = None) -> VolumeArray:
    """Read a 3D scalar NRRD with attached data (raw or gzip, either byte order: what Slicer's storage node and ITK
    write) into a :class:`VolumeArray` (Slicer's node geometry: the LPS header turned to RAS), a chunk at a time
    straight into the array (the GIL is free while the file is read or inflated); ``cancelled`` (default: the
    thread's ``client.cancel_scope``) is asked before each chunk.

    Raises:
        VolumeUnreadable: the file is missing, cut off, damaged or no 3D scalar NRRD (the message says why).
        TransferCancelled: cancelled.
    """
    cancelled = cancel_check(cancelled)
    try:
        with open(path, "rb") as stream:
            fields = _nrrd_fields(stream)
            dtype, shape, matrix = _nrrd_geometry(fields)
            encoding = fields.get("encoding", "").lower()
            if encoding not in ("raw", "gzip", "gz"):
                raise VolumeUnreadable(f"NRRD encoding {fields.get('encoding')!r} is not read here (raw or gzip)")
            voxels = np.empty(shape, dtype.newbyteorder("="))
            target = memoryview(voxels.reshape(-1).view(np.uint8))
            filled = _fill_raw(stream, target, cancelled) if encoding == "raw" else \
                _fill_gzip(stream, target, cancelled)
    except OSError as error:
        raise VolumeUnreadable(error.strerror or str(error)) from None
    if filled < len(target):
        raise VolumeUnreadable(f"the file is cut off: {filled} of the {len(target)} bytes of {shape[2]} x "
                               f"{shape[1]} x {shape[0]} {dtype.newbyteorder('=').name} voxels")
    if not dtype.isnative:  # read as stored, then turned to this machine's order in place
        voxels.byteswap(inplace=True)
    return VolumeArray(voxels, matrix)


def _fill_raw(stream, target: memoryview, cancelled) -> int:
    filled = 0
    while filled < len(target):
        stop_if(cancelled)
        count = stream.readinto(target[filled:filled + CHUNK])
        if not count:
            break
        filled += count
    return filled


def _fill_gzip(stream, target: memoryview, cancelled) -> int:
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip (what teem / ITK write) or zlib header
    filled = 0
    pending = b""
    try:
        while filled < len(target):
            stop_if(cancelled)
            if not pending:
                pending = stream.read(CHUNK)
                if not pending:
                    break
            piece = inflater.decompress(pending, min(CHUNK, len(target) - filled))
            pending = inflater.unconsumed_tail
            target[filled:filled + len(piece)] = piece
            filled += len(piece)
            if inflater.eof and filled < len(target):
                break
    except zlib.error as error:
        raise VolumeUnreadable(f"the gzip data is damaged ({error})") from None
    return filled


def _read_with_simpleitk(path: Path) -> VolumeArray:
    try:
        import SimpleITK as sitk  # noqa: N813 - bundled with Slicer
    except ImportError:
        raise VolumeUnreadable(f"{path.name}: reading this format needs SimpleITK (bundled with Slicer)") from None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()
        raise VolumeUnreadable(reason[-1].removeprefix("sitk::ERROR: ") if reason else "SimpleITK could not read "
                               "it") from None
    if image.GetDimension() == 2 and image.GetNumberOfComponentsPerPixel() == 1:
        # a single slice, as Slicer's loader (ITK's 3D reader) gives a 2D file: k spacing 1, origin 0, direction k
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeUnreadable(f"a 3D scalar volume was expected, the file holds a {image.GetDimension()}D image "
                               f"of {image.GetNumberOfComponentsPerPixel()} component(s)")
    matrix = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = _RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = _RAS_TO_LPS @ np.array(image.GetOrigin())
    return VolumeArray(np.ascontiguousarray(sitk.GetArrayFromImage(image)), matrix)


def read_volume(path: str | os.PathLike, cancelled: Callable[[], bool] | None = None) -> VolumeArray:
    """Background: a volume file as a :class:`VolumeArray`: NRRD with :func:`read_nrrd`, any other format ITK
    reads (NIfTI, MetaImage), and a NRRD :func:`read_nrrd` does not (2D, ascii, no space field), with SimpleITK,
    as Slicer's loader reads them. A 2D image (any format) is one slice on the grid Slicer's loader gives it (k
    spacing 1, origin 0 along k).

    Raises:
        VolumeUnreadable: as :func:`read_nrrd`, or a format that cannot be read here.
        TransferCancelled: cancelled.
    """
    path = Path(path)
    if path.suffix.lower() == ".nrrd":
        if _nrrd_read_here(path):
            return read_nrrd(path, cancelled)
        stop_if(cancel_check(cancelled))
        try:  # a NRRD Slicer's loader (ITK) reads but read_nrrd does not: 2D, ascii, spacings without a space
            return _read_with_simpleitk(path)
        except VolumeUnreadable:
            return read_nrrd(path, cancelled)  # read by neither: read_nrrd's reason
    stop_if(cancel_check(cancelled))
    return _read_with_simpleitk(path)


def _nrrd_read_here(path: Path) -> bool:
    """Whether :func:`read_nrrd` takes the header of ``path`` (3D scalar, attached raw or gzip data, a space); also
    True when the header cannot be read at all (missing, cut off, not NRRD), for :func:`read_nrrd` to say why, and
    for a detached header: the file the server sent must hold the voxels, never name another file on this
    computer."""
    try:
        with open(path, "rb") as stream:
            fields = _nrrd_fields(stream)
    except (OSError, VolumeUnreadable):
        return True
    if "data file" in fields or "datafile" in fields:
        return True
    try:
        _nrrd_geometry(fields)
    except VolumeUnreadable:
        return False
    return fields.get("encoding", "").lower() in ("raw", "gzip", "gz")


def align_to_grid(voxels: np.ndarray, ijk_to_ras: np.ndarray, shape: tuple[int, ...], reference: np.ndarray,
                  tol: float = 1e-4) -> np.ndarray | None:
    """``voxels`` ((z, y, x) on the grid ``ijk_to_ras``, 4x4 mm) in the index order of the grid ``reference``
    (4x4) of ``shape`` when both hold the same voxel centres; None when the grids really differ (size, spacing,
    direction or position).

    Slicer's file reader keeps the IJK-to-RAS matrix right-handed: a volume written from a left-handed (mirrored)
    grid comes back with the last axis reversed and the origin at the other end, so a result of such an original
    does too. Same centres, other index order: the array is flipped back (a C-contiguous copy) so that voxel
    (k, j, i) means the same point as in the original. On the same grid (within ``tol``) ``voxels`` is returned
    as it is."""
    voxels = np.asarray(voxels)
    m_n, m_r = np.asarray(ijk_to_ras, np.float64), np.asarray(reference, np.float64)
    if voxels.shape != tuple(shape) or voxels.ndim != 3:
        return None
    if np.allclose(m_n, m_r, atol=tol):
        return voxels
    flips = []
    expected_origin = m_r[:3, 3].copy()
    for axis in range(3):  # IJK axis i, j, k is array axis 2, 1, 0
        if np.allclose(m_n[:3, axis], m_r[:3, axis], atol=tol):
            continue
        if not np.allclose(m_n[:3, axis], -m_r[:3, axis], atol=tol):
            return None
        flips.append(2 - axis)
        expected_origin += m_r[:3, axis] * (shape[2 - axis] - 1)
    if not np.allclose(m_n[:3, 3], expected_origin, atol=max(tol, 1e-3)):
        return None
    return np.ascontiguousarray(np.flip(voxels, axis=tuple(flips)))


@dataclass(frozen=True, eq=False)
class ResultRead:
    """A denoised result read in the background (:func:`read_result`), for ``mrml.load_result`` on the GUI thread:
    ``volume`` (on the original's grid when the grid was given and matched), or ``error``, why the file could not
    be read. An unreadable file is not raised in the background: the GUI thread first checks the result is still
    for the study selected, then refuses it (the order of the checks when the file was read there)."""

    path: Path
    volume: VolumeArray | None = None
    error: str = ""


def read_result(path: str | os.PathLike, grid: tuple[tuple[int, ...], np.ndarray] | None = None, report: Any = None,
                cancelled: Callable[[], bool] | None = None) -> ResultRead:
    """Background, after the download: the result file ``path`` read (:func:`read_volume`) and, when ``grid``
    ((z, y, x) shape, IJK-to-RAS of the original, from the request's copy of it) is given and holds the same voxel
    centres, put in its voxel order (:func:`align_to_grid`; the GUI thread checks the grid again against the node).
    Raises only TransferCancelled."""
    path = Path(path)
    if report:
        report(None, f"reading the result {path.name} ...")
    try:
        volume = read_volume(path, cancelled)
    except VolumeUnreadable as error:
        return ResultRead(path, None, str(error))
    if grid is not None:
        aligned = align_to_grid(volume.voxels, volume.ijk_to_ras, grid[0], grid[1])
        if aligned is not None:
            volume = VolumeArray(aligned, np.array(grid[1], np.float64))
    return ResultRead(path, volume)


def right_handed(volume: VolumeArray) -> VolumeArray:
    """``volume`` on a right-handed IJK grid, as Slicer's loader gives every file it reads
    (vtkMRMLVolumeArchetypeStorageNode's ForceRightHandedIJKCoordinateSystem, on by default:
    vtkMRMLVolumeNode::SetIJKCoordinateSystemToRightHanded): a left-handed (mirrored) grid has its slice order (k,
    array axis 0) reversed, its k column negated and its origin moved to the last slice; the same voxel centres
    and values. The voxels are reversed in place, a slice at a time (no second volume); ``volume`` is returned as it
    is when right-handed already."""
    matrix = np.array(volume.ijk_to_ras, np.float64)
    if np.linalg.det(matrix[:3, :3]) >= 0:
        return volume
    voxels = volume.voxels
    count = voxels.shape[0]
    scratch = np.empty_like(voxels[0])
    for k in range(count // 2):
        scratch[...] = voxels[k]
        voxels[k] = voxels[count - 1 - k]
        voxels[count - 1 - k] = scratch
    matrix[:3, 3] += matrix[:3, 2] * (count - 1)
    matrix[:3, 2] *= -1.0
    return VolumeArray(voxels, matrix)


def read_study(path: str | os.PathLike, study_id: str = "", report: Any = None,
               cancelled: Callable[[], bool] | None = None) -> VolumeArray:
    """Background, after the download of a review-queue study (``study_id``, the server's id): its file ``path``
    read (:func:`read_volume`) on the grid Slicer's loader gives it (:func:`right_handed`), so that its node, made
    on the GUI thread from the array (``mrml.load_study``), holds the voxels and grid ``slicer.util.loadVolume`` of
    the file gave (the same content identity). Only this file is read: no numbered files beside it are stacked.

    Raises:
        VolumeUnreadable: "could not read the study <id> (<file>) the server sent: <reason>"; or its voxels are
            64-bit integers, which Slicer's volume nodes made from arrays do not take.
        TransferCancelled: cancelled.
    """
    path = Path(path)
    what = f"the study {study_id} ({path.name})" if study_id else f"the study {path.name}"
    if report:
        report(None, f"reading {what} ...")
    try:
        volume = read_volume(path, cancelled)
    except VolumeUnreadable as error:
        raise VolumeUnreadable(f"could not read {what} the server sent: {error}") from None
    if volume.voxels.dtype.kind in "iu" and volume.voxels.dtype.itemsize == 8:
        raise VolumeUnreadable(f"could not read {what} the server sent: its voxels are "
                               f"{volume.voxels.dtype.name}, a type Slicer does not show")
    return right_handed(volume)


def node_grid(ijk_to_ras: np.ndarray) -> np.ndarray:
    """The IJK-to-RAS matrix (4x4, mm) that a new Slicer volume node given ``ijk_to_ras`` through a
    ``vtkMatrix4x4`` (``mrml.load_study``) reports, bit for bit: ``vtkMatrix4x4::SetElement`` keeps an element equal
    to the identity's (a -0.0 off the diagonal stays 0.0); ``vtkMRMLVolumeNode::SetIJKToRASMatrix`` takes each
    column's length as a spacing and the column divided by it as a direction, and keeps a direction element within
    double epsilon of the new node's (the identity's), and all three spacings or origin coordinates when each is
    within it of the new node's (1, 0) (``vtkMathUtilities::FuzzyCompare``); ``GetIJKToRASMatrix`` gives spacing
    times direction, and the origin. The values of ``ijk_to_ras`` up to rounding, and the bits that
    :func:`review_session.content_identity` hashes."""
    given = np.eye(4)
    for row in range(4):
        for col in range(4):
            value = float(np.asarray(ijk_to_ras, np.float64)[row, col])
            if given[row, col] != value:
                given[row, col] = value
    eps = float(np.finfo(np.float64).eps)
    directions = [[1.0 if row == col else 0.0 for col in range(3)] for row in range(3)]
    spacing = []
    for col in range(3):  # in the C++ code's order of operations, in doubles
        length = np.float64(0.0)
        for row in range(3):
            length += given[row, col] * given[row, col]
        length = np.sqrt(length)
        spacing.append(float(length))
        for row in range(3):
            with np.errstate(all="ignore"):  # a zero column: NaN, as in C++
                value = float(given[row, col] / length)
            if not abs(directions[row][col] - value) < eps:
                directions[row][col] = value
    if all(abs(1.0 - value) < eps for value in spacing):
        spacing = [1.0, 1.0, 1.0]
    origin = [float(given[row, 3]) for row in range(3)]
    if all(abs(value) < eps for value in origin):
        origin = [0.0, 0.0, 0.0]
    grid = np.eye(4)
    for row in range(3):
        for col in range(3):
            grid[row, col] = spacing[col] * directions[row][col]
        grid[row, 3] = origin[row]
    return grid


def study_content(volume: VolumeArray, name: str) -> StudyIdentity | None:
    """Background, after :func:`read_study`: the content identity (``review_session.content_identity``) of the node
    ``mrml.load_study`` makes of ``volume`` and names ``name`` (a new node: no DICOM series, no sequence frame; its
    grid as the node reports it: :func:`node_grid`), hashed here from the array read, so that the GUI thread neither
    copies nor hashes the study's voxels: there ``mrml.loaded_identity`` only checks that the node holds the type,
    shape and grid hashed. None when it cannot be hashed (a degenerate grid): the node is identified as any volume
    then, and refused there with the reason."""
    try:
        return content_identity(volume.voxels, node_grid(volume.ijk_to_ras), name)
    except WorkflowError:
        return None
