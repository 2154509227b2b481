"""Non-local means: the classical baseline served next to the learned models, infer only.

It needs no weights, so the workflow (Slicer, review queue, corrections) works on a fresh install before any
learned weights are installed; on the held-out quarter-dose CT it is the strongest classical method and one of the
fastest (``bench/README.md``). Corrections saved while
using it still train the learned models.
"""
from monailabel.interfaces.tasks.infer_v2 import InferTask

from ..infers.denoise import ClassicalInferTask
from .base import DenoiserTaskConfig
from .conf import conf_int


class NLM(DenoiserTaskConfig):
    method = "Non-local means (classical baseline, blind noise estimate; no learned weights)"
    modalities = ("CT", "MR")

    def infer(self) -> InferTask:
        return ClassicalInferTask(self.name, self.method, self.modalities, self.store, algorithm="nlm",
                                  default_modality=str(self.conf.get("modality") or "auto").strip(),
                                  result_extension=self.conf.get("result_extension", ".nii.gz"),
                                  max_concurrent=conf_int(self.conf, "max_concurrent_infers", 2),
                                  max_voxels=self.max_voxels, voxel_limit_setting=self.voxel_limit_setting)

    def trainer(self):
        return None  # nothing to train
