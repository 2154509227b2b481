"""The Slicer module's workflow state (ADLDenoiseLib.review_session), without Slicer: study identity, results keyed
by identity, the blended correction's owner, verdicts, the review queue, empty answers, fine-tuning runs, scene
close and the temporary patient files; and the options of a denoising request (ADLDenoiseLib.settings: lesion
contrast restoration, from the panel's spin box to the request's params and back from the answer)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
from ADLDenoiseLib import BackgroundTask, DenoiseServerError
from ADLDenoiseLib.review_session import (
    FILES_PENDING,
    NotConfirmed,
    RescaleNotApplied,
    ReviewSession,
    StudyIdentity,
    TempFiles,
    VolumeChanged,
    VolumeSnapshot,
    WorkflowError,
    content_identity,
    describe_error,
    describe_verdict,
    dicom_identity,
    snapshot_matches_files,
    verify_snapshot,
)
from ADLDenoiseLib.settings import (
    MAX_RESTORATION_PX,
    RESTORATION_SPIN_AUTO,
    RESTORATION_SPIN_STEP,
    applied_restoration,
    denoise_params,
    describe_restoration,
    restoration_choice,
    restoration_from_spin,
    supports_restoration,
)

from pydicom_write import write_dicom

EYE = np.diag([0.8, 0.8, 2.0, 1.0])


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 30, (3, 8, 9)).astype(np.float32)


# --------------------------------------------------------------------------------------------------- identity
def test_identity_is_the_series_uid_or_the_content_and_never_the_name():
    a = dicom_identity("1.2.840.1.1", "ct", name="3: CT HEAD")
    b = dicom_identity("1.2.840.1.2", "CT", name="3: CT HEAD")  # another series, same name
    assert a != b and a.datastore_id() != b.datastore_id()
    assert a.datastore_id().startswith("3_CT_HEAD_") and a.modality == "CT"
    assert a == dicom_identity("1.2.840.1.1", "CT", name="renamed")  # the name is no part of the identity
    assert a.datastore_id() == dicom_identity("1.2.840.1.1", name="3: CT HEAD").datastore_id()

    v = volume()
    c = content_identity(v, EYE, "phantom")
    assert c == content_identity(v.copy(), EYE, "other name")
    assert c != content_identity(v + 1, EYE, "phantom")  # other voxels
    last = v.copy()
    last[-1, -1, -1] += 0.5  # one voxel of the last slice
    assert c != content_identity(last, EYE, "phantom")
    shifted = EYE.copy()
    shifted[0, 3] = 5.0
    assert c != content_identity(v, shifted, "phantom")  # other geometry
    assert c != content_identity(v.astype(np.float64), EYE, "phantom")  # other dtype
    assert c.datastore_id() != content_identity(v + 1, EYE, "phantom").datastore_id()
    # a frame of a 4D sequence: the frame index is part of the identity and of the id
    f0, f1 = dicom_identity("1.2.3", frame=0, name="perfusion"), dicom_identity("1.2.3", frame=1, name="perfusion")
    assert f0 != f1 and f0.datastore_id() != f1.datastore_id() and "_f1_" in f1.datastore_id()
    assert f0 != dicom_identity("1.2.3", name="perfusion")
    # one series loaded as several volumes (Slicer's subseries: acquisition number, image type, orientation, time;
    # or all files): the same SeriesInstanceUID, other files -> other studies, other ids
    pre = dicom_identity("1.2.9", "CT", "4: CT ABDOMEN", instance_uids="1.2.9.1 1.2.9.2 1.2.9.3")
    post = dicom_identity("1.2.9", "CT", "4: CT ABDOMEN", instance_uids="1.2.9.4 1.2.9.5 1.2.9.6")
    assert pre != post and pre.datastore_id() != post.datastore_id() and pre.part != ""
    assert pre == dicom_identity("1.2.9", instance_uids=["1.2.9.3", "1.2.9.1", " 1.2.9.2"])  # any order: same files
    assert pre != dicom_identity("1.2.9", instance_uids="1.2.9.1 1.2.9.2 1.2.9.3 1.2.9.4")  # all files
    assert "images" in pre.describe() and "images" not in a.describe()
    # none known (not from Slicer's DICOM import): the id it always had
    assert a == dicom_identity("1.2.840.1.1", instance_uids="  ") and a.part == ""
    session = ReviewSession()
    session.select(pre)
    session.result_arrived(pre, "res_pre")
    assert session.select(post) is True and session.result() is None  # pre's result is not post's


def test_bad_identities_are_refused_clearly():
    with pytest.raises(WorkflowError, match="SeriesInstanceUID or a content hash"):
        dicom_identity("  ")
    with pytest.raises(WorkflowError, match="frame index"):
        dicom_identity("1.2", frame=-1)
    with pytest.raises(WorkflowError, match="4x4"):
        content_identity(volume(), np.eye(3))
    with pytest.raises(WorkflowError, match="3D"):
        content_identity(np.zeros((4, 4)), EYE)
    with pytest.raises(WorkflowError, match="kind"):
        StudyIdentity("name", "x")


# --------------------------------------------------------------------------------------------------- results
def test_result_is_keyed_by_identity_and_a_late_result_is_not_attached():
    session = ReviewSession()
    a, b = content_identity(volume(0), EYE, "a"), content_identity(volume(1), EYE, "b")
    assert session.select(a)
    record = session.result_arrived(a, "vtkMRMLScalarVolumeNode2", "adl", "pretrained")
    assert record is not None and session.result() == record and session.result(a) == record
    assert session.select(b) and session.result() is None  # B has no result, A's is not shown for B
    assert session.result_arrived(a, "vtkMRMLScalarVolumeNode3") is None  # late result for A while B is selected
    assert session.result(a) == record  # A keeps its earlier result
    assert not session.select(b)  # same study again: nothing changes
    session.select(a)
    assert session.result() == record
    session.forget_result("vtkMRMLScalarVolumeNode2")  # its node was deleted
    assert session.result() is None
    with pytest.raises(WorkflowError, match="denoise the volume first"):
        session.require_result()


# --------------------------------------------------------------------------------------------------- correction
def test_blend_belongs_to_its_study_and_result_and_is_reset_on_every_change():
    session = ReviewSession()
    a, b = dicom_identity("1.1", name="A"), dicom_identity("1.2", name="B")
    with pytest.raises(WorkflowError, match="select a volume"):
        session.blended(0.5, "n")
    session.select(a)
    with pytest.raises(WorkflowError, match="denoise the volume first"):
        session.blended(0.5, "n")
    session.result_arrived(a, "resA")
    blend = session.blended(0.7, "blendA")
    assert session.correction_to_submit() == blend and blend.strength == 0.7
    with pytest.raises(WorkflowError, match="within"):
        session.blended(1.5, "blendA")

    # blend A, denoise B, submit: A's blend must never become B's label
    session.select(b)
    assert session.blend is None
    session.result_arrived(b, "resB")
    assert session.correction_to_submit() is None  # nothing blended for B: the caller blends B now
    # the volume changed under the user's feet (identity recomputed at submit differs)
    with pytest.raises(WorkflowError, match="the volume changed"):
        session.correction_to_submit(a)

    # a new result of the same study drops the blend made from the old one
    session.blended(0.4, "blendB")
    session.result_arrived(b, "resB2")
    assert session.blend is None
    # a blend forged for another study or an older result is refused, not submitted
    session.blended(0.4, "blendB")
    from dataclasses import replace

    session.blend = replace(session.blend, identity=a)
    with pytest.raises(WorkflowError, match="belongs to"):
        session.correction_to_submit()
    session.blended(0.4, "blendB")
    session.blend = replace(session.blend, result_serial=session.blend.result_serial - 1)
    with pytest.raises(WorkflowError, match="earlier result"):
        session.correction_to_submit()
    # deselecting drops it too
    session.blended(0.4, "blendB")
    session.select(None)
    assert session.blend is None
    with pytest.raises(WorkflowError, match="select a volume"):
        session.correction_to_submit()


def test_a_volume_changed_in_place_drops_the_blend_and_has_no_study_until_identified_again():
    """A 4D sequence's browser copies another frame into the same proxy node (no other node is selected): the
    blend made from frame 3's voxels must not be submitted as frame 3's correction after stepping back."""
    session = ReviewSession()
    frame3, frame5 = dicom_identity("1.9", name="perfusion", frame=3), dicom_identity("1.9", name="perfusion", frame=5)
    session.select(frame3)
    record = session.result_arrived(frame3, "res3")
    session.blended(0.6, "blend3")
    session.input_modified()  # the browser showed frame 5 in the same node
    assert session.blend is None
    assert session.result() is None  # nothing to compare, fade or blend until identified again
    assert session.result(frame3) == record  # frame 3's result is kept for frame 3
    for refused in (session.require_study, session.require_result, lambda: session.blended(0.5, "n"),
                    session.correction_to_submit, lambda: session.verdict_request("accepted", "rita")):
        with pytest.raises(WorkflowError, match="volume changed"):
            refused()
    assert session.select(frame5) is True and session.study_stale is False
    assert session.result() is None
    session.input_modified()  # back to frame 3: identified again, its result is there, its old blend is not
    assert session.select(frame3) is True
    assert session.result() == record and session.correction_to_submit() is None


def test_a_dicom_volume_edited_in_place_is_a_new_study_without_the_series_result_or_server_id():
    """Segment Editor's "Mask volume" (or a filter) writing into a DICOM volume keeps its UIDs: the series' result
    must not be compared or blended with the edited voxels, nor the server's unedited copy denoised by its id."""
    session = ReviewSession()
    series = dicom_identity("1.2.840.7", "ct", "3: CT HEAD", instance_uids="1.2.840.7.1 1.2.840.7.2")
    loaded, masked = volume(1), volume(1)
    masked[:, :4] = -1000.0
    assert session.as_loaded(series, content_identity(loaded, EYE)) == series
    session.select(series)
    session.record_upload(series, "case_07")
    record = session.result_arrived(series, "res1", "adl_ct")
    session.blended(0.5, "blend1")
    session.input_modified()  # the voxels were masked in place
    edited = session.as_loaded(series, content_identity(masked, EYE, "3: CT HEAD"))
    assert (edited.kind, edited.modality) == ("content", "CT") and edited != series
    assert session.select(edited) is True
    assert session.result() is None and session.blend is None
    assert session.server_id() is None and session.datastore_id() != "case_07"
    assert edited.datastore_id() != series.datastore_id()  # an upload never replaces the series' copy
    with pytest.raises(WorkflowError, match="denoise the volume first"):
        session.blended(0.5, "blend2")
    assert "edited in place" in session.describe_study(edited) and series.key in session.describe_study(edited)
    assert session.describe_study(series) == series.describe()
    # another volume of the same series as loaded, or the edit undone: the series again, with its result and id
    assert session.as_loaded(series, content_identity(loaded, EYE)) == series
    session.select(series)
    assert session.result() == record and session.server_id() == "case_07"
    # per 4D frame: each frame's voxels are its own
    frame2 = dicom_identity("1.9", frame=2)
    assert session.as_loaded(frame2, content_identity(loaded, EYE, frame=2)) == frame2
    assert session.as_loaded(frame2, content_identity(masked, EYE, frame=2)).kind == "content"
    # a volume identified by content is left as it is; a scene close forgets what was loaded
    plain = content_identity(loaded, EYE)
    assert session.as_loaded(plain, content_identity(masked, EYE)) == plain
    session.scene_closed()
    assert session.as_loaded(series, content_identity(masked, EYE)) == series


