"""The 2D networks skip the air around a CT patient (``denoise_array(skip_air=True)``, the default): the network
sees only the body's box, its output inside the body is the whole-slice pass's, and the air outside the box is
returned as acquired. Real slices of the Siemens abdomen series in ``../shared/data`` with the shipped CT weights."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest
from scipy import ndimage

from conftest import APP_DIR
from lib.predict import AIR_MARGIN_PX, AIR_THRESHOLD_HU, body_crop, denoise_array, denoise_as_served, load_denoiser

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def abdomen_slices(shared_data) -> np.ndarray:
    """A real 512 x 512 abdomen slice (HU, JPEG 2000 DICOM; (1, H, W)) with air above the patient, the arms at the
    sides and the table below."""
    from lib.imaging import read_volume

    return read_volume(shared_data / "dicom" / "ct_abdomen_siemens_j2k_slab").array[9:10].astype(np.float32)


@pytest.fixture(scope="module")
def whole_slice_outputs(abdomen_slices) -> dict:
    """Per shipped CT file: the file and its network's output with every pixel seen (``skip_air=False``)."""
    outputs = {}
    for model in ("adl", "tddl_gcn"):
        loaded = load_denoiser(APP_DIR / "model" / f"pretrained_{model}_ct.pt")
        outputs[model] = loaded, denoise_array(loaded, abdomen_slices, "CT", skip_air=False)
    return outputs


def _body(image: np.ndarray) -> np.ndarray:
    """Non-air pixels (5 x 5 mean above the threshold) and the 2 pixels around them."""
    inside = ndimage.uniform_filter(image, size=(1, 5, 5)) > AIR_THRESHOLD_HU
    return ndimage.binary_dilation(inside, np.ones((1, 5, 5), bool))


@contextmanager
def network_inputs(model) -> Iterator[list[tuple[int, ...]]]:
    """The spatial shapes of the network's inputs, appended as it runs inside the block."""
    shapes: list[tuple[int, ...]] = []
    network = getattr(model, "network", model)
    handle = network.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[2:])))
    try:
        yield shapes
    finally:
        handle.remove()


@pytest.mark.parametrize("model, tolerance_hu", [("adl", 0.5), ("tddl_gcn", 2.0)])
def test_the_air_skipped_changes_nothing_inside_the_body(abdomen_slices, whole_slice_outputs, model, tolerance_hu):
    loaded, whole = whole_slice_outputs[model]
    multiple = int(getattr(loaded.network, "size_multiple", 8))  # 8 for ADL, 1 for the GCN
    box = body_crop(abdomen_slices, multiple=multiple)
    assert box is not None
    kept = (box[0].stop - box[0].start) * (box[1].stop - box[1].start) / abdomen_slices[0].size
    assert kept < 0.85, f"the abdomen slice should leave air to skip, the box keeps {kept:.0%}"

    with network_inputs(loaded) as shapes:
        skipped = denoise_array(loaded, abdomen_slices, "CT")
    assert shapes == [(box[0].stop - box[0].start, box[1].stop - box[1].start)]  # the box, no padding

    body = _body(abdomen_slices)
    difference = np.abs(skipped - whole)[body]
    # float rounding only: bfloat16 sums in ADL; in the GCN's neighbour search, which centres the features on the
    # image's mean, rounding can swap near-tied neighbours
    assert difference.max() <= tolerance_hu and difference.mean() < 0.01, (difference.max(), difference.mean())
    outside = np.ones(abdomen_slices.shape, bool)
    outside[(Ellipsis, *box)] = False
    np.testing.assert_array_equal(skipped[outside], abdomen_slices[outside])  # the air as acquired
    assert not np.allclose(skipped[body], abdomen_slices[body], atol=1.0)  # and the body was denoised


@pytest.mark.slow
def test_a_body_that_reaches_the_image_edge_sees_that_edge_as_in_a_whole_slice_pass():
    """The embedded quarter-dose head reaches the bottom and right edges of its 512 x 512 slice; put in the bottom right
    corner of a 640 x 640 field of air (-1024 HU, as stored air), its box is grown inside the image to the network's
    multiple of 8, so the network sees no padding at those edges (a reflect padding of the box there moved ADL's
    output inside the head by up to 34 HU)."""
    import SimpleITK as sitk

    from conftest import SAMPLE_STUDIES

    head = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz")))
    image = np.full((1, 640, 640), -1024.0, np.float32)
    image[:, 128:, 128:] = head
    rows, columns = body_crop(image, multiple=8)
    assert rows.stop == image.shape[1] and columns.stop == image.shape[2]  # at the edges
    assert (rows.stop - rows.start) % 8 == 0 and (columns.stop - columns.start) % 8 == 0
    loaded = load_denoiser(APP_DIR / "model" / "pretrained_adl_ct.pt")
    with network_inputs(loaded) as shapes:
        skipped = denoise_array(loaded, image, "CT")
    assert shapes == [(rows.stop - rows.start, columns.stop - columns.start)]
    whole = denoise_array(loaded, image, "CT", skip_air=False)
    difference = np.abs(skipped - whole)[_body(image)]
    # a few pixels on the head's outline depend on context beyond any margin (up to ~11 HU at ~160 of 92 000 here,
    # a wider margin does not shrink it: bench/README); a reflect-padded box moved ~18 000 by more than 1 HU
    assert (difference > 1.0).mean() < 0.01 and difference.mean() < 0.05, ((difference > 1.0).sum(),
                                                                          difference.mean())


