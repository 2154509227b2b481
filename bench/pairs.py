"""The benchmark's (noisy, reference) pairs: the :class:`Pair` type and the builders of the pairs.

A :class:`Pair` also states the intensity windows it is scored in (:meth:`Pair.windows`) and, for MR, the
foreground mask of the "foreground" window (:meth:`Pair.masks`).

``shared`` pairs (``../shared/data`` present; the held-out split of ``lib.data.heldout``):

* ``ct_abdomen_siemens_quarter_dose``: the real Siemens abdomen slab (20 x 512 x 512, 0.977 mm, HU) is the
  normal-dose reference; the noisy input is a simulated QUARTER dose made from it in the sinogram domain by
  ``lib.noise.simulate_low_dose_ct`` (:func:`ct_settings`: dose fraction 0.25, Shepp-Logan-apodised FBP,
  whose noise texture is the closest of the filters to real quarter-dose scans (mean noise frequency), angular
  tube-current modulation, parallel beam, electronic noise 10 counts) and seed :data:`CT_SEED`. The flux is
  calibrated per slice so that the ADDED noise (noisy - reference) in soft tissue has a std of
  :data:`CT_ADDED_NOISE_HU`, inside the 22-65 HU that real quarter-dose abdominal scans show.
* ``mr_t1gd_brain_rician5``: the skull-stripped T1+Gd brain is the reference; the noisy input has Rician
  noise with sigma = 5 % of the reference's maximum (``lib.noise.add_rician_noise``), seed :data:`MR_SEED`.

The whole noisy volume is always simulated (so a slice's noise does not depend on ``max_slices``) and
cached under ``bench/results/cache/`` keyed by the source, the settings and the seed; ``max_slices`` then
keeps the central slices of both noisy and reference.

``sample`` pairs: ``sample_data/studies/manifest.json`` (built by the project from packages):
``{"pairs": [{"name", "noisy", "reference", "modality", "simulation"}]}`` with paths relative to the
manifest's folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lib.data.heldout import HELDOUT_CT_SERIES, HELDOUT_MR_VOLUME, shared_data_dir
from lib.evaluation import CT_WINDOWS, mr_window
from lib.runtime.atomic import atomic_numpy_save, atomic_write_json
from lib.runtime.clock import Stopwatch

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CACHE_DIR = REPO_ROOT / "bench" / "results" / "cache"
SAMPLE_MANIFEST = REPO_ROOT / "sample_data" / "studies" / "manifest.json"
#: 3: the simulated low-dose CT noise lost its log bias (lib.noise.ct_lowdose), so earlier cached simulations are stale
CACHE_VERSION = 3

# ---- CT: simulated quarter dose ---------------------------------------------------------------------------
CT_SEED = 2016  # the year of the Mayo / AAPM Low-Dose CT Grand Challenge
CT_DOSE_FRACTION = 0.25
CT_FULL_DOSE_PHOTONS = 1.5e6  # the calibration's starting flux
CT_ADDED_NOISE_HU = 30.0
CT_FILTER = "shepp-logan"
CT_ELECTRONIC_NOISE = 10.0

# ---- MR: Rician noise -------------------------------------------------------------------------------------
MR_SEED = 1996  # BrainWeb's publication year
MR_NOISE_PERCENT = 5.0

#: MR "foreground" mask: reference above this fraction of the window top
MR_FOREGROUND_FRACTION = 0.05


@dataclass
class Pair:
    """A (noisy, reference) pair. Arrays are (Z, H, W) float32 in the modality's units (HU for CT)."""

    name: str
    modality: str
    noisy: np.ndarray
    reference: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (x, y, z) mm
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict = field(default_factory=dict)
    #: MR window top; None -> max of ``reference`` (the builders set the whole volume's max, so that the window
    #: does not change with --max-slices)
    mr_window_max: float | None = None

    def __post_init__(self) -> None:
        self.modality = self.modality.upper()
        self.noisy = _as_volume(self.noisy, "noisy")
        self.reference = _as_volume(self.reference, "reference")
        if self.noisy.shape != self.reference.shape:
            raise ValueError(f"pair {self.name}: noisy {self.noisy.shape} and reference {self.reference.shape} differ")
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"pair {self.name}: modality must be CT or MR, got {self.modality}")
        self.spacing = tuple(float(s) for s in self.spacing)
        if len(self.spacing) == 2:
            self.spacing = (*self.spacing, 1.0)

    @property
    def n_slices(self) -> int:
        return int(self.noisy.shape[0])

    def windows(self) -> dict[str, tuple[float, float]]:
        """CT: soft_tissue [-160, 240] and wide [-1000, 1000] HU. MR: [0, max(reference)] over the whole
        volume ("full") and over the foreground only ("foreground", see :meth:`masks`)."""
        if self.modality == "CT":
            return dict(CT_WINDOWS)
        win = (0.0, float(self.mr_window_max)) if self.mr_window_max else mr_window(self.reference)
        return {"full": win, "foreground": win}

    def masks(self) -> dict[str, np.ndarray]:
        """Masks restricting some windows' metrics. MR "foreground": reference > 5 % of its maximum, holes
        filled per slice (the head/brain). Without it the Rician noise floor of the background (Rayleigh,
        mean 1.25 sigma, which no denoiser here removes) dominates the MR error."""
        if self.modality != "MR":
            return {}
        from scipy import ndimage

        fg = self.reference > MR_FOREGROUND_FRACTION * self.windows()["full"][1]
        fg = np.stack([ndimage.binary_fill_holes(s) for s in fg])
        return {"foreground": fg} if fg.any() else {}

    def display_window(self) -> tuple[float, float]:
        return CT_WINDOWS["soft_tissue"] if self.modality == "CT" else self.windows()["full"]


