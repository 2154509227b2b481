"""ADL / TDDL-GCN denoising: the MONAI Label app's package.

Subpackages free of server and GUI code (testable and benchmarkable alone):
  imaging     reading and writing DICOM series, NIfTI, NRRD, MHA with geometry and value conventions
  noise       noise physics: low-dose CT in the sinogram domain, MR Rician, generic noise, noise spectra
  evaluation  image-quality metrics in stated intensity windows, uniform-region statistics

Array convention everywhere: numpy/SimpleITK index order, (z, y, x) for volumes and (y, x) for slices;
spacing, origin and direction in SimpleITK (x, y, z) order. CT intensities are Hounsfield units.
"""
