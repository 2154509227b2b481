"""``cli.py denoise-batch`` on a real mixed folder tree: one process, ``torchrun --nproc_per_node 2`` (Gloo, CPU),
a run killed half way and resumed.

The tree (built in tmp_path; the shared data is symlinked, never copied into the repository): the real
JPEG 2000 CT slab (hard-anonymised: empty UIDs), the real gantry-tilted head series (refused by the reader),
a folder holding two DICOM series, a NIfTI crop and an NRRD crop of a real CT, a 4D NIfTI, a NIfTI holding a NaN,
one holding a voxel of 1e30 HU and a corrupt file.
The fast classical ``gaussian`` model: what is tested here is the batch, not a network.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import processes
from conftest import APP_DIR
from in_process import run_cli
from manifest_limit import write_limiter

from lib.batch.discovery import MANIFEST_DIR, discover_tree
from lib.batch.manifest import Manifest, read_records
from lib.batch.sharding import assign_ranks, shard_items
from lib.imaging import read_volume

CLI = APP_DIR / "cli.py"
TIMEOUT = 600  # generous: a loaded 2-core machine
#: the series of the tree that denoise, and the three that must fail, with a word of their error
GOOD = {"dicom:pacs/slab#", "dicom:pacs/two_series#A", "dicom:pacs/two_series#B", "file:nifti/ct_crop.nii.gz",
        "file:nifti/ct_small.nrrd"}
BAD = {"dicom:pacs/tilted#": "gantry tilt", "file:nifti/four_d.nii.gz": "4D", "file:nifti/corrupt.nii.gz": "cannot read",
       "file:nifti/has_nan.nii.gz": "NaN", "file:nifti/has_1e30.nii.gz": "the most extreme is 1e+30"}
#: the summary of a first run over the whole tree
FIRST_RUN = f"summary: {len(GOOD) + len(BAD)} series: {len(GOOD)} done, 0 skipped, {len(BAD)} failed"


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_here(tree: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """What :func:`run_single` returns, the CLI run in this process (:func:`in_process.run_cli`: the same ``main``,
    without seconds of interpreter start-up and imports a run), for runs whose point is not their process."""
    return run_cli(batch_args(tree, out, *extra))


def make_tree(root: Path, shared: Path) -> Path:
    """The mixed tree under ``root`` (see the module docstring). Series UIDs of the two-series folder: A and B
    prefixes are recorded in ``root/uids.json`` for the tests."""
    from pydicom.uid import generate_uid

    (root / "pacs").mkdir(parents=True)
    (root / "pacs" / "slab").symlink_to(shared / "dicom" / "ct_abdomen_siemens_j2k_slab")
    (root / "pacs" / "tilted").symlink_to(shared / "dicom" / "ct_head_ge_tilted")
    two = root / "pacs" / "two_series"
    two.mkdir()
    files = sorted((shared / "dicom" / "ct_abdomen_siemens_j2k_slab").iterdir())
    study, uids = generate_uid(), {}
    for s, name in enumerate("AB"):
        series = generate_uid()
        uids[name] = series
        for k, f in enumerate(files[s * 6:(s + 1) * 6]):
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesNumber, ds.PatientID = s + 1, "BATCH"
            ds.save_as(two / f"{name}{k}.dcm")
    image = sitk.ReadImage(str(shared / "ct_abdomen_pelvis_resampled_3mm.nii.gz"))
    nifti = root / "nifti"
    nifti.mkdir()
    sitk.WriteImage(image[20:84, 20:84, 40:48], str(nifti / "ct_crop.nii.gz"))
    sitk.WriteImage(sitk.Cast(image[30:94, 10:74, 50:54], sitk.sitkInt16), str(nifti / "ct_small.nrrd"))
    four_d = np.random.default_rng(0).normal(0, 1, (2, 4, 16, 16)).astype(np.float32)
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(volume) for volume in four_d]),
                    str(nifti / "four_d.nii.gz"))  # (GetImageFromArray of the 4D array: 3D with 16 components)
    (nifti / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + b"not a gzip stream" * 20)
    with_nan = np.full((4, 16, 16), 100.0, np.float32)
    with_nan[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(with_nan), str(nifti / "has_nan.nii.gz"))
    absurd = sitk.GetArrayFromImage(image[20:52, 20:52, 40:44]).astype(np.float32)
    absurd[2, 3, 4] = 1e30  # one corrupt voxel: denoised, the restoration would spread it around
    sitk.WriteImage(sitk.GetImageFromArray(absurd), str(nifti / "has_1e30.nii.gz"))
    (root / "notes.txt").write_text("not an image: ignored")
    (root.parent / f"{root.name}_uids.json").write_text(json.dumps(uids))
    return root


def short_key(key: str, uids: dict[str, str]) -> str:
    """A series key with the generated UIDs of the two-series folder replaced by A and B, other UIDs left out."""
    if "#" not in key:
        return key
    folder, uid = key.split("#", 1)
    names = {u: n for n, u in uids.items()}
    return f"{folder}#{names.get(uid, '')}"


def batch_args(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["denoise-batch", "--input", str(tree), "--output", str(out), "--model", "gaussian", *extra]


def run_single(tree: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return processes.run([sys.executable, CLI, *batch_args(tree, out, *extra)], TIMEOUT, env=_env())


def torchrun_command(tree: Path, out: Path, logs: Path | None = None) -> list[str]:
    """``logs``: each rank's output also written to ``logs/*/attempt_0/<rank>/stdout.log`` (torchrun's ``--tee``)."""
    teed = ["--tee", "3", "--log-dir", str(logs)] if logs else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *teed, str(CLI),
            *batch_args(tree, out)]


def rank_log(logs: Path, rank: int, stream: str = "stdout") -> str:
    """What ``rank`` wrote to ``stream`` in a job of :func:`torchrun_command` with ``logs``."""
    return next(logs.glob(f"*/attempt_0/{rank}/{stream}.log")).read_text()


def run_torchrun_job(command: list[str], tmp_path: Path, name: str, extra_env: dict[str, str] | None = None
                     ) -> tuple[subprocess.Popen, str, float]:
    """Run a torchrun ``command`` (its output to ``tmp_path/name.log``, TMPDIR in ``tmp_path``, ``extra_env`` added)
    to its end; on a hang (:data:`TIMEOUT`) torchrun and its workers (each in a session of its own) are killed and
    the test fails. Returns (the ended process, its output, seconds it ran)."""
    log = tmp_path / f"{name}.log"
    started = time.monotonic()
    process = processes.start(command, log, env={**processes.torchrun_env(tmp_path), **(extra_env or {})})
    groups = {process.pid}
    try:
        deadline = started + TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            groups |= _process_groups(process)
            time.sleep(0.2)
        assert process.poll() is not None, "the run hung: " + processes.log_tail(log)
    finally:
        _kill(groups | _process_groups(process))
        process.wait()
    return process, log.read_text(), time.monotonic() - started


def latest(out: Path, uids: dict[str, str]) -> dict[str, dict]:
    """The merged manifest by short key."""
    rows = [json.loads(line) for line in (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()]
    return {short_key(r["key"], uids): r for r in rows}


def volume_of(path: Path) -> tuple[np.ndarray, tuple, tuple]:
    v = read_volume(path)
    return v.array, tuple(np.round(v.spacing, 5)), tuple(np.round(v.origin, 4))


def assert_same_outputs(a: dict[str, dict], b: dict[str, dict]) -> None:
    """Same voxels and geometry for every denoised series of two manifests (UIDs of derived series differ)."""
    for key in GOOD:
        va, vb = volume_of(Path(a[key]["output"])), volume_of(Path(b[key]["output"]))
        np.testing.assert_array_equal(va[0], vb[0], err_msg=key)
        assert va[1:] == vb[1:], key


@pytest.fixture(scope="module")
def tree(tmp_path_factory, shared_data) -> tuple[Path, dict[str, str]]:
    root = make_tree(tmp_path_factory.mktemp("batch") / "tree", shared_data)
    return root, json.loads((root.parent / "tree_uids.json").read_text())


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One single-process run of the whole tree."""
    out = tmp_path_factory.mktemp("reference") / "out"
    return out, run_single(tree[0], out)


# ------------------------------------------------------------------------------------------------ fast parts
def test_sharding_is_largest_first_balanced_deterministic_and_disjoint():
    sizes = [5, 100, 7, 7, 60, 40, 0, 0, 33, 1]
    for world in (1, 2, 3, 4):
        ranks = assign_ranks(sizes, world)
        assert ranks == assign_ranks(sizes, world)  # deterministic
        loads = [sum(max(s, 1) for s, r in zip(sizes, ranks) if r == k) for k in range(world)]
        # greedy largest-first: no rank is over the ideal share by more than the largest series
        assert max(loads) <= sum(max(s, 1) for s in sizes) / world + max(sizes)
        items = list(range(len(sizes)))
        shards = [shard_items(items, k, world, size=lambda i: sizes[i]) for k in range(world)]
        taken = [i for shard in shards for i in shard]
        assert sorted(taken) == items  # every series exactly once: no two ranks take the same one
        for shard in shards:
            assert [sizes[i] for i in shard] == sorted((sizes[i] for i in shard), reverse=True)
    assert assign_ranks([100, 60, 40], 2) == [0, 1, 1]


def test_discovery_mirrors_the_tree_with_unique_outputs_and_skips_its_own_output(tree, tmp_path):
    root, uids = tree
    out = root / "denoised"  # inside the input tree: never searched
    out.mkdir()
    (out / "old.nii.gz").write_bytes(b"")
    try:
        # a folder of the tree that holds other files: they would be passed over in silence, so it is refused
        with pytest.raises(ValueError, match=r"lies inside the input folder and already holds 1 entry \(old.nii.gz\)"):
            discover_tree(root, out)
        (out / MANIFEST_DIR).mkdir()  # an earlier run's results: fine
        items = discover_tree(root, out)
    finally:
        shutil.rmtree(out)  # the tree is shared by the module's tests
    keys = {short_key(i.key, uids) for i in items}
    assert keys == GOOD | set(BAD)
    outputs = [i.output for i in items]
    assert len(set(outputs)) == len(outputs)
    assert all(out in o.parents for o in outputs) and not any(o.exists() for o in outputs)
    by_key = {short_key(i.key, uids): i for i in items}
    assert by_key["file:nifti/ct_small.nrrd"].output == out / "nifti" / "ct_small.nrrd"
    assert by_key["dicom:pacs/two_series#A"].output.parent == out / "pacs" / "two_series"
    assert by_key["dicom:pacs/slab#"].voxels == 20 * 512 * 512
    with pytest.raises(ValueError, match="input folder itself"):
        discover_tree(root, root)
    with pytest.raises(ValueError, match="holds the input"):
        discover_tree(root, root.parent)


def test_manifest_survives_a_line_cut_by_a_kill(tmp_path):
    manifest = Manifest(tmp_path, rank=1, world=2)
    manifest.append({"job": "a", "key": "a", "status": "done"})
    with open(manifest.path, "a") as handle:
        handle.write('{"job": "b", "key": "b", "sta')  # a process killed in the middle of a line
    Manifest(tmp_path, rank=1, world=2).append({"job": "c", "key": "c", "status": "failed"})
    assert [r["job"] for r in read_records(manifest.folder)] == ["a", "c"]


def test_bad_arguments_are_refused_with_one_line(tmp_path):
    result = run_here(tmp_path / "missing", tmp_path / "out")
    assert result.returncode == 2 and "neither a folder nor a DICOMweb URL" in result.stderr
    result = run_here(tmp_path, tmp_path / "out", "--store-to-pacs")
    assert result.returncode == 2 and "--store-to-pacs" in result.stderr


