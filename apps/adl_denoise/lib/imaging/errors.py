"""The errors of image input/output, and the one-line messages they carry."""
from __future__ import annotations

import re

__all__ = ["ImageReadError", "ImageTooLargeError", "ImageWriteError", "UnreadableDicomError", "one_line"]


class ImageReadError(ValueError):
    """An image could not be read or is not acceptable (message: what is wrong, which path; one line)."""


class ImageTooLargeError(ImageReadError):
    """An image has more voxels than the limit (found from its header, before any voxel was read): ``shape`` as
    the header gives it, ``voxels`` (their product) and ``limit``."""

    def __init__(self, message: str, shape: tuple[int, ...], voxels: int, limit: int) -> None:
        super().__init__(message)
        self.shape, self.voxels, self.limit = shape, voxels, limit

    def __reduce__(self):  # pickled whole (worker processes): the default passes the message alone to __init__
        return type(self), (str(self), self.shape, self.voxels, self.limit)

    def naming_limit(self, whose: str, setting: str) -> "ImageTooLargeError":
        """This error naming whose limit it is and the setting that raises it (``"adl_3d's limit"``,
        ``"--conf max_voxels_adl_3d on the server"``) instead of the generic ones (``ADL_MAX_VOXELS`` / ``--conf
        max_voxels``): a model's own limit is raised with its own setting only."""
        text = str(self)
        head = text.split(" exceeds the limit of ", 1)[0]
        return ImageTooLargeError(f"{head} exceeds {whose} of {self.limit:,} voxels (raise it with {setting}, or crop "
                                  "the volume)", self.shape, self.voxels, self.limit)


class UnreadableDicomError(ImageReadError):
    """A folder holds DICOM files that cannot be read (damaged, cut short, or the storage failed to read them): none
    of its series is read. ``read_error``: at least one is a read error of the storage (EIO, EACCES, a link loop, a
    dropped share), not a damaged file."""

    def __init__(self, message: str, read_error: bool = False) -> None:
        super().__init__(message)
        self.read_error = read_error

    def __reduce__(self):  # pickled whole (worker processes): the default passes the message alone to __init__
        return type(self), (str(self), self.read_error)


class ImageWriteError(ValueError):
    """An image could not be written (message: what is wrong, which path; one line)."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """A readable single line (at most ``limit`` characters) from an exception; SimpleITK's are multi-line with
    C++ file names."""
    text = str(exc)
    if "sitk::ERROR:" in text:  # SimpleITK's own: "Exception thrown in SimpleITK ...: .../x.cxx:99: sitk::ERROR: ..."
        text = text.split("sitk::ERROR:", 1)[1]
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
        text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = " ".join(text.split())
    if not text:
        text = type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."