def test_a_dicom_volume_edited_before_it_was_first_identified_is_told_by_the_series_files():
    """An edit made before the module first saw a DICOM volume (Mask volume right after loading): the voxels seen
    first are not the reference then, the series' files are (``files_match``, asked once per content). Files that
    cannot tell (None) leave the first voxels seen as the reference, as before."""
    session = ReviewSession()
    series = dicom_identity("1.2.840.8", "CT", "4: CT CHEST", instance_uids="1.2.840.8.1 1.2.840.8.2")
    loaded, masked = volume(2), volume(2)
    masked[:, :4] = -1000.0
    asked = []

    def files(answer):
        return lambda: asked.append(answer) or answer

    edited = session.as_loaded(series, content_identity(masked, EYE, "4: CT CHEST"), files(False))
    assert (edited.kind, edited.modality) == ("content", "CT") and edited != series
    assert "edited in place" in session.describe_study(edited)
    session.select(edited)
    session.record_upload(edited, edited.datastore_id())  # denoised as what it is: its own id, not the series'
    assert session.datastore_id(edited) != series.datastore_id()
    # identified again (Denoise, Submit): the files are not read again for the same voxels
    assert session.as_loaded(series, content_identity(masked, EYE, "4: CT CHEST"), files(False)) == edited
    assert asked == [False]
    # the edit undone: the files' voxels again, which become the reference; a later edit is told without the files
    assert session.as_loaded(series, content_identity(loaded, EYE), files(True)) == series
    assert session.as_loaded(series, content_identity(masked, EYE), files(True)).kind == "content"
    assert asked == [False, True]
    # files that cannot tell (not in the DICOM database, undecodable): the first voxels seen are the reference
    other = dicom_identity("1.2.840.9", "CT")
    assert session.as_loaded(other, content_identity(masked, EYE), files(None)) == other
    assert session.as_loaded(other, content_identity(loaded, EYE), files(None)).kind == "content"
    # a scene close forgets the answers
    session.scene_closed()
    assert session.as_loaded(series, content_identity(masked, EYE), files(True)) == series
    assert asked == [False, True, None, True]


def test_a_dicom_volume_waits_for_its_files_read_in_the_background_before_anything_is_done_for_it():
    """The module reads the series' files in the background (seconds for a large or JPEG 2000 series, which would
    freeze Slicer): while they are read the volume is its series but nothing may be sent or judged for it; the
    answer then decides (an edited volume becomes a new study), and the files are not read twice."""
    session = ReviewSession()
    series = dicom_identity("1.2.840.10", "CT", "5: CT ABDOMEN", instance_uids="1.2.840.10.1")
    loaded, masked = volume(3), volume(3)
    masked[:, :4] = -1000.0
    asked = []

    def pending():
        asked.append(FILES_PENDING)
        return FILES_PENDING

    edited_content = content_identity(masked, EYE, "5: CT ABDOMEN")
    assert session.as_loaded(series, edited_content, pending) == series
    session.select(series)
    assert session.checking(series) and not session.checking(None)
    with pytest.raises(WorkflowError, match="being compared with its DICOM files"):
        session.require_checked(series)
    with pytest.raises(WorkflowError, match="being compared with its DICOM files"):
        session.require_study()
    assert session.as_loaded(series, edited_content, pending) == series and asked == [FILES_PENDING]
    session.files_read(series, edited_content.key, False)  # the node was masked before its first selection
    edited = session.as_loaded(series, edited_content, pending)
    assert edited.kind == "content" and not session.checking(series) and asked == [FILES_PENDING]
    session.select(edited)
    assert session.require_study() == edited
    # the unedited voxels (the edit undone): read again, then the series with these voxels as its reference
    assert session.as_loaded(series, content_identity(loaded, EYE), pending) == series and session.checking(series)
    session.files_read(series, content_identity(loaded, EYE).key, True)
    assert session.as_loaded(series, content_identity(loaded, EYE), pending) == series
    assert not session.checking(series) and session.require_checked(series) == series
    # a read that could not tell (the node changed meanwhile, files unreadable): the voxels seen are the reference
    other = dicom_identity("1.2.840.11", "MR")
    assert session.as_loaded(other, content_identity(masked, EYE), pending) == other
    session.files_read(other, content_identity(masked, EYE).key, None)
    assert session.as_loaded(other, content_identity(masked, EYE), pending) == other
    assert session.as_loaded(other, content_identity(loaded, EYE), pending).kind == "content"
    session.scene_closed()
    assert not session.files_pending and not session.checking(series)


# --------------------------------------------------------------------------------------------------- background hash
def identify(session: ReviewSession, node_id: str, voxels: np.ndarray, series: StudyIdentity | None = None,
             name: str = "") -> tuple[int, BackgroundTask, VolumeSnapshot]:
    """What ADLDenoiseLogic.identify does on the GUI thread: copy the voxels (mrml.volume_snapshot), tell the
    session, hash the copy in a real background thread."""
    snapshot = VolumeSnapshot(np.array(voxels, copy=True), EYE, name, series.frame if series else None, series)
    ticket = session.identifying(node_id, series, name)
    return ticket, BackgroundTask(snapshot.content, name="identity"), snapshot


def hashed(task: BackgroundTask) -> StudyIdentity:
    assert task.wait(120) == "done", task.error
    return task.result


def files_check(checks: list, snapshot: VolumeSnapshot, files: list) -> Callable[[], object]:
    """What ADLDenoiseLogic.start_files_check does, for ``session.identified``: start the comparison of ``snapshot``
    with ``files`` in a real background thread (its task appended to ``checks``) and answer FILES_PENDING."""
    def start():
        checks.append(BackgroundTask(lambda report, cancelled: snapshot_matches_files(snapshot, files)))
        return FILES_PENDING
    return start


def big_volume(seed: int) -> np.ndarray:
    """Large enough that its hash takes a while (a 512 x 512 x 400 CT takes 0.2-0.8 s)."""
    return np.random.default_rng(seed).integers(-1024, 3000, (40, 256, 256), dtype=np.int16)


def test_a_volume_being_identified_has_no_study_and_nothing_is_sent_or_attached_for_it():
    """The content hash runs in the background (it froze Slicer 0.2-0.8 s at every selection, denoise and verdict):
    until it is in, the selected volume has no identity, so nothing may be denoised, uploaded, judged, blended or
    attached for it under the identity of the volume selected before."""
    session = ReviewSession()
    patient_a, patient_b = big_volume(1), big_volume(2)
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", patient_a, name="patient A")
    a = session.identified(ticket, hashed(task))
    assert a == content_identity(patient_a, EYE) and session.require_study() == a
    session.record_upload(a, "case_a")
    record = session.result_arrived(a, "result of A")
    session.blended(0.5, "blend of A")
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode2", patient_b, name="patient B")
    assert session.identifying_node("vtkMRMLScalarVolumeNode2") and session.study is None
    assert session.blend is None and session.result() is None
    refused = (session.require_study, session.require_identified, session.require_result, session.datastore_id,
               session.server_id, session.correction_to_submit, lambda: session.blended(0.5, "n"),
               lambda: session.verdict_request("accepted", "rita"))
    for action in refused:  # whether or not the hash has ended: only its delivery on the GUI thread counts
        with pytest.raises(WorkflowError, match="patient B is still being identified.*wait a moment"):
            action()
    assert session.result_arrived(a, "late result of A") is None  # A's late result is not B's
    hashed(task)
    with pytest.raises(WorkflowError, match="still being identified"):
        session.verdict_request("accepted", "rita")
    b = session.identified(ticket, task.result)
    assert b == content_identity(patient_b, EYE) != a and session.require_study() == b
    assert session.result() is None and session.server_id() is None and session.datastore_id() == b.datastore_id()
    assert session.result(a) == record and session.known_ids[a] == "case_a"  # A keeps its own
    # a hash that failed: nothing selected, and the reason is what every action says
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode3", patient_a, name="patient C")
    assert session.identification_failed(ticket, MemoryError("out of memory")) is True
    with pytest.raises(WorkflowError, match="could not identify patient C: out of memory"):
        session.verdict_request("accepted", "rita")
    assert session.identified(ticket, hashed(task)) is None and session.study is None


