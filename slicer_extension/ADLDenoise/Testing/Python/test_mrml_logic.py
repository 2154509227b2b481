"""MRML-side logic of the ADLDenoise module against real MRML (Slicer, or PyPI's slicer-core without Qt).

Volume nodes out to NRRD and back (geometry, HU values, name suffix), the file written in the background from a copy
taken on the GUI thread equal to the one Slicer's storage node writes, the result file read in the background equal
to what Slicer's loader reads (the GUI step then reads no file; a damaged one is refused, the scene unchanged), a
review-queue study read in the background equal to what Slicer's loader makes of its file (the GUI step reads no
file, neither copies nor hashes its voxels: its identity, hashed in the background, is the node's bit for bit; an
unreadable one fails with a clear message), the arrays read or computed in the background becoming their nodes'
voxels without a copy, the difference computed beside a running request, the volumes made from arrays written by
Slicer's Save through its default storage node, refusal of a result on another grid, difference (computed from
copies) and blended (updated in place) volumes, a result denoised from wrong values noted as such (and the volumes
made from it), ROI statistics inside a markups ROI (rotated, the volume under a transform), the module's own volumes
tagged and refused as a study, a segmentation of another study refused as marked regions; the study identity from
the subject hierarchy (SeriesInstanceUID, Modality) or the content, scalar-only volumes, the parent transform and the
study (subject-hierarchy parent) of results, the frame of a 4D sequence, Yellow taking Red's orientation before the
views are linked, and Close Scene making the review session forget. Needs neither a server nor pynrrd. Run inside
Slicer with ``slicer_add_python_unittest`` or outside it with ``python -m pytest`` in a venv that has slicer-core.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import tracemalloc
import unittest
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import slicer

if getattr(slicer, "mrmlScene", None) is None:  # slicer-core: no application, so make the scene slicer.util uses
    slicer.mrmlScene = slicer.vtkMRMLScene()


class nrrd:  # noqa: N801 - a minimal stand-in for pynrrd's read / write (Slicer does not bundle pynrrd)
    """Raw (uncompressed) NRRD read and write, independent of Slicer: enough to check what Slicer's storage node
    wrote (``export_volume`` writes uncompressed) and to hand it files. Data in C order (z, y, x)."""

    TYPES = {"float": np.float32, "double": np.float64, "short": np.int16, "unsigned short": np.uint16,
             "int": np.int32, "unsigned char": np.uint8, "uchar": np.uint8, "signed char": np.int8}

    @staticmethod
    def _vector(text: str) -> list[float]:
        return [float(v) for v in text.strip().strip("()").split(",")]

    @classmethod
    def read(cls, path: str, index_order: str = "C"):
        raw = Path(path).read_bytes()
        end = raw.index(b"\n\n")
        fields = {}
        for line in raw[:end].decode("ascii").splitlines()[1:]:
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.lstrip("=").strip()
        if fields.get("encoding") != "raw":
            raise ValueError(f"only raw NRRD is read here, got encoding {fields.get('encoding')}")
        sizes = [int(v) for v in fields["sizes"].split()]
        dtype = np.dtype(cls.TYPES[fields["type"]]).newbyteorder("<" if fields.get("endian", "little") == "little"
                                                                else ">")
        data = np.frombuffer(raw[end + 2:], dtype, count=int(np.prod(sizes))).reshape(sizes[::-1])
        header = dict(fields)
        header["space directions"] = np.array([cls._vector(v) for v in
                                               fields["space directions"].replace(") (", ")|(").split("|")])
        header["space origin"] = np.array(cls._vector(fields["space origin"]))
        return data.astype(dtype.newbyteorder("=")), header

    @classmethod
    def write(cls, path: str, data: np.ndarray, header: dict, index_order: str = "C") -> None:
        data = np.ascontiguousarray(data)
        names = {np.dtype(t): n for n, t in reversed(list(cls.TYPES.items()))}
        vectors = " ".join("(" + ",".join(repr(float(v)) for v in row) + ")" for row in header["space directions"])
        text = ("NRRD0004\n"
                f"type: {names[data.dtype.newbyteorder('=')]}\ndimension: 3\nspace: {header['space']}\n"
                f"sizes: {' '.join(str(n) for n in data.shape[::-1])}\nspace directions: {vectors}\n"
                "kinds: domain domain domain\nendian: little\nencoding: raw\n"
                f"space origin: ({','.join(repr(float(v)) for v in header['space origin'])})\n\n")
        Path(path).write_bytes(text.encode("ascii") + data.astype(data.dtype.newbyteorder("<")).tobytes())


from ADLDenoiseLib.mrml import (  # noqa: E402  (slicer.util needs the scene made above)
    DERIVED_ATTRIBUTE,
    DERIVED_FROM_ROLE,
    INPUT_CHANGE_EVENTS,
    STUDY_ATTRIBUTE,
    WRONG_VALUES_ATTRIBUTE,
    adopt_parent_transform,
    adopt_study_folder,
    blended_volume,
    check_segmentation_reference,
    content_identity_of,
    difference_inputs,
    difference_volume,
    export_volume,
    is_plain_scalar_volume,
    load_result,
    load_study,
    loaded_identity,
    looks_like_ct,
    match_orientation_and_link,
    roi_mask,
    roi_statistics_for_roi_node,
    same_grid,
    sequence_frame,
    study_identity,
    volume_copy,
    volume_snapshot,
)
from ADLDenoiseLib.regions import RegionsError  # noqa: E402
from ADLDenoiseLib.background import BackgroundTask  # noqa: E402
from ADLDenoiseLib.review_session import FilesCheck, ReviewSession, VolumeChanged, WorkflowError  # noqa: E402
from ADLDenoiseLib.series_files import IgnoredRescale  # noqa: E402
from ADLDenoiseLib.volume_files import VolumeArray as volume_files_array  # noqa: E402
from ADLDenoiseLib.volume_files import (  # noqa: E402
    VolumeExport,
    VolumeUnreadable,
    align_to_grid,
    prepare_upload,
    read_result,
    read_study,
    read_volume,
    study_content,
    write_nrrd,
)
from ADLDenoiseLib.workflow import auto_window, difference, roi_statistics  # noqa: E402

#: Python file and OS events seen while ``_WATCH`` is set (an audit hook cannot be removed: it stays, idle)
_WATCH: list = []


def _audit(event: str, args) -> None:
    if _WATCH and (event == "open" or event.startswith(("os.", "shutil.", "tempfile."))):
        _WATCH[0].append((event, args))


sys.addaudithook(_audit)


@contextmanager
def file_events():
    """The Python file and OS events (``open``, ``os.*``, ``shutil.*``, ``tempfile.*``) of the block, in a list."""
    seen: list = []
    _WATCH.append(seen)
    try:
        yield seen
    finally:
        _WATCH.clear()


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


def three_volumes(short_slices: int):
    """Volumes of three scalar types and grids: the float32 oblique left-handed CT of :func:`oblique_ct_node`, an
    int16 axial MR of ``short_slices`` slices, a single uint16 slice."""
    ct = oblique_ct_node()
    short = slicer.util.addVolumeFromArray(
        np.arange(short_slices * 30 * 20, dtype=np.int16).reshape(short_slices, 30, 20) - 600, name="MR short")
    short.SetSpacing(0.9, 0.9, 3.0)
    short.SetOrigin(5.0, -7.5, 20.0)
    single = slicer.util.addVolumeFromArray(np.arange(80, dtype=np.uint16).reshape(1, 8, 10), name="slice")
    return ct, short, single


class MRMLLogicTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear(0)
        self.work = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)  # its volumes: not left in /tmp

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

    def test_the_file_written_in_the_background_from_a_copy_is_the_volume_as_slicers_storage_node_writes_it(self):
        """The module copies a volume's voxels and grid on the GUI thread (volume_snapshot / volume_copy: no file
        made) and writes the NRRD from the copy in its BackgroundTask (prepare_upload, after the identity check):
        Slicer's storage node reads that file back exactly as it reads its own export of the node (voxels in the
        node's scalar type, IJK-to-RAS: oblique, left-handed, a single slice), and load_result puts it on the
        node's grid; a change made to the node after the copy is not in the file; a node no longer holding the
        voxels identified gets no file."""
        read = self._slicer_read
        ct, short, single = three_volumes(short_slices=2)
        for number, node in enumerate((ct, short, single)):
            reference = read(export_volume(node, self.work / f"slicer_{number}.nrrd"))
            snapshot = volume_snapshot(node)  # GUI thread: a copy, no file
            identified = snapshot.content()  # (hashed in the background when the volume is selected)
            export = VolumeExport(snapshot, self.work / f"exports_{number}" / "study.nrrd")
            self.assertFalse(export.path.exists() or export.path.parent.exists())
            expected = slicer.util.arrayFromVolume(node).copy()
            slicer.util.arrayFromVolume(node)[:] = 0  # the node changes after the copy (a 4D frame, an edit)
            slicer.util.arrayFromVolumeModified(node)
            task = BackgroundTask(lambda report, cancelled, s=snapshot, e=export:
                                  prepare_upload((s, identified), e, report, cancelled), name="export")
            self.assertEqual(task.wait(120), "done", task.error)
            self.assertEqual(task.result, export.path)
            voxels, matrix = read(export.path)
            self.assertEqual(voxels.dtype, reference[0].dtype)
            np.testing.assert_array_equal(voxels, reference[0])
            np.testing.assert_allclose(matrix, reference[1], atol=1e-9)
            slicer.util.updateVolumeFromArray(node, expected)  # load_result checks the grid against the node's
            result = load_result(slicer.mrmlScene, export.path, node)
            self.assertTrue(same_grid(result, node))
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(result), expected)
        # a corrected volume (no study of its own) is copied all the same; a copy of other voxels than those
        # identified is refused before anything is written
        corrected = blended_volume(slicer.mrmlScene, node, result, 0.5)
        copy = volume_copy(corrected)
        np.testing.assert_array_equal(copy.voxels, slicer.util.arrayFromVolume(corrected))
        self.assertEqual(copy.name, corrected.GetName())
        changed = VolumeExport(copy, self.work / "changed.nrrd")
        with self.assertRaises(VolumeChanged):
            prepare_upload((copy, volume_snapshot(ct).content()), changed)
        self.assertEqual(list(self.work.glob("changed*")) + list(self.work.glob(".changed*")), [])

    def test_a_single_slice_result_loads_alone_not_stacked_with_numbered_files_beside_it(self):
        """Slicer's archetype reader, unless told to read one file, stacks a single-slice file with the files of
        its folder whose names differ only in a number (the results folder holds every study's result)."""
        values = np.arange(80, dtype=np.float32).reshape(1, 8, 10)
        original = slicer.util.addVolumeFromArray(values, name="MR slice")
        path = export_volume(original, self.work / "in.nrrd")
        data, header = nrrd.read(str(path), index_order="C")
        for number in (1, 2, 3):  # adl_2 is this study's result; adl_1 and adl_3 are other studies'
            nrrd.write(str(self.work / f"adl_{number}.nrrd"), data + 1000.0 * number, header, index_order="C")
        result = load_result(slicer.mrmlScene, self.work / "adl_2.nrrd", original)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(result), values + 2000.0, atol=1e-4)

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

    def test_the_result_read_in_the_background_is_what_slicers_loader_reads_and_the_gui_step_reads_no_file(self):
        """The result file (written here by Slicer's own storage node, raw and gzip: float32 oblique left-handed,
        int16, uint16 single slice) read in a BackgroundTask (read_result, on the grid of the request's copy of
        the original) holds the voxels and grid Slicer's loader reads (which turns a left-handed grid right-handed
        by reversing k); load_result on the GUI thread then opens no file (the file is gone by then, and no Python
        file or OS call happens) and makes the node load_result made from the file: the original's grid, the
        voxels in its order, its window."""
        ct, short, single = three_volumes(short_slices=3)
        for node in (ct, short, single):
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetAutoWindowLevel(False)
            node.GetDisplayNode().SetWindowLevel(345.0, 67.0)
            for compress in (False, True):
                path = self._slicer_write(node, self.work / f"{node.GetName()}_{compress}.nrrd", compress)
                self.assertIn(b"encoding: gzip" if compress else b"encoding: raw", path.read_bytes()[:1000])
                voxels, matrix = self._slicer_read(path)
                read = read_volume(path)  # the file's own grid
                expected, grid = read.voxels, read.ijk_to_ras.copy()
                if np.linalg.det(grid[:3, :3]) < 0:  # as vtkMRMLVolumeNode::SetIJKCoordinateSystemToRightHanded
                    expected = read.voxels[::-1]
                    grid[:3, 3] += grid[:3, 2] * (read.voxels.shape[0] - 1)
                    grid[:3, 2] *= -1
                self.assertEqual(read.voxels.dtype, voxels.dtype)
                np.testing.assert_array_equal(expected, voxels)
                np.testing.assert_allclose(grid, matrix, atol=1e-6)

                snapshot = volume_snapshot(node)  # the request's copy, taken on the GUI thread
                task = BackgroundTask(lambda report, cancelled, p=path, s=snapshot: read_result(
                    p, (s.voxels.shape, s.ijk_to_ras), report, cancelled), name="read")
                self.assertEqual(task.wait(120), "done", task.error)
                path.unlink()
                with file_events() as seen:
                    before = slicer.mrmlScene.GetNumberOfNodes()
                    result = load_result(slicer.mrmlScene, task.result, node)
                self.assertEqual(seen, [])
                self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
                self.assertTrue(same_grid(result, node))
                self.assertEqual(slicer.util.arrayFromVolume(result).dtype, voxels.dtype)
                np.testing.assert_array_equal(slicer.util.arrayFromVolume(result), slicer.util.arrayFromVolume(node))
                display = result.GetDisplayNode()
                self.assertFalse(display.GetAutoWindowLevel())
                self.assertEqual((display.GetWindow(), display.GetLevel()), (345.0, 67.0))

    def _slicer_write(self, node, path, compress: bool):
        """``node`` written to ``path`` by Slicer's archetype storage node (gzip or raw NRRD); returns ``path``."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(compress)
        self.assertTrue(storage.WriteData(node))
        return path

    def _broken_nrrd_files(self, node) -> dict:
        """NRRD files of ``node`` as Slicer writes them, cut off (raw and gzip), damaged (gzip) and empty: their
        names -> (content, the reason a reader must give)."""
        cases = {}
        for compress in (False, True):
            path = self._slicer_write(node, self.work / f"full_{compress}.nrrd", compress)
            data = path.read_bytes()
            cases[f"cut_{compress}.nrrd"] = (data[: len(data) - 300], "the file is cut off: ")
        middle = len(data) // 2
        cases["damaged.nrrd"] = (data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64])
                                 + data[middle + 64:], "the gzip data is damaged|the file is cut off")
        cases["empty.nrrd"] = (b"", "not a NRRD file")
        return cases

    def test_the_result_a_study_and_a_difference_become_their_nodes_voxels_without_a_second_copy(self):
        """The array read in the background (a result, a review-queue study) or computed there (a difference) is
        the new node's memory (take_voxels), not copied into it: the node's array shares it, the caller's array
        turns read-only, the voxels survive every other reference being dropped (and memory being reused), Slicer's
        storage node writes them, and the array is freed with the node's image data (no leak). Handing the same
        array to a second node, or an array a node cannot take as it is (big-endian, a view), copies it."""
        import gc
        import weakref

        original = oblique_ct_node()
        original.CreateDefaultDisplayNodes()
        path = self._slicer_write(original, self.work / "result.nrrd", compress=True)
        snapshot = volume_snapshot(original)
        task = BackgroundTask(lambda report, cancelled: read_result(path, (snapshot.voxels.shape,
                                                                           snapshot.ijk_to_ras), report, cancelled))
        self.assertEqual(task.wait(120), "done", task.error)
        read = task.result.volume.voxels
        expected = read.copy()
        self.assertTrue(read.flags.writeable)
        result = load_result(slicer.mrmlScene, task.result, original)
        self.assertTrue(np.shares_memory(slicer.util.arrayFromVolume(result), read))
        self.assertFalse(read.flags.writeable)  # written only through the node now
        again = load_result(slicer.mrmlScene, task.result, original)  # the same array again: a copy
        self.assertFalse(np.shares_memory(slicer.util.arrayFromVolume(again), read))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(again), expected)
        alive = weakref.ref(read)
        del task, read
        gc.collect()
        self.assertIsNotNone(alive())  # held by the node's image data
        reused = [np.full(expected.shape, 12345.0, expected.dtype) for _ in range(20)]
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(result), expected)
        self.assertTrue(same_grid(result, original))
        voxels, _ = nrrd.read(str(self._slicer_write(result, self.work / "saved.nrrd", compress=False)))
        np.testing.assert_array_equal(voxels, expected)  # as written by Slicer's storage node
        slicer.util.arrayFromVolume(result)[0, 0, 0] = 7.0  # the node's voxels stay writable through Slicer
        slicer.util.arrayFromVolumeModified(result)
        self.assertEqual(float(slicer.util.arrayFromVolume(result)[0, 0, 0]), 7.0)
        slicer.mrmlScene.RemoveNode(result.GetDisplayNode())
        slicer.mrmlScene.RemoveNode(result)
        del result, reused
        gc.collect()
        self.assertIsNone(alive())  # freed with the node's image data

        # a review-queue study, and a difference computed in the background
        volume = read_study(self._slicer_write(original, self.work / "case_07.nrrd", compress=False), "case_07")
        study = load_study(slicer.mrmlScene, volume, "case_07", (400.0, 40.0))
        self.assertTrue(np.shares_memory(slicer.util.arrayFromVolume(study), volume.voxels))
        denoised = oblique_ct_node("denoised")
        values = difference(*difference_inputs(original, denoised))
        node = difference_volume(slicer.mrmlScene, original, denoised, values=values)
        self.assertTrue(np.shares_memory(slicer.util.arrayFromVolume(node), values))
        # arrays a node cannot take as they are: copied, the same values
        for other in (volume.voxels.astype(volume.voxels.dtype.newbyteorder(">")), np.arange(240.0)[::2].reshape(
                2, 3, 20)):
            copied = load_study(slicer.mrmlScene, type(volume)(other, volume.ijk_to_ras), "other")
            self.assertFalse(np.shares_memory(slicer.util.arrayFromVolume(copied), other))
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(copied), other)

    def test_a_damaged_or_cut_off_result_is_refused_with_a_clear_message_and_the_scene_unchanged(self):
        """A result file cut off (raw, gzip) or damaged is read in the background without an exception (the GUI
        thread first checks the result is for the study selected); load_result then refuses it, saying which file
        and why, and adds nothing to the scene."""
        original = oblique_ct_node()
        cases = self._broken_nrrd_files(original)
        for name, (content, match) in cases.items():
            path = self.work / name
            path.write_bytes(content)
            task = BackgroundTask(lambda report, cancelled, p=path: read_result(p, None, report, cancelled))
            self.assertEqual(task.wait(120), "done", task.error)
            before = slicer.mrmlScene.GetNumberOfNodes()
            with self.assertRaisesRegex(RuntimeError, f"could not read the result {path}: ({match})"):
                load_result(slicer.mrmlScene, task.result, original)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before, name)

    def test_the_difference_comes_from_copies_and_the_blend_is_updated_in_place(self):
        """The difference volume: copies of both volumes taken on the GUI thread (later edits do not reach them),
        subtracted in the background, the node made from the answer equal to the one computed from the nodes; the
        blend slider overwrites the corrected volume's own voxels (the same image data) with the new blend."""
        original = oblique_ct_node()
        values = slicer.util.arrayFromVolume(original).copy()
        smooth = np.where(values > -500, 40.0, -1000.0).astype(np.float32)
        denoised = oblique_ct_node("denoised")
        slicer.util.updateVolumeFromArray(denoised, smooth)
        copies = difference_inputs(original, denoised)
        slicer.util.arrayFromVolume(original)[:] = 0  # an edit after the copies: not in the difference
        slicer.util.arrayFromVolumeModified(original)
        task = BackgroundTask(lambda report, cancelled: difference(*copies), name="difference")
        self.assertEqual(task.wait(120), "done", task.error)
        slicer.util.updateVolumeFromArray(original, values)
        node = difference_volume(slicer.mrmlScene, original, denoised, values=task.result)
        reference = difference_volume(slicer.mrmlScene, original, denoised)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), slicer.util.arrayFromVolume(reference))
        np.testing.assert_allclose(slicer.util.arrayFromVolume(node), values - smooth, atol=1e-4)
        self.assertTrue(same_grid(node, original))
        self.assertEqual((node.GetDisplayNode().GetWindow(), node.GetDisplayNode().GetLevel()), (200.0, 0.0))
        with self.assertRaises(RuntimeError):
            difference_volume(slicer.mrmlScene, original, denoised, values=task.result[1:])
        blended = blended_volume(slicer.mrmlScene, original, denoised, 0.25)
        image = blended.GetImageData()
        for strength in (0.6, 0.0, 1.0):
            tracemalloc.start()
            self.assertIs(blended_volume(slicer.mrmlScene, original, denoised, strength, node=blended), blended)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            self.assertLess(peak, values.nbytes / 2)  # no volume-sized array: one slice's scratch
            self.assertIs(blended.GetImageData(), image)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(blended), (
                strength * smooth + (1.0 - strength) * values).astype(np.float32))

    def test_the_difference_runs_beside_a_running_request_without_touching_it(self):
        """Difference volume while a request runs (the widget allows one request at a time): the difference is
        computed from copies in a LocalTasks task of its own, its node made when polled, while the request's task
        keeps running untouched and ends with its own answer afterwards; a second difference is refused while the
        first runs; Close Scene (cancel_all) drops a difference not taken yet."""
        import threading

        from ADLDenoiseLib.background import LocalTasks

        original = oblique_ct_node()
        denoised = oblique_ct_node("denoised")
        slicer.util.updateVolumeFromArray(denoised, np.where(slicer.util.arrayFromVolume(original) > -500, 40.0,
                                                             -1000.0).astype(np.float32))
        expected = slicer.util.arrayFromVolume(original) - slicer.util.arrayFromVolume(denoised)
        release = threading.Event()
        request = BackgroundTask(lambda report, cancelled: release.wait(120) and "the request's answer",
                                 name="request")
        local = LocalTasks()
        made = []
        copies = difference_inputs(original, denoised)
        local.start("difference", lambda report, cancelled: difference(*copies),
                    lambda values: made.append(difference_volume(slicer.mrmlScene, original, denoised, values=values)))
        with self.assertRaisesRegex(RuntimeError, "still being computed"):
            local.start("difference", lambda report, cancelled: None, made.append)
        for _ in range(1200):
            if made or local.poll():
                break
            threading.Event().wait(0.1)
        self.assertEqual(len(made), 1)
        self.assertFalse(local.busy)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(made[0]), expected, atol=1e-4)
        self.assertEqual((request.state, request.result, request.error), ("running", None, None))
        self.assertFalse(request.finished)
        release.set()
        self.assertEqual(request.wait(120), "done")
        self.assertEqual(request.result, "the request's answer")
        # Close Scene: a difference that came back but was not taken is dropped
        late = local.start("difference", lambda report, cancelled: difference(*copies), made.append)
        self.assertEqual(late.wait(120), "done")
        local.cancel_all()
        self.assertEqual((local.poll(), local.busy, len(made)), ([], False, 1))

    def _slicer_read(self, path):
        """(voxels, IJK-to-RAS 4x4) of the file ``path`` as Slicer's archetype storage node reads it (this file
        alone), into a node outside the scene."""
        import vtk

        node = slicer.vtkMRMLScalarVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetSingleFile(1)
        self.assertTrue(storage.ReadData(node), path)
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return (slicer.util.arrayFromVolume(node).copy(),
                np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]))

    def _slicer_load(self, path, name: str):
        """The node ``slicer.util.loadVolume(path, {"singleFile": True})`` makes (in the scene, read by Slicer's
        archetype storage node: right-handed IJK, this file alone) with Slicer's automatic window/level."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        storage.SetSingleFile(1)
        node.SetAndObserveStorageNodeID(storage.GetID())
        self.assertTrue(storage.ReadData(node), path)
        node.CreateDefaultDisplayNodes()
        return node

    def test_a_review_queue_study_is_read_in_the_background_as_slicers_loader_reads_it(self):
        """Next study: the downloaded file (written here by Slicer's storage node, raw and gzip: float32 oblique
        left-handed, int16, a uint16 single slice with numbered files beside it) is read in a BackgroundTask
        (read_study, and its window: auto_window); load_study on the GUI thread then opens no file (the file is
        gone by then, no Python file or OS call happens) and makes the node slicer.util.loadVolume made of the
        file: same voxels, scalar type, right-handed grid, so the same content identity (the server's id is
        recorded for it), named after the server's id; its window is Slicer's automatic one, set, not computed
        on the GUI thread."""
        ct, short, single = three_volumes(short_slices=3)
        for number, node in enumerate((ct, short, single)):
            for compress in (False, True):
                path = self.work / f"studies_{number}_{compress}" / "case_07.nrrd"
                path.parent.mkdir()
                storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
                storage.SetUseCompression(compress)
                if node is single:  # other studies' files beside it: the archetype reader would stack them
                    for other, offset in (("case_06.nrrd", 1000), ("case_08.nrrd", 2000)):
                        storage.SetFileName(str(path.with_name(other)))
                        self.assertTrue(storage.WriteData(slicer.util.addVolumeFromArray(
                            slicer.util.arrayFromVolume(node) + offset, name=other)))
                storage.SetFileName(str(path))
                self.assertTrue(storage.WriteData(node))
                loaded = self._slicer_load(path, "case_07")
                expected = volume_snapshot(loaded)

                def fetch(report, cancelled, p=path):
                    volume = read_study(p, "case_07", report, cancelled)
                    return volume, auto_window(volume.voxels)

                task = BackgroundTask(fetch, name="next study")
                self.assertEqual(task.wait(120), "done", task.error)
                path.unlink()
                with file_events() as seen:
                    before = slicer.mrmlScene.GetNumberOfNodes()
                    study = load_study(slicer.mrmlScene, *task.result[:1], "case_07", task.result[1])
                self.assertEqual(seen, [])
                self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before + 2)  # the volume and its display
                self.assertEqual(study.GetName(), "case_07")
                voxels = slicer.util.arrayFromVolume(study)
                self.assertEqual(voxels.dtype, expected.voxels.dtype)
                np.testing.assert_array_equal(voxels, expected.voxels)
                np.testing.assert_allclose(volume_snapshot(study).ijk_to_ras, expected.ijk_to_ras, atol=1e-6)
                self.assertEqual(volume_snapshot(study).content().key, expected.content().key)
                display, auto = study.GetDisplayNode(), loaded.GetDisplayNode()
                self.assertFalse(display.GetAutoWindowLevel())
                self.assertTrue(auto.GetAutoWindowLevel())
                span = float(expected.voxels.max()) - float(expected.voxels.min())
                self.assertAlmostEqual(display.GetWindow(), auto.GetWindow(), delta=0.02 * span)
                self.assertAlmostEqual(display.GetLevel(), auto.GetLevel(), delta=0.02 * span)

    def test_a_review_queue_studys_identity_is_hashed_when_read_and_the_gui_step_neither_copies_nor_hashes(self):
        """Next study: the study's content identity is hashed in the background task that reads its file
        (study_content, in the task's thread); on the GUI thread load_study makes the node and loaded_identity hands
        on that identity after checking the node's type, shape and grid, without copying the voxels (peak of
        Python allocations under half the volume's bytes) and without hashing them (no content_identity call, no
        SHA-256 update on that thread). The identity is exactly the one the node was identified by before (a copy
        of the node hashed: volume_snapshot, content_identity_of), name and datastore id included, for a float32
        oblique left-handed CT, an int16 MR, a uint16 single slice, raw and gzip; a node whose name or grid is not
        the one hashed gets None (identified from a copy then)."""
        import hashlib
        import threading

        ct, short, single = three_volumes(short_slices=3)
        big = slicer.util.addVolumeFromArray(np.arange(24 * 96 * 80, dtype=np.int16).reshape(24, 96, 80),
                                             name="big MR")
        big.SetSpacing(0.83, 0.83, 1.7)
        hashing = []  # (thread name, what) of every content_identity call and SHA-256 update

        def watch(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "content_identity":
                hashing.append((threading.current_thread().name, "content_identity"))
            elif event == "c_call" and getattr(arg, "__name__", "") == "update" and \
                    isinstance(getattr(arg, "__self__", None), type(hashlib.sha256())):
                hashing.append((threading.current_thread().name, "sha256.update"))

        for number, node in enumerate((ct, short, single, big)):
            for compress in (False, True):
                path = self._slicer_write(node, self.work / f"queue_{number}_{compress}.nrrd", compress)
                hashing.clear()
                threading.setprofile(watch)
                try:
                    task = BackgroundTask(lambda report, cancelled, p=path: (
                        lambda volume: (volume, study_content(volume, "case_07")))(
                            read_study(p, "case_07", report, cancelled)), name="next study")
                    self.assertEqual(task.wait(120), "done", task.error)
                finally:
                    threading.setprofile(None)
                self.assertIn(("next study", "content_identity"), hashing)
                volume, content = task.result
                hashing.clear()
                tracemalloc.start()
                sys.setprofile(watch)
                try:
                    study = load_study(slicer.mrmlScene, volume, "case_07", (400.0, 40.0))
                    identity = loaded_identity(study, volume, content)
                finally:
                    sys.setprofile(None)
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                self.assertEqual(hashing, [], "the GUI step hashed the voxels")
                if node is big:
                    self.assertLess(peak, volume.voxels.nbytes / 2, "the GUI step copied the voxels")
                self.assertIs(identity, content)
                before = volume_snapshot(study).content()  # how the node was identified before: a copy, hashed
                self.assertEqual(identity, before)
                self.assertEqual(identity, content_identity_of(study))
                self.assertEqual((identity.key, identity.frame, identity.name, identity.datastore_id()),
                                 (before.key, before.frame, before.name, before.datastore_id()))
                # not the node hashed: another name, another grid (the identity would not be the node's)
                self.assertIsNone(loaded_identity(study, volume, study_content(volume, "case_08")))
                moved = volume_files_array(volume.voxels, volume.ijk_to_ras.copy())
                moved.ijk_to_ras[0, 3] += 0.01
                self.assertIsNone(loaded_identity(study, moved, study_content(moved, "case_07")))
                study.SetSpacing(2.0, 2.0, 2.0)
                self.assertIsNone(loaded_identity(study, volume, content))

    def test_node_grid_is_the_matrix_a_new_volume_node_reports_bit_for_bit(self):
        """volume_files.node_grid (what the background hashes as a study's grid) equals, byte for byte, the
        IJK-to-RAS matrix a new Slicer volume node reports once given a matrix: oblique, left-handed, with -0.0
        (a reversed axis: right_handed), elements and spacings within double epsilon of the identity's, random."""
        from ADLDenoiseLib.mrml import _ijk_to_ras, _vtk_matrix
        from ADLDenoiseLib.review_session import hashed_grid
        from ADLDenoiseLib.volume_files import node_grid

        eps = np.finfo(np.float64).eps
        flipped = np.diag([-0.7, -0.7, -2.5, 1.0])
        flipped[:3, 3] = flipped[1, 0] = flipped[2, 1] = -0.0
        matrices = [np.eye(4), flipped,
                    np.array([[-0.0, 0.7, -0.0, -0.0], [0.8, -0.0, -0.0, 5.0], [-0.0, -0.0, -2.5, -0.0], [0, 0, 0, 1]]),
                    np.array([[1 - eps / 4, eps / 8, -eps / 8, eps / 4], [-eps / 8, 1.0, 0.0, -eps / 4],
                              [0.0, 0.0, 1 + eps, 0.0], [0, 0, 0, 1]])]
        rng = np.random.default_rng(3)
        for _ in range(200):
            q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            matrix = np.eye(4)
            matrix[:3, :3] = q @ np.diag(rng.uniform(0.2, 5.0, 3))
            matrix[:3, 3] = rng.uniform(-300, 300, 3).round(rng.integers(0, 8))
            matrices.append(matrix)
        for volume in three_volumes(short_slices=2):
            matrices.append(read_study(self._slicer_write(volume, self.work / "grid.nrrd", False)).ijk_to_ras)
        for matrix in matrices:
            node = slicer.vtkMRMLScalarVolumeNode()
            node.SetIJKToRASMatrix(_vtk_matrix(matrix))
            self.assertEqual(node_grid(matrix).tobytes(), _ijk_to_ras(node).tobytes(), matrix)
            self.assertEqual(hashed_grid(node_grid(matrix)), hashed_grid(_ijk_to_ras(node)))

    def test_an_unreadable_review_queue_study_fails_in_the_background_with_a_clear_message(self):
        """A downloaded study cut off (raw, gzip), damaged, empty, missing or of 64-bit integers fails its
        background task with "could not read the study <id> (<file>) the server sent: <reason>": nothing reaches
        the GUI thread, so the scene is unchanged."""
        original = oblique_ct_node()
        cases = self._broken_nrrd_files(original)
        cases["missing.nrrd"] = (None, "No such file")
        write_nrrd(np.zeros((2, 3, 4), np.int64), np.eye(4), self.work / "wide.nrrd")
        cases["wide.nrrd"] = (None, "its voxels are int64, a type Slicer does not show")
        before = slicer.mrmlScene.GetNumberOfNodes()
        for name, (content, match) in cases.items():
            path = self.work / name
            if content is not None:
                path.write_bytes(content)
            task = BackgroundTask(lambda report, cancelled, p=path: read_study(p, "case_07", report, cancelled))
            self.assertEqual(task.wait(120), "failed", name)
            self.assertIsInstance(task.error, VolumeUnreadable)
            self.assertRegex(str(task.error), f"^could not read the study case_07 \\({name}\\) the server sent: "
                             f"({match})")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def _made_from_arrays(self):
        """The volumes the module makes from arrays: a result (read in the background), a difference, a blended
        correction, a review-queue study; with the original (an array too)."""
        original = oblique_ct_node()
        path = export_volume(original, self.work / "server" / "result.nrrd")
        values = slicer.util.arrayFromVolume(original).copy()
        data = np.where(values > -500, 40.0, -1000.0).astype(np.float32)
        write_nrrd(data, read_volume(path).ijk_to_ras, path)
        result = load_result(slicer.mrmlScene, read_result(path, (values.shape, volume_snapshot(original).ijk_to_ras)),
                             original)
        path.unlink()
        made = {"result": result,
                "difference": difference_volume(slicer.mrmlScene, original, result),
                "corrected": blended_volume(slicer.mrmlScene, original, result, 0.5)}
        export_volume(original, self.work / "server" / "case_07.nrrd")
        volume = read_study(self.work / "server" / "case_07.nrrd", "case_07")
        made["study"] = load_study(slicer.mrmlScene, volume, "case_07", auto_window(volume.voxels))
        (self.work / "server" / "case_07.nrrd").unlink()
        return original, made

    def _same_volume_in(self, path, node) -> None:
        """The file ``path`` holds ``node``'s voxels and grid (Slicer writes and reads it right-handed: put back in
        the node's voxel order first)."""
        read = read_volume(path)
        voxels = slicer.util.arrayFromVolume(node)
        aligned = align_to_grid(read.voxels, read.ijk_to_ras, voxels.shape, volume_copy(node).ijk_to_ras)
        self.assertIsNotNone(aligned, path)
        self.assertEqual(aligned.dtype, voxels.dtype)
        np.testing.assert_array_equal(aligned, voxels)

    def test_volumes_made_from_arrays_are_written_by_slicers_save_with_its_default_storage_node(self):
        """A result, difference, corrected volume and review-queue study made from arrays have no storage node;
        Slicer's Save gives them its default one and writes them (checked against Slicer's sources:
        qSlicerSaveDataDialog lists a storable node unless hidden from editors or not saved with the scene,
        nodeFileInfo calls AddDefaultStorageNode, the row is ticked when GetModifiedSinceRead, qSlicerNodeWriter
        sets the file name and calls WriteData; a scene bundle (.mrb) calls AddDefaultStorageNode in
        vtkMRMLScene::SaveStorableNodeToSlicerDataBundleDirectory): both write the volume the node holds. A node
        Slicer's loader read is not ticked (not modified since read): what the review-queue study was before."""
        original, made = self._made_from_arrays()
        for kind, node in made.items():
            self.assertIsNone(node.GetStorageNode(), kind)
            self.assertFalse(node.GetHideFromEditors(), kind)
            self.assertTrue(node.GetSaveWithScene(), kind)
            self.assertTrue(node.GetModifiedSinceRead(), kind)  # ticked in the Save dialog
        # the Save dialog, then the node writer
        saved = self.work / "saved"
        for kind, node in made.items():
            self.assertTrue(node.AddDefaultStorageNode(), kind)
            storage = node.GetStorageNode()
            self.assertEqual(storage.GetClassName(), "vtkMRMLVolumeArchetypeStorageNode")
            self.assertEqual(storage.GetDefaultWriteFileExtension(), "nrrd")
            storage.SetFileName(str(saved / f"{kind}.nrrd"))
            saved.mkdir(exist_ok=True)
            self.assertTrue(storage.WriteData(node), kind)
            self.assertFalse(node.GetModifiedSinceRead(), kind)
            self._same_volume_in(saved / f"{kind}.nrrd", node)
        # a scene bundle, from nodes with no storage node again
        slicer.mrmlScene.Clear(0)
        original, made = self._made_from_arrays()
        bundle = self.work / "bundle"
        bundle.mkdir()  # (the Save dialog's .mrb writer makes it in a temporary folder)
        self.assertTrue(slicer.mrmlScene.SaveSceneToSlicerDataBundleDirectory(str(bundle)))
        for kind, node in made.items():
            self.assertIsNotNone(node.GetStorageNode(), kind)
            self._same_volume_in(bundle / "Data" / f"{node.GetName()}.nrrd", node)
        # what Slicer's loader made of the downloaded study: its storage node names the file, and it is not ticked
        export_volume(original, self.work / "studies" / "case_07.nrrd")
        loaded = self._slicer_load(self.work / "studies" / "case_07.nrrd", "case_07")
        self.assertFalse(loaded.GetModifiedSinceRead())

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

    def test_roi_statistics_follow_the_volumes_transform_and_the_rois_rotation(self):
        """The voxels measured are those whose centres Slicer shows inside the ROI: checked voxel by voxel against
        vtkMRMLMarkupsROINode.IsPointInROIWorld at each centre mapped to world by the transform node itself."""
        import vtk

        original = oblique_ct_node()
        denoised = oblique_ct_node("denoised")  # the same grid, other values
        slicer.util.updateVolumeFromArray(denoised, np.where(slicer.util.arrayFromVolume(original) > -500, 40.0,
                                                             -1000.0).astype(np.float32))
        tilt = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "acquisition transform")
        to_parent = vtk.vtkTransform()
        to_parent.Translate(7.3, -4.1, 12.6)
        to_parent.RotateX(17.0)
        to_parent.RotateZ(-9.0)
        tilt.SetMatrixTransformToParent(to_parent.GetMatrix())
        for node in (original, denoised):
            node.SetAndObserveTransformNodeID(tilt.GetID())
        ijk_to_ras = vtk.vtkMatrix4x4()
        original.GetIJKToRASMatrix(ijk_to_ras)
        to_world = vtk.vtkGeneralTransform()
        tilt.GetTransformToWorld(to_world)
        centre = to_world.TransformPoint(ijk_to_ras.MultiplyPoint((24.3, 19.6, 2.7, 1.0))[:3])
        # a rotated box, itself under a transform of its own
        shift = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ROI shift")
        moved = vtk.vtkTransform()
        moved.Translate(-1.2, 0.7, 0.4)
        shift.SetMatrixTransformToParent(moved.GetMatrix())
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetAndObserveTransformNodeID(shift.GetID())
        object_to_node = vtk.vtkTransform()
        object_to_node.Translate(centre[0] + 1.2, centre[1] - 0.7, centre[2] - 0.4)
        object_to_node.RotateWXYZ(35.0, 1.0, 2.0, 3.0)
        roi.SetAndObserveObjectToNodeMatrix(object_to_node.GetMatrix())
        roi.SetSize(9.5, 5.5, 6.3)

        shape = slicer.util.arrayFromVolume(original).shape
        expected = np.zeros(shape, bool)
        for k, j, i in np.ndindex(*shape):
            ras = ijk_to_ras.MultiplyPoint((float(i), float(j), float(k), 1.0))[:3]
            expected[k, j, i] = roi.IsPointInROIWorld(to_world.TransformPoint(ras))
        self.assertGreater(int(expected.sum()), 30)
        self.assertGreater(len(np.unique(np.nonzero(expected)[0])), 1)  # the box spans slices
        np.testing.assert_array_equal(roi_mask(original, roi), expected)
        stats = roi_statistics_for_roi_node(original, denoised, roi)
        self.assertEqual(stats, roi_statistics(slicer.util.arrayFromVolume(original),
                                               slicer.util.arrayFromVolume(denoised), expected))
        # an ROI outside the volume: no voxel (too few to measure)
        roi.SetCenterWorld(1000.0, 1000.0, 1000.0)
        self.assertFalse(roi_mask(original, roi).any())
        # a warped volume has no box of voxels to measure: refused, clearly
        warp = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
        for node in (original, denoised):
            node.SetAndObserveTransformNodeID(warp.GetID())
        with self.assertRaisesRegex(RuntimeError, "non-linear transform warp"):
            roi_statistics_for_roi_node(original, denoised, roi)

    def test_volumes_made_by_the_module_are_tagged_and_refused_as_a_study(self):
        """A result, correction or difference volume is a plain scalar volume the input selector offers: taken for
        a study it would be uploaded as a patient's original (its content hash is a new identity)."""
        original = as_dicom_series(oblique_ct_node("3: CT HEAD"), "1.2.840.99.7", "CT")
        result = load_result(slicer.mrmlScene, export_volume(original, self.work / "in.nrrd"), original,
                             study="3_CT_HEAD_study")
        corrected = blended_volume(slicer.mrmlScene, original, result, 0.5)
        made = ((result, "result"), (corrected, "corrected"),
                (difference_volume(slicer.mrmlScene, original, result), "difference"))
        for node, kind in made:
            self.assertEqual(node.GetAttribute(DERIVED_ATTRIBUTE), kind)
            self.assertEqual(node.GetNodeReference(DERIVED_FROM_ROLE).GetID(), original.GetID())
            self.assertEqual(node.GetAttribute(STUDY_ATTRIBUTE), "3_CT_HEAD_study")  # from the result
            with self.assertRaisesRegex(WorkflowError, rf"{kind} volume made by ADL Denoise, not a study: select the "
                                                       r"original \(3: CT HEAD\)"):
                study_identity(node)
        self.assertEqual(study_identity(original).kind, "dicom")
        self.assertEqual(study_identity(oblique_ct_node("plain")).kind, "content")
        blended_volume(slicer.mrmlScene, original, result, 0.8, node=corrected)  # updated in place: still tagged
        with self.assertRaises(WorkflowError):
            study_identity(corrected)
        legacy = oblique_ct_node("result of an earlier version")  # only the study attribute
        legacy.SetAttribute(STUDY_ATTRIBUTE, "3_CT_HEAD_study")
        with self.assertRaisesRegex(WorkflowError, "result volume made by ADL Denoise"):
            study_identity(legacy)
        # the original deleted: the reference goes with it (no stale ID), the refusal stays
        slicer.mrmlScene.RemoveNode(original)
        self.assertIsNone(result.GetNodeReference(DERIVED_FROM_ROLE))
        with self.assertRaisesRegex(WorkflowError, "select the original$"):
            study_identity(result)

    def test_a_result_denoised_from_wrong_values_notes_it_and_so_do_the_volumes_made_from_it(self):
        """A DICOM volume whose files' frames carry their own rescale that Slicer's reader ignored (the session
        knows them from the files check) holds wrong values, and so does its result: ADLDenoiseLogic.load_result
        hands the session's result_warning to load_result, which notes it on the node (WRONG_VALUES_ATTRIBUTE and
        the description, which the Data module shows); the corrected and difference volumes made from it carry
        it too. A result without the warning notes nothing, and the correction node blended again from it loses
        the note (a description of the user's own is kept)."""
        node = as_dicom_series(oblique_ct_node("5: Enhanced CT"), "1.2.840.99.9", "CT", "1.2.840.99.9.1")
        session = ReviewSession(self.work / "tmp")
        frames = IgnoredRescale("enhanced.dcm", (3, 4), 6, (1.0, -1024.0), ((2.0, -1024.0),))
        identity = session.as_loaded(study_identity(node), content_identity_of(node),
                                     lambda: FilesCheck(True, "", (frames,)))
        self.assertEqual(identity.kind, "dicom")
        warning = session.result_warning(identity)
        self.assertTrue(warning.startswith("WARNING: denoised from wrong values: frames 3-4 of enhanced.dcm"))
        path = export_volume(node, self.work / "in.nrrd")
        result = load_result(slicer.mrmlScene, path, node, study=identity.datastore_id(), warning=warning)
        corrected = blended_volume(slicer.mrmlScene, node, result, 0.5)
        made = (result, corrected, difference_volume(slicer.mrmlScene, node, result))
        for volume in made:
            self.assertEqual(volume.GetAttribute(WRONG_VALUES_ATTRIBUTE), warning)
            self.assertEqual(volume.GetDescription(), warning)
        self.assertIsNone(node.GetAttribute(WRONG_VALUES_ATTRIBUTE))  # the original is noted by the status line
        # a result of a volume without wrong values: nothing noted; the correction node reused loses the note
        plain = oblique_ct_node("plain")
        self.assertEqual(session.result_warning(study_identity(plain)), "")
        clean = load_result(slicer.mrmlScene, path, node, study=identity.datastore_id(),
                            warning=session.result_warning(study_identity(plain)))
        self.assertIsNone(clean.GetAttribute(WRONG_VALUES_ATTRIBUTE))
        self.assertFalse(clean.GetDescription())
        blended_volume(slicer.mrmlScene, node, clean, 0.7, node=corrected)
        self.assertIsNone(corrected.GetAttribute(WRONG_VALUES_ATTRIBUTE))
        self.assertFalse(corrected.GetDescription())
        blended_volume(slicer.mrmlScene, node, result, 0.7, node=corrected)  # from the wrong result again
        self.assertEqual(corrected.GetAttribute(WRONG_VALUES_ATTRIBUTE), warning)
        corrected.SetDescription("checked by Dr A")
        blended_volume(slicer.mrmlScene, node, clean, 0.6, node=corrected)
        self.assertIsNone(corrected.GetAttribute(WRONG_VALUES_ATTRIBUTE))
        self.assertEqual(corrected.GetDescription(), "checked by Dr A")

    def test_a_segmentation_drawn_on_another_study_is_refused_as_marked_regions(self):
        """The export resamples any segmentation onto the original's grid: only one drawn on the original, on a
        volume made from it for this study, or on another node of the same study may be sent as its regions."""
        original = oblique_ct_node("patient A CT")
        study = study_identity(original).datastore_id()
        result = load_result(slicer.mrmlScene, export_volume(original, self.work / "a.nrrd"), original, study=study)

        def drawn_on(volume=None):
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "marks")
            if volume is not None:
                segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            return segmentation

        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(drawn_on(original).GetNodeReference(role).GetID(), original.GetID())
        accepted = (original, result, blended_volume(slicer.mrmlScene, original, result, 0.5),
                    difference_volume(slicer.mrmlScene, original, result),
                    oblique_ct_node("patient A CT, loaded again"))  # identical voxels on the same grid
        for volume in accepted:
            check_segmentation_reference(drawn_on(volume), original, study)
        series = as_dicom_series(oblique_ct_node("4: CT"), "1.2.840.99.4", "CT")
        twin = as_dicom_series(oblique_ct_node("4: CT"), "1.2.840.99.4", "CT")  # the same series, loaded twice
        twin.SetOrigin(0.0, 0.0, 0.0)
        with self.assertRaisesRegex(RegionsError, "was drawn on 4: CT, not on 4: CT"):  # same UID, other grid
            check_segmentation_reference(drawn_on(twin), series)
        twin.SetOrigin(series.GetOrigin())
        check_segmentation_reference(drawn_on(twin), series)

        other = oblique_ct_node("patient B CT")
        other.SetOrigin(3.0, -2.0, 40.0)
        same_grid_other_voxels = oblique_ct_node("patient C CT")
        slicer.util.updateVolumeFromArray(same_grid_other_voxels, slicer.util.arrayFromVolume(original) + 1.0)
        result_of_other = load_result(slicer.mrmlScene, export_volume(other, self.work / "b.nrrd"), other)
        refused = {other: "patient B CT", same_grid_other_voxels: "patient C CT",
                   result_of_other: "patient B CT denoised"}
        for volume, name in refused.items():
            with self.assertRaisesRegex(RegionsError, f"was drawn on {name}, not on patient A CT or a volume made"):
                check_segmentation_reference(drawn_on(volume), original, study)
        # a result of the same node for another study (a 4D proxy node showing another frame now)
        with self.assertRaisesRegex(RegionsError, "drawn on patient A CT denoised"):
            check_segmentation_reference(drawn_on(result), original, "patient_A_frame_2")
        with self.assertRaisesRegex(RegionsError, "names no volume it was drawn on.*Specify geometry"):
            check_segmentation_reference(drawn_on(None), original, study)


