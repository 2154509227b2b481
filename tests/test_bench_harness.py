"""End-to-end run of the benchmark harness (bench/) on a tiny real CT pair, and the held-out guard."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _real_ct_crop() -> tuple[np.ndarray, float]:
    """The centre 128x128 of a real 512x512 head CT slice from pydicom-data, in HU, and its pixel size."""
    import data_store
    import pydicom

    path = os.path.join(os.path.dirname(data_store.__file__), "data", "693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu[192:320, 192:320].copy(), float(ds.PixelSpacing[0])


# A command-line denoiser implemented as a tiny python script that works through NIfTI files.
_CLI_GAUSS = (
    "python -c \"import sys, SimpleITK as s, scipy.ndimage as nd; im = s.ReadImage(sys.argv[1]); "
    "o = s.GetImageFromArray(nd.gaussian_filter(s.GetArrayFromImage(im), (0, 1.0, 1.0))); o.CopyInformation(im); "
    "s.WriteImage(o, sys.argv[2])\" {input} {output}"
)


@pytest.fixture(scope="module")
def tiny_pair():
    from bench.pairs import Pair
    from lib.noise import LowDoseCTSettings, simulate_low_dose_ct

    ref, px = _real_ct_crop()
    settings = LowDoseCTSettings(dose_fraction=0.25, full_dose_photons=2e4, reconstruction_filter="hann")
    noisy = simulate_low_dose_ct(ref, px, settings, seed=0)
    noisy = np.asarray(noisy, np.float32)
    assert noisy.shape == ref.shape and np.isfinite(noisy).all()
    added = float(np.std(noisy - ref))
    assert 10.0 < added < 200.0, f"unexpected simulated noise std {added:.1f} HU"
    return Pair(name="pydicom_693_crop", modality="CT", noisy=noisy, reference=ref, spacing=(px, px, 5.0),
                meta={"simulation": {"full_dose_photons": 2e4, "dose_fraction": 0.25, "seed": 0}})


def test_harness_end_to_end(tiny_pair, tmp_path):
    from bench.baselines import gaussian, nlm, noisy
    from bench.harness import evaluate
    from bench.isolation import CliDenoiser

    res = evaluate(
        [tiny_pair],
        {"noisy": noisy, "gaussian": gaussian, "nlm": nlm, "cli_gauss": CliDenoiser(_CLI_GAUSS)},
        tmp_path,
        timeout_s=120,
        log=None,
    )
    md = (tmp_path / "results.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    fig = tmp_path / "pydicom_693_crop_comparison.png"
    assert fig.is_file() and fig.stat().st_size > 10_000
    assert "| gaussian |" in md and "| cli_gauss |" in md and "Machine:" in md
    assert data["machine"]["cpu_model"]

    entries = res["pairs"][0]["denoisers"]
    for name, e in entries.items():
        assert e["ok"], f"{name} failed: {e.get('error')}"
        assert e["time_s"] > 0 and e["time_per_slice_s"] > 0
        assert e["peak_rss_mb"] > 0
        assert e["peak_mb"] > 0, f"{name}: peak memory {e['peak_mb']}"
        for w in ("soft_tissue", "wide"):
            assert set(e["windows"][w]) >= {"psnr", "ssim", "rmse"}
        assert e["uniform"]["n_rois"] > 0
    p = {n: e["windows"]["soft_tissue"]["psnr"] for n, e in entries.items()}
    assert p["gaussian"] > p["noisy"] + 1.0
    assert p["nlm"] > p["noisy"] + 1.0
    # the CLI runs the same filter as the gaussian baseline, through NIfTI float32 files
    assert p["cli_gauss"] == pytest.approx(p["gaussian"], abs=0.05)
    # the smoothing lowers the noise std in the uniform regions
    assert entries["gaussian"]["uniform"]["noise_std"] < entries["noisy"]["uniform"]["noise_std"]
    assert entries["cli_gauss"]["method"] == "CLI process"
    assert entries["gaussian"]["method"] == "spawn worker"


def test_weight_file_denoiser_runs_in_the_worker(tiny_pair, tmp_path):
    """`run_benchmark.py --weights NAME=FILE`: a learned model (here the shipped TDDL-GCN) scored in-process."""
    from bench.harness import evaluate
    from bench.run_benchmark import build_denoisers

    shipped = REPO_ROOT / "apps" / "adl_denoise" / "model" / "pretrained_tddl_gcn_ct.pt"
    denoisers = build_denoisers("noisy", [], [f"gcn={shipped}"])
    res = evaluate([tiny_pair], denoisers, tmp_path, figures=False, log=None)
    entries = res["pairs"][0]["denoisers"]
    assert entries["gcn"]["ok"] and entries["gcn"]["method"] == "spawn worker", entries["gcn"].get("error")
    gain = entries["gcn"]["windows"]["soft_tissue"]["psnr"] - entries["noisy"]["windows"]["soft_tissue"]["psnr"]
    assert gain > 0.5, f"shipped TDDL-GCN gained {gain:.2f} dB"
    with pytest.raises(SystemExit, match="NAME=FILE"):
        build_denoisers("noisy", [], [f"gcn={tmp_path / 'missing.pt'}"])


def test_served_learned_denoisers_apply_each_weight_files_own_default_width(tiny_pair):
    """``adl_lfr`` / ``tddl_gcn_lfr`` are what the app serves: the network plus the restoration at the width its
    weight file names (the TDDL-GCN CT file's differs from ADL's)."""
    from bench.learned import _installed, adl, adl_lfr, tddl_gcn, tddl_gcn_lfr
    from lib.lesions.low_frequency_restoration import default_sigma_px, restore_low_frequencies
    from lib.weights.format import restoration_of_file

    noisy = tiny_pair.noisy
    widths = {model: default_sigma_px("CT", restoration_of_file(_installed(model, "CT")))
              for model in ("adl", "tddl_gcn")}
    assert widths["tddl_gcn"] != widths["adl"]
    for served, network, model in ((tddl_gcn_lfr, tddl_gcn, "tddl_gcn"), (adl_lfr, adl, "adl")):
        expected = restore_low_frequencies(noisy, network(noisy, tiny_pair.spacing, "CT"), widths[model])
        np.testing.assert_allclose(served(noisy, tiny_pair.spacing, "CT"), expected, atol=1e-3, err_msg=model)


def test_table_states_psnr_gain_and_time_ratio_against_bm3d_of_the_same_run(tiny_pair, tmp_path):
    from bench.baselines import bm3d, gaussian, noisy
    from bench.harness import evaluate
    from bench.report import pair_table

    res = evaluate([tiny_pair], {"noisy": noisy, "gaussian": gaussian, "bm3d": bm3d}, tmp_path, figures=False,
                   log=None)
    pres = res["pairs"][0]
    table = pair_table(pres)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[-2:] == ["PSNR - bm3d (soft_tissue)", "time / bm3d"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in table.splitlines()[2:])}
    assert rows["bm3d"][-2:] == ["+0.00", "1.00"]
    entries = pres["denoisers"]
    gain = entries["gaussian"]["windows"]["soft_tissue"]["psnr"] - entries["bm3d"]["windows"]["soft_tissue"]["psnr"]
    assert rows["gaussian"][-2] == f"{gain:+.2f}"
    assert float(rows["gaussian"][-1]) == pytest.approx(entries["gaussian"]["time_s"] / entries["bm3d"]["time_s"],
                                                        abs=0.01)
    # without bm3d in the run there is nothing to compare with, and no such columns
    del pres["denoisers"]["bm3d"]
    assert "bm3d" not in pair_table(pres)


def test_failing_denoiser_is_reported_not_fatal(tiny_pair, tmp_path):
    from bench.baselines import noisy
    from bench.harness import evaluate
    from bench.isolation import CliDenoiser

    res = evaluate([tiny_pair], {"noisy": noisy, "broken": CliDenoiser("python -c \"import sys; sys.exit(3)\"")},
                   tmp_path, figures=False, log=None)
    e = res["pairs"][0]["denoisers"]["broken"]
    assert not e["ok"] and "exit code 3" in e["error"]
    assert res["pairs"][0]["denoisers"]["noisy"]["ok"]
    assert "FAILED" in (tmp_path / "results.md").read_text()


def test_app_cli_with_the_modality_placeholder_runs(tiny_pair, tmp_path):
    """``--cli "...cli.py denoise --modality {modality} ..."``: the placeholder gave "CT", which the app's CLI
    rejects (its choices are ct, mr), so every such command was a FAILED row."""
    from bench.baselines import gaussian
    from bench.harness import evaluate
    from bench.isolation import CliDenoiser

    template = ("python apps/adl_denoise/cli.py denoise --model gaussian --modality {modality} --device cpu "
                "--input {input} --output {output}")
    res = evaluate([tiny_pair], {"gaussian": gaussian, "app_cli": CliDenoiser(template)}, tmp_path, figures=False,
                   log=None)
    entries = res["pairs"][0]["denoisers"]
    assert entries["app_cli"]["ok"], entries["app_cli"].get("error")
    assert "--modality ct" in entries["app_cli"]["command"]
    # the same filter as the in-process baseline, through the app's command line and NIfTI files
    assert entries["app_cli"]["windows"]["soft_tissue"]["psnr"] == pytest.approx(
        entries["gaussian"]["windows"]["soft_tissue"]["psnr"], abs=0.05)


def test_cli_output_with_permuted_axes_fails_instead_of_being_reshaped(tmp_path):
    """A command that wrote its output with the axes in another order (same voxel count) had it reshaped to the
    input's shape: scrambled voxels scored as if they were a denoised volume. Only length-1 axes may differ."""
    from bench.isolation import CliDenoiser, run_isolated
    from bench.pairs import Pair

    rng = np.random.default_rng(0)
    ref = rng.normal(40.0, 5.0, (3, 16, 24)).astype(np.float32)
    pair = Pair(name="tiny", modality="CT", noisy=ref + rng.normal(0, 10, ref.shape).astype(np.float32), reference=ref)
    permute = ("python -c \"import sys, SimpleITK as s; a = s.GetArrayFromImage(s.ReadImage(sys.argv[1])); "
               "s.WriteImage(s.GetImageFromArray(a.transpose({axes})), sys.argv[2])\" {{input}} {{output}}")
    out, info = run_isolated(CliDenoiser(permute.format(axes="2, 1, 0")), pair, tmp_path, 120, None, "permuted")
    (tmp_path / "output.nii.gz").unlink(missing_ok=True)
    assert out is None and not info["ok"] and "(24, 16, 3)" in info["error"], info
    # a one-slice volume written as a 2D image is still the same voxels
    one = Pair(name="one", modality="CT", noisy=pair.noisy[:1], reference=ref[:1])
    squeeze = ("python -c \"import sys, SimpleITK as s; a = s.GetArrayFromImage(s.ReadImage(sys.argv[1])); "
               "s.WriteImage(s.GetImageFromArray(a[0]), sys.argv[2])\" {input} {output}")
    out, info = run_isolated(CliDenoiser(squeeze), one, tmp_path, 120, None, "squeezed")
    assert info["ok"], info
    np.testing.assert_allclose(out, one.noisy, atol=1e-4)


