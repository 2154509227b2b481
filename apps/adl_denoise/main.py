"""MONAI Label app: ADL and TDDL-GCN denoising of CT and MR volumes.

    python -m monailabel.main start_server --app apps/adl_denoise --studies STUDIES -i 127.0.0.1 -p 8000 \
        --conf models all

Conf keys (``--conf key value``; see README.md in this folder): ``models`` (all | adl | tddl_gcn | a comma
list), ``model_dir`` (weights folder; default ``model/`` here, or ``ADL_MODEL_DIR``), ``device``, ``preload``,
``modality``, ``result_extension``, ``train_steps``, ``normal_dose``, ``max_voxels``.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Dict

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning import NextUnreviewed, record_result
from lib.configs import MODEL_CONFIGS
from lib.inference import MODEL_DIR
from lib.inference.model_store import ModelStore

logger = logging.getLogger(__name__)


class DenoisingApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        names = [m.strip() for m in (conf.get("models") or "all").split(",") if m.strip()]
        unknown = [m for m in names if m != "all" and m not in MODEL_CONFIGS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown} in --conf models; available: all, {', '.join(MODEL_CONFIGS)}")
        if conf.get("max_voxels"):
            os.environ["ADL_MAX_VOXELS"] = str(int(float(conf["max_voxels"])))  # read by lib.imaging
        self.model_dir = os.path.abspath(conf.get("model_dir") or os.environ.get("ADL_MODEL_DIR") or str(MODEL_DIR))
        os.environ["ADL_MODEL_DIR"] = self.model_dir  # the training subprocess looks weights up there too
        self.store = ModelStore(self.model_dir)
        self.models: Dict[str, TaskConfig] = {}
        for name, config_class in MODEL_CONFIGS.items():
            if "all" in names or name in names:
                config = config_class()
                config.init(name, self.model_dir, conf, None, store=self.store)
                self.models[name] = config
        logger.info("models: %s; weights in %s", ", ".join(self.models), self.model_dir)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="ADL / TDDL-GCN denoising",
                         description="Deep-learning denoising of CT and MR volumes (ADL, TDDL-GCN) with "
                                     "fine-tuning from radiologists' corrections",
                         version=monailabel.__version__)
        if "monailabel.app" in sys.modules:  # inside the server (not the training subprocess)
            from monailabel.app import app as fastapi_app

            from lib.endpoints import install

            install(fastapi_app)

    def init_infers(self) -> Dict[str, InferTask]:
        return {name: config.infer() for name, config in self.models.items()}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {name: config.trainer() for name, config in self.models.items()}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"next_unreviewed": NextUnreviewed()}

    def infer(self, request, datastore=None):
        """MONAI Label's infer, plus an audit record (model, weights version) on the datastore image."""
        result = super().infer(request, datastore)
        image_id = request.get("image")
        store = datastore or self.datastore()
        if isinstance(image_id, str) and not os.path.exists(image_id) and image_id in set(store.list_images()):
            try:
                record_result(store, image_id, result.get("params") or {})
            except Exception:  # noqa: BLE001 - the result stands even if the audit note cannot be written
                logger.exception("could not record the result of %s on %s", request.get("model"), image_id)
        return result
