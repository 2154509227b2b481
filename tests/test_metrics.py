"""Windowed PSNR / SSIM / RMSE and uniform-region statistics (lib.evaluation.metrics)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lib.evaluation import (
    CT_WINDOWS,
    evaluate_windows,
    find_uniform_regions,
    mr_window,
    psnr,
    psnr_from_squared_error,
    rmse,
    squared_error_sum,
    ssim,
    uniform_region_statistics,
    window_for,
)

SOFT = CT_WINDOWS["soft_tissue"]


def _phantom(shape=(64, 64), seed=0) -> np.ndarray:
    """A smooth CT-like slice in HU: a 40 HU disc on -1000 air with a 300 HU insert and a gradient."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    img = np.full(shape, -1000.0)
    body = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * h) ** 2
    img[body] = 40.0 + 0.5 * (xx[body] - w / 2)
    img[(yy - h / 2) ** 2 + (xx - w * 0.65) ** 2 < (0.08 * h) ** 2] = 300.0
    return img.astype(np.float32)


def test_windows_constants():
    assert CT_WINDOWS["soft_tissue"] == (-160.0, 240.0)
    assert CT_WINDOWS["wide"] == (-1000.0, 1000.0)
    ref = np.zeros((16, 16), np.float32)
    ref[3, 4] = 812.5
    assert mr_window(ref) == (0.0, 812.5)
    assert window_for("ct") == SOFT
    assert window_for("MR", ref) == (0.0, 812.5)
    with pytest.raises(ValueError):
        window_for("US")


def test_psnr_identical_is_inf():
    ref = _phantom()
    assert psnr(ref, ref, SOFT) == math.inf
    assert rmse(ref, ref, SOFT) == 0.0
    # values that differ only outside the window are identical after clipping
    pred = ref.copy()
    pred[ref < -500] = -700.0
    assert psnr(pred, ref, SOFT) == math.inf


def test_psnr_known_offset_hand_computed():
    ref = np.full((32, 32), 40.0, np.float32)
    pred = ref + 10.0  # inside [-160, 240]: MSE = 100, W = 400
    expected = 10 * math.log10(400.0**2 / 100.0)
    assert psnr(pred, ref, SOFT) == pytest.approx(expected, abs=1e-9)
    assert rmse(pred, ref, SOFT) == pytest.approx(10.0)
    # the wide window has a 2000 HU range
    assert psnr(pred, ref, CT_WINDOWS["wide"]) == pytest.approx(10 * math.log10(2000.0**2 / 100.0))
    # volumes pool the MSE over all voxels: one slice off by 20, the other exact -> MSE 200
    vol_ref = np.stack([ref, ref])
    vol_pred = np.stack([ref + 20.0, ref])
    assert psnr(vol_pred, vol_ref, SOFT) == pytest.approx(10 * math.log10(400.0**2 / 200.0))


def test_clipping_to_window_matters():
    ref = np.full((32, 32), 40.0, np.float32)
    ref[:, :16] = 1000.0  # bone, above the soft-tissue window
    pred = ref.copy()
    pred[:, :16] += 500.0  # error only in the out-of-window half
    assert psnr(pred, ref, SOFT) == math.inf
    assert rmse(pred, ref, SOFT) == 0.0
    # ... but it counts in the wide window only up to the window edge (1000 vs 1000 -> 0)
    assert psnr(pred, ref, CT_WINDOWS["wide"]) == math.inf
    # an error crossing the edge counts only up to the edge: 200 -> 300 is clipped to 200 -> 240
    ref2 = np.full((32, 32), 200.0, np.float32)
    assert rmse(ref2 + 100.0, ref2, SOFT) == pytest.approx(40.0)


def _checkerboard(shape=(32, 32)) -> np.ndarray:
    """+1 / -1 in a checkerboard: an error pattern whose mean square is exactly its amplitude squared."""
    return np.where(np.indices(shape).sum(0) % 2 == 0, 1.0, -1.0)


