"""Lesion detectability: model observers where the answer is known, contrast kept, the residual's structure,
lesion insertion through the low-dose simulator, and the benchmark end to end on a synthetic phantom."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import ndimage, stats

from lib.evaluation.detectability import (
    auc,
    bootstrap_ci,
    cho_observer,
    contrast_kept,
    d_prime,
    difference_ci,
    extract_rois,
    laguerre_gauss_channels,
    lg_channel_width,
    npw_observer,
    residual_structure,
)
from lib.lesions import Lesion, insert_lesions, lesion_profile

SIZE = 19  # ROI side, pixels


def _signal(amplitude: float = 1.0, diameter_px: float = 6.0) -> np.ndarray:
    centre = (SIZE - 1) / 2.0
    return amplitude * lesion_profile((SIZE, SIZE), Lesion((centre, centre), diameter_px, 1.0), 1.0)


def _white(n: int, sigma: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sigma, (n, SIZE, SIZE))


# ---- figures of merit ----------------------------------------------------------------------------------------

def test_auc_is_the_mann_whitney_pair_count_with_ties():
    p = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    a = np.array([2.0, 0.0, 1.0, 4.0])
    pairs = [(1.0 if x > y else 0.5 if x == y else 0.0) for x in p for y in a]
    assert auc(p, a) == pytest.approx(np.mean(pairs))
    assert auc(a + 10, a) == 1.0 and auc(a, a + 10) == 0.0
    rows = auc(np.stack([p, p[::-1]]), np.stack([a, a]))  # row-wise, as the bootstrap calls it
    assert rows.shape == (2,) and np.allclose(rows, auc(p, a))


def test_d_prime_of_known_gaussians_and_its_interval():
    rng = np.random.default_rng(3)
    p, a = rng.normal(1.5, 1.0, 4000), rng.normal(0.0, 1.0, 4000)
    assert d_prime(p, a) == pytest.approx(1.5, abs=0.06)
    lo, hi = bootstrap_ci(p, a, d_prime, paired=False, n_boot=500)
    assert lo < 1.5 < hi and hi - lo < 0.2
    assert d_prime(np.ones(3), np.ones(3)) == 0.0 and d_prime(np.ones(3) * 2, np.ones(3)) == math.inf


def test_an_auc_at_the_edge_of_its_resamples_gets_an_interval_not_a_point():
    """CHO scores of 8 paired sites from a phantom run of the benchmark (every present score above its own absent
    one): the observed AUC lies at the bottom of the bootstrap distribution, BCa's bias correction is infinite and
    its interval was [0.594, 0.594], "no uncertainty" from 8 sites. The percentile interval is given there."""
    present = np.array([-37.237, -22.553, -13.701, 27.718, -649.823, -34.464, -95.498, 243.4])
    absent = np.array([-48.44, -33.558, -31.013, 15.342, -842.491, -48.137, -120.124, 53.118])
    value = auc(present, absent)
    lo, hi = bootstrap_ci(present, absent, auc, paired=True, n_boot=2000, seed=0)
    assert value == pytest.approx(0.59375)
    assert lo <= value <= hi and hi - lo > 0.05, (lo, hi)


# ---- NPW ----------------------------------------------------------------------------------------------------

def test_npw_on_white_noise_matches_the_analytic_d_prime_and_auc():
    """Known signal s in white Gaussian noise of std sigma: NPW d' = sqrt(sum s^2) / sigma, AUC = Phi(d' / sqrt 2)."""
    sigma = 10.0
    s = _signal()
    s *= 2.0 * sigma / math.sqrt(float(np.sum(s * s)))  # analytic d' = 2
    n = 1500
    absent = _white(n, sigma, 1)
    present = s + _white(n, sigma, 2)
    res = npw_observer(present, absent, template=s, n_boot=300)
    assert res.d_prime == pytest.approx(2.0, abs=0.12)
    assert res.auc == pytest.approx(stats.norm.cdf(2.0 / math.sqrt(2.0)), abs=0.02)
    lo, hi = res.d_prime_ci
    assert lo < res.d_prime < hi and 0.1 < hi - lo < 0.4  # about 2 x 1.96 x sqrt((2 + d'^2 / 2) / n)
    # the paired design: the same noise with and without the lesion. The template is then estimated from the data
    # (leave-one-site-out) and is the signal itself: the same d'
    paired = npw_observer(absent + s, absent, n_boot=300)
    assert paired.d_prime == pytest.approx(2.0, abs=0.12)
    assert paired.details["template"].startswith("expected signal, leave-one-site-out")


# ---- CHO ----------------------------------------------------------------------------------------------------

def test_lg_channels_and_width_follow_the_lesion():
    chans = laguerre_gauss_channels((31, 31), 6, 8.0)
    gram = chans.reshape(6, -1) @ chans.reshape(6, -1).T
    assert np.allclose(np.diag(gram), 1.0) and np.abs(gram - np.eye(6)).max() < 0.05  # nearly orthonormal
    widths = [lg_channel_width(_signal(diameter_px=d), 6) for d in (3.0, 6.0, 10.0)]
    assert widths[0] < widths[1] < widths[2]
    assert all(0.8 * d < w < 2.0 * d for w, d in zip(widths, (3.0, 6.0, 10.0)))


def test_cho_on_white_noise_reaches_the_channelised_ideal():
    """White noise: the Hotelling observer on channels U has d'^2 = |P_U s|^2 / sigma^2 (P_U the projection on the
    channels' span), i.e. the analytic d' times the square root of the signal energy the channels hold."""
    sigma = 10.0
    s = _signal()
    s *= 2.0 * sigma / math.sqrt(float(np.sum(s * s)))
    chans = laguerre_gauss_channels((SIZE, SIZE), 6, lg_channel_width(s, 6))
    u = chans.reshape(6, -1).T
    coef, *_ = np.linalg.lstsq(u, s.ravel(), rcond=None)
    ideal = math.sqrt(float(np.sum((u @ coef) ** 2))) / sigma
    n = 1500
    absent = _white(n, sigma, 5)
    res = cho_observer(absent + s, absent, chans, n_boot=300)
    assert ideal > 1.9
    assert res.d_prime == pytest.approx(ideal, abs=0.12)
    assert res.auc == pytest.approx(stats.norm.cdf(res.d_prime / math.sqrt(2.0)), abs=0.02)


def test_cho_prewhitens_correlated_noise_where_npw_cannot():
    """Low-pass (lumpy) noise: NPW's matched filter collects the noise's large low-frequency power; the Hotelling
    template prewhitens it and detects the lesion far better."""
    rng = np.random.default_rng(11)
    n = 600
    lumpy = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (n, SIZE, SIZE)), sigma=(0, 4, 4), mode="wrap") * 60.0
    absent = lumpy + rng.normal(0.0, 1.0, (n, SIZE, SIZE))
    s = _signal(amplitude=1.0)
    chans = laguerre_gauss_channels((SIZE, SIZE), 6, lg_channel_width(s, 6))
    npw = npw_observer(absent + s, absent, template=s, n_boot=200)
    cho = cho_observer(absent + s, absent, chans, n_boot=200)
    assert cho.d_prime > 2.0 * npw.d_prime


def test_cho_leave_one_out_is_not_inflated_without_signal():
    """No lesion at all: a Hotelling template trained and tested on the same 20 sites finds 'signal' in the noise
    (d' about 1); the leave-one-site-out template must not."""
    values = []
    for seed in range(12):
        absent = _white(20, 1.0, 100 + seed)
        present = _white(20, 1.0, 200 + seed)  # nothing added
        chans = laguerre_gauss_channels((SIZE, SIZE), 6, 6.0)
        values.append(cho_observer(present, absent, chans, n_boot=50).d_prime)
    assert np.mean(values) < 0.3


def test_paired_difference_interval_is_narrower_than_either_reading():
    """Two denoisers' outputs of the same images share the sites' background and most of the noise: the
    difference of their d' is known much better than either d' alone."""
    rng = np.random.default_rng(21)
    n = 60
    site = rng.normal(0.0, 1.0, n)  # per-site background, common to both readings
    e_p, e_a = rng.normal(0, 1, n), rng.normal(0, 1, n)  # the noise realisation, common too
    pa, aa = site + 1.5 + e_p, site + e_a
    pb, ab = site + 1.2 + 0.9 * e_p + rng.normal(0, 0.2, n), site + 0.9 * e_a + rng.normal(0, 0.2, n)
    diff, (lo, hi) = difference_ci((pa, aa), (pb, ab), n_boot=800)
    own_lo, own_hi = bootstrap_ci(pa, aa, d_prime, n_boot=800)
    assert diff == pytest.approx(d_prime(pa, aa) - d_prime(pb, ab))
    assert lo < diff < hi and (hi - lo) < 0.8 * (own_hi - own_lo)


# ---- ROIs, contrast kept, residual --------------------------------------------------------------------------

def test_extract_rois_centres_and_removes_the_mean():
    img = np.zeros((40, 50))
    img[10, 20] = 5.0
    roi = extract_rois(img, [(10, 20)], 7, remove_mean=False)[0]
    assert roi[3, 3] == 5.0 and roi.sum() == 5.0
    vol = np.stack([img, img * 2])
    assert extract_rois(vol, [(1, 10, 20)], 7, remove_mean=False)[0, 3, 3] == 10.0
    assert abs(extract_rois(img + 100, [(10, 20)], 7)[0].mean()) < 1e-12
    assert extract_rois(img, [(0, 0)], 7).shape == (1, 7, 7)  # reflected at the border


def _slice_with_lesion(diameter_mm: float = 3.0, contrast: float = -25.0):
    clean = np.full((64, 64), 60.0, np.float32)
    lesion = Lesion((32.0, 32.0), diameter_mm, contrast)
    return clean, insert_lesions(clean, [lesion], 1.0), lesion_profile(clean.shape, lesion, 1.0)


def test_contrast_kept_is_one_for_identity_and_lower_for_blur():
    absent, present, profile = _slice_with_lesion()
    noise = np.random.default_rng(0).normal(0, 20, absent.shape)
    noisy_p, noisy_a = present + noise, absent + noise
    assert contrast_kept(noisy_p, noisy_a, profile, present, absent) == pytest.approx(1.0, abs=1e-6)
    blur = lambda x: ndimage.gaussian_filter(x, 1.5)  # noqa: E731
    kept = contrast_kept(blur(noisy_p), blur(noisy_a), profile, present, absent)
    assert 0.2 < kept < 0.8


def test_residual_structure_is_higher_for_a_blurring_denoiser():
    rng = np.random.default_rng(4)
    clean = np.zeros((96, 96), np.float32)
    clean[:, 48:] = 100.0  # an edge
    clean[20:30, 20:30] = 60.0
    lesion = Lesion((70.0, 24.0), 4.0, 40.0)
    present = insert_lesions(clean, [lesion], 1.0)
    mask = lesion_profile(clean.shape, lesion, 1.0)
    noisy = present + rng.normal(0, 10, clean.shape)
    region = np.zeros_like(mask, bool)
    region[58:83, 12:37] = True
    identity = residual_structure(noisy, noisy, present, mask, lesion_region=region)
    oracle = residual_structure(noisy, present, present, mask, lesion_region=region)  # removes exactly the noise
    blur = residual_structure(noisy, ndimage.gaussian_filter(noisy, 2.5), present, mask, lesion_region=region)
    assert identity.edge_correlation == 0.0 and identity.lesion_correlation == 0.0
    assert abs(oracle.edge_correlation) < 0.1 and abs(oracle.lesion_correlation) < 0.15
    assert blur.edge_correlation > oracle.edge_correlation + 0.3
    assert blur.lesion_correlation > oracle.lesion_correlation + 0.1


# ---- lesions through the low-dose simulator ----------------------------------------------------------------

def test_lesion_present_minus_absent_under_one_seed_is_the_lesion():
    """Inserting before the sinogram-domain simulation with the same seed: the two low-dose images differ by the
    lesion (the noise realisation is shared; only the lesion's own effect on the photon counts differs)."""
    from bench.lesion_detectability import ct_fixed_dose_settings
    from lib.noise import simulate_low_dose_ct

    yy, xx = np.mgrid[0:128, 0:128]
    clean = np.where((yy - 64) ** 2 / 58 ** 2 + (xx - 64) ** 2 / 60 ** 2 <= 1, 50.0, -1000.0).astype(np.float32)
    lesion = Lesion((60.0, 70.0), 6.0, -25.0)
    present = insert_lesions(clean, [lesion], 0.8)
    # the benchmark's protocol at a lower flux: this small phantom would otherwise get only ~3 HU of noise
    settings = dataclasses.replace(ct_fixed_dose_settings(), full_dose_photons=2e4)
    low_a = simulate_low_dose_ct(clean, 0.8, settings, seed=7)
    low_p = simulate_low_dose_ct(present, 0.8, settings, seed=7)
    diff = low_p - low_a
    profile = lesion_profile(clean.shape, lesion, 0.8)
    noise_std = float(np.std((low_a - clean)[clean > 0]))
    assert noise_std > 15.0  # there is noise ...
    # ... and it cancels: the difference is the lesion, up to the lesion's own small effect on the counts
    error = diff - (present - clean)
    assert np.abs(error).max() < 0.1 * noise_std and float(np.std(error)) < 0.02 * noise_std
    assert contrast_kept(low_p, low_a, profile, present, clean) == pytest.approx(1.0, abs=0.01)


# ---- the benchmark ------------------------------------------------------------------------------------------

def test_lesion_placement_keeps_lesions_apart_and_contrasts_balanced():
    from bench.lesion_detectability import pair_separation_mm, phantom_volume, place_lesions

    clean, spacing, _ = phantom_volume("MR")
    lesions = place_lesions(clean, spacing, (3.0, 6.0), (0.1, 0.2), np.random.default_rng(0), modality="MR",
                            planar=False, per_slice=3)
    assert len(lesions) > 10
    for i, a in enumerate(lesions):
        for b in lesions[i + 1:]:
            dist = math.dist([c * s for c, s in zip(a.centre, spacing)], [c * s for c, s in zip(b.centre, spacing)])
            assert dist >= pair_separation_mm(a.diameter_mm, b.diameter_mm, "MR") - 1e-9
    for d in (3.0, 6.0):
        counts = [sum(1 for l in lesions if l.diameter_mm == d and l.contrast == c) for c in (0.1, 0.2)]
        assert abs(counts[0] - counts[1]) <= 1


@pytest.mark.slow
def test_benchmark_end_to_end_on_a_phantom(tmp_path, tiny_weights):
    """The command line on the synthetic phantoms (no ../shared/data needed): identity, a blur, and a weight file
    given as --weights NAME=FILE (a CT ADL file, the session's tiny real one: runs on CT only; what it scores is
    not checked here); MR lesions darker than their tissue (--contrasts-mr)."""
    from bench.lesion_detectability import main

    weights = tiny_weights / "pretrained_adl_ct.pt"
    out = tmp_path / "lesions"
    rc = main(["--data", "phantom", "--denoisers", "noisy,gaussian", "--weights", f"adl_lesion={weights}",
               "--n-boot", "200", "--per-slice", "4", "--no-cache", "--contrasts-mr=-20,-10", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("CHO d'") >= 2
    assert (out / "lesion_detectability.png").stat().st_size > 10_000
    ct, mr = res["modalities"]["CT"], res["modalities"]["MR"]
    assert set(ct["methods"]) == {"noisy", "gaussian", "adl_lesion"}
    assert set(mr["methods"]) == {"noisy", "gaussian"}  # a CT weight file is not run on MR
    assert mr["contrasts"] == [-0.2, -0.1] and {l["contrast"] for t in mr["trials"] for l in t["lesions"]} == {-0.2, -0.1}
    dark = {(c["size_mm"], c["contrast"]): c["contrast_kept"]["mean"] for c in mr["methods"]["gaussian"]["cells"]}
    assert all(0.3 < kept < 0.8 for (size, _), kept in dark.items() if size == 3.0)  # a darker lesion blurred
    assert all(c["contrast_kept"]["mean"] == pytest.approx(1.0, abs=0.02) for c in mr["methods"]["noisy"]["cells"])
    cells = {(c["size_mm"], c["contrast"]): c for c in ct["methods"]["noisy"]["cells"]}
    assert len(cells) == 12 and all(c["n"] >= 8 for c in cells.values())
    assert all(c["contrast_kept"]["mean"] == pytest.approx(1.0, abs=0.02) for c in cells.values())
    blurred = {(c["size_mm"], c["contrast"]): c for c in ct["methods"]["gaussian"]["cells"]}
    assert all(blurred[k]["contrast_kept"]["mean"] < 0.8 for k in blurred if k[0] == 3.0)
    assert ct["methods"]["gaussian"]["residual"]["edge_correlation"] > 0.1
    assert ct["methods"]["noisy"]["residual"]["edge_correlation"] == 0.0
    some = next(c for c in ct["methods"]["gaussian"]["cells"] if c.get("cho"))
    assert "cho" in some["vs_noisy"] and len(some["vs_noisy"]["cho"]["ci"]) == 2
    assert ct["n_lesions"] == sum(len(t["lesions"]) for t in ct["trials"])


@pytest.mark.parametrize("option", ["--realisations", "--realisations-mr", "--n-boot", "--per-slice", "--max-slices",
                                    "--max-slices-mr"])
def test_benchmark_refuses_a_count_of_zero(option, capsys):
    """0 realisations used to end in a raw IndexError after the simulation, 0 resamples in intervals of nan, and 0
    slices or lesions per slice silently in the defaults: each is now a usage error naming the option."""
    from bench.lesion_detectability import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--data", "phantom", option, "0"])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err
    assert getattr(parse_args([option, "3"]), option.lstrip("-").replace("-", "_")) == 3


def test_reused_outputs_of_a_learned_model_are_keyed_by_the_code_that_made_them(tmp_path, monkeypatch):
    """``--reuse-outputs`` keyed a learned model's cached outputs by its weight file alone: after a change to
    lib/predict.py (the add-back of MR voxels above the network's range, 2026-12-06) a rerun silently scored the
    outputs of the code before it. Now the code between the weights and the output is part of the key."""
    import bench.lesion_detectability as L

    assert "apps/adl_denoise/lib/predict.py" in L.LEARNED_CODE
    code = tmp_path / "predict.py"
    code.write_text("before")
    monkeypatch.setattr(L, "LEARNED_CODE", (*L.LEARNED_CODE, str(code)))
    before = {m.name: m.identity["MR"] for m in L.build_methods("noisy,adl", (), ("MR",), log=lambda *a: None)}
    code.write_text("after")
    after = {m.name: m.identity["MR"] for m in L.build_methods("noisy,adl", (), ("MR",), log=lambda *a: None)}
    assert set(before) == {"noisy", "adl"}
    assert after["noisy"] == before["noisy"] and after["adl"] != before["adl"]