# ------------------------------------------------------------------------------------------------ real runs
@pytest.mark.slow
def test_one_process_denoises_the_good_series_and_reports_the_bad_ones(tree, reference, tmp_path):
    root, uids = tree
    out, result = reference
    assert result.returncode == 1, result.stderr  # some series failed: non-zero, the rest done
    assert FIRST_RUN in result.stdout
    rows = latest(out, uids)
    assert {k for k, r in rows.items() if r["status"] == "done"} == GOOD
    for key, word in BAD.items():
        assert rows[key]["status"] == "failed" and word in rows[key]["error"], rows[key]
        assert f"failed: {rows[key]['key']}: " in result.stdout
    slab = rows["dicom:pacs/slab#"]
    assert slab["identity"].startswith("sha256:")  # no SeriesInstanceUID: identified by content
    assert rows["dicom:pacs/two_series#A"]["identity"] == f"dicom:{uids['A']}"
    assert slab["model"] == "gaussian" and slab["weights_version"] == "classical-gaussian" and slab["seconds"] > 0
    # DICOM in, derived DICOM series out; files keep their type; inputs untouched
    derived = pydicom.dcmread(next(Path(slab["output"]).iterdir()))
    assert "DERIVED" in derived.ImageType and "[denoised gaussian]" in derived.SeriesDescription
    assert derived.DerivationDescription.startswith("Denoised with gaussian from series ")  # what made it
    assert len(list(Path(slab["output"]).iterdir())) == 20
    assert Path(rows["file:nifti/ct_small.nrrd"]["output"]).suffix == ".nrrd"
    # where each modality came from: the DICOM tag, or the values of a file that carries none
    assert slab["modality_from"] == "dicom" and rows["file:nifti/ct_crop.nii.gz"]["modality_from"] == "guessed"
    assert not list((root / "nifti").glob("*denoised*")) and not (root / MANIFEST_DIR).exists()
    # the same as 'cli.py denoise' on that file
    single = tmp_path / "crop.nii.gz"
    done = run_cli(["denoise", "--model", "gaussian", "--input", root / "nifti" / "ct_crop.nii.gz", "--output",
                    single])
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(volume_of(single)[0], volume_of(Path(rows["file:nifti/ct_crop.nii.gz"]["output"]))[0])
    # a rerun skips what is done and retries what failed
    again = run_here(root, out)
    assert again.returncode == 1 and f"{len(GOOD)} skipped, {len(BAD)} failed" in again.stdout, again.stdout


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_two_processes_match_one_process(tree, reference, tmp_path):
    """Two ranks denoise what one process does, each series on one rank; rank 0 says every rank's failed series
    (each rank said its own alone, so that on several machines rank 0's log missed the others'). The tree's folders
    are linked under one more that fails on rank 1 (the others' failures are rank 0's): a real CT slice whose header
    declares 370 frames, sized between the two largest series, refused before its pixels are read.

    Rank 1 cannot write its summary file either (a folder in its way: tests may run as root, whom chmod does not
    stop). Before, rank 1 raised and left rank 0 at the final barrier, which Gloo broke off ("Connection closed by
    peer"): no summary, no merged manifest, rank 0's failed series unsaid. Now every rank sends rank 0 its summary at
    the end: rank 0 says which rank's file is missing and why, counts that rank's series, merges the manifest and
    exits non-zero (one job checks both: each torchrun launch costs 20-40 s here)."""
    from pydicom.data import get_testdata_file

    shared_root, uids = tree
    root, out = tmp_path / "tree", tmp_path / "out"
    (root / "cut").mkdir(parents=True)
    for name in ("pacs", "nifti"):
        (root / name).symlink_to(shared_root / name)
    cut = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    cut.NumberOfFrames = 370
    cut.save_as(root / "cut" / "frames.dcm")
    cut_key = f"dicom:cut#{cut.SeriesInstanceUID}"
    blocker = out / MANIFEST_DIR / "summary-rank-00001.json"
    blocker.mkdir(parents=True)
    result = processes.run(torchrun_command(root, out, tmp_path / "logs"), TIMEOUT, env=processes.torchrun_env(tmp_path))
    assert (f"summary: {len(GOOD) + len(BAD) + 1} series: {len(GOOD)} done, 0 skipped, {len(BAD) + 1} failed"
            in result.stdout), result.stdout + result.stderr[-3000:]
    # non-zero through torchrun: the incomplete run (rank 1's summary file) exits 1, as failed series alone do; the
    # cause is told by rank 0's stderr (below), which says nothing more of failed series than the summary line
    assert result.returncode != 0
    rows = latest(out, uids)
    assert_same_outputs(rows, latest(reference[0], uids))
    # every series handled by exactly one rank, and both ranks worked
    handled: dict[str, set[int]] = {}
    for record in read_records(out / MANIFEST_DIR):
        handled.setdefault(record["key"], set()).add(record["rank"])
    assert all(len(r) == 1 for r in handled.values()), handled
    assert {r for ranks in handled.values() for r in ranks} == {0, 1}
    assert "rank 0:" in result.stdout and "rank 1:" in result.stdout
    said = {rank: rank_log(tmp_path / "logs", rank) for rank in (0, 1)}
    failed = [*BAD, "dicom:cut#"]
    assert rows["dicom:cut#"]["rank"] == 1 and "truncated" in rows["dicom:cut#"]["error"], rows["dicom:cut#"]
    assert rows["dicom:cut#"]["key"] == cut_key
    for key in failed:
        assert said[0].count(f"failed: {rows[key]['key']}: ") == 1, said[0]
    assert "failed: " not in said[1], said[1]
    # rank 1's summary file: said by rank 0, its counts (above) came over the process group; nothing removed
    assert re.search(r"^rank 1: its summary file was not written \(.*Is a directory.*\); its counts came over",
                     said[0], re.M), said[0][-3000:]
    errors = rank_log(tmp_path / "logs", 0, "stderr")
    # the one cause said on stderr: rank 1's summary file; no rank failed (its series failing is not a rank failing)
    assert re.findall(r"^error: .*$", errors, re.M) == [
        f"error: the summary file of rank 1 was not written ({len(GOOD) + len(BAD) + 1} series counted), said above"], \
        errors[-3000:]
    assert not re.search(r"^rank \d+: failed: ", said[0], re.M), said[0][-3000:]
    assert blocker.is_dir()
    # a rerun in the same --output (the plan files of the run above hold another job's nonce: each rank writes its
    # own anew before the start check): it starts, skips what was done and tries the failed series again; failed
    # series alone make the job exit non-zero, with no error line
    blocker.rmdir()
    again = processes.run(torchrun_command(root, out, tmp_path / "logs-again"), TIMEOUT,
                          env=processes.torchrun_env(tmp_path))
    assert (f"summary: {len(GOOD) + len(BAD) + 1} series: 0 done, {len(GOOD)} skipped, {len(BAD) + 1} failed"
            in again.stdout), again.stdout[-3000:] + again.stderr[-3000:]
    assert again.returncode != 0
    assert not re.findall(r"^error: .*$", rank_log(tmp_path / "logs-again", 0, "stderr"), re.M)


def _process_groups(process: subprocess.Popen) -> set[int]:
    """The process groups of torchrun and its workers (each worker runs in a session of its own)."""
    import psutil

    groups = {process.pid}
    try:
        for child in psutil.Process(process.pid).children(recursive=True):
            try:
                groups.add(os.getpgid(child.pid))
            except ProcessLookupError:
                pass
    except psutil.Error:
        pass
    return groups


def _kill(groups: set[int]) -> None:
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _done_count(out: Path) -> int:
    return sum(1 for r in read_records(out / MANIFEST_DIR) if r["status"] == "done")


def _writing(out: Path, series_folders: list[Path]) -> bool:
    """A derived DICOM series (many files: a write that takes a while) is being written: its temporary folder
    exists, or its folder exists but is not recorded done."""
    for folder in series_folders:
        if folder.parent.is_dir() and any(p.name.startswith(f".{folder.name}.tmp-") for p in folder.parent.iterdir()):
            return True
    present = [folder for folder in series_folders if folder.exists()]
    if not present:
        return False
    done = {r["output"] for r in read_records(out / MANIFEST_DIR) if r["status"] == "done"}
    return any(str(folder.resolve()) not in done for folder in present)


@pytest.mark.slow
@pytest.mark.ddp
def test_a_run_killed_half_way_leaves_no_partial_output_and_resumes(tree, reference, tmp_path):
    root, uids = tree
    reference_rows = latest(reference[0], uids)
    out = tmp_path / "out"
    expected = {k: out / Path(reference_rows[k]["output"]).relative_to(reference[0]) for k in GOOD}
    series_folders = [p for k, p in expected.items() if k.startswith("dicom:")]
    process = processes.start(torchrun_command(root, out), tmp_path / "killed.log",
                              env=processes.torchrun_env(tmp_path))
    groups = {process.pid}
    try:
        deadline = time.monotonic() + TIMEOUT
        # kill in the middle of writing a derived DICOM series, after at least one series is done
        while time.monotonic() < deadline and process.poll() is None and not (
                (out / MANIFEST_DIR).is_dir() and _done_count(out) >= 1):
            groups |= _process_groups(process)
            time.sleep(0.01)
        groups |= _process_groups(process)  # known before the kill, so that it is immediate
        while time.monotonic() < deadline and process.poll() is None and not _writing(out, series_folders):
            time.sleep(0.0005)
        alive = process.poll() is None
        _kill(groups)
        assert alive, "the run ended before it could be killed:\n" + processes.log_tail(tmp_path / "killed.log")
    finally:
        _kill(groups | _process_groups(process))
        process.wait(60)
    # torchrun's scratch folder went to the job's TMPDIR, in tmp_path (each run left one in /tmp)
    assert any(p.name.startswith("torchelastic_") for p in (tmp_path / "tmp").iterdir())
    done_before = _done_count(out)
    assert 1 <= done_before < len(GOOD)
    # what exists under its final name is complete and right; the rest is absent or hidden
    for key, path in expected.items():
        if path.exists():
            np.testing.assert_array_equal(volume_of(path)[0], volume_of(Path(reference_rows[key]["output"]))[0])
    resumed = run_single(root, out)
    assert resumed.returncode == 1, resumed.stderr
    assert f"{len(GOOD) - done_before} done, {done_before} skipped, {len(BAD)} failed" in resumed.stdout, resumed.stdout
    assert_same_outputs(latest(out, uids), reference_rows)
    leftovers = [name for _, dirs, files in os.walk(out) for name in dirs + files if ".tmp-" in name]
    assert not leftovers  # a killed write's temporary files are cleaned up on the rerun


