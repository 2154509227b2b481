"""Non-local graphs of images: k nearest neighbours in FEATURE space within a local search window.

:func:`windowed_knn` is the graph construction of the graph-convolutional denoiser
(:class:`~lib.networks.gcn.GCNDenoiser`, after GCDN, Valsesia et al., TIP 2020): every pixel i is linked to
the ``k`` pixels j of its ``search_window x search_window`` neighbourhood whose feature vectors are closest
to its own (squared Euclidean distance), leaving out its immediate spatial neighbourhood
(``|dy|, |dx| <= exclude_radius``: by default itself and its 8 neighbours, which the local 3x3 convolution
already covers).

Memory stays bounded for any image size: no N x N (pixels x pixels) matrix is ever formed. The image is cut
into query tiles of ``tile x tile`` pixels; a tile's candidates are its tile grown by the window radius R on
every side. For a batch of tiles, one batched matrix product gives the feature dot products of every query
pixel with every pixel of its candidate region, ``(tile^2) x (tile + 2R)^2`` per tile; with the queries augmented to
``[-2 f_i, 1]`` and the candidates to ``[f_j, |f_j|^2]`` the product is ``|f_j|^2 - 2 f_i.f_j``, which ranks i's
candidates like ``|f_i - f_j|^2`` (``|f_i|^2`` is added to the k winners). The features are centred on their
per-image mean first (distances do not change; the cancellation error of the expansion shrinks). The window
of each query pixel is then copied out of that block (``(tile^2) x S^2``; the excluded centre block and
offsets that leave the image, whose candidates carry a huge sentinel squared norm, come out as +inf) and the k
nearest are selected in two exact stages (``group`` g, a divisor of S; :func:`_auto_group`): the minimum of
every column segment of g window rows, the k segments with the smallest minima (``torch.topk``), then the k
nearest among their k g offsets. Every offset left out lies in a segment whose minimum is no smaller than the
k-th chosen segment's, and each chosen segment holds an offset at most that far, so the k nearest are among
the chosen ones: the same neighbours as a top-k over all S^2 offsets (ties aside), at 63 + 112 instead of 441
top-k elements per pixel for S = 21, k = 16 (``torch.topk`` on a CPU costs about the same per element whatever
k; it was 60 % of the search). Windows without a useful divisor (small S) use the one-stage running top-k over
chunks of window rows (``group=1``).

Why not the shift-and-subtract loop over offsets (one whole-image ``sum_c (f - shift(f))^2`` per offset)?
It is equally memory-bounded but memory-bandwidth bound, one pass over the image per offset; the tiled matrix
product does the same arithmetic at BLAS speed (an order of magnitude faster on a CPU for 21x21 to 49x49 windows;
figures in bench/README.md). Its memory is bounded by ``max_elements`` per batch of tiles (the dot products and
the windows' copy) plus the (B, H, W, k) results.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["window_offsets", "windowed_knn"]

#: Squared norm given to candidates outside the image (and bias of the excluded centre): far beyond any real
#: distance, yet finite in float32 so that matrix products stay free of inf * 0 = NaN.
_FAR = 1e30


def window_offsets(search_window: int, exclude_radius: int = 1) -> list[tuple[int, int]]:
    """The candidate offsets (dy, dx) of a window, row-major, without the excluded centre block."""
    _check_window(search_window, exclude_radius)
    R = search_window // 2
    return [(dy, dx) for dy in range(-R, R + 1) for dx in range(-R, R + 1)
            if max(abs(dy), abs(dx)) > exclude_radius]


def _check_window(search_window: int, exclude_radius: int) -> None:
    if search_window < 1 or search_window % 2 == 0:
        raise ValueError(f"search_window must be a positive odd number, got {search_window}")
    if exclude_radius < 0:
        raise ValueError(f"exclude_radius must be >= 0, got {exclude_radius}")


def _auto_tile(radius: int) -> int:
    # the wasted arithmetic is ((tile + 2R) / (2R + 1))^2: small tiles waste less but make small matrix
    # products; about R/2 .. R balanced both in CPU timings for R = 10 and 24
    return int(min(max(8, radius), 32))


def _auto_group(search_window: int, k: int) -> int:
    """Group size g of the two-stage selection for this window and k, or 1 for the one-stage running top-k.

    ``torch.topk`` on a CPU costs about the same per element whatever k, and was 60 % of the search with the
    one-stage selection over all S^2 offsets. Two stages look at ``S^2 / g`` group minima plus ``k g`` offsets
    instead (S = 21, k = 16: 63 + 112 = 175 instead of 441; the group minima are a cheap vectorised ``amin``).
    g divides S (a group is part of one window column); used only where it saves at least a quarter."""
    best, cost = 1, float(search_window**2)
    for g in range(2, search_window + 1):
        if search_window % g == 0 and search_window * (search_window // g) >= k:
            c = search_window * (search_window // g) + k * g
            if c < cost:
                best, cost = g, c
    return best if cost <= 0.75 * search_window**2 else 1


def windowed_knn(
    features: torch.Tensor,
    k: int,
    search_window: int,
    exclude_radius: int = 1,
    *,
    tile: int | None = None,
    rows_per_chunk: int | None = None,
    max_elements: int | None = None,
    group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours of every pixel in feature space, searched within a local window.

    Args:
        features: (B, C, H, W). Detached for the search (no gradient flows through it); float64 inputs are
            searched in float64, everything else in float32.
        k: neighbours per pixel.
        search_window: odd side length S of the square search window centred on each pixel.
        exclude_radius: pixels with ``max(|dy|, |dx|) <= exclude_radius`` are never neighbours (default 1:
            the pixel itself and its 8 spatial neighbours). Must leave at least ``k`` candidates.
        tile: side of the query tiles (default: between 8 and 32, from the window radius).
        rows_per_chunk: one-stage selection only: window rows per chunk of offsets in the running top-k
            (default: as many as fit in ``max_elements``). Any value gives the same result; it only trades
            memory for passes.
        max_elements: soft bound on the elements of the temporary blocks of one batch of tiles (the dot
            products and the copy of the windows); default 2**23 floats (32 MiB) on the CPU,
            2**25 on a GPU (fewer, larger batches).
        group: the selection. g > 1 (g must divide S, and S^2 / g >= k): two exact stages, the minimum of
            every group of g consecutive offsets of a window column (rows p g .. p g + g - 1), the k groups with
            the smallest minima, then the k nearest among those k g offsets (see the module docstring for why
            nothing is missed). 1: one stage, a running top-k over all offsets. Default: :func:`_auto_group`
            (two stages where they save time, e.g. g = 7 for S = 21 or 49). Both give the same neighbours,
            ties aside.

    Returns:
        ``(indices, distances)``, both (B, H, W, k), sorted by increasing distance: ``indices`` (int64) are
        flat indices ``y * W + x`` into the same image, ``distances`` the squared Euclidean feature distances
        ``sum_c (f_i - f_j)^2``. Where fewer than k candidates lie inside the image (tiny images), the
        missing neighbours have distance +inf and index = the pixel itself.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    _check_window(search_window, exclude_radius)
    candidates = search_window**2 - (2 * min(exclude_radius, search_window // 2) + 1) ** 2
    if k < 1 or k > candidates:
        raise ValueError(f"k = {k} neighbours, but a {search_window}x{search_window} window without its centre "
                         f"block of radius {exclude_radius} holds only {candidates} candidates")
    g = _auto_group(search_window, k) if group is None else int(group)
    if g < 1 or search_window % g or (g > 1 and search_window * (search_window // g) < k):
        raise ValueError(f"group = {group} must divide the search window {search_window} and leave at least "
                         f"k = {k} groups")
    B, C, H, W = features.shape
    if max_elements is None:
        max_elements = 2**25 if features.device.type == "cuda" else 2**23
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.detach().to(dtype)
    f = f - f.mean(dim=(2, 3), keepdim=True)
    device = f.device
    S, R = search_window, search_window // 2
    T = int(tile) if tile else _auto_tile(R)
    Ty, Tx = max(1, min(T, H)), max(1, min(T, W))
    nTy, nTx = math.ceil(H / Ty), math.ceil(W / Tx)
    Hq, Wq = nTy * Ty, nTx * Tx
    Ly, Lx = Ty + 2 * R, Tx + 2 * R
    L = Ly * Lx

    # no autograd, and no autocast: fp16 would overflow the sentinel and blur the ranking
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        norms = (f * f).sum(1)  # (B, H, W)
        # queries: the image padded to whole tiles (results for the padding are dropped), augmented to
        # [-2 f_i, 1] so that ONE matrix product gives |f_j|^2 - 2 f_i.f_j; |f_i|^2 does not change the ranking
        # of i's candidates and is added to the k winners only
        fq = torch.cat([-2 * f, torch.ones_like(f[:, :1])], dim=1)
        fq = F.pad(fq, (0, Wq - W, 0, Hq - H))
        nq = F.pad(norms, (0, Wq - W, 0, Hq - H))
        # candidates [f_j, |f_j|^2], grown by R on every side; outside the image |f_j|^2 is a huge sentinel
        # (finite, so that the matrix product never meets inf * 0)
        fc = torch.cat([f, norms[:, None]], dim=1)
        fc = F.pad(fc, (R, R + Wq - W, R, R + Hq - H))
        fc[:, C] = F.pad(norms, (R, R + Wq - W, R, R + Hq - H), value=_FAR)
        regions = fc.unfold(2, Ly, Ty).unfold(3, Lx, Tx)  # (B, C + 1, nTy, nTx, Ly, Lx), a view
        queries = fq.view(B, C + 1, nTy, Ty, nTx, Tx)
        nqueries = nq.view(B, nTy, Ty, nTx, Tx)

        a = torch.arange(Ty, device=device).view(Ty, 1, 1)  # query row within its tile
        b = torch.arange(Tx, device=device).view(1, Tx, 1)  # query column within its tile
        e = min(exclude_radius, R)
        if g > 1:
            # group (p, j): window rows p g .. p g + g - 1 of window column j; its members' window-flat offsets
            G = S // g
            member = torch.arange(g, device=device) * S

        out_idx = torch.empty(B, Hq, Wq, k, dtype=torch.int64, device=device)
        out_dist = torch.empty(B, Hq, Wq, k, dtype=dtype, device=device)

        per_tile = Ty * Tx * (L + S * S)  # the dot products and the windows' copy, alive together
        tiles_per_batch = max(1, min(nTx, max_elements // per_tile))
        rows = rows_per_chunk if rows_per_chunk else max(1, min(S, max_elements // (tiles_per_batch * Ty * Tx * S)))
        for bi in range(B):
            for ty in range(nTy):
                for tx0 in range(0, nTx, tiles_per_batch):
                    tx1 = min(nTx, tx0 + tiles_per_batch)
                    n = tx1 - tx0
                    q = queries[bi, :, ty, :, tx0:tx1, :].permute(2, 1, 3, 0).reshape(n, Ty * Tx, C + 1)
                    reg = regions[bi, :, ty, tx0:tx1].permute(1, 0, 2, 3).reshape(n, C + 1, L)
                    scores = torch.bmm(q, reg)  # (n, Ty*Tx, Ly*Lx): |f_j|^2 - 2 f_i.f_j
                    # the window of every query, copied out of the region block: element (t, a, b, i, j) is region
                    # pixel (a + i, b + j) for query (a, b) of tile t, the candidate at offset (i - R, j - R); in a
                    # contiguous copy the reductions and gathers below run several times faster than on the view
                    st = scores.stride()
                    window = scores.as_strided((n, Ty, Tx, S, S), (st[0], Tx * L + Lx, L + 1, Lx, 1))
                    # contiguous: with one query row per tile (Ty = 1) reshape can return the overlapping view itself
                    window = window.reshape(n, Ty * Tx, S, S).contiguous()
                    window[:, :, R - e:R + e + 1, R - e:R + e + 1] = _FAR  # the excluded centre block
                    window = window.view(n, Ty * Tx, S * S)
                    if g > 1:
                        minima = window.view(n, Ty * Tx, G, g, S).amin(3)
                        chosen = torch.topk(minima.view(n, Ty * Tx, G * S), k, dim=2, largest=False,
                                            sorted=False).indices  # (n, Ty*Tx, k): groups p * S + j
                        members = ((chosen // S) * (g * S) + chosen % S)[..., None] + member  # offsets i * S + j
                        members = members.view(n, Ty * Tx, k * g)
                        best_d, pick = torch.topk(torch.gather(window, 2, members), k, dim=2, largest=False,
                                                  sorted=True)
                        best_o = torch.gather(members, 2, pick)
                    else:
                        best_d = best_o = None
                        for i0 in range(0, S, rows):  # chunks of offsets: rows i0 .. i1-1 of the window
                            i1 = min(S, i0 + rows)
                            d = window[:, :, i0 * S:i1 * S]
                            o = torch.arange(i0 * S, i1 * S, device=device).expand_as(d)
                            if best_d is not None:
                                d = torch.cat([best_d, d], dim=2)
                                o = torch.cat([best_o, o], dim=2)
                            best_d, pick = torch.topk(d, min(k, d.shape[2]), dim=2, largest=False, sorted=False)
                            best_o = torch.gather(o, 2, pick)
                        best_d, order = torch.sort(best_d, dim=2)
                        best_o = torch.gather(best_o, 2, order)
                    best_o = best_o.view(n, Ty, Tx, k)
                    missing = best_d.view(n, Ty, Tx, k) >= _FAR / 2
                    nqt = nqueries[bi, ty, :, tx0:tx1, :].permute(1, 0, 2)[..., None]  # (n, Ty, Tx, 1)
                    dist = (best_d.view(n, Ty, Tx, k) + nqt).clamp_min_(0).masked_fill_(missing, float("inf"))
                    tile_x0 = torch.arange(tx0, tx1, device=device).view(n, 1, 1, 1) * Tx
                    y = ty * Ty + a + best_o // S - R
                    x = tile_x0 + b + best_o % S - R
                    own = (ty * Ty + a) * W + tile_x0 + b  # missing neighbours point at the pixel itself
                    flat = torch.where(missing, own.expand_as(best_o), y * W + x)
                    ys, xs = slice(ty * Ty, (ty + 1) * Ty), slice(tx0 * Tx, tx1 * Tx)
                    out_idx[bi, ys, xs] = flat.permute(1, 0, 2, 3).reshape(Ty, n * Tx, k)
                    out_dist[bi, ys, xs] = dist.permute(1, 0, 2, 3).reshape(Ty, n * Tx, k)
    return out_idx[:, :H, :W].contiguous(), out_dist[:, :H, :W].contiguous()