def test_batch_throughput_series_fit_in_the_source_at_any_size(tmp_path, monkeypatch):
    """``bench/batch_throughput.py --size 512`` (whole CT slices) cut empty crops: a start left of the image was
    taken by SimpleITK as counted from its end. Every crop now has the asked size; a size larger than the image is
    a one-line error."""
    import SimpleITK as sitk

    import bench.batch_throughput as batch

    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(6 * 64 * 64, dtype=np.int16).reshape(6, 64, 64)), str(source))
    monkeypatch.setattr(batch, "SOURCE", source)
    for size in (64, 40, 32):
        paths = batch.make_series(tmp_path / f"tree{size}", 8, size, 2)
        assert [sitk.ReadImage(str(p)).GetSize() for p in paths] == [(size, size, 2)] * 8
    with pytest.raises(SystemExit, match="--size 65"):
        batch.make_series(tmp_path / "too_big", 1, 65, 2)


def test_kernel_generalisation_reuses_a_model_only_when_made_with_the_same_settings(tmp_path):
    """``bench/kernel_generalisation.py`` reused ``<out>/seen_all.pt`` (and the training CT) whenever the file existed:
    a second run with another ``--steps`` or ``--training-slices`` reported the first run's models under its own
    settings. A file is now reused only with the settings it was made with."""
    from bench.kernel_generalisation import made_with, record_settings

    weights = tmp_path / "seen_all.pt"
    weights.write_bytes(b"weights")
    settings = {"ct_filters": ["hann", "ram-lak"], "steps": 300, "filters": "16,32,48,64", "seed": 0,
                "training_slices": "0:40:2"}
    assert not made_with(weights, settings)  # no record (a file of an earlier version): made again
    record_settings(weights, settings)
    assert made_with(weights, dict(settings))
    assert not made_with(weights, {**settings, "steps": 1000})
    assert not made_with(weights, {**settings, "training_slices": "0:80:2"})
    weights.unlink()
    assert not made_with(weights, settings)