def test_a_hash_for_a_volume_no_longer_selected_is_never_applied_to_the_next_one():
    """Selection changed while hashing (another volume, none, the scene closed and node IDs restarted): the old
    volume's identity must not become the new selection's, whatever order the answers come back in."""
    session = ReviewSession()
    patient_a, patient_b = big_volume(3), big_volume(4)
    ticket_a, task_a, _ = identify(session, "vtkMRMLScalarVolumeNode1", patient_a, name="A")
    ticket_b, task_b, _ = identify(session, "vtkMRMLScalarVolumeNode2", patient_b, name="B")
    assert ticket_a != ticket_b
    assert session.identified(ticket_a, hashed(task_a)) is None  # A's answer, B selected: dropped
    assert session.identification_failed(ticket_a, "late") is False
    with pytest.raises(WorkflowError, match="B is still being identified"):
        session.require_study()
    b = session.identified(ticket_b, hashed(task_b))
    assert b == content_identity(patient_b, EYE) and session.study == b
    assert session.identified(ticket_a, task_a.result) is None and session.study == b  # later still: dropped
    # nothing selected while hashing
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", patient_a, name="A")
    session.select(None)
    assert session.identified(ticket, hashed(task)) is None and session.study is None
    # the scene closed while hashing: node IDs restart, the next scene's first node has the same ID
    ticket_old, task_old, _ = identify(session, "vtkMRMLScalarVolumeNode1", patient_a, name="A")
    session.scene_closed()
    ticket_new, task_new, _ = identify(session, "vtkMRMLScalarVolumeNode1", patient_b, name="B")
    assert session.identified(ticket_old, hashed(task_old)) is None
    assert session.identified(ticket_new, hashed(task_new)) == b


def test_nothing_is_judged_or_corrected_for_a_volume_on_screen_that_is_not_the_one_the_study_was_identified_from(
        tmp_path):
    """The study, its result and its server id belong to the node they were identified from. When the volume on
    screen is another node (the selection changed without the module being told: a handler failed half-way, a
    queue study not taken by the selector), a verdict or correction would judge, and be recorded for, another
    patient: refused first of all, before the volume is identified again, the rescale confirmation is asked or
    anything is built to send (require_on_screen, asked by require_judgeable, require_correctable and
    verdict_request with ``on_screen``), and the study marked stale, so that the volume on screen is identified
    afresh; that one gets no result of the other."""
    session = ReviewSession()
    patient_a, patient_b = volume(21), volume(22)
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", patient_a, name="patient A")
    a = session.identified(ticket, hashed(task))
    session.record_upload(a, "case_a")
    session.result_arrived(a, "result of A", "adl", result_seq=7)
    session.blended(0.5, "blend of A")
    session.require_on_screen("vtkMRMLScalarVolumeNode1")
    assert session.verdict_request("accepted", "rita", on_screen="vtkMRMLScalarVolumeNode1")["identity"] == a
    # patient B's node on screen, the session still holding A's study: refused, whichever action asks first
    other = "the volume on screen is not the one whose study the module holds .*nothing was sent"
    for action in (lambda: session.verdict_request("accepted", "rita", on_screen="vtkMRMLScalarVolumeNode2"),
                   lambda: session.verdict_request("maybe", "", on_screen="vtkMRMLScalarVolumeNode2"),
                   lambda: session.require_judgeable(on_screen="vtkMRMLScalarVolumeNode2"),
                   lambda: session.require_correctable(on_screen="vtkMRMLScalarVolumeNode2")):
        with pytest.raises(WorkflowError, match=other):
            action()
        # ... and A's study is no longer handed out for any node: stale until the node on screen is identified
        assert session.study_stale and session.blend is None and session.result() is None
        with pytest.raises(WorkflowError, match="changed since it was identified"):
            session.verdict_request("accepted", "rita")
    # the node on screen identified: B, without A's result, server id or verdict
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode2", patient_b, name="patient B")
    session.require_on_screen("vtkMRMLScalarVolumeNode2")  # (then require_study says to wait)
    b = session.identified(ticket, hashed(task))
    assert b != a and session.study_node == "vtkMRMLScalarVolumeNode2"
    with pytest.raises(WorkflowError, match="denoise the volume first"):
        session.verdict_request("accepted", "rita", on_screen="vtkMRMLScalarVolumeNode2")
    assert session.server_id(b) is None
    # another node on screen than the one being identified: refused, and that identification's answer dropped
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode3", patient_b, name="patient C")
    with pytest.raises(WorkflowError, match=other.replace("holds ", r"holds \(patient C being identified\)")):
        session.require_on_screen("vtkMRMLScalarVolumeNode1")
    assert session.identified(ticket, hashed(task)) is None and session.study is None
    # A's node on screen, identified again: its own result judged
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", patient_a, name="patient A")
    assert session.identified(ticket, hashed(task)) == a
    request = session.verdict_request("accepted", "rita", on_screen="vtkMRMLScalarVolumeNode1")
    assert (request["identity"], request["image_id"], request["result_seq"]) == (a, "case_a", 7)
    with pytest.raises(WorkflowError, match="select a CT or MR volume first"):
        session.require_on_screen(None)
    session.select(None)
    session.require_on_screen("vtkMRMLScalarVolumeNode1")  # nothing handed out: require_study says why
    # a volume whose frames hold wrong values: another node on screen is refused before its frames are judged
    as_slicer_loads, _, wrong, series = _enhanced_ct_with_and_without_own_rescales(tmp_path, 23, "1.2.840.69")
    session = _session_compared_with(wrong, as_slicer_loads, series)
    assert session.study_node == "vtkMRMLScalarVolumeNode1"  # kept when the files' answer selected the study
    for check in (session.require_judgeable, session.require_correctable):
        with pytest.raises(WorkflowError, match="not sent: frames 3-4 of enhanced.dcm"):
            check(on_screen="vtkMRMLScalarVolumeNode1")
    with pytest.raises(WorkflowError, match=other):
        session.require_judgeable(on_screen="vtkMRMLScalarVolumeNode5")


def test_a_volume_edited_while_its_copy_was_hashed_is_identified_again_from_its_new_voxels():
    """The node changed (an edit in place, another 4D frame) after its voxels were copied for the hash: that hash
    names the old voxels and is dropped; the study comes from a hash of the new ones. A DICOM volume edited that
    way is a new study (its series' result and server id are not used for it)."""
    session = ReviewSession()
    loaded = big_volume(5)
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", loaded, name="A")
    masked = loaded.copy()
    masked[:, :100] = -1000  # edited in the node after the copy (the copy is untouched)
    session.input_modified()  # the widget's observer of INPUT_CHANGE_EVENTS
    assert session.identified(ticket, hashed(task)) is None and session.study is None
    assert task.result == content_identity(loaded, EYE)  # the copy's hash: the old voxels
    with pytest.raises(WorkflowError, match="volume changed since it was identified.*identified again"):
        session.require_study()
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", masked, name="A")
    assert session.identified(ticket, hashed(task)) == content_identity(masked, EYE)
    # a DICOM series: identified as its series, edited while being identified again: a new study by content
    series = dicom_identity("1.2.840.77", "CT", "3: CT HEAD", instance_uids="1.2.840.77.1")
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode2", loaded, series, "3: CT HEAD")
    assert session.identified(ticket, hashed(task)) == series
    session.record_upload(series, "case_07")
    record = session.result_arrived(series, "result of the series")
    session.input_modified()
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode2", loaded, series, "3: CT HEAD")
    session.input_modified()  # masked again during that hash
    assert session.identified(ticket, hashed(task)) is None
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode2", masked, series, "3: CT HEAD")
    edited = session.identified(ticket, hashed(task))
    assert (edited.kind, edited.modality) == ("content", "CT") and "edited in place" in session.describe_study(edited)
    assert session.result() is None and session.server_id() is None and session.result(series) == record


