#!/usr/bin/env python
"""MONAI Label app: server round trip vs the bare model, and the server's peak memory on a large volume.

1. Overhead: a 512 x 512 x N CT volume (default N = 32, cut from the real thorax CT of ``../shared/data``) is
   denoised (a) in-process by ``lib.predict.denoise_array`` and (b) through the server with the official client
   (upload, infer, download of the float32 NIfTI result). Overhead = (b - a) / a, same weights, same machine,
   run one after the other (target < 15 %).
2. Memory: the server's resident memory (process and children, sampled every 50 ms) while it denoises a
   512 x 512 x M volume (default M = 300, the thorax slices repeated in mirror order), reported with the volume's
   own float32 size for scale.

The weights default to the served ADL CT weights; ``--untrained`` uses a full-size ADL network with random
weights instead (timing and memory do not depend on the weight values). Results: ``server_overhead.json`` in
``bench/results/server/`` (``--out``); the figures are also printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bench.isolation import RssPoller
from lib.runtime.clock import Stopwatch

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "adl_denoise"

THORAX_NAME = "ct_thorax_philips_2mm.nii.gz"


def ct_volume(slices: int, path: Path) -> Path:
    from lib.data.heldout import shared_data_dir

    image = sitk.ReadImage(str(shared_data_dir() / THORAX_NAME))
    array = sitk.GetArrayFromImage(image)
    order = np.concatenate([np.arange(array.shape[0]), np.arange(array.shape[0])[::-1]])
    index = np.resize(order, slices)
    out = sitk.GetImageFromArray(array[index])
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    sitk.WriteImage(out, str(path))
    return path


def untrained_weights(model_dir: Path) -> Path:
    import torch

    from lib.networks import EfficientUNetDenoiser
    from lib.engines import ADLTrainingConfig
    from lib.weights import export_weights

    torch.manual_seed(0)
    config = ADLTrainingConfig(modality="CT")
    network = EfficientUNetDenoiser(**config.generator_kwargs(), deep_supervision=False)
    return export_weights(network, model_dir / "pretrained_adl_ct.pt", config, training_record={"untrained": True})


def start_server(studies: Path, model_dir: Path, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TMPDIR=str(work), MONAI_LABEL_TRACKING_ENABLED="false")
    process = subprocess.Popen(
        [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
         "-i", "127.0.0.1", "-p", str(port), "--conf", "models", "adl", "--conf", "model_dir", str(model_dir),
         "--conf", "preload", "true"],
        cwd=REPO_ROOT, env=env, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError((work / "server.log").read_text()[-3000:])
        try:
            urllib.request.urlopen(f"{url}/info/", timeout=5).read()
            return process, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def measure(args: argparse.Namespace, parser: argparse.ArgumentParser, work: Path) -> dict:
    """The measurements (bare call, round trip, the server's memory) with scratch files in ``work``."""
    import torch
    from monailabel.client import MONAILabelClient

    from lib.weights import find_weights

    from lib.predict import denoise_array, load_denoiser

    model_dir = work / "model"
    model_dir.mkdir()
    if args.untrained:
        weights = untrained_weights(model_dir)
    else:
        source = args.weights or find_weights("adl", "CT")
        if source is None:
            parser.error("no ADL CT weights installed: pass --weights or --untrained")
        weights = model_dir / "pretrained_adl_ct.pt"
        weights.write_bytes(Path(source).read_bytes())
    studies = work / "studies"
    studies.mkdir()
    volume = ct_volume(args.slices, work / f"ct_{args.slices}.nii.gz")

    loaded = load_denoiser(weights)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(volume))).astype(np.float32)
    denoise_array(loaded, array[:1], "CT")  # warm-up
    watch = Stopwatch()
    denoise_array(loaded, array, "CT")
    bare = watch.seconds
    del loaded

    process, url = start_server(studies, model_dir, work)
    record: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available()},
                    "weights": str(weights if not args.untrained else "untrained full-size ADL"),
                    "slices": args.slices}
    try:
        client = MONAILabelClient(url, tmpdir=str(work))
        client.infer("adl", "", {"modality": "ct"}, file=str(ct_volume(1, work / "warm.nii.gz")))  # warm-up
        watch.restart()
        result_path, result = client.infer("adl", "", {"modality": "ct"}, file=str(volume))
        round_trip = watch.seconds
        os.unlink(result_path)
        record.update(bare_seconds=bare, round_trip_seconds=round_trip, server_task_seconds=result["seconds"],
                      overhead=(round_trip - bare) / bare)
        print(f"512x512x{args.slices}: bare {bare:.1f} s, through the server {round_trip:.1f} s "
              f"(task {result['seconds']:.1f} s): overhead {100 * record['overhead']:.1f} %", flush=True)
        if args.memory_slices:
            big = ct_volume(args.memory_slices, work / f"ct_{args.memory_slices}.nii.gz")
            poller = RssPoller(process.pid, 0.05, children=True)  # the server and its children
            idle = poller.rss()
            with poller:
                watch.restart()
                result_path, _ = client.infer("adl", "", {"modality": "ct"}, file=str(big))
                seconds = watch.seconds
            os.unlink(result_path)
            volume_mb = args.memory_slices * 512 * 512 * 4 / 2**20
            record.update(memory_slices=args.memory_slices, idle_rss_mb=idle / 2**20, peak_rss_mb=poller.peak / 2**20,
                          volume_float32_mb=volume_mb, memory_run_seconds=seconds)
            print(f"512x512x{args.memory_slices}: server RSS idle {idle / 2**20:.0f} MB, "
                  f"peak {poller.peak / 2**20:.0f} MB "
                  f"(the volume is {volume_mb:.0f} MB as float32), {seconds:.0f} s", flush=True)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--memory-slices", type=int, default=300, help="0 skips the memory run")
    parser.add_argument("--weights", type=Path, help="ADL CT weight file (default: the served one)")
    parser.add_argument("--untrained", action="store_true", help="full-size ADL with random weights")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "server")
    args = parser.parse_args(argv)

    from bench.pairs import require_shared_data

    require_shared_data(THORAX_NAME)
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"--weights: no such file: {args.weights}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="server_bench_"))
    try:
        record = measure(args, parser, work)
    except BaseException:
        print(f"kept the scratch folder {work}: its server.log says what the server did", file=sys.stderr)
        raise
    # the copies of the weights and the CT volumes (300 slices: 300 MB and its result) do not stay in /tmp
    shutil.rmtree(work, ignore_errors=True)
    (args.out / "server_overhead.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
