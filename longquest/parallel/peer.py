"""Decode's collectives over peer memory (:func:`longquest.kernels.peer.peer_exchange`).

:class:`PeerCollectives` maps one buffer per rank into every rank's address space with
torch symmetric memory and runs the all-gathers and all-reduces of a decode step as one
Triton kernel each, in place of NCCL's (see the kernel module for the protocol and
``benchmarks/collectives.py`` for the times).

It needs CUDA devices that can map each other's memory (NVLink or PCIe peer access) and
the NCCL backend. :meth:`PeerCollectives.create` tries it on every rank and returns None on
every rank unless all of them succeeded, so the ranks never disagree about which path a
collective takes. A payload larger than the buffer grows it (all ranks grow together: they
make the same calls with the same sizes), except while a CUDA graph is being captured, when
:meth:`fits` says no and the caller uses NCCL for that call.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from longquest.kernels import (
    DEFAULT_TUNING,
    PEER_MAX_PROGRAMS,
    KernelTuning,
    buffer_bytes,
    peer_exchange,
    peer_gather_candidates,
    peer_merge,
)

_FIRST_SLOT_BYTES = 1 << 20


class PeerCollectives:
    """All-gather, all-reduce, attention merge and top-k candidate gather over one process
    group's peer-mapped buffers.

    Build it with :meth:`create`. Every rank must make the same calls, in the same order,
    with the same sizes (as with NCCL).
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        device: torch.device | str,
        tuning: KernelTuning = DEFAULT_TUNING,
    ) -> None:
        self.group = group
        self.tuning = tuning
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.slot_bytes = 0
        # Buffers outgrown are kept: CUDA graphs captured earlier still use them.
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._grow(_FIRST_SLOT_BYTES)

    @classmethod
    def create(
        cls,
        *,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        device: torch.device | str,
        tuning: KernelTuning = DEFAULT_TUNING,
    ) -> PeerCollectives | None:
        """A PeerCollectives on every rank of ``group``, or None on every rank (a single
        rank, not CUDA, not NCCL, a process that sees fewer GPUs than the group has ranks,
        or a rank that could not map the others' memory). Collective on CUDA and NCCL:
        every rank of the group must call it."""
        device = torch.device(device)
        if world_size < 2 or device.type != "cuda" or dist.get_backend(group) != "nccl":
            return None
        made, error = None, None
        # Mapping a peer's memory needs its GPU visible here: a process that sees only its
        # own GPU keeps NCCL, which finds its own way between them.
        if torch.cuda.device_count() >= world_size:
            try:
                made = cls(
                    group=group, rank=rank, world_size=world_size, device=device, tuning=tuning
                )
            except Exception as caught:  # noqa: BLE001 - any failure means: NCCL everywhere
                error = caught
        everyone = torch.tensor([int(made is not None)], device=device)
        dist.all_reduce(everyone, op=dist.ReduceOp.MIN, group=group)
        if not int(everyone):
            if error is not None:
                warnings.warn(
                    f"rank {rank}: decode collectives use NCCL, peer memory failed: "
                    f"{type(error).__name__}: {error}",
                    stacklevel=2,
                )
            return None
        return made

    def fits(self, nbytes: int) -> bool:
        """Whether a payload of ``nbytes`` can go over peer memory now. A larger one grows
        the buffer when no CUDA graph is being captured: collective then (every rank
        asks with the same size); if any rank cannot grow it, it is False everywhere."""
        if nbytes <= self.slot_bytes:
            return True
        if torch.cuda.is_current_stream_capturing():
            return False
        try:
            self._grow(nbytes)
        except RuntimeError as error:
            warnings.warn(f"this payload goes over NCCL: {error}", stacklevel=2)
            return False
        return True

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[world_size, *tensor.shape]``: every rank's ``tensor`` (any dtype), by rank."""
        src = tensor.contiguous()
        if _whole_words(src):
            return self._run(src, src.new_empty(self.world_size, *src.shape), reduce=False)
        padded = _padded(src)
        out = self._run(padded, padded.new_empty(self.world_size, padded.numel()), reduce=False)
        return out[:, : src.numel()].reshape(self.world_size, *src.shape)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (fp32, fp16 or bf16) over the ranks in place, in fp32 in rank
        order (the same bits on every rank); returns it."""
        if tensor.is_contiguous() and _whole_words(tensor):
            return self._run(tensor, tensor, reduce=True)
        padded = _padded(tensor.contiguous())
        self._run(padded, padded, reduce=True)
        tensor.copy_(padded[: tensor.numel()].view(tensor.shape))
        return tensor

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(bases, counters, slot_bytes)`` of the current buffer, for calling the kernels
        of :mod:`longquest.kernels.peer` directly (benchmarks)."""
        _, bases, counters = self._kept[-1]
        return bases, counters, self.slot_bytes

    def _buffers_for(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """:meth:`buffers` once a payload of ``nbytes`` fits them (the caller checked
        :meth:`fits`; during a capture nothing can grow)."""
        if not self.fits(nbytes):
            raise ValueError("payload larger than the peer buffer during capture; check fits()")
        return self.buffers()

    def merge(
        self, partial: torch.Tensor, *, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's partial attention ``partial`` ``[num_seqs, num_qo_heads, head_dim + 1]``
        (fp32, out | lse) merged over the ranks in the same kernel that exchanges them
        (:func:`~longquest.kernels.peer.peer_merge`): ``(out, lse)``, ``out`` in ``dtype``."""
        bases, counters, slot_bytes = self._buffers_for(partial.numel() * 4)
        num_seqs, num_heads, width = partial.shape
        out = partial.new_empty(num_seqs, num_heads, width - 1, dtype=dtype)
        lse = partial.new_empty(num_seqs, num_heads)
        return peer_merge(
            partial=partial.contiguous(), out=out, lse=lse, bases=bases, counters=counters,
            rank=self.rank, slot_bytes=slot_bytes, tuning=self.tuning,
        )  # fmt: skip

    def gather_candidates(
        self, *, top_scores: torch.Tensor, local_indices: torch.Tensor, global_pages: torch.Tensor
    ) -> torch.Tensor:
        """Every rank's ``pack_candidates`` result ``[world_size, num_seqs, num_kv_heads,
        top_k, 2]`` int32, packed and gathered in one kernel
        (:func:`~longquest.kernels.peer.peer_gather_candidates`)."""
        bases, counters, slot_bytes = self._buffers_for(top_scores.numel() * 8)
        return peer_gather_candidates(
            top_scores=top_scores, local_indices=local_indices, global_pages=global_pages,
            bases=bases, counters=counters, rank=self.rank, slot_bytes=slot_bytes,
            tuning=self.tuning,
        )  # fmt: skip

    def _run(self, src: torch.Tensor, out: torch.Tensor, *, reduce: bool) -> torch.Tensor:
        bases, counters, slot_bytes = self._buffers_for(src.numel() * src.element_size())
        return peer_exchange(
            src=src, out=out, bases=bases, counters=counters, rank=self.rank,
            slot_bytes=slot_bytes, reduce=reduce, tuning=self.tuning,
        )  # fmt: skip

    def _grow(self, nbytes: int) -> None:
        """A buffer for payloads of ``nbytes``. Collective; raises on every rank alike if any
        rank cannot allocate it (so that none is left waiting in the rendezvous)."""
        import torch.distributed._symmetric_memory as symm

        slot_bytes = 1 << max(nbytes - 1, 1).bit_length()
        size = buffer_bytes(world_size=self.world_size, slot_bytes=slot_bytes)
        buffer, error = None, None
        try:
            with warnings.catch_warnings():  # newer torch registers the group on demand
                warnings.simplefilter("ignore", FutureWarning)
                if hasattr(symm, "enable_symm_mem_for_group"):
                    symm.enable_symm_mem_for_group(self.group.group_name)
            buffer = symm.empty(size, dtype=torch.uint8, device=self.device)
            buffer.zero_()
        except Exception as caught:  # noqa: BLE001 - reported on every rank below
            error = caught
        everyone = torch.tensor([int(buffer is not None)], device=self.device)
        dist.all_reduce(everyone, op=dist.ReduceOp.MIN, group=self.group)
        if not int(everyone):
            raise RuntimeError(
                f"a rank could not allocate {size} bytes of peer memory"
                + (f" (this one: {type(error).__name__}: {error})" if error else "")
            )
        handle = symm.rendezvous(buffer, self.group.group_name)
        bases = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=self.device)
        counters = torch.zeros(PEER_MAX_PROGRAMS, dtype=torch.int32, device=self.device)
        # No rank may push into a buffer before its owner has zeroed it.
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        torch.cuda.synchronize(self.device)
        self._kept.append((buffer, bases, counters))
        self.slot_bytes = slot_bytes


def _whole_words(tensor: torch.Tensor) -> bool:
    """Whole 4-byte words at a 4-byte aligned address: the kernel's view of a payload."""
    return tensor.numel() * tensor.element_size() % 4 == 0 and tensor.data_ptr() % 4 == 0


def _padded(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` flattened and zero-padded to whole 4-byte words (a copy)."""
    flat = tensor.reshape(-1)
    pad = -flat.numel() * flat.element_size() % 4 // flat.element_size()
    return torch.cat((flat, flat.new_zeros(pad)))
