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

__all__ = ["DEFAULT_SERVER_URL", "MAX_RESTORATION_PX", "MODALITY_AUTO", "MODALITY_CHOICES", "RESTORATION_AUTO",
           "RESTORATION_KEY", "RESTORATION_SPIN_AUTO", "RESTORATION_SPIN_STEP",
           "SettingsStore", "applied_restoration", "denoise_params", "describe_modality", "describe_restoration",
           "request_modality", "restoration_choice", "restoration_from_spin", "supports_restoration"]

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


# --------------------------------------------------------------------------------------------------- modality
# A DICOM series says what it is (its Modality); any other volume (NIfTI, NRRD, a review-queue study) does not. The
# server then takes its own ``modality`` conf default (a site that only does MR sets "mr"), else guesses from the
# values (HU-like -> CT). The module sends "auto" for such a volume unless the user chose CT or MR: a guess of its
# own sent as "ct" / "mr" would override the server's default without anyone noticing.

#: "the server decides" (its conf default, else its guess from the values)
MODALITY_AUTO = "auto"
#: the panel's Modality choices, in the order shown (item data of the combo box)
MODALITY_CHOICES = (MODALITY_AUTO, "ct", "mr")


def request_modality(series_modality: str | None, choice: str | None = MODALITY_AUTO) -> str:
    """The ``modality`` of a denoising request: the series' DICOM Modality when it is CT or MR (the panel's choice
    is ignored then: the module shows it and disables the choice), else the user's ``choice`` ("auto", "ct" or
    "mr"; None or empty: "auto"). ValueError for another choice."""
    series = (series_modality or "").strip().upper()
    if series in ("CT", "MR"):
        return series.lower()
    chosen = (choice or MODALITY_AUTO).strip().lower()
    if chosen not in MODALITY_CHOICES:
        raise ValueError(f"modality must be one of {', '.join(MODALITY_CHOICES)}, got {choice!r}")
    return chosen


def describe_modality(result: dict, series_modality: str | None, sent: str, looks_ct: bool | None = None) -> str:
    """A phrase for the status line: the modality the server denoised as (its answer's ``modality``) and why: the
    series' DICOM Modality, the user's choice (``sent`` "ct" / "mr", from :func:`request_modality`), or, for
    ``sent`` "auto", the answer's ``modality_from`` (the server's default or its guess). With "auto" and
    ``looks_ct`` (the module's own look at the values: True HU-like, False not, None unknown) disagreeing with the
    server's choice, it says how to denoise as the other one."""
    modality = str((result or {}).get("modality") or "").strip().upper() or "?"
    if (series_modality or "").strip().upper() in ("CT", "MR"):
        return f"{modality}: the series' DICOM Modality"
    if sent != MODALITY_AUTO:
        return f"{modality}: chosen under Modality"
    source = str((result or {}).get("modality_from") or "")
    why = {"server conf": "the server's default modality for volumes without a DICOM Modality",
           "guessed from the values": "guessed by the server from the values",
           "DICOM Modality": "the DICOM Modality of the study the server holds"}.get(source, "chosen by the server")
    text = f"{modality}: {why}"
    if looks_ct is not None and modality in ("CT", "MR") and (modality == "CT") != bool(looks_ct):
        other = "CT" if looks_ct else "MR"
        text += f"; the values look like {other}: if it is one, choose {other} under Modality and denoise again"
    return text