def test_voxels_changed_without_slicer_being_told_are_never_sent_under_the_identity_of_the_old_ones():
    """A script writing into the node's array without arrayFromVolumeModified fires no event, so the module does not
    identify the volume again; the hash used to be recomputed on the GUI thread at every Denoise and verdict for
    this. Now the copy taken when a request starts (with its export) is hashed first in the request's own
    background task: other voxels than those identified stop it before anything is sent."""
    session = ReviewSession()
    voxels = big_volume(8)
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", voxels, name="A")
    study = session.identified(ticket, hashed(task))
    assert session.study_content == study  # what the request's check compares with
    sent = []

    def request(check, report=None, cancelled=None):  # what ADLDenoiseLogic.denoise_file / study_id_for do
        verify_snapshot(*check, report=report)
        sent.append("uploaded")
        return "done"

    unchanged = BackgroundTask(request, (VolumeSnapshot(voxels.copy(), EYE, "A"), session.study_content))
    assert unchanged.wait(120) == "done" and sent == ["uploaded"]
    voxels[:, :40] = -1000  # written into the node's array, Slicer not told: no input_modified
    assert session.require_study() == study
    changed = BackgroundTask(request, (VolumeSnapshot(voxels.copy(), EYE, "A"), session.study_content))
    assert changed.wait(120) == "failed" and sent == ["uploaded"]
    assert isinstance(changed.error, VolumeChanged) and "nothing was sent" in str(changed.error)
    # another 4D frame with the same voxels is another study too
    with pytest.raises(VolumeChanged):
        verify_snapshot(VolumeSnapshot(voxels.copy(), EYE, "A", frame=2), content_identity(voxels, EYE))
    verify_snapshot(None, study)  # nothing to compare: the module always has both
    # a DICOM series identified from its voxels: the same check
    series = dicom_identity("1.2.840.99", "CT", "S", instance_uids="1.2.840.99.1")
    ticket, task, snapshot = identify(session, "vtkMRMLScalarVolumeNode2", voxels, series, "S")
    assert session.identified(ticket, hashed(task)) == series
    verify_snapshot(snapshot, session.study_content)
    with pytest.raises(VolumeChanged):
        verify_snapshot(VolumeSnapshot(voxels + 1, EYE, "S", None, series), session.study_content)


def write_series(folder, voxels: np.ndarray) -> list[str]:
    """A small CT series (one file per slice, int16, rescale -1024) written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, plane in enumerate(voxels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{index}.dcm"
        dataset = Dataset()
        dataset.file_meta = meta
        dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        dataset.Modality, dataset.PhotometricInterpretation, dataset.SamplesPerPixel = "CT", "MONOCHROME2", 1
        dataset.Rows, dataset.Columns = plane.shape
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
        dataset.PixelData = (plane + 1024).astype("<i2").tobytes()
        write_dicom(path, dataset)  # explicit VR little endian, as its transfer syntax says
        paths.append(str(path))
    return paths


def test_a_dicom_volume_is_compared_with_its_files_from_the_copy_hashed_and_decided_without_a_second_hash(
        tmp_path):
    """The series' files are compared in the background with the very copy whose hash identified the volume (not
    with the node, which may have changed meanwhile, nor hashed again on the GUI thread): the answer decides the
    study as soon as it is in, and nothing is sent for the volume before."""
    voxels = np.random.default_rng(6).integers(-1000, 1000, (4, 16, 12), dtype=np.int16).astype(np.float32)
    files = write_series(tmp_path / "series", voxels)
    masked = voxels.copy()
    masked[:, :5] = -1000.0  # Mask volume, before the module first saw the volume
    series = dicom_identity("1.2.840.88", "CT", "4: CT CHEST", instance_uids="1.2.840.88.1")
    for held, expected in ((voxels, "series"), (masked, "edited")):
        session = ReviewSession()
        ticket, task, snapshot = identify(session, "vtkMRMLScalarVolumeNode1", held, series, "4: CT CHEST")
        checks = []
        content = hashed(task)
        assert session.identified(ticket, content, files_check(checks, snapshot, files)) == series and len(checks) == 1
        with pytest.raises(WorkflowError, match="being compared with its DICOM files"):
            session.require_study()
        assert checks[0].wait(120) == "done" and checks[0].result.matches is (expected == "series")
        assert checks[0].result.ignored_rescales == ()  # one file per slice, each with its own rescale: none ignored
        study = session.files_read(series, content.key, checks[0].result)
        assert study == session.require_study()
        assert (study == series) if expected == "series" else (study.kind == "content" and study != series)
    # an answer for voxels the selection no longer holds is kept for them, and selects nothing
    session = ReviewSession()
    ticket, task, snapshot = identify(session, "vtkMRMLScalarVolumeNode1", masked, series, "4: CT CHEST")
    content = hashed(task)
    session.identified(ticket, content, lambda: FILES_PENDING)
    session.input_modified()
    assert session.files_read(series, content.key, False) is None and session.study_stale
    ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", masked, series, "4: CT CHEST")
    assert session.identified(ticket, hashed(task), lambda: pytest.fail("read twice")).kind == "content"


def test_a_dicom_volume_whose_files_cannot_tell_says_why_on_its_status_line(tmp_path):
    """Files that give no reference (here colour: Slicer loads them as a vector volume, not as the scalar volume
    selected): the background comparison answers a NoReference; the voxels first seen become the reference, and the
    status line says that the volume was not compared with its files, and why, instead of nothing."""
    import pydicom

    voxels = np.random.default_rng(7).integers(-1000, 1000, (3, 16, 12), dtype=np.int16).astype(np.float32)
    files = write_series(tmp_path / "series", voxels)
    for path in files:  # the same files in colour (RGB, 8 bits per sample)
        dataset = pydicom.dcmread(path)
        grey = np.clip((dataset.pixel_array.astype(np.int64) + 1000) // 8, 0, 255).astype(np.uint8)
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
        dataset.PixelData = np.stack([grey, grey, grey], -1).tobytes()
        dataset.save_as(path)
    series = dicom_identity("1.2.840.77", "CT", "4: CT CHEST", instance_uids="1.2.840.77.1")
    session = ReviewSession()
    ticket, task, snapshot = identify(session, "vtkMRMLScalarVolumeNode1", voxels, series, "4: CT CHEST")
    checks = []
    content = hashed(task)
    assert session.identified(ticket, content, files_check(checks, snapshot, files)) == series
    assert checks[0].wait(120) == "done" and checks[0].result.matches is None and checks[0].result.untold
    assert session.files_read(series, content.key, checks[0].result) == series == session.require_study()
    line = session.describe_study(series)
    assert line.startswith(series.describe()) and "not compared with its DICOM files" in line
    assert "colour" in line and "vector" in line
    # the voxels first seen are the reference: a later edit is told without the files
    edited = voxels.copy()
    edited[:, :4] = -1000.0
    assert session.as_loaded(series, content_identity(edited, EYE)).kind == "content"
    # a series whose files tell says nothing of them; a scene close forgets the reason
    told = dicom_identity("1.2.840.78", "CT")
    assert session.as_loaded(told, content_identity(voxels, EYE), lambda: True) == told
    assert session.describe_study(told) == told.describe()
    session.scene_closed()
    assert session.describe_study(series) == series.describe()


def write_enhanced_ct(path, stored: np.ndarray, rescales: list[tuple[str, str]]) -> str:
    """One Enhanced CT file (int16 frames ``stored``, frame x rows x columns) whose frames carry their own rescale
    (per-frame Pixel Value Transformation), written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = generate_uid()
    dataset.SeriesInstanceUID, dataset.Modality = generate_uid(), "CT"
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = stored.shape[1], stored.shape[2], stored.shape[0]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    frames = []
    for slope, intercept in rescales:
        item, transformation = Dataset(), Dataset()
        transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = \
            slope, intercept, "HU"
        item.PixelValueTransformationSequence = [transformation]
        frames.append(item)
    dataset.SharedFunctionalGroupsSequence = [Dataset()]
    dataset.PerFrameFunctionalGroupsSequence = frames
    dataset.PixelData = stored.astype("<i2").tobytes()
    write_dicom(path, dataset)  # explicit VR little endian, as its transfer syntax says
    return str(path)


