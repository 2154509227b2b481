"""``cli.py denoise-batch`` with a DICOMweb server as source and sink: the real Orthanc of the PACS test
(``orthanc.py``), real CT slices (the shared JPEG 2000 slab, given UIDs, dates and descriptions of their own).

QIDO-RS finds the series (filtered by modality, study date and description), WADO-RS downloads each, the derived
series is written locally and sent back with STOW-RS; a rerun skips it and never takes the derived series as
an input.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

import processes
from conftest import APP_DIR
from in_process import run_cli
from manifest_limit import write_limiter
from orthanc import (QIDO_LOG, available, grow_on_retrieval, log_size, qido_searches, slow_relay, start_orthanc,
                     start_orthanc_logging_requests, stop_orthanc)

from lib.batch.dicomweb import discover_dicomweb, make_client
from lib.batch.discovery import MANIFEST_DIR, SeriesFilter
from lib.imaging import read_volume

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(available() is not None, reason=str(available()))]

CLI = APP_DIR / "cli.py"
TIMEOUT = 600


def make_series(shared: Path, folder: Path, slices: range, description: str, study_uid: str, date: str) -> str:
    """Real CT slices of the slab as a new series (decompressed: no transcoding asked of the server)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    files = sorted((shared / "dicom" / "ct_abdomen_siemens_j2k_slab").iterdir())
    for k in slices:
        ds = pydicom.dcmread(files[k])
        ds.decompress()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate = study_uid, series, date
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription, ds.SeriesNumber, ds.PatientID = description, 2, "BATCH"
        ds.save_as(folder / f"{k:03d}.dcm", write_like_original=False)
    return series


def batch_command(url: str, out: Path, *extra: str) -> list:
    """``denoise-batch`` of the CT series "*low dose*" of 2020 on the DICOMweb server ``url`` into ``out``."""
    return [sys.executable, CLI, "denoise-batch", "--input", url, "--output", out, "--model", "gaussian",
            "--modality", "CT", "--study-date", "20200101-20201231", "--series-description", "*low dose*", *extra]


def run_batch(url: str, out: Path, *extra: str):
    """:func:`batch_command` run in this process (:func:`in_process.run_cli`: the same ``main``, its exit status and
    output, without seconds of interpreter start-up and imports a run)."""
    return run_cli(batch_command(url, out, *extra))


def test_dicomweb_source_and_sink(tmp_path, shared_data):
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        study, old_study = generate_uid(), generate_uid()
        wanted = make_series(shared_data, tmp_path / "wanted", range(0, 4), "Abdomen LOW DOSE", study, "20200115")
        make_series(shared_data, tmp_path / "scout", range(4, 6), "Scout", study, "20200115")
        make_series(shared_data, tmp_path / "old", range(6, 8), "abdomen low dose", old_study, "20190101")
        for folder in ("wanted", "scout", "old"):
            pacs.upload_folder(tmp_path / folder)
        out = tmp_path / "out"
        result = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "summary: 1 series: 1 done, 0 skipped, 0 failed" in result.stdout, result.stdout
        record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        assert record["identity"] == f"dicom:{wanted}" and record["status"] == "done"
        stored = record["stored"]
        assert stored["instances"] == 4 and stored["series_instance_uid"] != wanted
        # the local derived series: the server's series, denoised, on its grid
        local = read_volume(Path(record["output"]))
        assert Path(record["output"]) == out / study / wanted and local.shape == (4, 512, 512)
        original = read_volume(tmp_path / "wanted")
        assert 0 < float(np.abs(local.array - original.array).mean()) < 50  # smoothed, still HU
        # and on the server: a new series of the same study
        series = [s for s in pacs.get("/series?expand")
                  if s["MainDicomTags"]["SeriesInstanceUID"] == stored["series_instance_uid"]]
        assert len(series) == 1 and len(series[0]["Instances"]) == 4
        with urllib.request.urlopen(f"{pacs.url}/instances/{series[0]['Instances'][0]}/file", timeout=60) as r:
            derived = pydicom.dcmread(io.BytesIO(r.read()))
        assert derived.StudyInstanceUID == study and "DERIVED" in derived.ImageType
        assert "[denoised gaussian]" in derived.SeriesDescription
        # a rerun skips it and stores nothing more; the derived series is never an input
        count = len(pacs.get("/series"))
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert again.returncode == 0 and "1 series: 0 done, 1 skipped, 0 failed" in again.stdout, again.stdout
        assert len(pacs.get("/series")) == count == 4
        # series without images (a structured report, an RT structure set) are not inputs: never downloaded,
        # never counted as failed on every run
        from pydicom.data import get_testdata_file

        without_images = [tmp_path / name for name in ("test-SR.dcm", "rtstruct.dcm")]
        for path in without_images:
            ds = pydicom.dcmread(get_testdata_file(path.name), force=True)
            ds.StudyInstanceUID, ds.PatientID = study, "BATCH"
            ds.save_as(path, write_like_original=False)
        pacs.upload_files(without_images)
        assert len(pacs.get("/series")) == 6
        everything = discover_dicomweb(make_client(pacs.dicomweb), out, SeriesFilter())
        assert len(everything) == 3 and stored["series_instance_uid"] not in {i.series_uid for i in everything}
    finally:
        stop_orthanc(pacs)


def _orthanc_dropping_derived_slice_3(tmp_path: Path):
    """A real Orthanc whose ReceivedInstanceFilter (a Lua script) drops instance 3 of any "[denoised" series while
    the returned flag file exists (Orthanc 1.10 still lists it as stored in its STOW-RS answer). Returns (pacs,
    flag)."""
    flag = tmp_path / "reject_slice_3"
    script = tmp_path / "filter.lua"
    script.write_text(f"""
function ReceivedInstanceFilter(dicom, origin, info)
  local flag = io.open("{flag}", "r")
  if flag == nil then return true end
  io.close(flag)
  return not (string.find(dicom.SeriesDescription or "", "[denoised", 1, true) and dicom.InstanceNumber == "3")
end
""")
    return start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]}), flag


def _derived(pacs) -> dict[str, int]:
    """Derived ("[denoised") series on the server: SeriesInstanceUID -> number of instances."""
    return {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"]) for s in pacs.get("/series?expand")
            if "[denoised" in s["MainDicomTags"].get("SeriesDescription", "")}


def _stored_in_part(tmp_path: Path, shared_data: Path, slices: range, description: str):
    """A real series of ``slices`` described ``description`` on an Orthanc that drops slice 3 of derived series
    (:func:`_orthanc_dropping_derived_slice_3`, its flag set), denoised with --store-to-pacs into
    ``tmp_path / "out"``: the server keeps the derived series without its slice 3. Returns (pacs, flag, the output
    folder, the run's result); the caller stops the pacs."""
    from pydicom.uid import generate_uid

    pacs, flag = _orthanc_dropping_derived_slice_3(tmp_path)
    try:
        make_series(shared_data, tmp_path / "wanted", slices, description, generate_uid(), "20200115")
        pacs.upload_folder(tmp_path / "wanted")
        flag.write_text("")
        out = tmp_path / "out"
        return pacs, flag, out, run_batch(pacs.dicomweb, out, "--store-to-pacs")
    except BaseException:
        stop_orthanc(pacs)
        raise


def test_a_series_the_server_stored_in_part_is_failed_and_completed_by_the_rerun(tmp_path, shared_data):
    """Orthanc 1.10 answers a STOW-RS with every instance listed as stored even when its ReceivedInstanceFilter
    (here a Lua script, while a flag file exists) dropped one: the batch asks the server what it holds, so the
    derived series short of a slice is a failed series naming the missing instance, not "done". The rerun sends the
    same derived series again (same UIDs): the server then holds one whole derived series, not a partial one beside
    a second whole one."""
    pacs, flag, out, result = _stored_in_part(tmp_path, shared_data, range(0, 4), "Abdomen LOW DOSE")
    try:
        assert result.returncode == 1 and "1 failed" in result.stdout, result.stdout + result.stderr
        assert "answered that it stored all 4 instances but lists 3 of them" in result.stdout, result.stdout
        assert list(_derived(pacs).values()) == [3]
        partial = list(_derived(pacs))
        # still refused: the rerun sends the same files again (not a new series), and fails again
        result = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert result.returncode == 1 and "lists 3 of them" in result.stdout, result.stdout + result.stderr
        assert _derived(pacs) == {partial[0]: 3}
        # a run killed during the store leaves its last record "started" at the store stage
        records = next((out / MANIFEST_DIR).glob("rank-*.jsonl"))
        rows = [json.loads(line) for line in records.read_text().splitlines()]
        assert rows[-2]["status"] == "started" and rows[-2]["stage"] == "store" and rows[-1]["status"] == "failed"
        records.write_text("".join(json.dumps(row) + "\n" for row in rows[:-1]))
        flag.unlink()
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert again.returncode == 0 and "1 done" in again.stdout, again.stdout + again.stderr
        record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        assert _derived(pacs) == {record["stored"]["series_instance_uid"]: 4} == {partial[0]: 4}  # the same, now whole
        assert record["model"] == "gaussian" and record["status"] == "done"
    finally:
        stop_orthanc(pacs)


def test_a_server_that_goes_away_stops_the_run_and_a_rerun_resumes(tmp_path, shared_data):
    """Orthanc stopped once the batch has listed the series: each download fails after the client's retries (about
    30 s by default; here ADL_DICOMWEB_RETRY_WAIT_S makes them under a second, the same 4 retries), so after 3 such
    series in a row the run stops, says so and how many series it did not try (rather than spending 30 s on every
    series of the archive), exits 1; Orthanc restarted (on another port), the rerun denoises every series."""
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        study = generate_uid()
        for k in range(6):
            make_series(shared_data, tmp_path / f"s{k}", range(k, k + 2), "abdomen low dose", study, "20200115")
            pacs.upload_folder(tmp_path / f"s{k}")
        out = tmp_path / "out"
        command = [sys.executable, CLI, "denoise-batch", "--input", pacs.dicomweb, "--output", out, "--model",
                   "gaussian", "--no-progress"]
        env = dict(os.environ, OMP_NUM_THREADS="1", ADL_DICOMWEB_RETRY_WAIT_S="0.05")  # 0.75 s of waits per request
        process = processes.start(command, tmp_path / "batch.log", env=env)
        try:
            lock = out / MANIFEST_DIR / "lock-rank-00000"  # taken once the series are listed
            deadline = time.monotonic() + TIMEOUT
            while not lock.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            stop_orthanc(pacs)
            process.wait(TIMEOUT)
        finally:
            processes.stop(process)
        log = (tmp_path / "batch.log").read_text()
        assert process.returncode == 1, log
        assert "could not be reached for 3 series in a row" in log and "rerun to resume" in log, log
        summary = next(line for line in log.splitlines() if line.startswith("summary: "))
        done = int(summary.split(" done")[0].split()[-1])
        assert f"{done} done, 0 skipped, 3 failed, {3 - done} not tried" in summary, summary
        pacs = start_orthanc(tmp_path / "orthanc")  # the same storage, another port
        again = run_cli([*command[:4], pacs.dicomweb, *command[5:]], env={"ADL_DICOMWEB_RETRY_WAIT_S": "0.05"})
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"6 series: {6 - done} done, {done} skipped, 0 failed" in again.stdout, again.stdout
    finally:
        stop_orthanc(pacs)


