#!/usr/bin/env bash
# One command: set up .venv, build the embedded sample data, run the main job on it, then serve.
#   1. denoise every noisy sample study with the command-line denoiser (--model auto: ADL where weights are
#      installed, else BM3D) into sample_data/output/ and print PSNR/SSIM against the full-dose originals;
#   2. start the MONAI Label server (the ADL / TDDL-GCN app) on 127.0.0.1:${ADL_PORT:-8000} with the noisy
#      sample studies as its datastore, for 3D Slicer; Ctrl-C stops it.
# Arguments go to step 1 (e.g. --model bm3d --only ct_head); --no-server skips step 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
serve=1
args=()
for a in "$@"; do
  if [[ "$a" == "--no-server" ]]; then serve=0; else args+=("$a"); fi
done
scripts/setup_env.sh
scripts/install_system_packages.sh
PY=.venv/bin/python
$PY sample_data/build_sample_data.py
$PY scripts/denoise_samples.py "${args[@]+"${args[@]}"}"
[[ $serve -eq 1 ]] || exit 0
# the server's datastore: the noisy sample studies (it writes labels and datastore_v2.json next to them)
studies=sample_data/server_studies
mkdir -p "$studies"
for f in sample_data/studies/*_ld25.nii.gz sample_data/studies/*_rician5.nii.gz; do
  [[ -e "$f" ]] && [[ ! -e "$studies/$(basename "$f")" ]] && cp "$f" "$studies/"
done
echo "[run] MONAI Label server on http://127.0.0.1:${ADL_PORT:-8000} (Ctrl-C to stop); studies: $studies"
export MONAI_LABEL_TRACKING_ENABLED=false
exec $PY -m monailabel.main start_server --app apps/adl_denoise --studies "$studies" \
  -i 127.0.0.1 -p "${ADL_PORT:-8000}" --conf models all
