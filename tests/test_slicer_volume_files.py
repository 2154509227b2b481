"""The Slicer module's volume files written and read off the GUI thread (ADLDenoiseLib.volume_files), without
Slicer: the NRRD written from a copy of a volume's voxels and IJK-to-RAS matrix holds those voxels and that grid
(read back with SimpleITK, as the server reads it), is written in the request's background task after the identity
check (nothing is written on the calling thread, which keeps running meanwhile), and a failed or cancelled write
says why and leaves no file; the result file the server writes (SimpleITK: gzip or raw NRRD, NIfTI) is read in the
background into the voxels and grid SimpleITK reads, put in the original's voxel order, and a damaged or cut-off
one gives a clear message; a review-queue study (NIfTI, NRRD) is read in the background on the right-handed grid
Slicer's loader gives it, with Slicer's automatic window from a capped sample, and an unreadable one fails with a
clear message; and the "MR auto" window preset looks at a capped sample of the voxels only.

(That the file written equals what Slicer's own storage node writes for the node, and that the file read equals
what Slicer's own loader reads, is checked against real MRML in ``Testing/Python/test_mrml_logic.py``, run by
``test_slicer_module.py``.)"""
from __future__ import annotations

import re
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
from ADLDenoiseLib.volume_files import (
    ExportFailed,
    VolumeExport,
    VolumeUnreadable,
    align_to_grid,
    prepare_upload,
    read_nrrd,
    read_result,
    read_study,
    read_volume,
    right_handed,
    write_nrrd,
)
from ADLDenoiseLib.workflow import (
    WINDOW_SAMPLE_VOXELS,
    auto_window,
    blend,
    difference,
    strided_sample,
    window_for,
)

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


# --------------------------------------------------------------------------------------------------- reading back
def sitk_image(voxels: np.ndarray, ijk_to_ras: np.ndarray):
    """A SimpleITK image of ``voxels`` ((z, y, x)) on the grid ``ijk_to_ras`` (RAS, as a Slicer node's)."""
    image = sitk.GetImageFromArray(voxels)
    lps = np.diag([-1.0, -1.0, 1.0]) @ ijk_to_ras[:3, :4]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:, :3] / spacing).reshape(-1).tolist())
    image.SetOrigin(lps[:, 3].tolist())
    return image


