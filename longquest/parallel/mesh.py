"""The two axes of one replica's ranks: T tensor ranks x S sequence ranks.

Rank ``r`` of the replica's group (``world_size = T * S``) is tensor rank ``t = r % T``
and sequence rank ``s = r // T``:

- its **tensor group** is the T consecutive ranks ``s*T .. s*T + T-1``: they hold the
  T shards of the weights and run the same tokens (row-parallel sums, logit gathers);
- its **sequence group** is the S ranks ``t, t + T, t + 2T, ...`` (strided): they hold
  the same weights shard and KV heads and split every sequence's pages of those heads
  (global top-k, log-sum-exp merge, context-parallel prefill), exactly as one
  sequence-parallel group of ``S`` ranks does at T = 1.

At T = 1 the sequence group is the replica's group itself and there is no tensor group;
at S = 1 the tensor group is the replica's group. Consecutive tensor ranks keep the
busiest traffic (two all-reduces per layer) between neighbouring GPUs on hosts that
are not fully connected. The groups are made once, by :func:`build_mesh`, and passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


def mesh_position(rank: int, *, tensor_parallel_size: int) -> tuple[int, int]:
    """``(tensor rank, sequence rank)`` of replica rank ``rank``."""
    return rank % tensor_parallel_size, rank // tensor_parallel_size


@dataclass(frozen=True, kw_only=True)
class RankMesh:
    """One rank's place in the T x S layout, and the process groups of both axes.

    world: the replica's group (all ``T * S`` ranks); ``rank`` is this one's index in it.
    tensor: the tensor group (None at T = 1); this rank is its ``tensor_rank``.
    sequence: the sequence group; this rank is its ``sequence_rank``.
    """

    world: dist.ProcessGroup
    tensor: dist.ProcessGroup | None
    sequence: dist.ProcessGroup
    rank: int
    tensor_rank: int
    sequence_rank: int
    tensor_parallel_size: int
    sequence_parallel_size: int


def build_mesh(*, group: dist.ProcessGroup, rank: int, tensor_parallel_size: int) -> RankMesh:
    """The tensor and sequence groups of ``group``'s ranks. Collective: every rank of
    ``group`` calls it, with the same ``tensor_parallel_size``.

    group: the replica's process group; rank: this process's index in it.
    """
    size, world_size = tensor_parallel_size, dist.get_world_size(group)
    if size < 1 or world_size % size:
        raise ValueError(f"tensor_parallel_size={size} must divide the group's {world_size} ranks")
    sequences = world_size // size
    tensor_rank, sequence_rank = mesh_position(rank, tensor_parallel_size=size)
    members = [dist.get_global_rank(group, r) for r in range(world_size)]
    tensor = sequence = group
    if size == 1:
        tensor = None
    elif sequences > 1:
        # Every rank creates every group, in the same order (new_group is collective).
        tensor_groups = [
            dist.new_group(members[s * size : (s + 1) * size]) for s in range(sequences)
        ]
        sequence_groups = [dist.new_group(members[t::size]) for t in range(size)]
        tensor, sequence = tensor_groups[sequence_rank], sequence_groups[tensor_rank]
    else:
        sequence = [dist.new_group([m]) for m in members][rank]
    return RankMesh(
        world=group,
        tensor=tensor,
        sequence=sequence,
        rank=rank,
        tensor_rank=tensor_rank,
        sequence_rank=sequence_rank,
        tensor_parallel_size=size,
        sequence_parallel_size=sequences,
    )