def as_dicom_series(node, series_uid: str, modality: str, instance_uids: str = ""):
    """What Slicer's DICOM import does (DICOMLib/DICOMPlugin.addSeriesInSubjectHierarchy): a subject-hierarchy
    item for the node with the UID "DICOM", the attribute "DICOM.Modality" and, when given, the UID
    "DICOMInstanceUID" (the SOP Instance UIDs of the loadable's files, space-separated)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    hierarchy.SetItemUID(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMUIDName(), series_uid)
    hierarchy.SetItemAttribute(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(),
                               modality)
    if instance_uids:
        hierarchy.SetItemUID(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMInstanceUIDName(), instance_uids)
    return node


def perfusion_sequence():
    """A 3-frame sequence (frame k: voxels k, index "time" 0 / 2.5 / 5 s) in a browser showing frame 1: (sequence,
    browser, the Sequences logic, the proxy node the browser copies the shown frame into)."""
    slicer.mrmlScene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
    sequence = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceNode", "perfusion")
    for frame in range(3):
        volume = slicer.vtkMRMLScalarVolumeNode()
        slicer.util.updateVolumeFromArray(volume, np.full((2, 3, 4), frame, np.float32))
        sequence.SetDataNodeAtValue(volume, str(frame * 2.5))
    browser = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(slicer.mrmlScene)
    browser.SetSelectedItemNumber(1)
    logic.UpdateProxyNodesFromSequences(browser)
    return sequence, browser, logic, browser.GetProxyNode(sequence)


class StudyIdentityTest(unittest.TestCase):
    """Study identity, scalar-only volumes, parent transforms, sequence frames, linked views, scene close."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)
        self.work = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)  # its volumes: not left in /tmp

    def test_identity_comes_from_the_subject_hierarchy_series_not_the_node_name(self):
        a = as_dicom_series(oblique_ct_node("3: CT HEAD"), "1.2.840.99.1", "CT")
        b = as_dicom_series(oblique_ct_node("3: CT HEAD"), "1.2.840.99.2", "CT")  # same name and voxels
        self.assertEqual(a.GetAttribute("DICOM.Modality"), None)  # the node attribute is not where it lives
        ida, idb = study_identity(a), study_identity(b)
        self.assertEqual((ida.kind, ida.key, ida.modality), ("dicom", "1.2.840.99.1", "CT"))
        self.assertNotEqual(ida.datastore_id(), idb.datastore_id())
        # one series loaded as two volumes (subseries, e.g. two acquisitions): same series UID, other files
        pre = as_dicom_series(oblique_ct_node("4: CT"), "1.2.840.99.3", "CT", "1.2.840.99.3.1 1.2.840.99.3.2")
        post = as_dicom_series(oblique_ct_node("4: CT"), "1.2.840.99.3", "CT", "1.2.840.99.3.3 1.2.840.99.3.4")
        again = as_dicom_series(oblique_ct_node("4: CT"), "1.2.840.99.3", "CT", "1.2.840.99.3.2 1.2.840.99.3.1")
        self.assertEqual(study_identity(pre).key, study_identity(post).key)
        self.assertNotEqual(study_identity(pre), study_identity(post))
        self.assertNotEqual(study_identity(pre).datastore_id(), study_identity(post).datastore_id())
        self.assertEqual(study_identity(pre), study_identity(again))  # the same files loaded again
        # without DICOM: a content hash of voxels + geometry; same content -> same identity, moved -> another
        c, d = oblique_ct_node("phantom"), oblique_ct_node("phantom")
        self.assertEqual(study_identity(c).kind, "content")
        self.assertEqual(study_identity(c), study_identity(d))
        d.SetOrigin(0.0, 0.0, 0.0)
        self.assertNotEqual(study_identity(c), study_identity(d))
        values = slicer.util.arrayFromVolume(c)
        values[0, 0, 0] += 1.0
        slicer.util.arrayFromVolumeModified(c)
        self.assertNotEqual(study_identity(c), study_identity(oblique_ct_node("phantom")))

    def test_only_single_component_scalar_volumes_are_accepted(self):
        self.assertTrue(is_plain_scalar_volume(oblique_ct_node()))
        for cls in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode",
                    "vtkMRMLDiffusionTensorVolumeNode"):
            node = slicer.mrmlScene.AddNewNodeByClass(cls)
            self.assertIsNotNone(node, cls)
            self.assertFalse(is_plain_scalar_volume(node), cls)
        import vtk

        image = vtk.vtkImageData()
        image.SetDimensions(4, 3, 2)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)  # RGB voxels held in a plain scalar volume node
        rgb = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "rgb in a scalar node")
        rgb.SetAndObserveImageData(image)
        self.assertFalse(is_plain_scalar_volume(rgb))
        with self.assertRaises(ValueError):
            study_identity(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"))

    def test_results_blends_and_differences_go_under_the_originals_parent_transform(self):
        original = oblique_ct_node()
        tilt = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "gantry tilt")
        original.SetAndObserveTransformNodeID(tilt.GetID())
        path = export_volume(original, self.work / "in.nrrd")
        result = load_result(slicer.mrmlScene, path, original)
        for node in (result, blended_volume(slicer.mrmlScene, original, result, 0.5),
                     difference_volume(slicer.mrmlScene, original, result)):
            self.assertIsNotNone(node.GetParentTransformNode())
            self.assertEqual(node.GetParentTransformNode().GetID(), tilt.GetID())
        plain = oblique_ct_node("no transform")
        other = oblique_ct_node("was under a transform")
        other.SetAndObserveTransformNodeID(tilt.GetID())
        adopt_parent_transform(other, plain)
        self.assertIsNone(other.GetParentTransformNode())

    def test_results_blends_and_differences_stay_in_the_originals_study_without_its_series_uid(self):
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        studies = {}
        for patient in ("patient A", "patient B"):  # two patients loaded from DICOM, one series each
            subject = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), patient)
            studies[patient] = hierarchy.CreateStudyItem(subject, f"CT study of {patient}")
        other = as_dicom_series(oblique_ct_node("2: CT CHEST"), "1.2.840.99.8", "CT")
        hierarchy.SetItemParent(hierarchy.GetItemByDataNode(other), studies["patient B"])
        original = as_dicom_series(oblique_ct_node("3: CT HEAD"), "1.2.840.99.7", "CT")
        hierarchy.SetItemParent(hierarchy.GetItemByDataNode(original), studies["patient A"])
        result = load_result(slicer.mrmlScene, export_volume(original, self.work / "in.nrrd"), original)
        blend = blended_volume(slicer.mrmlScene, original, result, 0.5)
        derived = (result, blend, difference_volume(slicer.mrmlScene, original, result),
                   blended_volume(slicer.mrmlScene, original, result, 0.7, node=blend))  # updated in place
        for node in derived:
            item = hierarchy.GetItemByDataNode(node)
            self.assertTrue(item, node.GetName())
            self.assertEqual(hierarchy.GetItemParent(item), studies["patient A"], node.GetName())
            # not that series: no series UID or modality of the original, so its identity is its content
            self.assertEqual(hierarchy.GetItemUID(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMUIDName()), "")
            with self.assertRaises(WorkflowError):  # nor is it a study of its own
                study_identity(node)
        # in Slicer the subject-hierarchy plugins give every added volume an item at the top level first: moved
        moved = oblique_ct_node("item made on adding")
        hierarchy.CreateItem(hierarchy.GetSceneItemID(), moved)
        adopt_study_folder(moved, original)
        self.assertEqual(hierarchy.GetItemParent(hierarchy.GetItemByDataNode(moved)), studies["patient A"])
        # an original outside any study (loaded from a file): the derived volume goes to the top level
        plain = oblique_ct_node("from a file")
        hierarchy.CreateItem(hierarchy.GetSceneItemID(), plain)
        difference = difference_volume(slicer.mrmlScene, plain, plain)
        self.assertEqual(hierarchy.GetItemParent(hierarchy.GetItemByDataNode(difference)), hierarchy.GetSceneItemID())

    def test_a_sequence_frame_is_named_and_part_of_the_identity(self):
        sequence, browser, logic, proxy = perfusion_sequence()
        info = sequence_frame(proxy)
        self.assertEqual((info["frame"], info["count"]), (1, 3))
        self.assertEqual(info["index"], "time = 2.5 s")
        self.assertIsNone(sequence_frame(oblique_ct_node()))
        as_dicom_series(sequence, "1.2.840.99.7", "MR")  # the series item of a 4D DICOM load is the sequence's
        frame1 = study_identity(proxy)
        self.assertEqual((frame1.kind, frame1.key, frame1.frame, frame1.modality), ("dicom", "1.2.840.99.7", 1, "MR"))
        browser.SetSelectedItemNumber(2)
        logic.UpdateProxyNodesFromSequences(browser)
        self.assertEqual(study_identity(proxy).frame, 2)
        self.assertNotEqual(study_identity(proxy).datastore_id(), frame1.datastore_id())

    def test_a_frame_change_or_new_voxels_in_the_selected_node_make_the_session_identify_it_again(self):
        """The widget watches the selected node for INPUT_CHANGE_EVENTS (the sequence browser copies each frame into
        the same proxy node, so no other node is selected): frame 1's blend must not survive into frame 2, nor
        be submitted as frame 1's after stepping back."""
        sequence, browser, logic, proxy = perfusion_sequence()

        session = ReviewSession(self.work / "tmp")
        fired = []

        def modified(caller, event):  # what the widget's onInputModified does
            fired.append(event)
            session.input_modified()

        tags = [proxy.AddObserver(event, modified) for event in INPUT_CHANGE_EVENTS]
        session.select(study_identity(proxy))
        self.assertEqual(session.study.frame, 1)
        session.result_arrived(session.study, "result of frame 1")
        session.blended(0.5, "blend of frame 1")
        browser.SetSelectedItemNumber(2)
        logic.UpdateProxyNodesFromSequences(browser)
        self.assertTrue(fired, "a frame change fired none of INPUT_CHANGE_EVENTS on the proxy node")
        self.assertIsNone(session.blend)
        self.assertIsNone(session.result())
        session.select(study_identity(proxy))  # what the widget's refreshStaleIdentity does
        self.assertEqual((session.study.frame, session.result()), (2, None))
        self.assertEqual(float(slicer.util.arrayFromVolume(proxy).max()), 2.0)

        # a plain volume edited in place (voxels, then its grid): a content identity that no longer holds
        for tag in tags:
            proxy.RemoveObserver(tag)
        plain = oblique_ct_node("edited in place")
        for event in INPUT_CHANGE_EVENTS:
            plain.AddObserver(event, modified)
        session.select(study_identity(plain))
        fired.clear()
        slicer.util.updateVolumeFromArray(plain, slicer.util.arrayFromVolume(plain) + 1.0)
        self.assertTrue(fired and session.study_stale)
        self.assertNotEqual(study_identity(plain), session.study)
        session.select(study_identity(plain))
        fired.clear()
        plain.SetOrigin(0.0, 0.0, 0.0)
        self.assertTrue(fired and session.study_stale)
        # voxels changed in the node's own array, then only its image data marked modified (a filter's output
        # written in place): the node fires ImageDataModifiedEvent alone
        session.select(study_identity(plain))
        fired.clear()
        slicer.util.arrayFromVolume(plain)[0, 0, 0] += 5.0
        plain.GetImageData().Modified()
        self.assertTrue(fired and session.study_stale)

    def test_a_dicom_volume_edited_in_place_is_a_new_study_without_the_series_result_or_server_id(self):
        """Segment Editor's Mask volume with the input as output (SegmentEditorMaskVolumeEffect: "may be the same as
        the input volume for cumulative masking") sets new image data into the DICOM node, whose subject-hierarchy
        UIDs stay: the widget's identify (study_identity, then ReviewSession.as_loaded) makes it a new study."""
        import vtk

        node = as_dicom_series(oblique_ct_node("3: CT HEAD"), "1.2.840.99.7", "CT", "1.2.840.99.7.1")
        session = ReviewSession(self.work / "tmp")

        def identify():  # what ADLDenoiseLogic.identify does
            identity = session.as_loaded(study_identity(node), content_identity_of(node))
            session.select(identity)
            return identity

        tags = [node.AddObserver(event, lambda caller, event: session.input_modified())
                for event in INPUT_CHANGE_EVENTS]
        series = identify()
        self.assertEqual(series.kind, "dicom")
        session.record_upload(series, "case_07")
        record = session.result_arrived(series, "result of the series")
        loaded = slicer.util.arrayFromVolume(node).copy()
        masked = vtk.vtkImageData()
        masked.DeepCopy(node.GetImageData())
        node.SetAndObserveImageData(masked)  # the effect's stencil output, set into the same node
        slicer.util.arrayFromVolume(node)[:, :2] = -1000.0
        slicer.util.arrayFromVolumeModified(node)
        self.assertTrue(session.study_stale)
        self.assertEqual(study_identity(node), series)  # the UIDs alone do not tell
        edited = identify()
        self.assertEqual((edited.kind, edited.modality), ("content", "CT"))
        self.assertIsNone(session.result())
        self.assertIsNone(session.server_id())
        self.assertIn("edited in place", session.describe_study(edited))
        slicer.util.updateVolumeFromArray(node, loaded)  # undone: the series again, with its result and id
        self.assertEqual(identify(), series)
        self.assertEqual((session.result(), session.server_id()), (record, "case_07"))
        for tag in tags:
            node.RemoveObserver(tag)

    def test_a_volume_is_hashed_in_the_background_from_a_copy_and_an_edit_meanwhile_drops_that_hash(self):
        """ADLDenoiseLogic.identify copies the node's voxels on the GUI thread (volume_snapshot) and hashes the copy
        in a thread: the identity is the one the node always had (content_identity_of, study_identity), an edit of
        the node's own array after the copy changes neither the copy nor its hash, and the edit (observed through
        INPUT_CHANGE_EVENTS, as the widget does) makes the session drop that hash and wait for the new one."""
        session = ReviewSession(self.work / "tmp")
        node = oblique_ct_node("phantom CT")
        tags = [node.AddObserver(event, lambda caller, event: session.input_modified())
                for event in INPUT_CHANGE_EVENTS]
        before = content_identity_of(node)
        snapshot = volume_snapshot(node)
        self.assertIsNone(snapshot.series)
        self.assertFalse(np.shares_memory(snapshot.voxels, slicer.util.arrayFromVolume(node)))
        ticket = session.identifying(node.GetID(), snapshot.series, snapshot.name)
        task = BackgroundTask(snapshot.content)
        slicer.util.arrayFromVolume(node)[:, :10] = -1000.0  # Mask volume, written while the copy is hashed
        slicer.util.arrayFromVolumeModified(node)
        self.assertEqual(task.wait(120), "done")
        self.assertEqual(task.result, before)  # the copy's voxels: the node's before the edit
        self.assertEqual(study_identity(oblique_ct_node("phantom CT")), before)
        self.assertIsNone(session.identified(ticket, task.result))  # not the node's voxels any more
        with self.assertRaisesRegex(WorkflowError, "volume changed since it was identified"):
            session.require_study()
        snapshot = volume_snapshot(node)
        ticket = session.identifying(node.GetID(), snapshot.series, snapshot.name)
        task = BackgroundTask(snapshot.content)
        self.assertEqual(task.wait(120), "done")
        self.assertEqual(session.identified(ticket, task.result), content_identity_of(node))
        self.assertNotEqual(session.require_study(), before)
        for tag in tags:
            node.RemoveObserver(tag)
        # a DICOM volume: its series (UIDs) is known from the copy, its content hashed; a 4D frame is part of both
        series = as_dicom_series(oblique_ct_node("3: CT HEAD"), "1.2.840.99.8", "CT", "1.2.840.99.8.1")
        snapshot = volume_snapshot(series)
        self.assertEqual(snapshot.series, study_identity(series))
        self.assertEqual(snapshot.content(), content_identity_of(series))
        _, _, _, proxy = perfusion_sequence()
        self.assertEqual(volume_snapshot(proxy).content(), content_identity_of(proxy))
        self.assertEqual(volume_snapshot(proxy).frame, 1)
        # the module's own volumes and non-scalar volumes are refused before anything is copied
        result = oblique_ct_node("phantom CT denoised")
        result.SetAttribute(DERIVED_ATTRIBUTE, "result")
        with self.assertRaisesRegex(WorkflowError, "made by ADL Denoise"):
            volume_snapshot(result)
        with self.assertRaises(ValueError):
            volume_snapshot(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"))

    def test_the_second_view_takes_the_first_views_orientation_then_both_are_linked(self):
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(slicer.mrmlScene)
        red = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
        yellow = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
        self.assertTrue(red.SetOrientationToAxial() and yellow.SetOrientationToSagittal())
        composites = [slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(2)]
        match_orientation_and_link(red, yellow, composites)
        self.assertEqual((red.GetOrientation(), yellow.GetOrientation()), ("Axial", "Axial"))
        self.assertTrue(all(c.GetLinkedControl() and c.GetHotLinkedControl() for c in composites))
        # an oblique (reformatted) red view: yellow gets the same plane
        red.GetSliceToRAS().SetElement(0, 1, 0.3)
        red.UpdateMatrices()
        match_orientation_and_link(red, yellow, composites)
        for r in range(4):
            for c in range(4):
                self.assertAlmostEqual(yellow.GetSliceToRAS().GetElement(r, c), red.GetSliceToRAS().GetElement(r, c))

    def test_scene_close_event_makes_the_session_forget_and_node_ids_restart(self):
        session = ReviewSession(self.work / "tmp")
        slicer.mrmlScene.AddObserver(slicer.vtkMRMLScene.EndCloseEvent, lambda *_: session.scene_closed())
        first = oblique_ct_node("patient A")
        session.select(study_identity(first))
        session.result_arrived(session.study, first.GetID())
        work = session.work_dir
        first_id = first.GetID()
        slicer.mrmlScene.Clear(0)
        self.assertIsNone(session.study)
        self.assertEqual(session.results, {})
        self.assertFalse(work.exists())
        second = oblique_ct_node("patient B")
        second.SetOrigin(1.0, 2.0, 3.0)
        self.assertEqual(second.GetID(), first_id)  # the reason nothing may be keyed by node ID
        session.select(study_identity(second))
        self.assertIsNone(session.result())
        slicer.mrmlScene.RemoveObservers(slicer.vtkMRMLScene.EndCloseEvent)


if __name__ == "__main__":
    unittest.main()
