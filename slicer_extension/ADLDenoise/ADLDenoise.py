"""3D Slicer module: denoise CT / MR volumes on the ADL / TDDL-GCN MONAI Label server, compare, correct, review,
fine-tune.

Thin Qt glue over ``ADLDenoiseLib`` (Slicer-free client, background runner, workflow maths, MRML helpers). Every
network call runs in a :class:`ADLDenoiseLib.BackgroundTask` polled by a ``qt.QTimer``, so Slicer never freezes;
MRML is only touched on the GUI thread.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ADLDenoiseLib import (
    WINDOW_PRESETS,
    BackgroundTask,
    DenoiseServerClient,
    DenoiseServerError,
    window_for,
)
from ADLDenoiseLib.regions import CHOICES, MAX_STRENGTH, SegmentMarks, build_region_map, prepare_region_file
from ADLDenoiseLib.settings import DEFAULT_SERVER_URL

SETTINGS_PREFIX = "ADLDenoise/"
RESULT_SUFFIX = " denoised"


class ADLDenoise(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ADL Denoise"
        self.parent.categories = ["Filtering.Denoising"]
        self.parent.contributors = ["ADL / TDDL-GCN denoising team"]
        self.parent.helpText = (
            "Denoise CT and MR volumes on a MONAI Label server running the ADL / TDDL-GCN app, compare the result "
            "with the original, correct it, review studies and fine-tune the models.")
        self.parent.acknowledgementText = (
            "ADL: Ghahremani et al., Adversarial Distortion Learning for Medical Image Denoising. TDDL-GCN: Chen, Pu, "
            "Ren et al. Built on MONAI Label.")


# ------------------------------------------------------------------------------------------------------ logic
class ADLDenoiseLogic(ScriptedLoadableModuleLogic):
    """Everything the widget does, callable without the widget (the module test uses it directly)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client: DenoiseServerClient | None = None
        self.work_dir = Path(tempfile.mkdtemp(prefix="ADLDenoise_"))
        self.study_ids: dict[str, str] = {}  # volume node ID -> datastore image id
        self.results: dict[str, str] = {}  # original node ID -> denoised node ID
        self.study_files: dict[str, Path] = {}  # volume node ID -> the file the server holds for it (its grid)

    # settings remembered between sessions (Slicer's settings file)
    @staticmethod
    def setting(key: str, default: str = "") -> str:
        value = qt.QSettings().value(SETTINGS_PREFIX + key)
        return str(value) if value not in (None, "") else default

    @staticmethod
    def set_setting(key: str, value: str) -> None:
        qt.QSettings().setValue(SETTINGS_PREFIX + key, value)

    def connect(self, url: str) -> list[dict]:
        self.client = DenoiseServerClient(url)
        models = self.client.denoising_models()
        self.set_setting("serverUrl", url)
        return models

    def require_client(self) -> DenoiseServerClient:
        if self.client is None:
            raise DenoiseServerError("connect to a server first")
        return self.client

    # --- denoise (export on the GUI thread, request in the background, load on the GUI thread)
    def export_input(self, node) -> Path:
        from ADLDenoiseLib.mrml import export_volume

        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.GetName()) or "volume"
        return export_volume(node, self.work_dir / f"{safe}_{node.GetID().replace(' ', '_')}.nrrd")

    def denoise_file(self, model: str, path: Path, modality: str, report=None, cancelled=None):
        client = self.require_client()
        if report:
            report(None, f"denoising with {model} on {client.server_url} ...")
        result_path, result = client.denoise(model, path, self.work_dir / "results", {"modality": modality,
                                                                                       "result_extension": ".nrrd"})
        if cancelled and cancelled():
            return None
        return result_path, result

    def load_result(self, original, result_path: Path, result: dict):
        from ADLDenoiseLib.mrml import load_result

        node = load_result(slicer.mrmlScene, result_path, original, RESULT_SUFFIX)
        node.SetAttribute("ADLDenoise.model", str(result.get("model")))
        node.SetAttribute("ADLDenoise.weightsVersion", str(result.get("weights_version")))
        node.SetAttribute("ADLDenoise.originalID", original.GetID())
        self.results[original.GetID()] = node.GetID()
        return node

    def modality_of(self, node) -> str:
        from ADLDenoiseLib.mrml import looks_like_ct

        tagged = node.GetAttribute("DICOM.Modality") or ""
        if tagged.upper() in ("CT", "MR"):
            return tagged.lower()
        return "ct" if looks_like_ct(node) else "mr"

    # --- corrections and review
    def prepare_study(self, node) -> dict:
        """On the GUI thread: what the background upload needs (no MRML access happens off this thread)."""
        known = self.study_ids.get(node.GetID())
        path = None if known else self.export_input(node)
        return {"node_id": node.GetID(), "image_id": known,
                "name": re.sub(r"[^A-Za-z0-9_.-]+", "_", node.GetName()) or "study",
                "path": path, "grid_file": self.study_files.get(node.GetID()) or path}

    def prepare_regions(self, segmentation_node, reference, marks: SegmentMarks, study: dict) -> dict | None:
        """On the GUI thread: the marked segments as a label map on ``reference``'s grid and their declarations
        (None when no segment is marked). Validation errors (empty segment, bad strength) are raised here,
        before anything is uploaded."""
        from ADLDenoiseLib.mrml import segment_masks, segments_of, volume_grid

        if segmentation_node is None:
            return None
        marks.sync(segments_of(segmentation_node))
        marked = marks.marked()
        if not marked:
            return None
        grid = volume_grid(reference)
        masks = segment_masks(segmentation_node, [segment_id for segment_id, _ in marked], reference)
        region_map, _ = build_region_map(masks, [region for _, region in marked], grid.shape)
        return {"map": region_map, "grid": grid, "regions": [region for _, region in marked],
                "study_file": study.get("grid_file"),
                "path": self.work_dir / "regions" / f"{study['name']}_{study['node_id'].replace(' ', '_')}.nii.gz"}

    def study_id_for(self, study: dict, report=None) -> str:
        """The datastore id of the original, uploading it first if it did not come from the server."""
        if study["image_id"]:
            return study["image_id"]
        if report:
            report(None, f"uploading the original as {study['name']} ...")
        image_id = self.require_client().upload_image(study["path"], study["name"])
        self.study_ids[study["node_id"]] = image_id
        return image_id

    def submit_correction(self, study: dict, corrected_path: Path, reviewer: str, regions: dict | None = None,
                          report=None, cancelled=None) -> dict:
        """Upload the original if needed, then the marked regions (``prepare_regions``), the correction, the
        verdict. Regions go first, so that a correction is never stored without the regions sent with it.

        A correction sent without regions leaves those of an earlier correction of the same image on the server:
        MONAI Label 0.8.5's datastore keeps a deleted label listed (its file watcher does not watch label folders
        made after start), which would make the app fail to read it, so they are not deleted from here."""
        client = self.require_client()
        image_id = self.study_id_for(study, report)
        if regions is not None:
            if report:
                report(None, f"saving {len(regions['regions'])} marked region(s) ...")
            path = prepare_region_file(regions["map"], regions["grid"], regions["path"], regions["study_file"])
            client.save_regions(image_id, path, regions["regions"])
        if report:
            report(None, "saving the correction ...")
        client.save_correction(image_id, corrected_path)
        return client.review(image_id, "corrected", reviewer)


