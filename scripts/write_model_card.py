#!/usr/bin/env python
"""Print a markdown training record for shipped weight files (read from the files themselves).

    python scripts/write_model_card.py apps/adl_denoise/model/pretrained_adl_*.pt >> apps/adl_denoise/model/README.md
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch


def hardware_line(hardware: dict) -> str:
    """Where the weights were trained. Files written before the training record used
    :func:`lib.runtime.machine.describe_machine` hold ``cpu``, ``cpu_count`` and ``torch``; newer ones
    ``cpu_model``, ``logical_cpus`` and ``versions["torch"]``."""
    if not hardware:
        return "- hardware: not recorded in the file"
    cpu = hardware.get("cpu_model", hardware.get("cpu", "?"))
    count = hardware.get("logical_cpus", hardware.get("cpu_count", "?"))
    torch_version = (hardware.get("versions") or {}).get("torch") or hardware.get("torch", "?")
    return (f"- hardware: {cpu} x{count} ({hardware.get('torch_threads', '?')} torch threads), "
            f"GPUs {hardware.get('gpus') or 'none'}, torch {torch_version}")


def card(path: Path) -> str:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    record = blob.get("training", {})
    config = record.get("config", {})
    data = record.get("data", {})
    hardware = record.get("hardware", {})
    validation = record.get("validation", [])
    n_params = sum(t.numel() for t in blob["state_dict"].values())
    lines = [
        f"### `{path.name}`",
        "",
        f"- network: {blob['network']['class']} ({blob['spatial_dims']}D), {n_params / 1e6:.2f} M parameters stored "
        f"({blob.get('dtype', '?')}), file {path.stat().st_size / 1e6:.1f} MB; modality {blob['modality']}; "
        f"format {blob.get('format')} v{blob.get('version')}, created {blob.get('created_utc', '?')}",
        f"- data: {', '.join(data.get('images', [])) or '?'}; noise: {data.get('noise', '?')}; "
        f"patch {data.get('patch_size', '?')}, batch {config.get('batch_size', '?')}",
        f"- steps: {record.get('steps', '?')} ({', '.join(f'{k} {v}' for k, v in record.get('steps_per_phase', {}).items())}); "
        f"wall time {record.get('seconds', 0) / 3600:.2f} h"
        + (f" (last call; {record['step_seconds_total'] / 3600:.2f} h in training steps over the whole run)"
           if "step_seconds_total" in record else ""),
        hardware_line(hardware),
        f"- final losses: {', '.join(f'{k} {v:.4f}' for k, v in record.get('final_losses', {}).items())}",
    ]
    if validation:
        lines.append(f"- validation on {', '.join(data.get('validation_images', [])) or '?'} (fixed synthetic noise), "
                     "PSNR in the modality's window (dB):")
        lines += ["", "| step | phase | PSNR denoised | PSNR noisy |", "|---|---|---|---|"]
        lines += [f"| {v.get('step')} | {v.get('phase', '')} | {v.get('psnr', float('nan')):.2f} | "
                  f"{v.get('psnr_noisy', float('nan')):.2f} |" for v in validation]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="denoiser weight files (.pt)")
    args = parser.parse_args(argv)
    for path in args.files:
        if not path.is_file():
            parser.error(f"no such file: {path}")
    cards = []
    for path in args.files:
        try:
            cards.append(card(path))
        except (KeyError, AttributeError, RuntimeError, pickle.UnpicklingError) as error:  # a noise model, not a .pt
            parser.error(f"{path}: not a denoiser weight file ({type(error).__name__}: {error})")
    print("\n".join(cards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
