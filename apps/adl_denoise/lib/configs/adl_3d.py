"""ADL's true 3D variant, served as ``adl_3d``: the volumetric Efficient-UNet (3D convolutions, 96^3 sliding windows)
trained against a 3D discriminator, for volumes whose slices are thin enough to share structure (about 1 mm MR).

Shipped weights: MR only (``model/pretrained_adl_3d_mr.pt``, a short CPU run below the 2.5D model on the held-out
brain, see ``model/README.md``), so the app's default model for MR stays ``adl``; a modality without weights
answers 404. Inference only: the app offers no fine-tuning of the 3D network from corrections (a CPU training step
of it takes seconds per 2 x 40^3 batch, and the 2.5D model it would compete with is the better one).
"""
from monailabel.interfaces.tasks.train import TrainTask

from .base import DenoiserTaskConfig


class ADL3D(DenoiserTaskConfig):
    method = "ADL 3D (volumetric Efficient-UNet denoiser, adversarial distortion learning)"
    modalities = ("CT", "MR")

    def trainer(self) -> TrainTask | None:
        return None  # inference only (see the module docstring)
