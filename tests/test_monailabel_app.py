"""The MONAI Label app, as a real server process on 127.0.0.1 driven by the official client.

Weights are small real models trained for a few steps by the project's trainers (see ``mlserver.py``); the
studies are crops of the real sample CT / MR volumes (``mlserver.shared_studies``). Inference, review and bad
input go to the session's shared server; the training tests save corrections, publish and restore weights, so
they share a server of their own, which no other module sees.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from conftest import SAMPLE_STUDIES, import_app_main
from mlserver import (assert_same_geometry, copy_weights, read_array, shared_studies, start_server, stop_server,
                      write_crop)

pytestmark = [pytest.mark.server, pytest.mark.slow]

CT_IDS = ("ct_slice_a", "ct_slab_b", "ct_slab_c")


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def training_server(tmp_path_factory, tiny_weights):
    """A server of this module's training tests, with the shared server's studies and configuration; its working
    directory is a folder of its own (a test puts files there)."""
    root = tmp_path_factory.mktemp("monailabel_training")
    (root / "cwd").mkdir()
    srv = start_server(shared_studies(root / "studies"), copy_weights(tiny_weights, root / "model"), root / "work",
                       conf={"max_voxels": 3_000_000}, cwd=root / "cwd")
    yield srv
    stop_server(srv)
    assert srv.process.returncode is not None


@pytest.fixture()
def client(server, tmp_path) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path))


@pytest.fixture()
def training_client(training_server, tmp_path) -> MONAILabelClient:
    return MONAILabelClient(training_server.url, tmpdir=str(tmp_path))


def http(server, method: str, path: str, body: dict | None = None) -> tuple[int, dict | list | str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def error_of(call) -> tuple[int, str]:
    import re

    with pytest.raises(MONAILabelClientException) as info:
        call()
    status = info.value.status_code or int(re.search(r"Status: (\d+)", info.value.msg).group(1))
    return status, info.value.msg


def wait_for_training(client: MONAILabelClient, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.train_status(False)
        if status.get("status") not in ("RUNNING", "SUBMITTED", "QUEUED"):
            return status
        time.sleep(1.0)
    raise AssertionError("training did not finish in time")


def served_version(client: MONAILabelClient, model: str = "adl", modality: str = "ct") -> str:
    return client.info()["models"][model]["weights"][modality]["version"]


# --------------------------------------------------------------------------------------------------- info
def test_info_describes_both_models_with_weights_and_training(client):
    info = client.info()
    assert set(info["models"]) == {"adl", "tddl_gcn", "nlm"}
    assert set(info["trainers"]) == {"adl", "tddl_gcn"}  # the classical baseline has nothing to train
    adl, gcn = info["models"]["adl"], info["models"]["tddl_gcn"]
    assert adl["type"] == "others" and adl["method"].startswith("ADL")
    assert gcn["method"].startswith("TDDL-GCN")
    assert set(adl["weights"]) == {"ct", "mr"} and set(gcn["weights"]) == {"ct"}
    ct = adl["weights"]["ct"]
    assert ct["available"] and ct["version"] == "pretrained" and len(ct["sha256"]) == 16
    assert ct["training"]["steps"] == 25 and ct["training"]["hardware"]["logical_cpus"] >= 1
    assert "next_unreviewed" in info["strategies"]
    assert info["train_stats"]["adl"]["key_metric"] == "PSNR (dB)"


# --------------------------------------------------------------------------------------------------- infer
def test_infer_by_datastore_id_keeps_grid_and_hounsfield_units(client, server):
    path, result = client.infer("adl", "ct_slab_b", {})
    out, out_image = read_array(path)
    source, source_image = read_array(server.studies / "ct_slab_b.nii.gz")
    assert_same_geometry(out_image, source_image)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    tissue = (source > 0) & (source < 80)
    assert abs(float(out[tissue].mean() - source[tissue].mean())) < 15  # still HU, same tissue level
    assert result["model"] == "adl" and result["modality"] == "CT" and result["weights_version"] == "pretrained"
    assert result["modality_from"] == "guessed from the values"  # a NIfTI has no modality; the client sees the guess
    assert result["shape"] == list(source.shape) and result["planes"] == "slices"
    # the audit note on the study names the weights
    audit = http(server, "GET", "/review/ct_slab_b")[1]
    assert audit["denoise_results"][-1]["weights_version"] == "pretrained"


def test_classical_baseline_serves_without_weights_and_improves_the_low_dose_input(client, server, tmp_path):
    from lib.evaluation import psnr

    path, result = client.infer("nlm", "ct_slab_b", {"modality": "ct"})
    assert result["weights_version"] == "classical-nlm" and result["modality"] == "CT"
    assert result["modality_from"] == "request"
    reference = write_crop(SAMPLE_STUDIES / "ct_head_invesalius.nii.gz", tmp_path / "ref.nii.gz", z=slice(40, 44))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(reference))).astype(np.float32)
    noisy, _ = read_array(server.studies / "ct_slab_b.nii.gz")
    out, _ = read_array(path)
    window = (-160.0, 240.0)
    assert psnr(out, ref, window=window) > psnr(noisy.astype(np.float32), ref, window=window) + 2.0


def test_infer_upload_of_a_non_ras_volume_comes_back_on_its_own_grid_unflipped(client, server, tmp_path):
    from lib.lesions.low_frequency_restoration import default_sigma_px, restore_low_frequencies
    from lib.predict import denoise_array, load_denoiser

    image = sitk.ReadImage(str(server.studies / "ct_slab_b.nii.gz"))
    oblique = sitk.Image(image)
    # an oblique, left-handed (flipped) direction with a shifted origin: nothing like RAS
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rotation @ np.diag([-1.0, 1.0, -1.0])
    oblique.SetDirection(tuple(direction.ravel()))
    oblique.SetOrigin((12.5, -40.25, 7.0))
    upload = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(oblique, str(upload))
    path, result = client.infer("adl", "", {"modality": "ct"}, file=str(upload))
    out, out_image = read_array(path)
    assert_same_geometry(out_image, sitk.ReadImage(str(upload)))
    noisy = sitk.GetArrayFromImage(oblique).astype(np.float32)
    # the network's output with CT's default low-frequency restoration, in the image's own slice planes
    expected = restore_low_frequencies(noisy, denoise_array(load_denoiser(server.model_dir / "pretrained_adl_ct.pt"),
                                                            noisy, "CT"), default_sigma_px("CT"))
    np.testing.assert_allclose(out, expected, atol=0.05)  # voxel for voxel: not flipped, not resampled
    assert result["low_frequency_restoration"] == default_sigma_px("CT") > 0


def test_a_sheared_nrrd_is_denoised_on_its_own_grid_and_never_written_as_nifti(client, server, tmp_path):
    """A gantry tilt kept in an NRRD: its result as NIfTI (the default) had other axes, each voxel of the 4th slice
    some 2.7 mm from its input voxel; now that is refused before the work and NRRD / MHA keep the grid."""
    image = sitk.ReadImage(str(server.studies / "ct_slab_b.nii.gz"))
    image.SetDirection((1, 0, 0, 0, 1, 0.3162278, 0, 0, 0.9486833))  # the slice axis tilted by 18.4 degrees
    upload = tmp_path / "tilted.nrrd"
    sitk.WriteImage(image, str(upload))
    code, message = error_of(lambda: client.infer("adl", "", {}, file=str(upload)))
    assert code == 422 and "not perpendicular" in message and ".nrrd" in message, message
    for extension in (".nrrd", ".mha"):
        path, result = client.infer("adl", "", {"result_extension": extension}, file=str(upload))
        _, out = read_array(path)
        for index in ((0, 0, 0), (10, 20, 3), (255, 255, 3)):
            np.testing.assert_allclose(out.TransformIndexToPhysicalPoint(index),
                                       image.TransformIndexToPhysicalPoint(index), atol=1e-4)


def test_low_frequency_restoration_is_the_modality_default_can_be_set_and_is_audited(client, server):
    """``low_frequency_restoration``: auto = the served weight file's own width where it names one (the TDDL-GCN's),
    else the modality's default (ADL's here), a width in pixels, 0 = the network alone; bad values and a width asked
    of a classical model are 422; the width applied is in the answer and the audit."""
    from lib.lesions.low_frequency_restoration import default_sigma_px, restore_low_frequencies
    from lib.predict import denoise_array, load_denoiser
    from lib.weights.format import restoration_of_file

    noisy, _ = read_array(server.studies / "ct_slab_c.nii.gz")
    noisy = noisy.astype(np.float32)
    network = denoise_array(load_denoiser(server.model_dir / "pretrained_tddl_gcn_ct.pt"), noisy, "CT")
    gcn_width = restoration_of_file(server.model_dir / "pretrained_tddl_gcn_ct.pt")
    assert gcn_width is not None and gcn_width != default_sigma_px("CT")  # the file's own width is what is checked
    assert restoration_of_file(server.model_dir / "pretrained_adl_ct.pt") is None  # ADL: the modality's default
    _, result = client.infer("adl", "ct_slab_c", {})
    assert result["low_frequency_restoration"] == default_sigma_px("CT")
    outputs = {}
    for asked, width in (("auto", gcn_width), (0, 0.0), ("2.5", 2.5)):
        path, result = client.infer("tddl_gcn", "ct_slab_c", {"low_frequency_restoration": asked})
        assert result["low_frequency_restoration"] == width
        outputs[width], _ = read_array(path)
        expected = restore_low_frequencies(noisy, network, width) if width else network
        np.testing.assert_allclose(outputs[width], expected, atol=0.05)
    assert float(np.abs(outputs[gcn_width] - outputs[0.0]).max()) > 0.5  # HU
    audit = http(server, "GET", "/review/ct_slab_c")[1]
    assert [r["low_frequency_restoration"] for r in audit["denoise_results"][-3:]] == [gcn_width, 0.0, 2.5]
    # MR: off unless asked for
    _, result = client.infer("adl", "mr_slab_d", {})
    assert result["low_frequency_restoration"] == default_sigma_px("MR") == 0.0
    for bad in (-1, 17, "wide", float("nan")):
        status, message = error_of(lambda: client.infer("adl", "ct_slab_c", {"low_frequency_restoration": bad}))
        assert status == 422 and "low_frequency_restoration" in message, message
    status, message = error_of(lambda: client.infer("nlm", "ct_slab_c", {"low_frequency_restoration": 1}))
    assert status == 422 and "classical" in message
    path, result = client.infer("nlm", "ct_slab_c", {"low_frequency_restoration": 0})  # nothing to give back
    assert "low_frequency_restoration" not in result
    assert client.info()["models"]["adl"]["config"]["low_frequency_restoration"] == "auto"
    assert "low_frequency_restoration" not in client.info()["models"]["nlm"]["config"]


def test_infer_by_session_mr_nrrd_and_ct_int16(client, server):
    session = client.create_session(str(server.studies / "mr_slab_d.nii.gz"))
    path, result = client.infer("adl", "", {"result_extension": ".nrrd"}, session_id=session["session_id"])
    assert path.endswith(".nrrd") and result["modality"] == "MR"
    assert result["planes"] == "slices"  # a 3-slice slab: too thin for the orthogonal planes
    out, out_image = read_array(path)
    assert_same_geometry(out_image, sitk.ReadImage(str(server.studies / "mr_slab_d.nii.gz")))
    assert out.dtype == np.float32
    # keys MONAI Label's own clients send are ignored (only near-misses of the app's parameters are refused)
    path, result = client.infer("tddl_gcn", "ct_slice_a", {"result_dtype": "int16", "result_compress": False,
                                                          "client_id": "slicer", "restore_label_idx": False})
    out, _ = read_array(path)
    assert out.dtype == np.int16 and result["model"] == "tddl_gcn" and out.min() < -900  # HU: air stays air


def test_a_1mm_mr_block_is_denoised_over_its_three_orthogonal_planes(client, server, tmp_path):
    from lib.predict import denoise_array, load_denoiser

    block = write_crop(SAMPLE_STUDIES / "mr_head_colin27_rician5.nii.gz", tmp_path / "mr_block.nii.gz",
                       z=slice(70, 102), yx=(slice(60, 108), slice(50, 90)))  # 32 x 48 x 40 at 1 mm
    path, result = client.infer("adl", "", {"modality": "mr"}, file=str(block))
    assert result["planes"] == "orthogonal" and result["modality"] == "MR"
    out, out_image = read_array(path)
    assert_same_geometry(out_image, sitk.ReadImage(str(block)))
    noisy = sitk.GetArrayFromImage(sitk.ReadImage(str(block))).astype(np.float32)
    model = load_denoiser(server.model_dir / "pretrained_adl_mr.pt")
    np.testing.assert_allclose(out, denoise_array(model, noisy, "MR", orthogonal_planes=True), rtol=1e-4, atol=0.05)
    assert float(np.abs(out - denoise_array(model, noisy, "MR")).mean()) > 0.05  # not the axial pass alone


def test_infer_of_a_dicom_file_returns_a_derived_dicom_series(client, tmp_path):
    import zipfile

    import pydicom
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("CT_small.dcm"))
    upload = tmp_path / "slice.dcm"
    shutil.copy(source, upload)
    path, result = client.infer("adl", "", {"result_extension": "dicom"}, file=str(upload))
    assert path.endswith(".zip") and result["result_extension"] == "dicom"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert len(names) == 1
        archive.extractall(tmp_path / "series")
    derived = pydicom.dcmread(tmp_path / "series" / names[0])
    original = pydicom.dcmread(source)
    assert derived.SeriesInstanceUID != original.SeriesInstanceUID
    assert derived.StudyInstanceUID == original.StudyInstanceUID and "DERIVED" in derived.ImageType
    assert derived.Rows == original.Rows and derived.ImagePositionPatient == original.ImagePositionPatient
    # what made it, as the answer says: model, weights (version, sha256) and the restoration width
    assert derived.DerivationDescription == (
        f"Denoised with adl (weights {result['weights_version']} sha256 {result['weights_sha256'][:16]}; "
        f"low-frequency restoration {result['low_frequency_restoration']:g} px) from series "
        f"{original.SeriesInstanceUID}")
    # a DICOM file named as a PACS or a CD names them, without a suffix (was read as .nii.gz: "gzip stream broken")
    shutil.copy(source, tmp_path / "IM0001")
    path, result = client.infer("adl", "", {}, file=str(tmp_path / "IM0001"))
    assert result["modality_from"] == "DICOM Modality" and result["shape"] == [original.Rows, original.Columns]
    # a NIfTI without a suffix is still read as one (by its gzip stream)
    shutil.copy(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz", tmp_path / "scan")
    path, result = client.infer("adl", "", {}, file=str(tmp_path / "scan"))
    assert result["modality_from"] == "guessed from the values" and result["shape"] == [1, 512, 512]


def _text_file(folder: Path) -> str:
    path = folder / "notes.nii.gz"
    path.write_text("this is not an image")
    return str(path)


def _corrupt_dicom(folder: Path) -> str:
    from pydicom.data import get_testdata_file

    path = folder / "corrupt.dcm"  # a real CT DICOM file cut short in its pixel data
    path.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:3000])
    return str(path)


def _ct_dicom(folder: Path) -> str:
    from pydicom.data import get_testdata_file

    path = folder / "slice.dcm"  # a real CT DICOM file (Modality CT)
    shutil.copy(get_testdata_file("CT_small.dcm"), path)
    return str(path)


def _dicom_of(name: str, folder: Path) -> str:
    """A copy of pydicom's test file ``name`` (e.g. ``rtdose.dcm``: an RT dose grid, Modality RTDOSE)."""
    import pydicom.data

    path = folder / name
    shutil.copy(Path(pydicom.data.__file__).parent / "test_files" / name, path)
    return str(path)


