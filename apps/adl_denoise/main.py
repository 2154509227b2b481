"""MONAI Label app: ADL and TDDL-GCN denoising of CT and MR volumes.

    python -m monailabel.main start_server --app apps/adl_denoise --studies STUDIES -i 127.0.0.1 -p 8000 \
        --conf models all

Conf keys (``--conf key value``; see README.md in this folder): ``models`` (all | adl | tddl_gcn | nlm | a
comma list), ``model_dir`` (weights folder; default ``model/`` here, or ``ADL_MODEL_DIR``), ``device``, ``preload``,
``modality``, ``result_extension``, ``train_steps``, ``normal_dose``, ``max_voxels``.

Settings reach the tasks through the conf (:class:`lib.configs.base.DenoiserTaskConfig` reads it and hands each
task its values), not through environment variables set here. MONAI Label runs training in a subprocess that
builds this app again from the same conf (the server exports it as ``MONAI_LABEL_APP_CONF``), so both processes
resolve the same ``model_dir``.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Dict

import monailabel
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

from lib.activelearning import NextUnreviewed, has_image, record_result
from lib.configs import MODEL_CONFIGS
from lib.weights import MODEL_DIR
from lib.weights.store import ModelStore
from lib.pacs import PacsStoreError, is_dicomweb, series_folder, store_derived_series

logger = logging.getLogger(__name__)


class DenoisingApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        names = [m.strip() for m in (conf.get("models") or "all").split(",") if m.strip()]
        unknown = [m for m in names if m != "all" and m not in MODEL_CONFIGS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown} in --conf models; available: all, {', '.join(MODEL_CONFIGS)}")
        self.model_dir = os.path.abspath(conf.get("model_dir") or os.environ.get("ADL_MODEL_DIR") or str(MODEL_DIR))
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
        trainers = {name: config.trainer() for name, config in self.models.items()}
        return {name: task for name, task in trainers.items() if task is not None}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"next_unreviewed": NextUnreviewed()}

    def infer(self, request, datastore=None):
        """MONAI Label's infer, plus: a DICOMweb study is denoised from its DICOM files (not the datastore's NIfTI
        conversion); ``store_to_pacs`` sends the result back to the PACS as a derived series; every result on a
        datastore image leaves an audit note (model, weights version)."""
        store = datastore or self.datastore()
        image_id = request.get("image")
        known_id = isinstance(image_id, str) and not os.path.exists(image_id) and has_image(store, image_id)
        to_pacs = strtobool(str(request.get("store_to_pacs", "false")))
        source_folder = None
        if known_id and is_dicomweb(store):
            source_folder = series_folder(store, image_id)
            request = dict(request, image=str(source_folder))
        if to_pacs and source_folder is None:
            raise HTTPException(status_code=422, detail="store_to_pacs needs a study of a DICOMweb datastore "
                                                        "(start the server with --studies http://.../dicom-web)")
        if to_pacs and str(request.get("result_extension", "")) in ("dicom", ".dcm"):
            raise HTTPException(status_code=422, detail="store_to_pacs already writes DICOM: leave result_extension "
                                                        "at an image format")
        result = super().infer(request, datastore)
        params = result.get("params") or {}
        if to_pacs:
            try:
                params["stored_series"] = store_derived_series(store, source_folder, result["file"],
                                                               f"denoised {params.get('model')} "
                                                               f"{params.get('weights_version')}")
            except PacsStoreError as error:
                raise HTTPException(status_code=502, detail=f"denoised, but not stored in the PACS: {error}") from None
        if known_id:
            try:
                record_result(store, image_id, params)
            except Exception:  # noqa: BLE001 - the result stands even if the audit note cannot be written
                logger.exception("could not record the result of %s on %s", request.get("model"), image_id)
        return result
