"""Settings remembered between sessions (the server address, the reviewer's name), and the options of one
denoising request (lesion contrast restoration: the panel's choice to the request's ``params``).

Inside Slicer the module keeps the remembered ones in ``qt.QSettings`` (Slicer's own settings file); this JSON
store is the same interface for code and tests that run without Qt.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["DEFAULT_SERVER_URL", "MAX_RESTORATION_PX", "RESTORATION_AUTO", "RESTORATION_KEY", "RESTORATION_SPIN_AUTO",
           "RESTORATION_SPIN_STEP",
           "SettingsStore", "applied_restoration", "denoise_params", "describe_restoration", "restoration_choice",
           "restoration_from_spin", "supports_restoration"]

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


# --------------------------------------------------------------------------------------------------- per request
# The options of one denoising request, from the panel's widgets to the ``params`` of ``POST /infer/<model>``.

#: the request key (and the key of a learned model's /info ``config`` that says it is understood)
RESTORATION_KEY = "low_frequency_restoration"
#: "the served weight file's default" (its own width, else the server's ``DEFAULT_SIGMA_PX``: CT on, MR off)
RESTORATION_AUTO = "auto"
#: widest width the server accepts, pixels (the server's ``MAX_SIGMA_PX``)
MAX_RESTORATION_PX = 16.0
#: the spin box's step, pixels: fine enough to reach the CT default (0.8 px) and its neighbours with the arrows
RESTORATION_SPIN_STEP = 0.1
#: the spin box's minimum, shown as "auto" (Qt ``specialValueText``); one step below 0 = off, so that both "auto"
#: and "off" can be chosen with the arrows
RESTORATION_SPIN_AUTO = -RESTORATION_SPIN_STEP


def supports_restoration(model: dict | None) -> bool:
    """Whether ``model`` (an entry of ``DenoiseServerClient.denoising_models()``, with its /info ``config``)
    takes ``low_frequency_restoration``: the learned models list it, the classical ones (bm3d, nlm) do not."""
    return bool(model) and RESTORATION_KEY in (model.get("config") or {})


def restoration_choice(value: str | float | int | None) -> str | float:
    """``value`` checked as the server checks it: ``"auto"`` (also None or empty), or a width in pixels, a finite
    number in [0, :data:`MAX_RESTORATION_PX`] (0 = the network's output alone). ValueError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", RESTORATION_AUTO)):
        return RESTORATION_AUTO
    if isinstance(value, bool):  # True is an int to Python, not a width
        raise ValueError(f"lesion contrast restoration must be 'auto' or a number of pixels, got {value!r}")
    try:
        width = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"lesion contrast restoration must be 'auto' or a number of pixels, got {value!r}") from None
    if not math.isfinite(width) or not 0.0 <= width <= MAX_RESTORATION_PX:
        raise ValueError(f"lesion contrast restoration must be 'auto' or 0 to {MAX_RESTORATION_PX:g} pixels "
                         f"(0 = off), got {value!r}")
    return width


def restoration_from_spin(value: float, minimum: float = RESTORATION_SPIN_AUTO) -> str | float:
    """The spin box's value to :func:`restoration_choice`: its minimum (shown as "auto") is ``"auto"``, anything
    else is a width in pixels (a typed value between the minimum and 0 is refused, not guessed)."""
    value = float(value)
    if value <= float(minimum) + 1e-9:
        return RESTORATION_AUTO
    return restoration_choice(value)


def denoise_params(model: dict | None, modality: str, restoration: str | float | None = RESTORATION_AUTO,
                   result_extension: str = ".nrrd") -> dict:
    """The ``params`` of a denoising request: ``modality`` ("ct" / "mr"), the result's file type and, for a model
    whose /info ``config`` lists it only, ``low_frequency_restoration`` (:func:`restoration_choice`). A classical
    model is never sent it (the server answers 422 to a width > 0 for those). ``restoration`` is validated even
    for a model that does not take it, so a bad value is never silently dropped."""
    choice = restoration_choice(restoration)
    params: dict = {"modality": modality, "result_extension": result_extension}
    if supports_restoration(model):
        params[RESTORATION_KEY] = choice
    return params


def applied_restoration(result: dict) -> float | None:
    """The width (pixels) the server applied, from its answer to a denoising request; None when the answer has
    none (a classical model, or a server without the option)."""
    width = (result or {}).get(RESTORATION_KEY)
    if width is None or isinstance(width, bool):
        return None
    try:
        width = float(width)
    except (TypeError, ValueError):
        return None
    return width if math.isfinite(width) else None


def describe_restoration(result: dict) -> str:
    """A phrase for the status line: what the server applied (empty when it applied nothing of the kind)."""
    width = applied_restoration(result)
    if width is None:
        return ""
    if width == 0:
        return "lesion contrast restoration off (network output only)"
    return f"lesion contrast restoration {width:g} px"
