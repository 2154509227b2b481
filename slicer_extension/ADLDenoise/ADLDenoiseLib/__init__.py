"""Slicer-free parts of the ADLDenoise module: the server client, the background runner, the workflow maths
(blend, difference, ROI statistics, window presets), the marked regions of a correction, remembered settings,
and the MRML helpers (these need Slicer's MRML, from Slicer itself or PyPI's slicer-core, and nothing of its
GUI)."""
from .background import BackgroundTask
from .client import DenoiseServerClient, DenoiseServerError
from .regions import Region, RegionsError, SegmentMarks
from .settings import SettingsStore
from .workflow import WINDOW_PRESETS, blend, difference, roi_statistics, window_for

__all__ = ["BackgroundTask", "DenoiseServerClient", "DenoiseServerError", "Region", "RegionsError", "SegmentMarks",
           "SettingsStore", "WINDOW_PRESETS", "blend", "difference", "roi_statistics", "window_for"]
