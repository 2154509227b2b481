"""Which rank denoises which series: largest first, each to the rank with the least work so far (the greedy
"longest processing time first" rule, within 4/3 of the best possible makespan), work measured in voxels.

Deterministic: every rank computes the whole assignment from the same list and keeps its own part, so no
communication is needed and no two ranks ever take the same series (each series goes to exactly one rank).
"""
from __future__ import annotations

import heapq
from typing import Sequence, TypeVar

__all__ = ["assign_ranks", "shard_items"]

T = TypeVar("T")


def assign_ranks(sizes: Sequence[int], world: int) -> list[int]:
    """The rank (0 .. world-1) of each of ``sizes`` (voxels; ties broken by position, then by lowest rank)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    order = sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i))
    loads = [(0, rank) for rank in range(world)]  # (voxels so far, rank): a heap, least loaded first
    ranks = [0] * len(sizes)
    for i in order:
        load, rank = heapq.heappop(loads)
        ranks[i] = rank
        # a series of unknown size (0) still counts as one voxel, so such series spread over the ranks too
        heapq.heappush(loads, (load + max(int(sizes[i]), 1), rank))
    return ranks


def shard_items(items: Sequence[T], rank: int, world: int, size=lambda item: item.voxels) -> list[T]:
    """The items of ``rank`` among ``world`` ranks, largest first (``size(item)``: voxels)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    sizes = [size(item) for item in items]
    ranks = assign_ranks(sizes, world)
    mine = [i for i in range(len(items)) if ranks[i] == rank]
    return [items[i] for i in sorted(mine, key=lambda i: (-int(sizes[i]), i))]
