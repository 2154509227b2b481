"""Image discovery for training and learning inputs: which files and folders are images, and their names.

An image is a file :func:`lib.imaging.read_volume` reads (NIfTI, NRRD, MHA, a DICOM file, with or without a
suffix) or a folder holding one DICOM series. Names are file-name stems (:func:`image_stem`), the key by which
noisy and clean images are paired.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..imaging import READ_SUFFIXES

__all__ = ["DICOM_SUFFIXES", "discover_images", "image_stem", "list_folder_images"]

#: Suffixes of single DICOM files (a DICOM file may also have no suffix: then its magic bytes tell).
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def image_stem(path: str | os.PathLike) -> str:
    """Name without the image suffix (``a.nii.gz`` -> ``a``, ``b.dcm`` -> ``b``); a folder keeps its name."""
    p = Path(path)
    name = p.name
    if p.is_dir():
        return name
    lower = name.lower()
    for suffix in sorted(READ_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_image_file(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    lower = path.name.lower()
    if lower.endswith(READ_SUFFIXES) or lower.endswith(DICOM_SUFFIXES):
        return True
    # DICOM exports are often named by UID (1.2.840..., CT.1.2.840...): the marker decides, whatever the dots
    return _has_dicom_magic(path)


def _is_dicom_folder(path: Path) -> bool:
    return any(f.is_file() and _is_image_file(f) and not f.name.lower().endswith(READ_SUFFIXES) for f in path.iterdir())


def list_folder_images(folder: str | os.PathLike) -> list[Path]:
    """The images directly in ``folder``: image files (NIfTI, NRRD, MHA, DICOM files) and subfolders that hold
    DICOM files (one series each), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    items = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and _is_image_file(entry):
            items.append(entry)
        elif entry.is_dir() and not entry.name.startswith(".") and _is_dicom_folder(entry):
            items.append(entry)
    return items


def discover_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a list of images.

    A file is one image. A folder holding only DICOM files (no other images, no series subfolders) is one
    DICOM series; any other folder contributes its images (:func:`list_folder_images`). Raises ValueError for
    a missing path or when nothing is found.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        if p.is_file():
            found.append(p)
            continue
        children = list_folder_images(p)
        dicom_files = [c for c in children if c.is_file() and not c.name.lower().endswith(READ_SUFFIXES)]
        if children and len(dicom_files) == len(children):
            found.append(p)  # the folder is a DICOM series
        else:
            found.extend(children)
    if not found:
        raise ValueError(f"no image files found in {', '.join(os.fspath(i) for i in inputs) or '(nothing given)'}")
    return found
