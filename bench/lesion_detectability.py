#!/usr/bin/env python
"""Lesion detectability benchmark: do denoisers keep small low-contrast lesions visible?

Protocol (issue 18, part 1; measured results in ``bench/README.md``, "Lesion detectability"):

* **CT** (held-out Siemens abdomen slab, 20 x 512 x 512, 0.977 mm, or ``--max-slices`` central slices):
  lesions of 3, 6 and 10 mm, -25 / -10 HU (hypodense, liver-lesion-like) and +20 / +40 HU (hyperdense), logistic
  edge 0.5 mm (:mod:`lib.lesions.synthesis`), inserted into the CLEAN slices at sites that
  :func:`lib.lesions.lesion_sites` finds in uniform soft tissue (liver, kidney, spleen, muscle: 0..120 HU, local
  std <= 25 HU). The lesion is the sphere's central section (a disc) in its own slice: the CT denoisers here are
  2D, so every slice is an independent trial. Each slice is then simulated at quarter dose
  (:func:`lib.noise.simulate_low_dose_ct`, sinogram domain, so inserting into the clean image is inserting in
  the projections) with and without its lesions, from the SAME seed: the two images carry the same noise
  realisation. The flux is FIXED (:data:`CT_FULL_DOSE_PHOTONS`, the benchmark's quarter-dose protocol
  :func:`bench.pairs.ct_settings` without its per-slice calibration), so both images get exactly the same
  photon statistics; it gives about 30 HU of added soft-tissue noise on this slab, like the calibrated pair.
* **MR** (held-out skull-stripped T1+Gd brain, 144 x 188 x 176, ~1 mm): Gd-enhancing-like spheres of 3, 6 and
  10 mm, +10 % and +20 % of the local intensity (``image * (1 + c * profile)``), at uniform brain sites (30-95 %
  of the robust maximum, local std <= 15 %), then Rician noise at the benchmark level (5 % of the clean
  volume's maximum, :func:`lib.noise.add_rician_noise`) from the same seed for both volumes.
* Lesions are at least :data:`MIN_SEPARATION_MM` (CT 25 mm: BM3D's 39-pixel block-matching window; MR 15 mm:
  BM4D's +-7 voxels) and ``1.5 (d1 + d2)`` apart, so no denoiser's search window and no observer ROI holds
  two lesions; at most ``--per-slice`` lesions of each size per slice. Contrasts are assigned in turn so every
  size x contrast cell gets about the same number of sites. Positions and contrasts are recorded in
  ``results.json``.
* Every denoiser (in-process: :mod:`bench.baselines`, :mod:`bench.learned`, and ``--weights NAME=FILE`` for any
  weight file, run only on the modality it was trained for) denoises the lesion-present and the lesion-absent
  volume. Per method x size x contrast, over the sites (:mod:`lib.evaluation.detectability`):
  contrast kept (mean, bootstrap 95 % CI), NPW d' (template: the expected lesion signal in that method's output,
  leave-one-site-out), CHO d' (6 Laguerre-Gauss channels, width from the lesion's true profile, leave-one-site-out
  Hotelling template), both AUCs, on ROIs of ``max(15, 3 d)`` pixels around the lesions with each ROI's mean
  removed. Per method: PSNR / SSIM of the lesion-present output against the clean lesion-present image (CT
  [-160, 240] HU; MR foreground [0, max]) with the harness's scoring (:mod:`bench.scoring`), and the residual's
  structure (correlation of ``|input - output|`` with the clean image's edges over the body, and with the lesion
  masks around the lesions).

Simulated images are cached in ``bench/results/cache/`` (:func:`bench.pairs.cached_noisy`, keyed by the source,
the settings, the seed and the lesions). ``--reuse-outputs`` also caches the denoised volumes (keyed by the input,
the denoiser and its code or weight file), so that a re-run of the analysis does not denoise again.

Examples (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/lesion_detectability.py                      # everything
    OMP_NUM_THREADS=1 .venv/bin/python bench/lesion_detectability.py --modalities CT --max-slices 4 \\
        --denoisers noisy,nlm --out bench/results/lesions_quick
    OMP_NUM_THREADS=1 .venv/bin/python bench/lesion_detectability.py --denoisers noisy,bm3d,adl \\
        --weights adl_lesion=apps/adl_denoise/model/adl_ct.pt                               # a new model
    .venv/bin/python bench/lesion_detectability.py --data phantom --denoisers noisy,gaussian  # no ../shared/data

Writes ``<out>/results.md``, ``<out>/results.json`` and ``<out>/lesion_detectability.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from bench.baselines import BASELINES
from bench.learned import LEARNED, LEARNED_MODEL_NAMES, from_weights, has_weights
from bench.pairs import DEFAULT_CACHE_DIR, Pair, _source_signature, cached_noisy, central_slices, ct_settings
from bench.scoring import pair_rois, score
from lib.evaluation.detectability import (
    cho_observer,
    contrast_kept,
    difference_ci,
    extract_rois,
    laguerre_gauss_channels,
    lg_channel_width,
    mean_ci,
    npw_observer,
    residual_structure,
)
from lib.lesions import Lesion, insert_lesions, lesion_profile, lesion_sites
from lib.runtime.atomic import atomic_write_json, atomic_write_text
from lib.runtime.clock import Stopwatch, utc_timestamp
from lib.runtime.machine import describe_machine, machine_line

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "lesions"

SIZES_MM: tuple[float, ...] = (3.0, 6.0, 10.0)
CT_CONTRASTS_HU: tuple[float, ...] = (-25.0, -10.0, 20.0, 40.0)
MR_CONTRASTS: tuple[float, ...] = (0.10, 0.20)
#: fixed quarter-dose flux (photons per bin at full dose): ~30 HU of added soft-tissue noise on the held-out slab
CT_FULL_DOSE_PHOTONS = 3.0e6
MR_NOISE_PERCENT = 5.0
CT_SEED = 1818  # issue 18
MR_SEED = 1819
MIN_SEPARATION_MM = {"CT": 25.0, "MR": 15.0}
PER_SLICE = {"CT": 10, "MR": 3}
#: Laguerre-Gauss channels of the CHO (a cell needs CHO_CHANNELS + 2 sites for it) and the fewest sites for NPW
CHO_CHANNELS = 6
MIN_SITES_NPW = 3
#: which denoisers run on which modality (the app's learned models also need installed weights)
MODALITY_ONLY = {"bm4d": "MR", "tddl_gcn": "CT", "tddl_gcn_lfr": "CT"}
DEFAULT_DENOISERS = "noisy,nlm,bm3d,bm4d,adl,tddl_gcn"
#: the method every other is compared with, site by site, by default (the low-dose input); --compare-to adds more
REFERENCE_METHOD = "noisy"

Denoiser = Callable[[np.ndarray, Sequence[float], str], np.ndarray]


# ---- trials --------------------------------------------------------------------------------------------------

@dataclass
class Trial:
    """One noise realisation of one modality: clean and noisy volumes with and without the lesions.

    Volumes are (Z, H, W) float32 (CT in HU); ``lesions`` have (z, y, x) pixel centres; CT lesions are discs in
    slice z (``planar``), MR lesions spheres. ``key`` identifies the simulated inputs (the cache keys), or None.
    """

    modality: str
    realisation: int
    spacing_zyx: tuple[float, float, float]
    clean_absent: np.ndarray
    clean_present: np.ndarray
    noisy_absent: np.ndarray
    noisy_present: np.ndarray
    lesions: list[Lesion]
    planar: bool
    key: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return tuple(reversed(self.spacing_zyx))  # the benchmark's denoiser convention


def pair_separation_mm(d1: float, d2: float, modality: str) -> float:
    """Minimum centre distance (mm) of two lesions of diameters d1, d2."""
    return max(MIN_SEPARATION_MM[modality.upper()], 1.5 * (d1 + d2))


def place_lesions(clean: np.ndarray, spacing_zyx: Sequence[float], sizes_mm: Sequence[float],
                  contrasts: Sequence[float], rng: np.random.Generator, *, modality: str, planar: bool,
                  per_slice: int) -> list[Lesion]:
    """Lesions for a clean (Z, H, W) volume: for each size (largest first), per slice (random order) up to
    ``per_slice`` sites from :func:`lib.lesions.lesion_sites`, kept only where every lesion already placed is at
    least :func:`pair_separation_mm` away (in the slice when ``planar``, in 3D otherwise). Each accepted lesion of
    a size gets the contrast that size has fewest of so far (ties in random order)."""
    modality = modality.upper()
    dz, dy, dx = (float(s) for s in spacing_zyx)
    lesions: list[Lesion] = []
    counts = {(float(d), float(c)): 0 for d in sizes_mm for c in contrasts}
    for d in sorted((float(s) for s in sizes_mm), reverse=True):  # the large ones need the most room
        for z in rng.permutation(clean.shape[0]):
            z = int(z)
            def near(lesion: Lesion, d: float = d) -> bool:
                gap = abs(lesion.centre[0] - z) * dz
                return lesion.centre[0] == z if planar else gap < pair_separation_mm(d, lesion.diameter_mm, modality)
            neighbours = [l for l in lesions if near(l)]
            same = [l.centre[1:] for l in neighbours if l.diameter_mm == d]
            sites = lesion_sites(clean[z], (dy, dx), d, 4 * per_slice, rng, modality=modality,
                                 min_separation_mm=pair_separation_mm(d, d, modality), avoid=same)
            accepted = 0
            for y, x in sites:
                if accepted == per_slice:
                    break
                ok = all(math.sqrt(((l.centre[0] - z) * dz) ** 2 + ((l.centre[1] - y) * dy) ** 2
                                   + ((l.centre[2] - x) * dx) ** 2) >= pair_separation_mm(d, l.diameter_mm, modality)
                         for l in neighbours if l.diameter_mm != d)
                if not ok:
                    continue
                options = [float(c) for c in contrasts]
                rng.shuffle(options)
                contrast = min(options, key=lambda c: counts[(d, c)])
                counts[(d, contrast)] += 1
                lesions.append(Lesion(centre=(float(z), float(y), float(x)), diameter_mm=d, contrast=contrast))
                neighbours.append(lesions[-1])
                accepted += 1
    return lesions


def _insert(clean: np.ndarray, lesions: Sequence[Lesion], spacing_zyx: Sequence[float], modality: str,
            planar: bool) -> np.ndarray:
    if not planar:
        return insert_lesions(clean, lesions, spacing_zyx, modality)
    out = np.asarray(clean, dtype=np.float32).copy()
    for z in sorted({int(l.centre[0]) for l in lesions}):
        here = [l for l in lesions if int(l.centre[0]) == z]
        out[z] = insert_lesions(out[z], here, spacing_zyx[1:], modality)
    return out


def lesion_mask_volume(shape: Sequence[int], lesions: Sequence[Lesion], spacing_zyx: Sequence[float],
                       planar: bool) -> np.ndarray:
    """Union of the lesions' profiles in [0, 1] (float32, ``shape``): discs in their slice when ``planar``."""
    mask = np.zeros(tuple(shape), dtype=np.float32)
    for lesion in lesions:
        if planar:
            z = int(lesion.centre[0])
            np.maximum(mask[z], lesion_profile(shape[1:], lesion, spacing_zyx[1:]), out=mask[z])
        else:
            np.maximum(mask, lesion_profile(shape, lesion, spacing_zyx), out=mask)
    return mask


