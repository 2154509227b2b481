"""Image input/output with geometry and value conventions (no server or GUI code).

Arrays are numpy/SimpleITK index order ((z, y, x) or (y, x)), spacing/origin/direction in SimpleITK (x, y, z)
order, CT values in Hounsfield units. See :mod:`lib.imaging.io`.
"""
from .io import (
    CT_AIR_HU,
    READ_SUFFIXES,
    WRITE_SUFFIXES,
    ImageReadError,
    ImageWriteError,
    OutputValueRange,
    Volume,
    guess_modality,
    list_dicom_series,
    max_voxels,
    read_volume,
    value_range_for_output,
    write_dicom_derived_series,
    write_volume,
)

__all__ = [
    "CT_AIR_HU",
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "ImageReadError",
    "ImageWriteError",
    "OutputValueRange",
    "Volume",
    "guess_modality",
    "list_dicom_series",
    "max_voxels",
    "read_volume",
    "value_range_for_output",
    "write_dicom_derived_series",
    "write_volume",
]
