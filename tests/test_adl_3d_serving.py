"""The MONAI Label app serves ADL's 3D network as ``adl_3d`` (issue 20, "3D").

The app stopped serving it after the served 3D network once returned an all-NaN volume for a 3-slice MR slab in the
app's test sequence (commit 33164b7; not alone, not in-process). Cause, found when it recurred in CI on 2026-12-04:
the WEIGHTS were NaN. Some runs of this module's 5-step training of the tiny 3D network ended with NaN weights
(depending on what the process ran before; losses finite throughout), export_weights wrote them and the app served
them. In training: under CPU bfloat16 autocast oneDNN's weight gradient of a 3D convolution whose input is
narrower than its kernel (the 3x3x3 bridge convolutions see 2^3 voxels on 16^3 patches) read and wrote memory
outside its buffers, so the gradient held leftover heap contents, sometimes NaN; such convolutions now run in
float32 (lib.networks.blocks._NarrowInputSafeConv3d, tests/test_training_finite.py). These tests hold:

- ``adl_3d`` answers MR volumes on their own grid with what :func:`lib.predict.denoise_array` gives in-process;
- concurrent requests to one served 3D network (and the 2D one beside it) give the sequential results, and serving
  never writes the network's parameters or batch-norm statistics;
- a result holding NaN or infinite values is an error (HTTP 500), never returned and never recorded.

The 3D weights are the real trainer's, a few steps on 16^3 patches of the sample MR volume (seconds); a second file
(``pretrained_adl_3d_ct.pt``) is the same network with one batch-norm layer's variance made negative, a damaged file
whose every output voxel is NaN, as the reported one was.
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mlserver import TINY_ADL, copy_weights, read_array, shared_studies, start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

BROKEN_LAYER = "backbone.bridge.norm1.running_var"
#: the 3D network's own voxel limit on the module's server (max_voxels_adl_3d), below the others' (max_voxels, 3 M)
#: and above its studies' (262,144 voxels at most)
ADL_3D_LIMIT = 300_000


def make_tiny_3d_weights(model_dir: Path) -> tuple[Path, Path]:
    """``pretrained_adl_3d_mr.pt`` (5 warm-up steps of the tiny 3D network on 16^3 patches of the sample Colin27
    volume) and ``pretrained_adl_3d_ct.pt`` (the same network with a negative variance in ``BROKEN_LAYER``)."""
    from conftest import SAMPLE_STUDIES
    from lib.data import ADLPatchDataset, SyntheticNoiseSource
    from lib.engines import ADLTrainingConfig, train_adl
    from lib.weights import export_weights, non_finite_tensors, scaling_rule_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        source = SyntheticNoiseSource([SAMPLE_STUDIES / "mr_head_colin27.nii.gz"], "MR", "rician", seed=0,
                                      progress=False)
        dataset = ADLPatchDataset(source, 3, 16, samples_per_epoch=16, seed=0)
        config = ADLTrainingConfig(modality="MR", spatial_dims=3, patch_size=16, batch_size=2, steps_g_warmup=5,
                                   steps_d_warmup=0, steps_adversarial=0, lr_warmup=1e-3, device="cpu",
                                   validation_every=0, checkpoint_every=0, **TINY_ADL)
        result = train_adl(config, dataset, progress=False)
    finally:
        torch.set_num_threads(threads)
    # served NaN weights gave the all-NaN volumes of the issue-20 report: say so here rather than in a serving test
    non_finite = non_finite_tensors(result.generator.state_dict())
    assert not non_finite, f"the tiny 3D training ended with non-finite {non_finite[:3]} (test_training_finite.py)"
    mr = export_weights(result.generator, model_dir / "pretrained_adl_3d_mr.pt", config, scaling_rule_for("MR"),
                        result.training_record())
    broken = copy.deepcopy(result.generator)
    broken.state_dict()[BROKEN_LAYER].fill_(-1.0)  # sqrt of a negative variance: NaN at every voxel
    config_ct = ADLTrainingConfig(**{**config.to_dict(), "modality": "CT"})
    ct = export_weights(broken, model_dir / "pretrained_adl_3d_ct.pt", config_ct, scaling_rule_for("CT"),
                        result.training_record())
    return mr, ct


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path):
    """A server of its own (its model folder gets the 3D files): the shared studies, the session's tiny 2D weights."""
    root = tmp_path_factory.mktemp("adl_3d_server")
    model_dir = copy_weights(tiny_weights, root / "model")
    make_tiny_3d_weights(model_dir)
    srv = start_server(shared_studies(root / "studies"), model_dir, root / "work",
                       conf={"max_voxels": 3_000_000, "models": "all,adl_3d", "max_voxels_adl_3d": ADL_3D_LIMIT})
    yield srv
    stop_server(srv)


