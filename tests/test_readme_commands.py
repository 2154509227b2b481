"""The README's two commands exist, CI runs the test command, and the main job runs on the sample data."""
from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import REPO_ROOT, SAMPLE_STUDIES


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    assert readme_commands() == ["./run.sh", "./test.sh"]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec \./test\.sh\s*$", ci, re.M), "CI must run exactly the README's test command"
    for script in ("run.sh", "test.sh", ".ci/run", "scripts/setup_env.sh"):
        assert os.access(REPO_ROOT / script, os.X_OK), f"{script} must be executable"


def test_sample_data_pairs_are_real_and_aligned():
    from lib.imaging import read_volume

    manifest = json.loads((SAMPLE_STUDIES / "manifest.json").read_text())
    modalities = {pair["modality"] for pair in manifest["pairs"]}
    assert {"CT", "MR"} <= modalities
    for pair in manifest["pairs"]:
        reference = read_volume(SAMPLE_STUDIES / pair["reference"])
        noisy = read_volume(SAMPLE_STUDIES / pair["noisy"])
        assert noisy.array.shape == reference.array.shape
        np.testing.assert_allclose(noisy.spacing, reference.spacing)
        np.testing.assert_allclose(noisy.origin, reference.origin)
        difference = noisy.array.astype(np.float64) - reference.array
        if pair["modality"] == "CT":  # quarter dose calibrated to 35 HU of added soft-tissue noise
            tissue = (reference.array > 0) & (reference.array < 80)
            assert abs(np.median(difference[tissue])) < 3.0
            assert 25.0 < difference[tissue].std() < 45.0
        else:  # Rician noise at 5 % of the maximum
            bright = reference.array > 0.3 * reference.array.max()
            assert 0.03 < difference[bright].std() / reference.array.max() < 0.07


@pytest.mark.timeout(600)
def test_run_sh_main_job_on_sample_data():
    """./run.sh end to end (set-up is idempotent, so this re-checks it) on the smallest sample study."""
    result = subprocess.run(["./run.sh", "--no-server", "--only", "ct_head_pydicom693", "--model", "gaussian"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("ct_head_pydicom693"))
    assert row.split()[1] == "gaussian"
    psnr_noisy, psnr_denoised = (float(v) for v in row.split()[3:5])
    assert psnr_denoised > psnr_noisy
    assert (REPO_ROOT / "sample_data" / "output" / "ct_head_pydicom693_ld25_gaussian.nii.gz").is_file()


@pytest.mark.timeout(600)
def test_run_sh_then_serves_the_app_on_loopback(tmp_path):
    """Without --no-server, ./run.sh ends by serving the MONAI Label app on 127.0.0.1 with the sample studies;
    it answers /info and is stopped here by the PID of the process this test started."""
    import signal
    import time
    import urllib.request

    from mlserver import free_port

    port = free_port()
    log = open(tmp_path / "run.log", "wb")
    process = subprocess.Popen(["./run.sh", "--only", "ct_head_pydicom693", "--model", "gaussian"], cwd=REPO_ROOT,
                               env=dict(os.environ, ADL_PORT=str(port)), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 540
        info = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=5) as response:
                    info = json.loads(response.read())
                    break
            except OSError:
                time.sleep(1)
        assert info is not None, (tmp_path / "run.log").read_text()[-3000:]
        assert set(info["models"]) == {"adl", "tddl_gcn", "nlm"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/datastore/?output=all", timeout=10) as response:
            studies = set(json.loads(response.read())["objects"])
        assert "ct_head_pydicom693_ld25" in studies and not any(s.endswith(("693", "colin27")) for s in studies)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