def _nan_volume(folder: Path) -> str:
    array = np.zeros((4, 32, 32), np.float32)
    array[1, 2, 3] = np.nan
    path = folder / "values.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return str(path)


def _absurd_value_volume(folder: Path, value: float, positive: bool = False) -> str:
    """A CT-like volume (or, ``positive``, one whose values are guessed MR) with one voxel of ``value``."""
    array = np.full((4, 32, 32), 40.0, np.float32)
    array[:, :8] = 0.0 if positive else -1000.0
    array[1, 2, 3] = value
    path = folder / "values.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return str(path)


def _four_d_volume(folder: Path) -> str:
    import nibabel

    path = folder / "series.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((16, 16, 4, 3), np.float32), np.eye(4)), str(path))
    return str(path)


def _blank_volume(folder: Path) -> str:
    path = folder / "volume.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 32, 32), -1000, np.int16)), str(path))
    return str(path)


def _huge_volume(folder: Path) -> str:
    path = folder / "volume.nrrd"
    sitk.WriteImage(sitk.Image([256, 256, 60], sitk.sitkInt16), str(path))  # 3.9 M voxels > max_voxels 3 M
    return str(path)


# name: (request(client, folder for its upload), HTTP status, words of the reason); no upload's name holds them
BAD_REQUESTS = {
    "non-image": (lambda c, d: c.infer("adl", "", {}, file=_text_file(d)), 422, "cannot read the uploaded file"),
    "corrupt DICOM": (lambda c, d: c.infer("adl", "", {}, file=_corrupt_dicom(d)), 422, "cannot denoise"),
    "nan": (lambda c, d: c.infer("adl", "", {"modality": "ct"}, file=_nan_volume(d)), 422, "NaN"),
    "4d": (lambda c, d: c.infer("adl", "", {}, file=_four_d_volume(d)), 422, "4D"),
    # one corrupt voxel of 1e30 HU was denoised and spread over its neighbours by the restoration
    "absurd CT value": (lambda c, d: c.infer("adl", "", {}, file=_absurd_value_volume(d, 1e30)), 422,
                        "1 voxel(s) with values far outside what a CT in Hounsfield units can hold"),
    # read as MR (its values are >= 0), where 5e6 is a plausible intensity; denoised as CT it is not
    "absurd value, CT asked": (lambda c, d: c.infer("nlm", "", {"modality": "ct"},
                                                    file=_absurd_value_volume(d, 5e6, positive=True)), 422,
                               "most extreme is 5e+06"),
    "blank": (lambda c, d: c.infer("adl", "", {}, file=_blank_volume(d)), 422, "constant"),
    "huge": (lambda c, d: c.infer("adl", "", {}, file=_huge_volume(d)), 413, "too large"),
    # parameters are checked before the image is read
    "bad device, huge": (lambda c, d: c.infer("adl", "", {"device": "meta"}, file=_huge_volume(d)), 422, "device"),
    "bad modality, huge": (lambda c, d: c.infer("adl", "", {"modality": "pet"}, file=_huge_volume(d)), 422,
                           "modality must be auto, ct or mr"),
    "bad width, huge": (lambda c, d: c.infer("adl", "", {"low_frequency_restoration": 99}, file=_huge_volume(d)), 422,
                        "[0, 16]"),
    "unknown model": (lambda c, d: c.infer("unet", "ct_slab_b", {}), 404, "unknown model"),
    "unknown image": (lambda c, d: c.infer("adl", "no_such_study", {}), 404, "no image"),
    "bad dtype": (lambda c, d: c.infer("adl", "ct_slab_b", {"result_dtype": "uint8"}), 422, "not a label map"),
    "MR to a CT-only model": (lambda c, d: c.infer("tddl_gcn", "mr_slab_d", {}), 422, "CT only"),
    # a CT denoised as MR comes back with its soft tissue some 20 HU off
    # the values of a dose grid or a segmentation look like MR: they were denoised as MR
    "RT dose": (lambda c, d: c.infer("adl", "", {}, file=_dicom_of("rtdose.dcm", d)), 422, "Modality is RTDOSE"),
    "segmentation": (lambda c, d: c.infer("nlm", "", {}, file=_dicom_of("liver_1frame.dcm", d)), 422,
                     "Modality is SEG, not CT or MR"),
    "MR asked of a CT series": (lambda c, d: c.infer("adl", "", {"modality": "mr"}, file=_ct_dicom(d)), 422,
                                "this DICOM series is CT"),
    # torch knows these names, the network fails on them half-way (was a 500)
    "meta device": (lambda c, d: c.infer("adl", "ct_slab_b", {"device": "meta"}), 422, "auto, cpu, cuda or cuda:N"),
    "mps device": (lambda c, d: c.infer("tddl_gcn", "ct_slab_b", {"device": "mps"}), 422, "auto, cpu, cuda"),
    "no device": (lambda c, d: c.infer("nlm", "ct_slab_b", {"device": "gpu0"}), 422, "auto, cpu, cuda"),
    # a misspelt parameter would be ignored: restoration on, the default, returned as if it had been turned off
    "misspelt param": (lambda c, d: c.infer("adl", "ct_slab_b", {"low_frequency_restauration": 0}), 422,
                       "did you mean low_frequency_restoration"),
    "param case": (lambda c, d: c.infer("adl", "mr_slab_d", {"Modality": "ct"}), 422, "did you mean modality"),
    "param part": (lambda c, d: c.infer("tddl_gcn", "ct_slab_b", {"dtype": "int16"}), 422, "did you mean result_dtype"),
    "restoration word": (lambda c, d: c.infer("adl", "ct_slab_b", {"low_frequency_restoration": "off"}), 422,
                         "auto or a width in pixels"),
    "train with no labels": (lambda c, d: c.train_start("adl", {}), 422, "no corrected studies"),
    "train on meta device": (lambda c, d: c.train_start("tddl_gcn", {"device": "meta"}), 422, "auto, cpu, cuda"),
    "unknown train model": (lambda c, d: c.train_start("unet", {}), 404, "unknown model"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_with_a_reason_and_the_server_keeps_answering(client, server, tmp_path, case):
    request, status, words = BAD_REQUESTS[case]
    code, message = error_of(lambda: request(client, tmp_path))
    assert code == status, (code, message)
    assert words.lower() in message.lower(), message
    assert server.alive()
    assert client.info()["models"]["adl"]["weights"]["ct"]["available"]


def test_the_ohif_route_answers_404_for_a_folder_and_still_serves_the_viewer(server):
    """``GET /ohif/..`` (or ``%2e%2e``, ``.``, a folder of the viewer) was a bare 500: the stock route sent the
    folder as a file. Now a 404; the viewer's page and files are served as before."""
    for path in ("/ohif/..", "/ohif/%2e%2e", "/ohif/.", "/ohif/assets"):
        try:
            with urllib.request.urlopen(server.url + path, timeout=120) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        assert status == 404 and b"Resource NOT Found" in body, (path, status, body[:200])
    for path in ("/ohif/", "/ohif/index.html"):
        with urllib.request.urlopen(server.url + path, timeout=120) as response:
            assert response.status == 200 and b"<html" in response.read().lower(), path
    assert server.alive()


def test_eight_parallel_infer_requests_all_succeed(server, tmp_path):
    def one(i: int) -> tuple[str, dict]:
        own = MONAILabelClient(server.url, tmpdir=str(tmp_path / f"c{i}"))
        (tmp_path / f"c{i}").mkdir()
        return own.infer("adl" if i % 2 else "tddl_gcn", CT_IDS[i % 3], {})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for path, result in results:
        out, _ = read_array(path)
        assert np.isfinite(out).all() and result["modality"] == "CT"


def test_a_datastore_id_is_never_read_from_the_servers_working_directory(training_client, training_server):
    """A file or folder named like a study in the server's working directory (here another patient's DICOM CT) is
    not what ``image=<id>`` denoises: MONAI Label's infer tries the id as a path first."""
    from pydicom.data import get_testdata_file

    other_patient = training_server.cwd / "ct_slab_c"
    other_patient.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), other_patient / "1.dcm")  # a 128 x 128 slice
    try:
        path, result = training_client.infer("adl", "ct_slab_c", {})
    finally:
        shutil.rmtree(other_patient)
    out, out_image = read_array(path)
    _, source_image = read_array(training_server.studies / "ct_slab_c.nii.gz")
    assert_same_geometry(out_image, source_image)
    assert result["shape"] == [4, 256, 256] and result["modality_from"] == "guessed from the values"
    entry = http(training_server, "GET", "/review/ct_slab_c")[1]["denoise_results"][-1]
    assert entry["seq"] == result["audit_seq"]  # recorded as this study's result, not an upload


