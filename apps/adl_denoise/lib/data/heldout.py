"""The held-out benchmark split: files that NO training, tuning or calibration may touch.

The split lives in ``../shared/data`` (relative to the repository root; override with the environment
variable ``ADL_SHARED_DATA``):

* CT: ``dicom/ct_abdomen_siemens_j2k_slab/`` -- a real Siemens Biograph40 mCT upper-abdomen series
  (20 slices, 512x512, 0.977 mm, Br38f kernel, JPEG2000-lossless). Another scanner, kernel and body region
  than the training CT (Philips thorax / head phantom), so it is a fair held-out case.
* MR: ``mr_t1gd_brain_skullstripped.nii.gz`` -- a skull-stripped T1+Gd brain (176x188x144, ~1 mm).

Everything else in ``../shared/data`` may be used for training.

Matching is by name, not by absolute path, so that a copy or another mount of the same data is still
recognised: any path with a component named ``ct_abdomen_siemens_j2k_slab`` (the folder or a file in it),
and any file whose name starts with ``mr_t1gd_brain_skullstripped.`` (any extension: .nii.gz, .nii, .mha,
a cache .npy, ...). Training code calls :func:`assert_not_heldout` on every input path it reads (the data
sources of :mod:`lib.data` do so through :func:`check_not_heldout`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

__all__ = [
    "HELDOUT_CT_SERIES",
    "HELDOUT_DIR_NAMES",
    "HELDOUT_FILE_STEMS",
    "HELDOUT_MR_VOLUME",
    "HELDOUT_RELATIVE_PATHS",
    "REPO_ROOT",
    "assert_not_heldout",
    "check_not_heldout",
    "heldout_paths",
    "is_heldout",
    "shared_data_dir",
]

PathLike = Union[str, os.PathLike]

#: The repository root: this file is ``<repo>/apps/adl_denoise/lib/data/heldout.py``.
REPO_ROOT = Path(__file__).resolve().parents[4]

#: Relative paths (inside the shared data folder) of the held-out data.
HELDOUT_CT_SERIES = "dicom/ct_abdomen_siemens_j2k_slab"
HELDOUT_MR_VOLUME = "mr_t1gd_brain_skullstripped.nii.gz"
HELDOUT_RELATIVE_PATHS: tuple[str, ...] = (HELDOUT_CT_SERIES, HELDOUT_MR_VOLUME)

#: Names that identify the held-out data wherever it lies.
HELDOUT_DIR_NAMES: frozenset[str] = frozenset({"ct_abdomen_siemens_j2k_slab"})
HELDOUT_FILE_STEMS: frozenset[str] = frozenset({"mr_t1gd_brain_skullstripped"})


def shared_data_dir() -> Path:
    """``$ADL_SHARED_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("ADL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def heldout_paths(root: PathLike | None = None) -> dict[str, Path]:
    """Absolute locations of the held-out CT series folder and MR volume under ``root``."""
    base = Path(root) if root is not None else shared_data_dir()
    return {"CT": base / HELDOUT_CT_SERIES, "MR": base / HELDOUT_MR_VOLUME}


def is_heldout(path: PathLike) -> bool:
    """True if ``path`` is (or lies inside) held-out benchmark data."""
    p = Path(os.fspath(path))
    try:
        p = p.resolve()
    except OSError:  # pragma: no cover - resolve() rarely fails; fall back to the path as given
        pass
    if any(part in HELDOUT_DIR_NAMES for part in p.parts):
        return True
    name = p.name
    return any(name == stem or name.startswith(stem + ".") for stem in HELDOUT_FILE_STEMS)


def assert_not_heldout(paths: PathLike | Iterable[PathLike]) -> None:
    """Raise ``ValueError`` naming the first held-out file in ``paths`` (one path or an iterable)."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    for path in paths:
        if is_heldout(path):
            raise ValueError(
                f"{os.fspath(path)} belongs to the held-out benchmark split (lib/data/heldout.py) and must not be "
                "used for training, tuning or calibration"
            )


def check_not_heldout(paths: PathLike | Iterable[PathLike]) -> None:
    """:func:`assert_not_heldout` on one path or several (``ValueError`` naming the first held-out file).

    The guard every training source of :mod:`lib.data` runs on its inputs before reading them.
    """
    assert_not_heldout(paths)
