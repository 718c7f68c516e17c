"""The tensor axis's collectives: sums of row-parallel outputs and gathers of logits.

:class:`GroupCollectives` is what a tensor-parallel model calls
(``longquest.engine.model.TensorParallel``): per layer and step, one all-reduce after
o_proj and one after down_proj (each ``[num_tokens, hidden_size]`` in the model dtype),
one all-reduce of the vocabulary-parallel embedding per forward, and one all-gather of
the logits' vocabulary slices where logits are computed. Over NCCL (gloo on the CPU),
or over peer memory (:class:`~longquest.parallel.peer.PeerCollectives`) as the
sequence axis's collectives: payloads up to ``KernelTuning.peer_max_payload_bytes``
(decode's), except one the peer buffer cannot take while a CUDA graph is captured;
prefill chunks' sums go over NCCL.

The same class, over the replica's whole group, sums the parts of an MLP that decode
splits over the sequence ranks of a tensor-parallel model (:class:`SplitMlp`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longquest.kernels import DEFAULT_TUNING, SUM_DTYPES, KernelTuning
from longquest.parallel.collectives import all_gather_into_tensor
from longquest.parallel.peer import PeerCollectives


class GroupCollectives:
    """All-reduce (sum) and all-gather over one explicitly passed process group.

    group: the process group; rank, world_size: this rank's index in it and its size.
    peer: where set, payloads up to ``tuning.peer_max_payload_bytes`` go over peer memory
        instead of the group's backend.
    Every rank of the group must make the same calls, in the same order, with the same
    sizes.
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        peer: PeerCollectives | None = None,
        tuning: KernelTuning = DEFAULT_TUNING,
    ) -> None:
        if world_size != dist.get_world_size(group) or rank != dist.get_rank(group):
            raise ValueError(
                f"rank {rank} of {world_size} does not match this process's place in the "
                f"group (rank {dist.get_rank(group)} of {dist.get_world_size(group)})"
            )
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.peer = peer
        self.max_peer_bytes = tuning.peer_max_payload_bytes

    def _peer_for(self, nbytes: int) -> PeerCollectives | None:
        """The peer collectives when a payload of ``nbytes`` goes over them, else None."""
        peer = self.peer
        if peer is None or nbytes > self.max_peer_bytes or not peer.fits(nbytes):
            return None
        return peer

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (any shape) over the group in place; returns it (identical on
        every rank)."""
        nbytes = tensor.numel() * tensor.element_size()
        peer = self._peer_for(nbytes) if tensor.dtype in SUM_DTYPES else None
        if peer is not None:
            return peer.all_reduce(tensor)
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[world_size, *tensor.shape]``: every rank's ``tensor``, in rank order."""
        peer = self._peer_for(tensor.numel() * tensor.element_size())
        if peer is not None:
            return peer.all_gather(tensor)
        flat = tensor.contiguous().view(-1)
        result = flat.new_empty(self.world_size * flat.numel())
        all_gather_into_tensor(result, flat, group=self.group)
        return result.view(self.world_size, *tensor.shape)


@dataclass(frozen=True, kw_only=True)
class SplitMlp:
    """``longquest.engine.model.MlpSplit`` of a tensor-parallel model: sequence rank
    ``rank`` of ``world_size`` multiplies by its slice of its tensor rank's MLP shard, and
    ``everyone`` (the replica's whole group) sums every rank's part in one all-reduce,
    in place of the tensor group's sum."""

    rank: int
    world_size: int
    everyone: GroupCollectives

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.everyone.all_reduce(tensor)