@pytest.mark.slow
@pytest.mark.server
def test_client_memory_compares_with_the_client_of_a_given_revision(tmp_path):
    """The README's "before" rows came from the pre-streaming client, but ``bench/client_memory.py --old`` could only
    compare with the client of git HEAD, the streaming one since: the command as written no longer reproduced them.
    ``--old REV`` takes the revision (here HEAD, which every checkout has)."""
    import subprocess
    import sys

    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "client_memory.py"), "--shape", "2", "32", "32",
                           "--old", "HEAD", "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "old (git HEAD) client" in done.stdout
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "client_memory.py"), "--old", "no-such-rev"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--old no-such-rev" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_heldout_guard(tmp_path):
    from lib.data.heldout import HELDOUT_CT_SERIES, HELDOUT_MR_VOLUME, assert_not_heldout, heldout_paths, is_heldout

    paths = heldout_paths(tmp_path)
    assert is_heldout(paths["CT"]) and is_heldout(paths["CT"] / "CT.1.2.3")
    assert is_heldout(paths["MR"]) and is_heldout("/elsewhere/mr_t1gd_brain_skullstripped.nii")
    assert not is_heldout(tmp_path / "ct_thorax_philips_2mm.nii.gz")
    assert not is_heldout(tmp_path / "mr_t1gd_head_siemens_1p5mm.nii.gz")
    assert_not_heldout([tmp_path / "ct_thorax_philips_2mm.nii.gz"])
    with pytest.raises(ValueError, match="mr_t1gd_brain_skullstripped"):
        assert_not_heldout([tmp_path / "ct_thorax_philips_2mm.nii.gz", tmp_path / HELDOUT_MR_VOLUME])
    with pytest.raises(ValueError, match="held-out"):
        assert_not_heldout(str(tmp_path / HELDOUT_CT_SERIES))