def test_weights_published_while_a_request_loads_them_are_never_reported_as_the_earlier_version(tiny_weights,
                                                                                                    tmp_path):
    """In-process, with the store's real files: the served file replaced (published, restored) between the store
    hashing it and the task loading it is read again, so the answer (and the audit entry) names the weights that
    made the result."""
    import torch

    from lib.infers.denoise import DenoiseInferTask
    from lib.weights.store import ModelStore

    store = ModelStore(copy_weights(tiny_weights, tmp_path / "model"))
    payload = torch.load(store.pretrained_path("adl", "CT"), map_location="cpu", weights_only=True)
    candidates = []
    for scale in (0.5, 2.0):  # two other CT files: one layer's weights scaled
        changed = dict(payload, state_dict=dict(payload["state_dict"]))
        name = next(k for k, v in changed["state_dict"].items() if k.endswith("weight") and v.ndim == 4)
        changed["state_dict"][name] = changed["state_dict"][name] * scale
        torch.save(changed, tmp_path / f"candidate_{scale}.pt")
        candidates.append(tmp_path / f"candidate_{scale}.pt")
    task = DenoiseInferTask("adl", "ADL", ("CT", "MR"), store, device="cpu")
    slab = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz")))
    slab = slab.astype(np.float32)[:, 200:264, 200:264]
    cpu = torch.device("cpu")
    first = store.publish(candidates[0], "adl", "CT")
    stale = store.served("adl", "CT")
    second = store.publish(candidates[1], "adl", "CT")  # between the store's hash and the task's load
    with pytest.raises(ValueError, match="replaced"):
        task._denoiser(stale, cpu)
    result, version = task.denoise(slab, "CT", cpu)
    assert (version["weights_version"], version["weights_sha256"]) == (second.version, second.sha256)
    assert first.sha256 != second.sha256
    store.restore("adl", "CT", "pretrained")  # the published file removed: the shipped one serves
    with pytest.raises(ValueError, match="replaced"):
        task._denoiser(stale, cpu)
    assert task.denoise(slab, "CT", cpu)[1]["weights_version"] == "pretrained"


