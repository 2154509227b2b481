"""TDDL-GCN: windowed k-NN graphs, edge-conditioned graph convolution, the GCN denoiser, its training, weight
export / loading, whole-image inference and the `train` / `denoise --model tddl_gcn` command line. The GCN trainer
under torchrun: tests/test_adl_training.py (one test for both trainers of the engine).

Tiny sizes on one thread.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from conftest import APP_DIR

from lib.data import ADLPatchDataset, SyntheticNoiseSource
from lib.predict import denoise_array, load_denoiser
from lib.networks import (
    DENOISER_NETWORKS,
    EdgeConditionedGraphConv,
    GCNDenoiser,
    build_neighbour_graph,
    window_offsets,
    windowed_knn,
)
from lib.engines import GCNTrainingConfig, load_gcn_checkpoint, train_gcn
from lib.weights import export_weights

CLI = APP_DIR / "cli.py"
TINY = dict(features=8, k=8, search_window=7, n_blocks=1, layers_per_block=1, rank=2)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


def brute_force_knn(features: torch.Tensor, k: int, window: int, exclude: int):
    """Reference: every candidate of every pixel, sorted; returns sorted distances (B, H, W, k) (inf where
    missing) and the candidate lists [(distance, flat index), ...] per pixel."""
    B, C, H, W = features.shape
    f = features.double()
    dist = torch.full((B, H, W, k), float("inf"), dtype=torch.float64)
    candidates = {}
    for b in range(B):
        for y in range(H):
            for x in range(W):
                found = []
                for dy, dx in window_offsets(window, exclude):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < H and 0 <= xx < W:
                        found.append((float(((f[b, :, y, x] - f[b, :, yy, xx]) ** 2).sum()), yy * W + xx))
                found.sort()
                candidates[b, y, x] = found
                for j, (d, _) in enumerate(found[:k]):
                    dist[b, y, x, j] = d
    return dist, candidates


# ----------------------------------------------------------------------------------------------- k-NN graph
def test_windowed_knn_matches_brute_force():
    features = torch.randn(2, 5, 12, 13, dtype=torch.float64)
    k, window, exclude = 16, 7, 1
    indices, distances = windowed_knn(features, k, window, exclude)
    assert indices.shape == distances.shape == (2, 12, 13, k) and indices.dtype == torch.int64
    reference, candidates = brute_force_knn(features, k, window, exclude)
    assert torch.equal(torch.isinf(distances), torch.isinf(reference))
    finite = torch.isfinite(reference)
    assert torch.allclose(distances[finite], reference[finite], rtol=1e-10, atol=1e-10)
    for (b, y, x), found in candidates.items():
        n = min(k, len(found))
        expected = {i for _, i in found[:n]}
        if len(found) > n and abs(found[n][0] - found[n - 1][0]) < 1e-9:
            continue  # a tie at the k-th place may be broken either way
        assert set(indices[b, y, x, :n].tolist()) == expected, (b, y, x)
        for i in indices[b, y, x, :n].tolist():  # inside the window, outside the excluded 3x3 block
            dy, dx = i // 13 - y, i % 13 - x
            assert max(abs(dy), abs(dx)) <= window // 2 and max(abs(dy), abs(dx)) > exclude
        assert (indices[b, y, x, n:] == y * 13 + x).all()  # missing neighbours point at the pixel itself


def test_windowed_knn_float32_agrees_with_float64():
    features = torch.randn(1, 8, 20, 17, dtype=torch.float64)
    i64, d64 = windowed_knn(features, 12, 9)
    i32, d32 = windowed_knn(features.float(), 12, 9)
    assert d32.dtype == torch.float32
    assert torch.allclose(d32.double(), d64, rtol=1e-4, atol=1e-4)
    assert (i32 == i64).float().mean() > 0.98  # only near-ties may swap


@pytest.mark.parametrize("options", [dict(tile=3), dict(tile=5, rows_per_chunk=1), dict(tile=32, rows_per_chunk=2),
                                     dict(max_elements=64), dict(tile=4, max_elements=10**9)])
def test_windowed_knn_chunking_does_not_change_the_result(options):
    features = torch.randn(2, 4, 15, 11, dtype=torch.float64)
    indices, distances = windowed_knn(features, 10, 9, 1)
    chunked_indices, chunked_distances = windowed_knn(features, 10, 9, 1, **options)
    assert torch.allclose(distances, chunked_distances, rtol=1e-12, atol=1e-12)  # other summation order only
    assert torch.equal(indices, chunked_indices)


def test_windowed_knn_exclude_radius_and_bad_arguments():
    features = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    indices, _ = windowed_knn(features, 4, 7, exclude_radius=2)
    y, x = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    offset = torch.maximum((indices // 10 - y[..., None]).abs(), (indices % 10 - x[..., None]).abs())
    assert (offset > 2).all() and (offset <= 3).all()
    with pytest.raises(ValueError, match="odd"):
        windowed_knn(features, 4, 6)
    with pytest.raises(ValueError, match="candidates"):
        windowed_knn(features, 17, 5)  # 25 - 9 = 16 candidates
    with pytest.raises(ValueError, match="B, C, H, W"):
        windowed_knn(features[0], 4, 5)


def test_neighbour_graph_links_adjacent_slices():
    features = torch.randn(2 * 3, 4, 6, 7)  # two stacks of three slices
    graph = build_neighbour_graph(features, 5, 5, slices=3)
    N = 6 * 7
    assert graph.index.shape == (6, N, 5 + 2) and graph.k == 7
    node = torch.arange(6 * N).view(6, N)
    previous, following = graph.index[..., 5], graph.index[..., 6]
    for row in range(6):
        s = row % 3
        if s > 0:
            assert torch.equal(previous[row], node[row - 1])
            expected = ((features[row] - features[row - 1]) ** 2).mean(0).flatten()
            assert torch.allclose(graph.distance[row, :, 5], expected)
        else:  # first slice of its stack: no previous slice (and never a link into the other stack)
            assert torch.isinf(graph.distance[row, :, 5]).all()
        if s < 2:
            assert torch.equal(following[row], node[row + 1])
        else:
            assert torch.isinf(graph.distance[row, :, 6]).all()
    in_slice = graph.index[..., :5] // N  # k-NN edges stay within their own slice
    assert torch.equal(in_slice, torch.arange(6).view(6, 1, 1).expand_as(in_slice))


# ----------------------------------------------------------------------------------------------- layers
def test_graph_conv_gradients_reach_every_parameter():
    h = torch.randn(2, 6, 10, 9, requires_grad=True)
    conv = EdgeConditionedGraphConv(6, 5, rank=3, edge_hidden=4)
    graph = build_neighbour_graph(h, 8, 7)
    out = conv(h, graph)
    assert out.shape == (2, 5, 10, 9)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert h.grad is not None and h.grad.abs().sum() > 0  # through the gathered neighbour features


def test_graph_conv_chunking_does_not_change_the_result():
    h = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    conv = EdgeConditionedGraphConv(6, 4, rank=2).double()
    graph = build_neighbour_graph(h, 6, 5)
    whole = conv(h, graph)
    conv.max_edges_per_chunk = 7  # one pixel per chunk
    assert torch.allclose(conv(h, graph), whole, rtol=1e-12, atol=1e-12)


def test_graph_conv_drops_missing_edges():
    h = torch.randn(1, 3, 3, 3)  # 9 - 9 = no in-window candidate survives a 3x3 exclusion: all edges missing
    conv = EdgeConditionedGraphConv(3, 2)
    graph = build_neighbour_graph(h, 8, 5)
    assert torch.isinf(graph.distance).sum() > 0
    assert torch.isfinite(conv.edge_weights(graph)).all()
    assert torch.isfinite(conv(h, graph)).all()


def test_gcn_denoiser_gradients_incl_beta_and_edge_network():
    model = GCNDenoiser(in_channels=3, link_slices=True, **TINY)
    x = torch.rand(2, 3, 14, 12)
    loss = (model(x) - x[:, 1:2]).pow(2).mean() + 0 * sum(model.betas())
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert any("beta_logit" in n for n in names) and any("graph_conv.project" in n for n in names)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------- denoiser
@pytest.mark.parametrize("slices, link", [(1, False), (3, False), (3, True)])
def test_gcn_denoiser_shapes_and_residual_identity(slices, link):
    model = GCNDenoiser(in_channels=slices, link_slices=link, **TINY)
    x = torch.rand(2, slices, 19, 13)
    assert model(x).shape == (2, 1, 19, 13)
    model.eval()
    assert model(x).shape == (2, 1, 19, 13)
    with torch.no_grad():  # no predicted noise -> the output is the centre slice, unchanged
        model.head.weight.zero_()
        model.head.bias.zero_()
    assert torch.equal(model(x), x[:, slices // 2:slices // 2 + 1])
    assert model.slice_context == slices // 2 and model.size_multiple == 1


def test_gcn_denoiser_search_window_is_configurable_and_inputs_are_checked():
    model = GCNDenoiser(**dict(TINY, inference_search_window=11)).eval()
    x = torch.rand(1, 1, 24, 24)
    with torch.no_grad():
        default, wide = model(x), model(x, search_window=15)
        model.inference_search_window = 15
        assert torch.equal(model(x), wide)
    assert not torch.equal(default, wide)
    with pytest.raises(ValueError, match="adjacent slices"):
        model(torch.rand(1, 3, 24, 24))
    with pytest.raises(ValueError, match="odd"):
        GCNDenoiser(in_channels=2)
    with pytest.raises(ValueError, match="link_slices"):
        GCNDenoiser(link_slices=True)
    with pytest.raises(ValueError, match="search_window"):
        GCNDenoiser(search_window=20)
    assert DENOISER_NETWORKS["GCNDenoiser"] is GCNDenoiser


def test_tiny_gcn_overfits_a_few_noisy_patches():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 24), indexing="ij")
    disc = (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.1).float()
    clean = torch.stack([0.3 + 0.2 * torch.sin(6 * xx + k) * torch.cos(4 * yy) + 0.2 * disc for k in range(4)])[:, None]
    noisy = clean + 0.02 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    model = GCNDenoiser(**TINY)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(noisy), clean)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    noisy_mse = nn.functional.mse_loss(noisy, clean).item()
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.5 * noisy_mse


# ----------------------------------------------------------------------------------------------- data, training
def write_nifti(array: np.ndarray, path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.fixture(scope="module")
def ct_crop(tmp_path_factory) -> Path:
    """96x96 crop (skull, brain and air) of the real pydicom-data CT slice, as NIfTI."""
    import data_store

    image = sitk.ReadImage(str(Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"))
    image = image[160:256, 112:208, 0] if image.GetDimension() == 3 else image[160:256, 112:208]
    path = tmp_path_factory.mktemp("gcn_ct") / "head_crop.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(path))
    return path


@pytest.fixture(scope="module")
def ct_source(ct_crop) -> SyntheticNoiseSource:
    return SyntheticNoiseSource([ct_crop], "CT", noise="gaussian", seed=0, progress=False)


def test_patch_dataset_gives_adjacent_slices_as_channels(tmp_path):
    # slice z is a body (0 HU) in air (-1000 HU), both raised by 100 * z: the channels tell which slices were stacked
    volume = np.full((5, 40, 40), -1000, np.float32)
    volume[:, 8:32, 8:32] = 0
    volume += 100 * np.arange(5, dtype=np.float32)[:, None, None]
    source = SyntheticNoiseSource([write_nifti(volume, tmp_path / "v.nii.gz")], "CT", noise="gaussian",
                                  noise_level_range=(0, 0), seed=0, progress=False)
    stacks = ADLPatchDataset(source, 2, 16, samples_per_epoch=8, seed=0, slice_context=1)
    singles = ADLPatchDataset(source, 2, 16, samples_per_epoch=8, seed=0, augment=False)
    seen = set()
    for i in range(8):
        stack = stacks[i]["clean"] * 4096 - 1024  # back to HU
        assert stacks[i]["noisy"].shape == stack.shape == (3, 16, 16)
        z = int(round(float(stack[1, 0, 0]) / 100)) % 10
        seen.add(z)
        for c, neighbour in ((0, max(z - 1, 0)), (2, min(z + 1, 4))):  # end slices repeated beyond the volume
            assert torch.allclose(stack[c] - stack[1], torch.full_like(stack[1], 100.0 * (neighbour - z)), atol=0.5)
        assert singles[i]["clean"].shape == (1, 16, 16)
    assert len(seen) > 1
    with pytest.raises(ValueError, match="slice_context"):
        ADLPatchDataset(source, 3, 16, slice_context=1)


def tiny_config(**overrides) -> GCNTrainingConfig:
    base = dict(batch_size=2, steps=2, validation_every=0, checkpoint_every=0, device="cpu", seed=0, patch_size=24,
                features=8, k=8, search_window=7, n_blocks=1, layers_per_block=1, rank=2)
    base.update(overrides)
    return GCNTrainingConfig(**base)


def test_train_resume_export_and_load(ct_source, tmp_path):
    dataset = ADLPatchDataset(ct_source, 2, 24, samples_per_epoch=8, seed=0)
    config = tiny_config(checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1)
    straight = train_gcn(tiny_config(steps=4), dataset, progress=False)
    first = train_gcn(config, dataset, progress=False)
    assert first.step == 2 and load_gcn_checkpoint(tmp_path / "ck")["step"] == 2
    resumed = train_gcn(tiny_config(steps=4, checkpoint_dir=str(tmp_path / "ck")), dataset,
                        resume=tmp_path / "ck", progress=False)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-5)
    with pytest.raises(ValueError, match="another network"):
        train_gcn(tiny_config(steps=5, features=12), dataset, resume=tmp_path / "ck", progress=False)
    # the record's step time covers the steps before the resume too, not only this call
    record = resumed.training_record()
    before = sum(h["seconds"] for h in first.history)
    assert record["step_seconds_total"] == pytest.approx(before + sum(h["seconds"] for h in resumed.history[2:]))

    path32 = export_weights(resumed.network, tmp_path / "w32.pt", resumed.config, None, resumed.training_record(),
                            half=False)
    path16 = export_weights(resumed.network, tmp_path / "w16.pt", resumed.config, None, resumed.training_record())
    exact, half = load_denoiser(path32), load_denoiser(path16)
    assert isinstance(exact.network, GCNDenoiser) and exact.modality == "CT" and exact.spatial_dims == 2
    assert half.metadata["model"] == "tddl_gcn" and half.metadata["network_class"] == "GCNDenoiser"
    assert len(half.metadata["training"]["betas"]) == 1
    for name, value in exact.network.state_dict().items():
        assert torch.equal(value, resumed.network.state_dict()[name]), name
    image = np.random.default_rng(0).normal(40, 30, (2, 30, 26)).astype(np.float32)
    out32 = denoise_array(exact, image)
    assert out32.shape == image.shape and out32.dtype == np.float32
    assert np.abs(denoise_array(half, image) - out32).max() < 2.0  # HU
    # a bare network and a training checkpoint give the same as the loaded weight file
    assert np.allclose(denoise_array(resumed.network, image, "CT"), out32, atol=1e-3)
    from_checkpoint = load_denoiser(tmp_path / "ck" / "last.pt")
    assert np.allclose(denoise_array(from_checkpoint, image), out32, atol=1e-3)


def test_three_slice_training_and_volume_inference(tmp_path):
    volume = np.random.default_rng(3).normal(0, 20, (4, 32, 32)).astype(np.float32)
    volume[:, 6:26, 6:26] += 60
    source = SyntheticNoiseSource([write_nifti(volume, tmp_path / "v.nii.gz")], "CT", noise="gaussian", seed=0,
                                  progress=False)
    dataset = ADLPatchDataset(source, 2, 24, samples_per_epoch=4, seed=0, slice_context=1)
    result = train_gcn(tiny_config(slices=3, link_slices=True), dataset, val_pairs=source.validation_pairs(),
                       progress=False)
    assert result.validation and np.isfinite(result.validation[-1]["psnr"])
    model = load_denoiser(export_weights(result.network, tmp_path / "w.pt", result.config))
    assert model.network.in_channels == 3 and model.network.link_slices
    out = denoise_array(model, volume, sw_batch_size=3)
    assert out.shape == volume.shape and np.isfinite(out).all()
    with pytest.raises(ValueError, match="slice"):  # a 1-slice dataset does not fit a 3-slice network
        train_gcn(tiny_config(slices=3), ADLPatchDataset(source, 2, 24, samples_per_epoch=4, seed=0), progress=False)


# ----------------------------------------------------------------------------------------------- command line
def run_cli(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_train_then_denoise_keeps_geometry(tmp_path, ct_crop):
    weights = tmp_path / "gcn_tiny.pt"
    train = run_cli("train", "--model", "tddl_gcn", "--output", weights, "--clean", ct_crop, "--modality", "ct",
                    "--noise", "gaussian", "--patch-size", "24", "--batch-size", "2", "--steps", "2", "--features", "8",
                    "--neighbours", "8", "--search-window", "7", "--blocks", "1", "--layers-per-block", "1",
                    "--val", ct_crop, "--device", "cpu", "--seed", "3")
    assert train.returncode == 0, train.stderr
    assert weights.is_file() and "validation PSNR" in train.stdout and "TDDL-GCN" in train.stderr  # tqdm bar
    assert (tmp_path / "gcn_tiny_checkpoints" / "last.pt").is_file()

    out = tmp_path / "denoised.nii.gz"
    denoise = run_cli("denoise", "--model", "tddl_gcn", "--weights", weights, "--input", ct_crop, "--output", out,
                      "--modality", "ct", "--device", "cpu", "--search-window", "9")
    assert denoise.returncode == 0, denoise.stderr
    original, result = sitk.ReadImage(str(ct_crop)), sitk.ReadImage(str(out))
    assert result.GetSize() == original.GetSize()
    assert np.allclose(result.GetSpacing(), original.GetSpacing()) and np.allclose(result.GetOrigin(), original.GetOrigin())
    values = sitk.GetArrayFromImage(result)
    assert np.isfinite(values).all() and -1100 <= values.min() and values.max() <= 3100  # HU


def load_cli():
    spec = importlib.util.spec_from_file_location("gcn_cli_under_test", CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_train_on_pseudo_pairs_from_a_learned_noise_model(tmp_path, ct_crop):
    """TDDL: learn-noise on a low-dose image, then train the GCN on NDCT + sampled noise (tiny, in-process)."""
    cli = load_cli()
    low_dose = tmp_path / "low_dose.nii.gz"
    assert cli.main(["simulate", "-i", str(ct_crop), "-o", str(low_dose), "--noise", "gaussian", "--sigma", "30",
                     "--modality", "ct"]) == 0
    noise_model = tmp_path / "noise.pt"
    assert cli.main(["learn-noise", "-i", str(low_dose), "-o", str(noise_model), "--patch-size", "16", "--steps", "2",
                     "--batch-size", "8", "--device", "cpu"]) == 0
    weights = tmp_path / "gcn.pt"
    assert cli.main(["train", "--model", "tddl_gcn", "--output", str(weights), "--clean", str(ct_crop), "--modality",
                     "ct", "--noise-model", str(noise_model), "--patch-size", "24", "--batch-size", "2", "--steps", "2",
                     "--features", "8", "--neighbours", "8", "--search-window", "7", "--blocks", "1",
                     "--layers-per-block", "1", "--device", "cpu", "--validation-every", "0"]) == 0
    model = load_denoiser(weights)
    assert model.metadata["training"]["data"]["noise"].startswith("learned")
    assert isinstance(model.network, GCNDenoiser)


@pytest.mark.slow
def test_tddl_end_to_end_learn_noise_train_denoise_improves_psnr(tmp_path, ct_crop):
    """The TDDL workflow through the command line on a tiny volume: the noise is learnt from the LOW-DOSE image
    alone, the GCN is trained on the clean image + learnt noise, and denoising the low-dose image gets closer to
    the clean one."""
    from lib.evaluation.metrics import CT_WINDOWS, psnr

    cli = load_cli()
    low_dose = tmp_path / "low_dose.nii.gz"
    assert cli.main(["simulate", "-i", str(ct_crop), "-o", str(low_dose), "--noise", "gaussian", "--sigma", "40",
                     "--modality", "ct", "--seed", "5"]) == 0
    noise_model = tmp_path / "noise.pt"
    assert cli.main(["learn-noise", "-i", str(low_dose), "-o", str(noise_model), "--patch-size", "16", "--steps",
                     "150", "--batch-size", "32", "--device", "cpu", "--seed", "1"]) == 0
    weights = tmp_path / "gcn.pt"
    assert cli.main(["train", "--model", "tddl_gcn", "--output", str(weights), "--clean", str(ct_crop), "--modality",
                     "ct", "--noise-model", str(noise_model), "--realisations", "4", "--patch-size", "32",
                     "--batch-size", "4", "--steps", "200", "--lr", "2e-3", "--features", "16", "--neighbours", "8",
                     "--search-window", "9", "--blocks", "1", "--layers-per-block", "1", "--device", "cpu",
                     "--validation-every", "0", "--seed", "1"]) == 0
    denoised = tmp_path / "denoised.nii.gz"
    assert cli.main(["denoise", "--model", "tddl_gcn", "--weights", str(weights), "-i", str(low_dose), "-o",
                     str(denoised), "--device", "cpu"]) == 0
    clean, noisy, out = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32)
                         for p in (ct_crop, low_dose, denoised))
    window = CT_WINDOWS["wide"]
    gain = psnr(out, clean, window) - psnr(noisy, clean, window)
    assert gain > 3.0, f"learn-noise -> train -> denoise gained {gain:.2f} dB"


def test_cli_bad_inputs_exit_2(tmp_path, ct_crop, monkeypatch):
    cli = load_cli()
    train = ["train", "--output", str(tmp_path / "w.pt"), "--modality", "ct", "--clean", str(ct_crop)]
    cases = {
        "gcn option for adl": ["--model", "adl", "--features", "8"],
        "3D gcn": ["--model", "tddl_gcn", "--spatial-dims", "3"],
        "link without slices": ["--model", "tddl_gcn", "--link-slices"],
        "missing noise model": ["--model", "tddl_gcn", "--noise-model", str(tmp_path / "nope.pt")],
    }
    for message, extra in cases.items():
        assert cli.main(train + extra) == 2, message
    with pytest.raises(SystemExit) as exit_info:  # argparse: an even search window
        cli.main(train + ["--model", "tddl_gcn", "--search-window", "8"])
    assert exit_info.value.code == 2

    monkeypatch.setenv("ADL_MODEL_DIR", str(tmp_path / "no_models"))
    denoise = ["denoise", "-i", str(ct_crop), "-o", str(tmp_path / "o.nii.gz")]
    assert cli.main(denoise + ["--model", "tddl_gcn", "--modality", "ct"]) == 2  # no default weights installed
    config = tiny_config()
    weights = export_weights(GCNDenoiser(**config.network_kwargs()), tmp_path / "gcn.pt", config)
    assert cli.main(denoise + ["--model", "tddl_gcn", "--modality", "mr", "--weights", str(weights)]) == 2
    assert cli.main(denoise + ["--model", "adl", "--modality", "ct", "--weights", str(weights)]) == 2  # wrong class
    assert cli.main(denoise + ["--model", "bm3d", "--search-window", "21"]) == 2
    assert cli.main(denoise + ["--model", "adl", "--search-window", "21"]) == 2
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert cli.main(denoise + ["--model", "tddl_gcn", "--modality", "ct", "--weights", str(tmp_path / "junk.pt")]) == 2
    # MR weights are not refused: the GCN is CT-first, not CT-only
    mr_config = tiny_config(modality="MR")
    mr_weights = export_weights(GCNDenoiser(**mr_config.network_kwargs()), tmp_path / "gcn_mr.pt", mr_config)
    mr = np.random.default_rng(0).uniform(0, 500, (20, 24)).astype(np.float32)
    mr_path = write_nifti(mr, tmp_path / "mr.nii.gz")
    assert cli.main(["denoise", "-i", str(mr_path), "-o", str(tmp_path / "mr_out.nii.gz"), "--model", "tddl_gcn",
                     "--modality", "mr", "--weights", str(mr_weights), "--device", "cpu"]) == 0


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_knn_and_denoiser_agree_with_cpu():
    features = torch.randn(2, 16, 40, 36)
    i_cpu, d_cpu = windowed_knn(features, 16, 21)
    i_gpu, d_gpu = windowed_knn(features.cuda(), 16, 21)
    assert torch.allclose(d_gpu.cpu(), d_cpu, rtol=1e-4, atol=1e-4)
    assert (i_gpu.cpu() == i_cpu).float().mean() > 0.99
    model = GCNDenoiser(in_channels=3, link_slices=True, **TINY).eval()
    x = torch.rand(2, 3, 40, 36)
    with torch.no_grad():
        on_cpu = model(x)
        on_gpu = model.cuda()(x.cuda()).cpu()
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            amp = model(x.cuda()).float().cpu()
    assert torch.allclose(on_gpu, on_cpu, atol=1e-4)
    assert torch.allclose(amp, on_cpu, atol=2e-3)