def test_psnr_of_a_known_error_pattern_hand_computed():
    sign = _checkerboard()
    ref = np.full(sign.shape, 40.0, np.float32)
    pred = ref + 25.0 * sign  # MSE 625 in any window holding 15..65 HU
    assert rmse(pred, ref, SOFT) == pytest.approx(25.0)
    assert psnr(pred, ref, SOFT) == pytest.approx(10 * math.log10(400.0**2 / 625.0))  # 24.08 dB
    assert psnr(pred, ref, CT_WINDOWS["wide"]) == pytest.approx(10 * math.log10(2000.0**2 / 625.0))
    # near the window top the prediction is clipped: at 230 HU, +25 -> 255 counts as 240 (error 10), -25 stays
    top = np.full(sign.shape, 230.0, np.float32)
    assert psnr(top + 25.0 * sign, top, SOFT) == pytest.approx(10 * math.log10(400.0**2 / ((10.0**2 + 25.0**2) / 2)))
    # ... and so is the reference: 300 HU against 280 HU is 240 against 240 in the soft-tissue window
    assert psnr(np.full_like(ref, 280.0), np.full_like(ref, 300.0), SOFT) == math.inf
    assert rmse(np.full_like(ref, 280.0), np.full_like(ref, 300.0), CT_WINDOWS["wide"]) == pytest.approx(20.0)
    # MR: the window is [0, max(reference)], so its width is the reference maximum
    mr_ref = np.full(sign.shape, 400.0)
    mr_ref[0, 0] = 1000.0
    mr_pred = mr_ref + 10.0 * sign  # the +10 on the 1000 pixel is clipped away
    mse = (10.0**2 * (sign.size - 1)) / sign.size
    assert psnr(mr_pred, mr_ref, mr_window(mr_ref)) == pytest.approx(10 * math.log10(1000.0**2 / mse))


def test_psnr_and_rmse_agree_on_random_errors():
    """PSNR = 20 log10(W / RMSE) with the window width W, whatever the error."""
    rng = np.random.default_rng(3)
    ref = _phantom((48, 48))
    pred = ref + rng.normal(0, 25, ref.shape).astype(np.float32)
    for lo, hi in (SOFT, CT_WINDOWS["wide"]):
        e = rmse(pred, ref, (lo, hi))
        assert 0 < e < 25.0 * 1.2
        assert psnr(pred, ref, (lo, hi)) == pytest.approx(20 * math.log10((hi - lo) / e))


def test_psnr_from_the_squared_errors_of_shares_of_the_slices():
    """The squared-error sums of shares of a volume's slices (each rank's share of a validation volume) add up to
    :func:`psnr` of the whole volume: the MSE is pooled over all voxels, not averaged per slice."""
    rng = np.random.default_rng(5)
    ref = np.stack([_phantom(seed=z) for z in range(5)])
    pred = ref + rng.normal(0, 25, ref.shape).astype(np.float32) * np.arange(1, 6, dtype=np.float32)[:, None, None]
    total = sum(squared_error_sum(pred[share], ref[share], SOFT) for share in ([0, 3], [1, 2, 4]))
    assert psnr_from_squared_error(total, ref.size, SOFT) == pytest.approx(psnr(pred, ref, SOFT), abs=1e-5)
    per_slice = np.mean([psnr(pred[z], ref[z], SOFT) for z in range(5)])
    assert abs(psnr_from_squared_error(total, ref.size, SOFT) - per_slice) > 0.1  # pooled, not a mean of slices
    assert psnr_from_squared_error(squared_error_sum(ref, ref, SOFT), ref.size, SOFT) == math.inf
    with pytest.raises(ValueError, match="count"):
        psnr_from_squared_error(1.0, 0, SOFT)


