"""The 3D Slicer module: its Slicer-free library against a real server, its MRML logic against real MRML
(PyPI's slicer-core, in .venv-slicer), and the consistency of the module with its .ui file and CMake files."""
from __future__ import annotations

import ast
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from ADLDenoiseLib import (
    BackgroundTask,
    DenoiseServerClient,
    DenoiseServerError,
    SettingsStore,
    blend,
    difference,
    roi_statistics,
    window_for,
)
from ADLDenoiseLib.volume_files import align_to_grid, read_result, read_study

import processes
from conftest import REPO_ROOT, SAMPLE_STUDIES
from mlserver import assert_same_geometry, copy_weights, free_port, start_server, stop_server, write_crop

MODULE_DIR = REPO_ROOT / "slicer_extension" / "ADLDenoise"


# --------------------------------------------------------------------------------------------------- structure
def test_every_widget_the_module_uses_exists_in_its_ui_file():
    tree = ET.parse(MODULE_DIR / "Resources" / "UI" / "ADLDenoise.ui")
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    source = (MODULE_DIR / "ADLDenoise.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the module uses no widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used by ADLDenoise.py but absent from ADLDenoise.ui: {missing}"
    custom = {c.findtext("class") for c in tree.iter("customwidget")}
    assert {cls for cls in widgets.values() if cls.startswith(("ctk", "qMRML"))} <= custom
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"


def test_module_has_module_widget_logic_and_test_classes_and_cmake_lists_every_file():
    tree = ast.parse((MODULE_DIR / "ADLDenoise.py").read_text())
    classes = {node.name: [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["ADLDenoise"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["ADLDenoiseWidget"]
    assert classes["ADLDenoiseLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["ADLDenoiseTest"] == ["ScriptedLoadableModuleTest"]
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "ADLDenoise")
    listed = re.findall(r"^\s*(\S+\.(?:py|png|ui))\s*$", cmake, re.M)
    assert len(listed) >= 9
    for path in listed:
        assert (MODULE_DIR / path).is_file(), path
    assert {p.name for p in (MODULE_DIR / "ADLDenoiseLib").glob("*.py")} == \
        {Path(p).name for p in listed if p.startswith("ADLDenoiseLib/")}
    extension = (REPO_ROOT / "slicer_extension" / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "add_subdirectory(ADLDenoise)"):
        assert key in extension
    # the Slicer-free library really is free of Slicer and Qt (the MRML helpers are the one exception)
    for path in (MODULE_DIR / "ADLDenoiseLib").glob("*.py"):
        if path.name != "mrml.py":
            assert not re.search(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk)\b", path.read_text(), re.M), path


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    """``Class.method`` (and top-level ``function``) -> its AST, of a module's source."""
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
        elif isinstance(node, ast.FunctionDef):
            found[node.name] = node
    return found


def _calls(function: ast.AST) -> set[str]:
    """Names of everything ``function`` calls (``a.b.c(...)`` gives "c")."""
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            target = node.func
            names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def test_module_wires_the_review_session_and_follows_slicers_rules():
    """Static checks of ADLDenoise.py against the rules verified in Slicer's sources (no Qt here to run it)."""
    source = (MODULE_DIR / "ADLDenoise.py").read_text()
    functions = _functions(MODULE_DIR / "ADLDenoise.py")
    # no per-node state: results, ids and files are keyed by study identity in ReviewSession
    assert not re.search(r"study_ids|study_files\[|results\[|\.results\.get\(", source)
    assert "ReviewSession()" in ast.unparse(functions["ADLDenoiseLogic.__init__"])
    # Close Scene (vtkMRMLScene::Clear) is observed and makes the session forget everything
    setup = functions["ADLDenoiseWidget.setup"]
    setup_src = ast.unparse(setup)
    assert "slicer.mrmlScene.EndCloseEvent" in setup_src and "self.onSceneEndClose" in setup_src
    assert "scene_closed" in _calls(functions["ADLDenoiseWidget.onSceneEndClose"])
    assert "close" in _calls(functions["ADLDenoiseWidget.cleanup"])  # temporary patient files deleted
    assert "session.close()" in ast.unparse(functions["ADLDenoiseWidget.cleanup"])
    # volume or result changes drop the blend
    assert "self.corrected_node = None" in ast.unparse(functions["ADLDenoiseWidget.onVolumeChanged"])
    assert ("self.ui.inputVolumeSelector.connect('currentNodeChanged(vtkMRMLNode*)', self.onVolumeChanged)"
            in setup_src)
    assert "correction_to_submit" in _calls(functions["ADLDenoiseWidget.onSubmitCorrection"])
    # the selected node changed in place (4D frame, edited voxels): watched, and identified again before use
    changed = ast.unparse(functions["ADLDenoiseWidget.onVolumeChanged"])
    assert "for event in INPUT_CHANGE_EVENTS" in changed and "self.addObserver(node, event, self.onInputModified)" \
        in changed and changed.index("removeObservers(self.onInputModified)") < changed.index("addObserver(node")
    assert "input_modified" in _calls(functions["ADLDenoiseWidget.onInputModified"])
    for name in ("original_and_result", "onBlendSliderMoved", "onDenoise"):
        assert "refreshStaleIdentity" in _calls(functions[f"ADLDenoiseWidget.{name}"]), name
    assert "identify" in _calls(functions["ADLDenoiseWidget.refreshStaleIdentity"])
    # the selected volume is hashed in the background, from a copy of its voxels taken on the GUI thread (Slicer's
    # array may change under a thread), never on the GUI thread (0.2-0.8 s per selection, denoise and verdict froze
    # Slicer): the widget and the logic call neither study_identity nor content_identity_of (which hash), except
    # the self-test, which hashes through identify_and_wait
    glue = "".join(ast.unparse(f) for name, f in functions.items() if not name.startswith("ADLDenoiseTest."))
    assert not re.search(r"study_identity\(|content_identity_of\(|content_identity\(|\.matches\(", glue)
    identify = ast.unparse(functions["ADLDenoiseLogic.identify"])
    assert "snapshot = volume_snapshot(node)" in identify
    assert "BackgroundTask(snapshot.content" in identify and "self.session.identifying(node.GetID()" in identify
    # ... the answer goes through the session's ticket (dropped for a volume no longer selected or changed since),
    # and a DICOM volume edited in place keeps its UIDs: identified through as_loaded (ReviewSession.identified)
    poll = ast.unparse(functions["ADLDenoiseLogic.poll_identifications"])
    assert "self.session.identified(ticket, content, lambda: self.start_files_check(node_id, snapshot, " \
        "content.key))" in poll
    assert "self.session.identification_failed(ticket" in poll
    assert "self.session.files_read(*key, task.result if task.state == 'done' else None)" in poll
    assert "self.session.record_upload(content, server_id, study_file)" in poll
    # ... compared with the series' files first, so that an edit made before the first selection is seen too: the
    # files are found in Slicer's DICOM database, read and compared with the same copy in a BackgroundTask
    # (Slicer-free), and nothing is sent for the volume meanwhile
    files_of = ast.unparse(functions["ADLDenoiseLogic.series_files_of"])
    for call in ("lookup = database.fileForInstance if database is not None and database.isOpen else None",
                 "find_series_files(dicom_instance_uids(node), lookup, identity.frame)"):
        assert call in files_of, call
    start = ast.unparse(functions["ADLDenoiseLogic.start_files_check"])
    assert "BackgroundTask(lambda report, cancelled: snapshot_matches_files(snapshot, files)" in start
    assert "FILES_PENDING" in start
    assert "self.files_timer.connect('timeout()', self.onIdentified)" in setup_src
    assert {"poll_identifications", "require_identified", "studyText", "checking"} <= \
        _calls(functions["ADLDenoiseWidget.onIdentified"])
    for name in ("selected", "original_and_result"):
        assert "refreshStaleIdentity" in _calls(functions[f"ADLDenoiseWidget.{name}"]), name
    assert "require_study" in _calls(functions["ADLDenoiseWidget.selected"])
    assert "require_identified" in _calls(functions["ADLDenoiseWidget.original_and_result"])
    # a changed volume is identified again once it rests; a result arriving meanwhile waits for its identity; a
    # review-queue study is denoised once identified, its server id recorded for the voxels loaded
    assert "self.reidentify_timer.connect('timeout()', self.onReidentify)" in setup_src
    assert "start" in _calls(functions["ADLDenoiseWidget.onInputModified"])
    assert "whenIdentified" in _calls(functions["ADLDenoiseWidget.onDenoise"])
    queue = ast.unparse(functions["ADLDenoiseWidget.onNextStudy"])
    load_study = ast.unparse(functions["ADLDenoiseLogic.load_study"])
    assert "self.identify(node, server_id=study['id'], study_file=path, content=content)" in load_study
    assert "self.whenIdentified(self.onDenoise)" in queue and "self.onDenoise()" not in queue
    assert queue.index("node = self.logic.load_study(answer)") < queue.index("setCurrentNode(node)")
    # voxels changed without Slicer being told (no event): every request hashes the copy taken on the GUI thread
    # first, in its background task, and sends nothing when it is not the content identified; the file sent is
    # written there too, from that very copy (prepare_upload: verify_snapshot, then VolumeExport.write), never on
    # the GUI thread (an uncompressed NRRD of 512 x 512 x 400 voxels froze Slicer at every request)
    denoise_file = ast.unparse(functions["ADLDenoiseLogic.denoise_file"])
    assert denoise_file.index("path = prepare_upload(check, upload, report, cancelled)") < \
        denoise_file.index("client.denoise(")
    study_id_for = ast.unparse(functions["ADLDenoiseLogic.study_id_for"])
    assert study_id_for.index("path = prepare_upload(study.get('check'), study['path'], report)") < \
        study_id_for.index("if study['on_server']") < study_id_for.index("upload_image(path, ")
    prepare = ast.unparse(functions["ADLDenoiseLogic.prepare_study"])
    assert "check = self.request_check(node)" in prepare and "'check': check" in prepare
    assert "upload = None if on_server else self.export_input(identity, check[0])" in prepare
    assert "return (volume_snapshot(node), self.session.study_content)" in \
        ast.unparse(functions["ADLDenoiseLogic.request_check"])
    denoise = ast.unparse(functions["ADLDenoiseWidget.onDenoise"])
    assert "check = self.logic.request_check(original)" in denoise
    # ... the GUI thread only copies: no storage node writes a file there (export_volume, WriteData), and every
    # file sent is a VolumeExport made of a copy, written by prepare_upload in the background
    assert not re.search(r"export_volume\(|WriteData\(|\.write\(|write_nrrd\(", source)
    assert "VolumeExport(snapshot, " in ast.unparse(functions["ADLDenoiseLogic.export_input"])
    assert "VolumeExport(volume_copy(node), " in ast.unparse(functions["ADLDenoiseLogic.export_correction"])
    submit_correction = ast.unparse(functions["ADLDenoiseLogic.submit_correction"])
    assert submit_correction.index("corrected_path = prepare_upload(None, corrected, report, cancelled)") < \
        submit_correction.index("self.study_id_for(study, report)")  # a failed write sends nothing
    assert "client.save_correction(image_id, corrected_path, " in submit_correction
    assert "path = self.logic.export_correction(corrected, identity)" in \
        ast.unparse(functions["ADLDenoiseWidget.onSubmitCorrection"])
    assert "image_id, check, on_done=done, on_fail=self.requestFailed" in denoise
    assert {"input_modified", "start"} <= _calls(functions["ADLDenoiseWidget.requestFailed"])
    assert "requestFailed" in _calls(functions["ADLDenoiseWidget.verdictFailed"])
    for name in ("onVolumeChanged", "onSceneStartClose", "cleanup"):
        assert "self.identity_waiters = []" in ast.unparse(functions[f"ADLDenoiseWidget.{name}"]), name
    for name in ("onSceneStartClose", "cleanup"):
        assert "cancel_files_checks" in _calls(functions[f"ADLDenoiseWidget.{name}"]), name
    assert "checking" in _calls(functions["ADLDenoiseWidget.studyText"])
    for name in ("onVolumeChanged", "refreshStaleIdentity"):
        assert "studyText" in _calls(functions[f"ADLDenoiseWidget.{name}"]), name
    # a 4D frame's line names the frame, then why it was not compared with its files (the session's words)
    study_text = ast.unparse(functions["ADLDenoiseWidget.studyText"])
    assert "return self.logic.session.describe_study(identity, self.frameText(node))" in study_text
    assert "self.frameText(node) or" not in study_text
    assert "removeObservers(self.onInputModified)" in ast.unparse(functions["ADLDenoiseWidget.onSceneEndClose"])
    # scalar volumes only
    assert "self.ui.inputVolumeSelector.showChildNodeTypes = False" in setup_src
    # the blend slider: no re-blend per drag step, and nothing (no dialog) without a volume
    assert "self.ui.blendSlider.tracking = False" in setup_src
    assert "self.ui.blendSlider.connect('valueChanged(double)', self.onBlendSliderMoved)" in setup_src
    moved = functions["ADLDenoiseWidget.onBlendSliderMoved"]
    assert not _calls(moved) & {"blended_volume", "error", "errorDisplay", "onBlend"}
    assert "start" in _calls(moved)
    # side by side: Yellow gets Red's orientation, then the views are linked
    assert "match_orientation_and_link" in _calls(functions["ADLDenoiseWidget.onCompare"])
    assert "SetLinkedControl" not in ast.unparse(functions["ADLDenoiseWidget.onCompare"])  # not before orienting
    # settings: written on the GUI thread only (never in what runs in a BackgroundTask), never by the self-test
    for name in ("connect", "open_client", "use_client"):
        assert not _calls(functions[f"ADLDenoiseLogic.{name}"]) & {"set_setting", "setValue", "QSettings"}
    test_source = "".join(ast.unparse(f) for name, f in functions.items() if name.startswith("ADLDenoiseTest."))
    assert not re.search(r"set_setting|QSettings|serverUrl", test_source)
    assert "set_setting" in _calls(functions["ADLDenoiseWidget.onConnect"])
    # another server: the last one's datastore ids are forgotten before its client is used
    use = ast.unparse(functions["ADLDenoiseLogic.use_client"])
    assert "self.session.connected_to(client.server_url, client.username or '' if client.token else None)" in use
    assert use.index("connected_to(") < use.index("self.client = client")
    # ... on the GUI thread, once the answer is taken: what runs in the background changes nothing (neither the
    # session, which is not thread-safe, nor the client), so a Connect cancelled or dropped by Close Scene after
    # the server answered does not leave the module silently connected to the new server
    opened = functions["ADLDenoiseLogic.open_client"]
    assert not [n for n in ast.walk(opened) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                and any(isinstance(t, ast.Attribute) for t in getattr(n, "targets", [getattr(n, "target", None)]))]
    assert "session" not in ast.unparse(opened) and "use_client" not in _calls(opened)
    on_connect = ast.unparse(functions["ADLDenoiseWidget.onConnect"])
    assert "self.run(self.logic.open_client, url, token, username, password, on_done=done" in on_connect
    assert "self.logic.use_client(client, models)" in on_connect and "logic.connect(" not in on_connect
    connect = ast.unparse(functions["ADLDenoiseLogic.connect"])
    assert connect.index("open_client(") < connect.index("self.use_client(client, models)")
    # a study the server holds is denoised there by id (its result is recorded as the study's), and every verdict
    # names the model of the result the reviewer saw (else the server judges another run's latest result)
    denoise = ast.unparse(functions["ADLDenoiseWidget.onDenoise"])
    assert "image_id = self.logic.session.server_id(identity)" in denoise
    assert "path = None if image_id else self.logic.export_input(identity, check[0])" in denoise
    assert "output_dir, restoration, image_id, check, on_done=done" in denoise
    assert "client.denoise(model, path, output_dir, params, image_id=image_id)" in \
        ast.unparse(functions["ADLDenoiseLogic.denoise_file"])
    # ... and the server's entry of that result (result_seq), so the verdict is recorded against it or refused
    load = ast.unparse(functions["ADLDenoiseLogic.load_result"])
    assert "str(result.get('weights_version') or ''), result.get('audit_seq'))" in load
    verdict = ast.unparse(functions["ADLDenoiseWidget.onVerdict"])
    assert "self.run(self.logic.submit_verdict, study, request, on_done=done," in verdict
    assert "return (image_id, send_verdict(client, image_id, request))" in \
        ast.unparse(functions["ADLDenoiseLogic.submit_verdict"])
    assert "on_fail=lambda error: self.verdictFailed(request['identity'], error)" in verdict
    assert "send_verdict(client, image_id, request," in ast.unparse(functions["ADLDenoiseLogic.submit_correction"])
    submit = ast.unparse(functions["ADLDenoiseWidget.onSubmitCorrection"])
    assert "request = self.logic.session.verdict_request('corrected', reviewer)" in submit
    # signed in, the reviewer name may be empty (the server records the token's user): the session decides, the
    # widget does not refuse an empty field itself
    assert "reviewer = self.logic.session.reviewer_name(self.ui.reviewerEdit.text)" in submit
    assert "enter your name" not in source
    assert "regions, request['model'], request['result_seq'], on_done=done" in submit
    assert "self.verdictFailed(identity, error)" in submit
    assert "self.logic.session.verdict_refused(identity)" in ast.unparse(functions["ADLDenoiseWidget.verdictFailed"])
    # a late result is not attached to another study
    load = ast.unparse(functions["ADLDenoiseLogic.load_result"])
    assert load.index("identity != self.session.study") < load.index("load_result(slicer.mrmlScene")
    # the result file is read in the request's background task, after the download, on the grid of the request's
    # copy of the original; the GUI thread only makes the node from the array read (no reader there: reading a
    # 512 x 512 x 400 result with Slicer's storage node froze Slicer)
    denoise_file = ast.unparse(functions["ADLDenoiseLogic.denoise_file"])
    assert denoise_file.index("client.denoise(") < denoise_file.index(
        "return (read_result(result_path, grid, report, cancelled), result)")
    assert "grid = (snapshot.voxels.shape, snapshot.ijk_to_ras) if snapshot is not None else None" in denoise_file
    assert "load_result(slicer.mrmlScene, loaded, original, RESULT_SUFFIX" in load
    assert "loaded, result = answer" in ast.unparse(functions["ADLDenoiseWidget.onDenoise"])
    assert "self.logic.load_result(original, identity, loaded, result)" in \
        ast.unparse(functions["ADLDenoiseWidget.onDenoise"])
    assert not re.search(r"ArchetypeStorageNode|ReadData\(|read_volume\(|read_nrrd\(|sitk\.", glue)
    assert [name for name, f in functions.items() if "read_result(" in ast.unparse(f)] == \
        ["ADLDenoiseLogic.denoise_file"]
    # the difference volume: copies on the GUI thread, subtracted in a background task, the node made from the
    # answer (never computed from the nodes on the GUI thread)
    diff = ast.unparse(functions["ADLDenoiseWidget.onDifference"])
    assert "copies = difference_inputs(original, result)" in diff
    # ... in a task of its own (LocalTasks: no server request, no workflow state), so it runs at once, also while a
    # request runs, and touches none of the request's state: its task and answer callbacks, progress bar, Cancel
    assert "self.local_tasks.start('difference', lambda report, cancelled: difference(*copies), done" in diff
    assert "self.local_timer.start()" in diff and "self.local_tasks.running('difference')" in diff
    local = diff + ast.unparse(functions["ADLDenoiseWidget.onLocalTasks"]) + \
        ast.unparse(functions["ADLDenoiseWidget.localStatus"])
    assert "self.run(" not in local and not re.search(r"progressBar|cancelButton|self\.on_done|self\.on_fail", local)
    assert not [n for f in ("onDifference", "onLocalTasks", "localStatus")
                for n in ast.walk(functions[f"ADLDenoiseWidget.{f}"])
                if isinstance(n, (ast.Assign, ast.AugAssign)) and any(
                    ast.unparse(t).startswith(("self.task", "self.on_"))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
    assert "self.local_timer.connect('timeout()', self.onLocalTasks)" in setup_src
    assert {"poll", "error", "stop"} <= _calls(functions["ADLDenoiseWidget.onLocalTasks"])
    for name in ("onSceneStartClose", "cleanup"):  # a late difference of the closed scene is dropped
        assert "self.local_tasks.cancel_all()" in ast.unparse(functions[f"ADLDenoiseWidget.{name}"]), name
    assert "difference_volume(slicer.mrmlScene, original, result, values=values)" in diff
    assert diff.index("now = self.original_and_result()") < diff.index("difference_volume(slicer.mrmlScene")
    # the end of a fine-tuning run refreshes the models with the connected client: Connect would log in again
    # with the password field emptied at the last Connect ("enter a user name and a password" after every run)
    poll = _calls(functions["ADLDenoiseWidget.onTrainPoll"])
    assert "refreshModels" in poll and "onConnect" not in poll
    refresh = ast.unparse(functions["ADLDenoiseWidget.refreshModels"])
    assert "self.run(self.logic.refresh_models" in refresh
    assert refresh.index("self.task.finished") < refresh.index("self.run(")  # no "still running" dialog
    assert not _calls(functions["ADLDenoiseLogic.refresh_models"]) & {"login", "DenoiseServerClient", "connect"}
    # a review-queue study is downloaded and read in the request's background task (read_study: this file alone,
    # never stacked with the numbered files beside it, on the grid Slicer's loader gives it), its window computed
    # there too; the GUI thread only makes the node from the array (slicer.util.loadVolume froze Slicer for a large
    # study), names it after the server's id, shows it as loadVolume did and identifies it with that id
    next_study = ast.unparse(functions["ADLDenoiseLogic.next_study"])
    assert next_study.index("client.download_image(study['id'], studies_dir)") < next_study.index(
        "volume = read_study(path, study['id'], report, cancelled)") < next_study.index(
        "'window': auto_window(volume.voxels)")
    # ... and its identity hashed there, from the array read; the GUI thread neither copies nor hashes the voxels:
    # loaded_identity checks the node against what was hashed, and identify's branch for such an identity takes
    # no snapshot (the node is copied and hashed as any volume only when loaded_identity refuses)
    assert "'content': study_content(volume, study['id'])" in next_study
    assert load_study.index("load_study(slicer.mrmlScene") < load_study.index(
        "content = loaded_identity(node, answer['volume'], answer['content'])") < load_study.index("self.identify(")
    branch = next(n for n in ast.walk(functions["ADLDenoiseLogic.identify"])
                  if isinstance(n, ast.If) and ast.unparse(n.test) == "content is None")
    assert "volume_snapshot(node)" in ast.unparse(branch.body)
    handed = "".join(ast.unparse(n) for n in branch.orelse)
    assert "BackgroundTask(lambda report, cancelled: content" in handed
    assert not re.search(r"volume_snapshot|volume_copy|content|arrayFromVolume|copy", handed.replace(
        "lambda report, cancelled: content", "").replace("content.name", ""))
    assert "node = load_study(slicer.mrmlScene, answer['volume'], study['id'], answer['window'])" in load_study
    assert load_study.index("load_study(slicer.mrmlScene") < load_study.index("self.identify(node")
    assert "self.run(self.logic.next_study, studies_dir, on_done=done" in queue
    assert "PropagateVolumeSelection()" in queue and "SetActiveVolumeID(node.GetID())" in queue
    assert not re.search(r"loadVolume\(|loadNodeFromFile\(|loadNodes\(", source)
    assert [name for name, f in functions.items() if "read_study(" in ast.unparse(f)] == \
        ["ADLDenoiseLogic.next_study"]
    # a refilled model list keeps the chosen model selected
    assert "findData" in _calls(functions["ADLDenoiseWidget.showModels"])
    # a request that ended but was not yet delivered by the timer is delivered before the next one replaces it
    run = ast.unparse(functions["ADLDenoiseWidget.run"])
    assert run.index("self.onPoll()") < run.index("self.task = BackgroundTask(")
    # an answer on_done refuses (an empty body to the training request) also runs on_fail: the session's running
    # training is reset, else every later Start fine-tuning is refused as "still running" until Slicer restarts
    poll = ast.unparse(functions["ADLDenoiseWidget.onPoll"])
    handler = poll[poll.index("on_done(task.result)"):]
    assert "on_fail(error)" in handler[:handler.index("self.error(error)")]
    assert "on_fail=lambda error: self.logic.session.training_finished()" in \
        ast.unparse(functions["ADLDenoiseWidget.onTrain"])
    # a second fine-tuning run is refused before anything is sent
    train = ast.unparse(functions["ADLDenoiseWidget.onTrain"])
    assert train.index("start_training(model)") < train.index("self.run(")
    # every method the widget calls or connects exists (a slot lost in an edit fails only inside Slicer)
    widget = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ADLDenoiseWidget")
    defined = {n.name for n in widget.body if isinstance(n, ast.FunctionDef)}
    referenced = {n.attr for n in ast.walk(widget) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "self"
                  and (n.attr.startswith(("on", "show", "after", "fill")) or n.attr in ("run", "error", "selected"))}
    inherited = {"addObserver", "removeObserver", "removeObservers", "resourcePath", "on_done", "on_fail"}
    assert referenced - inherited <= defined, sorted(referenced - inherited - defined)
    # login: user / password or token, never echoed
    tree = ET.parse(MODULE_DIR / "Resources" / "UI" / "ADLDenoise.ui")
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    for name in ("passwordEdit", "tokenEdit"):
        assert widgets[name].find("property[@name='echoMode']/enum").text == "QLineEdit::Password"
    assert "usernameEdit" in widgets
    assert not re.search(r"set_setting\(\s*[\"'](password|token)", source)
    selector = widgets["inputVolumeSelector"]
    assert selector.find("property[@name='showChildNodeTypes']/bool").text == "false"
    assert widgets["blendSlider"].find("property[@name='tracking']/bool").text == "false"


def test_slice_views_are_found_through_one_guard_that_switches_to_a_layout_showing_them():
    """A layout without the Yellow (or Red) view: Slicer's ``qMRMLLayoutManager::sliceWidget`` answers None for a
    view never created (an AttributeError traceback in Blend / Compare / Fade / Place ROI), and a view created
    earlier but not in the layout is hidden (a blend set there is never seen). Every slice view goes through
    ``sliceView``, which switches to side by side (``SlicerLayoutSideBySideView``, Red and Yellow in
    vtkMRMLLayoutLogic.cxx) when the view is not shown, and names the missing view otherwise."""
    source = (MODULE_DIR / "ADLDenoise.py").read_text()
    functions = _functions(MODULE_DIR / "ADLDenoise.py")
    users = sorted(name for name, f in functions.items() if "sliceWidget(" in ast.unparse(f))
    assert users == ["ADLDenoiseWidget.sliceView"], users
    guard = ast.unparse(functions["ADLDenoiseWidget.sliceView"])
    assert "widget is None or not widget.mrmlSliceNode().IsViewVisibleInLayout()" in guard
    assert guard.index("IsViewVisibleInLayout") < guard.index(
        "setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)") < guard.index("raise WorkflowError")
    for name, view in (("onBlend", "Yellow"), ("onCompare", "Yellow"), ("onFade", "Red"), ("onPlaceRoi", "Red")):
        function = ast.unparse(functions[f"ADLDenoiseWidget.{name}"])
        assert "sliceView(" in function, name
        # the guard's refusal is caught (a status line or a dialog), not a traceback
        assert any(isinstance(node, ast.Try) and "sliceView(" in ast.unparse(node.body)
                   and any(h.type is not None and ast.unparse(h.type) in ("WorkflowError", "Exception")
                           for h in node.handlers)
                   for node in ast.walk(functions[f"ADLDenoiseWidget.{name}"])), name
    assert "'Yellow'" in ast.unparse(functions["ADLDenoiseWidget.onBlend"])
    assert "slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView" in source
    # the layout constant, the calls and their Slicer types as in Slicer's sources
    slicer_repo = Path("/work/.mirror/Slicer+Slicer/repo")
    if slicer_repo.is_dir():
        import subprocess

        def show(path: str) -> str:
            return subprocess.run(["git", "-C", str(slicer_repo), "show", f"HEAD:{path}"], capture_output=True,
                                  text=True, check=True).stdout

        assert "SlicerLayoutSideBySideView = 29" in show("Libs/MRML/Core/vtkMRMLLayoutNode.h")
        logic = show("Libs/MRML/Logic/vtkMRMLLayoutLogic.cxx")
        side_by_side = logic[logic.index("const char* sideBySideView"):]
        side_by_side = side_by_side[:side_by_side.index("</layout>")]
        assert 'singletontag=\\"Red\\"' in side_by_side and 'singletontag=\\"Yellow\\"' in side_by_side
        assert "bool IsViewVisibleInLayout();" in show("Libs/MRML/Core/vtkMRMLAbstractViewNode.h")
        assert "Q_INVOKABLE qMRMLSliceWidget* sliceWidget(const QString& name) const;" in \
            show("Libs/MRML/Widgets/qMRMLLayoutManager.h")


def test_module_refuses_other_studies_regions_and_its_own_volumes_and_guards_missing_display_nodes():
    """Static checks of the Qt glue around the MRML checks tested with slicer-core (test_mrml_logic.py): the marked
    regions' segmentation is checked before its export, results are tagged with their study, the regions table
    is reset when another volume is selected, and Compare works for a volume without a display node."""
    functions = _functions(MODULE_DIR / "ADLDenoise.py")
    regions = ast.unparse(functions["ADLDenoiseLogic.prepare_regions"])
    assert "check_segmentation_reference(segmentation_node, reference, study['identity'].datastore_id())" in regions
    assert regions.index("check_segmentation_reference(") < regions.index("segment_masks(")
    load = ast.unparse(functions["ADLDenoiseLogic.load_result"])
    assert "RESULT_SUFFIX, study=identity.datastore_id()," in load  # tagged: refused as input, holds its regions
    assert "volume_snapshot" in _calls(functions["ADLDenoiseLogic.identify"])  # refuses the module's own volumes
    changed = ast.unparse(functions["ADLDenoiseWidget.onVolumeChanged"])
    assert "self.marks = SegmentMarks()" in changed
    assert changed.index("self.marks = SegmentMarks()") < changed.index("self.onSegmentsChanged()")
    assert changed.index("self.onSegmentsChanged()") < changed.index("if node is None")  # also when cleared
    compare = ast.unparse(functions["ADLDenoiseWidget.onCompare"])
    guard = "if original.GetDisplayNode() is not None:\n        self.addObserver(original.GetDisplayNode()"
    assert guard in compare, compare


def test_lesion_contrast_restoration_widget_matches_the_lib_and_is_wired_to_the_request():
    """The .ui spin box ("auto" at its minimum, then 0 = off .. 16 px), its enabling per model, the request's
    param from the Lib, and the width applied kept on the result node and shown (static: no Qt here)."""
    from ADLDenoiseLib.settings import MAX_RESTORATION_PX, RESTORATION_SPIN_AUTO, RESTORATION_SPIN_STEP

    tree = ET.parse(MODULE_DIR / "Resources" / "UI" / "ADLDenoise.ui")
    spin = next(w for w in tree.iter("widget") if w.get("name") == "restorationSpin")
    assert spin.get("class") == "QDoubleSpinBox"
    prop = {p.get("name"): p[0].text for p in spin.findall("property")}
    assert float(prop["minimum"]) == RESTORATION_SPIN_AUTO and float(prop["maximum"]) == MAX_RESTORATION_PX
    assert float(prop["singleStep"]) == RESTORATION_SPIN_STEP and prop["decimals"] == "2"
    assert float(prop["minimum"]) + float(prop["singleStep"]) == 0.0  # one step above "auto" is 0 = off
    assert prop["specialValueText"] == "auto" and float(prop["value"]) == RESTORATION_SPIN_AUTO  # default: auto
    assert prop["enabled"] == "false"  # until a model that takes it is chosen
    assert "low spatial frequencies" in prop["toolTip"] and "0: the network" in prop["toolTip"]
    # property order matters to uic: decimals and the range before the value (else the negative "auto" value is clamped to 0)
    order = [p.get("name") for p in spin.findall("property")]
    assert order.index("decimals") < order.index("minimum") < order.index("value")

    functions = _functions(MODULE_DIR / "ADLDenoise.py")
    assert "supports_restoration" in _calls(functions["ADLDenoiseWidget.onModelChanged"])
    assert "self.ui.restorationSpin.enabled" in ast.unparse(functions["ADLDenoiseWidget.onModelChanged"])
    on_denoise = ast.unparse(functions["ADLDenoiseWidget.onDenoise"])
    assert "restoration_from_spin" in _calls(functions["ADLDenoiseWidget.onDenoise"])
    assert "output_dir, restoration, image_id, check, on_done=done" in on_denoise and "describe_restoration" in on_denoise
    assert "denoise_params" in _calls(functions["ADLDenoiseLogic.denoise_file"])  # no param built in Qt glue
    load = ast.unparse(functions["ADLDenoiseLogic.load_result"])
    assert "SetAttribute(RESTORATION_ATTRIBUTE" in load and "applied_restoration" in load
    assert re.search(r'^RESTORATION_ATTRIBUTE = "ADLDenoise\.lowFrequencyRestoration"$',
                     (MODULE_DIR / "ADLDenoise.py").read_text(), re.M)


# --------------------------------------------------------------------------------------------------- maths
def test_blend_difference_roi_statistics_and_windows():
    rng = np.random.default_rng(0)
    clean = np.full((3, 20, 20), 40.0, np.float32)
    noisy = clean + rng.normal(0, 30, clean.shape).astype(np.float32)
    np.testing.assert_allclose(blend(noisy, clean, 0.0), noisy)
    np.testing.assert_allclose(blend(noisy, clean, 1.0), clean)
    np.testing.assert_allclose(blend(noisy, clean, 0.3), 0.3 * clean + 0.7 * noisy, atol=1e-4)
    np.testing.assert_allclose(difference(noisy, clean), noisy - clean, atol=1e-5)
    mask = np.zeros(clean.shape, bool)
    mask[1, 5:15, 5:15] = True
    stats = roi_statistics(noisy, blend(noisy, clean, 0.5), mask)
    assert stats["voxels"] == 100
    assert stats["noise_reduction_percent"] == pytest.approx(50.0, abs=0.01)  # half the noise left
    assert abs(stats["mean_shift"]) < 3.0
    assert window_for("CT soft tissue") == (400.0, 40.0)
    width, level = window_for("MR auto", noisy)
    assert width > 0 and 0 < level < 100
    with pytest.raises(ValueError, match="within"):
        blend(noisy, clean, 1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        difference(noisy, clean[:2])
    with pytest.raises(ValueError, match="fewer than 2"):
        roi_statistics(noisy, clean, np.zeros(clean.shape, bool))


def test_background_task_done_failed_cancelled_and_settings(tmp_path):
    done = BackgroundTask(lambda x, report, cancelled: (report(0.5, "half"), x * 2)[1], 21)
    assert done.wait(10) == "done" and done.result == 42 and done.poll()["progress"] == 1.0

    def boom(report, cancelled):
        raise DenoiseServerError("server said 422: bad volume")

    failed = BackgroundTask(boom)
    assert failed.wait(10) == "failed" and "bad volume" in str(failed.error)

    def slow(report, cancelled):
        while not cancelled():
            time.sleep(0.01)
        return "late result"

    task = BackgroundTask(slow)
    task.cancel()
    assert task.wait(10) == "cancelled" and task.result is None  # the late result is dropped
    # a result back but not yet taken by the GUI's poll (Close Scene in between) is dropped too
    untaken = BackgroundTask(lambda report, cancelled: "study of the closed scene")
    assert untaken.wait(10) == "done" and untaken.finished
    untaken.cancel()
    assert untaken.state == "cancelled" and untaken.result is None
    failed.cancel()
    assert failed.state == "failed"  # an error is still shown

    store = SettingsStore(tmp_path / "settings.json")
    assert store.get("serverUrl", "default") == "default"
    store.set("serverUrl", "http://127.0.0.1:8123")
    assert SettingsStore(tmp_path / "settings.json").get("serverUrl") == "http://127.0.0.1:8123"


def test_client_errors_are_clear_without_a_server():
    with pytest.raises(DenoiseServerError, match="http://host:port"):
        DenoiseServerClient("127.0.0.1:8000")
    client = DenoiseServerClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(DenoiseServerError, match="cannot reach the server") as info:
        client.denoising_models()
    assert info.value.status is None


# --------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def training_server(tmp_path_factory, tiny_weights):
    """A server of this module's own (it receives uploads and corrections and publishes weights), with two
    3-slice head CT studies, and ``modality mr`` in its conf (the default for inputs without a DICOM Modality)."""
    root = tmp_path_factory.mktemp("slicer_server")
    studies = root / "studies"
    studies.mkdir()
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", studies / "head_a.nii.gz", z=slice(50, 53))
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", studies / "head_b.nii.gz", z=slice(60, 63))
    # a site whose volumes without a DICOM Modality are MR: the module must not override that default with a guess
    srv = start_server(studies, copy_weights(tiny_weights, root / "model"), root / "work", conf={"modality": "mr"})
    yield srv
    stop_server(srv)


@pytest.mark.server
@pytest.mark.slow
def test_client_lists_models_denoises_a_volume_file_and_reports_server_errors(shared_server, tmp_path):
    server = shared_server
    client = DenoiseServerClient(server.url)
    models = {m["name"]: m for m in client.denoising_models()}
    assert set(models) == {"adl", "tddl_gcn", "nlm"}
    assert models["adl"]["weights"]["ct"]["available"] and models["adl"]["weights"]["ct"]["version"] == "pretrained"
    # a volume as the module exports it: NRRD
    volume = write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", tmp_path / "head.nrrd", z=slice(50, 53))
    result_path, result = client.denoise("adl", volume, tmp_path / "out", {"modality": "ct", "result_extension": ".nrrd"})
    assert result_path.suffix == ".nrrd" and result["weights_version"] == "pretrained"
    assert_same_geometry(sitk.ReadImage(str(result_path)), sitk.ReadImage(str(volume)))
    # the module reads the server's result file in the background as SimpleITK does (voxels, type, grid)
    image = sitk.ReadImage(str(result_path))
    loaded = read_result(result_path)
    assert loaded.error == ""
    np.testing.assert_array_equal(loaded.volume.voxels, sitk.GetArrayFromImage(image))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(loaded.volume.ijk_to_ras[:3, :3], lps_to_ras @ np.reshape(image.GetDirection(), (3, 3))
                               @ np.diag(image.GetSpacing()), atol=1e-9)
    np.testing.assert_allclose(loaded.volume.ijk_to_ras[:3, 3], lps_to_ras @ image.GetOrigin(), atol=1e-9)
    with pytest.raises(DenoiseServerError, match="422.*MR|CT only") as info:
        mr = tmp_path / "mr.nii.gz"
        write_crop(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz", mr, z=slice(90, 91))
        client.denoise("tddl_gcn", mr, tmp_path / "out", {"modality": "mr"})
    assert info.value.status == 422
    with pytest.raises(DenoiseServerError, match="404"):
        client.denoise("unet", volume, tmp_path / "out")


@pytest.mark.server
@pytest.mark.slow
def test_client_submits_corrections_reviews_and_watches_fine_tuning(training_server, tmp_path):
    server = training_server
    client = DenoiseServerClient(server.url)
    # a study loaded from a file (not from the server) is uploaded first, then its correction saved
    for image_id, z in (("slicer_study_1", slice(70, 73)), ("slicer_study_2", slice(80, 83))):
        original = write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", tmp_path / f"{image_id}.nrrd", z=z)
        corrected = write_crop(SAMPLE_STUDIES / "ct_head_invesalius.nii.gz", tmp_path / f"{image_id}_c.nrrd", z=z)
        assert client.upload_image(original, image_id) == image_id
        client.save_correction(image_id, corrected)
        entry = client.review(image_id, "corrected", "dr_slicer")
        assert entry["verdict"] == "corrected" and entry["reviewer"] == "dr_slicer"
    assert {"slicer_study_1", "slicer_study_2"} <= set(client.datastore_ids())
    study = client.next_study()
    assert study is not None and study["id"] in ("head_a", "head_b")
    downloaded = client.download_image(study["id"], tmp_path / "dl")
    assert downloaded.is_file() and sitk.ReadImage(str(downloaded)).GetSize()[2] == 3
    # Next study reads the downloaded file in its background task: SimpleITK's voxels and grid, right-handed
    image = sitk.ReadImage(str(downloaded))
    read = read_study(downloaded, study["id"])
    file_grid = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    file_grid[:3, :3] = lps_to_ras @ np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    file_grid[:3, 3] = lps_to_ras @ image.GetOrigin()
    assert np.linalg.det(read.ijk_to_ras[:3, :3]) > 0
    np.testing.assert_array_equal(align_to_grid(read.voxels, read.ijk_to_ras, read.voxels.shape, file_grid),
                                  sitk.GetArrayFromImage(image))
    with pytest.raises(DenoiseServerError, match="reason"):
        client.review(study["id"], "rejected", "dr_slicer")

    client.start_training("adl", {"steps": 4, "patch_size": 32, "device": "cpu"})
    deadline = time.monotonic() + 600
    stats = {}
    while time.monotonic() < deadline:
        stats = client.training_stats("adl")
        if stats.get("status") in ("done", "failed", "interrupted"):
            break
        time.sleep(1)
    assert stats.get("status") == "done", server.log_tail()
    assert stats["mode"] == "corrections" and "published" in stats["decision"]
    assert stats["baseline_psnr"] is not None
    versions = client.versions("adl", "ct")
    assert versions["served"]["version"] == (stats["decision"]["version"] or "pretrained")


def test_modality_of_a_volume_without_dicom_modality_is_left_to_the_server_unless_chosen():
    """The Lib's rule (no server): a DICOM CT / MR series is sent as its Modality whatever the panel says; any other
    volume as the user's choice, "auto" by default (the server's default decides, never a guess of the module's);
    the status phrase says which modality was used and why, and warns when the server's choice disagrees with the
    values. The Qt glue goes through it (static: no Qt here)."""
    from ADLDenoiseLib.settings import MODALITY_AUTO, MODALITY_CHOICES, describe_modality, request_modality

    assert MODALITY_CHOICES[0] == MODALITY_AUTO == "auto"
    assert request_modality("CT", "mr") == "ct" and request_modality(" mr ", MODALITY_AUTO) == "mr"
    for series in ("", None, "OT", "PT"):  # no DICOM CT / MR Modality: the choice, "auto" by default
        assert request_modality(series) == "auto" and request_modality(series, None) == "auto"
        assert request_modality(series, "MR") == "mr" and request_modality(series, "ct") == "ct"
    with pytest.raises(ValueError, match="auto, ct, mr"):
        request_modality("", "xray")
    conf_mr = {"modality": "MR", "modality_from": "server conf"}
    assert describe_modality(conf_mr, "", "auto", looks_ct=False) == \
        "MR: the server's default modality for volumes without a DICOM Modality"
    warned = describe_modality(conf_mr, "", "auto", looks_ct=True)
    assert "default modality" in warned and "look like CT" in warned and "choose CT under Modality" in warned
    guessed = describe_modality({"modality": "CT", "modality_from": "guessed from the values"}, "", "auto", True)
    assert guessed == "CT: guessed by the server from the values"
    assert describe_modality({"modality": "MR", "modality_from": "request"}, "", "mr", True) == \
        "MR: chosen under Modality"
    assert describe_modality({"modality": "CT", "modality_from": "request"}, "CT", "ct") == \
        "CT: the series' DICOM Modality"

    functions = _functions(MODULE_DIR / "ADLDenoise.py")
    modality_of = functions["ADLDenoiseLogic.modality_of"]
    # the module's own guess is never sent: it overrode the server's default modality
    assert "request_modality" in _calls(modality_of) and "looks_like_ct" not in _calls(modality_of)
    denoise = ast.unparse(functions["ADLDenoiseWidget.onDenoise"])
    assert "self.logic.modality_of(identity, self.ui.modalityCombo.itemData(self.ui.modalityCombo.currentIndex))" \
        in denoise
    assert "describe_modality(result, identity.modality, modality, looks_ct)" in denoise
    assert "SetAttribute(MODALITY_ATTRIBUTE" in ast.unparse(functions["ADLDenoiseLogic.load_result"])
    setup = ast.unparse(functions["ADLDenoiseWidget.setup"])
    assert "self.ui.modalityCombo.addItem(MODALITY_LABELS[choice], choice)" in setup
    changed = functions["ADLDenoiseWidget.onVolumeChanged"]
    assert "showModality" in _calls(changed)
    shown = ast.unparse(functions["ADLDenoiseWidget.showModality"])
    assert "combo.findData(series.lower() if series else MODALITY_AUTO)" in shown and "combo.enabled = not series" \
        in shown


@pytest.mark.server
@pytest.mark.slow
def test_volume_without_dicom_modality_gets_the_servers_default_modality(training_server, tmp_path):
    """A NIfTI / NRRD volume whose values look like HU, on a server whose conf says ``modality mr``: the request the
    module builds by default leaves the modality to the server (denoised as MR, "server conf", and the status says
    so and warns that the values look like CT); choosing CT under Modality denoises it as CT. The module used to
    send its own guess ("ct"), so the server's default was never used."""
    from ADLDenoiseLib.settings import MODALITY_AUTO, denoise_params, describe_modality, request_modality

    client = DenoiseServerClient(training_server.url)
    models = {m["name"]: m for m in client.denoising_models()}
    volume = write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", tmp_path / "head.nrrd", z=slice(50, 52))
    sent = request_modality("", MODALITY_AUTO)  # a volume loaded from a file: no DICOM Modality
    assert sent == "auto"
    _, result = client.denoise("adl", volume, tmp_path / "auto", denoise_params(models["adl"], sent))
    assert (result["modality"], result["modality_from"]) == ("MR", "server conf")
    status = describe_modality(result, "", sent, looks_ct=True)  # HU-like values: the module warns
    assert status.startswith("MR: the server's default modality") and "choose CT under Modality" in status
    chosen = request_modality("", "ct")
    _, result = client.denoise("adl", volume, tmp_path / "ct", denoise_params(models["adl"], chosen))
    assert (result["modality"], result["modality_from"]) == ("CT", "request")
    assert describe_modality(result, "", chosen, looks_ct=True) == "CT: chosen under Modality"


#: loads a DICOM series as Slicer's DICOMScalarVolumePlugin does with its Archetype reader (loadFilesWithArchetype,
#: then setVolumeNodeProperties: a left-handed series' slices reversed), in PyPI's slicer-core; saves the array
_LOAD_LIKE_SLICER = """
import sys
import numpy as np
import slicer, vtk
files, out = sys.argv[1:-1], sys.argv[-1]
node = slicer.vtkMRMLScalarVolumeNode()
storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
storage.SetFileName(files[0])
for name in files:
    storage.AddFileName(name)
storage.SetSingleFile(0)
assert storage.ReadData(node)
matrix = vtk.vtkMatrix4x4()
node.GetIJKToRASMatrix(matrix)
if not slicer.vtkMRMLVolumeNode.IsIJKCoordinateSystemRightHanded(matrix):
    slicer.vtkMRMLVolumeNode.ReverseSliceOrder(node.GetImageData(), matrix)
np.save(out, slicer.util.arrayFromVolume(node))
"""


def test_series_files_are_the_reference_of_a_dicom_volume_as_slicer_loads_it(shared_data, tmp_path):
    """The reference a DICOM volume is compared with before its first identification (``series_files``): the
    values of its files, read with pydicom, match the volume Slicer's reader makes of them (slicer-core's archetype
    storage node, as the DICOM plugin loads a series: a real GE series with gantry tilt and a JPEG 2000 Siemens
    slab); a "Mask volume" edit or one voxel changed does not, nor other files; any slice order matches."""
    from ADLDenoiseLib.series_files import NoReference, read_series_values

    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    series = {name: sorted(p for p in (shared_data / "dicom" / name).iterdir() if p.is_file())
              for name in ("ct_head_ge_tilted", "ct_abdomen_siemens_j2k_slab")}
    for name, files in series.items():
        out = tmp_path / f"{name}.npy"
        result = processes.run([python, "-c", _LOAD_LIKE_SLICER, *map(str, files), str(out)], 600, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        loaded = np.load(out)
        values = read_series_values(files)
        assert values is not None and values.voxels == loaded.size
        assert values.matches(loaded), name
        assert values.matches(loaded[::-1]) and values.matches(loaded.astype(np.float32))  # order, float type
        masked = loaded.copy()  # Segment Editor's Mask volume: outside a region set to the fill value
        masked[:, :100] = -1000
        assert not values.matches(masked)
        touched = loaded.copy()
        touched.flat[touched.size // 2] += 1
        assert not values.matches(touched) and not values.matches(loaded[1:])
        assert not values.matches(loaded.astype(np.float32) + 0.5)  # a value no stored value gives
    tilted, slab = (read_series_values(files) for files in series.values())
    assert not tilted.matches(np.load(tmp_path / "ct_abdomen_siemens_j2k_slab.npy"))
    # files that cannot be read as Slicer reads them give no reference (the first voxels seen stay it), and say why
    assert isinstance(read_series_values([]), NoReference)
    missing = read_series_values([*series["ct_head_ge_tilted"], tmp_path / "missing.dcm"])
    assert isinstance(missing, NoReference) and "missing.dcm cannot be read" in missing.reason
    assert missing.matches(loaded) is None
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"not a DICOM file")
    assert isinstance(read_series_values([not_dicom]), NoReference)


#: the DICOM plugin's default reader settings (``loadFilesWithSeriesReader("GDCM")``) of ``reader`` for ``files``,
#: read and checked: shared by the scalar and vector series-reader scripts below
_SERIES_READER_SETUP = """reader.SetArchetype(files[0])
for name in files:
    reader.AddFileName(name)
reader.SetSingleFile(0)
reader.SetOutputScalarTypeToNative()
reader.SetDesiredCoordinateOrientationToNative()
reader.SetUseNativeOriginOn()
reader.SetDICOMImageIOApproachToGDCM()
reader.Update()
assert reader.GetErrorCode() == 0
"""


#: loads a DICOM series as the DICOM plugin's default reader approach does (``loadFilesWithSeriesReader("GDCM")``:
#: vtkITKArchetypeImageSeriesScalarReader, native scalar type, GDCM's ImageIO), in PyPI's slicer-core; saves the array
_LOAD_WITH_SERIES_READER = """
import sys
import numpy as np
import slicer
from vtk.util.numpy_support import vtk_to_numpy
files, out = sys.argv[1:-1], sys.argv[-1]
reader = slicer.vtkITKArchetypeImageSeriesScalarReader()
""" + _SERIES_READER_SETUP + """image = reader.GetOutput()
columns, rows, slices = image.GetDimensions()
np.save(out, vtk_to_numpy(image.GetPointData().GetScalars()).reshape(slices, rows, columns))
"""


@pytest.mark.parametrize("rescales", ["fractional", "whole"])
def test_series_files_with_one_rescale_per_file_are_the_reference_as_slicer_loads_them(shared_data, tmp_path,
                                                                                         rescales):
    """A series whose files each have their own slope and intercept (PET, some CT and MR exports): Slicer's readers
    (the DICOM plugin's default GDCM series reader and the archetype storage node, in slicer-core) give each file's
    ``slope * v + intercept`` in double precision, as doubles when a rescale is fractional, else integers; the
    files' values (:class:`RescaledValues`) match that volume in any slice order, also when the multiply-add is
    fused (Slicer built by clang for arm64); one voxel changed, one voxel given another file's value, a "Mask
    volume" edit or a slice less do not."""
    from fractions import Fraction

    import pydicom
    from ADLDenoiseLib.series_files import RescaledValues, read_series_values

    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    # the real GE series, each file given its own rescale
    files, expected, fused = [], [], []
    for k, source in enumerate(sorted(p for p in (shared_data / "dicom" / "ct_head_ge_tilted").iterdir()
                                      if p.is_file())):
        dataset = pydicom.dcmread(source)
        if rescales == "fractional":
            dataset.RescaleSlope, dataset.RescaleIntercept = f"{0.37 + 0.0131 * k:.6g}", f"{-1024.5 + 0.25 * k:.6g}"
        else:
            dataset.RescaleSlope, dataset.RescaleIntercept = str(1 + k % 3), str(-1024 + 3 * k)
        files.append(tmp_path / source.name)
        dataset.save_as(files[-1])
        slope, intercept = float(dataset.RescaleSlope), float(dataset.RescaleIntercept)
        stored = dataset.pixel_array
        expected.append(slope * stored.astype(np.float64) + intercept)
        # fma(slope, v, intercept): the exact product and sum, rounded once
        distinct, inverse = np.unique(stored, return_inverse=True)
        once = [float(Fraction(slope) * int(v) + Fraction(intercept)) for v in distinct]
        fused.append(np.asarray(once)[inverse].reshape(stored.shape))
    expected, fused = np.stack(expected), np.stack(fused)
    values = read_series_values(files)
    assert isinstance(values, RescaledValues) and values.voxels == expected.size
    if rescales == "fractional":
        assert np.any(fused != expected)  # the fused values differ in the last bit somewhere
    assert values.matches(fused)
    loads = {}
    for script in (_LOAD_WITH_SERIES_READER, _LOAD_LIKE_SLICER):
        out = tmp_path / f"loaded{len(loads)}.npy"
        result = processes.run([python, "-c", script, *map(str, files), str(out)], 600, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        loads[script] = loaded = np.load(out)
        assert loaded.dtype == (np.float64 if rescales == "fractional" else np.int32)
        # bit-exact: what Slicer's reader gives is the files' slope * v + intercept in double precision
        assert np.array_equal(np.sort(loaded, axis=None), np.sort(expected, axis=None))
        assert values.matches(loaded) and values.matches(loaded[::-1])
        touched = loaded.copy()
        touched.flat[touched.size // 2] += 1
        assert not values.matches(touched)
        swapped = loaded.copy()  # one voxel given a value of another file: the same values, counted otherwise
        swapped.flat[0] = loaded.flat[np.flatnonzero(loaded.ravel() != loaded.flat[0])[-1]]
        assert not values.matches(swapped)
        masked = loaded.copy()
        masked[:, :100] = -1000
        assert not values.matches(masked) and not values.matches(loaded[1:])
        assert not values.matches(loaded.astype(np.float64) + 0.5)
    # the series' original files (one rescale) are another volume
    original = read_series_values(sorted(p for p in (shared_data / "dicom" / "ct_head_ge_tilted").iterdir()
                                         if p.is_file()))
    assert not original.matches(loads[_LOAD_WITH_SERIES_READER])


#: reads a series' values (pickled with pydicom's version and whether pydicom decodes the first file) in a Python
#: whose pydicom has only the JPEG Lossless decoders Slicer's has, namely none (Slicer ships pydicom with Pillow and
#: numpy, neither pylibjpeg-libjpeg nor GDCM's Python wrapping): those packages are made unimportable before pydicom
#: is imported, which holds for pydicom 2's pixel data handlers and pydicom 3's decoder plugins alike
_READ_WITHOUT_JPEG_LOSSLESS_DECODERS = """
import pickle, sys
for name in ("gdcm", "pylibjpeg", "libjpeg"):
    sys.modules[name] = None
import pydicom
from ADLDenoiseLib.series_files import read_series_values
files, out = sys.argv[1:-1], sys.argv[-1]
try:
    pydicom.dcmread(files[0]).pixel_array
    decoded = True
except Exception:
    decoded = False
with open(out, "wb") as stream:
    pickle.dump((pydicom.__version__, decoded, read_series_values(files)), stream)
"""


def _slicer_core_python() -> Path:
    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    return python


def _load_in_slicer_core(script: str, files, out: Path) -> np.ndarray:
    """The array one of the loading scripts above (``_LOAD_LIKE_SLICER``, ``_LOAD_WITH_SERIES_READER``) makes of
    ``files`` in slicer-core."""
    result = processes.run([_slicer_core_python(), "-c", script, *map(str, files), str(out)], 600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return np.load(out)


def _ge_series(shared_data: Path, count: int | None = None) -> list[Path]:
    return sorted(p for p in (shared_data / "dicom" / "ct_head_ge_tilted").iterdir() if p.is_file())[:count]


@pytest.mark.parametrize("rescales, photometric", [("one", "MONOCHROME2"), ("per file", "MONOCHROME2"),
                                                   ("one", "MONOCHROME1")])
def test_series_files_in_jpeg_lossless_are_decoded_by_gdcm_where_pydicom_has_no_decoder(shared_data, tmp_path,
                                                                                         rescales, photometric):
    """JPEG Lossless files in Slicer's Python, whose pydicom has no decoder for them (no pylibjpeg-libjpeg, no GDCM
    wrapping; here a Python where those cannot be imported, with pydicom 2 or 3): decoded by SimpleITK's GDCM,
    which Slicer ships, their values match the volume Slicer's default reader (slicer-core) makes of them, with the
    series' one rescale or one per file, and MONOCHROME1 (which GDCM inverts, here as in Slicer); one voxel changed
    does not."""
    gdcm = pytest.importorskip("gdcm")  # python-gdcm writes the JPEG Lossless files here
    pytest.importorskip("SimpleITK")
    import pickle

    import pydicom
    from ADLDenoiseLib.series_files import RescaledValues, SeriesValues

    _slicer_core_python()
    files = []
    for k, source in enumerate(_ge_series(shared_data)):
        dataset = pydicom.dcmread(source)
        dataset.PhotometricInterpretation = photometric
        if rescales == "per file":
            dataset.RescaleSlope, dataset.RescaleIntercept = f"{0.37 + 0.0131 * k:.6g}", f"{-1024.5 + 0.25 * k:.6g}"
        plain = tmp_path / f"plain{k}.dcm"
        dataset.save_as(plain)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(plain))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        files.append(tmp_path / source.name)
        writer.SetFileName(str(files[-1]))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        plain.unlink()
    loaded = _load_in_slicer_core(_LOAD_WITH_SERIES_READER, files, tmp_path / "loaded.npy")
    first = pydicom.dcmread(files[0])
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70" and first.PhotometricInterpretation == \
        photometric
    out = tmp_path / "values.pickle"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")])))
    result = processes.run([sys.executable, "-c", _READ_WITHOUT_JPEG_LOSSLESS_DECODERS, *map(str, files), str(out)],
                           600, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    version, decoded, values = pickle.loads(out.read_bytes())
    assert version == pydicom.__version__ and not decoded  # as in Slicer's Python: no decoder, whatever the version
    assert isinstance(values, SeriesValues if rescales == "one" else RescaledValues)
    assert values.matches(loaded) and values.matches(loaded[::-1])
    touched = loaded.copy()
    touched.flat[touched.size // 2] += 1
    assert not values.matches(touched) and not values.matches(loaded[1:])


def _monochrome1_series(sources: list[Path], folder: Path, layout: str) -> list[Path]:
    """``sources`` (the signed 16-bit GE series) as MONOCHROME1 files of ``layout``: "signed" (as they are, through
    a rescale of 2, -1024), "12 of 16 unsigned bits" or "7 of 8 unsigned bits" (the values shifted and clipped into
    that range)."""
    import pydicom

    folder.mkdir()
    files = []
    for source in sources:
        dataset = pydicom.dcmread(source)
        dataset.PhotometricInterpretation = "MONOCHROME1"
        if layout == "signed":
            dataset.RescaleSlope, dataset.RescaleIntercept = "2", "-1024"
        else:
            bits, stored_bits = (16, 12) if layout == "12 of 16 unsigned bits" else (8, 7)
            values = dataset.pixel_array.astype(np.int64) + 1500
            values = np.clip(values >> (16 - bits) // 2, 0, (1 << stored_bits) - 1)
            dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, stored_bits, stored_bits - 1
            dataset.PixelRepresentation = 0
            dataset.PixelData = values.astype(f"<u{bits // 8}").tobytes()
        files.append(folder / source.name)
        dataset.save_as(files[-1])
    return files


@pytest.mark.parametrize("layout", ["signed", "12 of 16 unsigned bits", "7 of 8 unsigned bits"])
def test_series_files_in_monochrome1_are_inverted_as_slicer_loads_them(shared_data, tmp_path, layout):
    """MONOCHROME1 (higher values darker: CR, DX, some exports): Slicer's reader (GDCM, in slicer-core's default
    series reader and archetype storage node) inverts the stored values to MONOCHROME2 before the rescale (the DICOM
    plugin itself does not): ``~v`` when signed, ``2**BitsStored - 1 - v`` for 16 unsigned bits, ``255 - v`` for 8.
    The files' values, inverted the same way, match that volume in any slice order; the values not inverted, one
    voxel changed or a "Mask volume" edit do not."""
    import pydicom
    from ADLDenoiseLib.series_files import SeriesValues, read_series_values

    files = _monochrome1_series(_ge_series(shared_data, 6), tmp_path / "files", layout)
    values = read_series_values(files)
    assert isinstance(values, SeriesValues) and values.slope == (2.0 if layout == "signed" else 1.0)
    datasets = [pydicom.dcmread(path) for path in files]
    as_stored = np.stack([values.slope * d.pixel_array.astype(np.float64) + values.intercept for d in datasets])
    scripts = [_LOAD_WITH_SERIES_READER] + ([_LOAD_LIKE_SLICER] if layout == "signed" else [])
    for k, script in enumerate(scripts):
        loaded = _load_in_slicer_core(script, files, tmp_path / f"loaded{k}.npy")
        assert not np.array_equal(np.sort(loaded, axis=None), np.sort(as_stored, axis=None))  # inverted
        assert values.matches(loaded) and values.matches(loaded[::-1])
        assert values.matches(loaded.astype(np.float32))
        assert not values.matches(as_stored)  # the reference as it was before: MONOCHROME1 read as MONOCHROME2
        touched = loaded.copy()
        touched.flat[touched.size // 2] += 1
        masked = loaded.copy()
        masked[:, :100] = loaded.min()
        assert not values.matches(touched) and not values.matches(masked)


def _enhanced_file(sources: list[Path], path: Path, sop_class: str, rescales: str) -> list[tuple[float, float]]:
    """One multi-frame file of ``sop_class`` (Enhanced CT or MR) holding the frames of ``sources`` (signed 16-bit
    slices), with per-frame functional groups (plane positions) and its rescale: "per frame, fractional" or "per
    frame, whole" (each frame its own Pixel Value Transformation) or "shared" (one, in the shared functional
    group), or "frames 4-5 their own" (per frame: 1, -1024 but frames 4 and 5, 1-based, 2 and -2048), or "shared,
    frame 3 its own" (the shared group's 2, -1024, and a per-frame one for frame 3 only). Returns each frame's
    (slope, intercept) as DICOM defines it (its per-frame transformation, else the shared one)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = [pydicom.dcmread(source) for source in sources]
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.FrameOfReferenceUID = generate_uid()
    dataset.Modality = "CT" if sop_class.endswith(".2.1") else "MR"
    dataset.PatientName, dataset.PatientID = "Enhanced^Test", "enhanced"
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = frames[0].Rows, frames[0].Columns, len(frames)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    if rescales == "per frame, fractional":
        rescale = [(f"{0.37 + 0.0131 * k:.6g}", f"{-1024.5 + 0.25 * k:.6g}") for k in range(len(frames))]
    elif rescales == "per frame, whole":
        rescale = [(str(1 + k % 3), str(-1024 + 3 * k)) for k in range(len(frames))]
    elif rescales == "frames 4-5 their own":
        rescale = [("2", "-2048") if k in (3, 4) else ("1", "-1024") for k in range(len(frames))]
    elif rescales == "shared, frame 3 its own":
        rescale = [("1", "-1024") if k == 2 else ("2", "-1024") for k in range(len(frames))]
    else:
        rescale = [("2", "-1024")] * len(frames)

    def transformation(slope: str, intercept: str) -> Dataset:
        item = Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "US"
        return item

    shared, measures, orientation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 2.5
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    if rescales.startswith("shared"):
        shared.PixelValueTransformationSequence = [transformation("2", "-1024")]
    dataset.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(len(frames)):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, 2.5 * k]
        item.PlanePositionSequence = [position]
        if not rescales.startswith("shared") or rescale[k] != ("2", "-1024"):
            item.PixelValueTransformationSequence = [transformation(*rescale[k])]
        per_frame.append(item)
    dataset.PerFrameFunctionalGroupsSequence = per_frame
    dataset.PixelData = np.stack([frame.pixel_array for frame in frames]).astype("<i2").tobytes()
    dataset.is_little_endian, dataset.is_implicit_VR = True, False
    pydicom.dcmwrite(path, dataset, write_like_original=False)
    return [(float(slope), float(intercept)) for slope, intercept in rescale]


@pytest.mark.parametrize("sop_class, rescales", [
    ("1.2.840.10008.5.1.4.1.1.2.1", "per frame, fractional"),  # Enhanced CT
    ("1.2.840.10008.5.1.4.1.1.4.1", "per frame, whole"),  # Enhanced MR
    ("1.2.840.10008.5.1.4.1.1.2.1", "shared"),
])
def test_an_enhanced_multiframe_file_is_the_reference_as_slicer_loads_it(shared_data, tmp_path, sop_class,
                                                                         rescales):
    """An enhanced multi-frame file (all slices in one file, rescale in the functional groups): Slicer's reader
    (GDCM, slicer-core's default series reader) applies one rescale to every frame, the shared functional group's,
    else the first frame's, even where later frames carry their own (their values in Slicer are then not what
    those frames mean). The reference is what the node holds: all frames through that one rescale, which matches
    the loaded volume in any slice order; all frames through their own rescales (which Slicer does not give) and
    one voxel changed do not."""
    import pydicom
    from ADLDenoiseLib.series_files import SeriesValues, read_series_values

    path = tmp_path / "enhanced.dcm"
    rescale = _enhanced_file(_ge_series(shared_data, 8), path, sop_class, rescales)
    loaded = _load_in_slicer_core(_LOAD_WITH_SERIES_READER, [path], tmp_path / "loaded.npy")
    values = read_series_values([path])
    assert isinstance(values, SeriesValues) and (values.slope, values.intercept) == rescale[0]
    assert values.voxels == loaded.size == 8 * 512 * 512
    assert values.matches(loaded) and values.matches(loaded[::-1])
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    each_own = np.stack([slope * frame + intercept for frame, (slope, intercept) in zip(stored, rescale)])
    if rescales != "shared":
        assert not np.array_equal(np.sort(loaded, axis=None), np.sort(each_own, axis=None))  # Slicer's one rescale
        assert not values.matches(each_own)
    touched = loaded.copy()
    touched.flat[touched.size // 3] += 1
    assert not values.matches(touched) and not values.matches(loaded[1:])
    # the frames whose own rescale was ignored (all but the first, each its own) are named, from the headers
    ignored = [(item.file, item.frames, item.total, item.applied, len(item.rescales))
               for item in values.ignored_rescales]
    assert ignored == ([] if rescales == "shared" else [("enhanced.dcm", tuple(range(2, 9)), 8, rescale[0], 7)])


@pytest.mark.parametrize("rescales", ["frames 4-5 their own", "shared, frame 3 its own"])
def test_the_frames_whose_own_rescale_slicer_ignored_are_named_and_are_those_with_wrong_values(shared_data, tmp_path,
                                                                                              rescales):
    """The module warns of the frames of a multi-frame file that Slicer's reader loaded through another frame's (or
    the shared group's) rescale: named from the headers the reference reads (no second read), they are exactly the
    frames whose values in the volume slicer-core's default reader makes are not what their own rescale gives; the
    others are right. Told even where the pixel data cannot be decoded here (Slicer's GDCM may decode it)."""
    import pydicom
    from ADLDenoiseLib.series_files import IgnoredRescale, NoReference, SeriesValues, read_series_values

    path = tmp_path / "enhanced.dcm"
    rescale = _enhanced_file(_ge_series(shared_data, 8), path, "1.2.840.10008.5.1.4.1.1.2.1", rescales)
    values = read_series_values([path])
    applied = (1.0, -1024.0) if rescales == "frames 4-5 their own" else (2.0, -1024.0)
    wrong = (4, 5) if rescales == "frames 4-5 their own" else (3,)
    assert isinstance(values, SeriesValues) and (values.slope, values.intercept) == applied
    own = ((2.0, -2048.0),) if rescales == "frames 4-5 their own" else ((1.0, -1024.0),)
    assert values.ignored_rescales == (IgnoredRescale("enhanced.dcm", wrong, 8, applied, own),)
    # the volume Slicer makes of the file: the frames named are those whose values are not their own rescale's
    loaded = _load_in_slicer_core(_LOAD_WITH_SERIES_READER, [path], tmp_path / "loaded.npy")
    assert values.matches(loaded)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    right = {number for number, (frame, (slope, intercept)) in enumerate(zip(stored, rescale), 1)
             if any(np.array_equal(plane, slope * frame + intercept) for plane in loaded)}
    assert set(range(1, 9)) - right == set(wrong)
    text = values.ignored_rescales[0].describe()
    expected = ("frames 4-5 of enhanced.dcm (2 of 8) carry their own rescale (slope 2, intercept -2048)"
                if rescales == "frames 4-5 their own" else
                "frame 3 of enhanced.dcm (1 of 8) carries its own rescale (slope 1, intercept -1024)")
    assert text.startswith(expected + " that Slicer's reader ignored (it applied slope "
                           f"{applied[0]:g}, intercept {applied[1]:g} to all the file's frames)"), text
    # pixel data that cannot be decoded here: no reference, the frames still named
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEG2000Lossless
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51not a codestream"] * 8)
    dataset["PixelData"].is_undefined_length = True
    dataset.save_as(tmp_path / "undecodable.dcm")
    undecodable = read_series_values([tmp_path / "undecodable.dcm"])
    assert isinstance(undecodable, NoReference) and "cannot be decoded" in undecodable.reason
    assert [item.frames for item in undecodable.ignored_rescales] == [wrong]


def test_a_volume_with_frames_whose_rescale_slicer_ignored_is_warned_of_and_sent_only_once_confirmed():
    """The Qt glue of the warning (the decision is ReviewSession's, tested without Slicer in
    test_slicer_workflow_state): logged when the files check ends; said on the status line (the session's
    describe_study); ``selected``, which Denoise, a verdict and a correction go through before anything is sent,
    asks with Slicer's ``confirmOkCancelDisplay`` when ``require_study`` refuses with RescaleNotApplied, records the
    confirmation and goes on, and a declined question is said on the status line without a second dialog. A
    correction of such a volume, and a verdict on its result, are refused before the question is asked, and by the
    logic itself (require_correctable, require_judgeable)."""
    functions = _functions(MODULE_DIR / "ADLDenoise.py")
    poll = ast.unparse(functions["ADLDenoiseLogic.poll_identifications"])
    assert poll.index("self.session.files_read(") < poll.index("warning = self.session.rescale_warning(key[0])") < \
        poll.index("logging.warning('ADLDenoise: %s: %s', node_id, warning)")
    assert "describe_study" in _calls(functions["ADLDenoiseWidget.studyText"])
    selected = ast.unparse(functions["ADLDenoiseWidget.selected"])
    handler = selected[selected.index("except RescaleNotApplied as refusal:"):]
    assert handler.index("if not slicer.util.confirmOkCancelDisplay(refusal.question, windowTitle='ADL Denoise'):") \
        < handler.index("raise refusal.declined() from None") < \
        handler.index("session.accept_ignored_rescale(refusal.identity)") < handler.index("session.require_study()")
    for name in ("onDenoise", "onVerdict", "onSubmitCorrection"):
        body = ast.unparse(functions[f"ADLDenoiseWidget.{name}"])
        assert "self.selected()" in body and body.index("self.selected()") < body.index("self.run("), name
    # a correction of such a volume is refused whatever the answer: refused before the question is asked
    submit = ast.unparse(functions["ADLDenoiseWidget.onSubmitCorrection"])
    assert submit.index("self.logic.session.require_correctable()") < submit.index("self.selected()")
    # and by the logic itself, for scripts and the self-test, before anything is written or sent
    logic = ast.unparse(functions["ADLDenoiseLogic.submit_correction"])
    assert logic.index("self.session.require_correctable(study['identity'])") < logic.index("self.require_client()")
    # so is a verdict on the result of such a volume (it was denoised from the wrong values): by the widget before
    # the question, by the session's verdict_request, and by the logic before the study is uploaded or judged
    verdict = ast.unparse(functions["ADLDenoiseWidget.onVerdict"])
    assert verdict.index("self.logic.session.require_judgeable()") < verdict.index("self.selected()") < \
        verdict.index("self.logic.session.verdict_request(") < verdict.index("self.run(self.logic.submit_verdict,")
    logic = ast.unparse(functions["ADLDenoiseLogic.submit_verdict"])
    assert logic.index("self.session.require_judgeable(study['identity'])") < logic.index("self.require_client()") \
        < logic.index("self.study_id_for(study, report)") < logic.index("send_verdict(")
    error = ast.unparse(functions["ADLDenoiseWidget.error"])
    assert "declined = isinstance(message, NotConfirmed)" in error
    assert error.index("self.ui.statusLabel.text = message") < error.index("if not declined:") < \
        error.index("errorDisplay(")
    slicer_repo = Path("/work/.mirror/Slicer+Slicer/repo")
    if slicer_repo.is_dir():  # the call as Slicer defines it: True only for OK
        import subprocess

        util = subprocess.run(["git", "-C", str(slicer_repo), "show", "HEAD:Base/Python/slicer/util.py"],
                              capture_output=True, text=True, check=True).stdout
        definition = util[util.index("def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):"):]
        assert "return result == qt.QMessageBox.Ok" in definition[:definition.index("\ndef ")]


def test_a_result_from_wrong_values_repeats_the_warning_and_files_not_found_say_why():
    """The Qt glue of two decisions of the Slicer-free library (tested in test_slicer_workflow_state and, for the
    node, test_mrml_logic): a result denoised from frames with wrong values notes the session's result_warning on
    its node (mrml.load_result, beside its study) and its status line is the session's describe_result (the
    warning first); a DICOM volume whose files cannot be found answers find_series_files' NoReference, not None, so
    that the status line says why it was not compared with them (ReviewSession.describe_study)."""
    functions = _functions(MODULE_DIR / "ADLDenoise.py")
    load = ast.unparse(functions["ADLDenoiseLogic.load_result"])
    assert "load_result(slicer.mrmlScene, loaded, original, RESULT_SUFFIX, study=identity.datastore_id(), " \
        "warning=self.session.result_warning(identity))" in load
    denoise = ast.unparse(functions["ADLDenoiseWidget.onDenoise"])
    done = denoise[denoise.index("def done(answer):"):]
    assert done.index("node = self.logic.load_result(original, identity, loaded, result)") < \
        done.index("self.ui.statusLabel.text = self.logic.session.describe_result(identity, line)") < \
        done.index("self.onCompare()")
    assert "self.ui.statusLabel.text = f'denoised with" not in done  # only through describe_result
    start = ast.unparse(functions["ADLDenoiseLogic.start_files_check"])
    assert "files = self.series_files_of(node, snapshot.series) if node is not None else None" in start
    not_found = start[start.index("if not isinstance(files, list):"):start.index("task = BackgroundTask(")]
    assert "return files" in not_found and "return None" not in not_found
    assert "find_series_files(" in ast.unparse(functions["ADLDenoiseLogic.series_files_of"])
    slicer_repo = Path("/work/.mirror/Slicer+Slicer/repo")
    if slicer_repo.is_dir():  # the node calls of mrml's note exist in Slicer's vtkMRMLNode
        import subprocess

        header = subprocess.run(["git", "-C", str(slicer_repo), "show", "HEAD:Libs/MRML/Core/vtkMRMLNode.h"],
                                capture_output=True, text=True, check=True).stdout
        for declaration in ("vtkSetStringMacro(Description);", "vtkGetStringMacro(Description);",
                            "void RemoveAttribute(const char* name);"):
            assert declaration in header, declaration


#: loads a colour series as the DICOM plugin does (``loadFilesWithSeriesReader`` with grayscale false: the vector
#: reader, into a vtkMRMLVectorVolumeNode), in slicer-core; prints the number of components
_LOAD_AS_VECTOR = """
import sys
import slicer
files = sys.argv[1:]
reader = slicer.vtkITKArchetypeImageSeriesVectorReaderSeries()
""" + _SERIES_READER_SETUP + """print("components", reader.GetOutput().GetNumberOfScalarComponents())
"""


def test_colour_and_float_series_files_give_no_reference_and_say_why(shared_data, tmp_path):
    """Files Slicer's scalar volume reader does not load (slicer-core's default series reader and archetype storage
    node both fail on them): colour (RGB, loaded by the DICOM plugin as a vector volume, which the module does not
    take) and Float / Double Float Pixel Data (parametric maps: no ImageIO reads them; the Parametric Map plugin
    converts them with dcmqi). They give no reference, and the reason the module shows says which; 32-bit pixels
    too."""
    import pydicom
    from ADLDenoiseLib.series_files import NoReference, read_series_values

    python = _slicer_core_python()
    series = {kind: [] for kind in ("colour", "float", "double", "32-bit")}
    for source in _ge_series(shared_data, 3):
        for kind, files in series.items():
            dataset = pydicom.dcmread(source)
            values = dataset.pixel_array.astype(np.float64)
            for name in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
                if name in dataset:
                    delattr(dataset, name)
            if kind == "colour":
                grey = np.clip((values + 1500) / 16, 0, 255).astype(np.uint8)
                dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 3, "RGB"
                dataset.PlanarConfiguration = 0
                dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
                dataset.PixelData = np.stack([grey, np.roll(grey, 7, 0), 255 - grey], -1).tobytes()
            elif kind == "32-bit":
                dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 32, 32, 31
                dataset.PixelData = (values * 1000).astype("<i4").tobytes()
            else:
                del dataset.PixelData
                for name in ("BitsStored", "HighBit", "PixelRepresentation"):
                    delattr(dataset, name)
                if kind == "float":
                    dataset.BitsAllocated, dataset.FloatPixelData = 32, (values * 0.37).astype("<f4").tobytes()
                else:
                    dataset.BitsAllocated, dataset.DoubleFloatPixelData = 64, (values * 0.37).astype("<f8").tobytes()
            files.append(tmp_path / kind / source.name)
            files[-1].parent.mkdir(exist_ok=True)
            dataset.save_as(files[-1])
    reasons = {kind: read_series_values(files) for kind, files in series.items()}
    assert all(isinstance(reason, NoReference) for reason in reasons.values()), reasons
    assert "colour" in reasons["colour"].reason and "vector" in reasons["colour"].reason
    for kind in ("float", "double"):
        assert "float pixel data" in reasons[kind].reason and "cannot be compared" in reasons[kind].reason
    assert "32-bit" in reasons["32-bit"].reason
    # Slicer's scalar reader does not load the colour or float files, so no scalar volume holds their values as read
    for kind in ("colour", "float", "double"):
        for k, script in enumerate((_LOAD_WITH_SERIES_READER, _LOAD_LIKE_SLICER)):
            out = tmp_path / f"{kind}{k}.npy"
            result = processes.run([python, "-c", script, *map(str, series[kind]), str(out)], 600, cwd=REPO_ROOT)
            assert result.returncode != 0 and not out.exists(), (kind, k)
    result = processes.run([python, "-c", _LOAD_AS_VECTOR, *map(str, series["colour"])], 600, cwd=REPO_ROOT)
    assert result.returncode == 0 and "components 3" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


# --------------------------------------------------------------------------------------------------- MRML
def test_mrml_logic_with_real_mrml_from_slicer_core():
    python = REPO_ROOT / ".venv-slicer" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-slicer (scripts/setup_slicer_env.sh could not install PyPI's slicer-core here)")
    # Slicer puts a module's folder on sys.path; outside Slicer, PYTHONPATH does
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR))
    result = processes.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            MODULE_DIR / "Testing" / "Python" / "test_mrml_logic.py"], 600, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # every test ran: none skipped (a missing MRML class would skip, not fail); the count is not pinned
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"skipped|deselected|xfail", summary), summary
