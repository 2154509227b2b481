"""lib.runtime.cpu_memory: the CPU path reuses freed feature-map memory instead of faulting in fresh pages.

Each check denoises the 512 x 512 sample quarter-dose CT slice twice with the shipped ADL weights in a fresh
interpreter (the allocator settings are process-wide and applied once) and counts the page faults of the second
pass: in glibc's default allocator every full-resolution feature map (25-75 MB) is a fresh mmap, faulted in page by
page; kept in the heap, they are reused. The probe uses oneDNN's convolutions: NNPACK's (used on CPUs without
native bfloat16) allocate buffers of their own, whose faults depend on their order more than on these settings.
"""
from __future__ import annotations

import os
import sys

import pytest

import processes
from conftest import APP_DIR, SAMPLE_STUDIES

_PROBE = """
import resource, sys
from lib.runtime.cpu_memory import keep_freed_cpu_memory
from lib.imaging import read_volume
from lib.predict import denoise_array, load_denoiser
model = load_denoiser(sys.argv[1] + "/model/pretrained_adl_ct.pt")
noisy = read_volume(sys.argv[2], modality="CT").array
first = denoise_array(model, noisy, device="cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = denoise_array(model, noisy, device="cpu")
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(keep_freed_cpu_memory(), faults, float(abs(second - first).max()))
"""

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="the settings apply to glibc on Linux only",
)


def _second_pass_faults(**env: str) -> tuple[bool, int]:
    sample = SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz"
    result = processes.run([sys.executable, "-c", _PROBE, APP_DIR, sample], 600,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "ADL_NNPACK_CONVOLUTIONS": "0", **env})
    assert result.returncode == 0, result.stderr[-2000:]
    applied, faults, difference = result.stdout.split()
    assert float(difference) == 0.0  # where the memory comes from never changes the result
    return applied == "True", int(faults)


@pytest.mark.slow
@linux_glibc
def test_denoising_a_512_slice_again_reuses_the_freed_feature_map_memory() -> None:
    applied, kept = _second_pass_faults()
    switched_off, default = _second_pass_faults(ADL_KEEP_FREED_CPU_MEMORY="0")
    assert applied and not switched_off
    assert default > 100_000, f"glibc's default allocator faulted only {default} pages (expected fresh mmaps)"
    assert kept * 5 < default, f"{kept} page faults with freed memory kept vs {default} without"
