"""The README's two commands exist, CI runs the test command, and ``run.sh`` runs the main job on the sample data
and then serves the app."""
from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import numpy as np
import pytest

import processes
from conftest import REPO_ROOT, SAMPLE_STUDIES
from mlserver import free_port


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


@pytest.mark.server
@pytest.mark.slow
def test_run_sh_runs_the_main_job_then_serves_the_app_on_loopback(tmp_path):
    """./run.sh end to end (set-up is idempotent, so this re-checks it) on the smallest sample study: it prints
    the study's PSNR row and writes the denoised file, then serves the MONAI Label app on 127.0.0.1 with the
    sample studies; the test stops it (and everything it started) as a process group."""
    port = free_port()
    log_path = tmp_path / "run.log"
    output = REPO_ROOT / "sample_data" / "output" / "ct_head_pydicom693_ld25_gaussian.nii.gz"
    started = time.time()
    process = processes.start_service(["./run.sh", "--only", "ct_head_pydicom693", "--model", "gaussian"], log_path,
                                      f"http://127.0.0.1:{port}/info/", 600, cwd=REPO_ROOT,
                                      env=dict(os.environ, ADL_PORT=str(port)))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=30) as response:
            info = json.loads(response.read())
        assert set(info["models"]) == {"adl", "tddl_gcn", "nlm"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/datastore/?output=all", timeout=30) as response:
            studies = set(json.loads(response.read())["objects"])
        assert "ct_head_pydicom693_ld25" in studies and not any(s.endswith(("693", "colin27")) for s in studies)
    finally:
        processes.stop(process)
    log = log_path.read_text(errors="replace")
    row = next(line for line in log.splitlines() if line.startswith("ct_head_pydicom693"))
    assert row.split()[1] == "gaussian"
    psnr_noisy, psnr_denoised = (float(v) for v in row.split()[3:5])
    assert psnr_denoised > psnr_noisy
    assert output.is_file() and output.stat().st_mtime >= started - 1  # written by this run (it overwrites)


@pytest.mark.parametrize("cwd", ["scripts", "repo", "elsewhere"])
def test_setup_slicer_env_recognises_its_venv_from_any_current_folder(cwd, tmp_path):
    """``scripts/setup_slicer_env.sh`` keeps a complete .venv-slicer (its stamp names the script's hash) whatever
    folder it is started from; run as ``./setup_slicer_env.sh`` inside scripts/ it hashed no file, so it removed the
    1 GB environment and installed it again."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    script = repo / "scripts" / "setup_slicer_env.sh"
    shutil.copy2(REPO_ROOT / "scripts" / "setup_slicer_env.sh", script)
    digest = subprocess.run(["sha1sum", str(script)], capture_output=True, text=True, check=True).stdout[:12]
    stamp = repo / ".venv-slicer" / f".installed-{digest}"
    stamp.parent.mkdir()
    stamp.touch()
    (tmp_path / "elsewhere").mkdir()
    folder = {"scripts": repo / "scripts", "repo": repo, "elsewhere": tmp_path / "elsewhere"}[cwd]
    command = {"scripts": "./setup_slicer_env.sh", "repo": "scripts/setup_slicer_env.sh",
               "elsewhere": str(script)}[cwd]
    # PYTHON=false: a reinstall, had it been tried, fails at once instead of downloading slicer-core
    done = subprocess.run(["bash", command], cwd=folder, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON="false"))
    assert done.returncode == 0
    assert stamp.is_file(), done.stdout + done.stderr
    assert done.stdout == "" and done.stderr == ""


#: READMEs whose code blocks are checked below (the top-level README.md belongs in this list too once its
#: ``train --model tddl_gcn`` example names ``--modality ct``, which ``train`` requires)
CHECKED_READMES = ("README.md", "apps/adl_denoise/README.md", "apps/adl_denoise/model/README.md", "slicer_extension/README.md",
                   "bench/README.md")


def readme_cli_commands() -> list[tuple[str, str]]:
    """(README, the arguments after ``cli.py``) of every command line in the READMEs' code blocks."""
    commands = []
    for readme in CHECKED_READMES:
        text = (REPO_ROOT / readme).read_text()
        for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                match = re.search(r"cli\.py (.*)$", re.split(r"\s#\s", line)[0])
                if match and "VERB" not in line and "..." not in line and "$" not in match.group(1) \
                        and '"' not in match.group(1):
                    commands.append((readme, match.group(1).strip()))
    return commands


def test_every_cli_command_in_the_readmes_parses():
    """Each ``cli.py VERB ...`` command shown in a README has its verb, its flags and every required flag (a
    documented recipe once lacked --output, which train requires)."""
    import contextlib
    import io
    import shlex

    from conftest import import_cli

    cli = import_cli()

    commands = readme_cli_commands()
    assert len(commands) >= 5
    for readme, arguments in commands:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.build_parser().parse_args(shlex.split(arguments))
            except SystemExit:
                raise AssertionError(f"{readme}: cli.py {arguments}\n{errors.getvalue()}") from None


def test_run_sh_main_job_refuses_a_bad_model_or_an_unknown_study_in_one_line():
    """``./run.sh --model X --only Y`` hands its arguments to ``scripts/denoise_samples.py``: a model cli.py refuses
    gave a CalledProcessError traceback, and ``--only`` matching no study printed an empty table and went on to
    serve as if the job had run."""
    import subprocess
    import sys

    script = str(REPO_ROOT / "scripts" / "denoise_samples.py")
    done = subprocess.run([sys.executable, script, "--only", "no_such_study"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "matches no sample study" in done.stderr and "ct_head_pydicom693" in done.stderr
    done = subprocess.run([sys.executable, script, "--model", "no_such_model", "--only", "ct_head_pydicom693"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: cli.py denoise failed on ct_head_pydicom693 (exit status 2)"
