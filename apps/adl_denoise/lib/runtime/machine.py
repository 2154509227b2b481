"""A description of the machine a figure was measured or a model was trained on (benchmark reports, training
records)."""
from __future__ import annotations

import os
import platform
from typing import Any, Mapping

__all__ = ["describe_machine", "library_version", "machine_line"]

_VERSIONS_OF = ("numpy", "scipy", "skimage", "torch", "monai", "bm3d", "bm4d", "SimpleITK")
#: import name -> distribution name where they differ
_DISTRIBUTIONS = {"skimage": "scikit-image"}


def library_version(name: str) -> str | None:
    """The installed version of library ``name`` (its import name) from its distribution's metadata, or None where
    it is not installed. Read from the metadata, not by importing: importing ``monai`` alone takes about 3 s, which a
    command that needs nothing else of it (``learn-noise``) would pay only to write the version into its file."""
    from importlib import metadata

    try:
        return metadata.version(_DISTRIBUTIONS.get(name, name))
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            mem = {line.split(":")[0]: float(line.split()[1]) for line in handle if line.split()}
        return round(mem.get("MemTotal", 0.0) / 2**20, 1)
    except OSError:
        return None


def describe_machine() -> dict[str, Any]:
    """CPU model and counts, memory, GPUs, thread settings, load and library versions, as plain JSON values."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_model": _cpu_model(), "logical_cpus": os.cpu_count()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cpus"] = os.cpu_count()
    info["ram_gb"] = _ram_gb()
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    info["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average_at_start"] = None
    info["versions"] = {name: library_version(name) for name in _VERSIONS_OF}
    try:
        import torch

        info["cuda_available"] = bool(torch.cuda.is_available())
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if info["cuda_available"] else []
        info["torch_threads"] = torch.get_num_threads()
        # which CPU path the 2D ADL network takes here: its time per slice differs about 2x between them
        from .cpu_convolution import nnpack_available
        from .precision import cpu_has_native_bf16

        info["cpu_inference"] = ("bfloat16 (native)" if cpu_has_native_bf16()
                                 else "float32, NNPACK convolutions" if nnpack_available() else "float32")
    except Exception:  # noqa: BLE001
        info["cuda_available"], info["gpus"] = False, []
    info["gpu"] = info["gpus"][0] if info["gpus"] else None
    return info


def machine_line(machine: Mapping[str, Any]) -> str:
    """One line for a report, e.g. ``AMD EPYC ..., 2 usable of 2 logical CPUs, 23.5 GB RAM, no GPU ...``."""
    gpu = machine.get("gpu") or "no GPU (CUDA not available)"
    return (f"{machine.get('cpu_model')}, {machine.get('usable_cpus')} usable of {machine.get('logical_cpus')} "
            f"logical CPUs, {machine.get('ram_gb')} GB RAM, {gpu}; Python {machine.get('python')}, "
            f"torch {(machine.get('versions') or {}).get('torch')}, OMP_NUM_THREADS={machine.get('omp_num_threads')}"
            + (f"; CPU inference: {machine['cpu_inference']}" if machine.get("cpu_inference") else ""))
