"""MRML-side logic: volume nodes out to files and back, difference and blended volumes, ROI statistics.

Needs Slicer's MRML only (``slicer.vtkMRML...`` and ``slicer.util``), not its GUI, so it runs inside Slicer and
with PyPI's ``slicer-core``. Volumes travel as NRRD written by Slicer's own storage node, so the server gets
exactly the node's geometry (spacing, origin, any direction) and values (CT in HU); the result is read back
by the same storage node and checked to be on the original's grid before it is shown.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import slicer
import vtk

from .regions import Grid, RegionsError
from .workflow import blend, difference, roi_statistics

__all__ = ["export_volume", "load_result", "same_grid", "difference_volume", "blended_volume",
           "roi_statistics_for_roi_node", "looks_like_ct", "segments_of", "segment_masks", "volume_grid",
           "study_identity", "sequence_frame", "dicom_series_of", "is_plain_scalar_volume", "EXCLUDED_VOLUME_TYPES",
           "adopt_parent_transform", "adopt_study_folder", "match_orientation_and_link", "INPUT_CHANGE_EVENTS"]

#: subclasses of vtkMRMLScalarVolumeNode that are not a CT / MR intensity volume (the selector hides them; Slicer's
#: class tree: LabelMap, Tensor -> Vector / DiffusionImage -> DiffusionTensor, DiffusionWeighted)
EXCLUDED_VOLUME_TYPES = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLTensorVolumeNode", "vtkMRMLVectorVolumeNode",
                         "vtkMRMLDiffusionImageVolumeNode", "vtkMRMLDiffusionTensorVolumeNode",
                         "vtkMRMLDiffusionWeightedVolumeNode")

#: events of a volume node after which what it holds may be another study: new voxels (also a 4D sequence's proxy
#: node taking another frame: vtkSlicerSequencesLogic copies each frame into the same node, CopyContent ->
#: SetAndObserveImageData) and a new grid (IJK-to-RAS, part of a content identity; vtkCommand::ModifiedEvent)
INPUT_CHANGE_EVENTS = (slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, vtk.vtkCommand.ModifiedEvent)


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def same_grid(a, b, tol: float = 1e-4) -> bool:
    """Same dimensions and IJK-to-RAS matrix (spacing, origin, direction)."""
    dims_a = a.GetImageData().GetDimensions() if a.GetImageData() else None
    dims_b = b.GetImageData().GetDimensions() if b.GetImageData() else None
    return dims_a == dims_b and np.allclose(_ijk_to_ras(a), _ijk_to_ras(b), atol=tol)


def _align_to(node, reference, tol: float = 1e-4) -> bool:
    """Make ``node`` use ``reference``'s voxel order when both hold the same voxels.

    Slicer's file reader keeps the IJK-to-RAS matrix right-handed: a volume written from a left-handed (mirrored)
    grid comes back with the last axis reversed and the origin at the other end. Same voxel centres, other index
    order; the array is flipped back here so that voxel (k, j, i) means the same point in both nodes. False when
    the grids really differ (size, spacing, direction or position).
    """
    if same_grid(node, reference, tol):
        return True
    dims_n = node.GetImageData().GetDimensions() if node.GetImageData() else None
    dims_r = reference.GetImageData().GetDimensions() if reference.GetImageData() else None
    if dims_n != dims_r or dims_n is None:
        return False
    m_n, m_r = _ijk_to_ras(node), _ijk_to_ras(reference)
    flips = []
    expected_origin = m_r[:3, 3].copy()
    for axis in range(3):
        if np.allclose(m_n[:3, axis], m_r[:3, axis], atol=tol):
            continue
        if not np.allclose(m_n[:3, axis], -m_r[:3, axis], atol=tol):
            return False
        flips.append(axis)
        expected_origin += m_r[:3, axis] * (dims_r[axis] - 1)
    if not np.allclose(m_n[:3, 3], expected_origin, atol=max(tol, 1e-3)):
        return False
    array = slicer.util.arrayFromVolume(node)
    for axis in flips:  # IJK axis i, j, k is array axis 2, 1, 0
        array = np.flip(array, axis=2 - axis)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(_vtk_matrix(m_r))
    return same_grid(node, reference, tol)


def export_volume(node, path: str | os.PathLike) -> Path:
    """Write a scalar volume node to NRRD with Slicer's storage node (geometry and values as in the scene)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(node):
        raise RuntimeError(f"could not write {node.GetName()} to {path}")
    return path


