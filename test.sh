#!/usr/bin/env bash
# One command: set up .venv (if missing), build the sample data, run the whole test suite (what CI runs).
# Arguments go to pytest: ./test.sh -m "not slow" is the fast local loop (markers: pytest.ini).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup_env.sh
# the PACS round-trip test needs a real Orthanc (Debian packages); it is skipped, saying why, where apt is not usable
scripts/install_system_packages.sh orthanc orthanc-dicomweb orthanc-gdcm
# .venv-slicer: PyPI's slicer-core (real MRML) for the Slicer module's MRML tests (they skip where it cannot install)
scripts/setup_slicer_env.sh
.venv/bin/python sample_data/build_sample_data.py
exec .venv/bin/python -m pytest tests "$@"
