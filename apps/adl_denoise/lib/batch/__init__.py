"""Batch denoising of whole archives (``cli.py denoise-batch``): every series of a folder tree or of a DICOMweb
server, sharded over the ranks of a ``torchrun`` job, resumable through a JSON-lines manifest.

Modules, one job each:

* :mod:`.discovery`: the series of a folder tree (DICOM series folders, several series per folder, NIfTI, NRRD,
  MetaImage files) with their output paths (mirroring the tree, unique per series) and voxel counts;
* :mod:`.dicomweb`: the series of a DICOMweb server (QIDO-RS), their download (WADO-RS) and the upload of the
  derived series (STOW-RS), through the ``dicomweb-client`` library;
* :mod:`.sharding`: which rank takes which series (largest first, balanced by voxel count, deterministic);
* :mod:`.manifest`: the per-rank JSON-lines manifests, their merge, and what a rerun skips;
* :mod:`.runner`: one rank's loop (one series in memory at a time) and the end-of-run summary.
"""
from .discovery import SeriesItem, discover_tree
from .manifest import Manifest
from .runner import BatchSettings, BatchSummary, run_batch
from .sharding import shard_items

__all__ = ["BatchSettings", "BatchSummary", "Manifest", "SeriesItem", "discover_tree", "run_batch", "shard_items"]
