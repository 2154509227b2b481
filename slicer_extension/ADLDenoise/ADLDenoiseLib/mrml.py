"""MRML-side logic: volume nodes out to files and back, difference and blended volumes, ROI statistics.

Needs Slicer's MRML only (``slicer.vtkMRML...`` and ``slicer.util``), not its GUI, so it runs inside Slicer and
with PyPI's ``slicer-core``. Volumes travel as NRRD, the one Slicer's own storage node writes, so the server gets
exactly the node's geometry (spacing, origin, any direction) and values (CT in HU); the result is read back in the
background (``volume_files.read_result``, as Slicer's reader reads it) and checked here, on the GUI thread, to be
on the original's grid before its voxels are put into a new node; a review-queue study likewise
(``volume_files.read_study``, then :func:`load_study` here).

The nodes made here from arrays (result, difference, corrected volume, a review-queue study) have no storage node,
on purpose: Slicer gives a storable node without one its default storage node when it is saved
(``vtkMRMLStorableNode::AddDefaultStorageNode``: in the Save dialog, ``qSlicerSaveDataDialog`` nodeFileInfo; when a
node is written, ``qSlicerNodeWriter::write`` via ``qSlicerCoreIOManager::createAndAddDefaultStorageNode``; in a
scene bundle, ``vtkMRMLScene::SaveStorableNodeToSlicerDataBundleDirectory``), for a scalar volume a
``vtkMRMLVolumeArchetypeStorageNode`` writing NRRD, and the Save dialog ticks it (never stored, so modified since
read). A storage node made now would change nothing; one naming the downloaded file (as Slicer's loader left on a
review-queue study) is not ticked (not modified since read), so a saved scene pointed at that file in the module's
temporary folder, which is deleted with the scene.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import slicer
import vtk

from .regions import Grid, RegionsError
from .workflow import blend, difference, roi_statistics, strided_sample

__all__ = ["export_volume", "load_result", "load_study", "same_grid", "difference_inputs", "difference_volume",
           "blended_volume", "roi_mask", "roi_statistics_for_roi_node", "looks_like_ct", "segments_of",
           "segment_masks", "volume_grid",
           "check_segmentation_reference", "tag_derived", "derived_kind", "DERIVED_ATTRIBUTE", "STUDY_ATTRIBUTE",
           "DERIVED_FROM_ROLE", "WRONG_VALUES_ATTRIBUTE",
           "study_identity", "content_identity_of", "loaded_identity", "volume_snapshot", "volume_copy",
           "sequence_frame",
           "dicom_series_of", "dicom_instance_uids",
           "is_plain_scalar_volume",
           "EXCLUDED_VOLUME_TYPES",
           "adopt_parent_transform", "adopt_study_folder", "match_orientation_and_link", "INPUT_CHANGE_EVENTS",
           "take_voxels", "SHAREABLE_TYPES"]

#: subclasses of vtkMRMLScalarVolumeNode that are not a CT / MR intensity volume (the selector hides them; Slicer's
#: class tree: LabelMap, Tensor -> Vector / DiffusionImage -> DiffusionTensor, DiffusionWeighted)
EXCLUDED_VOLUME_TYPES = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLTensorVolumeNode", "vtkMRMLVectorVolumeNode",
                         "vtkMRMLDiffusionImageVolumeNode", "vtkMRMLDiffusionTensorVolumeNode",
                         "vtkMRMLDiffusionWeightedVolumeNode")

#: events of a volume node after which what it holds may be another study: new voxels (also a 4D sequence's proxy
#: node taking another frame: vtkSlicerSequencesLogic copies each frame into the same node, CopyContent ->
#: SetAndObserveImageData) and a new grid (IJK-to-RAS, part of a content identity; vtkCommand::ModifiedEvent)
INPUT_CHANGE_EVENTS = (slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, vtk.vtkCommand.ModifiedEvent)

#: attribute of every volume this module makes from a study: "result", "corrected" or "difference". Such a volume
#: is no study of its own (:func:`study_identity` refuses it) but may hold a study's marked regions
DERIVED_ATTRIBUTE = "ADLDenoise.derived"
#: attribute of a result, and of the volumes made from it: the datastore id of the study (frame) it was made for
STUDY_ATTRIBUTE = "ADLDenoise.study"
#: attribute of a result denoised from wrong values, and of the volumes made from it: the warning saying which
#: frames (``ReviewSession.result_warning``: frames whose own rescale Slicer's reader ignored); also the node's
#: description, which the Data module shows
WRONG_VALUES_ATTRIBUTE = "ADLDenoise.wrongValues"
#: node reference role from a derived volume to its original. A reference, not an attribute holding the ID: the
#: scene rewrites references when it renames IDs on import and drops them when the original is removed, whereas
#: a stale ID in an attribute would point at whatever node gets that ID next (IDs restart after Close Scene)
DERIVED_FROM_ROLE = "ADLDenoise.derivedFrom"


def _numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _numpy(matrix)


def _local_to_world(node) -> np.ndarray:
    """4x4 from ``node``'s own RAS to world: its parent transforms (a DICOM gantry-tilt / acquisition transform,
    one the user applied), which must be linear: a warped volume has no box-shaped voxel region to measure.

    Raises:
        RuntimeError: the node is under a non-linear (grid, B-spline, thin-plate) transform.
    """
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise RuntimeError(f"{node.GetName()} is under the non-linear transform {transform.GetName()}: harden it "
                           "(Data module, right-click, Harden transform) or remove it to measure in an ROI")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _numpy(matrix)


def same_grid(a, b, tol: float = 1e-4) -> bool:
    """Same dimensions and IJK-to-RAS matrix (spacing, origin, direction)."""
    dims_a = a.GetImageData().GetDimensions() if a.GetImageData() else None
    dims_b = b.GetImageData().GetDimensions() if b.GetImageData() else None
    return dims_a == dims_b and np.allclose(_ijk_to_ras(a), _ijk_to_ras(b), atol=tol)


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


def tag_derived(node, original, kind: str, source=None) -> None:
    """Mark ``node`` as made by this module from ``original`` (``kind``: "result", "corrected", "difference"),
    so that it is never taken for a study of its own (:func:`study_identity`) and may hold the original's marked
    regions (:func:`check_segmentation_reference`). The study it belongs to comes from ``source`` (the result it
    was made from, which the module's logic tagged with :data:`STUDY_ATTRIBUTE`), when there is one, and so does
    the warning of a result denoised from wrong values (:data:`WRONG_VALUES_ATTRIBUTE`)."""
    node.SetAttribute(DERIVED_ATTRIBUTE, kind)
    node.SetNodeReferenceID(DERIVED_FROM_ROLE, original.GetID())
    study = source.GetAttribute(STUDY_ATTRIBUTE) if source is not None else None
    if study:
        node.SetAttribute(STUDY_ATTRIBUTE, study)
    if source is not None:  # made from a result denoised from wrong values: as wrong (a blend node is reused)
        _note_wrong_values(node, source.GetAttribute(WRONG_VALUES_ATTRIBUTE) or "")


def _note_wrong_values(node, warning: str) -> None:
    """``warning`` (:data:`WRONG_VALUES_ATTRIBUTE`) on ``node``: its attribute and its description; "" removes a
    warning noted before (and the description only when it is that warning)."""
    noted = node.GetAttribute(WRONG_VALUES_ATTRIBUTE)
    if warning:
        node.SetAttribute(WRONG_VALUES_ATTRIBUTE, warning)
        node.SetDescription(warning)
    elif noted:
        node.RemoveAttribute(WRONG_VALUES_ATTRIBUTE)
        if node.GetDescription() == noted:
            node.SetDescription("")


def derived_kind(node) -> str:
    """"result", "corrected" or "difference" for a volume this module made; "" for anything else. A result of an
    earlier version of the module carries only :data:`STUDY_ATTRIBUTE`: a "result" too."""
    if node is None:
        return ""
    return node.GetAttribute(DERIVED_ATTRIBUTE) or ("result" if node.GetAttribute(STUDY_ATTRIBUTE) else "")


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


def dicom_instance_uids(node) -> str:
    """The SOP Instance UIDs of the files ``node`` was loaded from, space-separated, as Slicer's DICOM import stores
    them on its subject-hierarchy item (UID name "DICOMInstanceUID"); "" when it has none."""
    scene = node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene is not None else None
    item = hierarchy.GetItemByDataNode(node) if hierarchy is not None else 0
    if not item:
        return ""
    return hierarchy.GetItemUID(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMInstanceUIDName()).strip()


def study_identity(node):
    """The :class:`review_session.StudyIdentity` of a volume node: its DICOM series and the instances it was made
    of (of the node or, for a sequence's proxy node, of the sequence) plus the frame shown; else a content hash
    of its voxels and IJK-to-RAS matrix (plus the frame).

    Raises:
        ValueError: not a single-component scalar volume.
        WorkflowError: a volume this module made (result, corrected, difference: :func:`derived_kind`). Its
            content hash would make it a new study, so denoising or submitting it would upload a derived image
            as a patient's original.
    """
    from .review_session import content_identity

    series, frame = _series_and_frame(node)
    if series is not None:
        return series
    return content_identity(slicer.util.arrayFromVolume(node), _ijk_to_ras(node), node.GetName(), frame)


def volume_snapshot(node):
    """GUI thread: a :class:`review_session.VolumeSnapshot` of a volume node: a copy of its voxels (Slicer's array
    may change or be freed while a thread hashes it), its IJK-to-RAS matrix, name, sequence frame and DICOM
    identity (as :func:`study_identity` finds it; None: identified by content). Its ``content()`` is
    :func:`content_identity_of` the node as it was, computed in the background. Raises as :func:`study_identity`."""
    series, frame = _series_and_frame(node)
    return volume_copy(node, series, frame)


def loaded_identity(node, volume, content):
    """GUI thread, without copying or hashing the voxels: ``content``, the identity
    :func:`volume_files.study_content` hashed in the background from ``volume`` (the :class:`volume_files.VolumeArray`
    :func:`load_study` has just filled ``node`` with), when it is the one :func:`content_identity_of` gives ``node``
    now: ``node`` is a study (:func:`volume_snapshot`'s refusals raise here too), neither of a DICOM series nor a
    sequence frame, has the name hashed, and its voxels' type and shape and its IJK-to-RAS matrix as the hash rounds
    it (``review_session.hashed_grid``) are those hashed (``volume_files.node_grid`` of the array's). Should a Slicer
    store the matrix otherwise than ``node_grid`` expects: None, and the caller identifies the node from a copy of its
    voxels (:func:`volume_snapshot`), as any volume."""
    from .review_session import hashed_grid
    from .volume_files import node_grid

    series, frame = _series_and_frame(node)
    voxels = slicer.util.arrayFromVolume(node)  # a view: nothing copied
    if series is not None or frame is not None or content is None or content.kind != "content" or \
            content.frame is not None or content.name != node.GetName():
        return None
    if voxels.dtype.str != volume.voxels.dtype.str or voxels.shape != volume.voxels.shape or \
            hashed_grid(_ijk_to_ras(node)) != hashed_grid(node_grid(volume.ijk_to_ras)):
        return None
    return content


def volume_copy(node, series=None, frame: int | None = None):
    """GUI thread: a :class:`review_session.VolumeSnapshot` of any scalar volume node (a correction too: no check
    that it is a study), a copy of its voxels ((z, y, x), the node's scalar type) and its IJK-to-RAS matrix, to be
    hashed or written to a file in the background (``volume_files.VolumeExport``) while the node may change."""
    from .review_session import VolumeSnapshot

    return VolumeSnapshot(np.array(slicer.util.arrayFromVolume(node), copy=True), _ijk_to_ras(node), node.GetName(),
                          frame, series)


def _series_and_frame(node):
    """(DICOM identity or None, sequence frame or None) of a volume node, refusing what is no study (see
    :func:`study_identity`)."""
    from .review_session import WorkflowError, dicom_identity

    if not is_plain_scalar_volume(node):
        name = node.GetName() if node is not None else "nothing"
        raise ValueError(f"{name} is not a scalar CT / MR volume (label map, "
                         "vector / RGB, tensor or diffusion volumes cannot be denoised)")
    kind = derived_kind(node)
    if kind:
        original = node.GetNodeReference(DERIVED_FROM_ROLE)
        hint = f" ({original.GetName()})" if original is not None else ""
        raise WorkflowError(f"{node.GetName()} is a {kind} volume made by ADL Denoise, not a study: select the "
                            f"original{hint}")
    frame_info = sequence_frame(node)
    frame = frame_info["frame"] if frame_info else None
    source = node
    uid, modality = dicom_series_of(node)
    if not uid and frame_info and frame_info["sequence"] is not None:
        source = frame_info["sequence"]
        uid, modality = dicom_series_of(source)
    if uid:  # plus the files it was made of: Slicer may load one series as several volumes (subseries)
        return dicom_identity(uid, modality, node.GetName(), frame, dicom_instance_uids(source)), frame
    return None, frame


def content_identity_of(node):
    """The content identity (:func:`review_session.content_identity`) of a volume node's voxels and grid, with
    the sequence frame shown, even when it came from DICOM: what :meth:`ReviewSession.as_loaded` compares to
    tell a DICOM volume edited in place."""
    from .review_session import content_identity

    frame_info = sequence_frame(node)
    return content_identity(slicer.util.arrayFromVolume(node), _ijk_to_ras(node), node.GetName(),
                            frame_info["frame"] if frame_info else None)


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


def load_result(scene, result, reference, suffix: str = " denoised", name: str | None = None, study: str = "",
                warning: str = ""):
    """GUI thread: a new scalar volume node named ``reference`` name + ``suffix`` holding the result read in the
    background (``result``: a :class:`volume_files.ResultRead`; no file is touched here). A path is read first,
    on the caller's thread (scripts, tests). The result must have been readable, then be on the reference's grid
    (RuntimeError otherwise, in that order, and nothing is added to the scene). The node is tagged as
    ``reference``'s result (:func:`tag_derived`), for the study (frame) whose datastore id is ``study``; ``warning``
    (``ReviewSession.result_warning``: denoised from wrong values) is noted on it (:data:`WRONG_VALUES_ATTRIBUTE`,
    and its description), when given. The array
    read becomes the node's voxels (:func:`take_voxels`: held once, not copied; read-only in ``result`` from then
    on)."""
    from .volume_files import ResultRead, align_to_grid, read_result

    if not isinstance(result, ResultRead):
        result = read_result(result)
    if result.volume is None:
        raise RuntimeError(f"could not read the result {result.path}: {result.error}")
    grid = _ijk_to_ras(reference)
    image = reference.GetImageData()
    shape = tuple(reversed(image.GetDimensions())) if image is not None else ()
    voxels = align_to_grid(result.volume.voxels, result.volume.ijk_to_ras, shape, grid)
    if voxels is None:
        raise RuntimeError("the result is not on the original's grid: refusing to show it")
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetIJKToRASMatrix(_vtk_matrix(grid))
    take_voxels(node, voxels)  # the array read becomes the node's voxels: no second copy
    node.SetName(name or (reference.GetName() + suffix))
    scene.AddNode(node)  # before tagging: a node reference needs the scene
    tag_derived(node, reference, "result")
    if study:
        node.SetAttribute(STUDY_ATTRIBUTE, study)
    if warning:
        _note_wrong_values(node, warning)
    _add_display(node, _window_of(reference))  # the original's window, set before the voxels are seen
    adopt_parent_transform(node, reference)
    adopt_study_folder(node, reference)
    return node


def load_study(scene, volume, name: str, window: tuple[float, float] | None = None):
    """GUI thread: a new scalar volume node ``name`` holding a review-queue study read in the background
    (``volume``: a :class:`volume_files.VolumeArray` from ``volume_files.read_study``; no file is touched here), with
    ``window`` ((width, level), e.g. ``workflow.auto_window`` of its voxels, computed in the background too) set
    before its voxels are seen (None: Slicer's automatic window/level, computed here). The node is made and filled
    before it is added: an array Slicer refuses leaves the scene unchanged. The array read becomes the node's voxels
    (:func:`take_voxels`: not copied; read-only in ``volume`` from then on). Like any node made from an array it has
    no storage node until it is saved: Slicer's Save dialog and scene bundle add the default one then
    (``vtkMRMLStorableNode::AddDefaultStorageNode``)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetIJKToRASMatrix(_vtk_matrix(volume.ijk_to_ras))
    take_voxels(node, volume.voxels)  # the array read becomes the node's voxels: no second copy
    node.SetName(name)
    scene.AddNode(node)
    _add_display(node, window)
    return node


#: value types a volume node takes as its own memory (``take_voxels``): those ``vtk.util.numpy_support`` maps to a
#: VTK type one to one, without 64-bit integers ("long long", which ``slicer.util.updateVolumeFromArray`` refuses)
SHAREABLE_TYPES = frozenset(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                                  np.float32, np.float64))


def take_voxels(node, voxels: np.ndarray) -> None:
    """GUI thread: ``voxels`` ((z, y, x)) become ``node``'s voxels themselves, not a copy of them, so an array read or
    computed in the background is held once, not twice: a new image data whose scalars point at the array's memory
    (``vtk.util.numpy_support.numpy_to_vtk(deep=False)``, as ``slicer.util.updateVolumeFromITKImage(deepCopy=False)``
    shares an ITK image's) is set on the node (``SetAndObserveImageData``: the notifications of
    ``updateVolumeFromArray``). The array lives as long as the VTK array does: an observer of its DeleteEvent holds
    it (not a Python attribute of the VTK array, which VTK's wrapping would keep until its next clean-up once the
    array is gone). ``voxels`` is made read-only: nothing writes the node's voxels through it unseen, and handing it
    to another node copies it. An array a node cannot take as it is (not a writable, aligned, C-contiguous 3D array
    owning its memory, in this machine's byte order, of :data:`SHAREABLE_TYPES`) is copied
    (``slicer.util.updateVolumeFromArray``, with Slicer's own checks)."""
    if not (isinstance(voxels, np.ndarray) and voxels.ndim == 3 and voxels.size and voxels.dtype in SHAREABLE_TYPES
            and voxels.dtype.isnative and voxels.flags.c_contiguous and voxels.flags.aligned
            and voxels.flags.writeable and voxels.flags.owndata):
        slicer.util.updateVolumeFromArray(node, voxels)
        return
    import vtk.util.numpy_support

    scalars = vtk.util.numpy_support.numpy_to_vtk(voxels.reshape(-1), deep=False)
    keep = scalars.__dict__.pop("_numpy_reference", voxels)
    scalars.AddObserver(vtk.vtkCommand.DeleteEvent, lambda caller, event, keep=keep: None)
    image = vtk.vtkImageData()  # origin 0, spacing 1, no direction: the node holds the geometry
    image.SetDimensions(*reversed(voxels.shape))
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    voxels.flags.writeable = False


def _window_of(node) -> tuple[float, float] | None:
    display = node.GetDisplayNode() if node is not None else None
    return (display.GetWindow(), display.GetLevel()) if display is not None else None


def _add_display(node, window: tuple[float, float] | None = None) -> None:
    """``node.CreateDefaultDisplayNodes()`` (``node`` in a scene); with ``window`` ((width, level)) the display
    node gets it, automatic window/level off, before it observes the voxels: the automatic one computes a
    histogram of the whole volume on the GUI thread (seconds for 512 x 512 x 400 voxels), only to be replaced."""
    if window is None or node.GetDisplayNode() is not None:
        node.CreateDefaultDisplayNodes()
        return
    display = node.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    if not display.GetColorNodeID():  # as vtkMRMLScalarVolumeNode::CreateDefaultDisplayNodes
        display.SetDefaultColorMap()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(*window)
    node.SetAndObserveDisplayNodeID(display.GetID())


def _copy_window(source, target) -> None:
    src, dst = source.GetDisplayNode(), target.GetDisplayNode()
    if src is not None and dst is not None:
        dst.SetAutoWindowLevel(False)
        dst.SetWindowLevel(src.GetWindow(), src.GetLevel())


def _array(node) -> np.ndarray:
    return slicer.util.arrayFromVolume(node)


def _new_like(scene, reference, array: np.ndarray, name: str, node=None,
              window: tuple[float, float] | None = None):
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        _add_display(node, window)
    node.SetIJKToRASMatrix(_vtk_matrix(_ijk_to_ras(reference)))
    take_voxels(node, np.ascontiguousarray(array, np.float32))
    adopt_parent_transform(node, reference)
    adopt_study_folder(node, reference)
    return node


def _vtk_matrix(array: np.ndarray):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def difference_inputs(original, denoised) -> tuple[np.ndarray, np.ndarray]:
    """GUI thread: copies of the voxels of ``original`` and ``denoised`` (same grid, else RuntimeError), for
    :func:`workflow.difference` in the background while the nodes may change; :func:`difference_volume` then takes
    its answer."""
    if not same_grid(original, denoised):
        raise RuntimeError("original and denoised volumes are not on the same grid")
    return np.array(_array(original), copy=True), np.array(_array(denoised), copy=True)


def difference_volume(scene, original, denoised, name: str | None = None, values: np.ndarray | None = None):
    """A new volume original - denoised on the same grid (what the denoiser removed). ``values``: that difference
    computed already (in the background, from :func:`difference_inputs`), made the node's voxels here
    (:func:`take_voxels`: not copied, and read-only for the caller from then on);
    computed here when None."""
    if not same_grid(original, denoised):
        raise RuntimeError("original and denoised volumes are not on the same grid")
    if values is None:
        values = difference(_array(original), _array(denoised))
    elif values.shape != _array(original).shape:
        raise RuntimeError(f"the difference has shape {values.shape}, the volumes {_array(original).shape}")
    node = _new_like(scene, original, values, name or f"{original.GetName()} removed (original - denoised)",
                     window=(200.0, 0.0))
    tag_derived(node, original, "difference", source=denoised)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(200.0, 0.0)
    return node


def blended_volume(scene, original, denoised, strength: float, node=None, name: str | None = None):
    """strength * denoised + (1 - strength) * original, in ``node`` (its float32 voxels overwritten in place, no
    new volume-sized array: the blend slider updates it) or a new node: the volume a radiologist submits as a
    correction."""
    if not same_grid(original, denoised):
        raise RuntimeError("original and denoised volumes are not on the same grid")
    target = _array(node) if node is not None and node.GetImageData() is not None else None
    if target is not None and target.shape == _array(original).shape and target.dtype == np.float32:
        blend(_array(original), _array(denoised), strength, out=target)
        node.SetIJKToRASMatrix(_vtk_matrix(_ijk_to_ras(original)))
        slicer.util.arrayFromVolumeModified(node)
        adopt_parent_transform(node, original)
        adopt_study_folder(node, original)
        if name:
            node.SetName(name)
    else:
        node = _new_like(scene, original, blend(_array(original), _array(denoised), strength),
                         name or f"{original.GetName()} corrected", node=node, window=_window_of(original))
    tag_derived(node, original, "corrected", source=denoised)
    _copy_window(original, node)
    return node


def roi_mask(volume, roi_node) -> np.ndarray:
    """Boolean (k, j, i) mask of ``volume``'s voxels whose centres lie inside ``roi_node`` (a markups ROI box).

    Both are placed in world coordinates, as Slicer shows them: the volume through its parent transforms (DICOM
    import adds one for gantry-tilted CT; the module puts results under the original's), the ROI through its
    ObjectToWorld matrix (its centre, its rotation and any transform of its own). Each voxel centre goes IJK ->
    RAS -> world -> the ROI's object coordinates and is inside when every coordinate is within half the ROI's
    size (boundary included, as vtkMRMLMarkupsROINode::IsPointInROIWorld). Only voxels within the IJK bounding
    box of the ROI's 8 corners are tested, one slice at a time, so memory stays one slice's worth. An
    inside-out ROI is measured as its box all the same.

    Raises:
        RuntimeError: the volume is under a non-linear transform.
    """
    dims = np.array(volume.GetImageData().GetDimensions())  # (i, j, k)
    ijk_to_world = _local_to_world(volume) @ _ijk_to_ras(volume)
    object_to_world = _numpy(roi_node.GetObjectToWorldMatrix())
    half = np.asarray(roi_node.GetSize(), float) / 2.0
    mask = np.zeros(tuple(dims[::-1]), bool)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    corners = np.c_[signs * half, np.ones(8)]
    corners_ijk = (np.linalg.solve(ijk_to_world, object_to_world @ corners.T).T)[:, :3]
    low = np.clip(np.floor(corners_ijk.min(axis=0)).astype(int), 0, dims - 1)
    high = np.clip(np.ceil(corners_ijk.max(axis=0)).astype(int), 0, dims - 1)
    ijk_to_object = np.linalg.solve(object_to_world, ijk_to_world)
    ii, jj = (axis.ravel() for axis in np.meshgrid(np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1)))
    in_plane = ijk_to_object[:3, :2] @ np.stack([ii, jj]) + ijk_to_object[:3, 3:4]
    limit = (half + 1e-6)[:, None]  # a hair of tolerance: voxel centres on a face stay inside despite rounding
    for k in range(low[2], high[2] + 1):
        inside = np.all(np.abs(in_plane + ijk_to_object[:3, 2:3] * k) <= limit, axis=0)
        mask[k, jj[inside], ii[inside]] = True
    return mask


def roi_statistics_for_roi_node(original, denoised, roi_node) -> dict:
    """:func:`workflow.roi_statistics` inside a markups ROI (box) placed by the user, with the voxels
    :func:`roi_mask` finds (transforms and the ROI's rotation applied)."""
    if not same_grid(original, denoised):
        raise RuntimeError("original and denoised volumes are not on the same grid")
    return roi_statistics(_array(original), _array(denoised), roi_mask(original, roi_node))


def looks_like_ct(node) -> bool:
    """CT when the volume's 1st percentile is air-like (HU), as the server guesses too."""
    sample = strided_sample(_array(node), 200000)
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


def check_segmentation_reference(segmentation_node, original, study: str = "") -> None:
    """Refuse a segmentation that was not drawn on ``original``: its segments would be sent as this study's
    marked regions, since the export resamples any segmentation onto the original's grid.

    What it was drawn on is its reference image geometry node (the Segment Editor's source volume; a DICOM SEG's
    referenced series). Accepted: ``original`` itself; a volume this module made from it (result, corrected,
    difference: they refer to it by :data:`DERIVED_FROM_ROLE`, and when both ``study`` and the volume's
    :data:`STUDY_ATTRIBUTE` are known they must agree, so a result of another 4D frame does not pass); another
    node of the same study (the same DICOM series and frame, or identical voxels on the same grid, e.g. a file
    loaded twice). Refused: anything else, and a segmentation with no reference node (loaded from a file): its
    geometry alone cannot tell this study from another one scanned with the same protocol. The message says how
    to declare the original as its geometry (the Segment Editor's "Specify geometry" sets the reference).

    Raises:
        RegionsError: the segmentation was drawn on another volume, or on none known.
    """
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    reference = segmentation_node.GetNodeReference(role)
    name, target = segmentation_node.GetName(), original.GetName()
    fix = (f"draw the regions on {target}, or, if they belong to it, set {target} as the segmentation's geometry "
           "(Segment Editor, Specify geometry)")
    if reference is None:
        raise RegionsError(f"{name} names no volume it was drawn on, so its segments may belong to another study: "
                           + fix)
    if reference.GetID() == original.GetID():
        return
    if derived_kind(reference):
        made_from = reference.GetNodeReference(DERIVED_FROM_ROLE)
        made_for = reference.GetAttribute(STUDY_ATTRIBUTE) or ""
        if made_from is not None and made_from.GetID() == original.GetID() and (
                not study or not made_for or made_for == study):
            return
    elif is_plain_scalar_volume(reference) and same_grid(reference, original) and \
            study_identity(reference) == study_identity(original):
        return
    raise RegionsError(f"{name} was drawn on {reference.GetName()}, not on {target} or a volume made from it: its "
                       f"segments would be sent as another study's marked regions; {fix}")


def volume_grid(node) -> Grid:
    """The node's voxel grid (shape and IJK-to-LPS) as :class:`regions.Grid`."""
    return Grid.from_ijk_to_ras(_ijk_to_ras(node), tuple(reversed(node.GetImageData().GetDimensions())))
