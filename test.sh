#!/usr/bin/env bash
# One command: set up .venv (if missing), build the sample data, run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
scripts/setup_env.sh
# the PACS round-trip test needs a real Orthanc (Debian packages); it is skipped, saying why, where apt is not usable
scripts/install_system_packages.sh orthanc orthanc-dicomweb orthanc-gdcm
.venv/bin/python sample_data/build_sample_data.py
exec .venv/bin/python -m pytest tests "$@"
