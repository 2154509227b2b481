#!/usr/bin/env bash
# One command: set up .venv, build the embedded sample data, and run the main job on it.
# Main job (until the MONAI Label app lands): denoise the sample low-dose CT studies with the command-line
# denoiser and report PSNR against the full-dose originals. Outputs go to sample_data/output/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup_env.sh
scripts/install_system_packages.sh
PY=.venv/bin/python
$PY sample_data/build_sample_data.py
$PY scripts/denoise_samples.py "$@"
