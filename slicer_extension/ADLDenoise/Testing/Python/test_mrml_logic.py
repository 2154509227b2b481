"""MRML-side logic of the ADLDenoise module against real MRML (Slicer, or PyPI's slicer-core without Qt).

Volume nodes out to NRRD and back (geometry, HU values, name suffix), refusal of a result on another grid,
difference and blended volumes, ROI statistics inside a markups ROI. Run inside Slicer with
``slicer_add_python_unittest`` or outside it with ``python -m pytest`` in a venv that has slicer-core.
"""
from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import numpy as np
import slicer

if getattr(slicer, "mrmlScene", None) is None:  # slicer-core: no application, so make the scene slicer.util uses
    slicer.mrmlScene = slicer.vtkMRMLScene()

import nrrd  # noqa: E402  (pynrrd: read what Slicer wrote, independently of Slicer)

from ADLDenoiseLib.mrml import (  # noqa: E402  (slicer.util needs the scene made above)
    blended_volume,
    difference_volume,
    export_volume,
    load_result,
    looks_like_ct,
    roi_statistics_for_roi_node,
    same_grid,
)


def oblique_ct_node(name: str = "chest CT"):
    """A CT-like volume in HU on an oblique, non-RAS grid."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[0:6, 0:40, 0:48]
    phantom = np.where((yy - 20) ** 2 + (xx - 24) ** 2 < 15 ** 2, 40.0, -1000.0).astype(np.float32)
    node = slicer.util.addVolumeFromArray(phantom + rng.normal(0, 25, phantom.shape).astype(np.float32), name=name)
    node.SetSpacing(0.7, 0.8, 2.5)
    node.SetOrigin(-12.0, 30.5, 101.0)
    angle = np.deg2rad(25)
    directions = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, directions[r, c])
    node.SetIJKToRASDirectionMatrix(matrix)
    return node


class MRMLLogicTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear(0)
        self.work = Path(tempfile.mkdtemp())

    def test_export_writes_values_and_geometry_and_result_loads_on_the_same_grid(self):
        original = oblique_ct_node()
        path = export_volume(original, self.work / "in.nrrd")
        data, header = nrrd.read(str(path), index_order="C")
        np.testing.assert_allclose(data, slicer.util.arrayFromVolume(original), atol=1e-4)  # HU kept
        # NRRD stores LPS; Slicer's node is RAS: the first two axes flip sign
        spacing = np.linalg.norm(header["space directions"], axis=1)
        np.testing.assert_allclose(sorted(spacing), sorted([0.7, 0.8, 2.5]), atol=1e-5)
        np.testing.assert_allclose(header["space origin"], [12.0, -30.5, 101.0], atol=1e-5)
        # a "denoised" result written on that grid comes back as a new node with the suffix
        nrrd.write(str(self.work / "out.nrrd"), (data * 0.5).astype(np.float32), header, index_order="C")
        result = load_result(slicer.mrmlScene, self.work / "out.nrrd", original)
        self.assertEqual(result.GetName(), "chest CT denoised")
        self.assertTrue(same_grid(result, original))
        np.testing.assert_allclose(slicer.util.arrayFromVolume(result), data * 0.5, atol=1e-4)
        self.assertTrue(looks_like_ct(original))

    def test_a_result_on_another_grid_is_refused_and_nothing_is_added(self):
        original = oblique_ct_node()
        path = export_volume(original, self.work / "in.nrrd")
        data, header = nrrd.read(str(path), index_order="C")
        header["space origin"] = np.asarray(header["space origin"]) + 5.0
        nrrd.write(str(self.work / "shifted.nrrd"), data, header, index_order="C")
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(RuntimeError):
            load_result(slicer.mrmlScene, self.work / "shifted.nrrd", original)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_difference_blend_and_roi_statistics(self):
        original = oblique_ct_node()
        values = slicer.util.arrayFromVolume(original).copy()
        smooth = np.where(values > -500, 40.0, -1000.0).astype(np.float32)
        path = export_volume(original, self.work / "in.nrrd")
        data, header = nrrd.read(str(path), index_order="C")
        nrrd.write(str(self.work / "smooth.nrrd"), smooth, header, index_order="C")
        denoised = load_result(slicer.mrmlScene, self.work / "smooth.nrrd", original)

        diff = difference_volume(slicer.mrmlScene, original, denoised)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(diff), values - smooth, atol=1e-4)
        self.assertTrue(same_grid(diff, original))
        blended = blended_volume(slicer.mrmlScene, original, denoised, 0.25)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(blended), 0.25 * smooth + 0.75 * values, atol=1e-3)
        blended_volume(slicer.mrmlScene, original, denoised, 1.0, node=blended)  # updated in place
        np.testing.assert_allclose(slicer.util.arrayFromVolume(blended), smooth, atol=1e-4)

        # an ROI in the soft-tissue disc: the centre voxel's RAS position
        import vtk

        matrix = vtk.vtkMatrix4x4()
        original.GetIJKToRASMatrix(matrix)
        centre = matrix.MultiplyPoint((24, 20, 3, 1))[:3]
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter(centre)
        roi.SetSize(4.0, 4.0, 3.0)
        stats = roi_statistics_for_roi_node(original, denoised, roi)
        self.assertGreater(stats["voxels"], 8)
        self.assertAlmostEqual(stats["mean_denoised"], 40.0, places=3)
        self.assertAlmostEqual(stats["std_denoised"], 0.0, places=3)
        self.assertAlmostEqual(stats["noise_reduction_percent"], 100.0, places=3)
        self.assertGreater(stats["std_original"], 10.0)


if __name__ == "__main__":
    unittest.main()