def test_a_dicom_volume_with_frames_whose_rescale_slicer_ignored_is_sent_only_once_the_user_confirms(tmp_path):
    """An Enhanced CT file whose frames 3-4 carry their own rescale: Slicer's reader applies the first frame's to all,
    so those frames' values are wrong in the volume. The comparison with the files (the same background read) names
    them; the status line warns, and nothing is sent for the volume (Denoise, a verdict, a correction all go through
    require_study; a verdict and a correction are refused outright: the next test) until the user confirms, once
    per files in the scene, also for the volume edited in place. Files
    whose frames share one rescale say nothing; a scene close forgets both the warning and the confirmation."""
    stored = np.random.default_rng(8).integers(0, 2000, (4, 16, 12), dtype=np.int16)
    as_slicer_loads = (stored.astype(np.float32) - 1024.0)  # the first frame's rescale applied to every frame
    own = [("1", "-1024"), ("1", "-1024"), ("2", "-1024"), ("2", "-1024")]
    files = {"per frame": [write_enhanced_ct(tmp_path / "enhanced.dcm", stored, own)],
             "one": [write_enhanced_ct(tmp_path / "one.dcm", stored, [("1", "-1024")] * 4)]}
    series = dicom_identity("1.2.840.66", "CT", "5: Enhanced CT", instance_uids="1.2.840.66.1")
    session = ReviewSession()
    answers = {}
    for kind in ("per frame", "one"):
        if kind == "one":
            session.scene_closed()
        ticket, task, snapshot = identify(session, "vtkMRMLScalarVolumeNode1", as_slicer_loads, series, "Enhanced")
        checks = []
        content = hashed(task)
        assert session.identified(ticket, content, files_check(checks, snapshot, files[kind])) == series
        assert checks[0].wait(120) == "done" and checks[0].result.matches is True
        answers[kind] = checks[0].result
        assert session.files_read(series, content.key, checks[0].result) == series == session.require_identified()
    # files whose frames share one rescale: nothing to warn of, the volume is sent as before
    assert answers["one"].ignored_rescales == () and session.rescale_warning(series) == ""
    assert session.require_study() == series and session.describe_study(series) == series.describe()
    # frames 3-4: named on the status line, and nothing is sent before the user confirms
    session.scene_closed()
    ticket, task, snapshot = identify(session, "vtkMRMLScalarVolumeNode1", as_slicer_loads, series, "Enhanced")
    content = hashed(task)
    assert session.identified(ticket, content, lambda: answers["per frame"]) == series
    warning = session.rescale_warning(series)
    assert warning.startswith("frames 3-4 of enhanced.dcm (2 of 4) carry their own rescale (slope 2, intercept "
                              "-1024) that Slicer's reader ignored (it applied slope 1, intercept -1024")
    assert "their values in this volume are wrong" in warning and "applies each frame's rescale" in warning
    line = session.describe_study(series)
    assert line.startswith(f"WARNING: {warning}") and "confirmation" in line and series.describe() in line
    for send in (session.require_study, session.datastore_id):
        with pytest.raises(RescaleNotApplied, match="frames 3-4 of enhanced.dcm") as refused:
            send()
    assert "not sent" in str(refused.value) and refused.value.identity == series
    assert "anyway?" in refused.value.question and warning in refused.value.question
    declined = refused.value.declined()
    assert isinstance(declined, NotConfirmed) and isinstance(declined, WorkflowError) and "not sent" in str(declined)
    session.accept_ignored_rescale(refused.value.identity)
    assert session.require_study() == series
    assert session.describe_study(series).startswith("WARNING: frames 3-4")  # still wrong values: still said
    # edited in place after the confirmation: a new study of the same wrong values, warned of, not asked again
    edited_voxels = as_slicer_loads.copy()
    edited_voxels[:, :4] = -1000.0
    edited = session.as_loaded(series, content_identity(edited_voxels, EYE))
    assert edited.kind == "content" and session.rescale_warning(edited) == warning
    assert session.require_rescale_accepted(edited) == edited
    assert session.describe_study(edited).startswith("WARNING: frames 3-4") and "edited in place" in \
        session.describe_study(edited)
    # a scene close forgets the confirmation (and the warning, until the files are read again)
    session.scene_closed()
    assert session.rescale_warning(series) == "" and not session.rescales_accepted
    assert session.as_loaded(series, content, lambda: answers["per frame"]) == series
    with pytest.raises(RescaleNotApplied):
        session.require_rescale_accepted(series)


def _enhanced_ct_with_and_without_own_rescales(tmp_path, seed: int, uid: str):
    """One enhanced CT's voxels as Slicer's reader loads them (one rescale, slope 1, intercept -1024), written as a
    file whose frames 3-4 carry their own rescale (slope 2: those frames' values wrong as loaded) and as one whose
    frames share the loaded rescale, and the series' identity: (voxels, [right file], [wrong file], identity)."""
    stored = np.random.default_rng(seed).integers(0, 2000, (4, 16, 12), dtype=np.int16)
    own = [("1", "-1024"), ("1", "-1024"), ("2", "-1024"), ("2", "-1024")]
    wrong = [write_enhanced_ct(tmp_path / "enhanced.dcm", stored, own)]
    right = [write_enhanced_ct(tmp_path / "one.dcm", stored, [("1", "-1024")] * 4)]
    series = dicom_identity(uid, "CT", "5: Enhanced CT", instance_uids=f"{uid}.1")
    return stored.astype(np.float32) - 1024.0, right, wrong, series


def _session_compared_with(files: list, as_slicer_loads: np.ndarray, series) -> ReviewSession:
    """A new session whose selected volume (``as_slicer_loads``, identified as ``series``) was compared with its
    DICOM ``files`` as the module does (identified, then the files read in the background)."""
    session = ReviewSession()
    ticket, task, snapshot = identify(session, "vtkMRMLScalarVolumeNode1", as_slicer_loads, series, "Enhanced")
    check = BackgroundTask(lambda report, cancelled: snapshot_matches_files(snapshot, files))
    assert session.identified(ticket, hashed(task), lambda: FILES_PENDING) == series
    assert check.wait(120) == "done", check.error
    assert session.files_read(series, snapshot.content().key, check.result) == series
    return session


def test_a_result_denoised_from_frames_with_wrong_values_carries_the_warning_and_is_never_sent_as_a_correction(
        tmp_path):
    """A result computed from a volume whose frames hold wrong values (their own rescale ignored by Slicer's reader)
    is as wrong on those frames: once the user confirmed sending it, the result's status line starts with the
    warning (ReviewSession.describe_result) and result_warning gives the note its node carries (mrml.load_result,
    tested with slicer-core in test_mrml_logic); also for the volume edited in place. A result of files whose frames
    share one rescale says nothing more than before."""
    as_slicer_loads, right, wrong, series = _enhanced_ct_with_and_without_own_rescales(tmp_path, 9, "1.2.840.67")
    line = "denoised with adl (CT: the series' DICOM Modality; weights 3) in 2.1 s"
    for files in (right, wrong):
        session = _session_compared_with(files, as_slicer_loads, series)
        if files is right:  # nothing to warn of: the result's line is the module's; a correction goes as before
            assert session.result_warning(series) == "" and session.describe_result(series, line) == line
            assert session.result_arrived(session.require_study(), "vtkMRMLScalarVolumeNode2", "adl") is not None
            assert session.require_correctable() == series
            assert session.correction_to_submit(series) is None  # no blend yet: the caller blends now
            continue
        session.accept_ignored_rescale(session.require_identified())
        assert session.result_arrived(session.require_study(), "vtkMRMLScalarVolumeNode2", "adl") is not None
        warning = session.result_warning(series)
        assert warning.startswith("WARNING: denoised from wrong values: frames 3-4 of enhanced.dcm (2 of 4) carry "
                                  "their own rescale (slope 2, intercept -1024) that Slicer's reader ignored")
        assert "this result's on those frames" in warning and "denoise it again" in warning
        assert session.describe_result(series, line) == f"{warning}. {line}"
        # a correction of it is never sent, confirmed or not: fine-tuning would learn the wrong values
        for refuse in (session.require_correctable, lambda: session.correction_to_submit(series)):
            with pytest.raises(WorkflowError, match="a correction of this volume is not sent: frames 3-4 of enhanced"):
                refuse()
        # edited in place: a new study of the same wrong values, its result warned of too
        edited_voxels = as_slicer_loads.copy()
        edited_voxels[:, :4] = -1000.0
        edited = session.as_loaded(series, content_identity(edited_voxels, EYE))
        assert edited.kind == "content" and session.result_warning(edited) == warning
        assert session.describe_result(edited, line).startswith("WARNING: denoised from wrong values: frames 3-4")
        # a volume not from those files: nothing
        plain = content_identity(volume(3), EYE, "plain")
        assert session.result_warning(plain) == "" and session.describe_result(plain, line) == line


def test_a_verdict_on_a_result_denoised_from_frames_with_wrong_values_is_never_sent(tmp_path):
    """A result computed from a volume whose frames hold wrong values (their own rescale ignored by Slicer's reader)
    was denoised from an input the model should never have had: a verdict on it (accepted, rejected or corrected)
    would judge the model on that input and feed the review queue and fine-tuning, so verdict_request refuses it,
    before the user is asked to confirm sending the volume and also once they confirmed, saying why and what to do
    (require_judgeable, which ADLDenoiseLogic.submit_verdict asks too); also for the volume edited in place. The
    same volume read from files whose frames share one rescale is judged as before."""
    as_slicer_loads, right, wrong, series = _enhanced_ct_with_and_without_own_rescales(tmp_path, 10, "1.2.840.68")
    refusal = "a verdict on this volume's result is not sent: frames 3-4 of enhanced.dcm"
    for files in (right, wrong):
        session = _session_compared_with(files, as_slicer_loads, series)
        if files is right:
            assert session.result_arrived(session.require_study(), "vtkMRMLScalarVolumeNode2", "adl") is not None
            assert session.require_judgeable() == series
            assert session.verdict_request("accepted", "dr_a")["identity"] == series
            continue
        # not confirmed yet: refused as a verdict (no question to confirm sending a volume whose verdict is refused)
        with pytest.raises(WorkflowError, match=refusal) as refused:
            session.verdict_request("accepted", "dr_a")
        assert not isinstance(refused.value, RescaleNotApplied)
        message = str(refused.value)
        assert "judge the model on an input it should never have had" in message
        assert "Load the series with a reader that applies each frame's rescale" in message and \
            "denoise it again, then give the verdict" in message
        # confirmed and denoised: the result's verdict is still refused, whichever verdict
        session.accept_ignored_rescale(session.require_identified())
        assert session.result_arrived(session.require_study(), "vtkMRMLScalarVolumeNode2", "adl") is not None
        for verdict, reason in (("accepted", None), ("rejected", "streaks"), ("corrected", None)):
            with pytest.raises(WorkflowError, match=refusal):
                session.verdict_request(verdict, "dr_a", reason)
        with pytest.raises(WorkflowError, match=refusal):
            session.require_judgeable(series)
        # edited in place: a new study of the same wrong values, its result's verdict refused too
        edited_voxels = as_slicer_loads.copy()
        edited_voxels[:, :4] = -1000.0
        edited = session.as_loaded(series, content_identity(edited_voxels, EYE))
        session.select(edited)
        assert session.result_arrived(edited, "vtkMRMLScalarVolumeNode3", "adl") is not None
        with pytest.raises(WorkflowError, match=refusal):
            session.verdict_request("accepted", "dr_a")
        # another volume of the scene, not from those files: judged as before
        plain = content_identity(volume(3), EYE, "plain")
        session.select(plain)
        assert session.result_arrived(plain, "vtkMRMLScalarVolumeNode4", "adl") is not None
        assert session.verdict_request("accepted", "dr_a")["identity"] == plain


