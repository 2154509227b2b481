"""TDDL-GCN: windowed k-NN graphs, edge-conditioned graph convolution, the GCN denoiser, its training, weight
export / loading, whole-image inference and the `train` / `denoise --model tddl_gcn` command line. The GCN trainer
under torchrun: tests/test_adl_training.py (one test for both trainers of the engine).

Tiny sizes on one thread.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from conftest import APP_DIR, import_cli

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
def _assert_windowed_knn_matches_brute_force(features: torch.Tensor, k: int, window: int, exclude: int) -> None:
    B, _, H, W = features.shape
    indices, distances = windowed_knn(features, k, window, exclude)
    assert indices.shape == distances.shape == (B, H, W, k) and indices.dtype == torch.int64
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
            dy, dx = i // W - y, i % W - x
            assert max(abs(dy), abs(dx)) <= window // 2 and max(abs(dy), abs(dx)) > exclude
        assert (indices[b, y, x, n:] == y * W + x).all()  # missing neighbours point at the pixel itself


def test_windowed_knn_matches_brute_force():
    _assert_windowed_knn_matches_brute_force(torch.randn(2, 5, 12, 13, dtype=torch.float64), 16, 7, 1)


@pytest.mark.parametrize("height,width", [(1, 13), (13, 1), (1, 1), (2, 3)])
def test_windowed_knn_matches_brute_force_on_images_one_pixel_thin(height, width):
    """One row (or column) per tile: the window copy must not be the overlapping view of the dot products."""
    _assert_windowed_knn_matches_brute_force(torch.randn(1, 3, height, width, dtype=torch.float64), 4, 7, 1)


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


def shifted_knn_reference(features: torch.Tensor, k: int, window: int, exclude: int):
    """The plain definition, for the tests (not the library's algorithm): for every candidate offset the whole
    image's ``sum_c (f - shift(f))^2`` by direct differences, then ONE ``torch.topk`` over all offsets; the
    one-stage selection that :func:`windowed_knn` replaced by two stages. Returns ``(indices, distances)`` like
    it (missing neighbours: +inf and the pixel's own index)."""
    B, C, H, W = features.shape
    R = window // 2
    f = features.detach()
    padded = torch.nn.functional.pad(f, (R, R, R, R))
    inside = torch.nn.functional.pad(torch.ones(H, W, dtype=torch.bool), (R, R, R, R))
    offsets = window_offsets(window, exclude)
    d = torch.stack([((padded[:, :, R + dy:R + dy + H, R + dx:R + dx + W] - f) ** 2).sum(1)
                     .masked_fill(~inside[R + dy:R + dy + H, R + dx:R + dx + W], float("inf"))
                     for dy, dx in offsets], dim=-1)  # (B, H, W, offsets)
    distances, pick = torch.topk(d, k, dim=-1, largest=False, sorted=True)
    o = torch.tensor(offsets)[pick]  # (B, H, W, k, 2)
    y = torch.arange(H).view(1, H, 1, 1) + o[..., 0]
    x = torch.arange(W).view(1, 1, W, 1) + o[..., 1]
    own = (torch.arange(H).view(1, H, 1, 1) * W + torch.arange(W).view(1, 1, W, 1)).expand_as(y)
    indices = torch.where(torch.isinf(distances), own, y * W + x)
    return indices, distances


@pytest.mark.parametrize("window, k, group", [(21, 16, None), (21, 16, 3), (21, 16, 1), (9, 10, 3), (15, 16, 5),
                                              (15, 16, None), (21, 5, 21)])
def test_windowed_knn_two_stage_selection_equals_one_topk_over_all_offsets(window, k, group):
    # float64 random features: no ties, so the neighbour lists must be identical, borders (missing candidates) incl.
    features = torch.randn(2, 6, 30, 41, dtype=torch.float64)
    indices, distances = windowed_knn(features, k, window, 1, group=group)
    ref_indices, ref_distances = shifted_knn_reference(features, k, window, 1)
    assert torch.equal(torch.isinf(distances), torch.isinf(ref_distances))
    finite = torch.isfinite(ref_distances)
    assert torch.allclose(distances[finite], ref_distances[finite], rtol=1e-9, atol=1e-9)
    assert torch.equal(indices, ref_indices)


def test_windowed_knn_default_selection_and_bad_groups():
    from lib.networks.graph import _auto_group

    assert _auto_group(21, 16) == 7  # the shipped GCN's window: 63 minima + 112 offsets instead of 441
    assert _auto_group(49, 16) == 7
    assert _auto_group(7, 8) == 1  # nothing to gain on small windows: one stage
    features = torch.randn(1, 3, 12, 12)
    with pytest.raises(ValueError, match="divide"):
        windowed_knn(features, 16, 21, group=4)
    with pytest.raises(ValueError, match="groups"):
        windowed_knn(features, 30, 21, group=21)  # 21 groups (whole window columns) for 30 neighbours


def test_shipped_gcn_on_a_real_ct_slice_is_unchanged_by_the_fast_knn(monkeypatch):
    """The shipped TDDL-GCN weights on a real low-dose CT slice (the sample head CT at quarter dose, built by
    sample_data/build_sample_data.py; a 128 x 128 crop: skull, brain and air): the library's k-NN against the plain
    definition (:func:`shifted_knn_reference`) in the whole network, in HU. Only float rounding may differ: near-ties
    in float32 distances (the library expands |f_i - f_j|^2 into dot products, the reference subtracts) may pick
    another neighbour at the k-th place, so a few pixels may move by a HU or so (the one-stage k-NN this replaced
    gave the same figures here, and equals the two-stage one to 0.0003 HU); a wrong selection moves most pixels, by
    13-70 HU."""
    import lib.networks.gcn as gcn_module
    from conftest import SAMPLE_STUDIES

    weights = APP_DIR / "model" / "pretrained_tddl_gcn_ct.pt"
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_STUDIES / "ct_head_pydicom693_ld25.nii.gz")))
    image = volume.reshape(-1, *volume.shape[-2:])[0, 192:320, 96:224].astype(np.float32)
    assert image.min() < -900 and image.max() > 500  # air and bone in the crop
    model = load_denoiser(weights)
    fast = denoise_array(model, image, "CT")
    monkeypatch.setattr(gcn_module, "windowed_knn", shifted_knn_reference)
    plain = denoise_array(model, image, "CT")
    difference = np.abs(fast - plain)
    assert np.abs(fast - image).mean() > 5  # the model does denoise
    # a near-tie moves a pixel or two by up to a few HU (0.61 HU and 1.47 HU max on two noise realisations of this
    # sample, 0.2 % of the pixels over 0.05 HU); four wrong selections moved 25-99 % of them by 13-70 HU
    assert difference.max() < 5.0, difference.max()
    assert (difference > 0.05).mean() < 0.02, (difference > 0.05).mean()


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


