"""Writing the DICOM files tests make with pydicom, alike under pydicom 2 (.venv) and pydicom 3 (.venv-slicer: the
pydicom Slicer bundles), without the dataset's ``is_little_endian`` / ``is_implicit_VR`` (deprecated in pydicom 3,
removed in 4) or pydicom 3's deprecated ``write_like_original``."""
from __future__ import annotations

import os


def write_dicom(path: str | os.PathLike, dataset) -> None:
    """Write ``dataset`` (made by the test, not read from a file) as a DICOM file: preamble, file meta information
    completed, and the dataset in the encoding its ``file_meta.TransferSyntaxUID`` names. pydicom 3:
    ``enforce_file_format=True`` takes the encoding from the transfer syntax; pydicom 2: ``write_like_original=False``
    does too when the dataset has no encoding of its own (a dataset made here has none)."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, dataset, enforce_file_format=True)
        return
    if dataset.is_little_endian is not None or dataset.is_implicit_VR is not None:
        raise ValueError("write_dicom writes datasets made by the test: this one carries the encoding it was read "
                         "with, which pydicom 2 would use instead of its transfer syntax")
    pydicom.dcmwrite(path, dataset, write_like_original=False)
