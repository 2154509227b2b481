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
# two worker processes (pytest-xdist; each test module stays on one worker, so its module fixtures are built once):
# most tests run one thread or wait on a server, so two halve the wall time on the 2-core CI machine.
# ADL_TEST_WORKERS=N to change; "-n 0" (a later -n wins) runs in this process, e.g. for --pdb or -s.
exec .venv/bin/python -m pytest tests -n "${ADL_TEST_WORKERS:-2}" --dist loadscope "$@"
