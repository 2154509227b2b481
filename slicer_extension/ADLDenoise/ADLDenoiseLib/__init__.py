"""Slicer-free parts of the ADLDenoise module: the server client, the background runner, the workflow state
(study identity, result, correction, verdict, fine-tuning, temporary files: ``review_session``), the workflow maths
(blend, difference, ROI statistics, window presets), the marked regions of a correction, remembered settings,
the volume files sent (written in the background from a copy of the voxels: ``volume_files``), and the MRML
helpers (these need Slicer's MRML, from Slicer itself or PyPI's slicer-core, and nothing of its GUI)."""
from .background import BackgroundTask, LocalTasks
from .client import DenoiseServerClient, DenoiseServerError
from .regions import Region, RegionsError, SegmentMarks
from .review_session import ReviewSession, StudyIdentity, WorkflowError
from .settings import SettingsStore
from .workflow import WINDOW_PRESETS, blend, difference, roi_statistics, window_for

__all__ = ["BackgroundTask", "LocalTasks", "DenoiseServerClient", "DenoiseServerError", "Region", "RegionsError",
           "ReviewSession", "SegmentMarks", "SettingsStore", "StudyIdentity", "WorkflowError", "WINDOW_PRESETS",
           "blend", "difference", "roi_statistics", "window_for"]
