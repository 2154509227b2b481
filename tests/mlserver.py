"""Helpers for tests that need a real MONAI Label server process on loopback, and small real weights.

The server is started as ``python -m monailabel.main start_server`` (the venv's Python, not the ``monailabel``
shell script that runs whatever ``python`` is first on PATH), bound to 127.0.0.1 on a free port, in a process
group of its own (``processes.py``), and stopped as a group. Weights come from the project's real trainers run
for a few steps on a real CT / MR slice: small, fast, and the same file format as shipped weights; the session
makes them once (the ``tiny_weights`` fixture in ``conftest.py``) and every server gets its own copy.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import processes
from conftest import APP_DIR, REPO_ROOT, SAMPLE_STUDIES
from lib.runtime.switches import TRUE_WORDS  # the words MONAI Label's settings read as true

TINY_ADL = dict(filters=(8, 12, 16, 20), disc_filters=(4, 6, 8, 10), enhancer_filters=4)
TINY_GCN = dict(features=8, k=4, search_window=7, n_blocks=1, layers_per_block=1, rank=2)
#: the tiny GCN file's own restoration width (lib.weights.format.RESTORATION_KEY); the tiny ADL files name none
TINY_GCN_RESTORATION = {"sigma_px": 0.6, "chosen": "test weights"}


#: ports already handed out by this process (never twice: a server started with one may not be listening yet)
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port that nothing listens on now, for a server this process is about to start. Each pytest-xdist
    worker (``./test.sh`` runs two) draws from its own block of 1000 ports below Linux's ephemeral range (32768 and
    up, where client sockets are given theirs): with ``bind(("127.0.0.1", 0))`` two workers could be given the same
    port in the seconds between this check and their servers' binds."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    first = 20000 + 1000 * (index % 12)
    for port in random.Random().sample(range(first, first + 1000), 1000):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use (or in TIME_WAIT without SO_REUSEADDR): another one
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {first}-{first + 999}")


def make_tiny_weights(model_dir: Path, steps: int = 25) -> Path:
    """pretrained_adl_ct.pt, pretrained_adl_mr.pt and pretrained_tddl_gcn_ct.pt in ``model_dir``, trained for
    ``steps`` steps on 32x32 patches of the sample CT / MR slices (seconds on a CPU)."""
    import torch

    from lib.data import ADLPatchDataset, SyntheticNoiseSource
    from lib.engines import ADLTrainingConfig, GCNTrainingConfig, train_adl, train_gcn
    from lib.weights import export_weights, scaling_rule_for

    model_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sources = {
            "CT": SyntheticNoiseSource([SAMPLE_STUDIES / "ct_head_pydicom693.nii.gz"], "CT", "gaussian",
                                       noise_level_range=(20, 40), seed=0, progress=False),
            "MR": SyntheticNoiseSource([SAMPLE_STUDIES / "mr_head_colin27.nii.gz"], "MR", "rician", seed=0,
                                       progress=False),
        }
        for modality, source in sources.items():
            dataset = ADLPatchDataset(source, 2, 32, samples_per_epoch=64, seed=0)
            config = ADLTrainingConfig(modality=modality, patch_size=32, batch_size=4, steps_g_warmup=steps,
                                       steps_d_warmup=0, steps_adversarial=0, lr_warmup=1e-3, device="cpu",
                                       validation_every=0, checkpoint_every=0, **TINY_ADL)
            result = train_adl(config, dataset, progress=False)
            export_weights(result.generator, model_dir / f"pretrained_adl_{modality.lower()}.pt", config,
                           scaling_rule_for(modality), result.training_record())
            if modality == "CT":
                gcn = GCNTrainingConfig(modality="CT", patch_size=32, batch_size=4, steps=steps, lr=1e-3, device="cpu",
                                        validation_every=0, checkpoint_every=0, **TINY_GCN)
                trained = train_gcn(gcn, dataset, progress=False)
                # a restoration width of its own, as the shipped GCN file has (another than the CT default)
                export_weights(trained.network, model_dir / "pretrained_tddl_gcn_ct.pt", gcn, scaling_rule_for("CT"),
                               trained.training_record(), low_frequency_restoration=TINY_GCN_RESTORATION)
    finally:
        torch.set_num_threads(threads)
    return model_dir


def copy_weights(source: Path, model_dir: Path) -> Path:
    """A server's own copy of a weights folder: fine-tuning publishes into its model folder."""
    shutil.copytree(source, model_dir)
    return model_dir