def test_requests_waiting_for_a_slot_do_not_each_hold_a_volume(tiny_weights, tmp_path, monkeypatch):
    """In-process: with one slot, while a request denoises only one more reads its image and waits with it; the
    others wait before reading (each queued request held a whole volume, so the slots did not bound memory)."""
    import threading
    import time

    import lib.infers.denoise as infer_module
    from lib.infers.denoise import DenoiseInferTask
    from lib.weights.store import ModelStore

    slab = sitk.ReadImage(str(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz"))[200:248, 200:248, :]
    image = tmp_path / "slab.nii.gz"
    sitk.WriteImage(slab, str(image))
    gate, reads, real_read = threading.Event(), [], infer_module.read_volume

    def counted_read(*args, **kwargs):
        reads.append(time.monotonic())
        return real_read(*args, **kwargs)

    class GatedTask(DenoiseInferTask):
        def denoise(self, *args, **kwargs):
            gate.wait()
            return super().denoise(*args, **kwargs)

    monkeypatch.setattr(infer_module, "read_volume", counted_read)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the five result files: not in the machine's /tmp
    task = GatedTask("adl", "ADL", ("CT",), ModelStore(copy_weights(tiny_weights, tmp_path / "model")),
                     device="cpu", max_concurrent=1)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(task({"image": str(image), "modality": "ct"})))
               for _ in range(5)]
    try:
        for thread in threads:
            thread.start()
        while len(reads) < 2:
            time.sleep(0.05)
        time.sleep(1.0)  # room for more reads, were they let through
        assert len(reads) == 2, len(reads)
    finally:
        gate.set()
        for thread in threads:
            thread.join()
    assert len(results) == 5 and len(reads) == 5
    assert all(Path(path).is_file() and info["modality"] == "CT" for path, info in results)


# --------------------------------------------------------------------------------------------------- review
def test_review_verdicts_queue_and_audit_trail(client, server):
    client.infer("adl", "ct_slice_a", {})
    first = client.next_sample("next_unreviewed", {})
    assert first["id"] in CT_IDS + ("mr_slab_d",)
    client.infer("nlm", first["id"], {})  # a verdict judges a result: the study handed out is denoised first
    status, entry = http(server, "POST", f"/review/{first['id']}", {"verdict": "accepted", "reviewer": "dr_a"})
    assert status == 200 and entry["verdict"] == "accepted" and entry["time_utc"]
    following = client.next_sample("next_unreviewed", {})
    assert following["id"] != first["id"]
    assert following["remaining_unreviewed"] == first["remaining_unreviewed"] - 1
    assert http(server, "POST", "/review/ct_slice_a", {"verdict": "rejected", "reviewer": "dr_b"})[0] == 422
    status, entry = http(server, "POST", "/review/ct_slice_a",
                         {"verdict": "rejected", "reviewer": "dr_b", "reason": "smoothed a small lesion"})
    assert status == 200 and entry["result"]["model"] == "adl" and entry["result"]["weights_version"]
    assert http(server, "POST", "/review/ct_slice_a", {"verdict": "great", "reviewer": "dr_b"})[0] == 422
    assert http(server, "POST", "/review/nothing_here", {"verdict": "accepted", "reviewer": "dr_b"})[0] == 404
    status, answer = http(server, "POST", "/review/ct_slice_a",
                          {"verdict": "rejected", "reviewer": "dr_b", "reason": "x" * 2001})
    assert status == 422 and "2000" in str(answer)  # reasons are bounded: the log keeps every one for ever
    audit = {row["image"]: row for row in http(server, "GET", "/review/")[1]}
    assert audit["ct_slice_a"]["review"]["verdict"] == "rejected"
    last = audit["ct_slice_a"]["review_history"][-1]
    assert last["reviewer"] == "dr_b" and last["reviewer_from"] == "request body"  # auth off: the body names them
    assert last["seq"] >= 0 and len(last["hash"]) == 64  # read back from the audit log
    # the datastore info keeps the current verdict only; the history is in the log, not rewritten per verdict
    datastore_json = (server.studies / "datastore_v2.json").read_text()
    assert "review_history" not in datastore_json and "smoothed a small lesion" in datastore_json
    assert http(server, "GET", "/review/audit/verify")[1]["ok"]
    # reset so that other tests see a fresh queue
    for image in audit:
        http(server, "POST", f"/review/{image}", {"verdict": "unreviewed", "reviewer": "test"})


def test_a_verdict_on_a_study_without_a_result_is_refused_but_a_reset_or_an_imported_correction_is_not(
        training_client, training_server, tmp_path):
    """A study nobody denoised: accepted / rejected judge nothing, so they are refused (409, "denoise it first")
    and nothing is recorded (they were recorded with ``result: null`` and took the study off the queue). A reset
    (``unreviewed``) and ``corrected`` once a correction is saved as its ``final`` label (corrections imported
    without a recorded result, as the module's client does for a volume loaded from a file) are recorded. On this
    module's own server (an upload and a correction), removed again so the training tests see their studies."""
    client, server = training_client, training_server
    image_id = "no_result_yet"
    original = write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", tmp_path / "original.nii.gz",
                          z=slice(90, 93))
    assert client.upload_image(str(original), image_id)["image"] == image_id
    try:
        for body in ({"verdict": "accepted", "reviewer": "dr_a"},
                     {"verdict": "rejected", "reviewer": "dr_a", "reason": "blurred a lesion"},
                     {"verdict": "corrected", "reviewer": "dr_a"}):
            status, answer = http(server, "POST", f"/review/{image_id}", body)
            assert status == 409 and "has no denoising result to judge" in answer["detail"], (body, answer)
            assert "denoise it first" in answer["detail"], answer
        assert "no saved correction" in answer["detail"], answer
        assert http(server, "GET", f"/review/{image_id}")[1]["review_history"] == []  # nothing recorded
        status, answer = http(server, "POST", f"/review/{image_id}", {"verdict": "unreviewed", "reviewer": "dr_a"})
        assert status == 200 and answer["result"] is None, answer
        corrected = tmp_path / "corrected.nii.gz"
        full_dose = write_crop(SAMPLE_STUDIES / "ct_head_invesalius.nii.gz", tmp_path / "full.nii.gz", z=slice(90, 93))
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(full_dose)), sitk.sitkFloat32), str(corrected))
        client.save_label(image_id, str(corrected), tag="final")
        status, answer = http(server, "POST", f"/review/{image_id}", {"verdict": "corrected", "reviewer": "dr_a"})
        assert status == 200 and answer["verdict"] == "corrected" and answer["result"] is None, answer
        status, answer = http(server, "POST", f"/review/{image_id}", {"verdict": "accepted", "reviewer": "dr_a"})
        assert status == 409, answer  # a correction is no result to accept
        client.infer("nlm", image_id, {})
        status, answer = http(server, "POST", f"/review/{image_id}", {"verdict": "accepted", "reviewer": "dr_a"})
        assert status == 200 and answer["result"]["model"] == "nlm", answer
    finally:
        assert http(server, "DELETE", f"/datastore/image?id={image_id}")[0] == 200


# --------------------------------------------------------------------------------------------------- training
def save_corrections(client: MONAILabelClient, server, tmp_path) -> None:
    """Corrections of two CT studies: their full-dose originals on the same grid, as a radiologist's edit."""
    sources = {"ct_slice_a": SAMPLE_STUDIES / "ct_head_pydicom693.nii.gz"}
    for image_id, z in (("ct_slab_b", slice(40, 44)), ("ct_slab_c", slice(70, 74))):
        sources[image_id] = write_crop(SAMPLE_STUDIES / "ct_head_invesalius.nii.gz", tmp_path / f"{image_id}.nii.gz",
                                       z=z)
    for image_id, path in sources.items():
        corrected = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)  # a float correction
        target = tmp_path / f"{image_id}_final.nii.gz"
        sitk.WriteImage(corrected, str(target))
        client.save_label(image_id, str(target), tag="final")


def test_fine_tune_from_corrections_publishes_hot_reloads_and_rolls_back(training_client, training_server, tmp_path):
    save_corrections(training_client, training_server, tmp_path)
    before = served_version(training_client)
    training_client.train_start("adl", {"steps": 8, "patch_size": 32, "device": "cpu", "lr": 1e-4})
    status = wait_for_training(training_client)
    assert status["status"] == "DONE", training_server.log_tail()
    stats = training_client.info()["train_stats"]["adl"]
    assert stats["status"] == "done" and stats["mode"] == "corrections"
    decision = stats["decision"]
    assert set(decision["validation_images"]) | set(stats["data"]["train_images"]) == set(CT_IDS)
    assert not set(decision["validation_images"]) & set(stats["data"]["train_images"])
    versions = http(training_server, "GET", "/versions/adl?modality=ct")[1]
    if decision["published"]:
        assert decision["candidate_psnr"] >= decision["baseline_psnr"]
        assert served_version(training_client) == decision["version"] != before
        _, result = training_client.infer("adl", "ct_slab_b", {})
        assert result["weights_version"] == decision["version"]  # hot reload of the published file
        assert any(v["version"] == decision["version"] and v["served"] for v in versions["versions"])
    else:
        assert served_version(training_client) == before
        assert versions["history"][-1]["event"] == "rejected"
    status, restored = http(training_server, "POST", "/versions/adl/restore?modality=ct&version=pretrained")
    assert status == 200 and restored["served"]["version"] == "pretrained"
    _, result = training_client.infer("adl", "ct_slab_b", {})
    assert result["weights_version"] == "pretrained"
    assert http(training_server, "POST", "/versions/adl/restore?modality=ct&version=19990101T000000-deadbeef")[0] == 404