def test_a_rerun_with_store_to_pacs_sends_what_an_earlier_run_only_wrote(tmp_path, shared_data):
    """A first run without --store-to-pacs writes the derived series locally; the rerun with it used to skip the
    series as done and store nothing (exit 0): it now sends the local derived series (not denoised again), once."""
    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        out = _denoised_once_without_storing(pacs, shared_data, tmp_path)
        assert len(pacs.get("/series")) == 1
        local = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])["output"]
        local_uid = pydicom.dcmread(next(Path(local).iterdir())).SeriesInstanceUID
        stored = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert stored.returncode == 0 and "1 done" in stored.stdout, stored.stdout + stored.stderr
        series = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"]) for s in pacs.get("/series?expand")}
        assert len(series) == 2 and series[local_uid] == 3  # the local files themselves
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert "0 done, 1 skipped" in again.stdout and len(pacs.get("/series")) == 2, again.stdout
    finally:
        stop_orthanc(pacs)


def _denoised_once_without_storing(pacs, shared_data: Path, tmp_path: Path) -> Path:
    """One 3-slice series stored on ``pacs`` and denoised by a first run without --store-to-pacs (done): its output
    folder."""
    from pydicom.uid import generate_uid

    make_series(shared_data, tmp_path / "wanted", range(0, 3), "abdomen low dose", generate_uid(), "20200115")
    pacs.upload_folder(tmp_path / "wanted")
    out = tmp_path / "out"
    first = run_batch(pacs.dicomweb, out)
    assert first.returncode == 0 and "1 done" in first.stdout, first.stdout + first.stderr
    return out


def _run_limited_at_store(tmp_path: Path, url: str, out: Path):
    """The CLI with ``--store-to-pacs``, the real kernel file size limit (RLIMIT_FSIZE) lowered for the append of the
    record written just before the STOW-RS alone (as in the done-record test of test_batch_denoise): that record
    cannot be written ("File too large")."""
    # the CLI, with the file size limit reached at the store's record
    limiter = write_limiter(tmp_path / "limit_at_store.py", 'record.get("stage") == "store"')
    return processes.run([sys.executable, limiter, *batch_command(url, out, "--store-to-pacs", "--no-progress")[1:]],
                         TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_series_whose_record_ahead_of_its_store_cannot_be_written_is_failed_not_stored(tmp_path, shared_data):
    """The record written just before the STOW-RS (the one that tells a rerun the series may be on the server) cannot
    be written: the real kernel file size limit (RLIMIT_FSIZE) lowered for that append alone, as in the done-record
    test of test_batch_denoise. The series failed with the bare OS error ("File too large"), not saying it was the
    record, and its derived series stayed in place. Now the failure says so and that nothing was stored, the
    output is moved aside (as when the done record cannot be written), the server holds no derived series, and a
    rerun denoises and stores it once."""
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        make_series(shared_data, tmp_path / "wanted", range(0, 3), "abdomen low dose", generate_uid(), "20200115")
        pacs.upload_folder(tmp_path / "wanted")
        out = tmp_path / "out"
        first = _run_limited_at_store(tmp_path, pacs.dicomweb, out)
        assert first.returncode == 1 and "1 series: 0 done, 0 skipped, 1 failed" in first.stdout, \
            first.stdout + first.stderr
        (failed,) = [line for line in first.stdout.splitlines() if line.startswith("failed: ")]
        assert ("denoised, but its record ahead of the store to the server cannot be written to "
                f"{out / MANIFEST_DIR / 'rank-00000.jsonl'} (") in failed and "File too large" in failed, failed
        assert "it was not stored; its output was moved aside" in failed, failed
        assert _derived(pacs) == {}
        (study,) = [p for p in out.iterdir() if not p.name.startswith((".", MANIFEST_DIR))]
        left = [p.name for p in study.iterdir()]
        assert len(left) == 1 and left[0].startswith(".") and ".old-" in left[0], left  # not under its name
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert again.returncode == 0 and "1 series: 1 done" in again.stdout, again.stdout + again.stderr
        assert list(_derived(pacs).values()) == [3]
        assert [p.name for p in study.iterdir() if p.name.startswith(".")] == []  # the copy removed by the write
    finally:
        stop_orthanc(pacs)



def test_an_output_an_earlier_run_recorded_is_kept_when_the_record_ahead_of_its_store_cannot_be_written(
        tmp_path, shared_data):
    """Run 1 without --store-to-pacs denoised and recorded a series; run 2 with it only stores that output, and the
    record ahead of the store cannot be written (the real kernel file size limit, as above). That valid output, which
    an earlier run wrote and recorded as done, was moved aside (as one this run wrote is), to be denoised again. It is
    now left in place, the series fails saying so, nothing is stored, and a rerun stores these same files once (the
    server's derived series is the output's own), without denoising it again."""
    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        out = _denoised_once_without_storing(pacs, shared_data, tmp_path)
        (study,) = [p for p in out.iterdir() if not p.name.startswith((".", MANIFEST_DIR))]
        (output,) = list(study.iterdir())
        files = {p.name: p.read_bytes() for p in output.iterdir()}
        local_uid = pydicom.dcmread(next(output.iterdir())).SeriesInstanceUID
        second = _run_limited_at_store(tmp_path, pacs.dicomweb, out)
        assert second.returncode == 1 and "1 series: 0 done, 0 skipped, 1 failed" in second.stdout, \
            second.stdout + second.stderr
        (failed,) = [line for line in second.stdout.splitlines() if line.startswith("failed: ")]
        assert "its record ahead of the store to the server cannot be written" in failed, failed
        assert f"it was not stored; {output}, written by an earlier run, is left in place" in failed, failed
        assert "moved aside" not in failed, failed
        assert [p.name for p in study.iterdir()] == [output.name]  # under its name, nothing set aside
        assert {p.name: p.read_bytes() for p in output.iterdir()} == files and _derived(pacs) == {}
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert again.returncode == 0 and "1 series: 1 done" in again.stdout, again.stdout + again.stderr
        assert _derived(pacs) == {local_uid: 3}  # these files, not a second denoising
        assert {p.name: p.read_bytes() for p in output.iterdir()} == files
    finally:
        stop_orthanc(pacs)

def _held_store_pacs(tmp_path: Path):
    """Orthanc whose Lua ReceivedInstanceFilter, while ``armed`` exists, holds the last slice (InstanceNumber 3) of
    a derived series: it writes ``signal`` and waits for ``release`` before letting the slice in. The test kills the
    batch while the slice is held, then releases it: the server ends up holding the whole derived series, and the
    batch died after its STOW-RS and before its "done" record (deterministic, no timing guess)."""
    armed, signal, release = tmp_path / "armed", tmp_path / "signal", tmp_path / "release"
    script = tmp_path / "hold.lua"
    script.write_text(f"""
function ReceivedInstanceFilter(dicom, origin, info)
  if not (string.find(dicom.SeriesDescription or "", "[denoised", 1, true) and dicom.InstanceNumber == "3") then
    return true
  end
  local arm = io.open("{armed}", "r")
  if arm == nil then return true end
  io.close(arm)
  os.remove("{armed}")
  local s = io.open("{signal}", "w")
  s:write("held")
  io.close(s)
  for i = 1, 3000 do
    local r = io.open("{release}", "r")
    if r ~= nil then
      io.close(r)
      break
    end
    os.execute("sleep 0.1")
  end
  return true
end
""")
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]})
    return pacs, armed, signal, release


