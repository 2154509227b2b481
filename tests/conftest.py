"""Shared pytest set-up: locations of real data (the project's packages are installed in editable mode), the
``gpu`` marker's skip, and the session's tiny weights and MONAI Label server (see ``mlserver.py``).

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


def import_cli():
    """``apps/adl_denoise/cli.py`` loaded afresh as a module, for in-process calls of its ``main`` (it is a script
    beside the ``lib`` package, not installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("adl_cli_under_test", APP_DIR / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_app_main():
    """The app's ``apps/adl_denoise/main.py`` (``DenoisingApp``) as a module, for building the app in-process (it is
    MONAI Label's app script beside the ``lib`` package, not installed); loaded once per test process."""
    import importlib.util
    import sys

    name = "adl_app_main_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, APP_DIR / "main.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests, saying why, where torch sees no CUDA device."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored after): tiny convolutions gain nothing from threads, an OpenMP
    pool competing with other processes for two cores can be an order of magnitude slower, and one thread keeps
    runs bit-for-bit repeatable. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A folder of small real weights (``mlserver.make_tiny_weights``), trained once per test session: pytest-xdist's
    workers share it (the first one trains them under a lock; another one builds the CT reference set meanwhile,
    instead of waiting for that and then training weights of its own). Read only: a server that may publish weights
    gets a copy (``mlserver.copy_weights``)."""
    import shutil

    from filelock import FileLock, Timeout

    from mlserver import make_tiny_weights

    root = _session_folder(tmp_path_factory, request)
    folder = root / "tiny_weights"
    lock = FileLock(str(root / "tiny_weights.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another worker trains them
        _built_ct_reference_set(root)
        with lock:
            if not folder.is_dir():
                raise RuntimeError(f"the worker that trained the session's tiny weights left no {folder}") from None
        return folder
    try:
        if not folder.is_dir():
            partial = root / "tiny_weights.partial"
            shutil.rmtree(partial, ignore_errors=True)
            make_tiny_weights(partial)
            # where a server caches its reference sets: each training server's first run reads the CT set built once
            # for the session instead of simulating it again (the set is keyed by what defines it: the same set)
            shutil.copytree(_built_ct_reference_set(root), partial / "reference_set")
            partial.rename(folder)
    finally:
        lock.release()
    return folder


def _session_folder(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The test session's temporary folder, shared by pytest-xdist's workers (each has one of its own below it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if hasattr(request.config, "workerinput") else root


def _built_ct_reference_set(root: Path) -> Path:
    """``root``'s folder holding the cache of the CT reference set, built by the first worker to ask under a lock."""
    from filelock import FileLock

    from lib.engines.reference_set import build_reference_set

    folder = root / "ct_reference_set"
    with FileLock(str(root / "ct_reference_set.lock")):
        build_reference_set("CT", folder)  # reads the cache another worker wrote
    return folder


@pytest.fixture(scope="session")
def ct_reference_set(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A folder holding the cache of the CT reference set (``lib.engines.reference_set``, seconds to simulate),
    built once per test session: pytest-xdist's workers share it, the first one builds it under a lock."""
    return _built_ct_reference_set(_session_folder(tmp_path_factory, request))


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path):
    """One MONAI Label server for the session (studies: ``mlserver.shared_studies``, ``max_voxels`` 3 M), for
    tests that leave it as they found it: nothing may train, publish or restore weights, save labels or upload
    images here (a test that does starts a server of its own), and a test that records reviews resets them."""
    from mlserver import copy_weights, shared_studies, start_server, stop_server

    root = tmp_path_factory.mktemp("shared_server")
    server = start_server(shared_studies(root / "studies"), copy_weights(tiny_weights, root / "model"),
                          root / "work", conf={"max_voxels": 3_000_000})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def realm():
    """A Keycloak-like realm on 127.0.0.1 (``realm.py``: an RSA key pair, the realm JSON, RS256 tokens), one per
    test module, for servers started with MONAI Label's authentication on."""
    from realm import Realm

    r = Realm()
    yield r
    r.stop()