def sitk_read(path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, IJK-to-RAS) of a file as SimpleITK (the server's reader) reads it."""
    image = sitk.ReadImage(str(path))
    matrix = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    matrix[:3, :3] = lps_to_ras @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    return sitk.GetArrayFromImage(image), matrix


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint16, np.float64])
@pytest.mark.parametrize("left_handed", [False, True])
def test_the_result_file_is_read_as_simpleitk_reads_it(tmp_path, dtype, left_handed):
    """The result as the server writes it (SimpleITK's WriteImage with compression: gzip NRRD; and raw NRRD,
    NIfTI) reads back with the voxels, type and grid SimpleITK reads; a big-endian NRRD too."""
    rng = np.random.default_rng(1)
    voxels = rng.normal(0, 400, (4, 11, 13)).astype(dtype)
    matrix = oblique_ijk_to_ras(left_handed)
    files = {}
    for name, compress in (("gzip.nrrd", True), ("raw.nrrd", False), ("result.nii.gz", True)):
        files[name] = tmp_path / name
        sitk.WriteImage(sitk_image(voxels, matrix), str(files[name]), compress)
    assert b"encoding: gzip" in files["gzip.nrrd"].read_bytes()[:1000]
    assert b"encoding: raw" in files["raw.nrrd"].read_bytes()[:1000]
    for name, path in files.items():
        expected, grid = sitk_read(path)
        read = read_volume(path)
        assert read.voxels.dtype == expected.dtype == voxels.dtype, name
        assert read.voxels.flags.c_contiguous
        np.testing.assert_array_equal(read.voxels, expected, err_msg=name)
        np.testing.assert_allclose(read.ijk_to_ras, grid, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(read.ijk_to_ras, matrix, atol=1e-5, err_msg=name)
    # big-endian data (NRRD's "endian: big"): swapped to this machine's order
    header, data = files["raw.nrrd"].read_bytes().split(b"\n\n", 1)
    if voxels.dtype.itemsize > 1:
        swapped = header.replace(b"endian: little", b"endian: big") + b"\n\n" + \
            np.frombuffer(data, voxels.dtype.newbyteorder("<")).astype(voxels.dtype.newbyteorder(">")).tobytes()
        (tmp_path / "big.nrrd").write_bytes(swapped)
        big = read_nrrd(tmp_path / "big.nrrd")
        assert big.voxels.dtype == voxels.dtype and big.voxels.dtype.isnative
        np.testing.assert_array_equal(big.voxels, voxels)
    # the module's own file (write_nrrd) reads back as written
    own = read_nrrd(write_nrrd(voxels, matrix, tmp_path / "own.nrrd"))
    np.testing.assert_array_equal(own.voxels, voxels)
    np.testing.assert_allclose(own.ijk_to_ras, matrix, atol=1e-12)


def test_the_result_is_put_in_the_originals_voxel_order_and_another_grid_is_not():
    """align_to_grid: a result on the original's grid is taken as it is; one written right-handed from a
    left-handed original (Slicer's reader reverses such a grid's last axis) is flipped back; other grids give
    None (size, spacing, direction, position)."""
    voxels = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    left = oblique_ijk_to_ras(left_handed=True)
    assert align_to_grid(voxels, left + 1e-6, voxels.shape, left) is voxels
    right = left.copy()  # the same centres, k reversed: the origin at the other end
    right[:3, 2] *= -1
    right[:3, 3] = left[:3, 3] + left[:3, 2] * (voxels.shape[0] - 1)
    aligned = align_to_grid(voxels[::-1].copy(), right, voxels.shape, left)
    assert aligned.flags.c_contiguous
    np.testing.assert_array_equal(aligned, voxels)
    shifted = left.copy()
    shifted[:3, 3] += 0.5
    scaled = left.copy()
    scaled[:3, 0] *= 1.01
    for other in (shifted, scaled, right[[0, 1, 2, 3]][:, [1, 0, 2, 3]]):
        assert align_to_grid(voxels, other, voxels.shape, left) is None
    assert align_to_grid(voxels, left, (3, 4, 6), left) is None
    unflipped = right.copy()  # k reversed but the origin left where it was: other centres
    unflipped[:3, 3] = left[:3, 3]
    assert align_to_grid(voxels, unflipped, voxels.shape, left) is None


def test_the_result_is_read_in_the_background_task_on_the_originals_grid(tmp_path):
    """read_result runs in the request's BackgroundTask (the caller runs on while it reads, held here mid-file),
    and puts a right-handed file of a left-handed original in the original's voxel order and grid."""
    voxels = np.arange(6 * 32 * 40, dtype=np.int16).reshape(6, 32, 40) - 3000
    left = oblique_ijk_to_ras(left_handed=True)
    right = left.copy()
    right[:3, 2] *= -1
    right[:3, 3] = left[:3, 3] + left[:3, 2] * (voxels.shape[0] - 1)
    path = tmp_path / "results" / "study.nrrd"
    write_nrrd(voxels[::-1], right, path)
    reading, release = threading.Event(), threading.Event()
    asked = []

    def hold() -> bool:  # asked before each chunk: holds the reader in its thread
        asked.append(threading.current_thread())
        reading.set()
        assert release.wait(60)
        return False

    task = BackgroundTask(lambda report, cancelled: read_result(path, (voxels.shape, left), report, hold),
                          name="read")
    assert reading.wait(60)
    assert task.state == "running" and threading.current_thread() not in asked  # the caller runs on
    release.set()
    assert task.wait(120) == "done", task.error
    loaded = task.result
    assert loaded.error == "" and loaded.path == path
    np.testing.assert_array_equal(loaded.volume.voxels, voxels)
    np.testing.assert_allclose(loaded.volume.ijk_to_ras, left, atol=1e-12)
    # on another grid: read all the same (the GUI thread refuses it after the identity check), left as it is
    other = read_result(path, (voxels.shape, np.eye(4)))
    np.testing.assert_allclose(other.volume.ijk_to_ras, right, atol=1e-9)


def test_a_damaged_or_cut_off_result_gives_a_clear_message_not_an_exception(tmp_path):
    """What cannot be read is kept as a message (raised on the GUI thread once the result is known to be for the
    study selected): cut-off raw and gzip data, damaged gzip data, a damaged header, a missing file, a format
    without a reader. Cancel still stops the reading."""
    rng = np.random.default_rng(2)
    voxels = rng.normal(0, 400, (5, 40, 50)).astype(np.float32)
    matrix = oblique_ijk_to_ras()
    raw, packed = tmp_path / "raw.nrrd", tmp_path / "gzip.nrrd"
    sitk.WriteImage(sitk_image(voxels, matrix), str(raw), False)
    sitk.WriteImage(sitk_image(voxels, matrix), str(packed), True)
    cases = {}
    data = raw.read_bytes()
    cases["cut_raw.nrrd"] = (data[: len(data) - 1000], f"the file is cut off: {voxels.nbytes - 1000} of the "
                                                       f"{voxels.nbytes} bytes of 50 x 40 x 5 float32 voxels")
    data = packed.read_bytes()
    cases["cut_gzip.nrrd"] = (data[: len(data) // 2], "the file is cut off")
    middle = len(data) // 2
    cases["bad_gzip.nrrd"] = (data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64]) +
                              data[middle + 64:], "gzip data is damaged|the file is cut off")
    cases["bad_header.nrrd"] = (data.replace(b"sizes: 50 40 5", b"sizes: 50 x 5"), "sizes")
    cases["not_nrrd.nrrd"] = (b"<html>502 Bad Gateway</html>", "not a NRRD file")
    cases["header_only.nrrd"] = (data[:200], "header ends before its data")
    cases["zip.nrrd"] = (data.replace(b"encoding: gzip", b"encoding: bzip2"), "encoding 'bzip2' is not read here")
    cases["vector.nrrd"] = (data.replace(b"dimension: 3", b"dimension: 4"), "3D scalar volume")
    cases["cut.nii.gz"] = (b"\x1f\x8b\x08" + bytes(40), "Unable to determine ImageIO reader")
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        loaded = read_result(tmp_path / name, (voxels.shape, matrix))
        assert loaded.volume is None, name
        assert re.search(match, loaded.error), (name, loaded.error)
        with pytest.raises(VolumeUnreadable):
            read_volume(tmp_path / name)
    missing = read_result(tmp_path / "gone.nrrd")
    assert missing.volume is None and "No such file" in missing.error
    # cancelled mid-file (more than one chunk of gzip and of raw data): TransferCancelled, nothing kept
    big = rng.normal(0, 400, (8, 256, 256)).astype(np.float32)
    for compress in (True, False):
        sitk.WriteImage(sitk_image(big, matrix), str(tmp_path / "big.nrrd"), compress)
        asked = []
        with pytest.raises(TransferCancelled):
            read_result(tmp_path / "big.nrrd", None, None, lambda: bool(asked.append(1)) or len(asked) > 1)
        assert len(asked) == 2


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("left_handed", [False, True])
def test_a_review_queue_study_is_read_in_the_background_on_the_grid_slicers_loader_gives_it(tmp_path, dtype,
                                                                                           left_handed):
    """Next study: the downloaded file (the server's datastore keeps NIfTI, gzip NRRD) is read in the request's
    BackgroundTask (read_study); a left-handed grid comes back right-handed as Slicer's loader makes it (slices
    reversed, k column negated, origin at the last slice: the same voxel centres and values), a right-handed one
    as it is; the window is Slicer's automatic one (0.1 / 99.9 percentiles)."""
    rng = np.random.default_rng(4)
    voxels = rng.normal(0, 400, (5, 11, 13)).astype(dtype)
    matrix = oblique_ijk_to_ras(left_handed)
    for name in ("case_07.nii.gz", "case_07.nrrd"):
        path = tmp_path / name
        sitk.WriteImage(sitk_image(voxels, matrix), str(path), True)
        caller = threading.get_ident()
        threads = []

        def fetch(report, cancelled, p=path):
            threads.append(threading.get_ident())
            return read_study(p, "case_07", report, cancelled)

        task = BackgroundTask(fetch, name="next study")
        assert task.wait(60) == "done", task.error
        assert threads and threads[0] != caller
        study = task.result
        assert study.voxels.dtype == voxels.dtype and study.voxels.flags.c_contiguous
        assert np.linalg.det(study.ijk_to_ras[:3, :3]) > 0, name
        if left_handed:
            np.testing.assert_array_equal(study.voxels, voxels[::-1], err_msg=name)
            expected = matrix.copy()
            expected[:3, 3] += matrix[:3, 2] * (voxels.shape[0] - 1)
            expected[:3, 2] *= -1
        else:
            np.testing.assert_array_equal(study.voxels, voxels, err_msg=name)
            expected = matrix
        np.testing.assert_allclose(study.ijk_to_ras, expected, atol=1e-5, err_msg=name)
        # the same voxel centres: put back on the file's grid, the file's voxels
        np.testing.assert_array_equal(align_to_grid(study.voxels, study.ijk_to_ras, voxels.shape, matrix), voxels)
    low, high = np.percentile(voxels.astype(np.float64), [0.1, 99.9])
    assert auto_window(voxels) == pytest.approx((high - low, (high + low) / 2.0))
    # a single left-handed slice: k negated, the origin stays (as vtkMRMLVolumeNode::ReverseSliceOrder)
    one = right_handed(read_volume(write_nrrd(voxels[:1], matrix, tmp_path / "one.nrrd")))
    np.testing.assert_array_equal(one.voxels, voxels[:1])
    np.testing.assert_allclose(one.ijk_to_ras[:3, 3], matrix[:3, 3], atol=1e-9)
    # auto_window, like window_for's MR auto, looks at a capped sample only
    big = rng.integers(0, 4096, (64, 512, 512), dtype=np.int16)
    tracemalloc.start()
    try:
        auto_window(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 8 * WINDOW_SAMPLE_VOXELS, peak


@pytest.mark.parametrize("name", ["case_07.nii.gz", "case_07.nrrd", "case_07.mha"])
def test_a_2d_review_queue_study_is_read_as_the_single_slice_slicers_loader_gives(tmp_path, name):
    """The server keeps and denoises 2D images too: Next study reads a 2D file (NIfTI, NRRD, MetaImage) as one
    slice on the grid Slicer's loader gives it (ITK's 3D reader: k spacing 1, origin 0, direction k; then made
    right-handed), where it refused it ("a 3D scalar volume was expected") that slicer.util.loadVolume loaded. The
    expected grid is what slicer-core's vtkMRMLVolumeArchetypeStorageNode reads from these files."""
    voxels = np.arange(30 * 20, dtype=np.int16).reshape(30, 20) - 300
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.7, 0.8))
    image.SetOrigin((10.0, -5.0))  # LPS
    image.SetDirection((-1.0, 0.0, 0.0, 1.0))  # x mirrored: left-handed once a k axis is added
    path = tmp_path / name
    sitk.WriteImage(image, str(path), name.endswith(".gz"))
    task = BackgroundTask(lambda report, cancelled: read_study(path, "case_07", report, cancelled))
    assert task.wait(60) == "done", task.error
    study = task.result
    np.testing.assert_array_equal(study.voxels, voxels[None])
    expected = np.array([[0.7, 0.0, 0.0, -10.0], [0.0, -0.8, 0.0, 5.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(study.ijk_to_ras, expected, atol=1e-6)


@pytest.mark.parametrize("layout", ["ascii", "spacings"])
def test_a_nrrd_study_slicers_loader_reads_is_read_though_read_nrrd_does_not_take_its_header(tmp_path, layout):
    """A NRRD the server keeps (it reads NRRD with ITK) but read_nrrd does not take: ascii encoding, or Teem's
    ``spacings`` without a ``space`` (axis-aligned, LPS as ITK reads it). Slicer's loader reads both; Next study
    now reads them as it does (SimpleITK), where it failed ("NRRD encoding 'ascii' is not read here", "the NRRD
    space None is none of LPS, RAS, LAS"). The expected grids are what slicer-core's
    vtkMRMLVolumeArchetypeStorageNode reads from these files."""
    voxels = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 5
    header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 4 3 2\nendian: little\n"
    path = tmp_path / "case_07.nrrd"
    if layout == "ascii":
        path.write_bytes((header + "space: left-posterior-superior\nspace directions: (0.5,0,0) (0,0.6,0) (0,0,2)\n"
                          "space origin: (1,2,3)\nencoding: ascii\n\n" + " ".join(map(str, voxels.ravel())) + "\n"
                          ).encode())
        origin = [-1.0, -2.0, 3.0]
    else:
        path.write_bytes((header + "spacings: 0.5 0.6 2\nencoding: raw\n\n").encode() + voxels.astype("<i2").tobytes())
        origin = [0.0, 0.0, 0.0]
    task = BackgroundTask(lambda report, cancelled: read_study(path, "case_07", report, cancelled))
    assert task.wait(60) == "done", task.error
    np.testing.assert_array_equal(task.result.voxels, voxels)
    expected = np.diag([-0.5, -0.6, 2.0, 1.0])
    expected[:3, 3] = origin
    np.testing.assert_allclose(task.result.ijk_to_ras, expected, atol=1e-6)


def test_a_detached_nrrd_study_or_result_is_refused_not_read_from_the_file_it_names(tmp_path):
    """A NRRD the server sends must hold its voxels: one naming a data file (a detached header) is refused, never
    read from a file on this computer (another study's voxels beside it in the download folder would be shown and
    recorded under this study's id), though SimpleITK, which reads the NRRDs read_nrrd does not, would read it."""
    voxels = np.arange(24, dtype="<i2")
    (tmp_path / "case_06.raw").write_bytes(voxels.tobytes())
    path = tmp_path / "case_07.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 3 2\nendian: little\n"
                     b"space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\n"
                     b"data file: case_06.raw\n\n")
    with pytest.raises(VolumeUnreadable, match="'data file' are not read here"):
        read_study(path, "case_07")
    assert read_result(path).error and read_result(path).volume is None


def test_an_unreadable_review_queue_study_fails_with_a_clear_message(tmp_path):
    """A downloaded study that cannot be read fails the request's task saying which study, which file and why;
    Cancel still stops the reading."""
    voxels = np.zeros((3, 8, 9), np.float32)
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(sitk_image(voxels, oblique_ijk_to_ras()), str(good), True)
    data = good.read_bytes()
    cases = {"case_07.nii.gz": (data[: len(data) // 2], r"\(case_07\.nii\.gz\) the server sent: .+"),
             "case_08.nrrd": (b"<html>502 Bad Gateway</html>", r"\(case_08\.nrrd\) the server sent: not a NRRD file"),
             "case_09.nrrd": (None, r"\(case_09\.nrrd\) the server sent: .*No such file")}
    for name, (content, match) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        task = BackgroundTask(lambda report, cancelled, p=tmp_path / name: read_study(p, name[:7], report,
                                                                                      cancelled))
        assert task.wait(60) == "failed", name
        assert isinstance(task.error, VolumeUnreadable)
        assert re.match(f"could not read the study {name[:7]} {match}", describe_error(task.error)), task.error
    sitk.WriteImage(sitk_image(np.zeros((8, 256, 256), np.float32), oblique_ijk_to_ras()), str(tmp_path / "big.nrrd"))
    asked = []
    with pytest.raises(TransferCancelled):
        read_study(tmp_path / "big.nrrd", "big", None, lambda: bool(asked.append(1)) or len(asked) > 1)


def test_the_blend_goes_into_the_nodes_own_array_without_a_volume_sized_allocation():
    """The blend slider's update: into the corrected volume's float32 voxels, slice by slice, the very values of
    a new blend, with no array of the volume's size made (tracemalloc); the difference, computed in the
    background from copies, casts as it reads (int16 - int16 does not wrap around)."""
    rng = np.random.default_rng(3)
    original = rng.integers(-1024, 3000, (40, 64, 64)).astype(np.int16)
    denoised = rng.normal(0, 500, original.shape).astype(np.float32)
    out = np.zeros(original.shape, np.float32)
    for strength in (0.0, 0.35, 1.0):
        expected = blend(original, denoised, strength)
        tracemalloc.start()
        assert blend(original, denoised, strength, out=out) is out
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(out, expected)
        assert peak < out.nbytes / 10, peak
    np.testing.assert_array_equal(blend(original, denoised, 1.0, out=out), denoised)
    np.testing.assert_array_equal(blend(original, denoised, 0.0, out=out), original.astype(np.float32))
    with pytest.raises(ValueError, match="float32 array of shape"):
        blend(original, denoised, 0.5, out=np.zeros(original.shape, np.float64))
    low = np.full((2, 3, 4), -30000, np.int16)
    np.testing.assert_array_equal(difference(low, -low), np.full(low.shape, -60000.0, np.float32))