def infer(server, model: str, image: str, tmp_path: Path) -> tuple[int, dict | str, np.ndarray | None]:
    """One request through MONAI Label's own client (a client and a result folder of its own, so that threads may
    call this at once); returns (200, the result's params, the result volume) or (HTTP status, error message, None)."""
    import re
    import uuid

    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    try:
        path, params = MONAILabelClient(server.url, tmpdir=str(folder)).infer(model, image, {})
    except MONAILabelClientException as error:
        status = error.status_code or int(re.search(r"Status: (\d+)", error.msg).group(1))
        return status, error.msg, None
    return 200, params, read_array(path)[0]


def test_adl_3d_is_served_and_denoises_an_mr_volume_on_its_grid_as_in_process(server, tmp_path):
    from lib.predict import denoise_array, load_denoiser

    with urllib.request.urlopen(f"{server.url}/info/", timeout=60) as response:
        info = json.loads(response.read())
    assert "adl_3d" in info["models"] and "adl_3d" not in info["trainers"]  # inference only
    weights = info["models"]["adl_3d"]["weights"]
    assert weights["mr"]["available"] and weights["mr"]["spatial_dims"] == 3
    status, params, out = infer(server, "adl_3d", "mr_slab_d", tmp_path)
    assert status == 200, params
    assert params["model"] == "adl_3d" and params["modality"] == "MR" and params["planes"] == "volume"
    study = sitk.ReadImage(str(server.studies / "mr_slab_d.nii.gz"))
    assert out.shape == sitk.GetArrayFromImage(study).shape and np.isfinite(out).all()
    loaded = load_denoiser(server.model_dir / "pretrained_adl_3d_mr.pt")
    assert loaded.spatial_dims == 3
    expected = denoise_array(loaded, sitk.GetArrayFromImage(study).astype(np.float32), "MR")
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3 * float(np.abs(expected).max()))
    # the app's default MR model is still the 2D / 2.5D one
    status, params, _ = infer(server, "adl", "mr_slab_d", tmp_path)
    assert status == 200 and params["planes"] != "volume"


def test_concurrent_requests_to_the_3d_and_2d_networks_give_the_sequential_results(server, tmp_path):
    requests = [("adl_3d", "mr_slab_d"), ("adl", "ct_slab_b"), ("adl_3d", "mr_slab_d"), ("adl", "mr_slab_d")]
    sequential = {}
    for model, image in dict.fromkeys(requests):
        status, params, out = infer(server, model, image, tmp_path)
        assert status == 200, params
        sequential[model, image] = out
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: infer(server, *r, tmp_path), requests))
    for (model, image), (status, params, out) in zip(requests, answers):
        assert status == 200, (model, image, params)
        assert np.isfinite(out).all(), (model, image)
        reference = sequential[model, image]
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max()),
                                   err_msg=f"{model} on {image}")