def test_the_frames_whose_rescale_slicer_ignored_are_named_whichever_file_stops_the_comparison(tmp_path):
    """A series whose files include one that cannot be read (missing, not DICOM): no reference, and the reason names
    that file, but the headers of every other file are still read, so that the frames whose own rescale Slicer's
    reader ignored are named whatever the files' order (they were not when the unreadable file came first). One of
    the files has a per-frame functional group sequence larger than what a header-only read loads at once (read
    back when looked at). Through the background check and the session: the status line both warns and says why
    the volume was not compared with its files, and nothing is sent before the user confirms."""
    import pydicom
    from ADLDenoiseLib import series_files
    from ADLDenoiseLib.series_files import NoReference, read_series_values

    rng = np.random.default_rng(10)
    many = write_enhanced_ct(tmp_path / "many.dcm", rng.integers(0, 2000, (1200, 16, 12), dtype=np.int16),
                             [("1", "-1024")] * 600 + [("2", "-1024")] * 600)
    few = write_enhanced_ct(tmp_path / "few.dcm", rng.integers(0, 2000, (4, 16, 12), dtype=np.int16),
                            [("1", "-1024"), ("1", "-1024"), ("2", "-1024"), ("2", "-1024")])
    raw = dict(pydicom.dcmread(many, defer_size=series_files._HEADER_ONLY).items())  # elements as read, unconverted
    assert raw[pydicom.tag.Tag("PerFrameFunctionalGroupsSequence")].value is None  # deferred: read when looked at
    missing, not_dicom = str(tmp_path / "missing.dcm"), tmp_path / "not_dicom.dcm"
    not_dicom.write_bytes(b"not a DICOM file")
    expected = {"many.dcm": (tuple(range(601, 1201)), 1200), "few.dcm": ((3, 4), 4)}
    for paths, bad in (([missing, many, few], "missing.dcm"), ([many, missing, few], "missing.dcm"),
                       ([many, few, missing], "missing.dcm"), ([str(not_dicom), few, many], "not_dicom.dcm"),
                       ([few, str(not_dicom), missing, many], "not_dicom.dcm")):
        values = read_series_values(paths)
        assert isinstance(values, NoReference) and values.reason.startswith(f"its file {bad} cannot be read"), paths
        named = {item.file: (item.frames, item.total) for item in values.ignored_rescales}
        assert named == expected, paths
    # the comparison of a volume with those files, as the module runs it
    series = dicom_identity("1.2.840.68", "CT", "6: Enhanced CT", instance_uids="1.2.840.68.1")
    session = ReviewSession()
    voxels = np.zeros((1204, 16, 12), np.float32)
    ticket, task, snapshot = identify(session, "vtkMRMLScalarVolumeNode1", voxels, series, "Enhanced")
    check = BackgroundTask(lambda report, cancelled: snapshot_matches_files(snapshot, [missing, few, many]))
    assert session.identified(ticket, hashed(task), lambda: FILES_PENDING) == series
    assert check.wait(120) == "done", check.error
    assert check.result.matches is None and "missing.dcm cannot be read" in check.result.untold
    assert session.files_read(series, snapshot.content().key, check.result) == series
    line = session.describe_study(series)
    assert line.startswith("WARNING: frames 3-4 of few.dcm (2 of 4) carry their own rescale") and \
        "frames 601-1200 of many.dcm (600 of 1200)" in line
    assert "not compared with its DICOM files: its file missing.dcm cannot be read" in line
    with pytest.raises(RescaleNotApplied, match="frames 601-1200 of many.dcm"):
        session.require_study()


def test_a_dicom_volume_whose_files_cannot_be_found_says_why_on_its_status_line(tmp_path):
    """The files of a DICOM volume are found in Slicer's DICOM database by the SOP Instance UIDs of its
    subject-hierarchy item (find_series_files: what ADLDenoiseLogic.series_files_of hands the database's
    fileForInstance to). When they cannot be found, the answer says why (a NoReference, as for files that cannot
    tell), and the status line says that the volume was not compared with its DICOM files and why, instead of
    nothing: a 4D sequence frame, a volume not loaded from DICOM files (no instance UIDs), no open DICOM database,
    instances the database does not hold. Found, the files are the database's, in the instances' order."""
    from ADLDenoiseLib.series_files import NoReference, find_series_files

    files = write_series(tmp_path / "series", volume(4))
    database = {f"1.2.840.69.{index}": path for index, path in enumerate(files)}  # instance UID -> its file
    uids = " ".join(database)
    assert find_series_files(uids, database.get) == files
    assert find_series_files(list(database), database.get) == files
    reasons = {
        "frame": find_series_files(uids, database.get, frame=2),
        "no instances": find_series_files("", database.get),
        "no database": find_series_files(uids, None),
        "not in it": find_series_files(uids + " 1.2.840.69.99", database.get),
    }
    assert all(isinstance(answer, NoReference) for answer in reasons.values()), reasons
    assert "frame 3 of a 4D sequence" in reasons["frame"].reason
    assert "not loaded from DICOM files" in reasons["no instances"].reason
    assert "DICOM database is not open" in reasons["no database"].reason
    assert "1 of its 4 DICOM instances are not in Slicer's DICOM database" in reasons["not in it"].reason
    voxels = volume(5)
    for why, answer in reasons.items():
        series = dicom_identity("1.2.840.69", "CT", "7: CT", frame=2 if why == "frame" else None,
                                instance_uids=uids)
        session = ReviewSession()
        ticket, task, _ = identify(session, "vtkMRMLScalarVolumeNode1", voxels, series, "7: CT")
        # what ADLDenoiseLogic.start_files_check answers when the files cannot be found: the reason, at once
        assert session.identified(ticket, hashed(task), lambda: answer) == series == session.require_study()
        line = session.describe_study(series)
        assert line.startswith(series.describe()) and \
            f"(not compared with its DICOM files: {answer.reason}; an edit made before" in line, line
        if why == "frame":  # a 4D frame's status line names the frame sent (ADLDenoiseWidget.frameText), then why
            frame = "4D sequence: frame 3 of 5 (12 s) is sent; its result is kept for that frame"
            assert session.describe_study(series, frame) == \
                f"{frame} (not compared with its DICOM files: {answer.reason}; an edit made before it was first " \
                "selected is not seen, later ones are)"
        # the voxels first seen are the reference: a later edit is told without the files
        edited = voxels.copy()
        edited[:, :2] = -1000.0
        assert session.as_loaded(series, content_identity(edited, EYE, frame=series.frame)).kind == "content"


def test_the_content_hash_of_a_copy_is_the_identity_the_volume_always_had():
    """Hashing a contiguous copy in one call gives the key the slice-by-slice hash gave (server ids derive from
    it: a study stored before must keep its id), for any dtype, byte order and memory layout."""
    import hashlib

    def slice_by_slice(voxels, matrix):
        digest = hashlib.sha256()
        digest.update(f"{voxels.dtype.str}|{voxels.shape}|".encode())
        digest.update(np.round(np.asarray(matrix, np.float64), 6).tobytes())
        for plane in voxels:
            digest.update(np.ascontiguousarray(plane).tobytes())
        return digest.hexdigest()

    rng = np.random.default_rng(7)
    for dtype in ("<i2", ">i2", "u1", "<f4", ">f8", "bool"):
        values = rng.normal(0, 100, (5, 7, 9)).astype(dtype)
        for voxels in (values, values[:, ::-1], np.asfortranarray(values), values[::2]):
            key = slice_by_slice(voxels, EYE)
            assert content_identity(voxels, EYE).key == key, dtype
            assert VolumeSnapshot(np.array(voxels, copy=True), EYE).content().key == key, dtype


# --------------------------------------------------------------------------------------------------- server ids
def test_datastore_ids_derive_from_identity_unless_the_server_gave_one():
    session = ReviewSession()
    a = dicom_identity("1.1", name="3: CT HEAD")
    session.select(a)
    assert session.datastore_id() == a.datastore_id() and not session.is_on_server()
    assert session.server_id() is None  # not held by the server: denoised as an uploaded file
    queue = content_identity(volume(), EYE, "head_a")
    session.record_upload(queue, "head_a", None)  # came from the review queue under the server's id
    assert session.datastore_id(queue) == "head_a" and session.is_on_server(queue)
    assert session.server_id(queue) == "head_a"  # denoised there by id: the server records it as head_a's result
    session.record_upload(queue, "head_a")  # same again: fine
    with pytest.raises(WorkflowError, match="already stored as"):
        session.record_upload(queue, "head_b")
    with pytest.raises(WorkflowError, match="without a study id"):
        session.record_upload(a, "")


def test_connecting_to_another_server_forgets_the_ids_the_last_one_gave():
    """Review-queue ids are the server's own names: after connecting elsewhere, a study known as "case_07" on the
    first server must be uploaded again (under its derived id), never sent to the second server's "case_07"."""
    session = ReviewSession()
    assert session.connected_to("http://10.0.0.1:8000") is False  # the first connection forgets nothing
    queue = content_identity(volume(), EYE, "head_a")
    session.select(queue)
    session.record_upload(queue, "case_07", "/tmp/case_07.nii.gz")
    session.verdict_recorded(queue, {"verdict": "accepted"})
    assert session.connected_to("http://10.0.0.1:8000/") is False  # the same server again: kept
    assert session.datastore_id(queue) == "case_07" and session.is_on_server(queue)
    assert session.connected_to("http://10.0.0.2:8000") is True
    assert not session.is_on_server(queue) and session.datastore_id(queue) == queue.datastore_id()
    assert session.study_files == {} and session.verdicts == {}
    assert session.study == queue  # the selection stays
    session.record_upload(queue, queue.datastore_id())  # uploaded to the new server: no "already stored as"


# --------------------------------------------------------------------------------------------------- verdicts
def test_verdicts_are_validated_and_recorded_for_the_study_they_were_sent_for():
    session = ReviewSession()
    with pytest.raises(WorkflowError, match="select a volume"):
        session.verdict_request("accepted", "dr_a")
    a, b = dicom_identity("1.1", name="A"), dicom_identity("1.2", name="B")
    session.select(a)
    with pytest.raises(WorkflowError, match="reviewer"):
        session.verdict_request("accepted", "  ")
    with pytest.raises(WorkflowError, match="reason"):
        session.verdict_request("rejected", "dr_a", " ")
    with pytest.raises(WorkflowError, match="verdict must be"):
        session.verdict_request("maybe", "dr_a")
    # a verdict judges the result the reviewer looked at: none without one, and it names that result's model (the
    # server otherwise judges the latest result of any model, e.g. a batch run's, as accepted)
    for verdict, reason in (("accepted", None), ("rejected", "streaks")):
        with pytest.raises(WorkflowError, match="denoise the volume first"):
            session.verdict_request(verdict, "dr_a", reason)
    session.result_arrived(a, "res_a", "tddl_gcn", "v3")
    request = session.verdict_request("accepted", " dr_a ")
    assert request["identity"] == a and request["image_id"] == a.datastore_id() and request["reviewer"] == "dr_a"
    assert request["model"] == "tddl_gcn"
    session.select(b)  # the user moves on before the answer comes
    entry = session.verdict_recorded(request["identity"], {"verdict": "accepted", "reviewer": "dr_a"})
    assert session.verdicts == {a: entry}
    for empty in (None, "", {}):
        with pytest.raises(WorkflowError, match="empty body"):
            session.verdict_recorded(b, empty)
    with pytest.raises(WorkflowError, match="holds no verdict"):
        session.verdict_recorded(b, {"status": "ok"})


def test_signed_in_the_reviewer_name_may_be_empty_without_a_login_it_is_required():
    """With a login (auth on) the server records the token's user and ignores the body's name: the module sends
    the login's user name when the field is empty ("" with a token alone: the server decides). Without a login the
    name entered is the only record of who judged: required."""
    session = ReviewSession()
    a = dicom_identity("1.1", name="A")
    session.select(a)
    session.result_arrived(a, "res_a", "nlm", "", 7)
    session.connected_to("http://10.0.0.1:8000")
    for empty in (None, "", "  "):
        with pytest.raises(WorkflowError, match="enter your name as reviewer"):
            session.verdict_request("accepted", empty)
        with pytest.raises(WorkflowError, match="enter your name as reviewer"):
            session.reviewer_name(empty)  # what Submit correction checks before exporting anything
    session.connected_to("http://10.0.0.1:8000", login="rita")
    assert session.verdict_request("accepted", "")["reviewer"] == "rita"
    assert session.verdict_request("corrected", None)["reviewer"] == "rita"
    assert session.verdict_request("accepted", " dr_a ")["reviewer"] == "dr_a"  # a name entered is sent as before
    session.connected_to("http://10.0.0.1:8000", login="")  # a token given without a user name
    assert session.verdict_request("accepted", "  ")["reviewer"] == ""
    session.connected_to("http://10.0.0.1:8000")  # connected again without a login: required again
    with pytest.raises(WorkflowError, match="enter your name as reviewer"):
        session.verdict_request("accepted", "")


def test_a_verdict_names_the_result_on_screen_and_a_refused_one_forgets_its_result_and_server_id():
    """The verdict names the server's entry of the result shown (``result_seq``: judged or refused by the server,
    never another run's); a result another server made is not judged here; after a refusal (the server's study
    under that id is not what was denoised) the result and the server id are forgotten, so the next Denoise sends
    the volume again instead of denoising whatever the server now holds under the id."""
    session = ReviewSession()
    session.connected_to("http://10.0.0.1:8000")
    a = content_identity(volume(1), EYE, "head_a")
    session.select(a)
    session.record_upload(a, "case_07", "/tmp/case_07.nii.gz")
    session.result_arrived(a, "res_a", "nlm", "", 41)
    request = session.verdict_request("accepted", "dr_a")
    assert (request["image_id"], request["model"], request["result_seq"]) == ("case_07", "nlm", 41)
    for odd in (None, "41", True):  # an older server's answer without an entry number: the model only
        session.result_arrived(a, "res_a", "nlm", "", odd)
        assert session.verdict_request("accepted", "dr_a")["result_seq"] is None
    session.result_arrived(a, "res_a", "nlm", "", 42)
    session.blended(0.5, "blend_a")
    session.verdict_refused(a)
    assert session.result(a) is None and session.blend is None and not session.is_on_server(a)
    assert session.datastore_id(a) == a.datastore_id()
    with pytest.raises(WorkflowError, match="denoise the volume first"):
        session.verdict_request("accepted", "dr_a")
    # a result made by the server connected before: its entry numbers are other results on this one
    session.record_upload(a, a.datastore_id())
    session.result_arrived(a, "res_a", "nlm", "", 43)
    session.connected_to("http://10.0.0.2:8000")
    with pytest.raises(WorkflowError, match="made by http://10.0.0.1:8000.*denoise the volume again"):
        session.verdict_request("accepted", "dr_a")


def test_the_status_line_says_whose_verdict_a_verdict_replaced():
    entry = {"verdict": "accepted", "time_utc": "2026-12-06T10:00:00Z"}
    assert describe_verdict(entry) == "accepted (2026-12-06T10:00:00Z)"
    entry["replaces"] = {"verdict": "unreviewed", "reviewer": "admin"}  # a reset of the queue judged nothing
    assert describe_verdict(entry) == "accepted (2026-12-06T10:00:00Z)"
    entry["replaces"] = {"verdict": "rejected", "reviewer": "dr_a", "time_utc": "2026-12-06T09:00:00Z",
                         "reason": "blurred a lesion"}
    assert describe_verdict(entry, "correction saved") == (
        "correction saved (2026-12-06T10:00:00Z); replaces dr_a's 'rejected' of 2026-12-06T09:00:00Z "
        "(blurred a lesion)")


def test_review_queue_empty_and_malformed_answers_and_empty_bodies():
    assert ReviewSession.queue_answer(None) is None
    assert ReviewSession.queue_answer({}) is None
    assert ReviewSession.queue_answer({"id": "head_a", "remaining_unreviewed": 2})["id"] == "head_a"
    with pytest.raises(WorkflowError, match="without an id"):
        ReviewSession.queue_answer({"remaining_unreviewed": 2})
    # only series too large for the server are left (skipped by the queue, not downloaded): nothing to load, and
    # the reviewer is told they exist
    too_large = {"remaining_unreviewed": 2, "too_large_to_review": [
        {"id": "1.2.3.4", "instances": 6, "voxels": 1572864, "estimated": False, "limit": 1000000}]}
    assert ReviewSession.queue_answer(too_large) is None
    assert ReviewSession.describe_skipped(too_large) == (
        "1 unreviewed series too large for this server (over its max_voxels), skipped: 1.2.3.4; "
        "ask the server's administrator")
    assert ReviewSession.describe_skipped({"id": "head_a"}) == ""
    # only series the server could not download are left (multi-frame under MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
    # or not delivered): nothing to load either, and each is named with the server's reason, shortened
    multi = ("series 1.2.5 has multi-frame instances (1 of its 1 image instances, up to 3 frames each), which "
             "MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME downloads only the first frame of; nothing of it was downloaded: "
             "turn that setting off on the server")
    not_downloaded = {"remaining_unreviewed": 3, "not_downloaded": [
        {"id": "1.2.5", "detail": multi}, {"id": "1.2.6", "detail": "the PACS did not deliver series 1.2.6"}]}
    assert ReviewSession.queue_answer(not_downloaded) is None
    described = ReviewSession.describe_skipped(not_downloaded)
    assert described == (
        "2 unreviewed series the server could not download, skipped: "
        f"1.2.5 ({multi[:87].rstrip()}...), 1.2.6 (the PACS did not deliver series 1.2.6); "
        "ask the server's administrator"), described
    # both lists, also beside a study handed out (the status line names them after the study)
    both = dict(too_large, **not_downloaded, id="head_a")
    assert ReviewSession.queue_answer(both)["id"] == "head_a"
    assert ReviewSession.describe_skipped(both).startswith(
        "1 unreviewed series too large for this server (over its max_voxels), skipped: 1.2.3.4; "
        "2 unreviewed series the server could not download, skipped: 1.2.5 (")
    many = {"not_downloaded": [{"id": f"1.2.{i}", "detail": "x"} for i in range(5)]}
    assert ReviewSession.queue_answer(many) is None
    assert ReviewSession.describe_skipped(many) == (
        "5 unreviewed series the server could not download, skipped: 1.2.0 (x), 1.2.1 (x), 1.2.2 (x) ...; "
        "ask the server's administrator")
    with pytest.raises(WorkflowError, match="without an id"):
        ReviewSession.queue_answer(["head_a"])
    with pytest.raises(WorkflowError, match="empty body"):
        ReviewSession.require_answer(None, "the training request")
    assert ReviewSession.require_answer({"ok": 1}, "x") == {"ok": 1}


