"""ADL (Adversarial Distortion Learning, Ghahremani et al.): Efficient-UNet denoiser trained against an
Efficient-UNet discriminator; CT and MR."""
from .base import DenoiserTaskConfig


class ADL(DenoiserTaskConfig):
    method = "ADL (Efficient-UNet denoiser, adversarial distortion learning)"
    modalities = ("CT", "MR")
