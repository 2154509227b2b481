"""The classical MR denoisers (``lib.denoisers.classical``, served by ``cli.py denoise --model nlm|bm3d|bm4d`` and
the app's classical configs) on a real Rician MR image: one bright vessel does not change how the rest is denoised."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_STUDIES

from lib.denoisers.classical import blind_noise_sigma, denoise_classical, mr_top
from lib.imaging import read_volume


@pytest.fixture(scope="module")
def colin_block() -> np.ndarray:
    """8 x 96 x 96 voxels through the brain of the sample Colin27 head with 5 % Rician noise."""
    study = read_volume(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz", modality="MR").array
    return np.ascontiguousarray(study[86:94, 60:156, 40:136], dtype=np.float32)


@pytest.mark.parametrize("name", ["nlm", "bm3d", "bm4d"])
def test_one_bright_mr_vessel_leaves_the_rest_of_the_image_denoised_as_before(colin_block: np.ndarray,
                                                                            name: str) -> None:
    """A one-voxel vessel at 8 x the image's maximum (one voxel of a slice; for BM4D, one voxel in every slice of the
    volume) set the foreground threshold of the noise estimate (10 % of the maximum): the estimate of its slice fell
    from 12.6 to 0 and NLM and BM3D left the slice as noisy as it came (mean change 9.3-9.6 far from the voxel), BM4D
    (the median of the slices' estimates) the whole volume. Now the top ignores voxels above 4 x the 99.5th
    percentile: the rest is denoised as without the vessel (what remains for BM3D / BM4D is their own non-local
    response to a bright voxel, with the same noise estimate and scale), and the vessel keeps its brightness."""
    image = colin_block if name == "bm4d" else colin_block[4]
    spiked = image.copy()
    spiked[..., 48, 48] = 8.0 * float(image.max())
    assert mr_top(spiked) == float(image.max())
    for z in range(len(spiked) if spiked.ndim == 3 else 1):
        plane, clean_plane = (spiked[z], image[z]) if spiked.ndim == 3 else (spiked, image)
        assert blind_noise_sigma(plane, "MR") == blind_noise_sigma(clean_plane, "MR")
    before = denoise_classical(name, image, "MR")
    after = denoise_classical(name, spiked, "MR")
    far = np.ones(image.shape[-2:], bool)
    far[28:69, 28:69] = False  # more than 20 px from the vessel in-plane, in every slice
    change = float(np.abs(after - before)[..., far].mean())
    assert change < 1.0, f"{name}: the rest of the image moved by {change:.2f} on average"
    assert float(after[..., 48, 48].min()) > 4.0 * float(image.max())
