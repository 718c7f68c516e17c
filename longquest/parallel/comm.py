"""The cross-rank steps of sparse decode attention under sequence parallelism.

Every rank holds some whole KV pages of every sequence (see
:mod:`longquest.parallel.ownership`) and computes, per layer, a local top-k of
its own pages and a partial attention over the pages it keeps. This module
joins those local results into the single-device answer:

- :meth:`SequenceParallelComm.select_global` — one all-gather of every rank's
  top-k candidates (score bits and global page id packed in one int32 tensor,
  :func:`longquest.kernels.global_topk.pack_candidates`); every rank then ranks the
  same ``world_size * top_k`` candidates the same way and keeps those of its own
  pages that made the global cut (:func:`~longquest.kernels.global_topk.keep_global_top_k`).
- :meth:`SequenceParallelComm.merge` — one all-gather of every rank's partial
  ``(out, lse)`` (packed in one fp32 tensor), then the exact log-sum-exp merge.

- :meth:`SequenceParallelComm.all_reduce` — the sum of every rank's partial MLP
  output when decode splits the MLP over the ranks (``longquest.engine.model.MlpSplit``:
  each rank reads only its share of the MLP weights).

Collectives per decode step and layer: exactly **2** in a sparse layer
(``select_global`` then ``merge``) and exactly **1** in a dense layer (``merge``
only), plus **1** (``all_reduce``) when the MLP is split. Every rank of the group
must make the same calls in the same order. They go through NCCL, or, given a
:class:`~longquest.parallel.peer.PeerCollectives`, through one Triton kernel each
that writes straight into the peers' memory (times: ``benchmarks/collectives.py``).

The class has the methods of the engine's ``AttentionComm`` protocol
(``select_global``, ``partial_buffers``, ``merge``; ``longquest.engine.attention``), so
the attention layer takes it in place of the single-device ``LocalComm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longquest.kernels import (
    DEFAULT_TUNING,
    SUM_DTYPES,
    KernelTuning,
    check_dim,
    check_tensor,
    keep_global_top_k,
    merge_attention_states,
    pack_candidates,
)
from longquest.parallel.collectives import all_gather_into_tensor
from longquest.parallel.peer import PeerCollectives


class SequenceParallelComm:
    """Global top-k and log-sum-exp merge over the ranks of one process group.

    group: the process group of the ranks that share the sequences' pages
        (required: it is never looked up globally).
    rank, world_size: this rank's index in ``group`` and the group's size.
    impl: kernel implementation for the merge (``"triton"``, ``"torch"`` or None
        for Triton on CUDA and PyTorch elsewhere).
    peer: where set, the all-gathers and all-reduces run over peer memory
        (:class:`~longquest.parallel.peer.PeerCollectives`, built by its ``create`` on
        every rank) instead of NCCL, except a payload it cannot take during a CUDA
        graph's capture.
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        impl: str | None = None,
        peer: PeerCollectives | None = None,
        tuning: KernelTuning = DEFAULT_TUNING,
    ) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(
                f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}; "
                "pass the group explicitly (e.g. torch.distributed.group.WORLD)"
            )
        if world_size != dist.get_world_size(group):
            raise ValueError(
                f"world_size={world_size} does not match the group's size "
                f"{dist.get_world_size(group)}"
            )
        if rank != dist.get_rank(group):
            raise ValueError(
                f"rank={rank} does not match this process's rank {dist.get_rank(group)} "
                "in the group"
            )
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.impl = impl
        self.peer = peer
        self.tuning = tuning

    def select_global(
        self,
        *,
        top_scores: torch.Tensor,
        local_indices: torch.Tensor,
        global_pages: torch.Tensor,
        top_k: int,
    ) -> torch.Tensor:
        """This rank's share of the global top ``top_k`` pages of every (sequence, KV head).

        top_scores: ``[num_seqs, num_kv_heads, top_k]`` fp32 — the local top-k's
            scores (``+inf`` for the pinned newest page, ``-inf`` padding). Only
            the rank owning a sequence's newest page may pin it.
        local_indices: ``[num_seqs, num_kv_heads, top_k]`` int32 — their local
            logical page indices, ``-1`` padding.
        global_pages: ``[num_seqs, max_local_pages]`` int32 — global page index of
            each local page (``-1`` past the rank's pages).
        Returns ``[num_seqs, num_kv_heads, top_k]`` int32 local logical indices of
        this rank's pages among the global top ``top_k`` (ranked by score, ties to
        the lower global page index), ascending, padded with ``-1``. Over all
        ranks these are exactly the pages a single-device ``select_pages`` over
        every page would pick. One collective.
        """
        check_tensor("top_scores", top_scores, ndim=3, dtypes=(torch.float32,))
        device = top_scores.device
        check_tensor("local_indices", local_indices, ndim=3, dtypes=(torch.int32,), device=device)
        check_tensor("global_pages", global_pages, ndim=2, dtypes=(torch.int32,), device=device)
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        num_seqs, num_kv_heads, _ = top_scores.shape
        check_dim("top_scores", top_scores, 2, top_k, "top_k")
        for dim, size in enumerate(top_scores.shape):
            check_dim("local_indices", local_indices, dim, size, "as top_scores")
        check_dim("global_pages", global_pages, 0, num_seqs, "num_seqs")

        peer = self.peer
        if peer is not None and peer.fits(top_scores.numel() * 8):  # packed on the way
            everyone = peer.gather_candidates(
                top_scores=top_scores, local_indices=local_indices, global_pages=global_pages
            )
        else:
            packed = pack_candidates(
                top_scores=top_scores,
                local_indices=local_indices,
                global_pages=global_pages,
                impl=self.impl,
            )
            everyone = self._gather(packed)  # [world_size, num_seqs, num_kv_heads, top_k, 2]
        return keep_global_top_k(
            gathered=everyone,
            local_indices=local_indices,
            rank=self.rank,
            impl=self.impl,
            tuning=self.tuning,
        )

    def partial_buffers(
        self, *, num_seqs: int, num_qo_heads: int, head_dim: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where this rank's attention should write its partial ``(out, lse)``.

        Two fp32 views of one new ``[num_seqs, num_qo_heads, head_dim + 1]`` buffer (out
        in the first ``head_dim`` columns, lse in the last): the layout :meth:`merge`
        all-gathers, so it sends them as they are, without a cast and a copy.
        """
        packed = torch.empty(num_seqs, num_qo_heads, head_dim + 1, device=device)
        return packed[..., :head_dim], packed[..., head_dim]

    def merge(
        self, *, out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Exact attention over the union of every rank's tokens.

        out: ``[num_seqs, num_qo_heads, head_dim]`` — this rank's partial output (best
            written into :meth:`partial_buffers`).
        lse: ``[num_seqs, num_qo_heads]`` fp32 natural log; ``-inf`` where this
            rank attended to nothing (its ``out`` is then ignored).
        dtype: of the result (default ``out``'s); the merge runs in fp32 and rounds once.
        Returns ``[num_seqs, num_qo_heads, head_dim]``, identical on every rank; zeros
        where no rank had tokens. One collective.
        """
        merged, _ = self.merge_with_lse(out=out, lse=lse, dtype=dtype)
        return merged

    def merge_with_lse(
        self, *, out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`merge`, also returning the merged ``lse`` ``[num_seqs, num_qo_heads]`` fp32.

        The merged lse is ``-inf`` where no rank had tokens. One collective.
        """
        check_tensor("out", out, ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
        check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=out.device)
        check_dim("lse", lse, 0, out.shape[0], "num_seqs")
        check_dim("lse", lse, 1, out.shape[1], "num_qo_heads")
        head_dim = out.shape[2]
        # fp32 carries the lse exactly and the partial outputs without rounding them twice.
        packed = _as_packed(out, lse)
        if packed is None:
            packed = torch.cat((out.float(), lse[..., None]), dim=-1)
        dtype = out.dtype if dtype is None else dtype
        peer = self.peer
        if peer is not None and head_dim & (head_dim - 1) == 0 and peer.fits(packed.numel() * 4):
            return peer.merge(packed, dtype=dtype)  # exchanged and merged in one kernel
        everyone = self._gather(packed)  # [world_size, num_seqs, num_qo_heads, head_dim + 1]
        return merge_attention_states(
            outputs=everyone[..., :head_dim], lses=everyone[..., head_dim], impl=self.impl,
            out_dtype=dtype,
        )  # fmt: skip

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (any shape and dtype) over the group, in place; returns it.

        Identical on every rank. One collective.
        """
        peer = self.peer
        if peer is not None and tensor.dtype in SUM_DTYPES:
            if peer.fits(tensor.numel() * tensor.element_size()):
                return peer.all_reduce(tensor)
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-gather ``tensor`` over the group into ``[world_size, *tensor.shape]``."""
        peer = self.peer
        if peer is not None and peer.fits(tensor.numel() * tensor.element_size()):
            return peer.all_gather(tensor)
        flat = tensor.contiguous().view(-1)
        result = torch.empty(self.world_size * flat.numel(), dtype=flat.dtype, device=flat.device)
        all_gather_into_tensor(result, flat, group=self.group)
        return result.view(self.world_size, *tensor.shape)


def _as_packed(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor | None:
    """The ``[num_seqs, num_qo_heads, head_dim + 1]`` fp32 buffer that ``out`` and ``lse``
    are the two parts of (as :meth:`SequenceParallelComm.partial_buffers` makes them), or
    None when they are not laid out so."""
    num_seqs, num_heads, head_dim = out.shape
    width = head_dim + 1
    laid_out = (
        out.dtype == torch.float32
        and out.stride() == (num_heads * width, width, 1)
        and lse.stride() == (num_heads * width, width)
        and lse.data_ptr() == out.data_ptr() + head_dim * out.element_size()
        and lse.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    )
    if not laid_out:
        return None
    return out.as_strided((num_seqs, num_heads, width), (num_heads * width, width, 1))
