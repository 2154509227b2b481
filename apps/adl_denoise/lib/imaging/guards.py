"""Refusals shared by the readers and the writers: the voxel limit, a header that declares more data than its
file holds (checked before any voxel is read), a cut gzip stream, non-finite or empty values, writing onto
the input; and the temporary folder an output is written in before it is renamed into place."""
from __future__ import annotations

import gzip
import math
import os
import re
import struct
import uuid
import zlib
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from .errors import ImageReadError, ImageTooLargeError, ImageWriteError, one_line
from .volume import Volume

__all__ = [
    "MAX_VOXELS_DEFAULT",
    "TextHeader",
    "check_finite",
    "check_gzip_stream",
    "check_metaimage_compressed_size",
    "check_not_input",
    "check_plausible",
    "check_size",
    "check_stored_size",
    "check_values",
    "image_files",
    "make_temp_dir",
    "max_voxels",
    "parse_voxel_limit",
    "text_header",
]

# Largest image read (voxels), checked from the header before any pixel is loaded: 1e9 voxels is 4 GB as
# float32, several times a whole-body CT (512 x 512 x 2000 = 5e8). Override with ADL_MAX_VOXELS.
MAX_VOXELS_DEFAULT = 1_000_000_000


def parse_voxel_limit(value: object, name: str) -> int:
    """``value`` (text or a number) as a voxel limit: a whole number >= 1, written ``1000000000``, ``1e9`` or
    ``1.5e8`` alike. The one parser of ``ADL_MAX_VOXELS`` and of the server's ``--conf max_voxels`` (they disagreed:
    ``2.5`` was a limit of 2 voxels from the environment, every image refused as too large, and an error from the
    conf).

    Raises:
        ValueError: naming ``name`` and the value: not a number, not a whole number, or below 1.
    """
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isnan(number):
        problem = "not a number"
    elif not math.isfinite(number) or number != int(number):
        problem = "not a whole number"
    elif number < 1:
        problem = "below 1"
    else:
        return int(number)
    raise ValueError(f"{name} {text!r}: {problem}; give a whole number of voxels >= 1, e.g. 1e9 or 500000000")


def max_voxels() -> int:
    """The largest number of voxels :func:`~lib.imaging.read_volume` accepts by default (``ADL_MAX_VOXELS`` or
    :data:`MAX_VOXELS_DEFAULT`).

    Raises:
        ValueError: ``ADL_MAX_VOXELS`` is set to something else than a whole number >= 1 (:func:`parse_voxel_limit`).
    """
    value = os.environ.get("ADL_MAX_VOXELS", "").strip()
    if not value:
        return MAX_VOXELS_DEFAULT
    return parse_voxel_limit(value, "ADL_MAX_VOXELS")


def check_size(shape: Sequence[int], path: Path, limit: int) -> None:
    """Refuse an image of ``shape`` (from its header) with more than ``limit`` voxels
    (:class:`~lib.imaging.errors.ImageTooLargeError`)."""
    n_voxels = int(np.prod([int(v) for v in shape], dtype=np.float64))
    if n_voxels > limit:
        raise ImageTooLargeError(
            f"{path} is too large: {' x '.join(str(int(v)) for v in shape)} = {n_voxels:,} voxels exceeds the limit "
            f"of {limit:,} (raise it with ADL_MAX_VOXELS on the command line or --conf max_voxels on the server, "
            "or crop the volume)",
            tuple(int(v) for v in shape), n_voxels, limit,
        )


# deflate (gzip, zlib) cannot expand data more than 1032 : 1 (its longest match, 258 bytes, costs >= 2 bits), so
# a compressed file of n bytes never holds more than ~1032 n bytes of voxels; 1100 leaves room for headers.
_DEFLATE_MAX_RATIO = 1100
# NIfTI headers: sizeof_hdr 348 (NIfTI-1, vox_offset float32 at byte 108) or 540 (NIfTI-2, int64 at byte 168)
_NIFTI1_HEADER, _NIFTI2_HEADER = 348, 540
_CHUNK = 1 << 20  # bytes decompressed at a time when a gzip stream is verified: memory stays O(1 MiB)


