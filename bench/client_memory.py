"""Peak memory of the Slicer module's server client (``ADLDenoiseLib/client.py``) on a large volume's round trip.

Usage (repository root; starts its own MONAI Label server on 127.0.0.1 with the app's installed weights)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/client_memory.py [--shape 300 512 512] [--infer nlm] [--old [REV]]

What is measured, in a child process that imports only the client (stdlib only, as in Slicer):

* ``upload``: ``upload_image`` of a float32 NIfTI (``.nii``, uncompressed: 300 MiB at 300 x 512 x 512) to
  ``PUT /datastore/image``;
* ``download``: ``download_image`` of it back (``GET /datastore/image``), checked byte-identical;
* ``denoise`` (``--infer MODEL``): ``POST /infer/MODEL?output=all`` with the file, the multipart answer (the
  result volume, float32 ``.nii``) parsed to disk. Slow on a CPU for 300 slices: off unless asked.

Per operation: wall seconds, the tracemalloc peak (Python allocations: every ``bytes`` object of the payload
shows up here) and the growth of the process's peak RSS (``VmHWM``, reset before each operation through
``/proc/self/clear_refs`` where the kernel allows it). ``--old [REV]`` also runs the client of git revision REV (default
``HEAD``; the pre-streaming client of ``bench/README.md``'s table is ``1f8fcf8^``) for comparison.

The same child (``--child SPEC.json``) is used by ``tests/test_slicer_client.py`` with a smaller file.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT = REPO_ROOT / "slicer_extension" / "ADLDenoise" / "ADLDenoiseLib" / "client.py"


# ------------------------------------------------------------------------------------------------ the child
# (/proc readers of its own, not bench.isolation's: that module imports numpy, which would count as the client's)
def _vm(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (VmHWM: peak RSS, VmRSS: current RSS)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> dict:
    """Run ``spec["ops"]`` with the client module at ``spec["client"]``; returns the figures per operation."""
    module_spec = importlib.util.spec_from_file_location("denoise_client_under_test", spec["client"])
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    extra = {"token": spec["token"]} if spec.get("token") else {}  # (the pre-streaming client had no token)
    client = module.DenoiseServerClient(spec["url"], timeout=3600, **extra)
    results = []
    for op in spec["ops"]:
        reset = _reset_peak_rss()
        rss_before, hwm_before = _vm("VmRSS"), _vm("VmHWM")
        tracemalloc.start()
        start = time.perf_counter()
        if op["op"] == "upload":
            answer = client.upload_image(op["file"], op["id"])
        elif op["op"] == "download":
            answer = str(client.download_image(op["id"], op["dir"]))
        elif op["op"] == "denoise":
            path, info = client.denoise(op["model"], op["file"], op["dir"], op.get("params"))
            answer = [str(path), info]
        else:
            raise ValueError(f"unknown operation {op['op']!r}")
        seconds = time.perf_counter() - start
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        results.append({"op": op["op"], "answer": answer, "seconds": round(seconds, 2),
                        "tracemalloc_peak_mib": round(traced_peak / 2**20, 2),
                        "rss_before_mib": round(rss_before, 1),
                        "peak_rss_growth_mib": round(_vm("VmHWM") - (rss_before if reset else hwm_before), 1),
                        "peak_rss_reset": reset})
    return {"results": results, "final_peak_rss_mib": round(_vm("VmHWM"), 1)}


def run_child(spec: dict, timeout: float = 3600.0) -> dict:
    """Run :func:`child` in a fresh interpreter that imports only the client (no numpy etc.: as in Slicer, the
    process's memory is the client's); returns its figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        # (a single process with no children of its own: subprocess's timeout kill is enough)
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", handle.name],
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"client child failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ the bench
def write_volume(path: Path, shape: tuple[int, int, int]) -> Path:
    """A CT-like float32 volume (HU: a 40 HU disc in air at -1000, with noise), uncompressed NIfTI, slice by slice."""
    import nibabel as nib
    import numpy as np

    z, y, x = shape
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:y, 0:x]
    disc = np.where((yy - y / 2) ** 2 + (xx - x / 2) ** 2 < (0.4 * min(x, y)) ** 2, 40.0, -1000.0).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((x, y, z))
    header.set_zooms((0.7, 0.7, 1.0))
    header.set_qform(np.diag([0.7, 0.7, 1.0, 1.0]), code=1)
    header.set_sform(np.diag([0.7, 0.7, 1.0, 1.0]), code=1)
    with open(path, "wb") as out:
        header.write_to(out)
        out.write(b"\0" * (int(header["vox_offset"]) - out.tell()))
        for k in range(z):  # NIfTI order: x fastest, then y, then z
            out.write((disc + rng.normal(0, 20, disc.shape).astype(np.float32)).T.astype("<f4").tobytes(order="F"))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--infer", default=None, help="also denoise with this model (nlm, adl, tddl_gcn)")
    parser.add_argument("--old", nargs="?", const="HEAD", default=None, metavar="REV",
                        help="also measure the client of this git revision (default HEAD; the pre-streaming client of "
                             "the README's table: 1f8fcf8^)")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return 0

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from mlserver import start_server, stop_server  # the tests' server helper: loopback, own process group

    old_client = None
    if args.old:  # before any work: a wrong revision is a usage error, not a traceback after writing the volume
        shown = subprocess.run(["git", "show", f"{args.old}:slicer_extension/ADLDenoise/ADLDenoiseLib/client.py"],
                               cwd=REPO_ROOT, capture_output=True, text=True)
        if shown.returncode != 0:
            parser.error(f"--old {args.old}: {shown.stderr.strip()}")
        old_client = shown.stdout
    work = Path(tempfile.mkdtemp(prefix="client_memory_"))
    volume = write_volume(work / "big.nii", tuple(args.shape))
    size_mib = volume.stat().st_size / 2**20
    clients = {"new": str(CLIENT)}
    if args.old:
        old = work / "client_old.py"
        old.write_text(old_client)
        clients[f"old (git {args.old})"] = str(old)
    server = None
    if args.url:
        url = args.url
    else:
        studies = work / "studies"
        studies.mkdir()
        model_dir = work / "model"  # empty: nlm needs no weights, and the shipped folder is left alone
        model_dir.mkdir()
        server = start_server(studies, model_dir, work / "server",
                              conf={"max_voxels": int(2 * args.shape[0] * args.shape[1] * args.shape[2])})
        url = server.url
    figures: dict = {"volume": {"shape_zyx": list(args.shape), "dtype": "float32", "file_mib": round(size_mib, 1)},
                     "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
                     "clients": {}}
    try:
        for name, path in clients.items():
            image_id = f"big_{len(figures['clients'])}"
            ops = [{"op": "upload", "file": str(volume), "id": image_id},
                   {"op": "download", "id": image_id, "dir": str(work / f"download_{image_id}")}]
            if args.infer:
                ops.append({"op": "denoise", "model": args.infer, "file": str(volume),
                            "dir": str(work / f"result_{image_id}"),
                            "params": {"modality": "ct", "result_extension": ".nii", "result_dtype": "float32"}})
            result = run_child({"client": path, "url": url, "ops": ops})
            downloaded = Path(result["results"][1]["answer"])
            result["download_identical"] = _same_bytes(downloaded, volume)
            for item in result["results"]:
                if item["op"] == "denoise":
                    item["result_mib"] = round(Path(item["answer"][0]).stat().st_size / 2**20, 1)
            figures["clients"][name] = result
            print(f"\n{name} client, {size_mib:.0f} MiB volume {tuple(args.shape)} float32:")
            for item in result["results"]:
                print(f"  {item['op']:9s} {item['seconds']:8.1f} s   tracemalloc peak {item['tracemalloc_peak_mib']:8.1f}"
                      f" MiB   peak RSS growth {item['peak_rss_growth_mib']:8.1f} MiB"
                      + (f"   result {item['result_mib']} MiB" if "result_mib" in item else ""))
            print(f"  download byte-identical: {result['download_identical']};"
                  f" child's final peak RSS {result['final_peak_rss_mib']} MiB")
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(work, ignore_errors=True)  # about 4x the volume on disk
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    sys.exit(main())