def test_sample_manifest_pairs(tmp_path):
    """--pairs sample: the manifest format of sample_data/studies/manifest.json, on a tiny synthetic study."""
    import SimpleITK as sitk

    from bench.pairs import sample_pairs

    rng = np.random.default_rng(0)
    ref = np.full((5, 32, 32), 40.0, np.float32)
    noisy = ref + rng.normal(0, 20, ref.shape).astype(np.float32)
    for name, arr in (("ref.nii.gz", ref), ("noisy.nii.gz", noisy)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.8, 0.8, 2.5))
        (tmp_path / "ct").mkdir(exist_ok=True)
        sitk.WriteImage(img, str(tmp_path / "ct" / name))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"pairs": [{"name": "tiny_ct", "noisy": "ct/noisy.nii.gz", "reference": "ct/ref.nii.gz",
                                               "modality": "CT", "simulation": {"sigma": 20}}]}))
    pairs = sample_pairs(manifest, max_slices=3)
    assert len(pairs) == 1
    p = pairs[0]
    assert p.name == "tiny_ct" and p.modality == "CT" and p.noisy.shape == (3, 32, 32)
    np.testing.assert_allclose(p.noisy, noisy[1:4], atol=1e-3)
    assert p.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert p.meta["simulation"] == {"sigma": 20}

    # the README's command on it: run_benchmark.py --pairs sample --denoisers ... (here with --manifest)
    from bench.run_benchmark import main

    out = tmp_path / "out"
    assert main(["--pairs", "sample", "--manifest", str(manifest), "--denoisers", "noisy,gaussian", "--max-slices",
                 "3", "--no-figures", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    (pres,) = results["pairs"]
    assert pres["name"] == "tiny_ct" and pres["shape_zyx"] == [3, 32, 32]
    assert all(e["ok"] for e in pres["denoisers"].values())
    assert "| gaussian |" in (out / "results.md").read_text()
    # --max-slices-ct applies to the sample pairs too (it was ignored: every slice was denoised and scored)
    assert main(["--pairs", "sample", "--manifest", str(manifest), "--denoisers", "noisy", "--max-slices-ct", "1",
                 "--no-figures", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["pairs"][0]["shape_zyx"] == [1, 32, 32]


def test_a_weight_file_runs_only_on_the_pairs_of_its_modality(tmp_path):
    """``run_benchmark.py --weights NAME=FILE`` without ``--modalities``: the shipped CT TDDL-GCN was also run on the
    MR pair and scored there as if it were an MR denoiser."""
    import SimpleITK as sitk

    from bench.run_benchmark import main

    rng = np.random.default_rng(0)
    entries = []
    for modality, level, sigma in (("CT", 40.0, 20.0), ("MR", 400.0, 20.0)):
        ref = np.full((2, 32, 32), level, np.float32)
        ref[:, :4] = 0.0 if modality == "MR" else -1000.0
        noisy = (ref + rng.normal(0, sigma, ref.shape)).astype(np.float32)
        if modality == "MR":  # magnitudes
            noisy = np.abs(noisy)
        for name, arr in (("ref", ref), ("noisy", noisy)):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"{modality}_{name}.nii.gz"))
        entries.append({"name": f"tiny_{modality.lower()}", "noisy": f"{modality}_noisy.nii.gz",
                        "reference": f"{modality}_ref.nii.gz", "modality": modality})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"pairs": entries}))
    shipped = REPO_ROOT / "apps" / "adl_denoise" / "model" / "pretrained_tddl_gcn_ct.pt"
    out = tmp_path / "out"
    assert main(["--pairs", "sample", "--manifest", str(manifest), "--denoisers", "noisy", "--weights",
                 f"gcn={shipped}", "--no-figures", "--out", str(out)]) == 0
    pairs = {p["name"]: p["denoisers"] for p in json.loads((out / "results.json").read_text())["pairs"]}
    assert pairs["tiny_ct"]["gcn"]["ok"], pairs["tiny_ct"]["gcn"].get("error")
    assert set(pairs["tiny_mr"]) == {"noisy"}