def test_tddl_gcn_fine_tunes_from_the_same_corrections(training_client, training_server, tmp_path):
    save_corrections(training_client, training_server, tmp_path)
    training_client.train_start("tddl_gcn", {"steps": 4, "patch_size": 32, "device": "cpu"})
    assert wait_for_training(training_client)["status"] == "DONE", training_server.log_tail()
    stats = training_client.info()["train_stats"]["tddl_gcn"]
    assert stats["status"] == "done" and stats["mode"] == "corrections" and stats["modality"] == "CT"
    decision = stats["decision"]
    assert decision["baseline_psnr"] is not None and isinstance(decision["published"], bool)
    history = http(training_server, "GET", "/versions/tddl_gcn?modality=ct")[1]["history"]
    assert history[-1]["event"] == ("published" if decision["published"] else "rejected")


def test_a_worse_model_is_never_published(training_client, training_server, tmp_path):
    save_corrections(training_client, training_server, tmp_path)
    before = training_client.info()["models"]["adl"]["weights"]["ct"]["sha256"]
    # a learning rate 10 000 times too high wrecks the network: it must be measured worse and kept out
    training_client.train_start("adl", {"steps": 6, "patch_size": 32, "device": "cpu", "lr": 1.0})
    assert wait_for_training(training_client)["status"] == "DONE", training_server.log_tail()
    decision = training_client.info()["train_stats"]["adl"]["decision"]
    assert decision["published"] is False
    # a diverged network (NaN weights: no candidate file; or non-finite output) is reported without a score and
    # rejected as such; otherwise it scored lower
    if decision["candidate_psnr"] is None:
        assert decision["rejected_by"][0] in ("finite_weights", "validation_psnr"), decision
    else:
        assert decision["candidate_psnr"] < decision["baseline_psnr"] and decision["rejected_by"][0] == "validation_psnr"
    assert training_client.info()["models"]["adl"]["weights"]["ct"]["sha256"] == before
    assert http(training_server, "GET", "/versions/adl?modality=ct")[1]["history"][-1]["event"] == "rejected"


def test_training_killed_half_way_leaves_the_served_model_untouched(training_client, training_server, tmp_path):
    save_corrections(training_client, training_server, tmp_path)
    before = training_client.info()["models"]["adl"]["weights"]["ct"]["sha256"]
    published = sorted(p.name for p in training_server.model_dir.glob("*.pt"))
    training_client.train_start("adl", {"steps": 100000, "patch_size": 32, "device": "cpu"})
    deadline = time.monotonic() + 600
    while training_client.info()["train_stats"]["adl"].get("phase") != "training" or \
            training_client.info()["train_stats"]["adl"].get("step") is None:
        assert time.monotonic() < deadline, training_server.log_tail()
        time.sleep(0.5)
    training_client.train_stop()
    assert wait_for_training(training_client, 300)["status"] in ("STOPPED", "ERROR", "DONE")
    assert training_client.info()["models"]["adl"]["weights"]["ct"]["sha256"] == before
    assert sorted(p.name for p in training_server.model_dir.glob("*.pt")) == published
    assert not list(training_server.model_dir.glob(".*.tmp"))
    path, _ = training_client.infer("adl", "ct_slab_b", {})
    assert np.isfinite(read_array(path)[0]).all()


def test_tddl_adaptation_learns_noise_from_unlabelled_low_dose_images_and_can_keep_the_learnt_level(
        training_client, training_server):
    """``adapt_noise`` learns the noise of the datastore's unlabelled low-dose images and is judged on held-out
    low-dose images. ``calibrate_noise_level`` (default true; ``cli.py adapt --no-level-calibration`` on the
    server): false keeps the learnt noise level, the noise model's ``level_correction`` 1.0 and why in the run's
    status. The request key was ignored (the level calibrated). Anything but a boolean is a 422 from the route's
    guard naming the key and the words it takes, the words of ``store_to_pacs`` and ``--conf preload`` (one
    parser): ``t`` / ``f`` were a 422 here and taken by the others. One run checks both (what is learnt and judged
    does not depend on the level's calibration; the calibrated run is the audit trail's adapt_noise test's)."""
    from lib.noise_learning.workflow import LEVEL_CALIBRATION_OFF

    assert training_client.info()["trainers"]["tddl_gcn"]["config"]["calibrate_noise_level"] is True
    request = {"mode": "adapt_noise", "steps": 4, "patch_size": 32, "noise_steps": 2, "device": "cpu"}
    # a word it takes passes on to the request's next check (here a modality it refuses: no run started)
    for word in (" T ", "Y", "n"):
        status, answer = http(training_server, "POST", "/train/tddl_gcn",
                              {**request, "calibrate_noise_level": word, "modality": "xray"})
        assert status == 422 and "modality 'XRAY' is unknown" in answer["detail"], (word, answer)
    for bad in ("maybe", 2, [False]):
        status, answer = http(training_server, "POST", "/train/tddl_gcn", {**request, "calibrate_noise_level": bad})
        assert status == 422 and "calibrate_noise_level must be true or false" in answer["detail"], (bad, answer)
        assert "y, yes, t, true, on, 1 / n, no, f, false, off, 0" in answer["detail"], (bad, answer)
    training_client.train_start("tddl_gcn", {**request, "calibrate_noise_level": "F"})  # a form's word
    assert wait_for_training(training_client)["status"] == "DONE", training_server.log_tail()
    stats = training_client.info()["train_stats"]["tddl_gcn"]
    assert stats["status"] == "done" and stats["mode"] == "adapt_noise", stats
    assert stats["data"]["noise_level"] == {"level_correction": 1.0, "skipped": LEVEL_CALIBRATION_OFF}, stats["data"]
    assert f"soft-tissue level not calibrated ({LEVEL_CALIBRATION_OFF})" in stats["data"]["noise_model"]
    assert "learned noise" in stats["data"]["kind"] and len(stats["data"]["low_dose_images"]) == 3
    # the noise added to each clean image (the served model's outputs here: nothing of their own taken off)
    assert "added whole" in stats["data"]["noise_added"], stats["data"]
    for row in stats["data"]["noise_per_image"]:
        assert row["own_noise_std_hu"] is None and row["added_noise_std_hu"] == row["learnt_noise_std_hu"] > 0, row
    decision = stats["decision"]
    # no normal-dose images: the validation targets are the served model's own outputs, so the held-out low-dose
    # images decide (J-invariant loss, planted lesions), and the circular PSNR is only reported
    assert stats["data"]["held_out_low_dose"] == decision["validation_images"] == stats["data"]["validation_images"]
    assert "validation_psnr" not in decision["rejected_by"] and "served model's own" in decision["validation_psnr_role"]
    held_out = decision["checks"]["held_out_low_dose"]
    assert held_out["slices"] >= 1 and held_out["j_invariant"]["baseline_loss"] > 0
    assert held_out["lesions"]["lesions"] > 0
    # ... and give the width the candidate is served at (lesions planted in the scanner's own noise)
    assert decision["candidate_restoration"]["measured_on"]["slices"] == "held-out low-dose images"
    assert decision["published"] is (not decision["rejected_by"])
    assert ("held_out_low_dose" in decision["rejected_by"]) is (not held_out["passed"])
    assert training_client.info()["models"]["tddl_gcn"]["weights"]["ct"]["available"]


@pytest.mark.parametrize("name", ["adl", "tddl_gcn", "nlm", "adl_3d"])
def test_every_served_model_takes_the_conf_concurrency_and_size_limits(name, tmp_path):
    """``--conf max_concurrent_infers`` and ``max_voxels`` hold for every model the app serves (README: "requests one
    model denoises at once"): nlm, the classical model, queued at its own fixed 2 whatever the conf said. A model's
    own ``max_voxels_<model>`` is its limit (infer and fine-tuning), over ``max_voxels``, and no other model's."""
    from lib.configs import MODEL_CONFIGS
    from lib.weights import ModelStore

    config = MODEL_CONFIGS[name]()
    config.init(name, str(tmp_path), {"max_concurrent_infers": "1", "max_voxels": "1e6", "max_voxels_adl_3d": "2e5"},
                None, store=ModelStore(tmp_path))
    task = config.infer()
    limit, setting = (200_000, "max_voxels_adl_3d") if name == "adl_3d" else (1_000_000, "max_voxels")
    assert (task.max_voxels, task.voxel_limit_setting) == (limit, setting)
    trainer = config.trainer()
    assert trainer is None or trainer.max_voxels == limit
    assert task._slots.acquire(blocking=False)
    assert not task._slots.acquire(blocking=False), f"{name}: a second request ran beside the first"
    task._slots.release()