def ct_fixed_dose_settings():
    """:func:`bench.pairs.ct_settings` (quarter dose, Shepp-Logan, tube-current modulation, electronic noise 10)
    with a fixed flux instead of the per-slice calibration."""
    return dataclasses.replace(ct_settings(), target_noise_std_hu=None, full_dose_photons=CT_FULL_DOSE_PHOTONS)


def _settings_payload(settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


def make_trial(clean: np.ndarray, spacing_zyx: Sequence[float], modality: str, realisation: int, *,
               sizes_mm: Sequence[float] = SIZES_MM, contrasts: Sequence[float] | None = None,
               per_slice: int | None = None, seed: int | None = None, source: dict | None = None,
               cache_dir: Path | None = DEFAULT_CACHE_DIR, log=print) -> Trial:
    """Place lesions in ``clean`` (Z, H, W) and simulate the lesion-present and lesion-absent noisy volumes of
    noise realisation ``realisation`` (same seed for both). CT: fixed-flux quarter dose in the sinogram domain;
    MR: Rician at :data:`MR_NOISE_PERCENT` % of the clean volume's maximum. ``source`` (a JSON-able description
    of where ``clean`` came from) enters the cache key."""
    modality = modality.upper()
    planar = modality == "CT"
    contrasts = tuple(contrasts if contrasts is not None else (CT_CONTRASTS_HU if planar else MR_CONTRASTS))
    per_slice = int(per_slice if per_slice is not None else PER_SLICE[modality])
    base_seed = int(seed if seed is not None else (CT_SEED if planar else MR_SEED))
    noise_seed = base_seed + 1000 * int(realisation)
    clean = np.ascontiguousarray(clean, dtype=np.float32)
    spacing_zyx = tuple(float(s) for s in spacing_zyx)
    rng = np.random.default_rng([base_seed, int(realisation)])
    lesions = place_lesions(clean, spacing_zyx, sizes_mm, contrasts, rng, modality=modality, planar=planar,
                            per_slice=per_slice)
    present = _insert(clean, lesions, spacing_zyx, modality, planar)
    payload = {"kind": "lesion_detectability", "modality": modality, "source": source or {"array_sha256":
               hashlib.sha256(clean.tobytes()).hexdigest()}, "shape": list(clean.shape),
               "spacing_zyx": list(spacing_zyx), "seed": noise_seed}
    if planar:
        from lib.noise import simulate_low_dose_ct

        settings = ct_fixed_dose_settings()
        payload["settings"] = _settings_payload(settings)

        def simulate(volume: np.ndarray):
            def make():
                out, det = simulate_low_dose_ct(volume, spacing_zyx[1:], settings, seed=noise_seed, device="cpu",
                                                return_details=True)
                return out, {"added_noise_std_hu_per_slice": [round(float(s), 2) for s in det.added_noise_std_hu]}
            return make
    else:
        from lib.noise import add_rician_noise

        reference_max = float(clean.max())
        payload["noise_percent"] = MR_NOISE_PERCENT
        payload["reference_max"] = reference_max

        def simulate(volume: np.ndarray):
            return lambda: (add_rician_noise(volume, MR_NOISE_PERCENT, seed=noise_seed, reference_max=reference_max),
                            {"sigma": MR_NOISE_PERCENT / 100.0 * reference_max})
    noisy_absent, info_a = cached_noisy({**payload, "lesions": []}, simulate(clean), cache_dir, log)
    noisy_present, info_p = cached_noisy({**payload, "lesions": [l.to_dict() for l in lesions]}, simulate(present),
                                         cache_dir, log)
    key = None
    if info_a.get("cache") and info_p.get("cache"):
        key = Path(info_a["cache"]).stem + "_" + Path(info_p["cache"]).stem
    meta = {"noise_seed": noise_seed, "simulation": {k: v for k, v in payload.items() if k != "source"},
            "source": payload["source"], "absent": info_a, "present": info_p}
    return Trial(modality=modality, realisation=int(realisation), spacing_zyx=spacing_zyx, clean_absent=clean,
                 clean_present=present, noisy_absent=np.asarray(noisy_absent, np.float32),
                 noisy_present=np.asarray(noisy_present, np.float32), lesions=lesions, planar=planar, key=key,
                 meta=meta)


def heldout_volume(modality: str, max_slices: int | None = None) -> tuple[np.ndarray, tuple, dict]:
    """The held-out clean volume of ``modality`` ((Z, H, W) float32, spacing (z, y, x) mm, source description),
    cropped to the ``max_slices`` central slices."""
    from lib.data.heldout import HELDOUT_CT_SERIES, HELDOUT_MR_VOLUME, shared_data_dir
    from lib.imaging import read_volume

    root = shared_data_dir()
    name = HELDOUT_CT_SERIES if modality.upper() == "CT" else HELDOUT_MR_VOLUME
    path = root / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (set ADL_SHARED_DATA, or use --data phantom)")
    vol = read_volume(path, modality=modality.upper())
    arr = np.asarray(vol.array, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    sl = central_slices(arr.shape[0], max_slices)
    spacing_zyx = (float(vol.spacing[2]), float(vol.spacing[1]), float(vol.spacing[0]))
    source = {"name": name, "signature": _source_signature(path), "slices": [sl.start, sl.stop]}
    return np.ascontiguousarray(arr[sl]), spacing_zyx, source


def phantom_volume(modality: str, max_slices: int | None = None) -> tuple[np.ndarray, tuple, dict]:
    """A small synthetic volume for tests and demos without ``../shared/data``: CT, 8 x 192 x 192 at 1 mm / 2 mm
    (air, a -100 HU fat ellipse, 40 HU muscle, a 60 HU liver-like ellipse); MR, 40 x 96 x 96 at 1 mm (a 300 grey
    shell round an 800 white-matter ellipsoid, zero outside)."""
    if modality.upper() == "CT":
        z, h, w = 8, 192, 192
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        body = ((yy - 96) / 88) ** 2 + ((xx - 96) / 92) ** 2 <= 1
        muscle = ((yy - 96) / 80) ** 2 + ((xx - 96) / 84) ** 2 <= 1
        liver = ((yy - 90) / 50) ** 2 + ((xx - 80) / 58) ** 2 <= 1
        plane = np.full((h, w), -1000.0, np.float32)
        plane[body], plane[muscle], plane[liver] = -100.0, 40.0, 60.0
        arr = np.repeat(plane[None], z, axis=0)
        spacing = (2.0, 1.0, 1.0)
    else:
        z, h, w = 40, 96, 96
        zz, yy, xx = np.mgrid[0:z, 0:h, 0:w].astype(np.float32)
        r = ((zz - 20) / 19) ** 2 + ((yy - 48) / 44) ** 2 + ((xx - 48) / 44) ** 2
        arr = np.where(r <= 1, 300.0, 0.0).astype(np.float32)
        arr[r <= 0.7] = 800.0
        spacing = (1.0, 1.0, 1.0)
    sl = central_slices(arr.shape[0], max_slices)
    return np.ascontiguousarray(arr[sl]), spacing, {"name": f"phantom_{modality.lower()}", "slices": [sl.start, sl.stop]}


# ---- denoisers -----------------------------------------------------------------------------------------------

@dataclass
class Method:
    """A denoiser of the run: its callable, the modalities it runs on, and what identifies its output (code or
    weight file) for ``--reuse-outputs``."""

    name: str
    fn: Denoiser
    modalities: tuple[str, ...]
    identity: dict[str, str]  # per modality


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: the code between a learned model's weights and its output (normalisation, the add-back above the range, the
#: orthogonal planes): a cached output made before a change to it is not the output of the code that now runs
LEARNED_CODE = ("apps/adl_denoise/lib/predict.py", "apps/adl_denoise/lib/data/intensity.py", "bench/learned.py")


def learned_code_id() -> str:
    """Short hash of :data:`LEARNED_CODE`, part of every learned method's ``--reuse-outputs`` identity."""
    return hashlib.sha256("".join(_file_sha256(REPO_ROOT / f) for f in LEARNED_CODE).encode()).hexdigest()[:16]


def build_methods(names: str, weights: Sequence[str] = (), modalities: Sequence[str] = ("CT", "MR"),
                  log=print) -> list[Method]:
    """The run's denoisers: ``names`` (comma-separated, from :data:`bench.baselines.BASELINES` and
    :data:`bench.learned.LEARNED`; learned ones only where the app has weights for the modality; ``bm4d`` on MR
    and ``tddl_gcn`` on CT only) and ``weights`` ("NAME=FILE": any ADL or TDDL-GCN weight file or training
    checkpoint, run on the modality it was trained for, in the app's precision)."""
    from lib.weights import find_weights

    methods: list[Method] = []
    code_id = _file_sha256(REPO_ROOT / "apps" / "adl_denoise" / "lib" / "denoisers" / "classical.py")[:16]
    learned_id = learned_code_id()
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        allowed = tuple(m for m in modalities if MODALITY_ONLY.get(name, m) == m)
        if name in BASELINES:
            methods.append(Method(name, BASELINES[name], allowed, {m: f"baseline:{name}:{code_id}" for m in allowed}))
        elif name in LEARNED:
            have = tuple(m for m in allowed if has_weights(name, m))
            for m in set(allowed) - set(have):
                log(f"[lesions] {name}: no installed weights for {m}, skipped there")
            if have:
                ids = {m: f"learned:{name}:{_file_sha256(find_weights(LEARNED_MODEL_NAMES[name], m))[:16]}:"
                          f"{learned_id}" for m in have}
                methods.append(Method(name, LEARNED[name], have, ids))
        else:
            raise SystemExit(f"unknown denoiser {name!r}; choose from {sorted(BASELINES) + sorted(LEARNED)}")
    for spec in weights:
        name, _, path = spec.partition("=")
        p = Path(path).expanduser()
        if not name.strip() or not p.is_file():
            raise SystemExit(f"--weights expects NAME=FILE with an existing file, got {spec!r}")
        from lib.predict import load_denoiser

        modality = load_denoiser(p).modality.upper()
        allowed = tuple(m for m in modalities if m == modality)
        if not allowed:
            log(f"[lesions] {name.strip()}: a {modality} model, not in this run's modalities; skipped")
            continue
        methods.append(Method(name.strip(), functools.partial(from_weights, path=str(p.resolve())), allowed,
                              {modality: f"weights:{_file_sha256(p)}:{learned_id}"}))
    if not methods:
        raise SystemExit("no denoisers selected")
    return methods


def denoise_trial(trial: Trial, method: Method, output_dir: Path | None, log=print) -> dict:
    """``{"absent": (Z, H, W), "present": (Z, H, W), "seconds": float, "cached": bool}``: ``method`` on both
    noisy volumes of ``trial``; with ``output_dir`` (and a cached trial) outputs are read from / written to it."""
    path = None
    if output_dir is not None and trial.key is not None:
        tag = hashlib.sha256(f"{trial.key}|{method.identity[trial.modality]}".encode()).hexdigest()[:20]
        path = Path(output_dir) / f"{trial.modality.lower()}_{method.name}_{tag}.npz"
        if path.exists():
            with np.load(path) as z:
                return {"absent": z["absent"], "present": z["present"], "seconds": float(z["seconds"]),
                        "cached": True}
    out = {}
    watch = Stopwatch()
    for which, volume in (("absent", trial.noisy_absent), ("present", trial.noisy_present)):
        res = method.fn(volume, trial.spacing_xyz, trial.modality)
        out[which] = np.asarray(res, dtype=np.float32).reshape(volume.shape)
    seconds = watch.seconds
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, absent=out["absent"], present=out["present"], seconds=seconds)
        tmp.replace(path)
    log(f"[lesions] {trial.modality} realisation {trial.realisation}: {method.name} "
        f"{seconds:.1f} s ({seconds / (2 * trial.noisy_absent.shape[0]):.2f} s per slice)")
    return {**out, "seconds": seconds, "cached": False}


# ---- analysis ------------------------------------------------------------------------------------------------

def roi_size_px(diameter_mm: float, pixel_mm: float) -> int:
    """Side of the observer ROI: three lesion diameters, odd, at least 15 pixels."""
    return max(15, 2 * int(round(1.5 * diameter_mm / pixel_mm)) + 1)


def _cells(trials: Sequence[Trial]) -> list[tuple[float, float]]:
    return sorted({(l.diameter_mm, l.contrast) for t in trials for l in t.lesions},
                  key=lambda c: (c[0], c[1]))


def analyse_cell(trials: Sequence[Trial], outputs: Sequence[Mapping], diameter_mm: float, contrast: float, *,
                 n_boot: int, seed: int = 0) -> dict:
    """Observer results and contrast kept of one method over the lesions of one size x contrast cell, pooled over
    the trials (``outputs[i]`` is the method's output on ``trials[i]``)."""
    pixel = float(trials[0].spacing_zyx[1])
    size = roi_size_px(diameter_mm, pixel)
    present, absent, kept = [], [], []
    for trial, out in zip(trials, outputs):
        centres = [l.centre for l in trial.lesions if l.diameter_mm == diameter_mm and l.contrast == contrast]
        if not centres:
            continue
        present.append(extract_rois(out["present"], centres, size))
        absent.append(extract_rois(out["absent"], centres, size))
        raw = [extract_rois(v, centres, size, remove_mean=False)
               for v in (out["present"], out["absent"], trial.clean_present, trial.clean_absent)]
        half = (size - 1) / 2.0
        profile = lesion_profile((size, size), Lesion((half, half), diameter_mm, 1.0), trial.spacing_zyx[1:])
        kept += [contrast_kept(raw[0][i], raw[1][i], profile, raw[2][i], raw[3][i]) for i in range(len(centres))]
    p, a = np.concatenate(present), np.concatenate(absent)
    half = (size - 1) / 2.0
    true_signal = contrast * lesion_profile((size, size), Lesion((half, half), diameter_mm, 1.0),
                                            trials[0].spacing_zyx[1:])
    width = lg_channel_width(true_signal, CHO_CHANNELS)
    channels = laguerre_gauss_channels((size, size), CHO_CHANNELS, width)
    # too few sites for an observer: reported as missing rather than as a meaningless number
    npw = (npw_observer(p, a, paired=True, n_boot=n_boot, seed=seed).as_dict(scores=True)
           if len(p) >= MIN_SITES_NPW else None)
    cho = ({**cho_observer(p, a, channels, paired=True, n_boot=n_boot, seed=seed).as_dict(scores=True),
            "lg_width_px": round(width, 3)} if len(p) >= CHO_CHANNELS + 2 else None)
    mean, ci = mean_ci(np.asarray(kept), n_boot=n_boot, seed=seed)
    return {"size_mm": diameter_mm, "contrast": contrast, "n": int(len(p)), "roi_px": size,
            "contrast_kept": {"mean": mean, "ci": list(ci), "per_lesion": [round(float(k), 4) for k in kept]},
            "npw": npw, "cho": cho}


def _body_region(trial: Trial) -> np.ndarray:
    if trial.modality == "CT":
        return trial.clean_absent > -500.0
    return Pair(name="lesions", modality="MR", noisy=trial.noisy_present, reference=trial.clean_absent,
                mr_window_max=float(trial.clean_absent.max())).masks().get("foreground",
                                                                            np.ones(trial.clean_absent.shape, bool))


def _roi_region(trial: Trial) -> np.ndarray:
    region = np.zeros(trial.clean_absent.shape, dtype=bool)
    for lesion in trial.lesions:
        half = roi_size_px(lesion.diameter_mm, trial.spacing_zyx[1]) // 2
        z, y, x = (int(round(c)) for c in lesion.centre)
        region[z, max(0, y - half):y + half + 1, max(0, x - half):x + half + 1] = True
    return region


def analyse_method(trials: Sequence[Trial], outputs: Sequence[Mapping], *, n_boot: int, seed: int = 0) -> dict:
    """Everything measured for one method on one modality: per-cell detectability, fidelity (PSNR / SSIM of the
    lesion-present output against the clean lesion-present volume, averaged over trials), residual structure
    (averaged over trials) and time."""
    cells = [analyse_cell(trials, outputs, d, c, n_boot=n_boot, seed=seed) for d, c in _cells(trials)]
    fidelity, residual = [], []
    for trial, out in zip(trials, outputs):
        pair = Pair(name=f"lesions_{trial.modality.lower()}", modality=trial.modality, noisy=trial.noisy_present,
                    reference=trial.clean_present, spacing=trial.spacing_xyz,
                    mr_window_max=float(trial.clean_absent.max()) if trial.modality == "MR" else None)
        fidelity.append(score(out["present"], pair, pair_rois(pair)))
        mask = lesion_mask_volume(trial.clean_present.shape, trial.lesions, trial.spacing_zyx, trial.planar)
        residual.append(residual_structure(trial.noisy_present, out["present"], trial.clean_present, mask,
                                           region=_body_region(trial), lesion_region=_roi_region(trial)).as_dict())
    windows = {name: {k: float(np.mean([f["windows"][name][k] for f in fidelity])) for k in ("psnr", "ssim", "rmse")}
               for name in fidelity[0]["windows"]}
    for name in windows:
        windows[name]["window"] = fidelity[0]["windows"][name]["window"]
    n_slices = sum(2 * t.noisy_absent.shape[0] for t in trials)
    seconds = float(sum(o["seconds"] for o in outputs))
    return {"cells": cells, "windows": windows,
            "residual": {k: float(np.mean([r[k] for r in residual])) for k in residual[0]},
            "seconds": seconds, "seconds_per_slice": seconds / max(1, n_slices),
            "outputs_cached": bool(all(o.get("cached") for o in outputs))}


def compare_to_reference(methods: Mapping[str, dict], reference: str = "noisy", *, n_boot: int,
                         seed: int = 0) -> None:
    """Adds ``cell["vs_<reference>"] = {"npw" | "cho": {"diff", "ci"}}`` to every method's cells: its d' minus the
    reference method's on the same sites and noise, with a paired bootstrap interval (:func:`difference_ci`).
    Nothing is added when the reference did not run."""
    ref = methods.get(reference)
    if ref is None:
        return
    ref_cells = {(c["size_mm"], c["contrast"]): c for c in ref["cells"]}
    for name, r in methods.items():
        if name == reference:
            continue
        for cell in r["cells"]:
            other = ref_cells.get((cell["size_mm"], cell["contrast"]))
            entry = {}
            for obs in ("npw", "cho"):
                if other is None or not cell.get(obs) or not other.get(obs):
                    continue
                diff, ci = difference_ci((cell[obs]["scores_present"], cell[obs]["scores_absent"]),
                                         (other[obs]["scores_present"], other[obs]["scores_absent"]),
                                         n_boot=n_boot, seed=seed)
                entry[obs] = {"diff": diff, "ci": list(ci)}
            cell[f"vs_{reference}"] = entry


# ---- report --------------------------------------------------------------------------------------------------

def _f(v, nd: int = 2) -> str:
    if v is None:
        return "-"
    v = float(v)
    return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.{nd}f}")