def _as_volume(a, what: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{what}: expected (H, W) or (Z, H, W), got {arr.shape}")
    return np.ascontiguousarray(arr)


def ct_settings(full_dose_photons: float = CT_FULL_DOSE_PHOTONS):
    """The benchmark's quarter-dose protocol: :func:`lib.noise.quarter_dose_settings` (the same one validates CT
    training runs), so that cached pairs stay comparable."""
    from lib.noise import quarter_dose_settings

    settings = quarter_dose_settings(CT_ADDED_NOISE_HU, full_dose_photons)
    if (settings.dose_fraction, settings.reconstruction_filter, settings.electronic_noise_std) != (
            CT_DOSE_FRACTION, CT_FILTER, CT_ELECTRONIC_NOISE):
        raise RuntimeError("bench/pairs.py constants disagree with lib.noise.quarter_dose_settings")
    return settings


def _settings_dict(settings) -> dict:
    if dataclasses.is_dataclass(settings):
        return json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    return {"repr": repr(settings)}


def central_slices(n_total: int, max_slices: int | None) -> slice:
    if max_slices is None or max_slices <= 0 or max_slices >= n_total:
        return slice(0, n_total)
    start = (n_total - max_slices) // 2
    return slice(start, start + max_slices)


def _source_signature(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size] for f in files]


def _cache_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_noisy(payload: dict, make: Callable[[], tuple[np.ndarray, dict]], cache_dir: Path | None,
                 log=print) -> tuple[np.ndarray, dict]:
    """The array made by ``make() -> (array, info)``, cached as ``<cache_dir>/<key>.npy`` (+ .json: payload, info)."""
    if cache_dir is None:
        watch = Stopwatch()
        arr, extra = make()
        return arr, {"cache": None, "simulation_s": watch.seconds, **extra}
    cache_dir = Path(cache_dir)
    key = _cache_key({**payload, "cache_version": CACHE_VERSION})
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if npy.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return np.load(npy), {"cache": str(npy), "cache_hit": True, "simulation_s": info.get("simulation_s"),
                              **info.get("info", {})}
    watch = Stopwatch()
    arr, extra = make()
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    dt = watch.seconds
    # the array first: a cache entry counts only once its .json exists
    atomic_numpy_save(npy, arr)
    atomic_write_json(meta, {**payload, "simulation_s": dt, "info": extra}, indent=2)
    log(f"[pairs] simulated and cached {npy.name} in {dt:.1f} s")
    return arr, {"cache": str(npy), "cache_hit": False, "simulation_s": dt, **extra}


def require_shared_data(*relative: str, hint: str = "") -> Path:
    """The shared data folder (``$ADL_SHARED_DATA``, else ``../shared/data``) once every path of ``relative`` (inside
    it) exists. A benchmark started without them stops at once with one line (SystemExit, status 1) naming what is
    missing and how to point at it, not with a traceback, nor after minutes of work (training, a server's start-up)."""
    root = shared_data_dir()
    missing = [root] if not root.is_dir() else [root / r for r in relative if not (root / r).exists()]
    if missing:
        raise SystemExit(f"error: {', '.join(map(str, missing))} not found: this benchmark needs the data of "
                         f"../shared/data (set ADL_SHARED_DATA to that folder{hint and ', ' + hint})")
    return root


def heldout_ct_pair(max_slices: int | None = None, cache_dir: Path | None = DEFAULT_CACHE_DIR,
                    full_dose_photons: float = CT_FULL_DOSE_PHOTONS, seed: int = CT_SEED,
                    root: Path | None = None, log=print) -> Pair:
    from lib.imaging import read_volume
    from lib.noise import simulate_low_dose_ct

    root = Path(root) if root is not None else shared_data_dir()
    src = root / HELDOUT_CT_SERIES
    vol = read_volume(src, modality="CT")
    ref = np.asarray(vol.array, dtype=np.float32)
    if ref.ndim == 2:
        ref = ref[None]
    settings = ct_settings(full_dose_photons)
    pixel_mm = (float(vol.spacing[1]), float(vol.spacing[0]))  # (dy, dx) from SimpleITK's (x, y, z)
    payload = {"kind": "ldct", "source": HELDOUT_CT_SERIES, "source_signature": _source_signature(src),
               "settings": _settings_dict(settings), "seed": seed, "pixel_size_mm": list(pixel_mm)}
    def make():
        arr, det = simulate_low_dose_ct(ref, pixel_mm, settings, seed=seed, device="cpu", return_details=True)
        # the simulator's own measure: std of the added noise over its eroded soft-tissue mask, per slice
        return arr, {"simulator_added_noise_std_hu_per_slice": [round(float(x), 2) for x in det.added_noise_std_hu],
                     "effective_added_photons": float(det.photons[0])}

    noisy, cinfo = cached_noisy(payload, make, cache_dir, log)
    sl = central_slices(ref.shape[0], max_slices)
    meta = {"source": str(src), "slices": [sl.start, sl.stop], "n_source_slices": int(ref.shape[0]),
            "simulation": {"method": "lib.noise.simulate_low_dose_ct", "seed": seed, **payload["settings"],
                           "pixel_size_mm_yx": list(pixel_mm)}, **cinfo}
    return Pair(name="ct_abdomen_siemens_quarter_dose", modality="CT", noisy=noisy[sl], reference=ref[sl],
                spacing=tuple(vol.spacing), origin=tuple(vol.origin), direction=tuple(vol.direction), meta=meta)