#: (conf, words its start-up error must contain): each a value an admin may give by mistake, which before was
#: silently ignored or defaulted (device gpu: a 422 on every request; modality xray: guessed; max_voxels 0 or -5:
#: every image refused; max_voxel: ignored, the limit stayed at 1e9; a missing model_dir: no weights, 404s) or
#: stopped the start-up without naming the key ("could not convert string to float: 'abc'")
BAD_CONFS = {
    "device_gpu": ({"device": "gpu"}, ["--conf device", "gpu", "cuda"]),
    "modality_xray": ({"modality": "xray"}, ["--conf modality", "xray", "auto, ct or mr"]),
    "max_voxels_text": ({"max_voxels": "abc"}, ["--conf max_voxels", "not a number"]),
    "max_voxels_zero": ({"max_voxels": "0"}, ["--conf max_voxels", "below 1"]),
    "max_voxels_negative": ({"max_voxels": "-5"}, ["--conf max_voxels", "below 1"]),
    "max_voxels_infinite": ({"max_voxels": "inf"}, ["--conf max_voxels", "not a whole number"]),
    "train_steps_zero": ({"train_steps": "0"}, ["--conf train_steps", "below 1"]),
    "train_steps_text": ({"train_steps": "many"}, ["--conf train_steps", "not a number"]),
    "concurrency_text": ({"max_concurrent_infers": "two"}, ["--conf max_concurrent_infers", "not a number"]),
    "concurrency_zero": ({"max_concurrent_infers": "0"}, ["--conf max_concurrent_infers", "below 1"]),
    "preload_maybe": ({"preload": "maybe"}, ["--conf preload must be true or false", "y, yes, t, true, on, 1 / n"]),
    "extension": ({"result_extension": "nii"}, ["--conf result_extension", ".nii.gz"]),
    "unknown_model": ({"models": "adl,unet"}, ["--conf models", "unet"]),
    "model_dir_missing": ({"model_dir": "{tmp}/no_such_folder"}, ["--conf model_dir", "no such folder"]),
    "model_dir_empty": ({"model_dir": ""}, ["--conf model_dir", "empty"]),
    "audit_dir_a_file": ({"audit_dir": "{tmp}/studies/a.nii.gz"}, ["--conf audit_dir", "not a folder"]),
    "normal_dose_missing": ({"normal_dose": "{tmp}/nd1,{tmp}/nd2"}, ["--conf normal_dose", "nd2"]),
    "model_max_voxels_zero": ({"max_voxels_adl_3d": "0"}, ["--conf max_voxels_adl_3d", "below 1"]),
    "misspelt_model_max_voxels": ({"max_voxels_adl3d": "2e8"}, ["--conf max_voxels_adl3d",
                                                                "did you mean max_voxels_adl_3d"]),
    "misspelt_key": ({"max_voxel": "5e6"}, ["--conf max_voxel", "did you mean max_voxels"]),
    "misspelt_key_case": ({"Model_Dir": "{tmp}"}, ["--conf Model_Dir", "did you mean model_dir"]),
}


def _conf_case(tmp_path: Path, conf: dict) -> tuple[Path, dict]:
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE_STUDIES / "mr_slice_pydicom_mr2.nii.gz", studies / "a.nii.gz")
    (tmp_path / "nd1").mkdir()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    return studies, {"model_dir": str(model_dir),
                     **{key: value.replace("{tmp}", str(tmp_path)) for key, value in conf.items()}}


@pytest.mark.parametrize("case", list(BAD_CONFS))
def test_a_wrong_conf_value_stops_the_app_naming_the_key(case, tmp_path):
    """Every conf key is checked when the app is built (lib/configs/conf.py): a wrong value or a misspelt key is an
    error naming the key and what is wrong, before anything is written (no audit folder made)."""
    from lib.configs.conf import ConfError
    DenoisingApp = import_app_main().DenoisingApp

    conf, words = BAD_CONFS[case]
    studies, conf = _conf_case(tmp_path, conf)
    with pytest.raises(ConfError) as raised:
        DenoisingApp(str(tmp_path / "app"), str(studies), conf)
    for word in words:
        assert word in str(raised.value), (case, str(raised.value))
    assert not (studies / ".audit").exists()


@pytest.mark.parametrize("variable,value,words", [
    ("ADL_MAX_VOXELS", "1e9x", "ADL_MAX_VOXELS '1e9x': not a number"),
    ("ADL_MODEL_DIR", "/no/such/folder", "ADL_MODEL_DIR '/no/such/folder': no such folder"),
    *[("ADL_PACS_READ_TIMEOUT_S", value, f"ADL_PACS_READ_TIMEOUT_S='{value}': the time the PACS may stay silent must "
                                         "be seconds > 0") for value in ("five", "0", "-30", "nan")]])
def test_a_wrong_adl_environment_variable_stops_the_app_naming_it(tmp_path, monkeypatch, variable, value, words):
    """A wrong ADL_* setting stops the app as it is built, naming the variable and its value, before any request:
    ADL_PACS_READ_TIMEOUT_S (how long the PACS may stay silent) is read by every request to the PACS, where a bad
    value would fail each of them."""
    from lib.configs.conf import ConfError
    DenoisingApp = import_app_main().DenoisingApp

    studies, conf = _conf_case(tmp_path, {})
    if variable == "ADL_MODEL_DIR":
        conf.pop("model_dir")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfError) as raised:
        DenoisingApp(str(tmp_path / "app"), str(studies), conf)
    assert words in str(raised.value), str(raised.value)


def test_good_conf_values_are_taken_and_an_unknown_key_is_a_warning(tmp_path, caplog):
    """Values in every accepted spelling build the app; a key unlike any of the app's is logged, not fatal."""
    DenoisingApp = import_app_main().DenoisingApp

    studies, conf = _conf_case(tmp_path, {"models": "adl, nlm", "device": "CPU", "modality": "CT",
                                          "max_voxels": "2.5e6", "preload": "no", "train_steps": "12",
                                          "max_concurrent_infers": "3", "normal_dose": "{tmp}/nd1",
                                          "audit_dir": "{tmp}/audit/new", "site_colour": "blue"})
    with caplog.at_level("WARNING", logger="lib.configs.conf"):
        app = DenoisingApp(str(tmp_path / "app"), str(studies), conf)
    assert sorted(app._infers) == ["adl", "nlm"]
    assert app._infers["adl"].max_voxels == 2_500_000 and app._infers["adl"].default_modality == "CT"
    assert app._trainers["adl"].defaults["steps"] == 12
    assert any("--conf site_colour is not read by this app" in r.getMessage() for r in caplog.records)


def test_training_keys_with_no_trained_model_are_a_warning(tmp_path, caplog):
    """train_steps / normal_dose with only infer-only models (nlm, adl_3d) served: said to be ignored; so is the voxel
    limit of a model not served (``max_voxels_adl_3d`` without ``adl_3d``)."""
    DenoisingApp = import_app_main().DenoisingApp

    studies, conf = _conf_case(tmp_path, {"models": "nlm", "train_steps": "50", "max_voxels_adl_3d": "2e8",
                                          "max_voxels_nlm": "5e8"})
    with caplog.at_level("WARNING", logger="main"):
        DenoisingApp(str(tmp_path / "app"), str(studies), conf)
    messages = [r.getMessage() for r in caplog.records]
    assert any("--conf train_steps ignored: none of the served models (nlm) is trained" in m for m in messages)
    assert "--conf max_voxels_adl_3d ignored: not a served model's (nlm)" in messages, messages


def _log_of_a_server_that_does_not_start(tmp_path: Path, studies: Path, model_dir: Path, **settings) -> str:
    """The log of a real server start-up (``settings``: ``conf`` / ``env`` of :func:`mlserver.start_server`) that
    must end with the process exiting; fails the test if the server started."""
    try:
        started = start_server(studies, model_dir, tmp_path / "work", timeout=300, **settings)
    except RuntimeError as error:
        assert "exited with" in str(error)
    else:
        stop_server(started)
        pytest.fail("the server started")
    return (tmp_path / "work" / "server.log").read_text(errors="replace")


#: a folder the app writes, made a regular file (what stops root too; chmod would not), and what the refusal names
UNWRITABLE_FOLDERS = {
    "versions": ("model/versions", "the weights folder's versions/"),
    "one_models_versions": ("model/versions/adl_ct", "the versions folder"),
    "history": ("model/versions/adl_ct/history.jsonl/x", "the version history"),
    "work": ("model/work", "the weights folder's work/"),
    "corrections": ("studies/labels/final", "the datastore's final labels folder"),
    "regions": ("studies/labels/regions", "the datastore's regions labels folder"),
}


@pytest.mark.parametrize("case", list(UNWRITABLE_FOLDERS))
def test_a_folder_the_app_writes_that_it_cannot_write_stops_the_app_naming_it(case, tmp_path):
    """A folder the server writes (weights, versions, corrections, the audit log) that it cannot write started
    a server that failed later with a raw traceback: at the first correction, rollback, or after minutes of
    training, at the publication. The app does not start now, naming the folder; nothing in it is touched."""
    from lib.configs.conf import ConfError
    DenoisingApp = import_app_main().DenoisingApp

    studies, conf = _conf_case(tmp_path, {})
    place, named = UNWRITABLE_FOLDERS[case]
    blocker = tmp_path / place
    if case == "history":  # the history file is a folder: it cannot be appended to
        blocker.mkdir(parents=True)
        blocker = blocker.parent
    else:
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("kept")
    with pytest.raises(ConfError) as raised:
        DenoisingApp(str(tmp_path / "app"), str(studies), conf)
    message = str(raised.value)
    assert f"{named} {blocker}:" in message and "make it a folder that the user running the server can write" \
        in message, message
    assert blocker.is_dir() if case == "history" else blocker.read_text() == "kept"