def _nifti_vox_offset(header: bytes) -> int:
    """Byte offset of the voxels from the first bytes of a NIfTI-1/-2 header (its size when unreadable)."""
    for order in ("<", ">"):
        if len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] == _NIFTI1_HEADER and len(header) >= 112:
            return max(_NIFTI1_HEADER, int(struct.unpack(order + "f", header[108:112])[0]))
        if len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] == _NIFTI2_HEADER and len(header) >= 176:
            return max(_NIFTI2_HEADER, int(struct.unpack(order + "q", header[168:176])[0]))
    return _NIFTI1_HEADER


class TextHeader(NamedTuple):
    """The text header of a NRRD or MetaImage file (:func:`text_header`), parsed once for all the checks of a read."""

    #: fields by lower-case key (a key written in several cases: its last line's value)
    fields: dict[str, str]
    #: fields by key as written: MetaIO reads its keys case included (only ``CompressedDataSize`` spelt so)
    written: dict[str, str]
    #: bytes of the header: where the data of a file that holds it starts
    length: int
    #: whether its end (or the file's) was found in the bytes read (a longer header: ``length`` is not that)
    complete: bool


def text_header(path: Path, limit: int = 65536) -> TextHeader:
    """The text header of a NRRD or MetaImage file, read from its first ``limit`` bytes: NRRD ends it at the first
    blank line, MetaImage at its ``ElementDataFile`` line.

    Raises:
        OSError: ``path`` cannot be read.
    """
    with open(path, "rb") as handle:
        head = handle.read(limit)
    fields: dict[str, str] = {}
    written: dict[str, str] = {}
    position = 0
    complete = len(head) < limit  # the whole file read: a header that ends at the end of its file
    for raw in head.splitlines(keepends=True):
        position += len(raw)
        line = raw.decode("latin-1").strip()
        if not line:
            complete = True
            break  # NRRD: the data follows the blank line
        if line.startswith("#"):
            continue
        match = re.match(r"^([^:=]+?)\s*(:=|:|=)\s*(.*)$", line)
        if match:
            key, value = match.group(1).strip(), match.group(3).strip()
            fields[key.lower()] = written[key] = value
            if key.lower() == "elementdatafile":
                complete = True
                break  # MetaImage: the data follows this line
    return TextHeader(fields, written, position, complete)


def _metaio_compressed(fields: dict[str, str]) -> bool:
    """Whether ITK's MetaIO inflates the voxels of a MetaImage header's ``fields`` (as written,
    :attr:`TextHeader.written`): ``CompressedData`` and ``BinaryData`` (true unless given) starting with T, t or 1."""
    return (fields.get("CompressedData", "")[:1] in ("T", "t", "1")
            and fields.get("BinaryData", "True")[:1] in ("T", "t", "1"))


def _metaio_number(value: str | None) -> float:
    """A MetaImage header value read as MetaIO reads a number (C++ ``>>``: the leading number, 0 when none)."""
    match = re.match(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value or "")
    try:
        return float(match.group(0)) if match else 0.0
    except OverflowError:  # pragma: no cover - a value beyond float: no size MetaIO can use
        return 0.0


def _metaio_compressed_size(fields: dict[str, str]) -> int:
    """The ``CompressedDataSize`` MetaIO reads from a header's ``fields`` (as written): the bytes of compressed data
    it reads after the header; 0 (none given, 0, no number, negative) makes it take the whole file from its first
    byte instead."""
    number = _metaio_number(fields.get("CompressedDataSize"))
    return int(number) if math.isfinite(number) and number >= 1 else 0


