"""The identity of an input volume, as the audit log records it.

* A DICOM series (a folder of DICOM files, e.g. a DICOMweb series downloaded by MONAI Label): its
  SeriesInstanceUID (and StudyInstanceUID, PatientID, Modality) from the first file's header; the PatientID binds
  a verdict on the result to the patient it was denoised for (a PACS series moved to another patient keeps its
  UIDs).
* An image file (NIfTI, NRRD: datastore images, uploads, sessions): a content hash, the SHA-256 of the voxels as
  stored (pixel type, size, then the raw little-endian voxel bytes in C order) and the geometry (spacing, origin
  in mm rounded to 1e-5 mm, direction cosines rounded to 1e-6): the same volume gets the same hash whatever its
  file name or compression; another volume, or the same voxels placed elsewhere, gets another one.

File hashes are cached by (path, size, modification time): a datastore study is hashed once. A file is hashed only
after its header passed the reader's checks (:func:`lib.imaging.io.check_voxels`: the voxel limit, data as long as
declared): a study copied into a local datastore by hand, or replaced there, is never loaded whole when it is over
the server's limit (it was loaded whatever its size, a header declaring 10^11 voxels allocated before it failed).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["input_identity", "volume_content_sha256", "dicom_series_identity", "dicom_text", "IDENTITY_VERSION"]

IDENTITY_VERSION = "voxels+geometry/v1"  # what content_sha256 covers; changes if the definition ever changes
_cache: dict[tuple[str, int, int], str] = {}
_cache_lock = threading.Lock()


def volume_content_sha256(path: str | os.PathLike, max_voxels: int | None = None) -> str:
    """SHA-256 (hex) of an image file's voxels and geometry (see the module docstring). Reads the file with
    SimpleITK once its header passed :func:`lib.imaging.io.check_voxels` with ``max_voxels`` (the server's limit;
    None: :func:`lib.imaging.max_voxels`).

    Raises:
        lib.imaging.errors.ImageTooLargeError: over ``max_voxels`` (naming the file and the limit), from the header;
        lib.imaging.errors.ImageReadError: a header that cannot be read, data shorter than declared;
        RuntimeError: SimpleITK cannot read the voxels.
    """
    import numpy as np
    import SimpleITK as sitk

    from ..imaging.io import check_voxels

    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    check_voxels(p, max_voxels)  # from the header, before ITK allocates what the header declares
    image = sitk.ReadImage(str(p))
    voxels = sitk.GetArrayViewFromImage(image)  # no copy: the hash streams over the image's buffer
    header = {
        "pixel_type": image.GetPixelIDTypeAsString(), "components": image.GetNumberOfComponentsPerPixel(),
        "size": list(image.GetSize()), "dtype": voxels.dtype.newbyteorder("<").str,
        "spacing": [round(float(v), 5) for v in image.GetSpacing()],
        "origin": [round(float(v), 5) for v in image.GetOrigin()],
        "direction": [round(float(v), 6) + 0.0 for v in image.GetDirection()],  # + 0.0: no "-0.0"
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + b"\n")
    array = np.ascontiguousarray(voxels, dtype=voxels.dtype.newbyteorder("<"))
    flat = array.reshape(-1)
    step = max(1, (1 << 24) // max(1, array.itemsize))  # 16 MiB at a time
    for start in range(0, flat.size, step):
        digest.update(flat[start:start + step].tobytes())
    value = digest.hexdigest()
    with _cache_lock:
        _cache[key] = value
    return value


def dicom_text(value: Any) -> str:
    """A DICOM text or UID value as compared: without its padding (leading and trailing spaces, NULs), which the
    standard makes insignificant and which a PACS's search answer drops while the file's header keeps it; ``""``
    for None."""
    return "" if value is None else str(value).strip(_DICOM_PADDING)


_DICOM_PADDING = " \0\t\r\n\f\v"


def dicom_series_identity(folder: str | os.PathLike) -> dict[str, Any]:
    """SeriesInstanceUID, StudyInstanceUID, PatientID (:func:`dicom_text`) and Modality of the DICOM series in
    ``folder`` (first readable file); empty values when none is readable."""
    import pydicom

    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file: try the next one
            continue
        uid = getattr(header, "SeriesInstanceUID", None)
        if uid:
            return {"series_instance_uid": str(uid), "study_instance_uid": str(getattr(header, "StudyInstanceUID", "")),
                    "patient_id": dicom_text(header.get("PatientID")),
                    "dicom_modality": str(getattr(header, "Modality", ""))}
    return {"series_instance_uid": None}


def input_identity(path: str | os.PathLike, max_voxels: int | None = None) -> dict[str, Any]:
    """The identity fields of the input at ``path``: a DICOM folder's series identity, else the image file's
    ``content_sha256`` (:func:`volume_content_sha256`, at most ``max_voxels``). Raises OSError / RuntimeError /
    ImageReadError when it cannot be read."""
    p = Path(path)
    if p.is_dir():
        return {"kind": "dicom_series", **dicom_series_identity(p)}
    return {"kind": "image_file", "content_sha256": volume_content_sha256(p, max_voxels),
            "content_hash_of": IDENTITY_VERSION}
