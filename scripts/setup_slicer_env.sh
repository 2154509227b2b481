#!/usr/bin/env bash
# .venv-slicer: PyPI's slicer-core (3D Slicer's MRML without Qt, ~1 GB with VTK) for the Slicer module's MRML
# tests. Separate from .venv because slicer-core needs numpy 2 and monailabel's numpymaxflow needs numpy 1.
# Idempotent (stamp file); prints a line and exits 0 when it cannot install, and the MRML tests then skip.
# With the versions of the packages the module's Slicer-free code imports that Slicer bundles (SuperBuild's
# External_python-dicom-requirements.cmake and External_python-SimpleITK.cmake, Slicer 5.12): pydicom 3 (where .venv
# has pydicom 2), Pillow (pydicom 3's JPEG 2000 decoder there), SimpleITK; the module's DICOM code's tests run here too.
set -uo pipefail
# the stamp hashes this script, found before the cd: "$0" relative to the caller's folder would name no file after it
# (the hash of nothing: the venv removed and installed again when run as ./setup_slicer_env.sh from scripts/)
SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SCRIPT")/.." || exit 0
VENV=.venv-slicer
STAMP="$VENV/.installed-$(sha1sum < "$SCRIPT" | cut -c1-12)"
[[ -f "$STAMP" ]] && exit 0
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
rm -rf "$VENV"
if "$PYTHON" -m venv "$VENV" >/dev/null 2>&1 && "$VENV/bin/pip" install -q --disable-pip-version-check \
    "slicer-core>=5.8" pydicom==3.0.2 pillow==12.2.0 simpleitk==2.5.5 pynrrd pytest \
    >/tmp/adl_slicer_env.log 2>&1; then
  touch "$STAMP"
  echo "[setup] $VENV ready (slicer-core)"
else
  echo "[setup] could not install slicer-core into $VENV (see /tmp/adl_slicer_env.log): the MRML tests will skip"
  rm -rf "$VENV"
fi
exit 0