def _ci(value, ci, nd: int = 2, scale: float = 1.0) -> str:
    lo, hi = ci
    return f"{_f(value * scale, nd)} [{_f(lo * scale, nd)}, {_f(hi * scale, nd)}]"


def _nanmean(values) -> float:
    """Mean of the finite values; nan (without numpy's warning) when there are none."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _dp(cell: Mapping, observer: str) -> float:
    """A cell's d' of ``observer`` ("npw" or "cho"); nan where the cell had too few sites for it."""
    r = cell.get(observer)
    return float(r["d_prime"]) if r else math.nan


def _obs_ci(cell: Mapping, observer: str, what: str = "d_prime", nd: int = 2) -> str:
    r = cell.get(observer)
    return _ci(r[what], r[f"{what}_ci"], nd) if r else "-"


def _diff(cell: Mapping, observer: str, reference: str) -> str:
    """A cell's d' difference to the reference method with its interval; "*" marks an interval excluding 0."""
    r = cell.get(f"vs_{reference}", {}).get(observer)
    if not r:
        return "-"
    lo, hi = r["ci"]
    mark = "*" if (lo > 0 or hi < 0) else ""
    return f"{r['diff']:+.2f}{mark} [{lo:+.2f}, {hi:+.2f}]"


def contrast_label(modality: str, contrast: float) -> str:
    return f"{contrast:+g} HU" if modality == "CT" else f"{100 * contrast:+g} %"


def modality_tables(mres: Mapping, compare_to: Sequence[str] = (REFERENCE_METHOD,)) -> str:
    """Markdown of one modality: the method summary, then pivots (method x cell) of CHO d', NPW d', contrast
    kept, then the long table."""
    modality = mres["modality"]
    methods = mres["methods"]
    first = next(iter(methods.values()))
    wname = "soft_tissue" if modality == "CT" else "foreground"
    wlo, whi = first["windows"][wname]["window"]
    lines = [f"| method | PSNR {wname} [{wlo:g},{whi:g}] | SSIM | residual-edge corr. | residual-lesion corr. | "
             f"mean contrast kept | mean CHO d' | mean NPW d' | s/slice |", "|" + "---|" * 9]
    for name, r in methods.items():
        cells = r["cells"]
        lines.append(f"| {name} | {_f(r['windows'][wname]['psnr'])} | {_f(r['windows'][wname]['ssim'], 4)} | "
                     f"{_f(r['residual']['edge_correlation'], 3)} | {_f(r['residual']['lesion_correlation'], 3)} | "
                     f"{_f(100 * np.mean([c['contrast_kept']['mean'] for c in cells]), 0)} % | "
                     f"{_f(_nanmean([_dp(c, 'cho') for c in cells]))} | "
                     f"{_f(_nanmean([_dp(c, 'npw') for c in cells]))} | {_f(r['seconds_per_slice'])} |")
    cells = first["cells"]
    head = [f"{c['size_mm']:g} mm {contrast_label(modality, c['contrast'])} (n={c['n']})" for c in cells]
    out = ["\n".join(lines)]
    pivots = [("CHO d' [95 % CI]", lambda c: _obs_ci(c, "cho"), None),
              ("NPW d' [95 % CI]", lambda c: _obs_ci(c, "npw"), None),
              ("contrast kept % [95 % CI]", lambda c: _ci(c["contrast_kept"]["mean"], c["contrast_kept"]["ci"], 0,
                                                          100.0), None),
              ("CHO AUC", lambda c: _f(c["cho"]["auc"], 3) if c.get("cho") else "-", None)]
    for ref in [r for r in compare_to if r in methods]:
        for obs in ("cho", "npw"):
            pivots.append((f"{obs.upper()} d' minus {ref}'s on the same sites [95 % CI]",
                           lambda c, obs=obs, ref=ref: _diff(c, obs, ref), ref))
    for title, get, ref in pivots:
        rows = [f"**{title}**", "", "| method | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
        for name, r in methods.items():
            if name != ref:
                rows.append(f"| {name} | " + " | ".join(get(c) for c in r["cells"]) + " |")
        out.append("\n".join(rows))
    rows = ["**Every cell**", "", "| method | size mm | contrast | n | contrast kept % | NPW d' | NPW AUC | CHO d' | "
            "CHO AUC | LG width px |", "|" + "---|" * 10]
    for name, r in methods.items():
        for c in r["cells"]:
            rows.append(f"| {name} | {c['size_mm']:g} | {contrast_label(modality, c['contrast'])} | {c['n']} | "
                        f"{_ci(c['contrast_kept']['mean'], c['contrast_kept']['ci'], 0, 100.0)} | "
                        f"{_obs_ci(c, 'npw')} | {_obs_ci(c, 'npw', 'auc', 3)} | "
                        f"{_obs_ci(c, 'cho')} | {_obs_ci(c, 'cho', 'auc', 3)} | "
                        f"{c['cho']['lg_width_px'] if c.get('cho') else '-'} |")
    out.append("\n".join(rows))
    return "\n\n".join(out)


def results_markdown(results: Mapping) -> str:
    parts = [f"# {results['title']}", "", f"Measured {results['date']}; machine: {results['machine_line']}",
             f"Command: `{results['command']}`; wall time {results['wall_s']:.0f} s.", "",
             "Protocol: `bench/lesion_detectability.py` docstring. Per cell (lesion size x contrast), over its sites: "
             "contrast kept = output lesion contrast / true contrast (paired present - absent, profile-weighted); "
             "NPW d' (template: the method's mean lesion signal, leave-one-site-out); CHO d' (6 Laguerre-Gauss "
             "channels, width from the true lesion profile, leave-one-site-out Hotelling template) and AUCs; ROIs "
             "of max(15, 3 d) px with their mean removed. Intervals: 95 % BCa bootstrap over sites. "
             "'minus' tables: the same sites and noise read through both methods, paired "
             "bootstrap; * = interval excludes 0. PSNR / SSIM: lesion-present output vs the clean lesion-present "
             "volume. Residual corr.: Pearson correlation of |input - output| with the clean image's edges (body) "
             "and with the lesion masks (observer ROIs); 0 = removes no structure.", ""]
    for modality, mres in results["modalities"].items():
        sim = mres["trials"][0]["simulation"]
        parts += [f"## {modality}: {mres['source']} ({mres['n_trials']} realisation(s), "
                  f"{mres['n_lesions']} lesions, volume {mres['shape_zyx']} z,y,x)", "",
                  f"Noise: {json.dumps({k: v for k, v in sim.items() if k in ('seed', 'noise_percent', 'reference_max')})}"
                  if modality == "MR" else
                  f"Noise: fixed-flux quarter dose, full-dose photons {sim['settings']['full_dose_photons']:g}, "
                  f"filter {sim['settings']['reconstruction_filter']}; added noise std in soft tissue per slice "
                  f"{mres['trials'][0]['added_noise_std_hu']} HU", "",
                  modality_tables(mres, results.get("compare_to", (REFERENCE_METHOD,))), ""]
    return "\n".join(parts) + "\n"


def figure(results: Mapping, path: Path) -> None:
    """One figure: per modality (rows), CHO d', NPW d' and contrast kept (columns) against lesion size, one line
    per method; each point is the mean over that size's contrasts (every cell is in the tables)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = list(results["modalities"])
    names = list(dict.fromkeys(n for m in mods for n in results["modalities"][m]["methods"]))
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}  # one colour per method everywhere
    fig, axes = plt.subplots(len(mods), 3, figsize=(13, 3.6 * len(mods)), squeeze=False)
    for row, modality in enumerate(mods):
        mres = results["modalities"][modality]
        contrasts = ", ".join(contrast_label(modality, c) for c in mres["contrasts"])
        for col, (key, label) in enumerate((("cho", "CHO d'"), ("npw", "NPW d'"), ("kept", "contrast kept (%)"))):
            ax = axes[row][col]
            for name, r in mres["methods"].items():
                sizes = sorted({c["size_mm"] for c in r["cells"]})
                ys = []
                for s in sizes:
                    cs = [c for c in r["cells"] if c["size_mm"] == s]
                    ys.append(100 * np.mean([c["contrast_kept"]["mean"] for c in cs]) if key == "kept"
                              else _nanmean([_dp(c, key) for c in cs]))
                ax.plot(sizes, ys, marker="o", label=name, color=colours[name])
            if key == "kept":
                ax.axhline(100, color="0.6", lw=0.8, ls="--")
            first = next(iter(mres["methods"].values()))["cells"]
            ticks = sorted({c["size_mm"] for c in first})
            ax.set_xticks(ticks, [f"{s:g}\n(n={sum(c['n'] for c in first if c['size_mm'] == s)})" for s in ticks])
            ax.set_xlabel("lesion diameter (mm), sites over all contrasts")
            ax.set_ylabel(label)
            ax.set_title(f"{modality}: {label}, mean over {contrasts}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the run -------------------------------------------------------------------------------------------------

def run(modalities: Sequence[str], methods: Sequence[Method], out_dir: Path, *, data: str = "shared",
        max_slices: int | None = None, max_slices_mr: int | None = None, realisations: int = 1,
        realisations_mr: int = 1, per_slice: Mapping[str, int] | None = None, n_boot: int = 2000,
        cache_dir: Path | None = DEFAULT_CACHE_DIR, reuse_outputs: bool = False, title: str | None = None,
        command: str = "", figures: bool = True, compare_to: Sequence[str] = (REFERENCE_METHOD,),
        contrasts: Mapping[str, Sequence[float]] | None = None, log=print) -> dict:
    """The whole benchmark; returns the results dict (also written as ``<out_dir>/results.json``).
    ``contrasts``: per modality, the lesion contrasts instead of the defaults (CT in HU, MR as a fraction of the
    local intensity: -0.2 is a lesion 20 % darker than its tissue)."""
    watch = Stopwatch()
    machine = describe_machine()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output_cache = (Path(cache_dir) / "lesion_outputs") if (reuse_outputs and cache_dir is not None) else None
    results = {"title": title or "Lesion detectability", "date": utc_timestamp(), "machine": machine,
               "machine_line": machine_line(machine), "command": command, "modalities": {},
               "compare_to": list(compare_to),
               "protocol": {"sizes_mm": list(SIZES_MM), "cho_channels": CHO_CHANNELS, "n_boot": n_boot,
                            "min_separation_mm": MIN_SEPARATION_MM, "roi": "max(15, 3 d) px, mean removed",
                            "observer_validation": "leave-one-site-out"}}
    for modality in [m.upper() for m in modalities]:
        chosen = [m for m in methods if modality in m.modalities]
        if not chosen:
            log(f"[lesions] no denoiser runs on {modality}; skipped")
            continue
        ms = max_slices if modality == "CT" else max_slices_mr
        clean, spacing, source = (heldout_volume if data == "shared" else phantom_volume)(modality, ms)
        n_real = realisations if modality == "CT" else realisations_mr
        trials = [make_trial(clean, spacing, modality, r, source=source, cache_dir=cache_dir, log=log,
                             per_slice=(per_slice or {}).get(modality), contrasts=(contrasts or {}).get(modality))
                  for r in range(int(n_real))]
        log(f"[lesions] {modality}: {sum(len(t.lesions) for t in trials)} lesions in {len(trials)} realisation(s) "
            f"of {clean.shape} (z, y, x)")
        mres = {"modality": modality, "source": source.get("name"), "shape_zyx": list(clean.shape),
                "spacing_zyx": list(spacing), "n_trials": len(trials),
                "n_lesions": int(sum(len(t.lesions) for t in trials)),
                "contrasts": sorted({l.contrast for t in trials for l in t.lesions}),
                "trials": [{"realisation": t.realisation, "simulation": t.meta["simulation"],
                            "added_noise_std_hu": t.meta["absent"].get("added_noise_std_hu_per_slice"),
                            "cache": [t.meta["absent"].get("cache"), t.meta["present"].get("cache")],
                            "lesions": [l.to_dict() for l in t.lesions]} for t in trials],
                "methods": {}}
        for method in chosen:
            outputs = [denoise_trial(t, method, output_cache, log) for t in trials]
            mres["methods"][method.name] = analyse_method(trials, outputs, n_boot=n_boot)
            del outputs
        for ref in compare_to:
            compare_to_reference(mres["methods"], ref, n_boot=n_boot)
        results["modalities"][modality] = mres
    results["wall_s"] = watch.seconds
    atomic_write_json(out_dir / "results.json", results, indent=1)
    atomic_write_text(out_dir / "results.md", results_markdown(results))
    if figures and results["modalities"]:
        figure(results, out_dir / "lesion_detectability.png")
    return results


def _contrast_list(text: str) -> tuple[float, ...]:
    """``"-20,-10"`` -> (-20.0, -10.0); a lesion of zero contrast is no lesion."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v == 0 or not math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected non-zero finite contrasts, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    """A count that must be at least 1 (realisations, slices, lesions per slice, bootstrap resamples): 0 used to
    run with no trial (a raw IndexError), with every slice, or with intervals of nan, without saying so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--denoisers", default=DEFAULT_DENOISERS,
                    help=f"comma-separated, from {sorted(BASELINES) + sorted(LEARNED)} (default {DEFAULT_DENOISERS}; "
                         "bm4d runs on MR only, tddl_gcn on CT only, learned ones where the app has weights)")
    ap.add_argument("--weights", action="append", default=[], metavar="NAME=FILE",
                    help="an ADL or TDDL-GCN weight file or checkpoint, run in-process under NAME on the modality "
                         "it was trained for (repeatable)")
    ap.add_argument("--modalities", default="CT,MR", help="CT, MR or CT,MR")
    ap.add_argument("--data", choices=("shared", "phantom"), default="shared",
                    help="shared: the held-out split of ../shared/data; phantom: small synthetic volumes")
    ap.add_argument("--max-slices", type=_positive_int, default=None, help="CT: only the N central slices")
    ap.add_argument("--max-slices-mr", type=_positive_int, default=None, help="MR: only the N central slices")
    ap.add_argument("--realisations", type=_positive_int, default=1, help="CT noise realisations (new sites each)")
    ap.add_argument("--realisations-mr", type=_positive_int, default=1, help="MR noise realisations (new sites each)")
    ap.add_argument("--per-slice", type=_positive_int, default=None,
                    help=f"at most N lesions of each size per slice (default CT {PER_SLICE['CT']}, MR {PER_SLICE['MR']})")
    ap.add_argument("--contrasts-ct", type=_contrast_list, default=None, metavar="HU[,HU]",
                    help=f"CT lesion contrasts in HU (default {','.join(f'{c:g}' for c in CT_CONTRASTS_HU)})")
    ap.add_argument("--contrasts-mr", type=_contrast_list, default=None, metavar="PERCENT[,PERCENT]",
                    help="MR lesion contrasts in %% of the local intensity, negative for lesions darker than their "
                         f"tissue (default {','.join(f'{100 * c:g}' for c in MR_CONTRASTS)}: Gd-enhancing-like); "
                         "write a list that starts with a minus as --contrasts-mr=-20,-10")
    ap.add_argument("--n-boot", type=_positive_int, default=2000,
                    help="bootstrap resamples of the confidence intervals")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write the simulated-image cache")
    ap.add_argument("--reuse-outputs", action="store_true",
                    help="cache denoised volumes in bench/results/cache/lesion_outputs and reuse them")
    ap.add_argument("--compare-to", default=REFERENCE_METHOD, metavar="NAME[,NAME]",
                    help="methods every other is compared with on the same sites (paired d' differences), "
                         f"default {REFERENCE_METHOD}; e.g. noisy,adl next to --weights adl_lesion=FILE")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--title", default="Lesion detectability")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    modalities = [m.strip().upper() for m in args.modalities.split(",") if m.strip()]
    if any(m not in ("CT", "MR") for m in modalities):
        raise SystemExit(f"--modalities takes CT and/or MR, got {args.modalities!r}")
    if args.data == "shared":
        from bench.pairs import require_shared_data
        from lib.data.heldout import HELDOUT_CT_SERIES, HELDOUT_MR_VOLUME

        require_shared_data(*({"CT": HELDOUT_CT_SERIES, "MR": HELDOUT_MR_VOLUME}[m] for m in modalities),
                            hint="or use --data phantom")
    methods = build_methods(args.denoisers, args.weights, modalities)
    per_slice = {m: args.per_slice for m in modalities} if args.per_slice else None
    if args.contrasts_mr is not None and any(c <= -100 for c in args.contrasts_mr):
        raise SystemExit(f"--contrasts-mr: a lesion cannot be 100 % or more darker than its tissue, got "
                         f"{args.contrasts_mr}")
    contrasts = {"CT": args.contrasts_ct, "MR": None if args.contrasts_mr is None
                 else tuple(c / 100.0 for c in args.contrasts_mr)}
    command = " ".join([Path(sys.executable).name, *([sys.argv[0]] if argv is None else ["bench/lesion_detectability.py"]),
                        *(sys.argv[1:] if argv is None else argv)])
    print(f"Machine: {machine_line(describe_machine())}")
    results = run(modalities, methods, args.out, data=args.data, max_slices=args.max_slices,
                  max_slices_mr=args.max_slices_mr, realisations=args.realisations,
                  realisations_mr=args.realisations_mr, per_slice=per_slice, n_boot=args.n_boot,
                  cache_dir=None if args.no_cache else DEFAULT_CACHE_DIR, reuse_outputs=args.reuse_outputs,
                  title=args.title, command=command, figures=not args.no_figure,
                  compare_to=[n.strip() for n in args.compare_to.split(",") if n.strip()],
                  contrasts={m: c for m, c in contrasts.items() if c is not None})
    print(results_markdown(results))
    print(f"Results in {args.out}/results.md (wall time {results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
