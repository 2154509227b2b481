"""What every denoiser's TaskConfig shares: the conf keys, the model store, one infer and one train task."""
from __future__ import annotations

from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from ..weights.store import ModelStore
from .conf import conf_bool, conf_int, model_voxel_limit, model_voxel_setting
from ..infers.denoise import DenoiseInferTask
from ..trainers.finetune import DenoiserTrainTask


class DenoiserTaskConfig(TaskConfig):
    """A learned denoiser served by the app. Subclasses set ``method`` and ``modalities``.

    Conf keys read here (``--conf key value``): ``device`` (auto | cpu | cuda), ``preload`` (true | false),
    ``modality`` (auto | ct | mr: for inputs without a DICOM modality), ``result_extension`` (.nii.gz | .nrrd |
    .nii | .mha | dicom), ``train_steps`` (default fine-tuning steps), ``normal_dose`` (normal-dose images for
    TDDL adaptation), ``max_concurrent_infers`` (requests a model denoises at once; 2), ``max_voxels`` (largest
    image a request may send; default :func:`lib.imaging.max_voxels`), ``max_voxels_<model>`` (this model's own
    limit, over ``max_voxels``). :func:`lib.configs.conf.check_conf` has
    checked them all when the app was built.
    """

    method: str = ""
    modalities: tuple[str, ...] = ()

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.store: ModelStore = kwargs.get("store") or ModelStore(model_dir)
        self.path = [str(self.store.pretrained_path(name, m)) for m in self.modalities] + \
                    [str(self.store.published_path(name, m)) for m in self.modalities]

    @property
    def max_voxels(self) -> int | None:
        """This model's voxel limit (``1e9`` and ``1000000000`` alike): ``max_voxels_<model>``, else ``max_voxels``;
        None when neither is set."""
        return model_voxel_limit(self.conf, self.name)

    @property
    def voxel_limit_setting(self) -> str:
        """The conf key of :attr:`max_voxels` (``max_voxels_<model>`` or ``max_voxels``), for the messages."""
        return model_voxel_setting(self.conf, self.name)

    def infer(self) -> InferTask:
        return DenoiseInferTask(
            self.name, self.method, self.modalities, self.store, device=self.conf.get("device", "auto"),
            default_modality=str(self.conf.get("modality") or "auto").strip(),
            result_extension=self.conf.get("result_extension", ".nii.gz"),
            preload=conf_bool(self.conf, "preload", False),
            max_concurrent=conf_int(self.conf, "max_concurrent_infers", 2), max_voxels=self.max_voxels,
            voxel_limit_setting=self.voxel_limit_setting)

    def trainer(self) -> TrainTask | None:
        defaults = {"steps": conf_int(self.conf, "train_steps", 200), "device": self.conf.get("device", "auto")}
        if self.conf.get("normal_dose"):
            defaults["normal_dose"] = self.conf["normal_dose"]
        # the infer task's limit: a correction of a study the server denoises is read for training alike
        return DenoiserTrainTask(self.name, self.store, self.modalities, defaults, max_voxels=self.max_voxels,
                                 voxel_limit_setting=self.voxel_limit_setting)