def heldout_mr_pair(max_slices: int | None = None, cache_dir: Path | None = DEFAULT_CACHE_DIR,
                    noise_percent: float = MR_NOISE_PERCENT, seed: int = MR_SEED,
                    root: Path | None = None, log=print) -> Pair:
    from lib.imaging import read_volume
    from lib.noise import add_rician_noise

    root = Path(root) if root is not None else shared_data_dir()
    src = root / HELDOUT_MR_VOLUME
    vol = read_volume(src, modality="MR")
    ref = np.asarray(vol.array, dtype=np.float32)
    payload = {"kind": "rician", "source": HELDOUT_MR_VOLUME, "source_signature": _source_signature(src),
               "noise_percent": noise_percent, "seed": seed, "reference_max": float(ref.max())}
    noisy, cinfo = cached_noisy(payload, lambda: (add_rician_noise(ref, noise_percent, seed=seed), {}), cache_dir, log)
    sl = central_slices(ref.shape[0], max_slices)
    meta = {"source": str(src), "slices": [sl.start, sl.stop], "n_source_slices": int(ref.shape[0]),
            "simulation": {"method": "lib.noise.add_rician_noise", "noise_percent_of_max": noise_percent,
                           "sigma": noise_percent / 100.0 * float(ref.max()), "seed": seed}, **cinfo}
    return Pair(name="mr_t1gd_brain_rician5", modality="MR", noisy=noisy[sl], reference=ref[sl],
                spacing=tuple(vol.spacing), origin=tuple(vol.origin), direction=tuple(vol.direction), meta=meta,
                mr_window_max=float(ref.max()))


def shared_pairs(max_slices_ct: int | None = None, max_slices_mr: int | None = None,
                 cache_dir: Path | None = DEFAULT_CACHE_DIR, which=("CT", "MR"), log=print) -> list[Pair]:
    root = shared_data_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"shared data folder {root} not found (set ADL_SHARED_DATA or use --pairs sample)")
    pairs = []
    if "CT" in which:
        pairs.append(heldout_ct_pair(max_slices_ct, cache_dir, root=root, log=log))
    if "MR" in which:
        pairs.append(heldout_mr_pair(max_slices_mr, cache_dir, root=root, log=log))
    return pairs


def sample_pairs(manifest: Path = SAMPLE_MANIFEST, max_slices: int | None = None,
                 max_slices_by_modality: dict[str, int | None] | None = None) -> list[Pair]:
    """The pairs of a sample manifest; ``max_slices`` central slices of each, or per modality where
    ``max_slices_by_modality`` ({"CT": n, "MR": m}) gives a number (``--max-slices-ct`` / ``--max-slices-mr``)."""
    from lib.imaging import read_volume

    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"sample manifest {manifest} not found (build the sample data first)")
    spec = json.loads(manifest.read_text())
    base = manifest.parent
    pairs = []
    for entry in spec.get("pairs", []):
        modality = entry.get("modality", "CT").upper()
        noisy_v = read_volume(base / entry["noisy"], modality=modality)
        ref_v = read_volume(base / entry["reference"], modality=modality)
        noisy = np.asarray(noisy_v.array, np.float32)
        ref = np.asarray(ref_v.array, np.float32)
        if noisy.ndim == 2:
            noisy, ref = noisy[None], ref[None]
        limit = (max_slices_by_modality or {}).get(modality)
        sl = central_slices(ref.shape[0], max_slices if limit is None else limit)
        meta = {"noisy": str(base / entry["noisy"]), "reference": str(base / entry["reference"]),
                "slices": [sl.start, sl.stop], "simulation": entry.get("simulation")}
        spacing = tuple(ref_v.spacing) + (1.0,) * (3 - len(ref_v.spacing))
        pairs.append(Pair(name=entry["name"], modality=modality, noisy=noisy[sl], reference=ref[sl], spacing=spacing,
                          meta=meta, mr_window_max=float(ref.max()) if modality == "MR" else None))
    if not pairs:
        raise ValueError(f"{manifest} lists no pairs")
    return pairs
