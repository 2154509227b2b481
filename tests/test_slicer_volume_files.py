"""The Slicer module's volume files written off the GUI thread (ADLDenoiseLib.volume_files), without Slicer: the
NRRD written from a copy of a volume's voxels and IJK-to-RAS matrix holds those voxels and that grid (read back
with SimpleITK, as the server reads it), is written in the request's background task after the identity check
(nothing is written on the calling thread, which keeps running meanwhile), and a failed or cancelled write says
why and leaves no file; and the "MR auto" window preset looks at a capped sample of the voxels only.

(That the file equals what Slicer's own storage node writes for the node is checked against real MRML in
``Testing/Python/test_mrml_logic.py``, run by ``test_slicer_module.py``.)"""
from __future__ import annotations

import sys
import threading
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk
from ADLDenoiseLib import BackgroundTask
from ADLDenoiseLib.client import TransferCancelled
from ADLDenoiseLib.regions import Grid
from ADLDenoiseLib.review_session import VolumeChanged, VolumeSnapshot, content_identity, describe_error
from ADLDenoiseLib.volume_files import ExportFailed, VolumeExport, prepare_upload, write_nrrd
from ADLDenoiseLib.workflow import WINDOW_SAMPLE_VOXELS, strided_sample, window_for

import processes
from conftest import REPO_ROOT


def oblique_ijk_to_ras(left_handed: bool = False) -> np.ndarray:
    """An oblique IJK-to-RAS (4x4, mm): spacing 0.7, 0.8, 2.5, rotated 25 degrees about S, origin off zero."""
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    if left_handed:
        rotation[:, 2] *= -1
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * np.array([0.7, 0.8, 2.5])[None, :]
    matrix[:3, 3] = [-12.0, 30.5, 101.0]
    return matrix


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8, np.float64])
@pytest.mark.parametrize("left_handed", [False, True])
def test_the_nrrd_holds_the_voxels_and_the_grid_as_the_server_reads_them(tmp_path, dtype, left_handed):
    rng = np.random.default_rng(0)
    voxels = (rng.normal(0, 300, (5, 12, 9))).astype(dtype)
    matrix = oblique_ijk_to_ras(left_handed)
    path = write_nrrd(voxels, matrix, tmp_path / "study.nrrd")
    assert path == tmp_path / "study.nrrd" and files_in(tmp_path) == ["study.nrrd"]
    image = sitk.ReadImage(str(path))
    read = sitk.GetArrayFromImage(image)
    assert read.dtype == voxels.dtype
    np.testing.assert_array_equal(read, voxels)
    # the file's grid is the node's IJK-to-RAS in LPS (as the regions module reads a study file's grid)
    expected = Grid.from_ijk_to_ras(matrix, voxels.shape)
    found = Grid.from_file(path)
    assert found.shape == voxels.shape
    np.testing.assert_allclose(found.ijk_to_lps, expected.ijk_to_lps, atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), [0.7, 0.8, 2.5], atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), [12.0, -30.5, 101.0], atol=1e-12)
    # a big-endian or non-contiguous copy writes the same file
    other = write_nrrd(np.asfortranarray(voxels.astype(voxels.dtype.newbyteorder(">"))), matrix,
                       tmp_path / "other.nrrd")
    assert other.read_bytes() == path.read_bytes()


def test_the_file_is_written_in_the_background_task_after_the_check_and_not_by_the_caller(tmp_path):
    """The GUI thread makes a VolumeExport (a copy of the voxels and a path: no file, no folder); the request's
    BackgroundTask checks the copy against the identity and writes it (prepare_upload); the calling thread runs on
    while the file is being written (held here after its first slice, with the partial file still hidden)."""
    voxels = np.arange(6 * 32 * 32, dtype=np.int16).reshape(6, 32, 32) - 3000
    matrix = oblique_ijk_to_ras()
    snapshot = VolumeSnapshot(voxels.copy(), matrix, "CT chest")
    identified = content_identity(voxels, matrix, "CT chest")
    target = tmp_path / "work" / "exports" / "study.nrrd"
    export = VolumeExport(snapshot, target)
    assert not (tmp_path / "work").exists()  # making it did no file I/O

    first_slice_written, go_on = threading.Event(), threading.Event()
    writers, asked = set(), []

    def slow_cancelled() -> bool:  # asked before each slice, by the thread that writes
        writers.add(threading.current_thread().name)
        asked.append(1)
        if len(asked) == 2:
            first_slice_written.set()
            go_on.wait(120)
        return False

    messages = []
    task = BackgroundTask(lambda report, cancelled: prepare_upload(
        (snapshot, identified), export, lambda f, m: (messages.append(m), report(f, m)), slow_cancelled),
        name="ADLDenoise request")
    assert first_slice_written.wait(120)
    # the caller is free while the writer is mid-file; only a hidden temporary file exists so far
    assert not task.finished and not target.exists()
    partial = [p.name for p in target.parent.iterdir()]
    assert len(partial) == 1 and partial[0].startswith(".study.nrrd.") and partial[0].endswith(".part")
    go_on.set()
    assert task.wait(120) == "done", task.error
    assert task.result == target and files_in(target.parent) == ["study.nrrd"]
    assert writers == {"ADLDenoise request"}
    assert messages[0].startswith("checking that CT chest still holds") and messages[1].startswith("writing CT chest")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(target))), voxels)

    # a copy of voxels other than those identified (changed without Slicer being told): refused, nothing written
    changed = VolumeExport(VolumeSnapshot(voxels + 1, matrix, "CT chest"), tmp_path / "changed" / "study.nrrd")
    task = BackgroundTask(lambda report, cancelled: prepare_upload((changed.snapshot, identified), changed,
                                                                   report, cancelled))
    assert task.wait(120) == "failed" and isinstance(task.error, VolumeChanged)
    assert not (tmp_path / "changed").exists()
    # nothing to write: the server holds the study, or the file exists already (the self-test's)
    assert prepare_upload((snapshot, identified), None) is None
    assert prepare_upload(None, target) == target


def test_a_failed_write_says_why_and_leaves_no_file(tmp_path):
    voxels = np.zeros((3, 8, 8), np.int16)
    matrix = np.eye(4)
    # the folder cannot be made (a file in its place)
    (tmp_path / "exports").write_text("not a folder")
    task = BackgroundTask(VolumeExport(VolumeSnapshot(voxels, matrix, "A"), tmp_path / "exports" / "a.nrrd").write)
    assert task.wait(120) == "failed" and isinstance(task.error, ExportFailed)
    message = describe_error(task.error)  # what the status line shows
    assert message.startswith("could not write a.nrrd to ") and str(tmp_path / "exports") in message
    assert "Not a directory" in message or "File exists" in message
    assert files_in(tmp_path) == ["exports"]
    # values NRRD has no type for, and what is no 3D volume, are refused before a file is made
    for bad, match in ((voxels.astype(bool), "bool values cannot be written"),
                       (voxels[0], "non-empty 3D array"), (voxels[:0], "non-empty 3D array")):
        with pytest.raises(ExportFailed, match=match):
            write_nrrd(bad, matrix, tmp_path / "out" / "b.nrrd")
    with pytest.raises(ExportFailed, match="finite 4x4"):
        write_nrrd(voxels, np.full((4, 4), np.nan), tmp_path / "out" / "b.nrrd")
    assert not (tmp_path / "out").exists()
    # cancelled mid-file (Cancel, Close Scene), once a slice is on disk: stops at the next slice, no file left
    asked = []
    with pytest.raises(TransferCancelled):
        write_nrrd(voxels, matrix, tmp_path / "c.nrrd", cancelled=lambda: bool(asked.append(1)) or len(asked) > 2)
    assert files_in(tmp_path) == ["exports"]


#: writes a volume bigger than the file size limit set here (the disk full mid-file); prints the error's message
_DISK_FULL = """
import resource, signal, sys
import numpy as np
from ADLDenoiseLib.volume_files import ExportFailed, write_nrrd
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    write_nrrd(np.ones((8, 64, 64), np.float32), np.eye(4), sys.argv[1])
except ExportFailed as error:
    print("FAILED:", error)
"""


def test_a_write_that_fails_mid_file_leaves_no_partial_file(tmp_path):
    """A real failure after part of the file is on disk (a file size limit: as a full disk), in a process of its
    own: the message names the file and the reason, and the partial file is removed."""
    env = {"PYTHONPATH": str(REPO_ROOT / "slicer_extension" / "ADLDenoise"), "OMP_NUM_THREADS": "1"}
    result = processes.run([sys.executable, "-c", _DISK_FULL, str(tmp_path / "big.nrrd")], 300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"FAILED: could not write big.nrrd to {tmp_path}: File too large" in result.stdout
    assert files_in(tmp_path) == []


def test_mr_auto_window_looks_at_a_capped_strided_sample_only():
    """"MR auto" runs on the GUI thread: its percentiles come from at most WINDOW_SAMPLE_VOXELS voxels spread
    evenly over the volume (no float64 copy of the whole volume), close to the whole volume's."""
    rng = np.random.default_rng(1)
    voxels = np.clip(rng.normal(600, 150, (48, 256, 256)), 0, 4095).astype(np.int16)  # 3.1 M voxels
    voxels[:, :40] = 0  # background
    sample = strided_sample(voxels, WINDOW_SAMPLE_VOXELS)
    assert sample.size <= WINDOW_SAMPLE_VOXELS and sample.size > WINDOW_SAMPLE_VOXELS // 4
    assert np.shares_memory(sample, voxels)  # a view: no copy of the volume
    low, high = np.percentile(sample.astype(np.float64), [1.0, 99.0])
    assert window_for("MR auto", voxels) == pytest.approx((high - low, (high + low) / 2.0))
    full_low, full_high = np.percentile(voxels, [1.0, 99.0])
    width, level = window_for("MR auto", voxels)
    assert width == pytest.approx(full_high - full_low, abs=5.0)
    assert level == pytest.approx((full_high + full_low) / 2.0, abs=5.0)
    # memory: the sample's, not the volume's (a float64 copy of this 16.8 M voxel volume alone is 134 MB)
    big = rng.integers(0, 4096, (64, 512, 512), dtype=np.int16)
    tracemalloc.start()
    try:
        window_for("MR auto", big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 8 * WINDOW_SAMPLE_VOXELS, peak  # float64 sample and the percentile's copy of it
    # a small volume is used whole; fixed presets need no values
    small = rng.normal(0, 1, (2, 10, 10))
    assert strided_sample(small, WINDOW_SAMPLE_VOXELS).size == small.size
    assert strided_sample(small, 7).size == 7 and strided_sample(small, 200).size == 200
    assert window_for("CT lung") == (1500.0, -600.0)
    with pytest.raises(ValueError, match="at least one voxel"):
        strided_sample(small, 0)
