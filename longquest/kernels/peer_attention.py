"""The peer exchange kernel's two attention modes (:mod:`longquest.kernels.peer`).

- :func:`peer_merge`: every rank's partial attention state ``(out, lse)`` exchanged and
  merged on arrival, so the states never make a round trip through memory and no merge
  kernel follows.
- :func:`peer_gather_candidates`: every rank's local top-k candidates, packed as
  ``longquest.kernels.global_topk.pack_candidates`` packs them while they are pushed, so
  no pack kernel comes before.

Both share the buffer, the counters and the protocol of ``peer_exchange``, and take its
arguments for them.
"""

from __future__ import annotations

import torch
import triton

from longquest.kernels._checks import check_tensor
from longquest.kernels.peer import MAX_PROGRAMS, check_exchange, launch_exchange, word_chunks
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning


def peer_merge(
    *,
    partial: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bases: torch.Tensor,
    counters: torch.Tensor,
    rank: int,
    slot_bytes: int,
    programs: int | None = None,
    phases: str = "both",
    tuning: KernelTuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's partial attention state, exchanged and merged in the same kernel.

    partial: ``[num_seqs, num_qo_heads, head_dim + 1]`` fp32, contiguous — this rank's
        partial output (first ``head_dim`` columns) and its lse (last column, natural
        log, ``-inf``: no tokens here); ``head_dim`` a power of two.
    out: ``[num_seqs, num_qo_heads, head_dim]`` contiguous, any float dtype (rounded once).
    lse: ``[num_seqs, num_qo_heads]`` fp32 contiguous: the merged lse.
    The other arguments (``tuning``: ``peer_*`` fields) as for :func:`peer_exchange` (the
    two share the counters and the buffer). The result is that of
    ``merge_attention_states`` over the ranks' states.
    Returns ``(out, lse)``.
    """
    check_tensor("partial", partial, ndim=3, dtypes=(torch.float32,))
    num_seqs, num_heads, width = partial.shape
    head_dim = width - 1
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    check_tensor("out", out, ndim=3, device=partial.device)
    check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=partial.device)
    if tuple(out.shape) != (num_seqs, num_heads, head_dim) or lse.shape != out.shape[:2]:
        raise ValueError(
            f"out must be {(num_seqs, num_heads, head_dim)} and lse {(num_seqs, num_heads)}, "
            f"got {tuple(out.shape)} and {tuple(lse.shape)}"
        )
    if not (partial.is_contiguous() and out.is_contiguous() and lse.is_contiguous()):
        raise ValueError("partial, out and lse must be contiguous")
    check_exchange(device=partial.device, bases=bases, counters=counters, rank=rank,
                    phases=phases, slot_bytes=slot_bytes, nbytes=partial.numel() * 4)  # fmt: skip
    if not out.dtype.is_floating_point:
        raise ValueError(f"out must be a float dtype, got {out.dtype}")
    rows = num_seqs * num_heads
    if rows == 0:  # nothing to move: every rank skips the call alike
        return out, lse
    if programs is None:
        programs = triton.cdiv(partial.numel() * 4, tuning.peer_min_chunk_bytes)
    programs = max(1, min(MAX_PROGRAMS, programs, rows))
    per_program = triton.cdiv(rows, programs)
    launch_exchange(partial, out, lse, bases=bases, counters=counters, rank=rank,
                    slot_bytes=slot_bytes, programs=programs, chunk=per_program * width,
                    phases=phases, mode=2, tuning=tuning, head_dim=head_dim,
                    block_rows=min(tuning.peer_merge_rows,
                                   triton.next_power_of_2(per_program)))  # fmt: skip
    return out, lse


def peer_gather_candidates(
    *,
    top_scores: torch.Tensor,
    local_indices: torch.Tensor,
    global_pages: torch.Tensor,
    bases: torch.Tensor,
    counters: torch.Tensor,
    rank: int,
    slot_bytes: int,
    programs: int | None = None,
    phases: str = "both",
    tuning: KernelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """Every rank's local top-k candidates, packed on the way and gathered in one kernel.

    top_scores: ``[num_seqs, num_kv_heads, top_k]`` fp32; local_indices: the same shape,
        int32 (``-1`` padding); global_pages: ``[num_seqs, max_local_pages]`` int32 — as for
        ``longquest.kernels.global_topk.pack_candidates``, whose packing this applies.
    The other arguments (``tuning``: ``peer_*`` fields) as for :func:`peer_exchange`.
    Returns ``[world_size, num_seqs, num_kv_heads, top_k, 2]`` int32: every rank's
    ``pack_candidates`` result, by rank.
    """
    check_tensor("top_scores", top_scores, ndim=3, dtypes=(torch.float32,))
    device = top_scores.device
    check_tensor("local_indices", local_indices, ndim=3, dtypes=(torch.int32,), device=device)
    check_tensor("global_pages", global_pages, ndim=2, dtypes=(torch.int32,), device=device)
    if local_indices.shape != top_scores.shape or global_pages.shape[0] != top_scores.shape[0]:
        raise ValueError(
            f"local_indices must be shaped as top_scores {tuple(top_scores.shape)} and "
            f"global_pages have {top_scores.shape[0]} rows; got {tuple(local_indices.shape)} "
            f"and {tuple(global_pages.shape)}"
        )
    nbytes = top_scores.numel() * 8
    check_exchange(device=device, bases=bases, counters=counters, rank=rank, phases=phases,
                    slot_bytes=slot_bytes, nbytes=nbytes)  # fmt: skip
    scores, indices = top_scores.contiguous(), local_indices.contiguous()
    table = global_pages if global_pages.stride(1) == 1 else global_pages.contiguous()
    if table.shape[1] == 0:  # no local pages: every index is padding
        table = torch.full((table.shape[0], 1), -1, dtype=torch.int32, device=device)
    out = torch.empty(bases.numel(), *scores.shape, 2, dtype=torch.int32, device=device)
    if nbytes == 0:  # nothing to move: every rank skips the call alike
        return out
    programs, chunk = word_chunks(nbytes, programs, tuning)
    launch_exchange(scores, out, counters, bases=bases, counters=counters, rank=rank,
                    slot_bytes=slot_bytes, programs=programs, chunk=chunk, phases=phases,
                    mode=3, tuning=tuning, words=nbytes // 4, index=indices, table=table,
                    row_len=scores.shape[1] * scores.shape[2])  # fmt: skip
    return out