# ------------------------------------------------------------------------------------------------------ widget
class ADLDenoiseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: ADLDenoiseLogic | None = None
        self.task: BackgroundTask | None = None
        self.on_done = None
        self.train_poll: BackgroundTask | None = None
        self.roi_node = None
        self.corrected_node = None
        self.marks = SegmentMarks()
        self.segmentation_node = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/ADLDenoise.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = ADLDenoiseLogic()

        self.ui.serverUrlEdit.text = self.logic.setting("serverUrl", DEFAULT_SERVER_URL)
        self.ui.reviewerEdit.text = self.logic.setting("reviewer", "")
        self.ui.inputVolumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.ui.inputVolumeSelector.addEnabled = False
        self.ui.inputVolumeSelector.removeEnabled = False
        self.ui.inputVolumeSelector.noneEnabled = True
        self.ui.inputVolumeSelector.setMRMLScene(slicer.mrmlScene)
        for slider in (self.ui.fadeSlider, self.ui.blendSlider):
            slider.minimum, slider.maximum, slider.singleStep = 0.0, 1.0, 0.05
        self.ui.fadeSlider.value = 1.0
        self.ui.blendSlider.value = 1.0
        self.ui.presetCombo.addItems(list(WINDOW_PRESETS))
        self.ui.trainModeCombo.addItems(["corrections", "adapt_noise"])
        self.ui.segmentationSelector.nodeTypes = ["vtkMRMLSegmentationNode"]
        self.ui.segmentationSelector.addEnabled = False
        self.ui.segmentationSelector.removeEnabled = False
        self.ui.segmentationSelector.noneEnabled = True
        self.ui.segmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.regionsTable.setColumnCount(3)
        self.ui.regionsTable.setHorizontalHeaderLabels(["Segment", "Intent", "Strength"])
        self.ui.regionsTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.ui.regionsTable.verticalHeader().setVisible(False)
        self.ui.trainStepsSpin.minimum, self.ui.trainStepsSpin.maximum, self.ui.trainStepsSpin.value = 1, 100000, 200

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.modelsCombo.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.denoiseButton.connect("clicked(bool)", self.onDenoise)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.fadeSlider.connect("valueChanged(double)", self.onFade)
        self.ui.differenceButton.connect("clicked(bool)", self.onDifference)
        self.ui.presetCombo.connect("currentIndexChanged(int)", self.onPreset)
        self.ui.placeRoiButton.connect("clicked(bool)", self.onPlaceRoi)
        self.ui.roiStatsButton.connect("clicked(bool)", self.onRoiStatistics)
        self.ui.blendSlider.connect("valueChanged(double)", self.onBlend)
        self.ui.submitCorrectionButton.connect("clicked(bool)", self.onSubmitCorrection)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.nextStudyButton.connect("clicked(bool)", self.onNextStudy)
        self.ui.acceptButton.connect("clicked(bool)", lambda checked=False: self.onVerdict("accepted"))
        self.ui.rejectButton.connect("clicked(bool)", lambda checked=False: self.onVerdict("rejected"))
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopTrainButton.connect("clicked(bool)", self.onStopTrain)
        self.ui.reviewerEdit.connect("editingFinished()", lambda: self.logic.set_setting("reviewer",
                                                                                         self.ui.reviewerEdit.text))

        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)
        self.train_timer = qt.QTimer()
        self.train_timer.setInterval(2000)
        self.train_timer.connect("timeout()", self.onTrainPoll)

    def cleanup(self):
        self.timer.stop()
        self.segmentation_node = None
        self.train_timer.stop()
        self.removeObservers()

    # --- helpers
    def error(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.util.errorDisplay(message, windowTitle="ADL Denoise")

    def model(self) -> str:
        combo = self.ui.modelsCombo
        return combo.itemData(combo.currentIndex) or combo.currentText if combo.count else ""

    def original_and_result(self):
        original = self.ui.inputVolumeSelector.currentNode()
        if original is None:
            raise DenoiseServerError("select a volume first")
        result_id = self.logic.results.get(original.GetID())
        result = slicer.mrmlScene.GetNodeByID(result_id) if result_id else None
        return original, result

    def run(self, function, *args, on_done=None, busy_text="working ..."):
        """Start a background call; ``on_done(result)`` runs on the GUI thread when it succeeds."""
        if self.task is not None and not self.task.finished:
            self.error("another request is still running: wait for it or press Cancel")
            return
        self.task = BackgroundTask(function, *args)
        self.on_done = on_done
        self.ui.progressBar.setRange(0, 0)  # busy indicator
        self.ui.statusLabel.text = busy_text
        self.ui.cancelButton.enabled = True
        self.timer.start()

    def onPoll(self):
        if self.task is None:
            self.timer.stop()
            return
        state = self.task.poll()
        self.ui.statusLabel.text = f"{state['message']} ({state['seconds']:.0f} s)"
        if state["progress"] is not None:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = int(100 * state["progress"])
        if not self.task.finished:
            return
        self.timer.stop()
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setRange(0, 100)
        task, self.task = self.task, None
        if task.state == "failed":
            self.ui.progressBar.value = 0
            self.error(str(task.error))
        elif task.state == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "cancelled (the scene is unchanged)"
        elif self.on_done is not None and task.result is not None:
            self.ui.progressBar.value = 100
            try:
                self.on_done(task.result)
            except Exception as error:  # noqa: BLE001 - shown to the user; the scene keeps what it had
                logging.exception("ADLDenoise")
                self.error(str(error))

    # --- server
    def onConnect(self):
        url = self.ui.serverUrlEdit.text.strip()

        def done(models):
            self.ui.modelsCombo.clear()
            for model in models:
                self.ui.modelsCombo.addItem(f"{model['name']}: {model['method']}", model["name"])
            self.models = {m["name"]: m for m in models}
            self.ui.statusLabel.text = f"connected to {url}: {len(models)} denoising model(s)"
            self.onModelChanged()
            self.showVersion()

        self.run(lambda report, cancelled: self.logic.connect(url), on_done=done, busy_text=f"connecting to {url} ...")

    def onModelChanged(self, *_):
        model = getattr(self, "models", {}).get(self.model())
        if not model:
            self.ui.modelInfoLabel.text = "no model"
            return
        parts = []
        for modality, weights in model["weights"].items():
            parts.append(f"{modality.upper()}: " + (f"weights {weights['version']}" if weights.get("available")
                                                    else "no weights installed"))
        self.ui.modelInfoLabel.text = "; ".join(parts)

    def showVersion(self):
        model = getattr(self, "models", {}).get(self.model())
        if model:
            self.ui.versionLabel.text = "serving " + ", ".join(
                f"{m.upper()} {w.get('version', '-')}" for m, w in model["weights"].items())

    # --- denoise
    def onDenoise(self):
        try:
            original = self.ui.inputVolumeSelector.currentNode()
            if original is None:
                raise DenoiseServerError("select a CT or MR volume first")
            model = self.model()
            if not model:
                raise DenoiseServerError("connect to a server and choose a model first")
            path = self.logic.export_input(original)
            modality = self.logic.modality_of(original)
        except Exception as error:  # noqa: BLE001
            self.error(str(error))
            return

        def done(answer):
            result_path, result = answer
            node = self.logic.load_result(original, result_path, result)
            self.ui.statusLabel.text = (f"denoised with {result.get('model')} ({result.get('modality')}, weights "
                                        f"{result.get('weights_version')}) in {result.get('seconds')} s")
            self.onCompare()
            return node

        self.run(self.logic.denoise_file, model, path, modality, on_done=done, busy_text="denoising ...")

    def onCancel(self):
        if self.task is not None:
            self.task.cancel()

    # --- compare
    def onCompare(self):
        try:
            original, result = self.original_and_result()
            if result is None:
                raise DenoiseServerError("denoise the volume first")
        except DenoiseServerError as error:
            self.error(str(error))
            return
        layout_manager = slicer.app.layoutManager()
        layout_manager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for view, volume in (("Red", original), ("Yellow", result)):
            composite = layout_manager.sliceWidget(view).mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLinkedControl(True)  # slice position and zoom follow each other
            composite.SetHotLinkedControl(True)
        for view in ("Red", "Yellow"):
            layout_manager.sliceWidget(view).sliceLogic().FitSliceToAll()
        # window/level of the denoised view follows the original's
        self.removeObservers(self.onOriginalWindowChanged)
        self.addObserver(original.GetDisplayNode(), vtk.vtkCommand.ModifiedEvent, self.onOriginalWindowChanged)
        self.onOriginalWindowChanged()

    def onOriginalWindowChanged(self, *_):
        try:
            original, result = self.original_and_result()
        except DenoiseServerError:
            return
        if result is not None and original.GetDisplayNode() and result.GetDisplayNode():
            source, target = original.GetDisplayNode(), result.GetDisplayNode()
            target.SetAutoWindowLevel(False)
            target.SetWindowLevel(source.GetWindow(), source.GetLevel())

    def onFade(self, value):
        try:
            original, result = self.original_and_result()
        except DenoiseServerError:
            return
        if result is None:
            return
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        composite.SetBackgroundVolumeID(original.GetID())
        composite.SetForegroundVolumeID(result.GetID())
        composite.SetForegroundOpacity(float(value))

    def onDifference(self):
        from ADLDenoiseLib.mrml import difference_volume

        try:
            original, result = self.original_and_result()
            if result is None:
                raise DenoiseServerError("denoise the volume first")
            node = difference_volume(slicer.mrmlScene, original, result)
        except Exception as error:  # noqa: BLE001
            self.error(str(error))
            return
        slicer.util.setSliceViewerLayers(background=node)

    def onPreset(self, *_):
        preset = self.ui.presetCombo.currentText
        try:
            original, result = self.original_and_result()
            width, level = window_for(preset, slicer.util.arrayFromVolume(original))
        except Exception as error:  # noqa: BLE001
            self.ui.statusLabel.text = str(error)
            return
        for node in (original, result):
            if node is not None and node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetAutoWindowLevel(False)
                node.GetDisplayNode().SetWindowLevel(width, level)

    def onPlaceRoi(self):
        original = self.ui.inputVolumeSelector.currentNode()
        if original is None:
            self.error("select a volume first")
            return
        if self.roi_node is None or slicer.mrmlScene.GetNodeByID(self.roi_node.GetID()) is None:
            self.roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "noise ROI")
        # a 20 mm box at the centre of the current red slice; the user drags it into a uniform region
        slice_node = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        center = [slice_node.GetSliceToRAS().GetElement(i, 3) for i in range(3)]
        self.roi_node.SetCenter(center)
        self.roi_node.SetSize(20.0, 20.0, 6.0)
        self.ui.roiStatsLabel.text = "drag the box into a uniform region, then press ROI statistics"

    def onRoiStatistics(self):
        from ADLDenoiseLib.mrml import roi_statistics_for_roi_node

        try:
            original, result = self.original_and_result()
            if result is None or self.roi_node is None:
                raise DenoiseServerError("denoise the volume and place the ROI first")
            stats = roi_statistics_for_roi_node(original, result, self.roi_node)
        except Exception as error:  # noqa: BLE001
            self.error(str(error))
            return
        self.ui.roiStatsLabel.text = (
            f"original: mean {stats['mean_original']:.1f}, std {stats['std_original']:.1f}; denoised: mean "
            f"{stats['mean_denoised']:.1f}, std {stats['std_denoised']:.1f}; noise reduction "
            f"{stats['noise_reduction_percent']:.0f} % ({stats['voxels']} voxels)")

    # --- correct
    def onBlend(self, value):
        from ADLDenoiseLib.mrml import blended_volume

        try:
            original, result = self.original_and_result()
            if result is None:
                return
            self.corrected_node = blended_volume(slicer.mrmlScene, original, result, float(value),
                                                 node=self.corrected_node)
        except Exception as error:  # noqa: BLE001
            self.error(str(error))
            return
        slicer.app.layoutManager().sliceWidget("Yellow").mrmlSliceCompositeNode().SetBackgroundVolumeID(
            self.corrected_node.GetID())

    def onSubmitCorrection(self):
        from ADLDenoiseLib.mrml import blended_volume, export_volume

        reviewer = self.ui.reviewerEdit.text.strip()
        try:
            original, result = self.original_and_result()
            if result is None:
                raise DenoiseServerError("denoise the volume first")
            if not reviewer:
                raise DenoiseServerError("enter your name as reviewer first")
            corrected = self.corrected_node or blended_volume(slicer.mrmlScene, original, result,
                                                              float(self.ui.blendSlider.value))
            path = export_volume(corrected, self.logic.work_dir / "corrections" / f"{original.GetID()}.nrrd")
            study = self.logic.prepare_study(original)
            regions = self.logic.prepare_regions(self.ui.segmentationSelector.currentNode(), original, self.marks,
                                                 study)
        except Exception as error:  # noqa: BLE001
            self.error(str(error))
            return
        what = "correction saved" + (f" with {len(regions['regions'])} marked region(s)" if regions else "")
        self.run(self.logic.submit_correction, study, path, reviewer, regions,
                 on_done=lambda entry: self.afterVerdict(entry, what), busy_text="submitting ...")

    # --- marked regions
    def onSegmentationChanged(self, node=None):
        if self.segmentation_node is not None:
            self.removeObservers(self.onSegmentsChanged)
        self.segmentation_node = node
        if node is not None:
            segmentation = node.GetSegmentation()
            for event in (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                          slicer.vtkSegmentation.SegmentModified, slicer.vtkSegmentation.SegmentsOrderModified):
                self.addObserver(segmentation, event, self.onSegmentsChanged)
        self.onSegmentsChanged()

    def onSegmentsChanged(self, *_):
        from ADLDenoiseLib.mrml import segments_of

        segments = segments_of(self.segmentation_node)
        if [(r["id"], r["name"]) for r in self.marks.rows()] == segments and \
                self.ui.regionsTable.rowCount == len(segments):
            return  # painting modifies segments all the time: rebuild only when ids, names or order change
        self.marks.sync(segments)
        self.fillRegionsTable()

    def fillRegionsTable(self):
        table = self.ui.regionsTable
        table.setRowCount(0)
        rows = self.marks.rows()
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            item = qt.QTableWidgetItem(row["name"])
            item.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
            table.setItem(index, 0, item)
            combo = qt.QComboBox()
            combo.addItems(list(CHOICES))
            combo.setCurrentIndex(list(CHOICES).index(row["choice"]))
            spin = qt.QDoubleSpinBox()
            spin.minimum, spin.maximum, spin.singleStep, spin.decimals = 0.0, MAX_STRENGTH, 0.1, 2
            spin.value = row["strength"]
            spin.enabled = row["choice"] == "strength"
            spin.toolTip = "0 = original input, 1 = as corrected, 2 = smoother"
            combo.connect("currentIndexChanged(int)",
                          lambda _, sid=row["id"], c=combo, s=spin: self.onRegionChoice(sid, c, s))
            spin.connect("valueChanged(double)", lambda value, sid=row["id"]: self.marks.set_strength(sid, value))
            table.setCellWidget(index, 1, combo)
            table.setCellWidget(index, 2, spin)

    def onRegionChoice(self, segment_id: str, combo, spin):
        self.marks.choose(segment_id, combo.currentText)
        spin.enabled = combo.currentText == "strength"

    # --- review queue
    def onNextStudy(self):
        def fetch(report, cancelled):
            client = self.logic.require_client()
            study = client.next_study()
            if study is None:
                return None
            report(None, f"downloading {study['id']} ...")
            return study, client.download_image(study["id"], self.logic.work_dir / "studies")

        def done(answer):
            if answer is None:
                self.ui.reviewStatusLabel.text = "the review queue is empty"
                return
            study, path = answer
            node = slicer.util.loadVolume(str(path))
            node.SetName(study["id"])
            self.logic.study_ids[node.GetID()] = study["id"]
            self.logic.study_files[node.GetID()] = path
            self.ui.inputVolumeSelector.setCurrentNode(node)
            self.ui.reviewStatusLabel.text = (f"study {study['id']} ({study.get('remaining_unreviewed', '?')} "
                                              "unreviewed)")
            self.corrected_node = None
            self.onDenoise()

        self.run(fetch, on_done=done, busy_text="asking for the next study ...")

    def onVerdict(self, verdict: str):
        reviewer = self.ui.reviewerEdit.text.strip()
        reason = self.ui.rejectReasonEdit.text.strip() or None
        original = self.ui.inputVolumeSelector.currentNode()
        if original is None or not reviewer:
            self.error("load a study and enter your name as reviewer first")
            return
        if verdict == "rejected" and not reason:
            self.error("give a reason for the rejection")
            return
        study = self.logic.prepare_study(original)

        def send(report, cancelled):
            image_id = self.logic.study_id_for(study, report)
            return self.logic.require_client().review(image_id, verdict, reviewer, reason)

        self.run(send, on_done=lambda entry: self.afterVerdict(entry, verdict), busy_text="recording the verdict ...")

    def afterVerdict(self, entry, what):
        self.ui.reviewStatusLabel.text = f"{what} ({entry.get('time_utc', '')}); press Next study to go on"
        self.ui.rejectReasonEdit.text = ""

    # --- fine-tune
    def onTrain(self):
        model = self.model()
        params = {"mode": self.ui.trainModeCombo.currentText, "steps": int(self.ui.trainStepsSpin.value)}

        def done(answer):
            self.ui.trainStatusLabel.text = f"training {model} started"
            self.ui.stopTrainButton.enabled = True
            self.train_timer.start()

        self.run(lambda report, cancelled: self.logic.require_client().start_training(model, params), on_done=done,
                 busy_text=f"starting fine-tuning of {model} ...")

    def onStopTrain(self):
        self.run(lambda report, cancelled: self.logic.require_client().stop_training(),
                 on_done=lambda _: setattr(self.ui.trainStatusLabel, "text", "stop requested"),
                 busy_text="stopping the training ...")

    def onTrainPoll(self):
        if self.train_poll is not None and not self.train_poll.finished:
            return
        if self.train_poll is not None and self.train_poll.state == "done":
            stats = self.train_poll.result or {}
            text = f"{stats.get('status', '?')}: {stats.get('phase', '')}"
            if stats.get("step") is not None:
                text += f", step {stats['step']} of {stats.get('total_steps')}"
            if stats.get("baseline_psnr") is not None:
                text += f"; served {stats['baseline_psnr']:.2f} dB"
            if stats.get("candidate_psnr") is not None:
                text += f", new {stats['candidate_psnr']:.2f} dB"
            decision = stats.get("decision")
            if decision:
                text += "; published " + str(decision["version"]) if decision.get("published") else \
                    "; not published (no better than the served model)"
            self.ui.trainStatusLabel.text = text
            if stats.get("status") in ("done", "failed", "interrupted"):
                self.train_timer.stop()
                self.ui.stopTrainButton.enabled = False
                self.onConnect()  # refresh the served versions
                return
        model = self.model()
        self.train_poll = BackgroundTask(lambda report, cancelled: self.logic.require_client().training_stats(model))


