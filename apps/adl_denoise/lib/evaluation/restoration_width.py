"""Choosing a CT network's low-frequency restoration width from lesions planted in noisy slices.

A weight file names the width it is served with (``lib.weights.format.RESTORATION_KEY``); the shipped files' widths
were chosen on the lesion detectability benchmark (``bench/README.md``). A network trained at a site (``cli.py train``,
``cli.py adapt``, the app's fine-tuning) needs a width measured for it, not one chosen for another network: this
module measures the
contrast that synthetic lesions planted in its noisy validation slices keep
(:mod:`lib.evaluation.planted_lesions`: output with minus output without the lesion, over the lesion signal) after
the network plus the restoration at each of several widths, and takes the **widest** width (the least noise given
back, so the most PSNR) at which lesions of the target diameter keep at least the target share of their contrast
(issue 18's 90 % of a 6 mm lesion). A narrower width gives more of the removed content back (0 is the convention for
"off", i.e. the network alone, taken when the network meets the target without any restoration). A file made from
another one serves the start's width or the measured one, whichever gives more back (:func:`served_restoration`).

Pure numpy / scipy over a slice denoiser: no server, no CLI, no GUI.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..lesions.low_frequency_restoration import restore_low_frequencies
from .planted_lesions import plant_lesions, planted_contrast_kept

__all__ = ["CANDIDATE_WIDTHS_PX", "TARGET_DIAMETER_MM", "TARGET_KEPT_PERCENT", "choose_restoration_width",
           "more_protective", "served_restoration", "spread_slices", "validation_slice_groups"]

#: widths tried (pixels), widest first: from above the shipped files' (0.6 and 0.8) down to where the output is
#: nearly the input again
CANDIDATE_WIDTHS_PX: tuple[float, ...] = (2.0, 1.6, 1.4, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
#: issue 18's lesion target: 90 % of a 6 mm lesion's contrast kept
TARGET_DIAMETER_MM = 6.0
TARGET_KEPT_PERCENT = 90.0
#: fewer target-size lesions than this: too few to choose on (the modality's default applies instead)
MIN_TARGET_LESIONS = 6
#: target-size lesions wanted: new rounds of lesions (another seed, the same slices) are planted until there are as
#: many, at most :data:`MAX_ROUNDS` (a few validation slices hold only a few sites at a time, >= 15 mm apart)
WANTED_TARGET_LESIONS = 24
MAX_ROUNDS = 6


def more_protective(a: float, b: float) -> float:
    """Of two restoration widths, the one that gives more of the removed content back (keeps more of a lesion's
    contrast): the narrower Gaussian, 0 (off) counting as the widest."""
    return min((float(a), float(b)), key=lambda w: float("inf") if w == 0 else w)


def spread_slices(groups: Sequence[tuple[Sequence[np.ndarray], Sequence[float]]], max_slices: int = 8
                  ) -> list[tuple[list[np.ndarray], tuple[float, float]]]:
    """``groups`` ((slices, pixel size) per volume) cut to at most ``max_slices`` slices in all, shared over the
    volumes and spread evenly over each one's (centres of equal parts); volumes beyond ``max_slices`` are left out."""
    groups = [(list(slices), tuple(float(s) for s in spacing)) for slices, spacing in groups if len(slices)]
    if not groups or max_slices < 1:
        return []
    share = max(1, int(max_slices) // len(groups))
    out = []
    for slices, spacing in groups[:max_slices]:
        count = min(share, len(slices))  # the centres of equal parts: never only the first, nearly empty slice
        out.append(([slices[int(z)] for z in (np.arange(count) + 0.5) * len(slices) / count], spacing))
    return out


def validation_slice_groups(pairs: Sequence, max_slices: int = 8) -> list[tuple[list[np.ndarray], tuple[float, float]]]:
    """(noisy slices, (row, column) pixel size in mm) per validation pair (:class:`lib.data.ValidationPair`: noisy
    (H, W) or (Z, H, W) in HU) for :func:`choose_restoration_width`, at most ``max_slices`` slices in all
    (:func:`spread_slices`); pairs of unknown pixel size are left out (a lesion's size is in mm)."""
    usable = []
    for pair in pairs:
        if getattr(pair, "pixel_size_mm", None) is None:
            continue
        stack = np.asarray(pair.noisy, dtype=np.float32)
        usable.append((list(stack[None] if stack.ndim == 2 else stack), pair.pixel_size_mm))
    return spread_slices(usable, max_slices)


def _memoised(denoise: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``denoise`` run once per distinct input (by content): every width reuses the network's two outputs."""
    outputs: dict[str, np.ndarray] = {}

    def run(stack: np.ndarray) -> np.ndarray:
        stack = np.ascontiguousarray(stack, dtype=np.float32)
        key = hashlib.sha1(stack.tobytes()).hexdigest() + str(stack.shape)
        if key not in outputs:
            outputs[key] = np.asarray(denoise(stack), dtype=np.float32)
        return outputs[key]

    return run


def choose_restoration_width(
    denoise: Callable[[np.ndarray], np.ndarray],
    groups: Sequence[tuple[Sequence[np.ndarray], Sequence[float]]],
    *,
    target_percent: float = TARGET_KEPT_PERCENT,
    diameter_mm: float = TARGET_DIAMETER_MM,
    widths: Sequence[float] = CANDIDATE_WIDTHS_PX,
    per_slice: int = 12,
    seed: int = 0,
) -> dict:
    """The widest restoration width at which planted ``diameter_mm`` lesions keep ``target_percent`` of their contrast.

    Args:
        denoise: the network alone, (N, H, W) -> (N, H, W) in HU, one slice at a time.
        groups: (noisy CT slices (H, W) in HU, (row, column) pixel size in mm) per volume.
        target_percent, diameter_mm: the lesion target (mean contrast kept of the planted lesions of that diameter,
            both signs).
        widths: candidate widths in pixels (> 0), tried widest first.
        per_slice, seed: lesions planted per slice and round (4, 6 and 10 mm, +-25 HU, :func:`plant_lesions`) and
            the first round's seed (rounds until :data:`WANTED_TARGET_LESIONS` of the target diameter).

    Returns:
        ``{"sigma_px": width or None, "met": bool, "reason": text, "target": {...}, "lesions": n,
        "kept_percent": {"<width>": {"<diameter>": %}}}``, ``"0"`` being the network alone. ``sigma_px`` is 0 when
        the network alone meets the target, the widest width that meets it otherwise, the narrowest one tried when
        none does (``met`` False: the most contrast this restoration gives back), and None when fewer than
        :data:`MIN_TARGET_LESIONS` lesions of the target diameter found a site (nothing measured).
    """
    widths = sorted({float(w) for w in widths}, reverse=True)
    if not widths or widths[-1] <= 0:
        raise ValueError(f"candidate widths must be > 0 pixels, got {widths}")
    network = _memoised(denoise)
    key = f"{float(diameter_mm):g}"
    planted: list = []
    count = 0
    for round_ in range(MAX_ROUNDS):  # each round its own lesions in the same slices, scored with and without them
        planted += [(list(slices), plant_lesions(slices, spacing, per_slice=per_slice, seed=seed + round_))
                    for slices, spacing in groups if len(slices)]
        count = sum(1 for _, p in planted for per in p.lesions for lesion in per if f"{lesion.diameter_mm:g}" == key)
        if count >= WANTED_TARGET_LESIONS or count == 0:
            break
    target = {"diameter_mm": float(diameter_mm), "kept_percent": float(target_percent),
              "criterion": "mean contrast kept of lesions planted in the noisy validation slices (+-25 HU; output "
                           "with minus output without them, over the lesion signal)"}
    result = {"sigma_px": None, "met": False, "target": target, "lesions": count, "kept_percent": {}}
    if count < MIN_TARGET_LESIONS:
        result["reason"] = (f"only {count} site(s) for a {key} mm lesion in uniform soft tissue of the validation "
                            f"slices (at least {MIN_TARGET_LESIONS} needed)")
        return result

    def served(width: float) -> Callable[[np.ndarray], np.ndarray]:
        if width == 0:
            return network
        return lambda stack: np.stack([restore_low_frequencies(x, y, width)
                                       for x, y in zip(stack, network(stack))])

    def kept_at(width: float) -> dict[str, float]:
        by_diameter: dict[str, list[float]] = {}
        for slices, lesions in planted:
            scored = planted_contrast_kept(served(width), slices, lesions)
            if scored.get("non_finite_output"):
                raise ValueError("the network returned NaN or infinite values on the validation slices")
            for d, values in _per_diameter(scored, lesions).items():
                by_diameter.setdefault(d, []).extend(values)
        return {d: float(np.mean(v)) for d, v in sorted(by_diameter.items(), key=lambda kv: float(kv[0]))}

    for width in (0.0, *widths):
        kept = kept_at(width)
        result["kept_percent"][f"{width:g}"] = {d: round(v, 1) for d, v in kept.items()}
        if kept[key] >= target_percent:
            result.update(sigma_px=width, met=True,
                          reason=(f"the network alone keeps {kept[key]:.1f} % of a {key} mm lesion's contrast"
                                  if width == 0 else
                                  f"widest width keeping >= {target_percent:g} % of a {key} mm lesion's contrast "
                                  f"({kept[key]:.1f} %)"))
            return result
    result.update(sigma_px=widths[-1],
                  reason=(f"no width tried keeps {target_percent:g} % of a {key} mm lesion's contrast: the narrowest "
                          f"({widths[-1]:g} px) keeps {kept[key]:.1f} %"))
    return result


def _per_diameter(scored: dict, lesions) -> dict[str, list[float]]:
    """Per-lesion values of :func:`planted_contrast_kept` grouped by diameter (its order: slice by slice)."""
    diameters = [f"{lesion.diameter_mm:g}" for per in lesions.lesions for lesion in per]
    grouped: dict[str, list[float]] = {}
    for d, value in zip(diameters, scored["per_lesion_percent"]):
        grouped.setdefault(d, []).append(value)
    return grouped


def served_restoration(start: Mapping[str, Any] | None, start_default_px: float,
                       denoise: Callable[[np.ndarray], np.ndarray],
                       groups: Sequence[tuple[Sequence[np.ndarray], Sequence[float]]], measured_on: str, *,
                       seed: int = 0) -> dict | None:
    """The restoration entry of a file made from another one (adapted, fine-tuned): the start's width or the width
    measured for the new network (``denoise``) on lesions planted in ``groups`` (e.g. a site's held-out low-dose
    slices: its scanner's own noise), whichever gives more back (:func:`more_protective`), so that the new file
    never restores less than its start did.

    ``start``: the start file's entry with ``inherited_from`` (:func:`lib.weights.format.restoration_inherited_from`),
    None when it names none, in which case it was served at ``start_default_px`` (its modality's default) and that
    is what the measurement is held to. ``measured_on`` names the slices (for the record). Returns the entry, with
    the measurement under ``measured_on`` and ``chosen`` saying which one serves; None when the start names none and
    nothing could be measured (the default serves, as for the start).
    """
    measured = choose_restoration_width(denoise, groups, seed=seed)
    figures = {key: measured[key] for key in ("sigma_px", "met", "reason", "lesions", "kept_percent")}
    figures["slices"] = measured_on
    if measured["sigma_px"] is None:
        return None if start is None else {**start, "measured_on": figures}
    start_px = float(start["sigma_px"]) if start is not None else float(start_default_px)
    width = more_protective(start_px, measured["sigma_px"])
    what = "the start file's" if start is not None else "the modality's default, at which the start served,"
    source = f"{what} {start_px:g} px" if width == start_px else f"{measured['sigma_px']:g} px measured"
    return {**(start or {}), "sigma_px": width, "measured_on": figures,
            "chosen": f"{source}: the one giving more back of {measured['sigma_px']:g} px measured on the "
                      f"{measured_on} ({measured['reason']}) and {what} {start_px:g} px"}
