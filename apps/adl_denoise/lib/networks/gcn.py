"""Graph-convolutional CT denoiser (TDDL-GCN): local convolutions fused with edge-conditioned graph
convolutions over non-local, feature-space neighbours.

Design (after GCDN, Valsesia et al., "Deep Graph-Convolutional Image Denoising", TIP 2020, and the TDDL-GCN
of Chen et al., ICONIP / ISICDM 2020; their papers' full texts were not available, the details below are
this implementation's choices)::

    x (B, S, H, W), S adjacent slices, the centre one is denoised
    ├─ multi-scale pre-processing: conv 3x3 | conv 5x5 | conv 7x7 (each -> BN -> ReLU), concat, 1x1 -> F
    ├─ n_blocks x GraphBlock:
    │     graph = windowed_knn(h) (k neighbours in feature space within the search window, the 3x3
    │             spatial neighbourhood excluded; built once per block, shared by its layers)
    │     layers_per_block x: h <- ReLU((1 - beta) BN(conv3x3(h)) + beta BN(ECGraphConv(h, graph)))
    │                         beta = sigmoid(learnable), one per layer, starts at 0.5
    │     block output = block input + last layer (residual)
    └─ head: conv 3x3, times noise_scale -> predicted noise n (B, 1, H, W); output = x[:, centre] - n
       (residual learning; noise_scale = 0.01 matches the head to CT noise on the [0, 1] scale, where
       20 HU is 0.005, so that neither the initial output nor Adam's first steps swing it by tens of HU)

Edge-conditioned graph convolution (:class:`EdgeConditionedGraphConv`), for pixel i with neighbours N(i)::

    y_i = W_self h_i + 1/|N(i)| sum_{j in N(i)} gamma_ij Theta_ij h_j
    Theta_ij = sum_{r=1..rank} kappa_r(z_ij) theta_L^r(z_ij) theta_R^r(z_ij)^T     (low rank, out x in)
    z_ij = LeakyReLU(W_1 (h_j - h_i) + b_1)                                        (edge network, hidden)
    theta_L^r, theta_R^r, kappa_r = affine functions of z_ij                      (its output layer)
    gamma_ij = exp(-d_ij / delta), d_ij = mean_c (h_j - h_i)_c^2 at graph construction, delta learnable

The per-edge matrices are never formed: since theta_R^r(z)^T h_j = z1^T [W_R^r; b_R^r] h_j (z1 = [z, 1]), the
projections ``[W_1 h; (W_R^r, b_R^r) h]`` are computed once per PIXEL and gathered per edge; the neighbour
sum is then taken over ``c_ijr z1_ij`` (c_ijr = gamma_ij kappa_r theta_R^r . h_j / |N(i)|) and the left
factors ``[W_L^r | b_L^r]`` are applied once per pixel as one linear map. Per edge this keeps
``hidden + rank (hidden + 1)`` numbers instead of ``rank (in + out + 1)``, exactly the same function.

Slices: with ``in_channels = S > 1`` the S adjacent slices are either input channels of the pre-processing
(``link_slices=False``: cheap, the 3D context enters through the first convolutions), or
(``link_slices=True``, the slice-based 3D variant) every slice is run through the network as its own 2D
feature map (shared weights, S times the cost) and in every graph convolution each pixel has, besides its k
in-slice neighbours, two more edges: the same pixel in the previous and next slice of the stack (edge
network and weighting as for the other edges; at the ends of the stack the missing edge is dropped). Only
the centre slice's features reach the head.

Search window: ``search_window`` in training (21 by default, on 48x48 patches), ``inference_search_window``
in eval mode (default: the same), or per call ``forward(x, search_window=...)``; the group's code searched
49x49 windows at test time. Whole slices run in one pass with bounded memory: the kNN search works in tiles
(:mod:`lib.networks.graph`) and the graph convolution in chunks of pixels (``max_edges_per_chunk``), so no
tiling of the image (with its seams and halos) is needed; results do not depend on the chunking.

The defaults (features 32, 2 blocks x 2 layers, k 16, rank 4) have 67.5 k parameters. Most of the time goes to
the top-k selection of the k-NN search and the neighbour gathering of the graph convolutions; their cost per
slice and per training step, by search window and with linked slices, is in bench/README.md ("Measurements
behind design choices").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .graph import windowed_knn
from .layers import act_layer, norm_layer

__all__ = ["EdgeConditionedGraphConv", "GCNDenoiser", "NeighbourGraph", "build_neighbour_graph"]


@dataclass
class NeighbourGraph:
    """Edges of a batch of images, flattened: pixel p of image b is node ``b * H * W + p``.

    Attributes:
        index: (B, N, K) int64 node index of each neighbour (N = H * W).
        distance: (B, N, K) mean squared feature difference ``mean_c (h_j - h_i)^2`` at construction;
            +inf marks a missing edge (it gets weight 0).
        shape: (B, H, W).
    """

    index: torch.Tensor
    distance: torch.Tensor
    shape: tuple[int, int, int]

    @property
    def k(self) -> int:
        return int(self.index.shape[-1])


def build_neighbour_graph(
    features: torch.Tensor,
    k: int,
    search_window: int,
    exclude_radius: int = 1,
    slices: int = 1,
) -> NeighbourGraph:
    """k-NN graph of ``features`` (B, C, H, W) (see :func:`lib.networks.graph.windowed_knn`), as global node
    indices.

    With ``slices`` = S > 1, the batch holds ``B / S`` stacks of S adjacent slices (stack-major: row
    ``b * S + s``), and every pixel gets two more edges: the same pixel in slice s - 1 and s + 1 of its stack
    (missing at the ends of the stack). No gradient flows through the construction.
    """
    B, C, H, W = features.shape
    N = H * W
    index, distance = windowed_knn(features, k, search_window, exclude_radius)
    base = torch.arange(B, device=features.device).view(B, 1, 1) * N
    index = index.view(B, N, k) + base
    distance = distance.view(B, N, k).float() / C
    if slices > 1:
        if B % slices:
            raise ValueError(f"batch of {B} slice maps is not a whole number of {slices}-slice stacks")
        with torch.no_grad():
            f = features.detach().float().view(B // slices, slices, C, N)
            node = torch.arange(B * N, device=features.device).view(B // slices, slices, N)
            extra_index, extra_distance = [], []
            for step in (-1, 1):
                partner = torch.arange(slices, device=features.device) + step
                ok = (partner >= 0) & (partner < slices)
                partner = partner.clamp(0, slices - 1)
                d = ((f[:, partner] - f) ** 2).mean(2)  # (B/S, S, N)
                d = d.masked_fill(~ok.view(1, slices, 1), float("inf"))
                i = torch.where(ok.view(1, slices, 1), node[:, partner], node)
                extra_index.append(i.reshape(B, N, 1))
                extra_distance.append(d.reshape(B, N, 1))
        index = torch.cat([index] + extra_index, dim=2)
        distance = torch.cat([distance] + extra_distance, dim=2)
    return NeighbourGraph(index, distance, (B, H, W))


class EdgeConditionedGraphConv(nn.Module):
    """Edge-conditioned graph convolution with low-rank, feature-difference-conditioned weights (GCDN style).

    See the module docstring for the formula. Parameters: the per-pixel projection ``[W_1; W_R^r; b_R^r]``
    (``in -> hidden + rank (hidden + 1)``), the edge network's hidden bias ``b_1``, the kappa layer
    (``hidden -> rank``), the left factors ``[W_L^r | b_L^r]`` (``rank (hidden + 1) -> out``), the self term
    ``W_self`` (1x1) and ``log_delta`` of the edge weighting.

    Args:
        in_channels: channels of h (B, in_channels, H, W).
        out_channels: channels of the output (B, out_channels, H, W).
        rank: rank of the per-edge weight matrices.
        edge_hidden: hidden width of the edge network (default ``max(8, in_channels // 2)``).
        negative_slope: of the edge network's LeakyReLU.
        bias: bias of the self term (False when a normalisation follows).
        delta: initial bandwidth of the edge weighting ``exp(-d / delta)`` (d: mean squared difference).
        max_edges_per_chunk: edges processed at once (bounds the temporary memory; any value gives the same
            result).

    ``forward(h, graph)`` with ``graph`` a :class:`NeighbourGraph` over h's batch and pixels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int = 4,
        edge_hidden: int | None = None,
        negative_slope: float = 0.2,
        bias: bool = True,
        delta: float = 1.0,
        max_edges_per_chunk: int = 2**17,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        hidden = int(edge_hidden) if edge_hidden else max(8, in_channels // 2)
        self.in_channels, self.out_channels, self.rank, self.hidden = in_channels, out_channels, rank, hidden
        self.negative_slope = negative_slope
        self.max_edges_per_chunk = int(max_edges_per_chunk)
        self.project = nn.Linear(in_channels, hidden + rank * (hidden + 1), bias=False)
        self.edge_bias = nn.Parameter(torch.zeros(hidden))
        self.kappa = nn.Linear(hidden, rank)
        self.left = nn.Linear(rank * (hidden + 1), out_channels, bias=False)
        self.self_term = nn.Linear(in_channels, out_channels, bias=bias)
        self.log_delta = nn.Parameter(torch.tensor(math.log(delta)))
        with torch.no_grad():  # kappa starts near 1 so that the low-rank terms start as plain products
            self.kappa.bias.fill_(1.0)

    def edge_weights(self, graph: NeighbourGraph) -> torch.Tensor:
        """(B*N, K) weights ``gamma_ij / |N(i)|`` (0 for missing edges)."""
        d = graph.distance.reshape(-1, graph.k)
        valid = torch.isfinite(d)
        gamma = torch.exp(-d.masked_fill(~valid, 0.0) / self.log_delta.exp()) * valid
        return gamma / valid.sum(1, keepdim=True).clamp_min(1)

    def forward(self, h: torch.Tensor, graph: NeighbourGraph) -> torch.Tensor:
        B, C, H, W = h.shape
        if C != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got {C}")
        if tuple(graph.shape) != (B, H, W):
            raise ValueError(f"graph of shape {graph.shape} does not fit features {tuple(h.shape)}")
        N, K, R, Hd = H * W, graph.k, self.rank, self.hidden
        flat = h.permute(0, 2, 3, 1).reshape(B * N, C)  # channels last: one row per node
        if not torch.is_grad_enabled():  # inference: same result, fewer passes over the per-edge tensors
            out = self._forward_inference(flat, graph)
            return out.view(B, H, W, self.out_channels).permute(0, 3, 1, 2).contiguous()
        proj = self.project(flat)  # (B*N, Hd + R (Hd + 1))
        # W_1 h_i - b_1 once per pixel, so that each edge's z_ij = LeakyReLU(W_1 h_j - that) is one pass
        centre = proj[:, :Hd] - self.edge_bias
        weights = self.edge_weights(graph).to(proj.dtype)
        index = graph.index.reshape(B * N, K)
        chunk = max(1, self.max_edges_per_chunk // K)
        pieces = []
        for s in range(0, B * N, chunk):
            e = min(B * N, s + chunk)
            n = e - s
            neighbours = proj.index_select(0, index[s:e].reshape(-1)).view(n, K, -1)
            z = F.leaky_relu(neighbours[..., :Hd] - centre[s:e, None], self.negative_slope)
            z1 = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)  # (n, K, Hd + 1)
            right = torch.einsum("nkrh,nkh->nkr", neighbours[..., Hd:].reshape(n, K, R, Hd + 1), z1)
            coeff = weights[s:e, :, None] * self.kappa(z) * right  # (n, K, R)
            pooled = torch.einsum("nkr,nkh->nrh", coeff, z1).reshape(n, R * (Hd + 1))
            pieces.append(self.left(pooled))
        aggregated = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        out = aggregated + self.self_term(flat)
        return out.view(B, H, W, self.out_channels).permute(0, 3, 1, 2).contiguous()

    def _forward_inference(self, flat: torch.Tensor, graph: NeighbourGraph) -> torch.Tensor:
        """The same function as the autograd path of :meth:`forward`, for inference (autograd off).

        Args:
            flat: (B*N, in) node features, one row per pixel (channels last).
            graph: the :class:`NeighbourGraph` over those nodes.

        Returns:
            (B*N, out) rows. Equal to the autograd path up to float rounding (summation order); chosen by
            :meth:`forward` whenever ``torch.is_grad_enabled()`` is False, so training never runs it.

        The per-edge work is bound by memory traffic on a CPU, so this path makes fewer passes over the per-edge
        tensors: chunks of :data:`INFERENCE_EDGES_PER_CHUNK` edges (they stay in cache), z written straight into
        a reused ``[z, 1]`` buffer whose ones column is filled once (no concatenation), the activation and the
        products in place, and each chunk's neighbour terms added into the self term's output in place.
        """
        K, R, Hd = graph.k, self.rank, self.hidden
        BN = flat.shape[0]
        proj = self.project(flat)  # (B*N, Hd + R (Hd + 1))
        centre = proj[:, :Hd] - self.edge_bias
        weights = self.edge_weights(graph).to(proj.dtype)
        index = graph.index.reshape(BN, K)
        kappa_w, kappa_b = self.kappa.weight.t().contiguous(), self.kappa.bias
        left_w = self.left.weight.t()  # (R (Hd + 1), out)
        out = self.self_term(flat)  # (B*N, out); the neighbour terms are added chunk by chunk
        chunk = max(1, min(self.max_edges_per_chunk, INFERENCE_EDGES_PER_CHUNK) // K)
        z1_buffer = proj.new_ones(min(chunk, BN) * K, Hd + 1)  # z1 = [z, 1]: the ones column is written once
        for s in range(0, BN, chunk):
            e = min(BN, s + chunk)
            n = e - s
            neighbours = proj.index_select(0, index[s:e].reshape(-1))  # (n K, Hd + R (Hd + 1))
            z1 = z1_buffer[: n * K]
            z = z1[:, :Hd]
            torch.sub(neighbours[:, :Hd].view(n, K, Hd), centre[s:e, None], out=z.view(n, K, Hd))
            F.leaky_relu_(z, self.negative_slope)
            blocks = neighbours[:, Hd:].view(n * K, R, Hd + 1)  # [W_R^r; b_R^r] h_j per rank
            right = torch.bmm(blocks, z1.view(n * K, Hd + 1, 1))  # theta_R^r(z) . h_j, (n K, R, 1)
            coeff = torch.addmm(kappa_b, z, kappa_w)  # kappa_r(z), (n K, R)
            coeff = coeff.view(n, K, R).mul_(right.view(n, K, R)).mul_(weights[s:e, :, None])  # c_ijr
            pooled = torch.bmm(coeff.transpose(1, 2), z1.view(n, K, Hd + 1)).view(n, R * (Hd + 1))
            out[s:e].addmm_(pooled, left_w)
        return out


#: edges per chunk of the inference path (:meth:`EdgeConditionedGraphConv._forward_inference`), at most
#: ``max_edges_per_chunk``: its per-edge tensors (about 110 floats per edge, 7 MiB) then stay in a CPU's cache
INFERENCE_EDGES_PER_CHUNK = 2**14


class _LocalNonLocalLayer(nn.Module):
    """ReLU((1 - beta) BN(conv3x3(h)) + beta BN(graph_conv(h, graph))), beta = sigmoid(beta_logit)."""

    def __init__(self, features: int, rank: int, edge_hidden: int | None, norm, act, max_edges_per_chunk: int):
        super().__init__()
        self.local = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.local_norm = norm_layer(norm, 2, features)
        self.graph_conv = EdgeConditionedGraphConv(features, features, rank, edge_hidden, bias=False,
                                                   max_edges_per_chunk=max_edges_per_chunk)
        self.graph_norm = norm_layer(norm, 2, features)
        self.beta_logit = nn.Parameter(torch.zeros(()))
        self.act = act_layer(act)

    @property
    def beta(self) -> torch.Tensor:
        return torch.sigmoid(self.beta_logit)

    def forward(self, h: torch.Tensor, graph: NeighbourGraph) -> torch.Tensor:
        beta = self.beta
        local = self.local_norm(self.local(h))
        non_local = self.graph_norm(self.graph_conv(h, graph))
        return self.act((1 - beta) * local + beta * non_local)


class _GraphBlock(nn.Module):
    """``layers`` local/non-local layers sharing one graph; residual over the block."""

    def __init__(self, features: int, layers: int, rank: int, edge_hidden: int | None, norm, act,
                 max_edges_per_chunk: int):
        super().__init__()
        self.layers = nn.ModuleList(_LocalNonLocalLayer(features, rank, edge_hidden, norm, act, max_edges_per_chunk)
                                    for _ in range(layers))

    def forward(self, h: torch.Tensor, graph: NeighbourGraph) -> torch.Tensor:
        y = h
        for layer in self.layers:
            y = layer(y, graph)
        return h + y


class GCNDenoiser(nn.Module):
    """TDDL-GCN denoiser: multi-scale convolutions, then blocks fusing 3x3 convolutions with edge-conditioned
    graph convolutions over non-local neighbours; predicts the noise and subtracts it (see the module
    docstring for the layout and the formulas).

    Args:
        in_channels: adjacent slices given (odd: 1, 3, ...); the centre one is denoised.
        features: channels of the feature maps (GCDN: 132; default 32 keeps a 512x512 slice at seconds on
            one CPU thread).
        k: non-local neighbours per pixel (16 as in the group's code).
        search_window: odd side of the search window in training mode (default 21).
        inference_search_window: side in eval mode (default: ``search_window``; the group's code used 49).
        n_blocks: graph blocks (one kNN graph each).
        layers_per_block: local/non-local layers per block (sharing the block's graph).
        rank: rank of the edge-conditioned weight matrices.
        edge_hidden: hidden width of the edge network (default ``max(8, features // 2)``).
        exclude_radius: spatial neighbourhood left out of the graph (1: the 8 neighbours and the pixel).
        link_slices: with ``in_channels > 1``: link each pixel to the same pixel in the adjacent slices in
            every graph convolution (slice-based 3D variant, S times the cost) instead of feeding the slices
            as input channels.
        norm: MONAI normalisation name (``"batch"``).
        act: MONAI activation name (``"relu"``).
        max_edges_per_chunk: graph-convolution chunking (memory bound; no effect on the result).
        noise_scale: factor on the head's output (see the module docstring); 1 gives a plain head.

    ``forward(x, search_window=None)``: x (B, in_channels, H, W), intensities in [0, 1], any H, W; returns
    the denoised centre slice (B, 1, H, W) (not clipped). :meth:`predict_noise` returns the noise estimate.
    """

    spatial_dims = 2
    #: no down-sampling: any image size works (lib.predict pads to multiples of this)
    size_multiple = 1

    def __init__(
        self,
        in_channels: int = 1,
        features: int = 32,
        k: int = 16,
        search_window: int = 21,
        inference_search_window: int | None = None,
        n_blocks: int = 2,
        layers_per_block: int = 2,
        rank: int = 4,
        edge_hidden: int | None = None,
        exclude_radius: int = 1,
        link_slices: bool = False,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
        max_edges_per_chunk: int = 2**17,
        noise_scale: float = 0.01,
    ) -> None:
        super().__init__()
        if in_channels < 1 or in_channels % 2 == 0:
            raise ValueError(f"in_channels (adjacent slices) must be odd, got {in_channels}")
        if link_slices and in_channels == 1:
            raise ValueError("link_slices needs adjacent slices: in_channels >= 3")
        for name, window in (("search_window", search_window), ("inference_search_window", inference_search_window)):
            if window is not None and (window < 3 or window % 2 == 0):
                raise ValueError(f"{name} must be an odd number >= 3, got {window}")
        if n_blocks < 1 or layers_per_block < 1:
            raise ValueError("n_blocks and layers_per_block must be >= 1")
        self.in_channels = in_channels
        self.slice_context = in_channels // 2
        self.features = features
        self.k = k
        self.search_window = int(search_window)
        self.inference_search_window = int(inference_search_window or search_window)
        self.exclude_radius = exclude_radius
        self.link_slices = bool(link_slices)
        window_candidates = min(self.search_window, self.inference_search_window) ** 2 - (2 * exclude_radius + 1) ** 2
        if not 1 <= k <= window_candidates:
            raise ValueError(f"k = {k} does not fit the search windows ({window_candidates} candidates)")

        first = 1 if self.link_slices else in_channels
        self.pre = nn.ModuleList(
            nn.Sequential(nn.Conv2d(first, features, size, padding=size // 2, bias=False),
                          norm_layer(norm, 2, features), act_layer(act))
            for size in (3, 5, 7)
        )
        self.pre_fuse = nn.Sequential(nn.Conv2d(3 * features, features, 1, bias=False),
                                      norm_layer(norm, 2, features), act_layer(act))
        self.blocks = nn.ModuleList(
            _GraphBlock(features, layers_per_block, rank, edge_hidden, norm, act, max_edges_per_chunk)
            for _ in range(n_blocks)
        )
        self.head = nn.Conv2d(features, 1, 3, padding=1)
        self.noise_scale = float(noise_scale)

    def betas(self) -> list[float]:
        """Current fusion weights beta of every layer (0: local only, 1: non-local only)."""
        return [float(layer.beta.detach()) for block in self.blocks for layer in block.layers]

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) (adjacent slices as channels), "
                             f"got shape {tuple(x.shape)}")

    def predict_noise(self, x: torch.Tensor, search_window: int | None = None) -> torch.Tensor:
        """The noise estimate (B, 1, H, W) of the centre slice of x (B, in_channels, H, W)."""
        self._check(x)
        window = int(search_window or (self.search_window if self.training else self.inference_search_window))
        B, S, H, W = x.shape
        h = x.reshape(B * S, 1, H, W) if self.link_slices else x
        h = self.pre_fuse(torch.cat([branch(h) for branch in self.pre], dim=1))
        slices = S if self.link_slices else 1
        for block in self.blocks:
            graph = build_neighbour_graph(h, self.k, window, self.exclude_radius, slices=slices)
            h = block(h, graph)
        if self.link_slices:
            h = h.view(B, S, self.features, H, W)[:, self.slice_context]
        return self.head(h) * self.noise_scale

    def forward(self, x: torch.Tensor, search_window: int | None = None) -> torch.Tensor:
        noise = self.predict_noise(x, search_window)
        c = self.slice_context
        return x[:, c:c + 1] - noise.to(x.dtype)