@pytest.mark.slow
def test_a_learned_model_records_its_weights_and_matches_denoise(tree, tiny_weights, tmp_path):
    """ADL (tiny real weights) through the batch: the same result as 'cli.py denoise', the weight file's version
    and SHA-256 in the manifest; a rerun skips the series, but not once other weights sit under the same file name
    (an upgrade or a published fine-tune): an archive is denoised by one model, not by whichever was installed when
    each series ran."""
    from lib.engines import ADLTrainingConfig, build_networks
    from lib.lesions.low_frequency_restoration import DEFAULT_SIGMA_PX
    from lib.runtime.hashing import file_sha256
    from lib.weights import export_weights
    from mlserver import TINY_ADL

    root, _ = tree
    weights = Path(shutil.copy(tiny_weights / "pretrained_adl_ct.pt", tmp_path / "pretrained_adl_ct.pt"))
    out = tmp_path / "out"
    batch = [sys.executable, CLI, "denoise-batch", "--input", root / "nifti", "--output", out, "--model", "adl",
             "--weights", weights, "--file-modality", "ct"]

    def manifest() -> dict[str, dict]:
        return {r["key"]: r for r in (json.loads(line) for line in
                                      (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines())}

    result = run_cli(batch)
    rows = manifest()
    assert result.returncode == 1 and "2 done" in result.stdout, result.stdout + result.stderr
    crop = rows["file:ct_crop.nii.gz"]
    assert crop["model"] == "adl" and crop["weights_version"] == "file:pretrained_adl_ct.pt"
    assert crop["modality"] == "CT" and crop["low_frequency_restoration"] == DEFAULT_SIGMA_PX["CT"]
    assert crop["modality_from"] == "argument"  # --file-modality
    assert crop["weights_sha256"] == file_sha256(weights) == rows["file:ct_small.nrrd"]["weights_sha256"]
    single = tmp_path / "crop.nii.gz"
    done = run_cli(["denoise", "--model", "adl", "--weights", weights, "--modality", "ct", "--input",
                    root / "nifti" / "ct_crop.nii.gz", "--output", single])
    assert done.returncode == 0, done.stderr
    first = volume_of(Path(crop["output"]))[0]
    np.testing.assert_array_equal(volume_of(single)[0], first)

    again = run_cli(batch)
    assert "0 done, 2 skipped" in again.stdout, again.stdout + again.stderr
    old_sha = file_sha256(weights)
    config = ADLTrainingConfig(modality="CT", device="cpu", **TINY_ADL)
    export_weights(build_networks(config)[0], weights, config)  # untrained: same name, other weights
    upgraded = run_cli(batch)
    assert "2 done, 0 skipped" in upgraded.stdout, upgraded.stdout + upgraded.stderr
    assert "denoising again: the adl weights changed" in upgraded.stderr, upgraded.stderr
    rows = manifest()
    assert rows["file:ct_crop.nii.gz"]["weights_sha256"] == file_sha256(weights) != old_sha
    assert not np.array_equal(volume_of(Path(rows["file:ct_crop.nii.gz"]["output"]))[0], first)
    assert "0 done, 2 skipped" in run_cli(batch).stdout

    # records written before records named the modality (as older versions wrote them): matched to a modality by
    # their weights, so still skipped while those are installed, and denoised again once they are not
    for records in (out / MANIFEST_DIR).glob("rank-*.jsonl"):  # what reruns read
        old_rows = [json.loads(line) for line in records.read_text().splitlines()]
        records.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "modality"}) + "\n"
                                   for r in old_rows))
    assert "0 done, 2 skipped" in run_cli(batch).stdout
    second_sha = file_sha256(weights)
    export_weights(build_networks(config)[0], weights, config)  # a fresh initialisation: other weights again
    assert file_sha256(weights) != second_sha
    upgraded = run_cli(batch)
    assert "2 done, 0 skipped" in upgraded.stdout, upgraded.stdout + upgraded.stderr
    assert f"{second_sha[:12]} is in none of" in upgraded.stderr, upgraded.stderr