def write_crop(source: Path, target: Path, z: slice | None = None, yx: tuple[slice, slice] | None = None) -> Path:
    """A sub-volume of a real study (keeps its geometry), as NIfTI."""
    image = sitk.ReadImage(str(source))
    if image.GetDimension() == 3:
        size = image.GetSize()
        zs = z or slice(0, size[2])
        ys, xs = yx or (slice(0, size[1]), slice(0, size[0]))
        image = image[xs, ys, zs]
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(target))
    return target


def shared_studies(studies: Path) -> Path:
    """Three real low-dose CT studies (a 512x512 slice and two 4-slice slabs of the head) and one MR slab:
    ``ct_slice_a``, ``ct_slab_b``, ``ct_slab_c``, ``mr_slab_d`` (NIfTI)."""
    studies.mkdir(parents=True)
    shutil.copy(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", studies / "ct_slice_a.nii.gz")
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", studies / "ct_slab_b.nii.gz", z=slice(40, 44))
    write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", studies / "ct_slab_c.nii.gz", z=slice(70, 74))
    write_crop(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz", studies / "mr_slab_d.nii.gz", z=slice(80, 83))
    return studies


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    studies: Path
    model_dir: Path
    cwd: Path = REPO_ROOT

    def log_tail(self, chars: int = 4000) -> str:
        return processes.log_tail(self.log_path, chars)

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(studies: Path | str, model_dir: Path, work: Path, conf: dict | None = None,
                 timeout: float = 600.0, env: dict[str, str] | None = None, cwd: Path | None = None,
                 wrap: Callable[[list], list] | None = None) -> Server:
    """Start the app on a free loopback port; returns once ``/info/`` answers (RuntimeError otherwise, with the
    server stopped). ``env``: extra environment variables of the server (e.g. ``MONAI_LABEL_AUTH_ENABLE``), over
    the ones set here; ``cwd``: the server's working directory (default the repository); ``wrap``: the command that
    runs the server's command (e.g. :func:`processes.on_tmpfs`), given it."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
            "-i", "127.0.0.1", "-p", str(port), "--conf", "models", "all", "--conf", "model_dir", str(model_dir)]
    for key, value in (conf or {}).items():
        args += ["--conf", key, str(value)]
    server_env = dict(os.environ, TMPDIR=str(work / "tmp"), MONAI_LABEL_TRACKING_ENABLED="false",
                      OMP_NUM_THREADS="1", MONAI_LABEL_SESSION_PATH=str(work / "sessions"),
                      MONAI_LABEL_DICOMWEB_CACHE_PATH=str(work / "dicomweb_cache"))
    server_env.update({key: str(value) for key, value in (env or {}).items()})
    url = f"http://127.0.0.1:{port}"
    # with authentication on, /info/ needs a token: /auth/ (public) answers once the app is up
    auth_on = server_env.get("MONAI_LABEL_AUTH_ENABLE", "").strip().lower() in TRUE_WORDS
    ready = f"{url}/auth/" if auth_on else f"{url}/info/"
    cwd = cwd or REPO_ROOT
    process = processes.start_service(wrap(args) if wrap else args, work / "server.log", ready, timeout, cwd=cwd,
                                      env=server_env)
    return Server(url, process, work / "server.log", studies, model_dir, cwd)


def stop_server(server: Server) -> None:
    """Stop the server and everything it started (its training subprocesses are in its process group)."""
    processes.stop(server.process)


def queue_hand_outs(url: str, modality: str, timeout: float = 600.0, most: int = 50) -> list[str]:
    """The ids the server's review queue (``POST /activelearning/next_unreviewed``) hands out in turn for
    ``modality`` ("" for any), each request excluding those handed out before it, until it hands out none (at most
    ``most``)."""
    import requests

    handed: list[str] = []
    for _ in range(most):
        answer = requests.post(f"{url}/activelearning/next_unreviewed",
                               json={"modality": modality, "exclude": handed}, timeout=timeout)
        assert answer.status_code == 200, answer.text
        if not answer.json().get("id"):
            break
        handed.append(answer.json()["id"])
    return handed


def read_array(path: str | Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)