def image_files(path: str | os.PathLike) -> list[Path]:
    """The files that hold an image: ``path`` itself, then, for a MetaImage (``.mhd``, ``.mha``) or NRRD (``.nhdr``,
    ``.nrrd``) header that keeps its voxels in other files (``ElementDataFile`` / ``data file``), those files in
    the header's order: one file, a ``LIST`` of files (the lines after the field), or a pattern ``fmt min max step``
    (``slice%03d.raw 1 40 1``). Relative names are relative to the header's folder. Headers only are read; the data
    files need not exist.

    Raises:
        OSError: ``path`` cannot be read.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return [path]
    fields = text_header(path).fields
    if path.name.lower().endswith((".nrrd", ".nhdr")):
        named = fields.get("data file") or fields.get("datafile") or ""
    else:
        named = fields.get("elementdatafile", "")
    if not named or named.upper() == "LOCAL":
        return [path]
    parts = named.split()
    if parts[0].upper() == "LIST":  # the names follow the field, one a line (the field is the header's last)
        with open(path, "rb") as handle:
            lines = handle.read(65536).decode("latin-1").splitlines()
        start = next(k for k, line in enumerate(lines)
                     if re.match(r"^\s*(elementdatafile|data ?file)\s*(:=|:|=)", line, re.I)) + 1
        names = []
        for line in lines[start:]:
            if not line.strip():
                break
            names.append(line.strip())
    elif "%" in parts[0] and len(parts) >= 3:
        try:
            first, last = int(parts[1]), int(parts[2])
            step = int(parts[3]) if len(parts) > 3 else 1
            names = [parts[0] % k for k in range(first, last + (1 if step > 0 else -1), step or 1)]
        except (TypeError, ValueError):
            names = [named]
    else:
        names = [named]
    return [path] + [Path(name) if os.path.isabs(name) else path.parent / name for name in names]


def _stored_bytes(path: Path, header: TextHeader | None = None) -> tuple[int, str] | None:
    """(bytes that hold the voxels, encoding) of an image file: ``raw``, ``gzip``, ``bzip2``, ``ascii`` or ``hex``;
    None when the layout is not one this check understands (a list of data files, a pattern). ``header``: a NRRD's
    or MetaImage's :func:`text_header` when already read."""
    name = path.name.lower()
    size = path.stat().st_size
    if name.endswith(".nii.gz") or name.endswith(".gz"):
        return size, "gzip"
    if name.endswith(".nii"):
        with open(path, "rb") as handle:
            return size - _nifti_vox_offset(handle.read(_NIFTI2_HEADER)), "raw"
    if name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        header = header or text_header(path)
        fields = header.fields
        if not header.complete:
            return None  # a header over 64 KiB: where its data starts is not known here
        if name.endswith((".nrrd", ".nhdr")):
            encoding = fields.get("encoding", "raw").lower()
            encoding = {"gz": "gzip", "bz2": "bzip2", "txt": "ascii", "text": "ascii"}.get(encoding, encoding)
            data_file = fields.get("data file") or fields.get("datafile")
        else:
            encoding = "gzip" if _metaio_compressed(header.written) else "raw"
            data_file = fields.get("elementdatafile", "LOCAL")
            data_file = None if data_file.upper() == "LOCAL" else data_file
        if data_file is None:
            return size - header.length, encoding
        if " " in data_file or "%" in data_file or data_file.upper() == "LIST":
            return None  # several data files: ITK checks them while reading
        detached = (path.parent / data_file) if not os.path.isabs(data_file) else Path(data_file)
        return (detached.stat().st_size if detached.is_file() else 0), encoding
    return None


def check_stored_size(path: Path, shape: Sequence[int], bytes_per_voxel: int,
                      header: TextHeader | None = None) -> None:
    """Refuse a file whose header declares more voxel data (``shape`` x ``bytes_per_voxel``) than the file can
    hold, before any voxel is read (a reader would allocate the declared size first, then fail or fill zeros).

    Raw data must be all there; deflate-compressed data cannot expand more than ~1100 : 1; text data needs at
    least one character per value, hex two per byte. bzip2 (NRRD) is left to the voxel limit. ``header``: a NRRD's
    or MetaImage's :func:`text_header` when already read.
    """
    declared = int(np.prod([int(v) for v in shape], dtype=np.float64)) * int(bytes_per_voxel)
    try:
        stored = _stored_bytes(path, header)
    except OSError:
        return  # the reader reports what it cannot open
    if stored is None:
        return
    available, encoding = stored
    needed = {"raw": declared, "gzip": -(-declared // _DEFLATE_MAX_RATIO), "hex": 2 * declared,
              "ascii": declared // max(1, int(bytes_per_voxel))}.get(encoding)
    if needed is not None and available < needed:
        raise ImageReadError(
            f"{path} is truncated or corrupt: its header declares {' x '.join(str(int(v)) for v in shape)} voxels "
            f"({declared:,} bytes), but the file holds {max(available, 0):,} bytes of {encoding} data"
        )


def check_gzip_stream(path: Path, needed: int | None = None, nifti: bool = False) -> None:
    """Refuse a gzip file whose data, read as ITK's NIfTI reader reads it (zlib's gzread: gzip members one after
    another, a file without a gzip header as it is), is cut or corrupt (a member's CRC or length is wrong) or holds
    fewer than ``needed`` voxel bytes (after the NIfTI header, with ``nifti``): ITK fills missing voxels with 0 and
    reads corrupt ones as they inflate. Once the member holding the last declared voxel has ended (its CRC checked),
    nothing more is read: ITK reads no further, so bytes after it (a newline, a block a transfer tool appended) do
    not matter. Without ``needed``, the data is read to its end. Reads in 1 MiB chunks, once (the NIfTI header is
    taken from the first bytes out): memory stays small whatever the declared size."""
    total = 0
    head = b""  # the first bytes out: the NIfTI header, which places the voxels

    def enough() -> int:  # asked at a member's end, when the bytes out so far (and so the header) have been seen
        if not nifti:
            return int(needed)
        # at least a whole NIfTI-2 header's length, as the header checks inflate it: a tiny image's broken second
        # member is refused here as it always was, not later by nibabel with a vaguer message
        return max(_NIFTI2_HEADER, _nifti_vox_offset(head) + int(needed))

    try:
        with open(path, "rb") as handle:
            transparent = handle.read(len(_GZIP_MAGIC)) != _GZIP_MAGIC
            handle.seek(0)
            chunks = _raw_chunks(handle) if transparent else _inflated_chunks(
                handle, None if needed is None else enough)
            for chunk in chunks:
                if nifti and len(head) < _NIFTI2_HEADER:
                    head += chunk[:_NIFTI2_HEADER - len(head)]
                total += len(chunk)
    except _StreamCut as exc:
        raise ImageReadError(f"{path} is truncated or corrupt: its gzip stream is broken (Compressed file ended "
                             "before the end-of-stream marker was reached)") from exc
    except (OSError, zlib.error) as exc:
        raise ImageReadError(f"{path} is truncated or corrupt: its gzip stream is broken ({one_line(exc)})") from exc
    if needed is not None:
        have = total - (_nifti_vox_offset(head) if nifti else 0)
        if have < needed:
            raise ImageReadError(f"{path} is truncated or corrupt: its header declares {needed:,} bytes of voxels, "
                                 f"the file decompresses to {max(have, 0):,}")


def _skip_lines(handle, count: int) -> bool:
    """Move ``handle`` past ``count`` lines (NRRD's ``line skip``), reading 64 KiB at a time; False when the file
    ends first."""
    while count > 0:
        start = handle.tell()
        block = handle.read(65536)
        if not block:
            return False
        at = -1
        while count > 0:
            at = block.find(b"\n", at + 1)
            if at < 0:
                break
            count -= 1
        if count == 0:
            handle.seek(start + at + 1)
    return True


class _CompressedData(NamedTuple):
    """Where the compressed voxel data of a NRRD or MetaImage file is (:func:`_compressed_data`)."""

    file: Path  #: the header's file (inline data) or its one data file
    offset: int  #: bytes to skip in ``file``
    line_skip: int  #: then lines to skip (NRRD's ``line skip``)
    #: MetaImage: one zlib or gzip stream, as MetaIO inflates it; NRRD: gzip members one after another, as its reader
    #: reads on through them
    metaimage: bool
    byte_skip: int  #: bytes of the decompressed data before the voxels (NRRD's ``byte skip``)
    size: int | None  #: bytes of compressed data the reader reads (MetaImage's ``CompressedDataSize``; None: all)


def _compressed_data(path: Path, header: TextHeader | None = None) -> _CompressedData | None:
    """Where the compressed voxel data of a NRRD (``encoding gzip``) or MetaImage (compressed as MetaIO reads it,
    :func:`_metaio_compressed`) file is, inline or in its one data file (``header``: its :func:`text_header` when
    already read). None otherwise, and wherever the data's start is not certain: a header over 64 KiB, a MetaImage
    ``HeaderSize``, a negative ``byte skip``, several data files."""
    name = path.name.lower()
    if not name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        return None
    header = header or text_header(path)
    fields = header.fields
    if not header.complete:
        return None  # a header over 64 KiB: its data's offset is not known here
    size = None
    try:
        if name.endswith((".nrrd", ".nhdr")):
            if fields.get("encoding", "raw").lower() not in ("gzip", "gz"):
                return None
            data_file = fields.get("data file") or fields.get("datafile")
            line_skip, byte_skip = int(fields.get("line skip", 0)), int(fields.get("byte skip", 0))
            metaimage = False
        else:
            if not _metaio_compressed(header.written) or int(fields.get("headersize", 0)):
                return None
            data_file = fields.get("elementdatafile", "LOCAL")
            data_file = None if data_file.upper() == "LOCAL" else data_file
            line_skip, byte_skip, metaimage = 0, 0, True
            size = _metaio_compressed_size(header.written) or None  # none: MetaIO reads the data file whole
    except ValueError:
        return None  # a skip that is no number: the reader says what is wrong
    if line_skip < 0 or byte_skip < 0:
        return None
    if data_file is None:
        return _CompressedData(path, header.length, line_skip, metaimage, byte_skip, size)
    if " " in data_file or "%" in data_file or data_file.upper() == "LIST":
        return None  # several data files: ITK checks them while reading
    detached = Path(data_file) if os.path.isabs(data_file) else path.parent / data_file
    return _CompressedData(detached, 0, line_skip, metaimage, byte_skip, size)


_GZIP_MAGIC = b"\x1f\x8b"


class _StreamCut(Exception):
    """The file ends before a deflate stream's end-of-stream marker."""


def _raw_chunks(handle):
    """The bytes of ``handle`` from where it is, 1 MiB at a time."""
    while chunk := handle.read(_CHUNK):
        yield chunk


def _inflated_chunks(handle, enough: Callable[[], int] | None = None):
    """The decompressed gzip data of ``handle`` from where it is, at most 1 MiB a chunk: its first member and those
    that follow it (as zlib's gzread and Python's gzip module read them; bytes after the last member that do not
    start another one are ignored, as gzread ignores them), up to the end of the member where ``enough()`` bytes are
    out (asked at each member's end, after every byte before it was handed out).

    Raises:
        _StreamCut: the file ends before a stream's end-of-stream marker;
        zlib.error: the data does not inflate.
    """
    inflater = zlib.decompressobj(31)
    produced = 0
    while True:
        if inflater.eof:
            if enough is not None and produced >= enough():
                return
            following = inflater.unused_data
            while len(following) < len(_GZIP_MAGIC):
                more = handle.read(_CHUNK)
                if not more:
                    break
                following += more
            if not following.startswith(_GZIP_MAGIC):
                return  # the end of the data, or bytes after it that are no gzip member
            inflater, data = zlib.decompressobj(31), following
        else:
            data = handle.read(_CHUNK)
            if not data:
                raise _StreamCut()
        out = inflater.decompress(data, _CHUNK)  # at most 1 MiB out at a time: memory stays small
        produced += len(out)
        yield out
        while inflater.unconsumed_tail and not inflater.eof:
            out = inflater.decompress(inflater.unconsumed_tail, _CHUNK)
            produced += len(out)
            yield out


def _inflated_length(file: Path, offset: int, line_skip: int) -> int | None:
    """Bytes the gzip data of ``file`` from ``offset`` (then ``line_skip`` lines on) decompresses to, its members one
    after another (:func:`_inflated_chunks`). None where the data does not parse from there (not this check's to
    judge: the reader says what is wrong).

    Raises:
        ImageReadError: the file ends before a stream's end-of-stream marker (cut short).
    """
    total = 0
    with open(file, "rb") as handle:
        handle.seek(offset)
        if not _skip_lines(handle, line_skip):
            return None
        try:
            for chunk in _inflated_chunks(handle):
                total += len(chunk)
        except _StreamCut:
            raise ImageReadError(f"{file} is truncated or corrupt: its compressed data ends before its "
                                 "end-of-stream marker") from None
        except zlib.error:
            return None
    return total


def _metaio_inflated(file: Path, offset: int, size: int | None, needed: int) -> tuple[int, str | None]:
    """What ITK's MetaIO inflates of the compressed data of ``file`` at ``offset``: the ``size`` bytes there (its
    ``CompressedDataSize``; None: to the end of the file) as one zlib or gzip stream, until ``needed`` bytes are out
    (MetaIO stops there: what follows is never read). Returns (bytes out, at most about ``needed``; why fewer: None
    (the stream ended), "cut" (its bytes ended first) or zlib's error, the bytes out then counted before the 1 MiB
    chunk where it failed). In 1 MiB chunks: memory stays small."""
    inflater = zlib.decompressobj(47)
    produced = 0
    left = size
    with open(file, "rb") as handle:
        handle.seek(offset)
        while produced < needed and not inflater.eof:
            data = handle.read(_CHUNK if left is None else min(_CHUNK, left))
            if not data:
                # zlib may still hold output its input gave (a long match cut at the 1 MiB cap, no input left to
                # put in unconsumed_tail: a size without the Adler-32); MetaIO's one inflate call gets it all
                try:
                    while produced < needed and not inflater.eof:
                        out = inflater.decompress(b"", _CHUNK)
                        if not out:
                            break
                        produced += len(out)
                except zlib.error as exc:
                    return produced, one_line(exc)
                return produced, None if produced >= needed or inflater.eof else "cut"
            if left is not None:
                left -= len(data)
            try:
                produced += len(inflater.decompress(data, _CHUNK))
                while inflater.unconsumed_tail and not inflater.eof and produced < needed:
                    produced += len(inflater.decompress(inflater.unconsumed_tail, _CHUNK))
            except zlib.error as exc:
                return produced, one_line(exc)
    return produced, None


def _gzip_trailer(file: Path) -> int | None:
    """The last 4 bytes of ``file`` as a gzip trailer's length (decompressed bytes mod 2**32); None if unreadable."""
    try:
        with open(file, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            return struct.unpack("<I", handle.read(4))[0]
    except (OSError, struct.error):
        return None


def check_compressed_length(path: Path, needed: int, header: TextHeader | None = None) -> None:
    """Refuse a NIfTI (``.nii.gz``), NRRD or MetaImage file whose compressed voxel data is provably cut short: the
    file ends before the stream's end-of-stream marker, or the stream decompresses to fewer than ``needed`` bytes
    (the run's reader fails on it, or fills the rest with zeros). A NIfTI or NRRD gzip stream whose trailer gives
    the declared length is taken without reading it (the last 4 bytes of an intact gzip stream give its
    decompressed length mod 2**32; a cut file ends in compressed data instead, which matches by chance once in
    2**32); any other (several gzip members, bytes after the data, a cut file) is decompressed through, in 1 MiB
    chunks, NRRD's members one after another, NIfTI's as ITK reads them (:func:`check_gzip_stream`: up to the member
    holding the last voxel). MetaImage's zlib or gzip data (no length stored) is inflated as MetaIO inflates it
    (:func:`_check_metaio_inflates`: its ``CompressedDataSize`` bytes, until the voxels are out), and refused too
    where it does not inflate (MetaIO only prints "Uncompress failed" and keeps garbage). A NRRD file whose data does
    not parse where its header places it, or a file whose data's start is uncertain (:func:`_compressed_data`),
    passes: its reader says what is wrong. Other files: nothing to check here (:func:`check_stored_size`).
    ``header``: a NRRD's or MetaImage's :func:`text_header` when already read."""
    if path.name.lower().endswith(".nii.gz"):
        trailer = _gzip_trailer(path)
        try:
            with gzip.open(path, "rb") as stream:
                head = stream.read(_NIFTI2_HEADER)
        except (EOFError, OSError, zlib.error):
            head, trailer = b"", None  # the stream check says what is wrong
        if trailer is not None and trailer == (_nifti_vox_offset(head) + int(needed)) % (1 << 32):
            return
        check_gzip_stream(path, needed, nifti=True)
        return
    try:
        data = _compressed_data(path, header)
        if data is None:
            return
        byte_skip = data.byte_skip
        wanted = int(needed) + byte_skip  # NRRD's byte skip counts in the decompressed data
        if data.metaimage:
            _check_metaio_inflates(path, data.file, data.offset, data.size, wanted)
            return
        if _gzip_trailer(data.file) == wanted % (1 << 32):
            return
        total = _inflated_length(data.file, data.offset, data.line_skip)
    except OSError:
        return  # the reader reports what it cannot open
    if total is not None and total < wanted:
        skipped = f" after the {byte_skip:,} its byte skip passes over" if byte_skip else ""
        raise ImageReadError(f"{path} is truncated or corrupt: its header declares {int(needed):,} bytes of voxels"
                             f"{skipped}, its compressed data decompresses to {total:,}")


def _check_metaio_inflates(path: Path, file: Path, offset: int, size: int | None, needed: int) -> None:
    """Refuse a MetaImage file whose compressed data, read as ITK's MetaIO reads it (:func:`_metaio_inflated`: only
    its ``CompressedDataSize`` bytes where it gives one), gives fewer than ``needed`` bytes: MetaIO leaves the
    voxels after them as the memory it allocated held (zeros or garbage; only "Uncompress failed" on stderr). A file
    cut short is named as cut; a ``CompressedDataSize`` smaller than the data that follows is named, with the size
    to give."""
    produced, stop = _metaio_inflated(file, offset, size, needed)
    if produced >= needed:
        return
    held = file.stat().st_size - offset
    if size is not None and size < held and _metaio_inflated(file, offset, None, needed)[0] >= needed:
        raise ImageReadError(f"{path} cannot be read as it is: its header gives CompressedDataSize = {size}, but "
                             f"its compressed data is longer: ITK's MetaImage reader inflates only those {size:,} "
                             f"bytes, to {produced:,} of the {needed:,} bytes of voxels its header declares, and "
                             f"reads the rest as garbage; set it to {held} ("
                             + ("the bytes after its header" if file == path else f"the size of {file.name}") + ")")
    if stop == "cut":
        raise ImageReadError(f"{file} is truncated or corrupt: its compressed data ends before its end-of-stream "
                             "marker")
    if stop is not None:
        raise ImageReadError(f"{path} is truncated or corrupt: its compressed data does not inflate ({stop}) to the "
                             f"{needed:,} bytes of voxels its header declares")
    raise ImageReadError(f"{path} is truncated or corrupt: its header declares {needed:,} bytes of voxels, its "
                         f"compressed data decompresses to {produced:,}")


def check_metaimage_compressed_size(path: Path, header: TextHeader | None = None) -> None:
    """Refuse a MetaImage file whose compressed data lies in the file itself (``ElementDataFile = LOCAL``) and whose
    header gives no ``CompressedDataSize`` ITK's MetaIO can use: none, one spelt in another case (MetaIO reads its
    keys case included), 0, negative or no number. MetaIO then inflates the file from its first byte (its header
    text), which fails at once, and returns the voxel memory as allocated: garbage, different from read to read
    (only "Uncompress failed" on stderr). The message gives the line to write (the bytes after the header). A size
    larger than those bytes fails ITK's read ("No such file or directory") and is refused naming both. A data file
    of its own (``.mhd`` and ``.zraw``) is read right without it: MetaIO takes the data file's size. A size too small
    is :func:`check_compressed_length`'s to refuse (it inflates what MetaIO inflates). ``header``: its
    :func:`text_header` when already read."""
    try:
        header = header or text_header(path)
        held = path.stat().st_size - header.length
    except OSError:
        return  # the reader reports what it cannot open
    fields = header.written  # MetaIO reads its keys case included
    if (not header.complete or not _metaio_compressed(fields)
            or fields.get("ElementDataFile", "LOCAL") not in ("LOCAL", "Local", "local")
            or _metaio_number(fields.get("HeaderSize"))):
        return
    size = _metaio_compressed_size(fields)
    if size > held:
        raise ImageReadError(f"{path} cannot be read: its header gives CompressedDataSize = {size}, but only "
                             f"{held:,} bytes follow its header (a cut copy, or a wrong size: ITK's MetaImage reader "
                             f"fails on it); if the image is whole, set it to {held}")
    if size:
        return
    spelt = "CompressedDataSize" if "CompressedDataSize" in fields else next(
        (key for key in fields if key.lower() == "compresseddatasize"), None)
    if spelt is None:
        wrong = "gives no CompressedDataSize"
    elif spelt != "CompressedDataSize":
        wrong = f"spells its size '{spelt}', which MetaIO does not read (it reads 'CompressedDataSize', case included)"
    else:
        wrong = f"gives CompressedDataSize = {fields[spelt]!r}, not a number of bytes above 0"
    raise ImageReadError(f"{path} cannot be read as it is: its header says CompressedData = "
                         f"{fields['CompressedData']} but {wrong}, and ITK's MetaImage reader then reads compressed "
                         f"data stored in the file itself as garbage; add the line 'CompressedDataSize = {held}' to "
                         "its header (the bytes after it) in place of any other, or save it again with SimpleITK or "
                         "3D Slicer (which write it)")


def check_values(values: np.ndarray, path: Path) -> None:
    """Refuse values read from ``path`` that are empty or hold NaN/Inf."""
    if values.size == 0 or 0 in values.shape:
        raise ImageReadError(f"{path} holds an empty image (shape {values.shape})")
    if np.issubdtype(values.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(values)))
        n_inf = int(np.count_nonzero(np.isinf(values)))
        if n_nan or n_inf:
            parts = (f"{n_nan} NaN values" if n_nan else "", f"{n_inf} Inf values" if n_inf else "")
            what = " and ".join(part for part in parts if part)
            raise ImageReadError(f"{path} contains {what}; replace them before denoising")


# The values a volume may hold, by modality. CT in HU: the physical scale runs from -1000 (air) to a few thousand
# (bone, contrast); scanners' padding values (-3024, -2048, -32768 stored, -33792 HU with intercept -1024) and the
# extended-HU metal scales (up to 30710, or a 16-bit stored 65535) stay far inside +-1e6, so only values that no
# 16-bit scanner or converter writes (1e20, 1e30: a corrupt or mis-scaled file) are refused. They are not harmless:
# the low-frequency restoration spreads such a voxel over its neighbours and nlm over thousands of voxels. MR has
# arbitrary units (Philips floating-point values reach ~1e7): only values whose squares overflow float32 (1.8e19:
# noise estimates, losses, PSNR) are beyond use, and 1e15 keeps a margin below that and far above any scanner's.
CT_PLAUSIBLE_HU = 1e6
MR_PLAUSIBLE_ABS = 1e15


def check_plausible(values: np.ndarray, modality: str | None, path: Path | str,
                    exempt: np.ndarray | None = None) -> None:
    """Refuse finite values far outside anything ``modality`` holds (CT: beyond +-:data:`CT_PLAUSIBLE_HU` HU; MR
    and others: beyond +-:data:`MR_PLAUSIBLE_ABS`), naming how many voxels, the extreme value and the accepted
    range. ``exempt`` (bool, the shape of ``values``) marks padding declared by the header (PixelPaddingValue),
    whatever its value: it is replaced by air before any use."""
    limit, what = ((CT_PLAUSIBLE_HU, "a CT in Hounsfield units") if str(modality or "").upper() == "CT"
                   else (MR_PLAUSIBLE_ABS, "an MR (or other) image"))
    array = np.asarray(values)
    if array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return
    if float(np.max(array)) <= limit and float(np.min(array)) >= -limit:
        return  # the usual case: two reductions, no temporary array
    outside = np.abs(array.astype(np.float64, copy=False)) > limit
    if exempt is not None:
        outside &= ~exempt
    n_outside = int(np.count_nonzero(outside))
    if not n_outside:
        return
    extreme = array[outside].astype(np.float64)
    worst = float(extreme[np.argmax(np.abs(extreme))])
    raise ImageReadError(f"{path} holds {n_outside} voxel(s) with values far outside what {what} can hold "
                         f"(accepted: {-limit:.0e} to {limit:.0e}; the most extreme is {worst:.4g}): a corrupt or "
                         "mis-scaled file; fix or replace those values before denoising")


def check_finite(volume: Volume, out: Path) -> None:
    """Refuse to write an empty volume or one holding NaN/Inf to ``out``."""
    if volume.array.size == 0:
        raise ImageWriteError(f"refusing to write an empty image to {out}")
    bad = int(np.count_nonzero(~np.isfinite(volume.array)))
    if bad:
        raise ImageWriteError(f"refusing to write {out}: the volume contains {bad} NaN/Inf values")


def _same_path(a: Path, b: Path | None) -> bool:
    if b is None:
        return False
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        return folder.resolve() in path.resolve().parents
    except OSError:
        return False


def check_not_input(out: Path, *volumes: Volume | None) -> None:
    """Refuse an output path that is, or holds, a file or folder any of ``volumes`` was read from."""
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


def make_temp_dir(out: Path, failure: str) -> Path:
    """A new hidden folder ``.<name>.tmp-<random>`` next to ``out`` (its parent is created), to write the output
    in before renaming it into place. An OSError becomes an ImageWriteError ``"<failure>: <reason>"``."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # os.mkdir honours the umask (tempfile.mkdtemp would make the final folder 0700)
        temp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
        os.mkdir(temp)
    except OSError as exc:
        raise ImageWriteError(f"{failure}: {one_line(exc)}") from exc
    return temp