def _kill_after_store(tmp_path: Path, pacs, armed: Path, signal: Path, release: Path, out: Path) -> None:
    """Run the batch with --store-to-pacs and kill it (SIGKILL, its whole group) once the server holds the last
    slice of the derived series, before the batch hears back; then let the server store that slice."""
    armed.write_text("")
    command = [sys.executable, CLI, "denoise-batch", "--input", pacs.dicomweb, "--output", out, "--model",
               "gaussian", "--no-progress", "--store-to-pacs"]
    process = processes.start(command, tmp_path / "killed.log", env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not signal.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signal.exists(), (tmp_path / "killed.log").read_text()
    finally:
        processes.kill_group(process)
    release.write_text("")
    deadline = time.monotonic() + TIMEOUT  # the held slice goes in once released
    while time.monotonic() < deadline and sorted(_derived(pacs).values()) != [3]:
        time.sleep(0.1)


@pytest.mark.parametrize("between", ["nothing", "local output deleted", "rerun without --store-to-pacs"])
def test_a_run_killed_after_its_store_never_stores_a_second_derived_series(tmp_path, shared_data, between):
    """Killed after the server stored the whole derived series and before the "done" record: whatever happens before
    the rerun (nothing, the local output deleted, a rerun without --store-to-pacs that writes the result locally
    again), the rerun with --store-to-pacs finds that series on the server (QIDO-RS) and records it as stored; it
    never stores a second denoised copy of the same source beside it."""
    import shutil

    from pydicom.uid import generate_uid

    pacs, armed, signal, release = _held_store_pacs(tmp_path)
    try:
        make_series(shared_data, tmp_path / "wanted", range(0, 3), "abdomen low dose", generate_uid(), "20200115")
        pacs.upload_folder(tmp_path / "wanted")
        out = tmp_path / "out"
        _kill_after_store(tmp_path, pacs, armed, signal, release, out)
        first = _derived(pacs)
        assert sorted(first.values()) == [3], first
        rows = [json.loads(line) for line in next((out / MANIFEST_DIR).glob("rank-*.jsonl")).read_text().splitlines()]
        assert rows[-1]["status"] == "started", rows  # killed before its "done" record
        local = Path(rows[-1]["output"])
        assert sorted(p.name for p in local.iterdir()) == ["IM00001.dcm", "IM00002.dcm", "IM00003.dcm"]
        if between == "local output deleted":
            shutil.rmtree(local)
        elif between == "rerun without --store-to-pacs":
            plain = run_batch(pacs.dicomweb, out)
            assert plain.returncode == 0 and "1 series: 1 " in plain.stdout, plain.stdout + plain.stderr
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert again.returncode == 0, again.stdout + again.stderr
        assert _derived(pacs) == first, again.stdout  # the same series, whole, and no second one
        record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        assert record["status"] == "done" and record["stored"]["series_instance_uid"] == list(first)[0], record
        last = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert last.returncode == 0 and "0 done, 1 skipped" in last.stdout, last.stdout + last.stderr
        assert _derived(pacs) == first
    finally:
        stop_orthanc(pacs)


def test_a_partial_derived_series_whose_files_are_gone_is_not_stored_again_beside_it(tmp_path, shared_data):
    """The server kept 2 of the 3 slices of a derived series (its filter dropped one) and the local output was
    deleted before the rerun: the same UIDs cannot be sent again, and a second, whole derived series beside the
    partial one would show the reader two denoised copies: the series fails, saying what to do; once that series is
    deleted on the server, the rerun denoises and stores it (one derived series)."""
    import shutil
    import urllib.request as request

    pacs, flag, out, first = _stored_in_part(tmp_path, shared_data, range(0, 3), "abdomen low dose")
    try:
        assert first.returncode == 1 and "lists 2 of them" in first.stdout, first.stdout + first.stderr
        partial = _derived(pacs)
        assert sorted(partial.values()) == [2]
        flag.unlink()
        record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        shutil.rmtree(record["output"])
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert again.returncode == 1 and "1 failed" in again.stdout, again.stdout + again.stderr
        assert "holds 2 of the 3 instances of the derived series" in again.stdout, again.stdout
        assert "delete that series on the server, then rerun" in again.stdout, again.stdout
        assert _derived(pacs) == partial  # no second derived series
        orthanc_id = next(s["ID"] for s in pacs.get("/series?expand")
                          if s["MainDicomTags"]["SeriesInstanceUID"] == list(partial)[0])
        request.urlopen(request.Request(f"{pacs.url}/series/{orthanc_id}", method="DELETE"), timeout=60).close()
        last = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert last.returncode == 0 and "1 done" in last.stdout, last.stdout + last.stderr
        assert sorted(_derived(pacs).values()) == [3] and list(partial)[0] not in _derived(pacs)
    finally:
        stop_orthanc(pacs)


def test_an_anonymised_copy_of_a_derived_series_is_not_an_input(tmp_path, shared_data):
    """A derived series copied back to the PACS through an anonymiser (basic profile: SeriesDescription and
    DerivationDescription removed, new UIDs, ImageType kept) used to be listed as an input (QIDO-RS series answers
    hold no ImageType) and denoised a second time: series without a description are now asked for the ImageType of
    one instance, and DERIVED\\...\\DENOISED ones are passed over. A source series without a description is kept."""
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        study = generate_uid()
        wanted = make_series(shared_data, tmp_path / "wanted", range(0, 3), "abdomen low dose", study, "20200115")
        make_series(shared_data, tmp_path / "plain", range(3, 5), "", study, "20200115")  # no description: an input
        for folder in ("wanted", "plain"):
            pacs.upload_folder(tmp_path / folder)
        out = tmp_path / "out"
        command = [sys.executable, CLI, "denoise-batch", "--input", pacs.dicomweb, "--output", out, "--model",
                   "gaussian", "--no-progress"]
        first = run_cli(command)
        assert first.returncode == 0 and "2 series: 2 done" in first.stdout, first.stdout + first.stderr
        record = next(json.loads(line) for line in (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()
                      if json.loads(line)["identity"] == f"dicom:{wanted}")
        anonymised = tmp_path / "anonymised"
        anonymised.mkdir()
        study_copy, series_copy = generate_uid(), generate_uid()
        for path in sorted(Path(record["output"]).iterdir()):
            ds = pydicom.dcmread(path)
            assert ds.ImageType[0] == "DERIVED" and ds.ImageType[-1] == "DENOISED"
            for keyword in ("SeriesDescription", "DerivationDescription", "SourceImageSequence"):
                if keyword in ds:
                    delattr(ds, keyword)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study_copy, series_copy, "ANON"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(anonymised / path.name, write_like_original=False)
        pacs.upload_folder(anonymised)
        items = discover_dicomweb(make_client(pacs.dicomweb), tmp_path / "out2", SeriesFilter())
        assert series_copy not in {i.series_uid for i in items} and len(items) == 2, items
        again = run_cli(command)
        assert again.returncode == 0 and "2 series: 0 done, 2 skipped" in again.stdout, again.stdout + again.stderr
    finally:
        stop_orthanc(pacs)


def test_an_orthanc_that_cuts_its_search_answers_stops_the_batch_and_is_asked_counts_per_series(tmp_path,
                                                                                               shared_data):
    """Orthanc's LimitFindResults cuts every QIDO-RS answer to that many matches plus one, whatever the offset, and
    says nothing: a batch over an archive of more series denoised part of it and reported success (exit 0). It now
    stops before any work, naming the setting; narrowed below the limit, it runs. LimitFindInstances cut the list
    of a derived series' instances: a rerun after the local output was deleted took the whole series stored on the
    server for a partial one and failed ("the server holds 3 of the 4 instances"); it now asks the count per series
    and skips it."""
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LimitFindResults": 3, "LimitFindInstances": 2})
    try:
        series = [("a", range(0, 4), "20200115"), ("b", range(4, 8), "20200220"), ("c", range(8, 10), "20200601"),
                  ("d", range(10, 12), "20200601"), ("e", range(12, 14), "20200601")]
        for name, slices, date in series:
            make_series(shared_data, tmp_path / name, slices, "abdomen low dose", generate_uid(), date)
            pacs.upload_folder(tmp_path / name)
        out = tmp_path / "out"
        cut = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert cut.returncode != 0, cut.stdout + cut.stderr
        assert "lists only part of the series (4 given)" in cut.stderr and "LimitFindResults 3" in cut.stderr, \
            cut.stdout + cut.stderr
        assert len(pacs.get("/series")) == 5 and not any(p.is_dir() for p in out.glob("*/*"))  # nothing done
        narrowed = run_batch(pacs.dicomweb, out, "--store-to-pacs", "--study-date", "20200101-20200131")
        assert narrowed.returncode == 0 and "1 series: 1 done" in narrowed.stdout, narrowed.stdout + narrowed.stderr
        assert list(_derived(pacs).values()) == [4]  # more instances than LimitFindInstances lists
        record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        import shutil

        shutil.rmtree(record["output"])
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs", "--study-date", "20200101-20200131")
        assert again.returncode == 0 and "1 series: 0 done, 1 skipped, 0 failed" in again.stdout, \
            again.stdout + again.stderr
        assert list(_derived(pacs).values()) == [4]  # nothing stored again
    finally:
        stop_orthanc(pacs)



def test_a_series_over_the_voxel_limit_is_refused_before_its_download_and_the_batch_goes_on(tmp_path, shared_data):
    """A DICOMweb series was downloaded whole (a series of thousands of slices filled the disk) before the reader's
    voxel limit could refuse it. Its size now comes from the server's QIDO-RS answer first (its instances' Rows and
    Columns, its series-level instance count): with ADL_MAX_VOXELS 1,000,000 the 6-slice series (6 x 512 x 512 =
    1.57 M voxels) fails as too large, with nothing downloaded (the server's request log holds no WADO-RS retrieval
    of it), and the 3-slice one (0.79 M) is denoised; a rerun refuses it again and keeps the other's result."""
    from pydicom.uid import generate_uid

    pacs, requests_log = start_orthanc_logging_requests(tmp_path)
    try:
        study = generate_uid()
        big = make_series(shared_data, tmp_path / "big", range(0, 6), "abdomen low dose", study, "20200115")
        small = make_series(shared_data, tmp_path / "small", range(6, 9), "abdomen low dose", study, "20200115")
        for folder in ("big", "small"):
            pacs.upload_folder(tmp_path / folder)
        out = tmp_path / "out"
        command = [sys.executable, CLI, "denoise-batch", "--input", pacs.dicomweb, "--output", out, "--model",
                   "gaussian", "--no-progress"]
        env = {"ADL_MAX_VOXELS": "1000000"}
        first = run_cli(command, env=env)
        assert first.returncode == 1, first.stdout + first.stderr
        assert "2 series: 1 done, 0 skipped, 1 failed" in first.stdout, first.stdout + first.stderr
        refusal = (f"failed: dicomweb:{study}/{big}: series {big} is too large: 6 instances, 1,572,864 voxels exceed "
                   "the limit of 1,000,000 (raise it with ADL_MAX_VOXELS); nothing was downloaded")
        assert refusal in first.stdout, first.stdout
        records = {r["identity"]: r for r in map(json.loads,
                                                  (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines())}
        assert records[f"dicom:{big}"]["status"] == "failed", records
        assert "is too large" in records[f"dicom:{big}"]["error"], records
        assert records[f"dicom:{small}"]["status"] == "done", records
        assert not (out / study / big).exists()
        done = Path(records[f"dicom:{small}"]["output"])
        assert len(list(done.iterdir())) == 3
        requested = requests_log.read_text()
        assert f"/series/{small}" in requested, requested  # its WADO-RS retrieval (the log works)
        assert f"/series/{big}" not in requested, requested  # never retrieved (asked by QIDO-RS only)
        written = {p.name: p.read_bytes() for p in done.iterdir()}
        again = run_cli(command, env=env)
        assert again.returncode == 1 and "2 series: 0 done, 1 skipped, 1 failed" in again.stdout, \
            again.stdout + again.stderr
        assert refusal in again.stdout and f"/series/{big}" not in requests_log.read_text()
        assert {p.name: p.read_bytes() for p in done.iterdir()} == written  # the done series kept as it was
    finally:
        stop_orthanc(pacs)


def _series_match(uid: str) -> dict:
    """One series of a QIDO-RS series search answer (CT, 3 instances), as a DICOMweb server sends it."""
    return {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": [uid]},
            "00080060": {"vr": "CS", "Value": ["CT"]}, "0008103E": {"vr": "LO", "Value": ["abdomen"]},
            "00201209": {"vr": "IS", "Value": [3]}}


@contextlib.contextmanager
def _loopback_qido(answer):
    """A real HTTP server on 127.0.0.1 whose GETs are answered by ``answer(path) -> (status, matches, headers)``
    (``matches`` sent as application/dicom+json when the status is 200), or never answered when ``answer`` returns
    None (the connection held open, silent, until the server closes); yields its DICOMweb root URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mlserver import free_port

    closing = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            answered = answer(self.path)
            if answered is None:
                closing.wait(600)
                return
            status, matches, headers = answered
            if status != 200:
                self.send_error(status)
                return
            body = json.dumps(matches).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/dicom-web"
    finally:
        closing.set()
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(120)  # far past 1 s a request: a run that waits for ever is cut here, not left hanging
def test_a_pacs_that_accepts_and_never_answers_is_told_in_seconds_not_a_batch_hung_for_ever(tmp_path):
    """The batch's DICOMweb requests had no timeout: a PACS that accepts the connection and never answers hung the run
    for ever, at its series search or at a series. Each request now waits ADL_PACS_READ_TIMEOUT_S (1 s here) for
    each read of its answer: a PACS silent from the start stops the run before any work, saying it did not answer
    the series search within 1 s; one that lists its series and then answers nothing fails each series saying it
    did not answer within 1 s, and after 3 in a row the run stops, the rest not tried. The ImageType search of a
    series without a description (an anonymised copy of a result is told by it) was taken as [] in silence, and the
    series as an input: it fails saying the PACS did not answer that search, and the next such series is not asked.
    (Real servers on loopback: one that accepts and never answers, one that answers the series search only.)"""
    from orthanc import silent_server

    def batch(root: str, out: Path):  # in this process (the test's timeout above bounds it)
        return run_cli(["denoise-batch", "--input", root, "--output", out, "--model", "gaussian", "--no-progress"],
                       env={"ADL_PACS_READ_TIMEOUT_S": "1"})

    with silent_server() as port:
        root = f"http://127.0.0.1:{port}/dicom-web"
        listed = batch(root, tmp_path / "out-silent")
    said = listed.stdout + listed.stderr
    assert listed.returncode == 2, said
    assert f"the PACS {root} did not answer the search of its series (QIDO-RS) within 1 s" in said, said
    assert "nothing was denoised" in said and "ADL_PACS_READ_TIMEOUT_S" in said, said

    def match(k: int) -> dict:  # 1.2.3.0 and 1.2.3.1 without a description: their ImageType is asked
        found = _series_match(f"1.2.3.{k}")
        return {tag: value for tag, value in found.items() if tag != "0008103E"} if k < 2 else found

    asked: list[str] = []

    def answer(path: str):
        asked.append(path)
        if path.startswith("/dicom-web/series"):  # the listing: 6 series, then nothing more (silence)
            return 200, [match(k) for k in range(6)] if "offset=0" in path else [], {}
        return None if path.startswith("/dicom-web/") else (404, None, {})  # (no Orthanc REST API here)

    with _loopback_qido(answer) as root:
        result = batch(root, tmp_path / "out")
    said = result.stdout + result.stderr
    assert result.returncode == 1, said
    summary = next(line for line in said.splitlines() if line.startswith("summary: "))
    assert "0 done, 0 skipped, 5 failed, 1 not tried" in summary, summary
    assert (f"failed: dicomweb:1.2.3/1.2.3.0: the PACS {root} did not answer the search of the ImageType of series "
            "1.2.3.0 (QIDO-RS) within 1 s") in said and "whether it is a result of this app is not known" in said, said
    assert (f"failed: dicomweb:1.2.3/1.2.3.1: its ImageType was not asked (whether it is a result of this app is not "
            f"known): the PACS {root} did not answer that of series 1.2.3.0 within 1 s") in said, said
    assert not [path for path in asked if "/series/1.2.3.1/" in path], asked
    for k in range(2, 5):
        assert (f"failed: dicomweb:1.2.3/1.2.3.{k}: cannot read {root}/studies/1.2.3/series/1.2.3.{k}: the PACS "
                f"{root} did not answer the search of the instances of series 1.2.3.{k} within 1 s") in said, said
    assert (f"stopped: {root} did not answer within 1 s for 3 series in a row: the remaining 1 series were not "
            "tried; rerun to resume") in said, said


def test_a_server_that_warns_of_more_matches_stops_the_batch(tmp_path):
    """A DICOMweb server may answer part of the matches with a Warning header (DICOM PS3.18 6.7.1.2) that
    dicomweb-client only logs: the series list is refused, naming the warning. A warning about something else
    (an unsupported parameter) leaves the answer taken. (A real HTTP server on loopback; Orthanc sends none.)"""
    warning = {"text": ""}

    def answer(path: str):
        if not path.startswith("/dicom-web/series"):
            return 404, None, {}
        first_page = "offset=0" in path
        return 200, [_series_match("1.2.3.4")] if first_page else [], (
            {"Warning": warning["text"]} if warning["text"] and first_page else {})

    with _loopback_qido(answer) as root:
        client = make_client(root)
        warning["text"] = "299 pacs: There are 1200 additional results that can be requested"
        with pytest.raises(ValueError, match="lists only part of the series .1 given; its Warning: 299 pacs: There "
                                             "are 1200 additional results.*nothing was denoised"):
            discover_dicomweb(client, tmp_path / "out", SeriesFilter())
        warning["text"] = "299 pacs: the fuzzymatching parameter is not supported"
        assert [i.series_uid for i in discover_dicomweb(client, tmp_path / "out", SeriesFilter())] == ["1.2.3.4"]


def test_a_series_the_server_got_more_instances_of_is_denoised_again(tmp_path, shared_data):
    """A DICOMweb series is known by its UID and its size by the server's instance count (series-level QIDO-RS:
    none of its files is read before it is downloaded): a rerun skips it while the count is as denoised, and denoises
    it again, saying why, once the server holds another instance of it (a slice that arrived late). The first run
    reads the PACS through a slow relay (64 KiB every 0.25 s) with ADL_PACS_READ_TIMEOUT_S at 2 s: the download,
    longer than that in all, keeps arriving and is not cut (the time limit is per read)."""
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        make_series(shared_data, tmp_path / "late", range(0, 3), "abdomen low dose", generate_uid(), "20200115")
        files = sorted((tmp_path / "late").iterdir())
        pacs.upload_files(files[:2])
        out = tmp_path / "out"
        sent_s = sum(path.stat().st_size for path in files[:2]) / (64 * 1024) * 0.25  # the download's pauses
        assert sent_s > 2 * 2, sent_s  # twice the per-read limit: a limit on the whole answer would cut it
        with slow_relay(pacs, 64 * 1024, 0.25) as relayed:
            first = run_cli(batch_command(relayed, out), env={"ADL_PACS_READ_TIMEOUT_S": "2"})
        assert first.returncode == 0 and "1 series: 1 done" in first.stdout, first.stdout + first.stderr
        record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        assert len(list(Path(record["output"]).iterdir())) == 2
        again = run_batch(pacs.dicomweb, out)
        assert "1 series: 0 done, 1 skipped" in again.stdout, again.stdout + again.stderr
        pacs.upload(files[2])
        grown = run_batch(pacs.dicomweb, out)
        assert grown.returncode == 0 and "1 series: 1 done, 0 skipped" in grown.stdout, grown.stdout + grown.stderr
        assert "denoising again: the series has other slices since" in grown.stderr, grown.stderr
        assert len(list(Path(record["output"]).iterdir())) == 3
    finally:
        stop_orthanc(pacs)


def test_a_server_that_ignores_offset_is_listed_once_not_asked_for_ever(tmp_path):
    """dicomweb-client's ``get_remaining`` asks page after page (``offset``) until an empty one: a server that
    ignores ``offset`` answers its first page again, and the series list grew until memory ran out (here the server
    stops answering after 20 requests, so that the old way fails instead of hanging). A page of matches already
    listed now ends the list. (A real HTTP server on loopback.)"""
    asked: list[str] = []

    def answer(path: str):
        asked.append(path)
        if len(asked) > 20:
            return 500, None, {}
        if not path.startswith("/dicom-web/series"):
            return 404, None, {}
        return 200, [_series_match("1.2.3.4"), _series_match("1.2.3.5")], {}  # whatever the offset

    with _loopback_qido(answer) as root:
        found = discover_dicomweb(make_client(root), tmp_path / "out", SeriesFilter())
        assert [i.series_uid for i in found] == ["1.2.3.4", "1.2.3.5"]
        assert len([path for path in asked if path.startswith("/dicom-web/series")]) == 2, asked


def test_a_series_larger_than_the_free_disk_space_is_refused_before_its_download(tmp_path):
    """The download folder's free space is checked against the series' size (the download, uncompressed as WADO-RS
    sends it, and the derived series written from it) before any instance is fetched: a series the server describes
    (QIDO-RS) as 3 instances of 4096 x 4096 x 100,000 frames of 16 bits, within ADL_MAX_VOXELS, fails saying it does
    not fit and how much is free, and no WADO-RS retrieval is sent. (A real HTTP server on loopback, the batch's CLI
    (in this process), the real disk of tmp_path.)"""
    asked: list[str] = []
    instance = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
                "00280010": {"vr": "US", "Value": [4096]}, "00280011": {"vr": "US", "Value": [4096]},
                "00280008": {"vr": "IS", "Value": [100_000]}, "00280100": {"vr": "US", "Value": [16]},
                "00280002": {"vr": "US", "Value": [1]}}

    def answer(path: str):
        asked.append(path)
        first_page = "offset=" not in path or "offset=0" in path
        if path.startswith("/dicom-web/series") or path.startswith("/dicom-web/studies/1.2.3/series?"):
            return 200, [_series_match("1.2.3.4")] if first_page else [], {}
        if path.startswith("/dicom-web/studies/1.2.3/instances?"):
            return 200, [dict(instance, **{"00080018": {"vr": "UI", "Value": [f"1.2.3.4.{k}"]}}) for k in range(3)] \
                if first_page else [], {}
        return 404, None, {}

    with _loopback_qido(answer) as root:
        out = tmp_path / "out"
        command = [sys.executable, CLI, "denoise-batch", "--input", root, "--output", out, "--model", "gaussian",
                   "--no-progress"]
        result = run_cli(command, env={"ADL_MAX_VOXELS": "1e13", "ADL_DICOMWEB_RETRY_WAIT_S": "0.05"})
    assert result.returncode == 1 and "1 series: 0 done, 0 skipped, 1 failed" in result.stdout, \
        result.stdout + result.stderr
    needed = 3 * 4096 * 4096 * 100_000 * (2 + 2)  # the download and the derived series, 16 bits each
    failed = next(line for line in result.stdout.splitlines() if line.startswith("failed: "))
    assert "series 1.2.3.4 does not fit on the disk of" in failed, failed
    assert int(failed.split("3 instances need about ")[1].split(" bytes")[0].replace(",", "")) >= needed, failed
    assert "are free; nothing was downloaded" in failed, failed
    record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
    assert record["status"] == "failed" and "does not fit on the disk" in record["error"], record
    assert not [path for path in asked if path.startswith("/dicom-web/studies/1.2.3/series/1.2.3.4")], asked


def test_a_series_that_grows_past_the_voxel_limit_during_its_download_is_stopped(tmp_path, shared_data):
    """The size check (QIDO-RS) and the download (WADO-RS) are two requests: a series still being sent to the PACS
    (a scanner sending slice by slice) grows in between, and was then downloaded whole, however large, with only the
    reader's limit refusing it after the download. Here the real Orthanc's request filter (Lua) stores 3 more slices
    of the series when its WADO-RS retrieval arrives: 3 slices (0.79 M voxels) pass the check under ADL_MAX_VOXELS
    1,000,000, the retrieval sends 6 (1.57 M). The download stops at the instance that takes it over the limit and
    says the series grew."""
    from pydicom.uid import generate_uid

    study = generate_uid()
    series = make_series(shared_data, tmp_path / "series", range(0, 6), "abdomen low dose", study, "20200115")
    files = sorted((tmp_path / "series").iterdir())
    script = grow_on_retrieval(tmp_path / "grow_on_retrieval.lua", {series: files[3:]})
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]})
    try:
        pacs.upload_files(files[:3])
        out = tmp_path / "out"
        command = [sys.executable, CLI, "denoise-batch", "--input", pacs.dicomweb, "--output", out, "--model",
                   "gaussian", "--no-progress"]
        result = run_cli(command, env={"ADL_MAX_VOXELS": "1000000"})
        assert len(pacs.get(f"/series/{pacs.get('/series')[0]}")["Instances"]) == 6  # it grew (the filter ran)
        assert result.returncode == 1 and "1 series: 0 done, 0 skipped, 1 failed" in result.stdout, \
            result.stdout + result.stderr
        failed = next(line for line in result.stdout.splitlines() if line.startswith("failed: "))
        assert (f"series {series} grew during its download: 3 instances when its size was checked, 4 sent so far "
                "hold 1,048,576 voxels, over the limit of 1,000,000") in failed, failed
    finally:
        stop_orthanc(pacs)


def test_a_download_stopped_removes_the_files_it_wrote_and_nothing_else(tmp_path, shared_data):
    """A download stopped part-way (here: two series of the real Orthanc that grow past the voxel limit when their
    retrieval arrives, 3 slices checked, 6 sent) left the instances written so far in the download folder. They are
    removed now, and the folder when the download created it; a file the download did not write stays."""
    from pydicom.uid import generate_uid

    from lib.batch.dicomweb import DownloadRefused, download_series

    study = generate_uid()
    first = make_series(shared_data, tmp_path / "first", range(0, 6), "abdomen low dose", study, "20200115")
    second = make_series(shared_data, tmp_path / "second", range(6, 12), "abdomen low dose", study, "20200115")
    files = {uid: sorted((tmp_path / name).iterdir()) for uid, name in ((first, "first"), (second, "second"))}
    script = grow_on_retrieval(tmp_path / "grow.lua", {uid: paths[3:] for uid, paths in files.items()})
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]})
    try:
        pacs.upload_files(path for paths in files.values() for path in paths[:3])
        client = make_client(pacs.dicomweb)
        items = {item.series_uid: item for item in discover_dicomweb(client, tmp_path / "out", SeriesFilter())}
        fresh = tmp_path / "download" / "fresh"
        with pytest.raises(DownloadRefused, match=f"series {first} grew during its download: .* the download was "
                                                  "stopped and its files removed"):
            download_series(client, items[first], fresh, limit=1_000_000)
        assert not fresh.exists() and (tmp_path / "download").is_dir()
        kept = tmp_path / "download" / "kept"
        kept.mkdir()
        (kept / "000001.dcm.other").write_bytes(b"not ours")
        with pytest.raises(DownloadRefused, match=f"series {second} grew during its download"):
            download_series(client, items[second], kept, limit=1_000_000)
        assert [path.name for path in kept.iterdir()] == ["000001.dcm.other"]
    finally:
        stop_orthanc(pacs)


@pytest.mark.skipif(processes.private_tmpfs_problem() is not None,
                    reason=str(processes.private_tmpfs_problem()))
def test_a_series_that_grows_past_the_free_disk_space_during_its_download_is_stopped_and_the_batch_goes_on(
        tmp_path, shared_data):
    """Free disk space was checked once, before the download, against the size the server gave (QIDO-RS); a series
    that grew in between (still being sent to the PACS) under the voxel limit was downloaded until the disk was full
    (the batch's error: "No space left on device", and every other writer on that disk failed too). Each instance is
    now checked against the free space as it arrives. Here the batch's download folder is a real 6 MiB tmpfs (a
    mount namespace of the batch's own) and the real Orthanc stores 17 more slices of a 3-slice series when its
    retrieval arrives (20 x 0.5 MiB): the 3 slices fit (the download and its derived series, 3.4 MiB), the download
    stops before the disk is full, saying the series grew and how many bytes were short, the series is recorded as
    failed, and the next series is denoised."""
    import re

    from pydicom.uid import generate_uid

    grows, other = sorted(generate_uid() for _ in range(2))  # the growing series is the first one tried
    series = make_series(shared_data, tmp_path / "grows", range(0, 20), "abdomen low dose", grows, "20200115")
    small = make_series(shared_data, tmp_path / "small", range(0, 2), "abdomen low dose", other, "20200115")
    files = sorted((tmp_path / "grows").iterdir())
    script = grow_on_retrieval(tmp_path / "grow.lua", {series: files[3:]})
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]})
    try:
        pacs.upload_files(files[:3] + sorted((tmp_path / "small").iterdir()))
        out = tmp_path / "out"
        scratch = out / ".denoise_batch_download"  # the batch's download folder (lib.batch.runner)
        scratch.mkdir(parents=True)
        command = processes.on_tmpfs(scratch, 6, [sys.executable, CLI, "denoise-batch", "--input", pacs.dicomweb,
                                                  "--output", out, "--model", "gaussian", "--no-progress"])
        result = processes.run(command, TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert len(pacs.get("/instances")) == 22  # it grew (the filter ran)
        assert result.returncode == 1 and "2 series: 1 done, 0 skipped, 1 failed" in result.stdout, \
            result.stdout + result.stderr
        failed = next(line for line in result.stdout.splitlines() if line.startswith("failed: "))
        key, uid, folder = re.escape(f"{grows}/{series}"), re.escape(series), re.escape(str(scratch))
        stopped = re.fullmatch(
            rf"failed: dicomweb:{key}: series {uid} grew past the free disk space during its download \(3 instances "
            r"when its size was checked, (\d+) sent so far\): instance \1 needs about [\d,]+ bytes with the derived "
            rf"series of those downloaded, [\d,]+ are free on the disk of {folder}/\S+; the download was stopped and "
            "its files removed: free some space or choose another --output", failed)
        assert stopped and 3 < int(stopped.group(1)) < 20, failed
        records = [json.loads(line) for line in (out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()]
        outcome = {r["identity"]: r for r in records if r["status"] != "started"}
        assert outcome[f"dicom:{series}"]["status"] == "failed", outcome
        assert outcome[f"dicom:{series}"]["error"] == failed.split(": ", 2)[2], outcome
        assert outcome[f"dicom:{small}"]["status"] == "done", outcome
        assert len(list((out / other / small).iterdir())) == 2
    finally:
        stop_orthanc(pacs)


@pytest.mark.skipif(processes.private_tmpfs_problem() is not None,
                    reason=str(processes.private_tmpfs_problem()))
def test_a_download_that_finds_the_disk_full_all_the_same_says_it_does_not_fit_and_removes_its_files(
        tmp_path, shared_data):
    """The free space is checked before each instance against its pixel data and a header allowance: an instance
    whose header is larger (here a real vendor-style private element of 8 MiB in the second of 2 slices), or
    another writer taking the space after the check, fills the disk all the same. The batch's download then failed
    the series with the bare OS error ("No space left on device"); it now says the series does not fit, as the app's
    download does (the shared :func:`lib.pacs.disk_full`), and removes the files it wrote. The download folder is a
    real 6 MiB tmpfs (a mount namespace of its own) and the instances come from the real Orthanc."""
    from pydicom.uid import generate_uid

    series = make_series(shared_data, tmp_path / "series", range(0, 2), "abdomen low dose", generate_uid(), "20200115")
    files = sorted((tmp_path / "series").iterdir())
    ds = pydicom.dcmread(files[1])
    ds.private_block(0x0009, "ADL TEST VENDOR", create=True).add_new(0x10, "OB", bytes(8 * 1024 * 1024))
    ds.save_as(files[1], write_like_original=False)
    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        pacs.upload_files(files)
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        download = f"""
import json, sys
from pathlib import Path
from lib.batch.dicomweb import discover_dicomweb, download_series, make_client
from lib.batch.discovery import SeriesFilter
client = make_client({pacs.dicomweb!r})
(item,) = discover_dicomweb(client, Path({str(tmp_path / 'out')!r}), SeriesFilter())
try:
    download_series(client, item, Path({str(scratch)!r}) / "series")
    outcome = {{"error": None}}
except Exception as error:
    outcome = {{"type": type(error).__name__, "error": str(error)}}
outcome["left"] = sorted(str(p) for p in Path({str(scratch)!r}).rglob("*"))
print(json.dumps(outcome))
"""
        result = processes.run(processes.on_tmpfs(scratch, 6, [sys.executable, "-c", download]), TIMEOUT,
                               env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(APP_DIR)))
        assert result.returncode == 0, result.stdout + result.stderr
        outcome = json.loads(result.stdout.splitlines()[-1])
        assert outcome == {
            "type": "DownloadRefused", "left": [],
            "error": f"series {series} does not fit on the disk of {scratch / 'series'}: the disk was full at instance "
                     "2; the download was stopped and its files removed: free some space or choose another "
                     "--output"}, outcome
    finally:
        stop_orthanc(pacs)


def test_a_series_whose_instances_the_server_replaced_under_the_same_count_is_denoised_again(tmp_path, shared_data):
    """A DICOMweb series was known by its UID and instance count: a corrected series sent again (other SOP Instance
    UIDs, or the same UIDs stored again with new pixels) under the same count was skipped as done, and the archive
    kept a denoised copy of data the PACS no longer holds. The done record now keeps the SHA-256 of its SOP Instance
    UIDs and of their InstanceCreationDate/Time (QIDO-RS, before the download): on a real Orthanc, an instance
    deleted and another stored (same count), then an instance stored again under its UID with new pixels and a new
    creation time, are each denoised again, saying why, and the output holds the new pixels. A record of a run that
    kept no identity is checked against the SOP Instance UIDs its output names (SourceImageSequence): replaced,
    denoised again; unchanged, skipped and the identity recorded."""
    import urllib.request as request

    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        study = generate_uid()
        make_series(shared_data, tmp_path / "series", range(0, 3), "abdomen low dose", study, "20200115")
        files = sorted((tmp_path / "series").iterdir())
        for k, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.InstanceCreationDate, ds.InstanceCreationTime = "20200115", f"10000{k}"
            ds.save_as(path, write_like_original=False)
        pacs.upload_files(files)
        out = tmp_path / "out"

        def replace_instance(k: int, new_uid: bool, time_of_creation: str) -> None:
            """Instance k deleted on the server and stored again with brighter pixels (a new SOP Instance UID or
            the same one, created at ``time_of_creation``): the series keeps its count."""
            ds = pydicom.dcmread(files[k])
            orthanc_id = next(i["ID"] for i in pacs.get("/instances?expand")
                              if i["MainDicomTags"]["SOPInstanceUID"] == ds.SOPInstanceUID)
            request.urlopen(request.Request(f"{pacs.url}/instances/{orthanc_id}", method="DELETE"), timeout=60).close()
            pixels = ds.pixel_array.copy()
            pixels[100:300, 100:300] = pixels.max()
            ds.PixelData = pixels.tobytes()
            if new_uid:
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceCreationTime = time_of_creation
            ds.save_as(files[k], write_like_original=False)
            pacs.upload(files[k])
            assert len(pacs.get("/instances")) == 3

        def last_record() -> dict:
            return json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])

        def strip_identities() -> None:  # the records of a run before identities were kept
            for path in (out / MANIFEST_DIR).glob("rank-*.jsonl"):
                rows = [json.loads(line) for line in path.read_text().splitlines()]
                path.write_text("".join(json.dumps({k: v for k, v in row.items() if k not in (
                    "input_instances_sha256", "input_created_sha256")}) + "\n" for row in rows))

        first = run_batch(pacs.dicomweb, out)
        assert first.returncode == 0 and "1 series: 1 done" in first.stdout, first.stdout + first.stderr
        record = last_record()
        assert len(record["input_instances_sha256"]) == len(record["input_created_sha256"]) == 64, record
        output = Path(record["output"])
        before = read_volume(output).array
        again = run_batch(pacs.dicomweb, out)
        assert "1 series: 0 done, 1 skipped" in again.stdout, again.stdout + again.stderr

        replace_instance(0, new_uid=True, time_of_creation="110000")
        replaced = run_batch(pacs.dicomweb, out)
        assert replaced.returncode == 0 and "1 series: 1 done, 0 skipped" in replaced.stdout, \
            replaced.stdout + replaced.stderr
        assert "denoising again: the server holds other instances of the series since" in replaced.stderr, \
            replaced.stderr
        after = read_volume(output).array
        assert not np.array_equal(after, before)
        assert last_record()["input_instances_sha256"] != record["input_instances_sha256"]

        replace_instance(1, new_uid=False, time_of_creation="120000")
        restored = run_batch(pacs.dicomweb, out)
        assert restored.returncode == 0 and "1 series: 1 done, 0 skipped" in restored.stdout, \
            restored.stdout + restored.stderr
        assert "the server holds the series' instances stored again since" in restored.stderr, restored.stderr
        again_after = read_volume(output).array
        assert not np.array_equal(again_after, after)

        strip_identities()
        replace_instance(2, new_uid=True, time_of_creation="130000")
        older = run_batch(pacs.dicomweb, out)
        assert older.returncode == 0 and "1 series: 1 done, 0 skipped" in older.stdout, older.stdout + older.stderr
        assert "than its output was made from" in older.stderr, older.stderr
        assert not np.array_equal(read_volume(output).array, again_after)  # denoised, not the earlier output kept
        strip_identities()
        kept = run_batch(pacs.dicomweb, out)
        assert "1 series: 0 done, 1 skipped" in kept.stdout, kept.stdout + kept.stderr
        assert last_record()["input_instances_adopted"] is True and last_record()["input_instances_sha256"]
        last = run_batch(pacs.dicomweb, out)
        assert "1 series: 0 done, 1 skipped" in last.stdout, last.stdout + last.stderr
    finally:
        stop_orthanc(pacs)


def _store_misfiled_series(pacs, shared_data: Path, tmp_path: Path) -> list[Path]:
    """A real 3-slice CT series stored on ``pacs`` under the wrong patient (WRONG-7, Wrong^Patient), with
    InstanceCreationDate/Time set; returns its files (in ``tmp_path / "series"``)."""
    from pydicom.uid import generate_uid

    make_series(shared_data, tmp_path / "series", range(0, 3), "abdomen low dose", generate_uid(), "20200115")
    files = sorted((tmp_path / "series").iterdir())
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = "WRONG-7", "Wrong^Patient", "19500101"
        ds.InstanceCreationDate, ds.InstanceCreationTime = "20200115", f"10000{k}"
        ds.save_as(path, write_like_original=False)
    pacs.upload_files(files)
    return files


def _refile_under_the_right_patient(pacs, files: list[Path], instances: list[str],
                                    patient: tuple[str, str, str] = ("RIGHT-3", "Right^Patient", "19610203")) -> None:
    """The series of ``files`` corrected on ``pacs`` in place: ``instances`` (Orthanc ids) deleted, the files stored
    again under the right ``patient`` (PatientID, PatientName, PatientBirthDate), with the same UIDs and creation
    times."""
    for instance in instances:
        urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/instances/{instance}", method="DELETE"),
                               timeout=60).close()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient
        ds.save_as(path, write_like_original=False)
    pacs.upload_files(files)


def test_a_series_moved_to_the_right_patient_on_the_server_is_denoised_again(tmp_path, shared_data):
    """A misfiled series is corrected on the PACS in place: its patient (PatientID, PatientName, PatientBirthDate)
    changed, its UIDs, instance count, InstanceCreationDate/Time and pixels kept (Orthanc: the instances deleted and
    stored again). The rerun knew the series by its UIDs and creation times only and skipped it, so the denoised copy
    kept (and, with --store-to-pacs, stored) the wrong patient's name and ID. The record now keeps the SHA-256 of the
    patient the server lists for its instances (``input_patient_sha256``): the rerun denoises it again, saying why,
    and the output names the right patient."""
    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files = _store_misfiled_series(pacs, shared_data, tmp_path)
        out = tmp_path / "out"
        first = run_batch(pacs.dicomweb, out)
        assert first.returncode == 0 and "1 series: 1 done" in first.stdout, first.stdout + first.stderr
        record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        output = Path(record["output"])

        def patients_of_output() -> set:
            return {(str(d.PatientID), str(d.PatientName)) for d in
                    (pydicom.dcmread(p, stop_before_pixels=True) for p in output.iterdir())}

        assert patients_of_output() == {("WRONG-7", "Wrong^Patient")}
        assert "1 series: 0 done, 1 skipped" in run_batch(pacs.dicomweb, out).stdout

        _refile_under_the_right_patient(pacs, files, pacs.get("/instances"))
        assert len(pacs.get("/instances")) == 3

        moved = run_batch(pacs.dicomweb, out)
        assert moved.returncode == 0 and "1 series: 1 done, 0 skipped" in moved.stdout, moved.stdout + moved.stderr
        assert "denoising again: the server lists the series under another patient since" in moved.stderr, \
            moved.stderr
        assert patients_of_output() == {("RIGHT-3", "Right^Patient")}
        assert "1 series: 0 done, 1 skipped" in run_batch(pacs.dicomweb, out).stdout
    finally:
        stop_orthanc(pacs)


def test_a_series_moved_to_another_study_on_the_server_is_denoised_again_and_stored_there(tmp_path, shared_data):
    """A series is moved to another study of its patient on the PACS (a study split or merged: its StudyInstanceUID
    changed, its SeriesInstanceUID, SOP Instance UIDs, creation times, patient and pixels kept; Orthanc: the instances
    deleted and stored again). The rerun with --store-to-pacs found the derived series it stored still in the old
    study and skipped the series: the denoised copy stayed filed under a study the series is no longer in. The study
    a record's series was listed in is now compared: the series is denoised again, saying why, stored in its new study,
    and the derived series left in the old one is reported superseded."""
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files, source_uid, out, old_uid = _misfiled_series_stored(pacs, shared_data, tmp_path)
        old_study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert "1 series: 0 done, 1 skipped" in run_batch(pacs.dicomweb, out, "--store-to-pacs").stdout
        new_study = generate_uid()
        _move_to_study(pacs, source_uid, files, new_study)

        moved = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        output = moved.stdout + moved.stderr
        assert moved.returncode == 0 and "1 series: 1 done, 0 skipped" in moved.stdout, output
        assert f"denoising again: the server lists the series in another study since ({old_study} -> {new_study}: " \
            in moved.stderr, output
        record = _records(out)[-1]
        assert record["status"] == "done" and record["derived_study_uid"] == new_study, record
        assert record["stored"]["series_instance_uid"] != old_uid
        report = _superseded_report(moved)
        assert len(report) == 1 and old_uid in report[0] and old_study in report[0], output
        assert "1 series: 0 done, 1 skipped" in run_batch(pacs.dicomweb, out, "--store-to-pacs").stdout
    finally:
        stop_orthanc(pacs)


def test_the_local_output_left_in_the_old_study_folder_after_a_move_is_reported_until_removed(tmp_path, shared_data):
    """A series moved to another study on the PACS is written under its new study's folder (``<study>/<series>``);
    the folder an earlier run wrote under the old study stayed there, unreported: a denoised copy filed under a study
    the series is no longer in. It is now reported at the end of every run (and warned of) while it is there, never
    deleted; once removed, no more. (Real Orthanc; the move as in the test above, without --store-to-pacs.)"""
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        old_study, new_study = generate_uid(), generate_uid()
        series = make_series(shared_data, tmp_path / "series", range(0, 2), "abdomen low dose", old_study, "20200115")
        files = sorted((tmp_path / "series").iterdir())
        pacs.upload_files(files)
        out = tmp_path / "out"
        assert "1 series: 1 done" in run_batch(pacs.dicomweb, out).stdout
        old = out / old_study / series
        assert old.is_dir()
        _move_to_study(pacs, series, files, new_study)

        moved = run_batch(pacs.dicomweb, out)
        assert moved.returncode == 0 and "1 series: 1 done, 0 skipped" in moved.stdout, moved.stdout + moved.stderr
        assert (out / new_study / series).is_dir() and old.is_dir()  # nothing deleted
        expected = (f"left in another study's folder: dicomweb:{new_study}/{series}: {old.resolve()} holds its output "
                    f"that an earlier run wrote when the server listed it in study {old_study}; it is now in study "
                    f"{new_study} (its output: {out / new_study / series}): remove it once no longer needed (nothing "
                    "was deleted)")
        assert _left_report(moved) == [expected], moved.stdout
        assert str(old.resolve()) in moved.stderr  # warned of when found
        again = run_batch(pacs.dicomweb, out)
        assert "1 series: 0 done, 1 skipped" in again.stdout and _left_report(again) == [expected], again.stdout
        shutil.rmtree(old)
        last = run_batch(pacs.dicomweb, out)
        assert "1 series: 0 done, 1 skipped" in last.stdout and _left_report(last) == [], last.stdout
    finally:
        stop_orthanc(pacs)


def _copy_to(pacs, files: list[Path], folder: Path, study_uid: str, patient_id: str) -> list[str]:
    """``files`` copied into ``folder`` under ``study_uid`` and ``patient_id`` (new SOP Instance UIDs, the same
    SeriesInstanceUID) and stored on ``pacs``. Returns the Orthanc ids of the instances stored."""
    from pydicom.uid import generate_uid

    folder.mkdir()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.PatientID = study_uid, patient_id
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / path.name, write_like_original=False)
    return [answer["ID"] for answer in pacs.upload_folder(folder)]


def _delete(pacs, instances: list[str]) -> None:
    for instance in instances:
        urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/instances/{instance}", method="DELETE"),
                               timeout=60).close()


def test_a_series_uid_listed_in_two_studies_or_under_two_patients_is_refused_not_redone_every_run(tmp_path,
                                                                                                  shared_data):
    """One SeriesInstanceUID stored in two studies (a mis-merged or mis-anonymised archive). Orthanc 1.10 keeps both
    apart (a series per study; QIDO-RS lists the UID twice, its WADO-RS answers 404 for either) and, for one study
    under two PatientIDs, lists the same study and series twice. The job is the series UID alone: each copy took the
    other for the same series moved to another study, so every --store-to-pacs rerun redid one and reported the
    other's valid derived series superseded for the administrator to delete (on a server that serves both, it also
    stored a new derived series each time). Both are now refused at discovery, naming the studies (and patients):
    nothing denoised, stored or reported superseded (not even a derived series that an earlier redo of the UID
    superseded), the earlier output left in its study's folder; the rest of the run goes on, and once the archive is
    fixed the series is recorded from what the server already holds and the superseded one reported again."""
    from pydicom.uid import generate_uid

    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        study, other_study, copy_study = generate_uid(), generate_uid(), generate_uid()
        series = make_series(shared_data, tmp_path / "series", range(0, 2), "abdomen low dose", study, "20200115")
        make_series(shared_data, tmp_path / "other", range(2, 4), "abdomen low dose", other_study, "20200115")
        files = sorted((tmp_path / "series").iterdir())
        pacs.upload_files(files)
        pacs.upload_folder(tmp_path / "other")
        out = tmp_path / "out"
        first = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert first.returncode == 0 and "2 series: 2 done" in first.stdout, first.stdout + first.stderr
        # its instances replaced (a corrected series sent again): redone, the first derived series superseded
        stale = next(r["stored"]["series_instance_uid"] for r in _records(out) if r.get("stored")
                     and r["key"] == f"dicomweb:{study}/{series}")
        _delete(pacs, _source_instances(pacs, series))
        _copy_to(pacs, files, tmp_path / "replaced", study, "BATCH")
        files = sorted((tmp_path / "replaced").iterdir())
        redone = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert "2 series: 1 done, 1 skipped" in redone.stdout and stale in "".join(_superseded_report(redone)), \
            redone.stdout + redone.stderr
        derived, output = _derived(pacs), out / study / series
        assert len(derived) == 3 and output.is_dir()

        copy = _copy_to(pacs, files, tmp_path / "copy", copy_study, "BATCH")  # the same patient, another study
        assert sorted(s["MainDicomTags"]["SeriesInstanceUID"] for s in pacs.get("/series?expand")
                      if "[denoised" not in s["MainDicomTags"].get("SeriesDescription", "")).count(series) == 2
        for _ in range(2):  # every run alike: nothing redone, nothing stored, nothing reported superseded
            again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
            text = again.stdout + again.stderr
            assert again.returncode == 1 and "3 series: 0 done, 1 skipped, 2 failed" in again.stdout, text
            first_study, second_study = sorted([study, copy_study])
            expected = (f"series UID {series} is listed in studies {first_study} and {second_study} (under patient "
                        "BATCH): not denoised; fix the archive (one SeriesInstanceUID belongs to one study of one "
                        "patient)")
            for key in (f"dicomweb:{study}/{series}", f"dicomweb:{copy_study}/{series}"):
                assert f"failed: {key}: {expected}\n" in again.stdout, text
            # the job mixes both copies: not even the derived series its earlier redo superseded is reported
            assert _superseded_report(again) == [] and "superseded" not in again.stderr, text
            assert "denoising again" not in again.stderr and "left in another study" not in again.stdout, text
            assert _derived(pacs) == derived and output.is_dir(), text  # left in place, in its own study's folder
            assert not (out / copy_study).exists()

        # one study and series under two patients: listed twice with the same UIDs, both refused
        _delete(pacs, copy)
        copy = _copy_to(pacs, files, tmp_path / "other_patient", study, "OTHER")
        items = [i for i in discover_dicomweb(make_client(pacs.dicomweb), out, SeriesFilter())
                 if i.series_uid == series]
        assert [i.key for i in items] == [f"dicomweb:{study}/{series}"] * 2, items
        for item in items:
            assert item.problem == (f"series UID {series} is listed in study {study} (under patients BATCH and "
                                    "OTHER): not denoised; fix the archive (one SeriesInstanceUID belongs to one "
                                    "study of one patient)"), item.problem

        # the archive fixed: recorded from the derived series the server holds, nothing stored again
        _delete(pacs, copy)
        fixed = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        text = fixed.stdout + fixed.stderr
        assert fixed.returncode == 0 and "2 series: 1 done, 1 skipped, 0 failed" in fixed.stdout, text
        assert "already holds its derived series" in fixed.stderr and _derived(pacs) == derived, text
        report = _superseded_report(fixed)  # reported again, still there
        assert len(report) == 1 and stale in report[0] and "still there" in report[0], text
    finally:
        stop_orthanc(pacs)


def _left_report(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("left in another study's folder:")]


def _move_to_study(pacs, series_uid: str, files: list[Path], study_uid: str) -> None:
    """Move the series ``series_uid`` (stored from ``files``) to the study ``study_uid`` on ``pacs`` as a study split
    or merge does: its instances deleted and stored again, only their StudyInstanceUID changed (``files`` too)."""
    for instance in _source_instances(pacs, series_uid):
        urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/instances/{instance}", method="DELETE"),
                               timeout=60).close()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.save_as(path, write_like_original=False)
    pacs.upload_files(files)


def _source_instances(pacs, source_uid: str) -> list[str]:
    """The Orthanc ids of the instances of the series ``source_uid`` on ``pacs``."""
    return [instance for series in pacs.get("/series?expand")
            if series["MainDicomTags"]["SeriesInstanceUID"] == source_uid for instance in series["Instances"]]


def _superseded_report(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("superseded on the PACS:")]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out / MANIFEST_DIR).glob("rank-*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def _misfiled_series_stored(pacs, shared_data: Path, tmp_path: Path) -> tuple[list[Path], str, Path, str]:
    """The misfiled series of :func:`_store_misfiled_series` on ``pacs``, denoised with --store-to-pacs into
    ``tmp_path / "out"`` (nothing superseded yet). Returns (its files, its SeriesInstanceUID, the output folder, the
    SeriesInstanceUID of the derived series stored)."""
    files = _store_misfiled_series(pacs, shared_data, tmp_path)
    source_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    out = tmp_path / "out"
    first = run_batch(pacs.dicomweb, out, "--store-to-pacs")
    output = first.stdout + first.stderr
    assert first.returncode == 0 and "1 series: 1 done" in first.stdout, output
    assert _superseded_report(first) == [] and "stored, superseded" not in first.stderr, output
    return files, source_uid, out, _records(out)[-1]["stored"]["series_instance_uid"]


def _superseded_twice(pacs, shared_data: Path, tmp_path: Path) -> tuple[Path, str, str, object]:
    """The misfiled series (:func:`_misfiled_series_stored`) corrected twice on ``pacs`` (moved to one patient, then to
    another), each time denoised and stored again: two derived series superseded, both still on the PACS. Returns
    (the output folder, the first and the second superseded derived series' UIDs, the second redo's result)."""
    files, source_uid, out, first_uid = _misfiled_series_stored(pacs, shared_data, tmp_path)
    _refile_under_the_right_patient(pacs, files, _source_instances(pacs, source_uid),
                                    ("OTHER-5", "Other^Patient", "19700101"))
    once = run_batch(pacs.dicomweb, out, "--store-to-pacs")
    assert "1 series: 1 done" in once.stdout and len(_superseded_report(once)) == 1, once.stdout + once.stderr
    second_uid = _records(out)[-1]["stored"]["series_instance_uid"]
    _refile_under_the_right_patient(pacs, files, _source_instances(pacs, source_uid))
    return out, first_uid, second_uid, run_batch(pacs.dicomweb, out, "--store-to-pacs")


def test_a_derived_series_stored_under_the_wrong_patient_is_reported_superseded(tmp_path, shared_data):
    """The misfiled series of the test above, denoised with --store-to-pacs: its derived series is on the PACS under
    the wrong patient. Corrected in place and rerun, it is denoised and stored again (a new derived series), and the
    first one stays on the PACS (standard DICOMweb cannot delete). The rerun said nothing of it; it now checks that the
    server still lists it (QIDO-RS) and reports it superseded, "stored under another patient", for the PACS
    administrator to remove: a warning and the end-of-run report (the same sentence), and the record's
    ``superseded_derived_series``. Nothing is deleted."""
    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        files, source_uid, out, old_uid = _misfiled_series_stored(pacs, shared_data, tmp_path)
        # the source series (only it: the derived one stays) filed under its right patient, same UIDs and times
        _refile_under_the_right_patient(pacs, files, _source_instances(pacs, source_uid))

        moved = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        output = moved.stdout + moved.stderr
        assert moved.returncode == 0 and "1 series: 1 done, 0 skipped" in moved.stdout, output
        record = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        assert record["status"] == "done" and record["stored"]["series_instance_uid"] != old_uid
        superseded = record["superseded_derived_series"]
        assert superseded["series_instance_uid"] == old_uid and superseded["other_patient"] is True
        assert superseded["instances_on_server"] == 3 and "stored under another patient" in superseded["why"]
        report = _superseded_report(moved)
        assert len(report) == 1 and old_uid in report[0] and "stored under another patient" in report[0], output
        assert "PACS administrator must remove it" in report[0] and "nothing was deleted" in report[0]
        assert "WARNING" in moved.stderr and f"derived series {old_uid}" in moved.stderr, moved.stderr
        # the warning and the report say the same sentence (one function builds it)
        assert report[0].removeprefix("superseded on the PACS: ") in moved.stderr, output
        # nothing deleted: both derived series on the PACS (the old one for the administrator to remove)
        derived = {s["MainDicomTags"]["SeriesInstanceUID"] for s in pacs.get("/series?expand")} - {source_uid}
        assert derived == {old_uid, record["stored"]["series_instance_uid"]}

        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")  # reported until removed: see the tests below
        assert "1 series: 0 done, 1 skipped" in again.stdout and old_uid in again.stdout, again.stdout
    finally:
        stop_orthanc(pacs)


def _searches_naming(uid: str, searches: list[str]) -> int:
    """How many of the QIDO-RS searches ``searches`` (:func:`orthanc.qido_searches`) ask for the series ``uid``."""
    return sum(f"SeriesInstanceUID={uid}" in search.split() for search in searches)


def test_a_superseded_derived_series_is_reported_by_every_rerun_until_it_is_removed(tmp_path, shared_data):
    """The superseded derived series of the test above was reported by the run that redid its series only: the next
    rerun skipped the series and said nothing more, so a derived series under the wrong patient that nobody removed
    after that run stayed on the PACS unmentioned. Every rerun now asks the server again (one QIDO-RS search per
    superseded series recorded, none for a series found gone) and reports it, "still there, first reported at"
    the redo's time, with the same warning and end-of-run line; once it is deleted on the server (Orthanc's REST
    API), the next rerun reports it no more and records when it found it gone, and the runs after it do not ask. A
    rerun whose filters leave the series out asks and reports it too, also given the URL with a user name and
    password (never printed; it was compared with the records' URL, without them: never asked). The searches
    naming the series are counted in Orthanc's log (its DICOMweb plugin logs each search's arguments)."""
    pacs = start_orthanc(tmp_path / "orthanc", log_options=QIDO_LOG)
    try:
        files, source_uid, out, old_uid = _misfiled_series_stored(pacs, shared_data, tmp_path)
        _refile_under_the_right_patient(pacs, files, _source_instances(pacs, source_uid))
        moved = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert "1 series: 1 done, 0 skipped" in moved.stdout, moved.stdout + moved.stderr
        assert len(_superseded_report(moved)) == 1 and "still there" not in moved.stdout, moved.stdout
        redone = _records(out)[-1]
        new_uid = redone["stored"]["series_instance_uid"]
        [entry] = redone["superseded_on_server"]
        assert entry["series_instance_uid"] == old_uid and entry["first_reported"] <= redone["time"]
        assert "gone" not in entry

        # a rerun without changes: skipped, and the derived series still on the PACS is reported again
        start = log_size(pacs)
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        output = again.stdout + again.stderr
        assert again.returncode == 0 and "1 series: 0 done, 1 skipped" in again.stdout, output
        report = _superseded_report(again)
        assert len(report) == 1 and old_uid in report[0] and "stored under another patient" in report[0], output
        first_reported = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry["first_reported"]))
        assert f"still there, first reported at {first_reported}" in report[0], output
        assert report[0].removeprefix("superseded on the PACS: ") in again.stderr and "WARNING" in again.stderr
        assert new_uid not in report[0]  # the current derived series is not superseded
        # asked once, by its UID; the current derived series not at all
        searches = qido_searches(pacs, start)
        assert _searches_naming(old_uid, searches) == 1 and _searches_naming(new_uid, searches) == 0, searches

        # a rerun whose filter leaves the series out still asks and reports it (rank 0, from the records); given
        # the URL with a user name and password (Orthanc here asks none), which the records are without (it was
        # compared with the URL as given: never the same, never asked), and that it never prints
        other = run_batch(pacs.dicomweb.replace("://", "://dr_admin:s3cret-pw@", 1), out, "--store-to-pacs",
                          "--series-description", "*no such series*")
        assert f"0 series found in {pacs.dicomweb};" in other.stdout, other.stdout + other.stderr
        assert [line for line in _superseded_report(other) if old_uid in line] == report, other.stdout
        assert "s3cret-pw" not in other.stdout + other.stderr, other.stdout + other.stderr

        # the administrator deletes it on the PACS: the next rerun reports it no more, and records it gone
        [orthanc_id] = [s["ID"] for s in pacs.get("/series?expand")
                        if s["MainDicomTags"]["SeriesInstanceUID"] == old_uid]
        urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/series/{orthanc_id}", method="DELETE"),
                               timeout=60).close()
        before = time.time()
        removed = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert "1 series: 0 done, 1 skipped" in removed.stdout, removed.stdout + removed.stderr
        assert _superseded_report(removed) == [] and f"derived series {old_uid}" not in removed.stderr, \
            removed.stdout + removed.stderr
        [entry] = _records(out)[-1]["superseded_on_server"]
        assert entry["series_instance_uid"] == old_uid and entry["gone"] >= before
        merged = json.loads((out / MANIFEST_DIR / "manifest.jsonl").read_text().splitlines()[0])
        assert merged["superseded_on_server"][0]["gone"] == entry["gone"]
        # found gone: not asked again, no record added
        start, count = log_size(pacs), len(_records(out))
        last = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        assert "1 series: 0 done, 1 skipped" in last.stdout and _superseded_report(last) == [], last.stdout
        searches = qido_searches(pacs, start)
        assert _searches_naming(old_uid, searches) == 0 and len(_records(out)) == count, searches
    finally:
        stop_orthanc(pacs)


def test_a_series_redone_twice_reports_both_superseded_derived_series(tmp_path, shared_data):
    """A series corrected twice on the PACS (moved to one patient, then to another) is redone twice with
    --store-to-pacs: the second redo superseded the second derived series, and reported only it, the first one (still
    under the first wrong patient) being in no record the rerun read. Both are now reported by the second redo and by
    every rerun after it, also from records as the previous version wrote them (each redo's record naming only the
    one it superseded, ``superseded_derived_series``, without the list)."""
    pacs = start_orthanc(tmp_path / "orthanc")
    try:
        out, first_uid, second_uid, twice = _superseded_twice(pacs, shared_data, tmp_path)
        output = twice.stdout + twice.stderr
        assert twice.returncode == 0 and "1 series: 1 done, 0 skipped" in twice.stdout, output
        report = _superseded_report(twice)
        assert len(report) == 2, output
        assert sum(first_uid in line for line in report) == 1 and sum(second_uid in line for line in report) == 1
        record = _records(out)[-1]
        assert record["superseded_derived_series"]["series_instance_uid"] == second_uid
        assert {e["series_instance_uid"] for e in record["superseded_on_server"]} == {first_uid, second_uid}
        # all three derived series on the PACS: nothing deleted
        source_uid = record["identity"].removeprefix("dicom:")
        derived = {s["MainDicomTags"]["SeriesInstanceUID"] for s in pacs.get("/series?expand")} - {source_uid}
        assert derived == {first_uid, second_uid, record["stored"]["series_instance_uid"]}

        # records as the previous version wrote them (no list): a rerun reads the chain back from them
        for path in (out / MANIFEST_DIR).glob("rank-*.jsonl"):
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for line in lines:
                line.pop("superseded_on_server", None)
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")
        output = again.stdout + again.stderr
        assert "1 series: 0 done, 1 skipped" in again.stdout, output
        report = _superseded_report(again)
        assert len(report) == 2 and all("still there, first reported at" in line for line in report), output
        assert {first_uid, second_uid} == {uid for uid in (first_uid, second_uid) for line in report if uid in line}
        assert {e["series_instance_uid"] for e in _records(out)[-1]["superseded_on_server"]} == {first_uid,
                                                                                                 second_uid}
    finally:
        stop_orthanc(pacs)


#: the URI (a Lua pattern) of a series-level search within a study: what a superseded derived series is asked with
#: (the series list is ``/series``)
SUPERSEDED_SEARCH = "^/dicom%-web/studies/[^/]+/series$"


def _orthanc_holding_a_superseded_search(tmp_path: Path, hold: str = SUPERSEDED_SEARCH):
    """Orthanc (QIDO-RS searches logged, :data:`orthanc.QIDO_LOG`) whose Lua IncomingHttpRequestFilter, while
    ``armed`` exists, holds the first GET whose URI matches ``hold`` (a Lua pattern; by default the first superseded
    series' search, :data:`SUPERSEDED_SEARCH`): it writes ``held`` and never answers. The test kills Orthanc
    meanwhile: the PACS goes down after the batch listed the series and before that request is answered
    (deterministic, no timing guess). Started again (the same storage, another port) with the same call. Returns
    (pacs, armed, held)."""
    armed, held = tmp_path / "armed", tmp_path / "held"
    script = tmp_path / "hold_superseded_search.lua"
    script.write_text(f"""
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == "GET" and string.match(uri, "{hold}") then
    local arm = io.open("{armed}", "r")
    if arm ~= nil then
      io.close(arm)
      os.remove("{armed}")
      local s = io.open("{held}", "w")
      s:write("held")
      io.close(s)
      os.execute("sleep 600")
    end
  end
  return true
end
""")
    pacs = start_orthanc(tmp_path / "orthanc", extra_config={"LuaScripts": [str(script)]}, log_options=QIDO_LOG)
    return pacs, armed, held


def _rerun_while_the_pacs_dies(tmp_path: Path, pacs, armed: Path, held: Path, out: Path) -> tuple[int, str]:
    """A rerun into ``out`` with --store-to-pacs on ``pacs`` (:func:`_orthanc_holding_a_superseded_search`, armed
    here), Orthanc killed (its process group) once it holds the request: the PACS gone with that request
    unanswered. The client's retries are short (``ADL_DICOMWEB_RETRY_WAIT_S``: 0.75 s of waits a request). Returns
    the run's exit status and its output."""
    armed.write_text("")
    log_path = tmp_path / "unreachable.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", ADL_DICOMWEB_RETRY_WAIT_S="0.05")
    process = processes.start(batch_command(pacs.dicomweb, out, "--store-to-pacs", "--no-progress"), log_path, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not held.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.exists(), log_path.read_text()
        processes.kill_group(pacs.process)
        process.wait(TIMEOUT)
    finally:
        processes.stop(process)
    return process.returncode, log_path.read_text()


def test_a_pacs_that_cannot_be_reached_is_not_asked_of_every_superseded_series(tmp_path, shared_data):
    """Every rerun asks the PACS of each superseded derived series recorded (QIDO-RS). With the PACS down, each search
    failed only after the client's retries (half a minute by default), one after the other, each with its warning,
    before the series was reported "may still hold". Once one search finds the server unreachable, the others are no
    longer asked in that run: one warning says so, and every superseded series is reported "may still hold (PACS
    unreachable)". Here Orthanc is killed (by its process group) while it holds the first such search of a rerun, with
    two superseded series recorded: one search fails (one warning naming the series it asked of), both are reported;
    nothing is recorded as gone, and with Orthanc back the next rerun asks of both (each once) and reports them."""
    pacs, armed, held = _orthanc_holding_a_superseded_search(tmp_path)
    try:
        out, first_uid, second_uid, twice = _superseded_twice(pacs, shared_data, tmp_path)
        assert len(_superseded_report(twice)) == 2, twice.stdout + twice.stderr

        returncode, log = _rerun_while_the_pacs_dies(tmp_path, pacs, armed, held, out)
        # asked of one superseded series (the one failed search), not of each
        failed = [line for line in log.splitlines() if "whether it holds the derived series" in line]
        assert len(failed) == 1 and "are not asked in this run" in failed[0], log
        assert sum(uid in failed[0] for uid in (first_uid, second_uid)) == 1, failed
        report = [line for line in log.splitlines() if line.startswith("superseded on the PACS:")]
        assert len(report) == 2 and all("may still hold (PACS unreachable)" in line for line in report), log
        assert all(sum(uid in line for line in report) == 1 for uid in (first_uid, second_uid)), report
        # the series itself fails (the server cannot be reached); its record keeps both, neither gone
        assert returncode == 1 and "0 done, 0 skipped, 1 failed" in log, log
        entries = _records(out)[-1]["superseded_on_server"]
        assert {e["series_instance_uid"] for e in entries} == {first_uid, second_uid}
        assert not any("gone" in e or "pacs_unreachable" in e for e in entries), entries

        pacs, _, _ = _orthanc_holding_a_superseded_search(tmp_path)  # back: the same storage, another port
        again = run_batch(pacs.dicomweb, out, "--store-to-pacs")  # (the failed series recorded done, not stored again)
        assert again.returncode == 0 and "1 series: 1 done, 0 skipped, 0 failed" in again.stdout, \
            again.stdout + again.stderr
        report = _superseded_report(again)
        assert len(report) == 2 and all("still there" in line and "unreachable" not in line for line in report), \
            again.stdout
        searches = qido_searches(pacs)
        assert _searches_naming(first_uid, searches) == 1 and _searches_naming(second_uid, searches) == 1, searches
    finally:
        stop_orthanc(pacs)


def test_a_pacs_found_unreachable_by_a_series_is_not_asked_of_the_superseded_series_after_it(tmp_path, shared_data):
    """Not only a superseded-series check turns the others off: a series that fails because the PACS cannot be
    reached does too, for the rest of the run. Here the series redone twice (two superseded derived series recorded)
    comes second in the run; the first, a new series of study 1.1.1, has its first request held by Orthanc's Lua
    filter while Orthanc is killed (its process group): that series fails for want of the server, and the second
    series' superseded derived series are not asked (no search fails; one warning says they are not asked), both
    reported "may still hold (PACS unreachable)", neither recorded gone. They were asked, each search failing after
    the client's retries."""
    pacs, armed, held = _orthanc_holding_a_superseded_search(tmp_path, hold="^/dicom%-web/studies/1%.1%.1/")
    try:
        out, first_uid, second_uid, twice = _superseded_twice(pacs, shared_data, tmp_path)
        assert len(_superseded_report(twice)) == 2, twice.stdout + twice.stderr
        # a series before it in the run (keys are sorted: "dicomweb:1.1.1/..." first)
        make_series(shared_data, tmp_path / "first", range(3, 6), "abdomen low dose", "1.1.1", "20200116")
        pacs.upload_folder(tmp_path / "first")

        returncode, log = _rerun_while_the_pacs_dies(tmp_path, pacs, armed, held, out)
        assert returncode == 1 and "2 series: 0 done, 0 skipped, 2 failed" in log, log
        assert [line for line in log.splitlines() if "whether it holds the derived series" in line] == [], log
        notice = [line for line in log.splitlines() if "are not asked in this run" in line]
        assert len(notice) == 1 and "cannot be reached" in notice[0], log
        report = [line for line in log.splitlines() if line.startswith("superseded on the PACS:")]
        assert len(report) == 2 and all("may still hold (PACS unreachable)" in line for line in report), log
        assert all(sum(uid in line for line in report) == 1 for uid in (first_uid, second_uid)), report
        entries = [r for r in _records(out) if r.get("superseded_on_server")][-1]["superseded_on_server"]
        assert {e["series_instance_uid"] for e in entries} == {first_uid, second_uid}
        assert not any("gone" in e or "pacs_unreachable" in e for e in entries), entries
    finally:
        stop_orthanc(pacs)