def test_cli_speed_times_whole_commands_on_a_dicom_series_and_states_ratios_to_bm3d(tmp_path):
    """bench/cli_speed.py on a real one-slice DICOM series (a derived series written per command), and the ratio
    arithmetic of its table: a method's median command time over BM3D's median in the same run."""
    import subprocess
    import sys

    import data_store

    from bench.cli_speed import REPO_ROOT, summarise

    series = tmp_path / "series"
    series.mkdir()
    (series / "ct.dcm").write_bytes((Path(data_store.__file__).parent / "data" / "693_UNCR.dcm").read_bytes())
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "cli_speed.py"), "--input", str(series),
                           "--methods", "nlm", "--repeats", "2", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["slices"] == 1 and [c["method"] for c in results["calls"]] == ["nlm", "nlm"]
    assert all(c["wall_s"] > 0 and c["cpu_s"] > 0 for c in results["calls"])
    assert "| nlm |" in (tmp_path / "out" / "results.md").read_text()

    calls = [{"method": "bm3d", "wall_s": 10.0, "cpu_s": 20.0}, {"method": "bm3d", "wall_s": 12.0, "cpu_s": 22.0},
             {"method": "bm3d", "wall_s": 30.0, "cpu_s": 21.0}, {"method": "adl", "wall_s": 3.0, "cpu_s": 5.0},
             {"method": "adl", "wall_s": 4.0, "cpu_s": 5.5}, {"method": "adl", "wall_s": 100.0, "cpu_s": 6.0}]
    table = summarise(calls, slices=4)
    assert table["adl"]["wall_ratio_to_bm3d"] == pytest.approx(4.0 / 12.0)
    assert table["bm3d"]["wall_ratio_to_bm3d"] == 1.0
    assert table["adl"]["cpu_ratio_to_bm3d"] == pytest.approx(5.5 / 21.0)
    assert table["adl"]["wall_s_per_slice"] == pytest.approx(1.0)