def test_graph_conv_equals_its_formula_edge_by_edge():
    """y_i = W_self h_i + 1/|N(i)| sum_j gamma_ij sum_r kappa_r(z) theta_L^r(z) (theta_R^r(z) . h_j), with
    z = LeakyReLU(W_1 (h_j - h_i) + b_1), evaluated naively per edge (the module's docstring) against the
    module's per-pixel factorisation, with every parameter (edge bias included) away from its initial value."""
    torch.manual_seed(3)
    h = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    conv = EdgeConditionedGraphConv(3, 2, rank=2, edge_hidden=4).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    graph = build_neighbour_graph(h, 4, 5)
    out = conv(h, graph)
    Hd, R = conv.hidden, conv.rank
    W1 = conv.project.weight[:Hd]
    blocks = conv.project.weight[Hd:].view(R, Hd + 1, 3)  # [W_R^r; b_R^r] per rank
    left = conv.left.weight.view(2, R, Hd + 1)  # [W_L^r | b_L^r] per rank
    flat = h[0].reshape(3, -1).T  # (N, C)
    delta = conv.log_delta.exp()
    for i in range(flat.shape[0]):
        total = torch.zeros(2, dtype=torch.float64)
        valid = torch.isfinite(graph.distance[0, i])
        for j, d in zip(graph.index[0, i][valid].tolist(), graph.distance[0, i][valid]):
            z = torch.nn.functional.leaky_relu(W1 @ (flat[j] - flat[i]) + conv.edge_bias, conv.negative_slope)
            z1 = torch.cat([z, torch.ones(1, dtype=torch.float64)])
            kappa = conv.kappa(z)
            theta = sum(kappa[r] * torch.outer(left[:, r] @ z1, blocks[r].T @ z1) for r in range(R))  # (out, in)
            total += torch.exp(-d / delta) * (theta @ flat[j])
        expected = conv.self_term(flat[i]) + total / valid.sum()
        # the graph stores distances in float32, and the module takes gamma in their type: 1e-7 relative
        assert torch.allclose(out[0, :, i // 5, i % 5], expected, rtol=1e-6, atol=1e-6), i


def test_graph_conv_chunking_does_not_change_the_result():
    h = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    conv = EdgeConditionedGraphConv(6, 4, rank=2).double()
    graph = build_neighbour_graph(h, 6, 5)
    whole = conv(h, graph)
    conv.max_edges_per_chunk = 7  # one pixel per chunk
    assert torch.allclose(conv(h, graph), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [2**17, 7, 40])  # one chunk; one pixel per chunk; chunks with a short last one
def test_graph_conv_inference_path_equals_the_autograd_path(chunk, monkeypatch):
    """Without autograd, forward takes the inference-only path (fewer passes over the per-edge tensors); it
    must give the autograd path's result, with linked slices (K = k + 2, missing edges at the stack ends),
    whatever the chunking, and in no_grad as in inference_mode."""
    import lib.networks.gcn as gcn_module

    torch.manual_seed(5)
    h = torch.randn(6, 5, 7, 6, dtype=torch.float64)  # 2 stacks of 3 slices
    conv = EdgeConditionedGraphConv(5, 4, rank=3, edge_hidden=6).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    graph = build_neighbour_graph(h, 5, 5, slices=3)
    assert torch.isinf(graph.distance).any()
    expected = conv(h, graph)  # autograd path (parameters require grad)
    assert expected.requires_grad
    monkeypatch.setattr(gcn_module, "INFERENCE_EDGES_PER_CHUNK", chunk)
    calls = []
    monkeypatch.setattr(conv, "_forward_inference",
                        lambda *a, f=conv._forward_inference: calls.append(1) or f(*a))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = conv(h, graph)
        assert torch.allclose(out, expected.detach(), rtol=1e-12, atol=1e-12)
    assert len(calls) == 2  # the inference path really ran


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


def test_cli_train_on_pseudo_pairs_from_a_learned_noise_model(tmp_path, ct_crop):
    """TDDL: learn-noise on a low-dose image, then train the GCN on NDCT + sampled noise (tiny, in-process)."""
    cli = import_cli()
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


def test_cli_train_from_initial_weights_with_a_lineage_carries_it(tmp_path, ct_crop):
    """`train --model tddl_gcn --initial-weights` keeps the start's record in `lineage` after the start's own
    lineage (oldest first, the start last, by file name and sha256)."""
    import hashlib

    cli = import_cli()
    tiny = ["train", "--model", "tddl_gcn", "--clean", str(ct_crop), "--modality", "ct", "--noise", "gaussian",
            "--patch-size", "24", "--batch-size", "2", "--steps", "1", "--features", "8", "--neighbours", "8",
            "--search-window", "7", "--blocks", "1", "--layers-per-block", "1", "--device", "cpu",
            "--validation-every", "0", "--checkpoint-every", "0"]
    first, middle, last = tmp_path / "first.pt", tmp_path / "middle.pt", tmp_path / "last.pt"
    assert cli.main([*tiny, "--output", str(first), "--seed", "1"]) == 0
    assert cli.main([*tiny, "--output", str(middle), "--seed", "2", "--initial-weights", str(first)]) == 0
    assert cli.main([*tiny, "--output", str(last), "--seed", "3", "--initial-weights", str(middle)]) == 0
    middle_record = load_denoiser(middle).metadata["training"]
    record = load_denoiser(last).metadata["training"]
    assert [e["file"] for e in record["lineage"]] == ["first.pt", "middle.pt"]
    assert record["lineage"][-1]["sha256"] == hashlib.sha256(middle.read_bytes()).hexdigest()
    assert record["lineage"][:-1] == middle_record["lineage"]
    assert middle_record["lineage"][0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert record["lineage"][-1]["model"] == "tddl_gcn" and record["lineage"][-1]["config"]["features"] == 8
    assert record["initial_weights"].startswith("middle.pt (sha256 ")


@pytest.mark.slow
def test_tddl_end_to_end_learn_noise_train_denoise_improves_psnr(tmp_path, ct_crop):
    """The TDDL workflow through the command line on a tiny volume: the noise is learnt from the LOW-DOSE image
    alone, the GCN is trained on the clean image + learnt noise, and denoising the low-dose image gets closer to
    the clean one. (75 noise-learning and 100 training steps gain 6.8 dB here, 150 and 200 gave 7.2 dB; with the
    learnt noise added at a tenth of its strength the gain falls below the 3 dB asked.)"""
    from lib.evaluation.metrics import CT_WINDOWS, psnr

    cli = import_cli()
    low_dose = tmp_path / "low_dose.nii.gz"
    assert cli.main(["simulate", "-i", str(ct_crop), "-o", str(low_dose), "--noise", "gaussian", "--sigma", "40",
                     "--modality", "ct", "--seed", "5"]) == 0
    noise_model = tmp_path / "noise.pt"
    assert cli.main(["learn-noise", "-i", str(low_dose), "-o", str(noise_model), "--patch-size", "16", "--steps",
                     "75", "--batch-size", "32", "--device", "cpu", "--seed", "1"]) == 0
    weights = tmp_path / "gcn.pt"
    assert cli.main(["train", "--model", "tddl_gcn", "--output", str(weights), "--clean", str(ct_crop), "--modality",
                     "ct", "--noise-model", str(noise_model), "--realisations", "4", "--patch-size", "32",
                     "--batch-size", "4", "--steps", "100", "--lr", "2e-3", "--features", "16", "--neighbours", "8",
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
    cli = import_cli()
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
