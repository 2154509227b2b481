"""ADL's true 3D variant: the volumetric Efficient-UNet (3D convolutions, 96^3 sliding windows), trained against a
3D discriminator; for volumes whose slices are thin enough to share structure (1 mm MR)."""
from .base import DenoiserTaskConfig


class ADL3D(DenoiserTaskConfig):
    method = "ADL 3D (volumetric Efficient-UNet denoiser, adversarial distortion learning)"
    modalities = ("CT", "MR")