@pytest.mark.parametrize("command", [
    ["run_benchmark.py", "--modalities", "CT", "--max-slices-ct", "2", "--denoisers", "noisy"],
    ["cli_speed.py", "--slices", "1", "--repeats", "1"],
    ["cpu_speed.py", "--slices", "1", "--threads", "1", "--no-memory"],
    ["lesion_detectability.py", "--modalities", "CT", "--max-slices", "2", "--denoisers", "noisy"],
    ["kernel_generalisation.py", "--steps", "1"],
    ["tddl_domain_shift.py", "--max-slices", "1"],
    ["noise_calibration_real.py", "--steps", "1"],
    ["server_overhead.py", "--untrained"],
], ids=lambda command: command[0])
def test_a_benchmark_without_the_shared_data_says_so_in_one_line(command, tmp_path):
    """Started without ``../shared/data`` (here: ``ADL_SHARED_DATA`` naming a missing folder), each benchmark that
    needs it stops at once with one line naming the folder and the setting, not a traceback (some did so only
    after minutes of training, or after starting a server)."""
    import subprocess
    import sys

    missing = tmp_path / "no_shared_data"
    env = dict(os.environ, ADL_SHARED_DATA=str(missing), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / command[0]), *command[1:],
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and str(missing) in message and "ADL_SHARED_DATA" in message, done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_speed_commands_get_the_cli_default_threads_unless_told():
    """``bench/cli_speed.py`` without ``--threads`` times each command with the CLI's own thread default, as its
    report says: an ``OMP_NUM_THREADS=1`` of the calling shell no longer reaches the networks (BM3D ignores it)."""
    from bench.cli_speed import command_environment

    shell = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env = command_environment(None, shell)
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env and env["PATH"] == "/usr/bin"
    assert command_environment(2, shell)["OMP_NUM_THREADS"] == "2" == command_environment(2, shell)["MKL_NUM_THREADS"]
    assert shell["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("command", [
    ["bench/tddl_domain_shift.py", "--clean", "{missing}", "--out", "{out}"],
    ["scripts/make_ct_noise_model.py", "--input", "{missing}", "--output", "{out}/noise.pt",
     "--lowdose-dir", "{out}/lowdose"],
], ids=lambda command: command[0])
def test_missing_training_slices_are_a_usage_error_naming_the_script_that_makes_them(command, tmp_path):
    """Without ``.cache/training/ct`` (``scripts/prepare_training_data.py`` makes it) these stopped with a
    traceback from deep inside the reader."""
    import subprocess
    import sys

    values = {"missing": str(tmp_path / "no_training_slices"), "out": str(tmp_path / "out")}
    args = [part.format(**values) for part in command[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO_ROOT / command[0]), *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    if "shared" in last and "ADL_SHARED_DATA" in last:  # tddl_domain_shift checks the held-out data first
        pytest.skip("no ../shared/data here: the held-out check comes first (tested above)")
    assert values["missing"] in last and "prepare_training_data.py" in last, done.stderr


@pytest.mark.slow
@pytest.mark.server
def test_server_overhead_leaves_no_scratch_folder(tmp_path, tiny_weights):
    """``bench/server_overhead.py`` copied the weights and its CT volumes (300 slices by default: 300 MB and the
    result) into a ``server_bench_*`` folder of the temporary directory and never removed it. With the session's
    tiny real ADL CT weights: the shipped network's four passes over a 512 x 512 slice took most of a minute on one
    thread, and what is checked here does not depend on the weights."""
    import subprocess
    import sys

    from lib.data.heldout import shared_data_dir

    if not (shared_data_dir() / "ct_thorax_philips_2mm.nii.gz").is_file():
        pytest.skip("needs ../shared/data (ct_thorax_philips_2mm.nii.gz)")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "server_overhead.py"), "--slices", "1",
                           "--memory-slices", "0", "--out", str(tmp_path / "out"),
                           "--weights", str(tiny_weights / "pretrained_adl_ct.pt")], capture_output=True, text=True,
                          env=dict(os.environ, TMPDIR=str(scratch), OMP_NUM_THREADS="1"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "server_overhead.json").read_text())["slices"] == 1
    assert not list(scratch.glob("server_bench_*"))