def test_ssim_identical_is_one_and_drops_with_noise():
    ref = _phantom()
    assert ssim(ref, ref, SOFT) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    s_low = ssim(ref + rng.normal(0, 10, ref.shape), ref, SOFT)
    s_high = ssim(ref + rng.normal(0, 60, ref.shape), ref, SOFT)
    assert 1.0 > s_low > s_high > 0.0
    # volumes: mean of per-slice SSIM
    vol = np.stack([ref, ref + rng.normal(0, 60, ref.shape)])
    per = [ssim(vol[0], ref, SOFT), ssim(vol[1], ref, SOFT)]
    assert ssim(vol, np.stack([ref, ref]), SOFT) == pytest.approx(np.mean(per))


def test_ssim_of_constant_images_hand_computed():
    """Flat images have no variance, so SSIM is the luminance term alone, (2ab + C1) / (a^2 + b^2 + C1) with
    C1 = (0.01 W)^2 and W the window width: this pins the data range, K1 and the clipping to the window."""
    def expected(a: float, b: float, width: float) -> float:
        c1 = (0.01 * width) ** 2
        return (2 * a * b + c1) / (a * a + b * b + c1)

    def flat(value: float) -> np.ndarray:
        return np.full((2, 24, 24), value)

    assert ssim(flat(40.0), flat(50.0), SOFT) == pytest.approx(expected(40.0, 50.0, 400.0), abs=1e-9)
    assert ssim(flat(40.0), flat(50.0), CT_WINDOWS["wide"]) == pytest.approx(expected(40.0, 50.0, 2000.0), abs=1e-9)
    # 1000 HU is clipped to the soft-tissue window's top, 240
    assert ssim(flat(40.0), flat(1000.0), SOFT) == pytest.approx(expected(40.0, 240.0, 400.0), abs=1e-9)
    assert ssim(flat(300.0), flat(1000.0), SOFT) == pytest.approx(1.0)


def test_ssim_is_symmetric_and_negative_for_inverted_structure():
    ref = _phantom()
    rng = np.random.default_rng(2)
    pred = ref + rng.normal(0, 30, ref.shape)
    assert ssim(pred, ref, SOFT) == pytest.approx(ssim(ref, pred, SOFT), abs=1e-12)
    # the same texture upside down around its mean: the structure term is -1, so SSIM < 0
    yy, xx = np.mgrid[:48, :48]
    texture = 60.0 * np.sin(xx / 1.5) * np.cos(yy / 2.0)
    assert ssim(40.0 - texture, 40.0 + texture, SOFT) < -0.5
    assert ssim(40.0 + 0.5 * texture, 40.0 + texture, SOFT) > 0.5


def test_validation_errors():
    ref = _phantom()
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(ref[:-1], ref, SOFT)
    bad = ref.copy()
    bad[3, 3] = np.nan
    for fn in (psnr, ssim, rmse):
        with pytest.raises(ValueError, match="NaN"):
            fn(bad, ref, SOFT)
        with pytest.raises(ValueError, match="NaN"):
            fn(ref, bad, SOFT)
    with pytest.raises(ValueError, match="window"):
        psnr(ref, ref, (10, -10))
    with pytest.raises(ValueError, match="shape mismatch"):
        uniform_region_statistics(ref, ref[None], [])
    with pytest.raises(ValueError, match="NaN"):
        find_uniform_regions(bad)