def is_plain_scalar_volume(node) -> bool:
    """A single-component scalar volume (CT / MR intensities): not a label map, vector / RGB, tensor or
    diffusion volume, and its image data has one component."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        return False
    if any(node.IsA(name) for name in EXCLUDED_VOLUME_TYPES):
        return False
    image = node.GetImageData()
    return image is not None and image.GetNumberOfScalarComponents() == 1


def adopt_parent_transform(node, original) -> None:
    """Put ``node`` under ``original``'s parent transform (a DICOM acquisition / gantry-tilt transform, or one the
    user applied), so both are shown in the same place; none when the original has none."""
    node.SetAndObserveTransformNodeID(original.GetTransformNodeID())


def adopt_study_folder(node, original) -> None:
    """Put ``node``'s subject-hierarchy item under ``original``'s parent item: for a DICOM series its study, under
    its patient. A derived volume (result, correction, difference) then stays with the patient and study it was
    made from in the Data module and in Slicer's DICOM export, instead of at the top level where it could be
    filed under another patient. Only the parent is set: the node does not take the original's series UID or
    modality (it is not that series; :func:`study_identity` hashes its content). Nothing happens where the
    original has no subject-hierarchy item."""
    scene = node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene is not None else None
    if hierarchy is None:
        return
    original_item = hierarchy.GetItemByDataNode(original)
    if not original_item:
        return
    parent = hierarchy.GetItemParent(original_item) or hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if not item:  # Slicer's subject-hierarchy plugins create the item when the node is added; slicer-core has none
        hierarchy.CreateItem(parent, node)
    elif hierarchy.GetItemParent(item) != parent:
        hierarchy.SetItemParent(item, parent)


def _browser_of(node):
    """The sequence browser whose proxy ``node`` is, or None (Slicer's Sequences logic when present; otherwise,
    e.g. with slicer-core, the scene's browser nodes are asked directly)."""
    scene = node.GetScene()
    modules = getattr(slicer, "modules", None)
    sequences = getattr(modules, "sequences", None) if modules is not None else None
    if sequences is not None:
        return sequences.logic().GetFirstBrowserNodeForProxyNode(node)
    if scene is None:
        return None
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    browsers.UnRegister(scene)  # GetNodesByClass returns a new reference (as slicer.util.getNodesByClass does)
    for index in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(index)
        if browser.IsProxyNodeID(node.GetID()):
            return browser
    return None


def sequence_frame(node) -> dict | None:
    """For the proxy node of a 4D sequence: ``{"frame": 0-based item shown now, "count": items, "index": the
    item's index value with its name and unit (e.g. "time = 12.5 s"), "sequence": the sequence node}``; None
    for a plain 3D volume."""
    browser = _browser_of(node)
    if browser is None:
        return None
    sequence = browser.GetSequenceNode(node)
    frame = int(browser.GetSelectedItemNumber())
    index = ""
    if sequence is not None and 0 <= frame < sequence.GetNumberOfDataNodes():
        unit = sequence.GetIndexUnit()
        index = f"{sequence.GetIndexName()} = {sequence.GetNthIndexValue(frame)}" + (f" {unit}" if unit else "")
    return {"frame": frame, "count": int(browser.GetNumberOfItems()), "index": index, "sequence": sequence}


def dicom_series_of(node) -> tuple[str, str]:
    """(SeriesInstanceUID, Modality) from ``node``'s subject-hierarchy item, where Slicer's DICOM import stores
    them (UID name "DICOM", attribute "DICOM.Modality"; ``node.GetAttribute("DICOM.Modality")`` is empty);
    ("", "") when the volume did not come from DICOM."""
    scene = node.GetScene()
    if scene is None:
        return "", ""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return "", ""
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        return "", ""
    uid_name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMUIDName()
    modality_name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    return hierarchy.GetItemUID(item, uid_name).strip(), hierarchy.GetItemAttribute(item, modality_name).strip()


def study_identity(node):
    """The :class:`review_session.StudyIdentity` of a volume node: its DICOM series (of the node or, for a
    sequence's proxy node, of the sequence) plus the frame shown; else a content hash of its voxels and
    IJK-to-RAS matrix (plus the frame)."""
    from .review_session import content_identity, dicom_identity

    if not is_plain_scalar_volume(node):
        name = node.GetName() if node is not None else "nothing"
        raise ValueError(f"{name} is not a scalar CT / MR volume (label map, "
                         "vector / RGB, tensor or diffusion volumes cannot be denoised)")
    frame_info = sequence_frame(node)
    frame = frame_info["frame"] if frame_info else None
    uid, modality = dicom_series_of(node)
    if not uid and frame_info and frame_info["sequence"] is not None:
        uid, modality = dicom_series_of(frame_info["sequence"])
    if uid:
        return dicom_identity(uid, modality, node.GetName(), frame)
    return content_identity(slicer.util.arrayFromVolume(node), _ijk_to_ras(node), node.GetName(), frame)


def match_orientation_and_link(reference_slice, other_slice, composites) -> None:
    """Give ``other_slice`` (a vtkMRMLSliceNode, e.g. Yellow) ``reference_slice``'s orientation (Red's: a preset
    name such as "Axial", or its exact slice-to-RAS matrix when it is oblique, "Reformat"), then link the views'
    slice composite nodes (``composites``), so both show the same plane and follow each other. The order matters:
    a layout's "Axial" applies to new views only, and linking first would push Yellow's sagittal onto Red."""
    orientation = reference_slice.GetOrientation()
    if not (orientation and orientation != "Reformat" and other_slice.SetOrientation(orientation)):
        other_slice.GetSliceToRAS().DeepCopy(reference_slice.GetSliceToRAS())
        other_slice.UpdateMatrices()
    for composite in composites:
        composite.SetLinkedControl(True)  # slice position, zoom and orientation follow each other
        composite.SetHotLinkedControl(True)


def load_result(scene, path: str | os.PathLike, reference, suffix: str = " denoised", name: str | None = None):
    """Read a result file into a new scalar volume node named ``reference`` name + ``suffix``; the result must
    be on the reference's grid (RuntimeError otherwise, and nothing is added to the scene)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"could not read the result {path}")
    if not _align_to(node, reference):
        raise RuntimeError("the result is not on the original's grid: refusing to show it")
    node.SetName(name or (reference.GetName() + suffix))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    adopt_parent_transform(node, reference)
    adopt_study_folder(node, reference)
    _copy_window(reference, node)
    return node


def _copy_window(source, target) -> None:
    src, dst = source.GetDisplayNode(), target.GetDisplayNode()
    if src is not None and dst is not None:
        dst.SetAutoWindowLevel(False)
        dst.SetWindowLevel(src.GetWindow(), src.GetLevel())


def _array(node) -> np.ndarray:
    return slicer.util.arrayFromVolume(node)


def _new_like(scene, reference, array: np.ndarray, name: str, node=None):
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.CreateDefaultDisplayNodes()
    node.SetIJKToRASMatrix(_vtk_matrix(_ijk_to_ras(reference)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, np.float32))
    adopt_parent_transform(node, reference)
    adopt_study_folder(node, reference)
    return node


def _vtk_matrix(array: np.ndarray):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def difference_volume(scene, original, denoised, name: str | None = None):
    """A new volume original - denoised on the same grid (what the denoiser removed)."""
    if not same_grid(original, denoised):
        raise RuntimeError("original and denoised volumes are not on the same grid")
    node = _new_like(scene, original, difference(_array(original), _array(denoised)),
                     name or f"{original.GetName()} removed (original - denoised)")
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(200.0, 0.0)
    return node


def blended_volume(scene, original, denoised, strength: float, node=None, name: str | None = None):
    """strength * denoised + (1 - strength) * original, in ``node`` (updated in place) or a new node: the
    volume a radiologist submits as a correction."""
    if not same_grid(original, denoised):
        raise RuntimeError("original and denoised volumes are not on the same grid")
    array = blend(_array(original), _array(denoised), strength)
    node = _new_like(scene, original, array, name or f"{original.GetName()} corrected", node=node)
    _copy_window(original, node)
    return node


def roi_statistics_for_roi_node(original, denoised, roi_node) -> dict:
    """:func:`workflow.roi_statistics` inside a markups ROI (box) placed by the user."""
    if not same_grid(original, denoised):
        raise RuntimeError("original and denoised volumes are not on the same grid")
    center, radius = [0.0] * 3, [0.0] * 3
    roi_node.GetXYZ(center)
    roi_node.GetRadiusXYZ(radius)
    ras_to_ijk = np.linalg.inv(_ijk_to_ras(original))
    corners = np.array([[center[0] + sx * radius[0], center[1] + sy * radius[1], center[2] + sz * radius[2], 1.0]
                        for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    ijk = (ras_to_ijk @ corners.T).T[:, :3]
    shape = _array(original).shape  # (k, j, i)
    low = np.clip(np.floor(ijk.min(axis=0) + 0.5).astype(int), 0, [shape[2] - 1, shape[1] - 1, shape[0] - 1])
    high = np.clip(np.floor(ijk.max(axis=0) + 0.5).astype(int), 0, [shape[2] - 1, shape[1] - 1, shape[0] - 1])
    mask = np.zeros(shape, bool)
    mask[low[2]:high[2] + 1, low[1]:high[1] + 1, low[0]:high[0] + 1] = True
    return roi_statistics(_array(original), _array(denoised), mask)


def looks_like_ct(node) -> bool:
    """CT when the volume's 1st percentile is air-like (HU), as the server guesses too."""
    values = _array(node)
    sample = values.reshape(-1)[:: max(1, values.size // 200000)]
    return bool(sample.size and np.percentile(sample, 1.0) <= -500.0)


# ------------------------------------------------------------------------------------------------- marked regions
def segments_of(segmentation_node) -> list[tuple[str, str]]:
    """(segment id, name) of a segmentation node's segments, in the segmentation's order."""
    if segmentation_node is None:
        return []
    segmentation = segmentation_node.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName())
            for i in range(segmentation.GetNumberOfSegments())]


def segment_masks(segmentation_node, segment_ids: list[str], reference) -> list[np.ndarray]:
    """Each segment as a boolean (z, y, x) array on ``reference``'s grid (its full extent, any transform between
    the two nodes applied), via ``vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode`` one segment
    at a time (so overlaps survive; :func:`regions.build_region_map` decides who wins). The temporary labelmap
    node and the colour table the export makes are removed again.

    Raises:
        RegionsError: a segment id not in the segmentation, or an export that fails or lands on another grid.
    """
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    shape = tuple(reversed(reference.GetImageData().GetDimensions()))
    masks = []
    for segment_id in segment_ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise RegionsError(f"segment {segment_id!r} is not in {segmentation_node.GetName()}")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ADLDenoise_region__")
        try:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, ids, labelmap, reference):
                raise RegionsError(f"could not export segment {segment.GetName()!r} on {reference.GetName()}'s grid")
            array = slicer.util.arrayFromVolume(labelmap)
            if array.shape != shape:
                raise RegionsError(f"segment {segment.GetName()!r} exported with shape {array.shape}, not "
                                   f"{reference.GetName()}'s {shape}")
            masks.append(array != 0)
        finally:
            # the export gives a fresh labelmap node a colour table of its own (User type): remove it too, as
            # slicer.util.arrayFromSegmentBinaryLabelmap does
            display = labelmap.GetDisplayNode()
            color = display.GetColorNode() if display is not None else None
            if color is not None and color.GetType() == color.User:
                scene.RemoveNode(color)
            if display is not None:
                scene.RemoveNode(display)
            scene.RemoveNode(labelmap)
    return masks


def volume_grid(node) -> Grid:
    """The node's voxel grid (shape and IJK-to-LPS) as :class:`regions.Grid`."""
    return Grid.from_ijk_to_ras(_ijk_to_ras(node), tuple(reversed(node.GetImageData().GetDimensions())))
