"""Marked regions against real MRML (Slicer, or PyPI's slicer-core without Qt): Segment Editor segments exported
on the reference volume's grid (full extent, overlap kept per segment, a transform between the nodes applied),
the temporary nodes removed, and the segments' order and names as the module's table lists them.

Run inside Slicer with ``slicer_add_python_unittest`` or outside it with ``python -m pytest`` in a venv that has
slicer-core (no SimpleITK there: writing the NIfTI map is tested in ``tests/test_slicer_regions.py``).
"""
from __future__ import annotations

import unittest

import numpy as np
import slicer
import vtk

if getattr(slicer, "mrmlScene", None) is None:  # slicer-core: no application, so make the scene slicer.util uses
    slicer.mrmlScene = slicer.vtkMRMLScene()

from ADLDenoiseLib.mrml import segment_masks, segments_of, volume_grid  # noqa: E402
from ADLDenoiseLib.regions import Region, RegionsError, SegmentMarks, build_region_map  # noqa: E402


def reference_volume():
    """A 6 x 20 x 24 volume on an oblique grid."""
    node = slicer.util.addVolumeFromArray(np.zeros((6, 20, 24), np.float32), name="chest CT")
    node.SetSpacing(0.7, 0.8, 2.5)
    node.SetOrigin(-12.0, 30.5, 101.0)
    angle = np.deg2rad(25)
    directions = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, directions[r, c])
    node.SetIJKToRASDirectionMatrix(matrix)
    return node


def segmentation_from_labels(reference, labels: np.ndarray, names: list[str], segmentation=None):
    """A segmentation node (new, or ``segmentation`` with segments added) with one segment per label value
    1..N of ``labels`` (on ``reference``'s grid), as the Segment Editor would hold it after painting; each call
    adds a layer of its own, so segments of different calls may overlap."""
    scene = slicer.mrmlScene
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "painted")
    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(labelmap, labels.astype(np.uint8))
    if segmentation is None:
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "marks")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    first = segmentation.GetSegmentation().GetNumberOfSegments()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    for i, name in enumerate(names):
        segmentation.GetSegmentation().GetNthSegment(first + i).SetName(name)
    return segmentation


def scene_nodes() -> list[str]:
    """The scene's nodes by class, less the subject hierarchy node (Slicer makes it once per scene)."""
    scene = slicer.mrmlScene
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return sorted(n.GetClassName() for n in nodes if n.GetClassName() != "vtkMRMLSubjectHierarchyNode")


class MRMLRegionsTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def test_segments_export_on_the_reference_grid_in_segment_order_and_leave_no_nodes(self):
        reference = reference_volume()
        lesion = np.zeros((6, 20, 24), bool)
        lesion[2:4, 5:9, 6:10] = True
        liver = np.zeros((6, 20, 24), bool)
        liver[1:5, 8:16, 8:20] = True
        # two segments that overlap: import each as its own layer
        segmentation = segmentation_from_labels(reference, lesion.astype(np.uint8), ["lesion 1"])
        segmentation_from_labels(reference, liver.astype(np.uint8), ["liver"], segmentation)

        segments = segments_of(segmentation)
        self.assertEqual([name for _, name in segments], ["lesion 1", "liver"])
        before = scene_nodes()
        masks = segment_masks(segmentation, [segment_id for segment_id, _ in segments], reference)
        self.assertEqual(scene_nodes(), before)  # the temporary labelmaps, their display and colour nodes removed
        self.assertEqual([m.shape for m in masks], [(6, 20, 24)] * 2)  # the full extent, not the segment's box
        np.testing.assert_array_equal(masks[0], lesion)
        np.testing.assert_array_equal(masks[1], liver)  # the overlap is in both masks

        marks = SegmentMarks()
        marks.sync(segments)
        marks.choose(segments[0][0], "keep structure")
        marks.choose(segments[1][0], "strength")
        marks.set_strength(segments[1][0], 0.5)
        marked = marks.marked()
        region_map, params = build_region_map(masks, [r for _, r in marked], volume_grid(reference).shape)
        self.assertEqual(params["regions"], [{"value": 1, "name": "lesion 1", "intent": "keep"},
                                             {"value": 2, "name": "liver", "intent": "strength", "strength": 0.5}])
        self.assertTrue(np.all(region_map[liver] == 2))  # the later segment wins where they overlap
        self.assertTrue(np.all(region_map[lesion & ~liver] == 1))

    def test_a_transformed_segmentation_is_resampled_onto_the_reference_grid(self):
        reference = reference_volume()
        lesion = np.zeros((6, 20, 24), np.uint8)
        lesion[2:4, 5:9, 6:10] = 1
        segmentation = segmentation_from_labels(reference, lesion, ["lesion"])
        # the segmentation moved by one slice (2.5 mm along the volume's k axis, which points to -S)
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        matrix = vtk.vtkMatrix4x4()
        matrix.SetElement(2, 3, -2.5)
        transform.SetMatrixTransformToParent(matrix)
        segmentation.SetAndObserveTransformNodeID(transform.GetID())
        segment_id = segments_of(segmentation)[0][0]
        mask = segment_masks(segmentation, [segment_id], reference)[0]
        np.testing.assert_array_equal(mask, np.roll(lesion, 1, axis=0) != 0)

    def test_volume_grid_is_lps_and_an_unknown_segment_is_refused(self):
        reference = reference_volume()
        grid = volume_grid(reference)
        self.assertEqual(grid.shape, (6, 20, 24))
        np.testing.assert_allclose(grid.spacing, [0.7, 0.8, 2.5], atol=1e-6)
        np.testing.assert_allclose(grid.origin, [12.0, -30.5, 101.0], atol=1e-6)  # RAS -> LPS
        segmentation = segmentation_from_labels(reference, np.ones((6, 20, 24), np.uint8), ["all"])
        with self.assertRaises(RegionsError):
            segment_masks(segmentation, ["no such segment"], reference)
        with self.assertRaises(RegionsError):
            Region("liver", "strength", 2.5)


if __name__ == "__main__":
    unittest.main()
