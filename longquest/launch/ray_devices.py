"""Which GPUs each Ray actor of one sequence-parallel group sees.

Ray starts a GPU actor with ``CUDA_VISIBLE_DEVICES`` set to its own GPU alone. Decode's
peer-memory collectives (:mod:`longquest.parallel.peer`) map the other ranks' buffers
into each process, which needs the other ranks' GPUs visible there, as they are to
torchrun's processes. So every actor is shown the GPUs of all the group's actors on its
node, in rank order, and picks its own among them by index. Peers on other nodes cannot
be mapped: an actor then sees fewer GPUs than the group has ranks, and
:meth:`~longquest.parallel.peer.PeerCollectives.create` keeps NCCL for the whole group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ActorDevices:
    """visible_devices: the actor's ``CUDA_VISIBLE_DEVICES`` (Ray's GPU ids, comma-separated).
    device_index: its own GPU among them (``cuda:<device_index>``)."""

    visible_devices: str
    device_index: int


def group_devices(*, node_ids: list[str], gpu_ids: list[list[str]]) -> list[ActorDevices]:
    """The devices each actor of a group should see, by rank.

    node_ids: each actor's Ray node id. gpu_ids: each actor's ``ray.get_gpu_ids()``
        (one GPU each). Raises ValueError when the lists disagree in length or an actor
        holds other than one GPU.
    """
    if len(node_ids) != len(gpu_ids):
        raise ValueError(f"{len(node_ids)} node ids for {len(gpu_ids)} actors")
    for rank, ids in enumerate(gpu_ids):
        if len(ids) != 1:
            raise ValueError(f"actor of rank {rank} holds GPUs {ids}; each rank needs one")
    on_node: dict[str, list[str]] = {}
    for node, (gpu,) in zip(node_ids, gpu_ids):
        shown = on_node.setdefault(node, [])
        if str(gpu) not in shown:  # fractional GPUs: ranks that share one see it once
            shown.append(str(gpu))
    return [
        ActorDevices(
            visible_devices=",".join(on_node[node]), device_index=on_node[node].index(str(gpu))
        )
        for node, (gpu,) in zip(node_ids, gpu_ids)
    ]