def test_domain_shift_bench_reuses_a_model_only_when_made_with_the_same_settings(tmp_path):
    """bench/tddl_domain_shift.py reused any weight file in --out ('reusing ...'), whatever --steps said: a run
    with other settings reported the numbers of the old models. Now a file is reused only when its
    <name>.settings.json says the same settings made it; otherwise it is trained again (and says why)."""
    import argparse

    import SimpleITK as sitk
    from lib.data import SyntheticNoiseSource

    from bench import tddl_domain_shift as bench

    from conftest import SAMPLE_STUDIES

    head = SAMPLE_STUDIES / "ct_head_invesalius.nii.gz"
    if not head.is_file():
        pytest.skip(f"{head} missing: build the sample data with ./run.sh")
    clean = tmp_path / "clean.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(head))[80:176, 80:176, 50:52], str(clean))
    built = []

    def make_source():
        built.append(1)
        return SyntheticNoiseSource(clean, "CT", "gaussian", seed=0, progress=False)

    args = argparse.Namespace(batch_size=1, lr=2e-4, seed=0, clean=[clean], retrain=False, quiet=True)
    out = tmp_path / "out"
    out.mkdir()
    first = bench.train("gcn_source_dose", make_source, out, args, 1, data={"simulated_noise_hu": 17.3})
    made = first.read_bytes()
    assert len(built) == 1 and bench.settings_path(first).is_file()
    assert bench.train("gcn_source_dose", make_source, out, args, 1, data={"simulated_noise_hu": 17.3}) == first
    assert len(built) == 1 and first.read_bytes() == made  # the same settings: reused, no training pool built
    for steps, data in ((2, {"simulated_noise_hu": 17.3}), (2, {"simulated_noise_hu": 30.0})):
        bench.train("gcn_source_dose", make_source, out, args, steps, data=data)  # other steps, then other noise
    assert len(built) == 3
    assert json.loads(bench.settings_path(first).read_text())["steps"] == 2
    # a file that no settings describe (an earlier version of the script wrote none) is not reused either
    bench.settings_path(first).unlink()
    assert bench.reusable(first, {"steps": 2})[0] is False
    bench.train("gcn_source_dose", make_source, out, args, 2, data={"simulated_noise_hu": 30.0})
    assert len(built) == 4