def test_a_nan_result_is_an_error_never_returned_nor_recorded(server, tmp_path):
    status, detail, out = infer(server, "adl_3d", "ct_slab_b", tmp_path)
    assert status == 500 and out is None
    assert "NaN" in str(detail) and "no result returned" in str(detail) and "adl_3d" in str(detail)
    # no audit entry, no review note names that result
    with urllib.request.urlopen(f"{server.url}/review/ct_slab_b", timeout=60) as response:
        note = json.loads(response.read())
    assert not any(r.get("model") == "adl_3d" for r in note.get("denoise_results") or [])
    # the server goes on serving the sound model
    status, params, _ = infer(server, "adl_3d", "mr_slab_d", tmp_path)
    assert status == 200, params


def test_threads_sharing_the_infer_task_leave_the_network_untouched(server):
    """In-process: two threads calling one infer task (one cached network) at once give the sequential result, and
    the network's parameters and batch-norm statistics are the same afterwards (nothing switches it to training)."""
    from lib.infers.denoise import DenoiseInferTask
    from lib.weights.store import ModelStore

    task = DenoiseInferTask("adl_3d", "ADL 3D", ("MR",), ModelStore(server.model_dir), device="cpu", max_concurrent=2)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(server.studies / "mr_slab_d.nii.gz"))).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, _ = task.denoise(volume, "MR", torch.device("cpu"))
        network = task._denoiser(task.store.served("adl_3d", "MR"), torch.device("cpu")).network
        before = {k: v.clone() for k, v in network.state_dict().items()}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: task.denoise(volume, "MR", torch.device("cpu"))[0], range(2)))
    finally:
        torch.set_num_threads(threads)
    for result in results:
        np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max()))
    assert not network.training
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_the_3d_network_has_a_voxel_limit_of_its_own(server, tmp_path):
    """One ``max_voxels`` held for every model, although the 3D network holds the whole volume on its device (the
    input, its padded copy, the sliding window's output and weight sums: some 16 bytes a voxel of GPU memory) and
    the 2D / 2.5D ones a batch of slices: a limit the 2.5D model fits in was the 3D one's too. ``max_voxels_adl_3d``
    (300,000) is the 3D network's own: a CT crop of 524,288 voxels sent to it is a 413 naming the model, its limit
    and the setting, while the 2.5D model (``max_voxels``, 3,000,000) denoises it."""
    import requests

    from conftest import SAMPLE_STUDIES
    from mlserver import write_crop

    upload = write_crop(SAMPLE_STUDIES / "ct_head_invesalius_ld25.nii.gz", tmp_path / "crop.nii.gz", z=slice(40, 48))
    answers = {}
    for model in ("adl_3d", "adl"):
        answers[model] = requests.post(f"{server.url}/infer/{model}", params={"output": "json"},
                                       files={"file": ("crop.nii.gz", Path(upload).read_bytes())}, timeout=600)
    refused = answers["adl_3d"]
    assert refused.status_code == 413, (refused.status_code, refused.text[:500])
    assert refused.json()["detail"] == (
        "cannot denoise this image with adl_3d: the uploaded file is too large: 256 x 256 x 8 = 524,288 voxels "
        "exceeds adl_3d's limit of 300,000 voxels (raise it with --conf max_voxels_adl_3d on the server, or crop "
        "the volume)"), refused.text
    assert answers["adl"].status_code == 200, answers["adl"].text[:500]
    assert answers["adl"].json()["shape"] == [8, 256, 256]


def test_check_finite_output_names_the_source_and_counts():
    from lib.predict import NonFiniteOutputError, check_finite_output

    good = np.ones((2, 3), np.float32)
    assert check_finite_output(good, "adl") is good
    bad = good.copy()
    bad[0, 0], bad[1, 2] = np.nan, np.inf
    with pytest.raises(NonFiniteOutputError, match=r"adl_3d \(weights v1\) returned 1 NaN and 1 infinite values of 6"):
        check_finite_output(bad, "adl_3d (weights v1)")
