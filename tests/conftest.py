"""Shared pytest set-up: locations of real data (the project's packages are installed in editable mode).

There is deliberately no tests/__init__.py: the monailabel wheel installs a top-level ``tests`` package
into site-packages, and a package of the same name here would collide with it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "adl_denoise"

# Keep the 2-core CI machine responsive: one BLAS/torch thread pool per test process.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(os.environ.get("ADL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SAMPLE_STUDIES = REPO_ROOT / "sample_data" / "studies"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CT/MR volumes); tests that need it are skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA
