"""Settings remembered between sessions (the server address, the reviewer's name).

Inside Slicer the module stores them in ``qt.QSettings`` (Slicer's own settings file); this JSON store is the
same interface for code and tests that run without Qt.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["SettingsStore", "DEFAULT_SERVER_URL"]

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"


class SettingsStore:
    """Key/value settings in a JSON file, written atomically."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else Path.home() / ".config" / "ADLDenoise" / "settings.json"

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def get(self, key: str, default=None):
        return self._load().get(key, default)

    def set(self, key: str, value) -> None:
        values = self._load()
        values[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename by hand: the module runs inside Slicer, which has no lib.runtime.atomic
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(values, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)