# ------------------------------------------------------------------------------------------------ damaged archives
def _ct_small_series(folder: Path, n: int, uid: str, patient: str = "PAT_A", start: int = 0) -> list[Path]:
    """Slices ``start`` .. ``start + n - 1`` of a series made of pydicom's real CT_small slice, 2.5 mm apart."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(start, start + n):
        ds = base.copy()
        ds.SeriesInstanceUID, ds.PatientID, ds.PatientName = uid, patient, f"{patient}^Test"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{sum(map(ord, patient))}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + \
            [float(ds.ImagePositionPatient[2]) + 2.5 * k]
        paths.append(folder / f"{patient}_{k:03d}.dcm")
        ds.save_as(paths[-1])
    return paths


def test_damaged_split_mixed_and_grown_series_are_reported_or_redone_never_written_short(tmp_path):
    """A cut or emptied slice is never left out of a series (nor its folder passed over), a UID found in two folders is
    not written as two partial series, two patients' slices under one empty UID are not merged, and a series that
    got another slice after it was denoised is denoised again on the rerun."""
    from pydicom.uid import generate_uid

    root, out = tmp_path / "archive", tmp_path / "out"
    grown = _ct_small_series(root / "grown", 3, generate_uid())
    damaged = _ct_small_series(root / "damaged", 4, generate_uid())
    damaged[2].write_bytes(damaged[2].read_bytes()[:400])  # the header cut short, DICM marker intact
    emptied = _ct_small_series(root / "emptied", 4, generate_uid())
    emptied[-1].write_bytes(b"")  # an interrupted copy: the last slice's file is empty (the spacing check sees no gap)
    (root / "grown" / "notes.txt").write_bytes(b"")  # an empty file not named as a slice is still no slice
    only = _ct_small_series(root / "only_damaged", 1, generate_uid())
    only[0].write_bytes(only[0].read_bytes()[:400])
    split = generate_uid()
    _ct_small_series(root / "split" / "part1", 3, split)
    _ct_small_series(root / "split" / "part2", 3, split, start=3)
    _ct_small_series(root / "mixed", 3, "", "PAT_A")
    _ct_small_series(root / "mixed", 3, "", "PAT_B", start=3)

    result = run_here(root, out)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {r["key"].split("#")[0]: r for r in
            (json.loads(line) for line in (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines())}
    assert rows["dicom:grown"]["status"] == "done"
    expected = {"dicom:damaged": ["cannot be read", damaged[2].name], "dicom:only_damaged": ["cannot be read"],
                "dicom:emptied": ["holds 0 bytes", emptied[-1].name],
                "dicom:split/part1": ["split over 2 folders"], "dicom:split/part2": ["split over 2 folders"],
                "dicom:mixed": ["PatientID differs", "not one patient"]}
    for key, words in expected.items():
        assert rows[key]["status"] == "failed", rows[key]
        for word in words:
            assert word in rows[key]["error"], (word, rows[key]["error"])
    written = [p for p in out.rglob("*.dcm")]
    assert {p.parent.parent.relative_to(out).as_posix() for p in written} == {"grown"}  # nothing short or merged
    assert len(written) == 3

    # a fourth slice arrives: the rerun denoises the series again (4 slices), and says why
    _ct_small_series(root / "grown", 1, pydicom.dcmread(grown[0]).SeriesInstanceUID, start=3)
    again = run_here(root, out)
    assert again.returncode == 1 and "1 done, 0 skipped" in again.stdout, again.stdout + again.stderr
    assert "other slices since" in again.stderr
    assert len(list(Path(rows["dicom:grown"]["output"]).iterdir())) == 4


def test_symlink_loops_other_runs_results_and_derived_series_are_not_inputs(tmp_path):
    """A symlink back up the tree (or a second link to a folder) lists each folder once, so its series is denoised
    and not refused as "split over N folders"; the output root of an earlier run inside the tree (``_denoise_batch``)
    and a derived series of this app copied into the archive are not denoised a second time."""
    from pydicom.uid import generate_uid

    root = tmp_path / "archive"
    ct = _ct_small_series(root / "pat" / "ct", 3, generate_uid())
    (root / "pat" / "loop").symlink_to("..")
    (root / "pat" / "ct_again").symlink_to("ct")
    derived = root / "pat" / "copied_result"
    derived.mkdir()
    for path in ct:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesDescription = "1.2.3.4.5", "abdomen [denoised adl]"
        ds.save_as(derived / path.name)
    anonymised = root / "pat" / "anonymised_result"  # the basic profile removes SeriesDescription, keeps ImageType
    anonymised.mkdir()
    for path in ct:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.ImageType = "1.2.3.4.6", ["DERIVED", "SECONDARY", "AXIAL", "DENOISED"]
        ds.pop("SeriesDescription", None)
        ds.save_as(anonymised / path.name)
    earlier = root / "denoised_v1"  # an earlier run's --output inside the input tree
    (earlier / MANIFEST_DIR).mkdir(parents=True)
    _ct_small_series(earlier / "pat" / "ct" / "series_1_0123abcd", 3, generate_uid())
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 8, 8), np.float32)), str(earlier / "pat" / "x.nii.gz"))

    items = discover_tree(root, tmp_path / "out")
    assert [(i.key.split("#")[0], i.problem) for i in items] == [("dicom:pat/ct", None)]
    assert len(items[0].files) == 3


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    """Two runs writing to one output would denoise every series twice and record each as failed over the first
    run's results: while a run holds the output's lock (here this process), another is refused at once, naming it,
    and writes nothing; once the lock is free the run goes ahead."""
    from pydicom.uid import generate_uid

    root, out = tmp_path / "archive", tmp_path / "out"
    _ct_small_series(root / "ct", 3, generate_uid())
    first = Manifest(out)
    first.lock()
    result = run_single(root, out)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "another denoise-batch run (pid " in result.stderr and "choose another --output" in result.stderr
    assert not read_records(out / MANIFEST_DIR) and [p.name for p in out.iterdir()] == [MANIFEST_DIR]
    os.close(first._lock_fd)  # the first run ends
    result = run_here(root, out)
    assert result.returncode == 0 and "1 done" in result.stdout, result.stdout + result.stderr


def test_a_folder_that_cannot_be_listed_is_a_failed_series_not_passed_over(tmp_path, monkeypatch):
    """A folder of the tree that cannot be listed (no read permission: tests run as root here, which reads any
    folder, so the listing is refused by hand) is reported as failed, naming the folder and why, not left out of
    the run in silence: its series would never be denoised and the run would exit 0."""
    from pydicom.uid import generate_uid

    root = tmp_path / "archive"
    _ct_small_series(root / "readable", 2, generate_uid())
    _ct_small_series(root / "locked", 2, generate_uid())
    real_scandir = os.scandir

    def scandir(path=None):
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = {i.key.split("#")[0]: i for i in discover_tree(root, tmp_path / "out")}
    assert set(items) == {"dicom:readable", "dicom:locked"}
    assert items["dicom:readable"].problem is None
    assert items["dicom:locked"].problem == f"cannot list the folder {root / 'locked'}: Permission denied"


def test_a_series_neither_ct_nor_mr_names_its_modality_not_a_filter_as_the_fix(tmp_path):
    """An RT dose grid (pydicom's real RTDOSE file: an image, Modality RTDOSE) fails saying its modality, not
    denoise's "cannot tell whether it is CT or MR: give --modality ct|mr", which in denoise-batch is a filter."""
    from pydicom.data import get_testdata_file

    root = tmp_path / "archive"
    (root / "dose").mkdir(parents=True)
    shutil.copy(get_testdata_file("rtdose.dcm"), root / "dose" / "rtdose.dcm")
    result = run_here(root, tmp_path / "out")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "its Modality is RTDOSE: only CT and MR series are denoised" in result.stdout, result.stdout
    assert "cannot tell" not in result.stdout


def _series_and_file_tree(root: Path, shared_data: Path) -> Path:
    """``root/ct/``: a real CT series of 4 slices (written as a derived-series folder); ``root/crop.nii.gz``: a
    small real CT volume (written as a file)."""
    from pydicom.uid import generate_uid

    (root / "ct").mkdir(parents=True)
    files = sorted((shared_data / "dicom" / "ct_abdomen_siemens_j2k_slab").iterdir())[:4]
    study, series = generate_uid(), generate_uid()
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber, ds.PatientID = study, series, 3, "BATCH"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(root / "ct" / f"{k}.dcm")
    image = sitk.ReadImage(str(shared_data / "ct_abdomen_pelvis_resampled_3mm.nii.gz"))
    sitk.WriteImage(image[20:84, 20:84, 40:46], str(root / "crop.nii.gz"))
    return root


def test_outputs_reach_the_disk_before_their_done_record_and_cut_ones_are_done_again(tmp_path, shared_data):
    """A power cut soon after a batch renamed an output into place could leave an empty file under the final name
    (written without fsync), which the rerun skipped as done. Each output file is now fsync'ed before its rename and
    its folder after, all before the series' "done" record (a spy on os.fsync that still syncs), and a rerun
    finds a real empty or cut output file, sets it aside and writes it again; whole outputs are still skipped."""
    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    spy, log = tmp_path / "fsync_spy.py", tmp_path / "fsynced.json"
    spy.write_text(f"""
import atexit, json, os, runpy, sys
real, synced = os.fsync, []
def fsync(fd):
    synced.append(os.readlink(f"/proc/self/fd/{{fd}}"))
    return real(fd)
os.fsync = fsync
atexit.register(lambda: open({str(log)!r}, "w").write(json.dumps(synced)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    first = processes.run([sys.executable, spy, CLI, *batch_args(root, out, "--no-progress")], TIMEOUT, env=_env())
    assert first.returncode == 0 and "2 series: 2 done" in first.stdout, first.stdout + first.stderr
    synced = json.loads(log.read_text())
    crop, (series,) = out / "crop.nii.gz", list((out / "ct").iterdir())
    for files, folder, temp in ((["crop.nii.gz"], out, f".{crop.name}.tmp-*"),
                                (sorted(f.name for f in series.iterdir()), out / "ct", f".{series.name}.tmp-*")):
        assert len(files) in (1, 4), files
        written = [max(i for i, path in enumerate(synced) if fnmatch.fnmatch(path, f"{folder}/{temp}/{name}"))
                   for name in files]  # each file synced in the temporary folder, before its rename
        renamed = [i for i, path in enumerate(synced) if path == str(folder)]  # the rename synced
        assert renamed and max(written) < renamed[-1], (files, synced)
        # the series' "done" record (the manifest's append, synced) comes after
        assert str(out / MANIFEST_DIR / "rank-00000.jsonl") in synced[renamed[-1]:], synced
    whole = {p: volume_of(p) for p in (crop, series)}
    # a power cut: the NIfTI file empty, one slice of the series cut in half
    crop.write_bytes(b"")
    cut = sorted(series.iterdir())[1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    again = run_here(root, out, "--no-progress")
    assert again.returncode == 0 and "2 series: 2 done, 0 skipped, 0 failed" in again.stdout, \
        again.stdout + again.stderr
    assert "holds an empty file (crop.nii.gz)" in again.stderr and "cut short or changed since" in again.stderr
    for path, (array, spacing, origin) in whole.items():
        after = volume_of(path)
        np.testing.assert_array_equal(after[0], array)
        assert after[1:] == (spacing, origin)
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST_DIR) == ["crop.nii.gz", "ct"]
    assert not [p for p in out.rglob(".*") if MANIFEST_DIR not in p.parts], list(out.rglob(".*"))  # nothing left
    assert len(list((out / "ct").iterdir())) == 1 and len(list(series.iterdir())) == 4
    whole_again = run_here(root, out, "--no-progress")
    assert "2 series: 0 done, 2 skipped" in whole_again.stdout, whole_again.stdout + whole_again.stderr


def _merged(out: Path) -> dict[str, dict]:
    """The merged manifest by key's last part ("crop.nii.gz", "ct")."""
    rows = [json.loads(line) for line in (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()]
    return {("crop.nii.gz" if r["key"].endswith("crop.nii.gz") else "ct"): r for r in rows}


def test_a_rerun_checks_outputs_and_inputs_by_content_not_by_size(tmp_path, shared_data):
    """A rerun judged an earlier output whole by its size: an output overwritten with other bytes of the same size
    (a corrupted slice, another result copied over it) was skipped as done, and so was a DICOM series whose files
    changed under the same UID and slices (a corrected series sent again). The done record now keeps the SHA-256
    of the output and of the input it came from: a mismatch is denoised again, saying why; files whose stat (size,
    times, inode) is as recorded are not read, and ones only touched are read once and skipped."""
    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    first = run_here(root, out, "--no-progress")
    assert first.returncode == 0 and "2 series: 2 done" in first.stdout, first.stdout + first.stderr
    records = _merged(out)
    assert all(len(r["output_sha256"]) == len(r["input_sha256"]) == 64 for r in records.values()), records
    crop, (series,) = out / "crop.nii.gz", list((out / "ct").iterdir())
    whole = {p: volume_of(p) for p in (crop, series)}
    # the same sizes, other contents: the tail of a slice's pixels zeroed, a byte of the NIfTI file changed
    slice_file = sorted(series.iterdir())[1]
    data = bytearray(slice_file.read_bytes())
    data[-4000:] = bytes(4000)
    slice_file.write_bytes(bytes(data))
    data = bytearray(crop.read_bytes())
    data[len(data) // 2] ^= 0xFF
    crop.write_bytes(bytes(data))
    again = run_here(root, out, "--no-progress")
    assert again.returncode == 0 and "2 series: 2 done, 0 skipped, 0 failed" in again.stdout, \
        again.stdout + again.stderr
    assert again.stderr.count("does not hold what this batch wrote") == 2, again.stderr
    for path, (array, spacing, origin) in whole.items():
        after = volume_of(path)
        np.testing.assert_array_equal(after[0], array)
        assert after[1:] == (spacing, origin)
    assert "does not hold what this batch wrote" in _merged(out)["ct"]["redone"]
    # touched only (times changed, contents not): read once, skipped, and not read again by the next rerun
    for path in (crop, *series.iterdir(), *(root / "ct").iterdir(), root / "crop.nii.gz"):
        os.utime(path, ns=(time.time_ns(), time.time_ns()))
    touched = run_here(root, out, "--no-progress")
    assert "2 series: 0 done, 2 skipped" in touched.stdout and "denoising again" not in touched.stderr, \
        touched.stdout + touched.stderr
    refreshed = _merged(out)
    for path in (crop, series):
        assert refreshed["crop.nii.gz" if path == crop else "ct"]["output_stat"] != records[
            "crop.nii.gz" if path == crop else "ct"]["output_stat"]
    # the DICOM series changed under the same UID and slices (one slice's pixels): denoised again
    ds = pydicom.dcmread(sorted((root / "ct").iterdir())[2])
    ds.decompress()
    pixels = ds.pixel_array.copy()
    pixels[100:200, 100:200] = pixels.max()
    ds.PixelData = pixels.tobytes()
    ds.save_as(sorted((root / "ct").iterdir())[2])
    # and the NIfTI input replaced by another volume of the same grid
    image = sitk.ReadImage(str(root / "crop.nii.gz"))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16) + 50, str(root / "crop.nii.gz"))
    changed = run_here(root, out, "--no-progress")
    assert "2 series: 2 done, 0 skipped" in changed.stdout, changed.stdout + changed.stderr
    assert "the series' files changed since (same SeriesInstanceUID and slices" in changed.stderr, changed.stderr
    assert "its input changed since its output was written" in changed.stderr, changed.stderr
    assert not np.array_equal(volume_of(series)[0], whole[series][0])
    assert not np.array_equal(volume_of(crop)[0], whole[crop][0])
    last = run_here(root, out, "--no-progress")
    assert "2 series: 0 done, 2 skipped" in last.stdout, last.stdout + last.stderr


def test_a_rerun_reads_no_input_or_output_whose_stat_is_as_recorded(tmp_path, shared_data, monkeypatch):
    """The content checks cost no reading on a rerun of an untouched archive: nothing is hashed."""
    from lib.batch import runner
    from lib.batch.discovery import SeriesFilter
    from lib.batch.runner import BatchSettings, run_rank
    from lib.model_dispatch import DenoiseOptions

    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    settings = BatchSettings(source=str(root), output=out, options=DenoiseOptions(model="gaussian"), device="cpu",
                             series_filter=SeriesFilter(), progress=False)
    items = runner.plan_series(settings)
    assert run_rank(settings, items, 0, 1, "cpu").done == 2
    hashed: list[str] = []
    real = runner.file_sha256
    monkeypatch.setattr(runner, "file_sha256", lambda path: hashed.append(str(path)) or real(path))
    summary = run_rank(settings, runner.plan_series(settings), 0, 1, "cpu")
    assert summary.skipped == 2 and hashed == []
    # touched (copied back, restored from a backup...): read once, found as recorded, then not read again
    for path in (root / "crop.nii.gz", *(root / "ct").iterdir(), out / "crop.nii.gz"):
        os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert run_rank(settings, runner.plan_series(settings), 0, 1, "cpu").skipped == 2
    assert sorted(Path(p).name for p in hashed) == ["0.dcm", "1.dcm", "2.dcm", "3.dcm", "crop.nii.gz", "crop.nii.gz"]
    hashed.clear()
    assert run_rank(settings, runner.plan_series(settings), 0, 1, "cpu").skipped == 2 and hashed == []


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_run_killed_after_writing_and_before_its_done_record_leaves_one_whole_output(tmp_path, shared_data,
                                                                                     kill_at):
    """The batch process SIGKILLs itself as it is about to append the ``kill_at``-th "done" record (1: a DICOM
    series, written as a derived-series folder; 2: a NIfTI file), after its output is in place: the rerun does
    that series again and replaces the output in place (one output per series, no second copy, no temporary left,
    the same values), and skips the one recorded as done."""
    root = _series_and_file_tree(tmp_path / "tree", shared_data)
    killer = tmp_path / "kill_at_done.py"  # the CLI, killed (SIGKILL, no clean-up) at the chosen record
    killer.write_text(f"""
import os, runpy, signal, sys
from lib.batch.manifest import Manifest
append, seen = Manifest.append, []
def killing_append(self, record):
    if record.get("status") == "done":
        seen.append(record)
        if len(seen) == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    return append(self, record)
Manifest.append = killing_append
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    out = tmp_path / "out"
    killed = processes.run([sys.executable, killer, CLI, *batch_args(root, out, "--no-progress")], TIMEOUT,
                           env=_env())
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    rows = read_records(out / MANIFEST_DIR)
    assert [r["status"] for r in rows] == ["started", "done", "started"][:2 * kill_at - 1], rows
    written = Path(rows[-1]["output"])
    assert written.exists()  # in place, whole (renamed into place), but not recorded as done
    before = volume_of(written)
    again = run_here(root, out, "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"2 series: {3 - kill_at} done, {kill_at - 1} skipped, 0 failed" in again.stdout, again.stdout
    after = volume_of(written)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1:] == before[1:]
    outputs = sorted(str(p.relative_to(out)) for p in out.rglob("*") if MANIFEST_DIR not in p.relative_to(out).parts)
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST_DIR) == ["crop.nii.gz", "ct"], outputs
    assert not [p for p in outputs if "/." in f"/{p}"], outputs  # no temporary or old copy left
    derived = [p for p in (out / "ct").iterdir()]
    assert len(derived) == 1 and sorted(f.name for f in derived[0].iterdir()) == [f"IM{k:05d}.dcm" for k in
                                                                                  range(1, 5)], outputs
    assert latest_statuses(out) == ["done", "done"]


def test_a_series_whose_done_record_cannot_be_written_is_failed_and_its_output_not_left_as_done(tmp_path,
                                                                                               shared_data):
    """The file holding the records reaches its size limit as the first "done" record is appended (the real
    kernel limit, RLIMIT_FSIZE, lowered to a few bytes past the file's size for that append alone): the kernel
    writes part of the line and refuses the rest. The append took the short write for a record, the series was
    counted done and its output kept under its name, while the rank file held a cut line that readers skip. Now the
    cut part is removed, the series is failed saying why, its output is moved aside, the other series is done and
    recorded on a line of its own, and a rerun denoises the failed one again and skips the other."""
    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    # the CLI, with the file size limit reached at the first done record
    limiter = write_limiter(tmp_path / "limit_at_done.py", 'record.get("status") == "done" and not seen')
    first = processes.run([sys.executable, limiter, CLI, *batch_args(root, out, "--no-progress")], TIMEOUT,
                          env=_env())
    assert first.returncode == 1, first.stdout + first.stderr
    assert "2 series: 1 done, 0 skipped, 1 failed" in first.stdout, first.stdout + first.stderr
    (failed,) = [line for line in first.stdout.splitlines() if line.startswith("failed: ")]
    assert failed.startswith("failed: dicom:ct#") and "denoised, but its done record cannot be written to " \
        f"{out / MANIFEST_DIR / 'rank-00000.jsonl'} (" in failed and "File too large" in failed and \
        "its output was moved aside" in failed, failed
    left = sorted(p.name for p in (out / "ct").iterdir())
    assert len(left) == 1 and left[0].startswith(".") and ".old-" in left[0], left  # not under its name
    lines = (out / MANIFEST_DIR / "rank-00000.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # no cut line left
    assert [(r["key"].split("#")[0], r["status"]) for r in rows] == [
        ("dicom:ct", "started"), ("dicom:ct", "failed"), ("file:crop.nii.gz", "started"),
        ("file:crop.nii.gz", "done")], rows
    assert "done record cannot be written" in rows[1]["error"]
    assert latest_statuses(out) == ["failed", "done"]  # the merge, by key
    again = run_here(root, out, "--no-progress")
    assert again.returncode == 0 and "2 series: 1 done, 1 skipped, 0 failed" in again.stdout, \
        again.stdout + again.stderr
    (series,) = (out / "ct").iterdir()  # the set-aside copy removed by the write
    assert sorted(f.name for f in series.iterdir()) == [f"IM{k:05d}.dcm" for k in range(1, 5)]
    assert latest_statuses(out) == ["done", "done"]


def latest_statuses(out: Path) -> list[str]:
    rows = [json.loads(line) for line in (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()]
    return [r["status"] for r in rows]


def test_the_dicomweb_clients_first_retry_wait_and_read_timeout_come_from_the_environment(monkeypatch):
    """``ADL_DICOMWEB_RETRY_WAIT_S`` (the tests shorten the 30 s a request to a server that is down costs) sets the
    first wait of the client's retries, later waits doubling; unset, dicomweb-client's own 2 s; not a number >= 0:
    refused in one line naming the variable. ``ADL_PACS_READ_TIMEOUT_S`` that is not seconds > 0 is refused as the
    client is made, before any request."""
    from lib.batch.dicomweb import RETRY_WAIT_ENV, make_client

    monkeypatch.delenv(RETRY_WAIT_ENV, raising=False)
    default = make_client("http://127.0.0.1:9/dicom-web")
    assert default._max_attempts == 5 and default._wait_exponential_multiplier * 2 == 2000  # ms
    monkeypatch.setenv(RETRY_WAIT_ENV, "0.05")
    short = make_client("http://127.0.0.1:9/dicom-web")
    assert short._max_attempts == 5 and short._wait_exponential_multiplier * 2 == pytest.approx(50)
    assert short._http_retrable_errors == default._http_retrable_errors
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(RETRY_WAIT_ENV, bad)
        with pytest.raises(ValueError, match=RETRY_WAIT_ENV):
            make_client("http://127.0.0.1:9/dicom-web")
    monkeypatch.delenv(RETRY_WAIT_ENV)
    monkeypatch.setenv("ADL_PACS_READ_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="ADL_PACS_READ_TIMEOUT_S='0'"):
        make_client("http://127.0.0.1:9/dicom-web")


def test_a_metaimage_output_is_whole_only_with_its_data_file(tmp_path):
    """A .mhd output keeps its voxels in a second file (.zraw): an empty data file beside a whole header is a cut
    output too, and a missing one is one whose size differs from the record."""
    from lib.batch.runner import _output_damage, _output_size
    from lib.imaging import write_volume

    image = sitk.GetImageFromArray(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8) - 1000)
    sitk.WriteImage(image, str(tmp_path / "in.nii.gz"))
    output = write_volume(read_volume(tmp_path / "in.nii.gz", modality="CT"), tmp_path / "out" / "ct.mhd",
                          durable=True)
    record = {"output": str(output.resolve()), **_output_size(output)}
    assert record["output_files"] == 2 and _output_damage(record, output) == ""
    data = tmp_path / "out" / "ct.zraw"
    whole = data.read_bytes()
    data.write_bytes(b"")
    assert "holds an empty file (ct.zraw)" in _output_damage(record, output)
    data.write_bytes(whole[: len(whole) // 2])
    assert "cut short or changed since" in _output_damage(record, output)
    data.unlink()
    assert "cannot be read" in _output_damage(record, output)


def test_a_cut_metaimage_output_is_written_again_with_its_data_file(tmp_path, shared_data):
    """A MetaImage output whose data file (.zraw) a power cut left empty was set aside header only: the data file
    left beside it refused every rewrite ("already exists"), so the series failed on every rerun. The data file now
    goes aside with its header, and the rewrite removes both copies."""
    root, out = tmp_path / "tree", tmp_path / "out"
    root.mkdir()
    image = sitk.ReadImage(str(shared_data / "ct_abdomen_pelvis_resampled_3mm.nii.gz"))
    sitk.WriteImage(sitk.Cast(image[20:84, 20:84, 40:46], sitk.sitkInt16), str(root / "ct.mhd"))
    run = _in_process(root, out)
    assert run().done == 1
    whole = volume_of(out / "ct.mhd")
    (out / "ct.zraw").write_bytes(b"")
    summary = run()
    assert (summary.done, summary.failed) == (1, 0), summary
    np.testing.assert_array_equal(volume_of(out / "ct.mhd")[0], whole[0])
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_DIR, "ct.mhd", "ct.zraw"]


# ------------------------------------------------------------------------------------------------ rerun cases
def _in_process(root: Path, out: Path):
    """``run()``: one in-process run of the batch over ``root`` (gaussian, CPU) -> its summary."""
    from lib.batch import runner
    from lib.batch.discovery import SeriesFilter
    from lib.batch.runner import BatchSettings, run_rank
    from lib.model_dispatch import DenoiseOptions

    settings = BatchSettings(source=str(root), output=out, options=DenoiseOptions(model="gaussian"), device="cpu",
                             series_filter=SeriesFilter(), progress=False)
    return lambda: run_rank(settings, runner.plan_series(settings), 0, 1, "cpu")


def _last_records(out: Path) -> dict[str, dict]:
    """The last record of each series (this rank's file: what a rerun reads), by key's first part."""
    return {r["key"].split("#")[0]: r for r in read_records(out / MANIFEST_DIR)}


def test_a_rerun_denoises_again_a_deleted_output_and_refuses_an_output_it_did_not_write(tmp_path, shared_data):
    """A done series whose output was deleted (a file, a derived-series folder) is denoised again, not skipped; an
    output under a series' output name that no run of this batch wrote (a user's own file, on a first run) fails
    the series naming it, and the file is left as it was."""
    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    run = _in_process(root, out)
    assert run().done == 2
    crop, (series,) = out / "crop.nii.gz", list((out / "ct").iterdir())
    whole = {p: volume_of(p) for p in (crop, series)}
    crop.unlink()
    shutil.rmtree(series)
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (2, 0, 0), summary
    for path, (array, spacing, origin) in whole.items():
        np.testing.assert_array_equal(volume_of(path)[0], array)
    assert not any(r.get("redone") for r in _last_records(out).values())  # missing: nothing to say
    assert (run().skipped, run().done) == (2, 0)

    other = tmp_path / "other_out"
    other.mkdir()
    (other / "crop.nii.gz").write_bytes(b"a user's own file")
    summary = _in_process(root, other)()
    assert (summary.done, summary.failed) == (1, 1), summary
    assert "exists and was not written by this batch (no manifest record)" in summary.failures[0][1]
    assert (other / "crop.nii.gz").read_bytes() == b"a user's own file"


def test_an_output_made_from_an_earlier_input_is_not_left_under_its_name_when_the_redo_fails(tmp_path, shared_data):
    """An input replaced by another scan (a NIfTI file holding another volume; a DICOM series whose files changed
    under the same UID) whose redo fails (a NaN; a slice cut short) left the output of the earlier scan under the
    name of the new one: the folder showed a result for an input it was not made from. That output is now moved
    aside before the redo (as a damaged one is): a failed redo leaves no output under the name, a redo that succeeds
    writes it as before and removes the copy."""
    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    run = _in_process(root, out)
    assert run().done == 2
    crop, (series,) = out / "crop.nii.gz", list((out / "ct").iterdir())
    inputs = {p: p.read_bytes() for p in (root / "crop.nii.gz", *sorted((root / "ct").iterdir()))}
    other = np.full((4, 16, 16), 100.0, np.float32)
    other[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(other), str(root / "crop.nii.gz"))
    ds = pydicom.dcmread(sorted((root / "ct").iterdir())[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # the same header, its pixels cut short
    ds.save_as(sorted((root / "ct").iterdir())[1])
    summary = run()
    assert (summary.done, summary.failed) == (0, 2), summary
    errors = dict(summary.failures)
    assert "contains 1 NaN values" in errors["file:crop.nii.gz"], errors
    records = _last_records(out)
    assert "its input changed since its output was written" in records["file:crop.nii.gz"]["redone"]
    assert "the series' files changed since" in records["dicom:ct"]["redone"], records["dicom:ct"]
    assert not crop.exists() and not series.exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([MANIFEST_DIR, "ct"])
    assert [p for p in (out / "ct").iterdir() if not p.name.startswith(".")] == []
    for path, data in inputs.items():  # the scans back: written again, the copies removed
        path.write_bytes(data)
    summary = run()
    assert (summary.done, summary.failed) == (2, 0), summary
    assert crop.exists() and series.is_dir() and not [p for p in out.rglob(".*") if MANIFEST_DIR not in p.parts]


def _retagged(path: Path) -> None:
    """The DICOM file ``path`` rewritten with an ImageComments: the same slice, other contents."""
    ds = pydicom.dcmread(path)
    ds.ImageComments = "changed since"
    ds.save_as(path)


def test_the_output_of_a_series_refused_before_its_check_is_moved_aside(tmp_path, shared_data):
    """A series refused before its input could be compared with the one its output was made from (a file input now
    a link to nothing: unreadable; a DICOM series now split over two folders) failed, and left the earlier input's
    output under its name. That output is now moved aside (as that of a replaced input is) on evidence that its
    input is gone or another: the file is gone; the folder's own files no longer hash to its record. A stray slice
    copied into another folder leaves the original folder's output in place (its files still as recorded), and a
    rerun once that copy is removed skips it; a rerun once the inputs are back writes the others again."""
    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    run = _in_process(root, out)
    assert run().done == 2
    crop, (series,) = out / "crop.nii.gz", list((out / "ct").iterdir())
    (root / "crop.nii.gz").rename(tmp_path / "crop.nii.gz")
    (root / "crop.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # a mount gone, a link to a moved file
    (root / "ct2").mkdir()
    shutil.copy2(sorted((root / "ct").iterdir())[1], root / "ct2" / "1.dcm")
    summary = run()
    assert (summary.done, summary.failed) == (0, 3), summary
    errors = {key.split("#")[0]: error for key, error in summary.failures}
    assert errors["file:crop.nii.gz"].startswith(f"cannot read {root / 'crop.nii.gz'}"), errors
    assert f"its output {crop}, written from an earlier input, was moved aside" in errors["file:crop.nii.gz"], errors
    assert "split over 2 folders" in errors["dicom:ct"], errors
    assert errors["dicom:ct"].endswith(f"; its output {series}, made from these files as they are now, is left in "
                                       "place"), errors
    assert not crop.exists() and series.is_dir()
    assert "moved aside" not in errors["dicom:ct2"], errors  # no output of its own
    shutil.rmtree(root / "ct2")  # the stray copy removed: the kept output skipped, not denoised again
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (0, 1, 1), summary
    (root / "ct2").mkdir()  # split again, the folder's own files now other than those its output was made from
    shutil.copy2(sorted((root / "ct").iterdir())[1], root / "ct2" / "1.dcm")
    _retagged(sorted((root / "ct").iterdir())[2])
    summary = run()
    errors = {key.split("#")[0]: error for key, error in summary.failures}
    assert f"its output {series}, written from an earlier input, was moved aside" in errors["dicom:ct"], errors
    assert not series.exists()
    (root / "crop.nii.gz").unlink()
    (tmp_path / "crop.nii.gz").rename(root / "crop.nii.gz")
    shutil.rmtree(root / "ct2")
    summary = run()
    assert (summary.done, summary.failed) == (2, 0), summary
    assert crop.exists() and series.is_dir() and not [p for p in out.rglob(".*") if MANIFEST_DIR not in p.parts]


def test_an_input_that_cannot_be_read_now_leaves_its_output_in_place(tmp_path, shared_data):
    """A read error that says nothing of the input (EIO, EACCES, a dropped share; here a link loop, ELOOP, which a
    root test run cannot be denied as it can a permission) on a rerun moved every done output aside: the user had
    to denoise the archive again. The series now fails saying why, its output stays under its name, and once the
    input reads again the rerun skips it. (A file input; a DICOM series whose slice breaks after discovery.)"""
    from lib.batch import runner
    from lib.batch.discovery import SeriesFilter
    from lib.batch.runner import BatchSettings, run_rank
    from lib.model_dispatch import DenoiseOptions

    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    settings = BatchSettings(source=str(root), output=out, options=DenoiseOptions(model="gaussian"), device="cpu",
                             series_filter=SeriesFilter(), progress=False)
    assert run_rank(settings, runner.plan_series(settings), 0, 1, "cpu").done == 2
    crop, (series,) = out / "crop.nii.gz", list((out / "ct").iterdir())
    before = {path: path.read_bytes() for path in [crop, *series.iterdir()]}
    slice_ = sorted((root / "ct").iterdir())[1]
    planned = runner.plan_series(settings)  # then both inputs break: each a link to itself
    for path in (root / "crop.nii.gz", slice_):
        path.rename(tmp_path / path.name)
        path.symlink_to(path.name)
    summary = run_rank(settings, planned, 0, 1, "cpu")
    assert (summary.done, summary.skipped, summary.failed) == (0, 0, 2), summary
    errors = {key.split("#")[0]: error for key, error in summary.failures}
    for key, output in (("file:crop.nii.gz", crop), ("dicom:ct", series)):
        assert errors[key].startswith("cannot read ") and "Too many levels of symbolic links" in errors[key], errors
        assert errors[key].endswith(f"; its output {output} is left in place (not found gone nor changed: a rerun "
                                    "checks it again)"), errors
    assert {path: path.read_bytes() for path in [crop, *series.iterdir()]} == before
    assert not [p for p in out.rglob(".*") if MANIFEST_DIR not in p.parts]
    for path in (root / "crop.nii.gz", slice_):
        path.unlink()
        (tmp_path / path.name).rename(path)
    summary = run_rank(settings, runner.plan_series(settings), 0, 1, "cpu")
    assert (summary.done, summary.skipped, summary.failed) == (0, 2, 0), summary



def test_a_slice_the_storage_cannot_read_or_copied_twice_fails_its_series_before_its_output_is_touched(tmp_path,
                                                                                                     shared_data):
    """A slice whose file the storage cannot read at discovery (a link to itself: its stat fails, ELOOP, as with EIO
    or a dropped share; chmod would not stop a root test run) was passed over as "not a file": the series, one slice
    short, was taken for one with other slices, its output moved aside, and without its last slice (even spacing) it
    was denoised and written a slice short. A slice copied twice into the folder (one SOPInstanceUID) likewise cost
    the output before the reader refused the copy. Each now fails its series at discovery naming the file and why (a
    read error of the storage, told apart from a damaged file; the copy byte for byte, told apart from two versions of
    one image) and the output stays until the folder reads again; two versions of one image are evidence against the
    output (moved aside), also when the first pair found is a byte-identical copy of another slice (only that pair was
    compared: "copied twice", the output kept). A hidden entry (an editor's lock link ``.#0.dcm`` to nothing) is no
    slice: it failed the series as a file the storage cannot read; it is passed over. Two byte-identical file inputs
    are one job: each output is now checked against its own record (a changed one was skipped, checked against the
    other's)."""
    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    run = _in_process(root, out)
    assert run().done == 2
    (series,) = list((out / "ct").iterdir())
    before = {path.name: path.read_bytes() for path in series.iterdir()}
    slices = sorted((root / "ct").iterdir())
    last = slices[-1]
    last.rename(tmp_path / last.name)
    last.symlink_to(last.name)
    (root / "only").mkdir()
    (root / "only" / "0.dcm").symlink_to("0.dcm")  # a folder whose one file cannot be read
    items = {item.key.split("#")[0]: item for item in discover_tree(root, tmp_path / "out")}
    assert items["dicom:only"].keeps_output and not items["dicom:only"].input_refused, items["dicom:only"]
    assert "0.dcm cannot be read from the storage ([Errno 40] Too many levels" in items["dicom:only"].problem
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (0, 1, 2), summary
    errors = {key.split("#")[0]: error for key, error in summary.failures}
    assert errors["dicom:ct"].startswith(f"{root / 'ct'}: 1 DICOM file(s) cannot be read: 3.dcm cannot be read from "
                                         "the storage ([Errno 40] Too many levels of symbolic links"), errors
    assert errors["dicom:ct"].endswith("a read error of the disk or share, not a damaged file: the series is not read "
                                       f"without it; check the storage, then try again; its output {series} is left "
                                       "in place (not found gone nor changed: a rerun checks it again)"), errors
    assert {path.name: path.read_bytes() for path in series.iterdir()} == before
    assert not [p for p in out.rglob(".*") if MANIFEST_DIR not in p.parts]
    last.unlink()
    (tmp_path / last.name).rename(last)
    shutil.rmtree(root / "only")
    (root / "ct" / ".#0.dcm").symlink_to("user@host.4242:1700000000")  # an editor's lock link: hidden, no slice
    assert run().skipped == 2  # the done record still holds: nothing denoised again

    copy = root / "ct" / "1 copy.dcm"
    shutil.copy2(slices[1], copy)
    sop = pydicom.dcmread(copy, stop_before_pixels=True).SOPInstanceUID
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (0, 1, 1), summary
    (error,) = [error for _, error in summary.failures]
    assert error.endswith(f": 1 copy.dcm and 1.dcm are the same image (SOPInstanceUID {sop}), byte for byte: one "
                          f"slice copied twice; remove the copy; its output {series} is left in place (not found "
                          "gone nor changed: a rerun checks it again)"), error
    assert {path.name: path.read_bytes() for path in series.iterdir()} == before
    _retagged(copy)
    shutil.copy2(slices[0], root / "ct" / "0 copy.dcm")  # a slice copied twice beside two versions of another
    summary = run()
    (error,) = [error for _, error in summary.failures]
    assert f"1 copy.dcm and 1.dcm hold other contents under one SOPInstanceUID ({sop}) (and 1 more): two versions " \
        "of one image; keep the right one; its output" in error and "was moved aside" in error, error
    copy.unlink()
    (root / "ct" / "0 copy.dcm").unlink()
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (1, 1, 0), summary

    crop = out / "crop.nii.gz"
    shutil.copy2(root / "crop.nii.gz", root / "crop copy.nii.gz")
    assert run().done == 1
    data = bytearray(crop.read_bytes())
    data[len(data) // 2] ^= 0xFF
    crop.write_bytes(bytes(data))
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (1, 2, 0), summary
    assert "does not hold what this batch wrote" in _last_records(out)["file:crop.nii.gz"]["redone"]

def test_a_slice_pydicom_cannot_parse_is_a_damaged_file_not_a_read_error_of_the_storage(tmp_path):
    """A slice cut inside a sequence of undefined length makes pydicom raise its own IOError ("No tag to read at file
    position ..."), with or without the 128-byte preamble. Batch discovery took every OSError while pydicom parsed a
    file for a read error of the storage: the series was failed with "check the storage, then try again" and its
    earlier output kept as if the file might read tomorrow. It is a damaged slice: the series is failed naming it,
    with the advice to replace or remove it, and its output is evidence against (``input_refused``). A real read
    error of the storage while pydicom parses (an OSError with an errno) could not be made here: the test runs as
    root (no EACCES) and the file's first bytes, read just before, must be readable."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    root = tmp_path / "archive"
    for name in ("no_preamble", "preamble"):
        slices = _ct_small_series(root / name, 3, generate_uid())
        ds = pydicom.dcmread(slices[1])
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D0050", "SRT", "Abdomen"
        ds.AnatomicRegionSequence = Sequence([code])
        ds["AnatomicRegionSequence"].is_undefined_length = True
        ds.save_as(slices[1])
        data = slices[1].read_bytes()
        cut = data.index(b"\x08\x00\x18\x22") + 12  # inside the sequence, before its item's tag
        slices[1].write_bytes(data[132:cut] if name == "no_preamble" else data[:cut])
        assert (slices[1].read_bytes()[:2] == b"\x02\x00") == (name == "no_preamble")  # the file meta group first
        with pytest.raises(OSError, match="No tag to read at file position") as raised:
            pydicom.dcmread(slices[1], stop_before_pixels=True, force=True)
        assert raised.value.errno is None
    items = {item.key.split("#")[0]: item for item in discover_tree(root, tmp_path / "out")}
    for name in ("no_preamble", "preamble"):
        item = items[f"dicom:{name}"]
        assert item.input_refused and not item.keeps_output, item
        assert re.search(r"1 DICOM file\(s\) cannot be read: PAT_A_001\.dcm cannot be read \(No tag to read at file "
                         r"position [0-9A-F]+\); a series with a damaged slice is not read .*: replace or remove the "
                         r"file$", item.problem), item.problem
        assert "storage" not in item.problem, item.problem


def test_a_series_copied_whole_into_a_second_folder_is_told_a_copy_not_split(tmp_path):
    """A series copied whole into a second folder (every instance in both) was refused as "split over 2 folders: put
    all its slices in one folder"; doing so only had it refused as slices copied twice. It is told a copy (keep one
    folder); a series split over folders with some instances in both is told so (each instance once); one split
    without copies keeps its message. Each stays refused at discovery, nothing merged. (Real DICOM files.)"""
    from pydicom.uid import generate_uid

    root = tmp_path / "archive"
    copied, split, overlapping = generate_uid(), generate_uid(), generate_uid()
    _ct_small_series(root / "copied" / "a", 4, copied)
    shutil.copytree(root / "copied" / "a", root / "copied" / "b")
    _ct_small_series(root / "split" / "part1", 3, split)
    _ct_small_series(root / "split" / "part2", 3, split, start=3)
    first = _ct_small_series(root / "overlap" / "part1", 3, overlapping)
    _ct_small_series(root / "overlap" / "part2", 2, overlapping, start=3)
    shutil.copy2(first[2], root / "overlap" / "part2")  # one instance in both folders
    items = {item.key.split("#")[0]: item for item in discover_tree(root, tmp_path / "out")}
    for part in ("a", "b"):
        item = items[f"dicom:copied/{part}"]
        assert item.input_refused and item.problem == (
            f"series {copied} is copied whole in 2 folders ({root / 'copied' / 'a'}, {root / 'copied' / 'b'}): each "
            "holds all its 4 instances (the same SOPInstanceUIDs): keep one of the folders and remove the other "
            "copies"), item
    for part in ("part1", "part2"):
        assert items[f"dicom:split/{part}"].problem == (
            f"series {split} is split over 2 folders ({root / 'split' / 'part1'}, {root / 'split' / 'part2'}): put "
            "all its slices in one folder"), items[f"dicom:split/{part}"]
        assert items[f"dicom:overlap/{part}"].problem == (
            f"series {overlapping} is split over 2 folders ({root / 'overlap' / 'part1'}, "
            f"{root / 'overlap' / 'part2'}), 1 of its 5 instances in more than one of them (copies): put all its "
            "slices in one folder, each instance once"), items[f"dicom:overlap/{part}"]
    # the old advice followed: the copy's slices put in one folder are slices copied twice
    for path in (root / "copied" / "b").iterdir():
        path.rename(root / "copied" / "a" / f"copy {path.name}")
    (root / "copied" / "b").rmdir()
    items = {item.key.split("#")[0]: item for item in discover_tree(root, tmp_path / "out")}
    assert "one slice copied twice; remove the copy" in items["dicom:copied/a"].problem, items["dicom:copied/a"]


def _restudied(files: list[Path], folder: Path, study_uid: str, patient_id: str = "BATCH") -> None:
    """``files`` copied into ``folder`` (created) under ``study_uid`` and ``patient_id``: new SOP Instance UIDs, the
    same SeriesInstanceUID."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.PatientID = study_uid, patient_id
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{patient_id}_{study_uid[-6:]}_{path.name}", write_like_original=False)


def test_a_series_uid_found_in_two_studies_or_under_two_patients_is_refused_naming_them(tmp_path, shared_data):
    """One SeriesInstanceUID in two studies or under two patients of a folder tree (a mis-merged or mis-anonymised
    archive). In two folders it was refused as "split over 2 folders: put all its slices in one folder", advice that
    would merge two studies' slices; in one folder it was taken as one series, failing only when read. Each is now
    refused at discovery naming the studies and patients ("fix the archive"), nothing denoised; the earlier output of
    such a series is moved aside (as for a series split over folders) once its folder's files are no longer those it
    was made from (the original of a copy keeps it); the rest of the run goes on, and once the archive is fixed the
    series is denoised again. (Real DICOM files.)"""
    from pydicom.uid import generate_uid

    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    run = _in_process(root, out)
    assert run().done == 2
    (series,) = list((out / "ct").iterdir())
    files = sorted((root / "ct").iterdir())
    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    uid, study, copy_study = str(head.SeriesInstanceUID), str(head.StudyInstanceUID), generate_uid()
    _restudied(files, root / "copy", copy_study)
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (0, 1, 2), summary
    errors = {key.split("#")[0]: error for key, error in summary.failures}
    first, second = sorted([study, copy_study])
    expected = (f"series UID {uid} is listed in studies {first} and {second} (under patient BATCH): not denoised; fix "
                "the archive (one SeriesInstanceUID belongs to one study of one patient)")
    assert errors["dicom:copy"] == expected, errors
    # the original folder's output: its files still those it was made from, it stays
    assert errors["dicom:ct"] == (f"{expected}; its output {series}, made from these files as they are now, is left "
                                  "in place"), errors
    assert series.is_dir() and not (out / "copy").exists()
    _retagged(files[1])  # now other than those its output was made from: moved aside
    summary = run()
    errors = {key.split("#")[0]: error for key, error in summary.failures}
    assert errors["dicom:ct"] == (f"{expected}; its output {series}, written from an earlier input, was moved aside "
                                  "(a rerun that denoises the series writes it again)"), errors
    assert not series.exists()

    # one folder holding the UID's slices of two studies; two folders of one study under two patients
    _restudied(files[:2], tmp_path / "mixed" / "series", study)
    _restudied(files[2:], tmp_path / "mixed" / "series", copy_study)
    (item,) = discover_tree(tmp_path / "mixed", tmp_path / "mixed_out")
    assert item.problem == expected, item
    _restudied(files, tmp_path / "patients" / "p1", study, "P1")
    _restudied(files, tmp_path / "patients" / "p2", study, "P2")
    problems = {item.key.split("#")[0]: item.problem for item in discover_tree(tmp_path / "patients",
                                                                                 tmp_path / "patients_out")}
    assert len(problems) == 2, problems
    for key in ("dicom:p1", "dicom:p2"):
        assert problems[key] == (f"series UID {uid} is listed in study {study} (under patients P1 and P2): not "
                                 "denoised; fix the archive (one SeriesInstanceUID belongs to one study of one "
                                 "patient)"), problems

    # the archive fixed: denoised again
    shutil.rmtree(root / "copy")
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (1, 1, 0), summary
    assert series.is_dir() and len(list(series.iterdir())) == 4


def test_records_of_a_runner_that_kept_no_hashes_still_skip_whole_outputs_and_redo_empty_ones(tmp_path, shared_data):
    """Done records written before outputs and inputs were hashed (no ``output_sha256`` / ``input_sha256``, no stat
    keys, no sizes) still skip their whole outputs (nothing denoised again after an upgrade), still redo an empty
    one (a write cut short), and get the input's keys recorded once read."""
    root, out = _series_and_file_tree(tmp_path / "tree", shared_data), tmp_path / "out"
    run = _in_process(root, out)
    assert run().done == 2
    newer = ("output_sha256", "output_stat", "input_sha256", "input_stat", "output_bytes", "output_files")
    for records in (out / MANIFEST_DIR).glob("rank-*.jsonl"):
        rows = [json.loads(line) for line in records.read_text().splitlines()]
        records.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in newer}) + "\n" for r in rows))
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (0, 2, 0), summary
    assert _last_records(out)["file:crop.nii.gz"]["input_stat"]  # the file input was hashed: its keys recorded
    (out / "crop.nii.gz").write_bytes(b"")
    summary = run()
    assert (summary.done, summary.skipped) == (1, 1), summary
    assert "holds an empty file (crop.nii.gz)" in _last_records(out)["file:crop.nii.gz"]["redone"]
    assert run().skipped == 2


def test_a_series_without_uid_is_its_contents_on_a_rerun(tmp_path, shared_data, monkeypatch):
    """A hard-anonymised DICOM series (empty SeriesInstanceUID) is known by its contents: touched only, it is read
    once, skipped, and its new stat key recorded (the next rerun reads none of it); with other contents of the
    same slices it is another input, denoised again over its output, saying why."""
    from lib.batch import runner

    root, out = tmp_path / "tree", tmp_path / "out"
    (root / "anon").mkdir(parents=True)
    for k, path in enumerate(sorted((shared_data / "dicom" / "ct_abdomen_siemens_j2k_slab").iterdir())[:3]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = ""
        ds.save_as(root / "anon" / f"{k}.dcm")
    run = _in_process(root, out)
    assert run().done == 1
    (key, first), = _last_records(out).items()
    assert key == "dicom:anon" and first["identity"].startswith("sha256:")
    (output,) = list((out / "anon").iterdir())
    before = volume_of(output)[0]
    hashed: list[str] = []
    real = runner.file_sha256
    monkeypatch.setattr(runner, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    for path in (root / "anon").iterdir():
        os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert run().skipped == 1
    assert sorted(hashed) == ["0.dcm", "1.dcm", "2.dcm"]
    assert _last_records(out)["dicom:anon"]["input_stat"] != first["input_stat"]
    hashed.clear()
    assert run().skipped == 1 and hashed == []
    ds = pydicom.dcmread(root / "anon" / "1.dcm")
    ds.decompress()
    pixels = ds.pixel_array.copy()
    pixels[100:200, 100:200] = pixels.max()
    ds.PixelData = pixels.tobytes()
    ds.save_as(root / "anon" / "1.dcm")
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (1, 0, 0), summary
    record = _last_records(out)["dicom:anon"]
    assert "its input changed since its output was written" in record["redone"] and record["identity"] != \
        first["identity"]
    assert not np.array_equal(volume_of(output)[0], before)
    assert run().skipped == 1


def test_a_header_input_whose_data_file_changed_is_denoised_again(tmp_path, shared_data):
    """A MetaImage (.mhd) or detached NRRD (.nhdr) input keeps its voxels in a data file (.raw) that its header names:
    the input was known by its header alone, so new voxels under the same header were skipped as done and the
    archive kept the denoised old data. Its identity (stat key, SHA-256) now covers the data file: voxels changed
    with the header left as it was, the series is denoised again, saying why; touched only, it is skipped."""
    root, out = tmp_path / "tree", tmp_path / "out"
    root.mkdir()
    image = sitk.ReadImage(str(shared_data / "ct_abdomen_pelvis_resampled_3mm.nii.gz"))
    crop = sitk.Cast(image[20:84, 20:84, 40:46], sitk.sitkInt16)
    sitk.WriteImage(crop, str(root / "ct.mhd"))  # uncompressed: ct.raw beside it, named by ElementDataFile
    sitk.WriteImage(crop, str(root / "mr.nhdr"))  # mr.raw, named by its "data file" line
    run = _in_process(root, out)
    summary = run()
    assert (summary.done, summary.failed) == (2, 0), summary
    first = _last_records(out)
    assert set(first) == {"file:ct.mhd", "file:mr.nhdr"}, first
    outputs = {key: Path(record["output"]) for key, record in first.items()}
    before = {key: volume_of(path)[0] for key, path in outputs.items()}
    assert run().skipped == 2
    headers = {name: (root / name).read_bytes() for name in ("ct.mhd", "mr.nhdr")}
    for name in ("ct.raw", "mr.raw"):  # other voxels, same size; the headers untouched
        voxels = np.fromfile(root / name, dtype="<i2").reshape(6, 64, 64)
        voxels[:, 16:48, 16:48] = 1500
        voxels.tofile(root / name)
    assert {name: (root / name).read_bytes() for name in headers} == headers
    summary = run()
    assert (summary.done, summary.skipped, summary.failed) == (2, 0, 0), summary
    for key, record in _last_records(out).items():
        assert "its input changed since its output was written" in record["redone"], record
        assert record["identity"] != first[key]["identity"]
        assert not np.array_equal(volume_of(outputs[key])[0], before[key]), key
    assert run().skipped == 2
    for name in ("ct.raw", "mr.raw"):  # touched only: read once, same contents, skipped
        os.utime(root / name, ns=(time.time_ns(), time.time_ns()))
    assert run().skipped == 2


def test_the_data_files_a_header_names_are_found_in_every_layout(tmp_path):
    """:func:`lib.imaging.guards.image_files`: a header with its voxels in the file itself, in one data file, in a
    LIST of files (the lines after the field) or in a numbered pattern (``fmt min max step``); NIfTI is one file."""
    from lib.imaging.guards import image_files

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(tmp_path / "a.mhd"))
    header = (tmp_path / "a.mhd").read_text()
    assert image_files(tmp_path / "a.mhd") == [tmp_path / "a.mhd", tmp_path / "a.raw"]
    layouts = {"local.mhd": ("LOCAL", []), "list.mhd": ("LIST\ns1.raw\nsub/s2.raw", ["s1.raw", "sub/s2.raw"]),
               "pattern.mhd": ("s%02d.raw 1 5 2", ["s01.raw", "s03.raw", "s05.raw"])}
    for name, (value, files) in layouts.items():
        (tmp_path / name).write_text(header.replace("ElementDataFile = a.raw", f"ElementDataFile = {value}"))
        assert image_files(tmp_path / name) == [tmp_path / name, *(tmp_path / f for f in files)], name
    (tmp_path / "b.nhdr").write_text("NRRD0004\ntype: short\ndimension: 1\nsizes: 4\nencoding: raw\n"
                                     "data file: LIST\nb1.raw\nb2.raw\n")
    assert image_files(tmp_path / "b.nhdr") == [tmp_path / "b.nhdr", tmp_path / "b1.raw", tmp_path / "b2.raw"]
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(tmp_path / "c.nrrd"))
    assert image_files(tmp_path / "c.nrrd") == [tmp_path / "c.nrrd"]
    assert image_files(tmp_path / "d.nii.gz") == [tmp_path / "d.nii.gz"]


#: The CLI (its path: the first argument) with each rank failing once its share is done and recorded: as a rank
#: whose last step raises (on rank 0: its check of the superseded series of other jobs, a rank-0-only step).
_FAIL_AFTER_SHARE = """
import os, runpy, sys
from lib.batch import runner
share = runner.run_rank
def run_rank_then_fail(*args, **kwargs):
    summary = share(*args, **kwargs)
    raise OSError(f"lost its output folder after {summary.done} done (rank {os.environ['RANK']})")
runner.run_rank = run_rank_then_fail
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _two_series(root: Path, shared: Path) -> None:
    """Two small real CT crops under ``root``, one per rank (the larger to rank 0)."""
    root.mkdir(parents=True)
    image = sitk.ReadImage(str(shared / "ct_abdomen_pelvis_resampled_3mm.nii.gz"))
    sitk.WriteImage(image[20:52, 20:52, 40:45], str(root / "a.nii.gz"))
    sitk.WriteImage(image[30:62, 20:52, 40:44], str(root / "b.nii.gz"))


@pytest.mark.slow
@pytest.mark.ddp
def test_a_failed_rank_0_still_merges_what_every_rank_recorded_and_an_uncounted_run_fails(tmp_path, shared_data):
    """Each rank raises once its series is denoised and recorded (rank 0 too). Before, rank 0's own error ended its
    run before the manifest merge: the other ranks' finished outputs (and its own) were missing from manifest.jsonl.
    Now rank 0 says each failed rank, merges every rank's records and exits non-zero; with no series counted (every
    rank failed) it says the run is incomplete, not "no series found"."""
    root, out = tmp_path / "tree", tmp_path / "out"
    _two_series(root, shared_data)
    wrapper = tmp_path / "fail_after_share.py"
    wrapper.write_text(_FAIL_AFTER_SHARE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3",
               "--log-dir", str(tmp_path / "logs"), str(wrapper), str(CLI), *batch_args(root, out), "--no-progress"]
    process, output, _ = run_torchrun_job(command, tmp_path, "run")
    assert process.returncode != 0, output[-3000:]
    assert (out / MANIFEST_DIR / "manifest.jsonl").is_file(), output[-3000:]  # merged despite rank 0's failure
    rows = [json.loads(line) for line in (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()]
    assert {r["key"]: (r["status"], r["rank"]) for r in rows} == {"file:a.nii.gz": ("done", 0),
                                                                   "file:b.nii.gz": ("done", 1)}
    assert all(Path(r["output"]).is_file() for r in rows)
    said, errors = rank_log(tmp_path / "logs", 0), rank_log(tmp_path / "logs", 0, "stderr")
    for rank in (0, 1):
        assert re.search(rf"^rank {rank}: failed: lost its output folder after 1 done \(rank {rank}\); its series "
                         r"are not in these counts", said, re.M), said[-3000:]
    assert "summary: 0 series: 0 done, 0 skipped, 0 failed" in said, said[-3000:]
    assert "error: the run is incomplete (no series was counted): ranks 0, 1 failed" in errors, errors[-3000:]
    assert "no series found" not in errors


def _torchrun_with(wrapper: Path | None, nproc: int, root: Path, out: Path, logs: Path) -> list[str]:
    """A torchrun job of ``nproc`` ranks on one machine (each rank's output teed under ``logs``), each rank running
    ``wrapper`` (which runs the CLI) when given, else the CLI."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "--tee", "3",
            "--log-dir", str(logs), *([str(wrapper)] if wrapper else []), str(CLI), *batch_args(root, out),
            "--no-progress"]


@pytest.mark.slow
@pytest.mark.ddp
def test_a_rank_that_cannot_start_stops_every_rank_at_once_named_by_rank_0(tmp_path, shared_data):
    """Ranks 0 and 2 of 3 cannot take their lock on the output (a process of an earlier job still holds each: here
    the test), so they fail before the first collective. Before, the others waited for them there (on one machine
    until torchrun stopped them, saying nothing of them; on another machine for BATCH_TIMEOUT, 7 days). Now the
    ranks tell each other after planning whether they could start: rank 0 names the ranks and their error, once for
    both (the same error), with each rank's own lock holder (before, the lowest rank's holder stood for all), every
    rank stops before any work, and the job exits non-zero. Rank 2 said its own error before the exchange; rank 1,
    which could start, says on its own stderr where the ranks' errors are (rank 0's stdout; before, "(said above)"
    though its log says nothing above, and only if torchrun had not stopped it yet). torchrun exits 1, its report naming exit status 2."""
    import fcntl

    root, out = tmp_path / "tree", tmp_path / "out"
    _two_series(root, shared_data)
    (out / MANIFEST_DIR).mkdir(parents=True)
    held = (0, 2)
    holders = [os.open(out / MANIFEST_DIR / f"lock-rank-{rank:05d}", os.O_RDWR | os.O_CREAT, 0o644) for rank in held]
    try:
        for rank, holder in zip(held, holders):
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(holder, f"pid {os.getpid()} (the test), rank {rank} of 3\n".encode())
        command = _torchrun_with(None, 3, root, out, tmp_path / "logs")
        process, output, seconds = run_torchrun_job(command, tmp_path, "run")
    finally:
        for holder in holders:
            os.close(holder)
    # torchrun's own exit status is 1 whenever a worker failed; the workers' 2 (a bad start) is in its report
    assert process.returncode == 1, output[-3000:]
    assert re.search(r"exitcode\s*: 2\b", output) and not re.search(r"exitcode\s*: 1\b", output), output[-3000:]
    said, errors = rank_log(tmp_path / "logs", 0), rank_log(tmp_path / "logs", 0, "stderr")
    # one line for ranks 0 and 2, each one's holder named, on stdout, and the list nowhere else
    assert re.findall(r"^ranks? .*could not start: .*$", said, re.M) == [
        f"ranks 0, 2: could not start: another denoise-batch run is writing to {out}: wait for it to end, or choose "
        f"another --output (holders: rank 0: pid {os.getpid()} (the test), rank 0 of 3; rank 2: pid {os.getpid()} "
        "(the test), rank 2 of 3)"], said[-3000:] + errors[-3000:]
    assert "another denoise-batch run" not in errors, errors[-3000:]
    assert re.findall(r"^error: .*$", errors, re.M) == [
        "error: 2 of 3 ranks could not start (said on rank 0's stdout): no series was denoised; fix that and run again"], \
        errors[-3000:]
    # rank 2 said its own before the exchange
    assert re.search(rf"^error: rank 2: could not start: another denoise-batch run \(pid {os.getpid()} "
                     r"\(the test\), rank 2 of 3\)", rank_log(tmp_path / "logs", 2, "stderr"), re.M)
    # rank 1 (another machine's log, maybe) points at rank 0's, said before any rank ended
    assert re.findall(r"^error: .*$", rank_log(tmp_path / "logs", 1, "stderr"), re.M) == [
        "error: 2 of 3 ranks could not start (said on rank 0's stdout): no series was denoised; fix that and run "
        "again"], rank_log(tmp_path / "logs", 1, "stderr")[-3000:]
    # no output, no record
    assert not list((out / MANIFEST_DIR).glob("rank-*.jsonl"))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_DIR]
    print(f"torchrun job ended in {seconds:.1f} s")


