#!/usr/bin/env python
"""Run the denoising benchmark: baselines and command-line models side by side on the held-out pairs.

Examples (from the repository root)::

    python bench/run_benchmark.py --denoisers noisy,gaussian,nlm,bm3d --max-slices-ct 8 --out bench/results/baselines
    python bench/run_benchmark.py --denoisers noisy,bm3d \
        --cli "adl=python apps/adl_denoise/cli.py denoise --model adl --input {input} --output {output}"
    python bench/run_benchmark.py --pairs sample --denoisers noisy,gaussian,nlm

Prints the results table(s) and the machine description, and writes ``<out>/results.md``,
``<out>/results.json`` and one ``<pair>_comparison.png`` per pair.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from bench.baselines import BASELINES
from bench.learned import LEARNED, from_weights, has_weights
from bench.harness import evaluate
from bench.isolation import CliDenoiser
from bench.pairs import DEFAULT_CACHE_DIR, require_shared_data, sample_pairs, shared_pairs
from bench.report import pair_table
from lib.data.heldout import HELDOUT_CT_SERIES, HELDOUT_MR_VOLUME
from lib.runtime.machine import describe_machine, machine_line

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--denoisers", default="noisy,gaussian,nlm,bm3d",
                    help=f"comma-separated denoisers from {sorted(BASELINES) + sorted(LEARNED)} (learned ones use "
                         "the app's weights for each pair's modality; bm4d is applied to MR pairs only unless "
                         "--bm4d-ct is given)")
    ap.add_argument("--cli", action="append", default=[], metavar="NAME=TEMPLATE",
                    help="a command-line denoiser; placeholders {input} {output} {modality} (ct or mr) {python} (repeatable)")
    ap.add_argument("--weights", action="append", default=[], metavar="NAME=FILE",
                    help="an ADL or TDDL-GCN weight file run in-process under NAME, on the pairs of the modality it "
                         "was trained for (repeatable)")
    ap.add_argument("--weights-fp32", action="append", default=[], metavar="NAME=FILE",
                    help="as --weights, in float32 throughout (no bfloat16 / fp16 autocast), e.g. next to the same "
                         "file under --weights to time both on a CPU with native bfloat16 (repeatable)")
    ap.add_argument("--pairs", choices=("shared", "sample"), default="shared",
                    help="shared: the held-out split in ../shared/data; sample: sample_data/studies/manifest.json")
    ap.add_argument("--modalities", default="CT,MR", help="shared pairs to build: CT, MR or CT,MR")
    ap.add_argument("--max-slices", type=int, default=None, help="keep only the N central slices (all pairs)")
    ap.add_argument("--max-slices-ct", type=int, default=None, help="override --max-slices for CT pairs")
    ap.add_argument("--max-slices-mr", type=int, default=None, help="override --max-slices for MR pairs")
    ap.add_argument("--manifest", type=Path, default=None, help="sample manifest (default sample_data/studies/manifest.json)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "latest", help="output folder")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per denoiser call")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write the simulated-noise cache")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--bm4d-ct", action="store_true", help="also run bm4d on CT pairs")
    ap.add_argument("--title", default="Denoising benchmark")
    return ap.parse_args(argv)


def build_denoisers(names: str, clis: list[str], weights: list[str] = (), weights_fp32: list[str] = ()) -> dict:
    den: dict = {}
    known = {**BASELINES, **LEARNED}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in known:
            raise SystemExit(f"unknown denoiser {name!r}; choose from {sorted(known)}")
        den[name] = known[name]
    for spec in clis:
        if "=" not in spec:
            raise SystemExit(f"--cli expects NAME=TEMPLATE, got {spec!r}")
        name, template = spec.split("=", 1)
        den[name.strip()] = CliDenoiser(template.strip())
    for option, specs, amp in (("--weights", weights, True), ("--weights-fp32", weights_fp32, False)):
        for spec in specs:
            name, _, path = spec.partition("=")
            if not name.strip() or not Path(path).is_file():
                raise SystemExit(f"{option} expects NAME=FILE with an existing file, got {spec!r}")
            den[name.strip()] = functools.partial(from_weights, path=str(Path(path).resolve()), amp=amp)
    if not den:
        raise SystemExit("no denoisers selected")
    return den


def weight_file_modalities(weights: list[str] = (), weights_fp32: list[str] = ()) -> dict[str, str]:
    """``{NAME: "CT" | "MR"}``: the modality each ``--weights`` / ``--weights-fp32`` file was trained for (the file's
    own record, as the app reads it), so that a CT network is not scored on the MR pair and the other way round."""
    from lib.predict import load_denoiser

    return {name.strip(): load_denoiser(path).modality.upper()
            for name, _, path in (spec.partition("=") for spec in (*weights, *weights_fp32))}


def main(argv=None) -> int:
    args = parse_args(argv)
    denoisers = build_denoisers(args.denoisers, args.cli, args.weights, args.weights_fp32)
    trained_for = weight_file_modalities(args.weights, args.weights_fp32)
    machine = describe_machine()
    print(f"Machine: {machine_line(machine)}")
    ms_ct = args.max_slices_ct if args.max_slices_ct is not None else args.max_slices
    ms_mr = args.max_slices_mr if args.max_slices_mr is not None else args.max_slices
    cache = None if args.no_cache else DEFAULT_CACHE_DIR
    if args.pairs == "shared":
        which = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
        if not which or set(which) - {"CT", "MR"}:
            raise SystemExit(f"--modalities takes CT and/or MR, got {args.modalities!r}")
        require_shared_data(*({"CT": HELDOUT_CT_SERIES, "MR": HELDOUT_MR_VOLUME}[m] for m in which),
                            hint="or use --pairs sample")
        pairs = shared_pairs(ms_ct, ms_mr, cache_dir=cache, which=which)
    else:
        manifest = args.manifest or REPO_ROOT / "sample_data" / "studies" / "manifest.json"
        if not Path(manifest).is_file():
            raise SystemExit(f"error: {manifest} not found (build the sample data: "
                             ".venv/bin/python sample_data/build_sample_data.py)")
        pairs = sample_pairs(manifest, args.max_slices, {"CT": ms_ct, "MR": ms_mr})

    def select(pair, name: str) -> bool:
        # bm4d is a 3D baseline meant for the MR volume; on CT slabs only with --bm4d-ct
        if name == "bm4d" and pair.modality == "CT" and not args.bm4d_ct:
            return False
        if denoisers[name] is LEARNED.get(name):  # the app's installed weights: only where it has them (tddl_gcn: CT)
            return has_weights(name, pair.modality)
        if name in trained_for and trained_for[name] != pair.modality:  # a weight file: on its own modality only
            print(f"[bench] {name}: a {trained_for[name]} weight file, not run on the {pair.modality} pair {pair.name}")
            return False
        return True

    results = evaluate(pairs, denoisers, args.out, timeout_s=args.timeout, figures=not args.no_figures,
                       machine=machine, title=args.title, select=select,
                       extra={"command": " ".join([Path(sys.executable).name] + sys.argv)})
    for pres in results["pairs"]:
        print(f"\n## {pres['name']} ({pres['modality']}, {pres['shape_zyx']} z,y,x)\n")
        print(pair_table(pres))
    print(f"\nMachine: {machine_line(machine)}")
    print(f"Total wall time {results['total_wall_s']:.1f} s; results in {args.out}/results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