def test_a_narrower_margin_would_change_the_body(abdomen_slices, whole_slice_outputs):
    """Why :data:`AIR_MARGIN_PX` is what it is: with a third of it the crop's edges reach into ADL's output inside
    the body (so the test above is able to fail)."""
    loaded, whole = whole_slice_outputs["adl"]
    box = body_crop(abdomen_slices, margin=AIR_MARGIN_PX // 3)
    narrow = abdomen_slices.copy()
    narrow[(Ellipsis, *box)] = denoise_array(loaded, abdomen_slices[(Ellipsis, *box)], "CT", skip_air=False)
    assert np.abs(narrow - whole)[_body(abdomen_slices)].max() > 1.0


def test_served_output_skips_the_air_too(abdomen_slices, whole_slice_outputs):
    """What the app, ``cli.py denoise`` and the batch runner return goes through the same crop."""
    loaded, _ = whole_slice_outputs["adl"]
    with network_inputs(loaded) as shapes:
        served = denoise_as_served(loaded, abdomen_slices, "CT")
    rows, columns = body_crop(abdomen_slices, multiple=8)
    assert shapes == [(rows.stop - rows.start, columns.stop - columns.start)]
    # the air outside the box as acquired, but for what the restoration's low-pass carries over the box's edge
    outside = np.ones(abdomen_slices.shape, bool)
    outside[:, rows, columns] = False
    assert np.abs(served - abdomen_slices)[outside].max() < 5.0


def test_body_crop_finds_the_body_and_ignores_specks_in_the_air():
    rng = np.random.default_rng(0)
    image = rng.normal(-1000.0, 30.0, (2, 256, 300)).astype(np.float32)
    yy, xx = np.mgrid[:256, :300]
    image[1][(yy - 120) ** 2 + (xx - 150) ** 2 < 40**2] = 40.0  # a "body" of radius 40 in the second slice only
    image[0, 10, 10] = image[0, 250, 290] = 1500.0  # single hot pixels (noise, streaks) in the air
    rows, columns = body_crop(image, margin=10)
    # the disc spans rows 81..159 and columns 111..189; 10 pixels of margin
    assert (rows.start, rows.stop) == (120 - 39 - 10, 120 + 39 + 1 + 10)
    assert (columns.start, columns.stop) == (150 - 39 - 10, 150 + 39 + 1 + 10)
    assert body_crop(image[1], margin=10) == (rows, columns)  # one slice like a volume of one
    # grown to multiples of 8 towards the start (rows 71..170 -> 99 rows -> 104), inside the image
    assert body_crop(image, margin=10, multiple=8) == (slice(170 - 104, 170), slice(200 - 104, 200))
    image[1, 200:, 100:200] = 40.0  # the body reaches the bottom edge: the box keeps that edge
    rows, _ = body_crop(image, margin=10, multiple=8)
    assert rows.stop == 256 and (rows.stop - rows.start) % 8 == 0 and rows.start <= 71


def test_body_crop_declines_where_there_is_nothing_to_skip():
    rng = np.random.default_rng(1)
    air = rng.normal(-1000.0, 30.0, (128, 128)).astype(np.float32)
    assert body_crop(air) is None  # no body (all air)
    assert body_crop(air + 1024.0) is None  # not in HU: air at 0 counts as body everywhere
    filled = air.copy()
    filled[4:124, 4:124] = 0.0
    assert body_crop(filled, margin=8) is None  # nearly the whole slice


def test_mr_and_opt_out_see_every_pixel():
    """MR has no fixed air intensity: the network sees the whole slice; ``skip_air=False`` does the same for CT.
    A small body in a wide field of air: the network sees its box (grown to the network's multiple of 8)."""
    from lib.networks import EfficientUNetDenoiser

    network = EfficientUNetDenoiser(spatial_dims=2, filters=(4, 8, 8, 8), enhancer_filters=4)
    image = np.full((256, 256), -1000.0, np.float32)
    image[100:116, 100:116] = 40.0
    with network_inputs(network) as seen:
        denoise_array(network, image, "CT", skip_air=False, amp=False)
        denoise_array(network, image / 10 + 100.0, "MR", amp=False)
        denoise_array(network, image, "CT", amp=False)
    side = 16 + 2 * AIR_MARGIN_PX  # the body and the margin on both sides
    assert seen == [(256, 256), (256, 256), (_padded(side),) * 2]


def _padded(size: int, multiple: int = 8) -> int:
    return -(-size // multiple) * multiple