def test_ranks_that_cannot_start_alike_share_one_line():
    """The grouped lines of the start exchange: the same text once for its ranks; texts alike but for what differs
    from rank to rank (each lock's holder) once, with each rank's holder (before: the lowest rank's for all)."""
    from lib.batch.runner import _start_error_lines

    assert _start_error_lines([("", "", ""), ("PACS down", "PACS down", ""), ("PACS down", "PACS down", "")]) == [
        "ranks 1, 2: could not start: PACS down"]
    locked = [(f"run (pid {pid} on {host}) holds it", "a run holds it", f"pid {pid} on {host}")
              for pid, host in ((7, "nodeA"), (7, "nodeA"), (9, "nodeB"))]
    assert _start_error_lines([locked[0], ("", "", ""), locked[1], locked[2], ("bad", "bad", "")]) == [
        "ranks 0, 2, 3: could not start: a run holds it (holders: rank 0: pid 7 on nodeA; rank 2: pid 7 on nodeA; "
        "rank 3: pid 9 on nodeB)", "rank 4: could not start: bad"]
    assert _start_error_lines([locked[0], locked[1]]) == ["ranks 0, 1: could not start: run (pid 7 on nodeA) holds it"]


_OTHER_INPUT_ON_RANK_1 = """
import os, runpy, sys
sys.argv = sys.argv[1:]
if os.environ["RANK"] == "1":  # this rank's machine sees another --input (a series missing)
    sys.argv[sys.argv.index("--input") + 1] = os.environ["RANK_1_INPUT"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.ddp
def test_ranks_that_see_different_series_lists_stop_the_job_before_any_work(tmp_path, shared_data):
    """Rank 1 finds a series less than rank 0 (its machine sees another input). The ranks compare the digests of
    their series lists in the start exchange: every rank stops before any work, rank 0 says why once on stderr
    (worker exit status 2). Before (the check ran inside the work of each rank), every rank was a failed rank:
    "rank N: failed: ranks N and M found different series lists ...; its series are not in these counts (... a
    rerun does the rest)" and "the run is incomplete", exit status 1, advice that a rerun fails the same way."""
    root, out = tmp_path / "tree", tmp_path / "out"
    _two_series(root, shared_data)
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    (fewer / "a.nii.gz").symlink_to(root / "a.nii.gz")
    wrapper = tmp_path / "other_input.py"
    wrapper.write_text(_OTHER_INPUT_ON_RANK_1)
    command = _torchrun_with(wrapper, 2, root, out, tmp_path / "logs")
    process, output, _ = run_torchrun_job(command, tmp_path, "run", {"RANK_1_INPUT": str(fewer)})
    assert process.returncode != 0, output[-3000:]
    said, errors = rank_log(tmp_path / "logs", 0), rank_log(tmp_path / "logs", 0, "stderr")
    assert re.findall(r"^error: .*$", errors, re.M) == [
        "error: ranks 0 and 1 found different series lists (is the input the same on every machine, and not "
        "changing?): nothing was denoised"], errors[-3000:] + said[-3000:]
    assert "failed" not in said and "incomplete" not in errors, said[-3000:]
    # a bad start (exit status 2 of the CLI), not a failed run (1)
    assert re.search(r"exitcode\s*: 2\b", output) and not re.search(r"exitcode\s*: 1\b", output), output[-3000:]
    # the process group torn down before the exit: left to it, Gloo's threads aborted a rank (exit status -6)
    assert "terminate called" not in output and not re.search(r"exitcode\s*: -6\b", output), output[-3000:]
    # no output, no record
    assert not list((out / MANIFEST_DIR).glob("rank-*.jsonl")) and not (out / MANIFEST_DIR / "manifest.jsonl").exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_DIR]