def test_without_training_a_weights_folder_it_cannot_write_is_a_warning(tmp_path, caplog):
    """A server that does not train (only nlm here) writes its weights folder only for a rollback: it starts, and
    the log says rollbacks will fail."""
    DenoisingApp = import_app_main().DenoisingApp

    studies, conf = _conf_case(tmp_path, {"models": "nlm"})
    (tmp_path / "model" / "versions").write_text("kept")
    with caplog.at_level("WARNING", logger="main"):
        DenoisingApp(str(tmp_path / "app"), str(studies), conf)
    assert any("versions" in r.getMessage() and "rollbacks (POST /versions/{model}/restore) will fail"
               in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_without_training_a_pseudonym_key_that_cannot_be_made_is_no_error(tmp_path, caplog):
    """A server that does not train logged "no pseudonym key ... fine-tuning from corrections will fail" as an
    ERROR when its weights folder could not hold the key: noise on a server that never fine-tunes (the folder's
    warning says what fails there). A server that trains still says it as an ERROR."""
    from lib.weights.pseudonyms import KEY_FILE

    main = import_app_main()

    studies, conf = _conf_case(tmp_path, {"models": "nlm"})
    app = main.DenoisingApp(str(tmp_path / "app"), str(studies), conf)
    (tmp_path / "model" / KEY_FILE).mkdir()  # the key cannot be made or read (as in a folder it cannot write)
    with caplog.at_level("INFO", logger=main.__name__):
        app._make_pseudonym_key()  # noqa: SLF001 - the start-up step, run by a real server only
    said = [r for r in caplog.records if "no pseudonym key" in r.getMessage()]
    assert said and all(r.levelname not in ("ERROR", "WARNING") for r in said), [
        (r.levelname, r.getMessage()) for r in said]
    app._trainers = {"adl": object()}  # noqa: SLF001 - the same folder on a server that trains
    caplog.clear()
    with caplog.at_level("INFO", logger=main.__name__):
        app._make_pseudonym_key()  # noqa: SLF001
    assert any(r.levelname == "ERROR" and "fine-tuning from corrections will fail" in r.getMessage()
               for r in caplog.records)


def test_a_server_that_cannot_write_its_corrections_folder_does_not_start_and_says_which(tmp_path):
    """The real start-up with the corrections folder unwritable (a regular file there; with ``chattr +i`` where
    this machine allows it, an immutable folder, which stops root too): the log's error names the folder."""
    import subprocess

    studies, conf = _conf_case(tmp_path, {})
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    immutable = subprocess.run(["chattr", "+i", str(final)], capture_output=True).returncode == 0
    try:
        if not immutable:
            final.rmdir()
            final.write_text("kept")
        log = _log_of_a_server_that_does_not_start(tmp_path, studies, Path(conf.pop("model_dir")), conf=conf)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(final)], check=True)
    assert f"not started: the datastore's final labels folder {final}: " in log, log[-4000:]
    assert ("Operation not permitted" if immutable else "not a folder") in log, log[-4000:]


def test_the_write_check_leaves_no_probe_unexplained(tmp_path):
    """The start-up's write check makes and removes a ``.write-check-*`` file in each folder. In an append-only
    folder (``chattr +a``: files can be made, never removed or replaced) it said "cannot write there: Operation not
    permitted" and left one more probe behind at every start; it says now that files cannot be removed there (what
    the server does: atomic replacements) and names the probe left. A folder it can write keeps nothing."""
    import subprocess

    from lib.configs.conf import unwritable

    writable = tmp_path / "writable"
    writable.mkdir()
    assert unwritable(writable) is None and unwritable(writable / "not" / "yet") is None
    assert list(writable.iterdir()) == []
    append_only = tmp_path / "append_only"
    append_only.mkdir()
    if subprocess.run(["chattr", "+a", str(append_only)], capture_output=True).returncode != 0:
        pytest.skip("chattr +a is not allowed here")
    try:
        problem = unwritable(append_only)
        left = [p.name for p in append_only.iterdir()]
    finally:
        subprocess.run(["chattr", "-a", str(append_only)], check=True)
    assert problem is not None and "files can be made there but not removed or replaced" in problem, problem
    assert len(left) == 1 and left[0].startswith(".write-check-") and left[0] in problem, (left, problem)


def test_a_server_with_a_wrong_conf_value_does_not_start_and_says_which(tmp_path):
    """The real start-up: the process exits and its log's error names the key (not only a traceback)."""
    studies, conf = _conf_case(tmp_path, {"max_voxels": "1e9x"})
    log = _log_of_a_server_that_does_not_start(tmp_path, studies, Path(conf.pop("model_dir")), conf=conf)
    assert "[ERROR] (main:" in log and "not started: --conf max_voxels '1e9x': not a number" in log, log[-4000:]


def test_a_misspelt_authentication_switch_does_not_start_an_open_server(tmp_path):
    """MONAI Label's settings take exact, case-sensitive names and ignore others: MONAI_LABEL_AUTH_ENABLED=true
    started a server without authentication, silently. It does not start now, and says which name was meant."""
    studies, conf = _conf_case(tmp_path, {})
    log = _log_of_a_server_that_does_not_start(tmp_path, studies, Path(conf.pop("model_dir")),
                                               env={"MONAI_LABEL_AUTH_ENABLED": "true"})
    assert "not started: environment variable MONAI_LABEL_AUTH_ENABLED='true' is not a MONAI Label setting" in log
    assert "did you mean MONAI_LABEL_AUTH_ENABLE? The server would start without authentication" in log


def test_other_unknown_monai_label_variables_are_warnings_and_auth_needs_a_realm_url(caplog):
    from monailabel.config import Settings

    from lib.configs.conf import ConfError, check_environment

    with pytest.raises(ConfError, match="did you mean MONAI_LABEL_AUTH_ENABLE"):
        check_environment({"monai_label_auth_enable": "yes"}, Settings(MONAI_LABEL_AUTH_ENABLE=False))
    with caplog.at_level("WARNING", logger="lib.configs.conf"):
        check_environment({"MONAI_LABEL_DICOMWEB_PASSWRD": "x", "MONAI_LABEL_AUTH_ENABLED": "false",
                           "MONAI_LABEL_TRACKING_ENABLED": "false"}, Settings())
    warned = " | ".join(r.getMessage() for r in caplog.records)
    assert "MONAI_LABEL_DICOMWEB_PASSWRD is not a MONAI Label setting (ignored); did you mean " \
           "MONAI_LABEL_DICOMWEB_PASSWORD?" in warned
    assert "MONAI_LABEL_AUTH_ENABLED is not a MONAI Label setting" in warned and "TRACKING" not in warned
    with pytest.raises(ConfError, match="MONAI_LABEL_AUTH_REALM_URI '' is no http"):
        check_environment({}, Settings(MONAI_LABEL_AUTH_ENABLE=True, MONAI_LABEL_AUTH_REALM_URI=""))


def test_a_pacs_that_is_down_is_told_in_seconds_and_only_its_own_errors_are_the_pacss(tmp_path):
    """MONAI Label's DICOMweb client tried a request to a PACS that is down 5 times (waits of 2, 4, 8, 16 s): 30 s
    per request before the 503. Three tries now (2 + 4 s). And the 503 "the PACS cannot be reached" was the answer
    to a failure to reach ANY server: only a request to the datastore's PACS (scheme, host, port) is the PACS's."""
    import requests
    from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore

    from lib.pacs import PACS_TRIES, bound_waits, is_pacs_url
    from mlserver import free_port

    dead, other = free_port(), free_port()  # nothing listens on either
    datastore = DICOMWebDatastore(DICOMwebClientX(url=f"http://127.0.0.1:{dead}/dicom-web"), {"Modality": "CT"},
                                  cache_path=str(tmp_path / "cache"))
    try:
        bound_waits(datastore)
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ConnectionError) as pacs_error:
            datastore._client.search_for_series(search_filters={"Modality": "CT"})
        elapsed = time.monotonic() - started
        assert PACS_TRIES == 3 and 5 <= elapsed < 20, elapsed  # waits of 2 and 4 s (was 30 s)
        with pytest.raises(requests.exceptions.ConnectionError) as other_error:
            requests.get(f"http://127.0.0.1:{other}/realms/site", timeout=10)
        assert is_pacs_url(pacs_error.value.request.url, datastore)
        assert is_pacs_url(f"HTTP://127.0.0.1:{dead}/other/path", datastore)
        assert not is_pacs_url(other_error.value.request.url, datastore)
        assert not is_pacs_url(f"https://127.0.0.1:{dead}/dicom-web", datastore) and not is_pacs_url(None, datastore)
    finally:
        observer = getattr(datastore, "_observer", None)  # MONAI Label's file watcher of the cache
        if observer is not None:
            observer.stop()
    from monailabel.datastore.local import LocalDatastore

    assert not is_pacs_url(pacs_error.value.request.url, LocalDatastore(str(tmp_path / "local"), auto_reload=False))


