"""Refusals shared by the readers and the writers: the voxel limit, non-finite or empty values, writing onto
the input; and the temporary folder an output is written in before it is renamed into place."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ImageReadError, ImageWriteError, one_line
from .volume import Volume

__all__ = [
    "MAX_VOXELS_DEFAULT",
    "check_finite",
    "check_not_input",
    "check_size",
    "check_values",
    "make_temp_dir",
    "max_voxels",
]

# Largest image read (voxels), checked from the header before any pixel is loaded: 1e9 voxels is 4 GB as
# float32, several times a whole-body CT (512 x 512 x 2000 = 5e8). Override with ADL_MAX_VOXELS.
MAX_VOXELS_DEFAULT = 1_000_000_000


def max_voxels() -> int:
    """The largest number of voxels :func:`~lib.imaging.read_volume` accepts by default (``ADL_MAX_VOXELS`` or
    :data:`MAX_VOXELS_DEFAULT`)."""
    value = os.environ.get("ADL_MAX_VOXELS", "").strip()
    return int(float(value)) if value else MAX_VOXELS_DEFAULT


def check_size(shape: Sequence[int], path: Path, limit: int) -> None:
    """Refuse an image of ``shape`` (from its header) with more than ``limit`` voxels."""
    n_voxels = int(np.prod([int(v) for v in shape], dtype=np.float64))
    if n_voxels > limit:
        raise ImageReadError(
            f"{path} is too large: {' x '.join(str(int(v)) for v in shape)} = {n_voxels:,} voxels exceeds the limit "
            f"of {limit:,} (raise it with ADL_MAX_VOXELS on the command line or --conf max_voxels on the server, "
            "or crop the volume)"
        )


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
