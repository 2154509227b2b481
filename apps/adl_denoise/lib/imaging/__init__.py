"""Image input/output with geometry and value conventions (no server or GUI code).

Arrays are numpy/SimpleITK index order ((z, y, x) or (y, x)), spacing/origin/direction in SimpleITK (x, y, z)
order, CT values in Hounsfield units. Modules, one job each:

* :mod:`.io`: :func:`read_volume` / :func:`write_volume`, the face (NIfTI, NRRD, MetaImage; dispatch to DICOM);
* :mod:`.volume`: the :class:`Volume` type and its value conventions (modality, padding, output range);
* :mod:`.dicom_geometry`: DICOM geometry as plain maths (slice order, spacing, direction, tilt refusal);
* :mod:`.dicom_read`: DICOM series, single files and multi-frame objects;
* :mod:`.dicom_write`: derived DICOM series;
* :mod:`.dicom_tags`, :mod:`.guards`, :mod:`.errors`: element values, refusals (voxel limit, NaN/Inf, absurd
  values, writing onto the input), the error types.
"""
from .dicom_read import list_dicom_series
from .dicom_write import denoising_derivation, write_dicom_derived_series
from .errors import ImageReadError, ImageWriteError
from .guards import max_voxels
from .io import READ_SUFFIXES, WRITE_SUFFIXES, read_volume, write_volume
from .volume import CT_AIR_HU, OutputValueRange, Volume, guess_modality, value_range_for_output

__all__ = [
    "CT_AIR_HU",
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "ImageReadError",
    "ImageWriteError",
    "OutputValueRange",
    "Volume",
    "denoising_derivation",
    "guess_modality",
    "list_dicom_series",
    "max_voxels",
    "read_volume",
    "value_range_for_output",
    "write_dicom_derived_series",
    "write_volume",
]