@pytest.mark.parametrize("url", [
    "http://dr:s3cret@127.0.0.1:8042/dicom-web?access_token=TOKSECRET", "http://dr:s3cret/w0rd@127.0.0.1:8042/dicom-web",
    "http://dr:s3cret#w0rd@127.0.0.1:8042/dicom-web", "http://dr:s3cret@w0rd@127.0.0.1:8042/dicom-web#TOKSECRET",
    "http://dr:s3cret?w0rd@127.0.0.1:8042/dicom-web", "HTTP://dr:s3cret%2Fw0rd@127.0.0.1:8042/dicom-web",
    "http://127.0.0.1:8042/dicom-web?requester=dr@hosp.org&access_token=TOKSECRET",
    "http://dr:123/s3cret@127.0.0.1:8042/dicom-web",
])
def test_a_pacs_url_is_logged_without_its_password_even_one_not_percent_encoded(url):
    """:func:`lib.pacs_corrections.without_credentials` took the URL as a parser does: a password holding an
    unencoded ``/``, ``?`` or ``#`` was cut there and its start logged as the host (``http://dr:s3cret``). Now
    everything up to the last ``@`` is the user name and password, and the query and fragment are dropped."""
    from lib.pacs_corrections import without_credentials

    assert without_credentials(url) == "http://127.0.0.1:8042/dicom-web"
    assert without_credentials("/data/studies") == "/data/studies"  # a folder: as it is


def test_a_server_given_a_studies_url_whose_password_is_not_percent_encoded_does_not_start(tmp_path):
    """requests takes ``http://dr:123/s3cret@host/...`` for host ``dr``, port 123: every request failed, its error
    quoting the password's start as the port and its end as the path. The server does not start; its error says
    what to encode, without the password."""
    from lib.pacs_corrections import studies_url_problem

    assert studies_url_problem("http://dr:s3cret%2Fw0rd@127.0.0.1:8042/dicom-web") is None
    assert studies_url_problem("http://127.0.0.1:8042/dicom-web?requester=dr@hosp.org") is None
    _, conf = _conf_case(tmp_path, {})
    log = _log_of_a_server_that_does_not_start(tmp_path, "http://dr:123/s3cret@127.0.0.1:8042/dicom-web",
                                               Path(conf.pop("model_dir")), conf=conf)
    error = [line for line in log.splitlines() if "not started: --studies" in line]
    assert error and "http://127.0.0.1:8042/dicom-web: its user name or password holds an unencoded '/'" in error[0] \
        and "s3cret" not in error[0], log[-4000:]


def test_the_pacs_errors_logged_name_no_password_nor_query_token(tmp_path, caplog):
    """requests' error texts name the URL asked, with its ``user:password@`` and query (``?access_token=``): the
    start-up warning of a PACS that cannot be reached, the series-size warnings of a PACS that answers an error and
    denoise-batch's discovery refused (401) printed them whole. A real server on 127.0.0.1 answering 401, and a
    port where none listens."""
    import requests
    from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
    from orthanc import failing_server

    from lib.batch.dicomweb import discover_dicomweb, make_client
    from lib.pacs import series_size, start_up_warnings
    from mlserver import free_port

    secret = "dr:s3cret@{}/dicom-web?access_token=TOKSECRET"
    dead, port = free_port(), free_port()
    datastore = DICOMWebDatastore(DICOMwebClientX(url=f"http://{secret.format(f'127.0.0.1:{dead}')}",
                                                  session=requests.Session()),
                                  {"Modality": "CT,MR"}, cache_path=str(tmp_path / "cache"))
    try:
        [warning] = start_up_warnings(datastore)
    finally:
        observer = getattr(datastore, "_observer", None)  # MONAI Label's file watcher of the cache
        if observer is not None:
            observer.stop()
    assert f"the PACS at http://127.0.0.1:{dead}/dicom-web does not answer a QIDO-RS query (ConnectionError" in \
        warning and "s3cret" not in warning and "TOKSECRET" not in warning, warning
    with failing_server(port, 401) as received:
        url = f"http://{secret.format(f'127.0.0.1:{port}')}"
        with caplog.at_level("WARNING", logger="lib.pacs"):
            assert series_size(make_client(url), "1.2.3") is None
        with pytest.raises(ValueError) as refused:
            discover_dicomweb(make_client(url.replace("?access_token=TOKSECRET", "")), tmp_path / "out")
    logged = [r.getMessage() for r in caplog.records if "1.2.3" in r.getMessage()]
    assert len(logged) == 1 and "Unauthorized for url: http://127.0.0.1:" in logged[0], logged
    assert str(refused.value).startswith(f"cannot list the series of http://127.0.0.1:{port}/dicom-web (QIDO-RS): "
                                         f"401 Client Error: Unauthorized for url: http://127.0.0.1:{port}/dicom-web/"
                                         "series"), refused.value
    assert not [text for text in [*logged, str(refused.value)] if "s3cret" in text or "TOKSECRET" in text]
    assert len(received) == 2, received  # asked, refused, not retried


def test_an_unreachable_pacs_is_a_start_up_warning_and_a_503_not_a_bare_500(tmp_path):
    """--studies naming a DICOMweb root where nothing answers (a wrong URL, a PACS that is down): the server started
    without a word and every route that lists the studies answered a bare 500 "Internal Server Error". Now the
    start-up log warns, naming the URL, and those routes answer 503 saying the PACS cannot be reached."""
    import processes
    from conftest import APP_DIR
    from mlserver import free_port

    port, dead = free_port(), free_port()  # nothing listens on the second one
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    log_path = tmp_path / "server.log"
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", APP_DIR, "--studies",
            f"http://127.0.0.1:{dead}/dicom-web", "-i", "127.0.0.1", "-p", port, "--conf", "model_dir", model_dir]
    env = dict(os.environ, MONAI_LABEL_TRACKING_ENABLED="false", OMP_NUM_THREADS="1",
               MONAI_LABEL_DICOMWEB_CACHE_PATH=str(tmp_path / "cache"), MONAI_LABEL_SESSION_PATH=str(tmp_path / "s"))
    process = processes.start(args, log_path, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 300
        while "Application startup complete" not in processes.log_tail(log_path, 100_000):
            assert process.poll() is None and time.monotonic() < deadline, processes.log_tail(log_path)
            time.sleep(0.5)
        log = processes.log_tail(log_path, 100_000)
        assert f"the PACS at http://127.0.0.1:{dead}/dicom-web does not answer a QIDO-RS query" in log
        # MONAI Label's default search filter lists CT series only: the MR ones are never offered, said once
        assert "lists only the PACS's series with Modality CT" in log and "the MR series are not served" in log
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/datastore/?output=stats", timeout=600)
        assert answered.value.code == 503
        assert "the PACS (DICOMweb server) holding the studies cannot be reached" in answered.value.read().decode()
    finally:
        processes.stop(process)


@pytest.mark.parametrize("limits,environment,largest,setting", [
    ({"max_voxels": "2e6", "max_voxels_adl": "1e6", "max_voxels_nlm": "5e6"}, None, 5_000_000, "max_voxels_nlm"),
    ({"max_voxels_adl": "1e6"}, "3e6", 3_000_000, "max_voxels"),
], ids=["own-limits", "one-own-limit"])
def test_uploads_and_the_review_queue_take_the_largest_limit_of_the_served_models(tmp_path, monkeypatch, limits,
                                                                                  environment, largest, setting):
    """An upload or a correction (``PUT /datastore/...``, :func:`lib.endpoints.guards._max_voxels`) and the review
    queue's PACS downloads (``DenoisingApp._queue_voxel_limit``) serve every model: they take the largest limit of
    the served models (README, ``max_voxels_<model>``), not the smallest nor ``max_voxels`` alone, and a download
    stopped over it names the key that raises it (the app's handler of :class:`lib.pacs.SeriesTooLarge`: it named
    ``max_voxels`` whatever the limit was). The app built in-process, as the server builds it, and made the running
    one (MONAI Label's ``app_instance``) for the routes' helper and the handler."""
    import warnings

    from fastapi import FastAPI
    from monailabel.config import settings
    from monailabel.interfaces.utils import app as monailabel_app

    from lib.endpoints import _install_read_failure_answers
    from lib.endpoints.guards import _max_voxels
    from lib.pacs import SeriesTooLarge

    if environment:
        monkeypatch.setenv("ADL_MAX_VOXELS", environment)
    studies, conf = _conf_case(tmp_path, {"models": "adl,nlm", **limits})
    app = import_app_main().DenoisingApp(str(tmp_path / "app"), str(studies), conf)
    monkeypatch.setitem(monailabel_app.apps, f"{settings.MONAI_LABEL_APP_DIR}{settings.MONAI_LABEL_STUDIES}", app)
    assert app._infers["adl"].max_voxels == 1_000_000  # the smallest: neither takes it
    assert _max_voxels() == largest
    assert app._queue_voxel_limit() == largest
    assert app._queue_voxel_limit_setting() == setting
    routes = FastAPI()

    @routes.get("/download")
    def download():  # what lib.pacs.bounded_downloads raises for a series that grew past the queue's limit
        raise SeriesTooLarge("series 1.2.3 is too large: its 9 instances hold 9,000,000 voxels", None, largest)

    _install_read_failure_answers(routes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # starlette's TestClient on httpx
        from fastapi.testclient import TestClient

        answer = TestClient(routes).get("/download")
    assert answer.status_code == 413, answer.text
    assert answer.json()["detail"] == ("series 1.2.3 is too large: its 9 instances hold 9,000,000 voxels (raise the "
                                       f"limit with --conf {setting} on the server)")