def test_uniform_regions_found_in_flat_area_and_stats():
    rng = np.random.default_rng(7)
    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    # left half: structured soft tissue (stripes); right half: flat 50 HU; top rows: air
    ref = np.where((xx // 3) % 2 == 0, 0.0, 150.0)
    ref[:, 48:] = 50.0
    ref[:10] = -1000.0
    ref = ref + rng.normal(0, 2.0, ref.shape)
    rois = find_uniform_regions(ref, roi_size=15, n_rois=6, max_rois_per_slice=6)
    assert len(rois) == 6
    for ry, rx in rois:
        assert rx.start >= 48 and ry.start >= 10  # only in the flat region, never in air or stripes
        assert rx.stop - rx.start == 15 and ry.stop - ry.start == 15
    # non-overlapping
    for i, a in enumerate(rois):
        for b in rois[i + 1:]:
            assert abs(a[0].start - b[0].start) >= 15 or abs(a[1].start - b[1].start) >= 15
    # deterministic
    assert rois == find_uniform_regions(ref, roi_size=15, n_rois=6, max_rois_per_slice=6)

    pred = ref + 12.5 + rng.normal(0, 20.0, ref.shape)
    st = uniform_region_statistics(pred, ref, rois)
    assert st.n_rois == 6
    assert st.mean_bias == pytest.approx(12.5, abs=2.5)
    assert st.noise_std == pytest.approx(np.sqrt(20.0**2 + 2.0**2), rel=0.1)
    assert st.ref_noise_std == pytest.approx(2.0, rel=0.15)
    assert st.mean_abs_bias >= abs(st.mean_bias) - 1e-12


def test_uniform_regions_volume_and_per_slice_cap():
    ref = np.full((3, 64, 64), 40.0)
    ref[1] = -1000.0  # a slice of air: no candidates
    rois = find_uniform_regions(ref, roi_size=15, n_rois=10, max_rois_per_slice=2)
    assert len(rois) == 4
    zs = sorted(r[0].start for r in rois)
    assert zs == [0, 0, 2, 2]
    st = uniform_region_statistics(ref - 5.0, ref, rois)
    assert st.mean_bias == pytest.approx(-5.0)
    assert st.noise_std == pytest.approx(0.0)


def test_uniform_regions_mr_excludes_background():
    ref = np.zeros((64, 64))
    ref[20:50, 20:50] = 500.0 + np.random.default_rng(0).normal(0, 5, (30, 30))
    rois = find_uniform_regions(ref, roi_size=9, n_rois=3, hu_range=None)
    assert rois
    for ry, rx in rois:
        assert ry.start >= 20 and ry.stop <= 50 and rx.start >= 20 and rx.stop <= 50


def test_evaluate_windows_dict():
    ref = _phantom()
    res = evaluate_windows(ref + 5.0, ref, CT_WINDOWS.items())
    assert set(res) == {"soft_tissue", "wide"}
    assert res["wide"]["rmse"] == pytest.approx(5.0, abs=1e-4)  # air at -1000 stays inside "wide"
    assert res["wide"]["psnr"] > res["soft_tissue"]["psnr"]


def test_masked_metrics():
    rng = np.random.default_rng(5)
    ref = np.zeros((2, 40, 40))
    ref[:, 10:30, 10:30] = 500.0
    pred = ref.copy()
    pred[ref == 0] = 100.0  # error only outside the mask (e.g. the Rician noise floor in MR background)
    pred[ref > 0] += rng.normal(0, 10, int((ref > 0).sum()))
    mask = ref > 0
    win = mr_window(ref)
    d = (np.clip(pred, *win) - ref)[mask]
    assert rmse(pred, ref, win, mask=mask) == pytest.approx(np.sqrt(np.mean(d**2)))
    assert psnr(pred, ref, win, mask=mask) == pytest.approx(10 * np.log10(500.0**2 / np.mean(d**2)))
    assert psnr(pred, ref, win, mask=mask) > psnr(pred, ref, win) + 5
    assert ssim(ref, ref, win, mask=mask) == pytest.approx(1.0)
    assert 0 < ssim(pred, ref, win, mask=mask) < 1
    with pytest.raises(ValueError, match="mask"):
        psnr(pred, ref, win, mask=mask[0])
    with pytest.raises(ValueError, match="no voxel"):
        psnr(pred, ref, win, mask=np.zeros_like(mask))
    res = evaluate_windows(pred, ref, [("full", win), ("in_mask", win)], masks={"in_mask": mask})
    assert res["in_mask"]["psnr"] == pytest.approx(psnr(pred, ref, win, mask=mask))