# --------------------------------------------------------------------------------------------------- training
def test_a_second_fine_tuning_run_is_refused_while_one_runs():
    session = ReviewSession()
    with pytest.raises(WorkflowError, match="choose a model"):
        session.start_training("")
    session.start_training("adl")
    with pytest.raises(WorkflowError, match="adl is still running"):
        session.start_training("tddl_gcn")
    session.scene_closed()  # the run goes on on the server: still watched
    with pytest.raises(WorkflowError, match="still running"):
        session.start_training("adl")
    session.training_finished()
    session.start_training("tddl_gcn")
    assert session.training_model == "tddl_gcn"


# --------------------------------------------------------------------------------------------------- scene close
def test_scene_close_forgets_every_study_and_deletes_patient_files(tmp_path):
    session = ReviewSession(tmp_path / "tmp")
    a = dicom_identity("1.1", name="A")
    session.select(a)
    session.record_upload(a, a.datastore_id())
    session.result_arrived(a, "vtkMRMLScalarVolumeNode1")
    session.blended(0.5, "vtkMRMLScalarVolumeNode2")
    session.verdicts[a] = {"verdict": "accepted"}
    work = session.work_dir
    (work / "studies").mkdir()
    (work / "studies" / "patient.nrrd").write_bytes(b"PHI")
    session.scene_closed()
    assert not work.exists()
    assert session.study is None and session.blend is None
    assert session.results == {} and session.known_ids == {} and session.verdicts == {}
    # after Clear, node IDs restart: the next patient's vtkMRMLScalarVolumeNode1 gets nothing of A's
    b = dicom_identity("1.9", name="B")
    session.select(b)
    assert session.result() is None and not session.is_on_server()
    assert session.work_dir != work and session.work_dir.is_dir()
    # the module closes: everything goes
    kept = session.work_dir
    assert session.close() == [] and not kept.exists() and list((tmp_path / "tmp").iterdir()) == []


def test_temp_files_cleanup_deletes_every_folder(tmp_path):
    temp = TempFiles(tmp_path)
    first, second = temp.new_dir("export"), temp.new_dir("download")
    (first / "a.nrrd").write_bytes(b"x")
    (second / "sub").mkdir()
    (second / "sub" / "b.nrrd").write_bytes(b"y")
    assert temp.cleanup() == []
    assert not first.exists() and not second.exists() and temp.dirs == []
    # a request cancelled at scene close recreates its output folder afterwards: the next cleanup removes it
    (first / "results").mkdir(parents=True)
    (first / "results" / "late.nrrd").write_bytes(b"z")
    assert temp.dirs == [first]
    assert temp.cleanup() == [] and not first.exists()


def test_server_errors_say_log_in_again_or_name_the_missing_role():
    assert "log in again" in describe_error(DenoiseServerError("server said 401: expired", 401))
    assert "role" in describe_error(DenoiseServerError("server said 403: forbidden", 403))
    assert describe_error(DenoiseServerError("server said 422: bad volume", 422)) == "server said 422: bad volume"
    assert describe_error(WorkflowError("select a volume first")) == "select a volume first"


# --------------------------------------------------------------------------------------------------- request options
LEARNED = {"name": "adl", "config": {"modality": ["auto", "ct", "mr"], "low_frequency_restoration": "auto"}}
CLASSICAL = {"name": "nlm", "config": {"modality": ["auto", "ct", "mr"]}}


def test_lesion_contrast_restoration_choice_is_validated_as_the_server_does():
    from lib.lesions.low_frequency_restoration import MAX_SIGMA_PX, check_sigma_px

    assert MAX_RESTORATION_PX == MAX_SIGMA_PX  # the panel's range is the server's
    assert restoration_choice("auto") == restoration_choice(" AUTO ") == restoration_choice(None) == "auto"
    assert restoration_choice(0) == 0.0 and isinstance(restoration_choice(0), float)
    assert restoration_choice("1.5") == 1.5 and restoration_choice(16) == 16.0
    # every number either side of the limits: accepted here exactly when the server accepts it
    for value in (0.0, 0.25, 1.0, 15.99, 16.0, -0.01, -0.25, 16.01, 1e9, float("nan"), float("inf"), -float("inf")):
        try:
            check_sigma_px(value)
            server_ok = True
        except ValueError:
            server_ok = False
        if server_ok:
            assert restoration_choice(value) == value
        else:
            with pytest.raises(ValueError, match="0 to 16 pixels"):
                restoration_choice(value)
    for bad in (True, "strong", [1.0], {}):
        with pytest.raises(ValueError, match="'auto' or"):
            restoration_choice(bad)


def test_the_spin_box_minimum_reads_auto_and_one_step_up_is_off():
    assert RESTORATION_SPIN_AUTO < 0.0  # "auto" sits below 0 = off, both reachable with the arrows
    assert restoration_from_spin(RESTORATION_SPIN_AUTO) == "auto"
    assert restoration_from_spin(RESTORATION_SPIN_AUTO + RESTORATION_SPIN_STEP) == 0.0  # one step up: off
    # the CT default widths (the modality's, and the shipped CT files' own) are on the arrows' grid (from 0 = off),
    # so the arrows reach them and their neighbours
    from conftest import APP_DIR

    from lib.lesions.low_frequency_restoration import default_sigma_px
    from lib.weights.format import restoration_of_file

    files = [APP_DIR / "model" / f"pretrained_{model}_ct.pt" for model in ("adl", "tddl_gcn")]
    for ct in (default_sigma_px("CT"), *(restoration_of_file(path) for path in files)):
        assert abs(round(ct / RESTORATION_SPIN_STEP) * RESTORATION_SPIN_STEP - ct) < 1e-9
    assert restoration_from_spin(2.5) == 2.5 and restoration_from_spin(16.0) == 16.0
    assert restoration_from_spin(-1.0, minimum=-1.0) == "auto"
    with pytest.raises(ValueError):  # a typed value between "auto" and 0 is refused, not guessed
        restoration_from_spin(RESTORATION_SPIN_AUTO / 2)
    with pytest.raises(ValueError):
        restoration_from_spin(16.25)


def test_restoration_is_sent_to_models_that_list_it_only():
    assert supports_restoration(LEARNED) and not supports_restoration(CLASSICAL)
    assert not supports_restoration(None) and not supports_restoration({"name": "x"})
    assert not supports_restoration({"name": "x", "config": None})
    assert denoise_params(LEARNED, "ct") == {"modality": "ct", "result_extension": ".nrrd",
                                             "low_frequency_restoration": "auto"}
    assert denoise_params(LEARNED, "mr", 0)["low_frequency_restoration"] == 0.0
    assert denoise_params(LEARNED, "ct", restoration_from_spin(1.25))["low_frequency_restoration"] == 1.25
    assert denoise_params(LEARNED, "ct", restoration_from_spin(RESTORATION_SPIN_AUTO))[
        "low_frequency_restoration"] == "auto"
    for choice in ("auto", 0, 4.0):  # a classical model never gets it (the server refuses a width > 0)
        assert denoise_params(CLASSICAL, "ct", choice) == {"modality": "ct", "result_extension": ".nrrd"}
    assert "low_frequency_restoration" not in denoise_params(None, "ct", 2.0)  # an unknown model: not sent
    with pytest.raises(ValueError):  # a bad value is refused even where it would not be sent
        denoise_params(CLASSICAL, "ct", 17)


def test_the_width_applied_is_read_from_the_answer_and_described():
    assert applied_restoration({"low_frequency_restoration": 1.5}) == 1.5
    assert applied_restoration({"low_frequency_restoration": 0}) == 0.0
    assert applied_restoration({"model": "nlm"}) is None and applied_restoration({}) is None
    assert applied_restoration({"low_frequency_restoration": "x"}) is None
    assert applied_restoration({"low_frequency_restoration": float("nan")}) is None
    assert describe_restoration({"low_frequency_restoration": 1.5}) == "lesion contrast restoration 1.5 px"
    assert describe_restoration({"low_frequency_restoration": 0.0}) == \
        "lesion contrast restoration off (network output only)"
    assert describe_restoration({"model": "nlm"}) == ""
