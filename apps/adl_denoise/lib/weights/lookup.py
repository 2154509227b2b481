"""Where the app's weights live and which file serves a model and modality.

``model/pretrained_<model>_<modality>.pt`` is shipped with the repository; ``model/<model>_<modality>.pt`` is what a
fine-tuning run publishes, and wins when present.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MODEL_DIR", "candidate_weights", "find_weights"]

# Shipped and published weights of the app: model/pretrained_<model>_<modality>.pt is committed with the repo;
# model/<model>_<modality>.pt is what a fine-tuning run publishes, and wins when present. The environment
# variable ADL_MODEL_DIR points elsewhere (e.g. a deployment's writable weights folder).
MODEL_DIR = Path(__file__).resolve().parents[2] / "model"


def candidate_weights(model_name: str, modality: str, model_dir: Path | None = None) -> list[Path]:
    """Weight files for ``model_name`` ("adl", ...) and ``modality`` ("CT"/"MR"), best first: published, pretrained."""
    folder = Path(model_dir) if model_dir is not None else Path(os.environ.get("ADL_MODEL_DIR", MODEL_DIR))
    stem = f"{model_name.lower()}_{modality.lower()}"
    return [folder / f"{stem}.pt", folder / f"pretrained_{stem}.pt"]


def find_weights(model_name: str, modality: str, model_dir: Path | None = None) -> Path | None:
    """The first existing file of :func:`candidate_weights`, or None."""
    return next((path for path in candidate_weights(model_name, modality, model_dir) if path.is_file()), None)