# ------------------------------------------------------------------------------------------------------ test
class ADLDenoiseTest(ScriptedLoadableModuleTest):
    """The whole workflow inside Slicer against a running server: set ADL_DENOISE_SERVER (default
    http://127.0.0.1:8000; start one with ./run.sh). Uses a synthetic CT phantom in HU built here, so no data
    is downloaded."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_workflow()

    def test_workflow(self):
        import numpy as np

        from ADLDenoiseLib.mrml import blended_volume, difference_volume, export_volume, roi_statistics_for_roi_node

        url = os.environ.get("ADL_DENOISE_SERVER", DEFAULT_SERVER_URL)
        logic = ADLDenoiseLogic()
        models = logic.connect(url)
        self.assertTrue(models, "the server offers no denoising model")
        model = next((m["name"] for m in models if m["weights"].get("ct", {}).get("available")), None)
        self.assertIsNotNone(model, "no model with CT weights on the server")

        rng = np.random.default_rng(0)
        zz, yy, xx = np.mgrid[0:8, 0:128, 0:128]
        phantom = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 50 ** 2, 40.0, -1000.0).astype(np.float32)
        noisy = phantom + rng.normal(0, 30, phantom.shape).astype(np.float32)
        original = slicer.util.addVolumeFromArray(noisy, name="phantom CT")
        original.SetSpacing(0.8, 0.8, 2.0)

        path = logic.export_input(original)
        result_path, result = logic.denoise_file(model, path, "ct")
        denoised = logic.load_result(original, result_path, result)
        self.assertEqual(denoised.GetName(), "phantom CT" + RESULT_SUFFIX)
        self.assertEqual(slicer.util.arrayFromVolume(denoised).shape, noisy.shape)

        difference_volume(slicer.mrmlScene, original, denoised)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter([0.0, 0.0, 0.0])
        roi.SetSize(10.0, 10.0, 4.0)
        stats = roi_statistics_for_roi_node(original, denoised, roi)
        self.assertGreater(stats["voxels"], 10)
        corrected = blended_volume(slicer.mrmlScene, original, denoised, 0.7)

        # marked regions: a "keep" lesion and a strength region that overlaps it (the later segment wins)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "marks")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(original)
        lesion, soft = np.zeros(noisy.shape, np.uint8), np.zeros(noisy.shape, np.uint8)
        lesion[3:5, 60:70, 60:70] = 1
        soft[:, 66:90, 40:90] = 1
        for name, mask in (("lesion 1", lesion), ("soft tissue", soft)):
            segment_id = segmentation.GetSegmentation().AddEmptySegment("", name)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, original)
        marks = SegmentMarks()
        from ADLDenoiseLib.mrml import segments_of

        (lesion_id, _), (soft_id, _) = segments_of(segmentation)
        marks.sync(segments_of(segmentation))
        marks.choose(lesion_id, "keep structure")
        marks.choose(soft_id, "strength")
        marks.set_strength(soft_id, 0.5)
        study = logic.prepare_study(original)
        regions = logic.prepare_regions(segmentation, original, marks, study)
        self.assertEqual(int((regions["map"] == 1).sum()), int((lesion & (soft == 0)).sum()))
        self.assertEqual(int((regions["map"] == 2).sum()), int(soft.sum()))
        entry = logic.submit_correction(study, export_volume(corrected, logic.work_dir / "c.nrrd"), "slicer-test",
                                        regions)
        self.assertEqual(entry["verdict"], "corrected")
        info = logic.require_client().label_info(logic.study_ids[original.GetID()], "regions")
        self.assertEqual(info["regions"], [{"value": 1, "name": "lesion 1", "intent": "keep"},
                                           {"value": 2, "name": "soft tissue", "intent": "strength",
                                            "strength": 0.5}])
        self.delayDisplay("ADL Denoise workflow passed")