def test_an_output_folder_not_shared_by_the_ranks_is_said_naming_the_file(tmp_path):
    """The start exchange's file check (its verdict goes to every rank like the others): a rank that cannot read
    another rank's plan file (missing, or not text: before, a UnicodeDecodeError escaped, and that rank skipped the
    second exchange the others waited in), or reads one that rank did not write in this job (a folder of this
    machine alone, left by an earlier run: before, one with the same series list passed, its digest alike), names the
    file and says the folder must be shared."""
    from lib.batch.runner import _plan_files_problem, _plan_text

    shared = "the --output folder must be one folder shared by all machines (a network file system)"
    first, second = tmp_path / "plan-rank-00000.sha256", tmp_path / "plan-rank-00001.sha256"
    first.write_text(_plan_text("aaa", "n0") + "\n")
    assert _plan_files_problem(tmp_path, [("aaa", "n0")], 0) == ""
    assert _plan_files_problem(tmp_path, [("aaa", "n0"), ("aaa", "n1")], 0) == (
        f"rank 0 cannot read {second} ([Errno 2] No such file or directory: '{second}'): {shared}")
    second.write_bytes(b"\xff\xfe not text")
    problem = _plan_files_problem(tmp_path, [("aaa", "n0"), ("aaa", "n1")], 1)
    assert problem.startswith(f"rank 1 cannot read {second} (") and "can't decode byte 0xff" in problem, problem
    assert problem.endswith(f"): {shared}"), problem
    # the same series list, written by an earlier run: its nonce is not this job's
    second.write_text(_plan_text("aaa", "earlier") + "\n")
    assert _plan_files_problem(tmp_path, [("aaa", "n0"), ("aaa", "n1")], 1) == (
        f"rank 1 finds in {second} a plan that rank 1 did not write in this job (left by an earlier run): {shared}")
    second.write_text(_plan_text("aaa", "n1"))
    assert _plan_files_problem(tmp_path, [("aaa", "n0"), ("aaa", "n1")], 1) == ""
