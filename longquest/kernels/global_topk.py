"""The two local halves of the cross-rank top-k merge.

Sequence parallelism selects pages in three steps per layer: :func:`pack_candidates`
turns this rank's local top-k into ``(score bits, global page)`` int32 pairs (one
kernel; the peer-memory gather packs them on the way instead), one all-gather (in
longquest.parallel.comm) shares every rank's pairs, and :func:`keep_global_top_k` ranks
all of them and keeps this rank's pages among the global top ``top_k`` (two kernels: the
ranking spread over programs, then one program a row compacts the winners). Ranking:
higher score first, ties to the lower global page; a candidate's rank is the number of
candidates that beat it, so every rank computes the same cut without a sort. The PyTorch
path (``impl="torch"``) is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import check_dim, check_tensor, resolve_impl
from longquest.kernels.radix import int32_order_key
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning

_INT32_MAX = 2**31 - 1


@triton.jit
def _pack_kernel(
    scores_ptr, indices_ptr, global_ptr, out_ptr, top_k, num_kv_heads, stride_gs,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (sequence, KV head)
    seq = row // num_kv_heads
    offs = tl.arange(0, BLOCK_K)
    in_row = offs < top_k
    local = tl.load(indices_ptr + row * top_k + offs, mask=in_row, other=-1)
    valid = local >= 0
    page = tl.load(global_ptr + seq * stride_gs + tl.maximum(local, 0), mask=valid, other=-1)
    score = tl.load(scores_ptr + row * top_k + offs, mask=in_row, other=0.0)
    bits = score.to(tl.int32, bitcast=True)
    tl.store(out_ptr + (row * top_k + offs) * 2, bits, mask=in_row)
    tl.store(out_ptr + (row * top_k + offs) * 2 + 1, tl.where(valid, page, -1), mask=in_row)


@triton.jit
def _beaten_by(gathered_ptr, my_key, my_page, row, top_k, num_rows, world_size,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """How many of the row's candidates (all ranks) beat each of ``BLOCK_M`` candidates."""
    beaten_by = tl.zeros([BLOCK_M], dtype=tl.int32)
    total = world_size * top_k
    for start in range(0, total, BLOCK_C):
        cand = start + tl.arange(0, BLOCK_C)
        src_rank = cand // top_k
        slot = (src_rank * num_rows + row) * top_k + cand % top_k
        ok = cand < total
        key = int32_order_key(tl.load(gathered_ptr + slot * 2, mask=ok, other=0))
        page = tl.load(gathered_ptr + slot * 2 + 1, mask=ok, other=-1)
        better = (key[None, :] > my_key[:, None]) | (
            (key[None, :] == my_key[:, None]) & (page[None, :] < my_page[:, None])
        )
        better = better & (page[None, :] >= 0)
        beaten_by += tl.sum(better.to(tl.int32), axis=1)
    return beaten_by


@triton.jit
def _compact(indices_ptr, out_ptr, kept, row, top_k, BLOCK_K: tl.constexpr):
    # This rank's candidates come in ascending local index order: compact, keeping it.
    mine = tl.arange(0, BLOCK_K)
    mine_ok = mine < top_k
    position = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    local = tl.load(indices_ptr + row * top_k + mine, mask=mine_ok, other=-1)
    tl.store(out_ptr + row * top_k + mine, tl.full([BLOCK_K], -1, tl.int32), mask=mine_ok)
    tl.debug_barrier()
    tl.store(out_ptr + row * top_k + position, local, mask=kept)


@triton.jit
def _kept(gathered_ptr, mine, row, top_k, num_rows, rank, world_size,
          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Which of this rank's candidates ``mine`` of ``row`` are in the global top ``top_k``."""
    mine_ok = mine < top_k
    base = (rank * num_rows + row) * top_k
    my_key = int32_order_key(tl.load(gathered_ptr + (base + mine) * 2, mask=mine_ok, other=0))
    my_page = tl.load(gathered_ptr + (base + mine) * 2 + 1, mask=mine_ok, other=-1)
    beaten_by = _beaten_by(gathered_ptr, my_key, my_page, row, top_k, num_rows, world_size,
                           BLOCK_M, BLOCK_C)  # fmt: skip
    return mine_ok & (my_page >= 0) & (beaten_by < top_k)


@triton.jit
def _rank_kernel(
    gathered_ptr, kept_ptr, top_k, num_rows, rank, world_size,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``BLOCK_M`` of a row's candidates a program: their kept flags."""
    row = tl.program_id(0)
    mine = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    kept = _kept(gathered_ptr, mine, row, top_k, num_rows, rank, world_size, BLOCK_M, BLOCK_C)
    tl.store(kept_ptr + row * top_k + mine, kept.to(tl.int8), mask=mine < top_k)


@triton.jit
def _compact_kernel(kept_ptr, indices_ptr, out_ptr, top_k, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    mine = tl.arange(0, BLOCK_K)
    kept = tl.load(kept_ptr + row * top_k + mine, mask=mine < top_k, other=0) != 0
    _compact(indices_ptr, out_ptr, kept, row, top_k, BLOCK_K)


def pack_candidates(
    *,
    top_scores: torch.Tensor,
    local_indices: torch.Tensor,
    global_pages: torch.Tensor,
    impl: str | None = None,
) -> torch.Tensor:
    """``(score bits, global page)`` pairs of this rank's local top-k, ready to all-gather.

    top_scores: ``[num_seqs, num_kv_heads, top_k]`` fp32 (``+inf`` pinned, ``-inf`` padding).
    local_indices: ``[num_seqs, num_kv_heads, top_k]`` int32, ``-1`` padding.
    global_pages: ``[num_seqs, max_local_pages]`` int32 global page of each local page.
    Returns ``[num_seqs, num_kv_heads, top_k, 2]`` int32: the score's fp32 bits and the
    global page (``-1`` for padding).
    """
    check_tensor("top_scores", top_scores, ndim=3, dtypes=(torch.float32,))
    device = top_scores.device
    check_tensor("local_indices", local_indices, ndim=3, dtypes=(torch.int32,), device=device)
    check_tensor("global_pages", global_pages, ndim=2, dtypes=(torch.int32,), device=device)
    num_seqs, num_kv_heads, top_k = top_scores.shape
    for dim, size in enumerate(top_scores.shape):
        check_dim("local_indices", local_indices, dim, size, "as top_scores")
    check_dim("global_pages", global_pages, 0, num_seqs, "num_seqs")
    if resolve_impl(impl, device) == "torch" or global_pages.shape[1] == 0:
        valid = local_indices >= 0
        if global_pages.shape[1] == 0:
            pages = torch.full_like(local_indices, -1)
        else:
            rows = torch.arange(num_seqs, device=device)[:, None, None]
            pages = global_pages[rows, local_indices.long().clamp(min=0)]
            pages = torch.where(valid, pages, -1)
        return torch.stack((top_scores.view(torch.int32), pages), dim=-1)
    out = torch.empty(num_seqs, num_kv_heads, top_k, 2, dtype=torch.int32, device=device)
    if out.numel():
        scores, indices = top_scores.contiguous(), local_indices.contiguous()
        pages = global_pages if global_pages.stride(1) == 1 else global_pages.contiguous()
        _pack_kernel[(num_seqs * num_kv_heads,)](
            scores, indices, pages, out, top_k, num_kv_heads, pages.stride(0),
            BLOCK_K=triton.next_power_of_2(top_k),
        )  # fmt: skip
    return out


def _order_key_torch(bits: torch.Tensor) -> torch.Tensor:
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _keep_torch(gathered, local_indices, rank: int) -> torch.Tensor:
    world_size, num_seqs, num_kv_heads, top_k, _ = gathered.shape
    # Candidates along the last axis, rank-major: position // top_k is the source rank.
    cands = gathered.permute(1, 2, 0, 3, 4).reshape(num_seqs, num_kv_heads, -1, 2).long()
    key, page = _order_key_torch(cands[..., 0]), cands[..., 1]
    is_page = page >= 0
    # One int64 sort key: score order high, lower page id wins ties, padding last.
    sort_key = torch.where(is_page, (key << 32) + (_INT32_MAX - page), torch.iinfo(torch.int64).min)
    winners = sort_key.topk(min(top_k, sort_key.shape[-1]), dim=-1).indices
    chosen = torch.zeros_like(is_page).scatter_(-1, winners, True) & is_page
    mine = chosen[..., rank * top_k : (rank + 1) * top_k] & (local_indices >= 0)
    kept = torch.where(mine, local_indices, _INT32_MAX)
    kept = torch.sort(kept, dim=-1).values
    return torch.where(kept == _INT32_MAX, -1, kept).to(torch.int32)


def keep_global_top_k(
    *,
    gathered: torch.Tensor,
    local_indices: torch.Tensor,
    rank: int,
    impl: str | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """This rank's pages among the global top ``top_k`` of every (sequence, KV head).

    gathered: ``[world_size, num_seqs, num_kv_heads, top_k, 2]`` int32 — every rank's
        :func:`pack_candidates`, in rank order.
    local_indices: ``[num_seqs, num_kv_heads, top_k]`` int32 — this rank's local top-k
        (ascending, ``-1`` padding), as packed.
    tuning: ``rank_block``, the candidates a ranking program takes.
    Returns ``[num_seqs, num_kv_heads, top_k]`` int32 local indices of this rank's
    winners, ascending, ``-1`` padding.
    """
    check_tensor("gathered", gathered, ndim=5, dtypes=(torch.int32,))
    device = gathered.device
    check_tensor("local_indices", local_indices, ndim=3, dtypes=(torch.int32,), device=device)
    world_size, num_seqs, num_kv_heads, top_k, _ = gathered.shape
    check_dim("gathered", gathered, 4, 2, "(score bits, page)")
    for dim, size in enumerate(gathered.shape[1:4]):
        check_dim("local_indices", local_indices, dim, size, "as gathered")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if resolve_impl(impl, device) == "torch":
        return _keep_torch(gathered, local_indices, rank)
    out = torch.empty_like(local_indices)
    rows = num_seqs * num_kv_heads
    if not (rows and top_k):
        return out
    gathered, indices = gathered.contiguous(), local_indices.contiguous()
    # Ranking costs top_k x world_size x top_k comparisons a row: spread over programs of
    # tuning.rank_block candidates (one program a row leaves most SMs idle at batch 1), then each
    # row compacted in one program.
    kept = torch.empty(rows, top_k, dtype=torch.int8, device=device)
    _rank_kernel[(rows, triton.cdiv(top_k, tuning.rank_block))](
        gathered, kept, top_k, rows, rank, world_size, BLOCK_M=tuning.rank_block, BLOCK_C=64,
    )  # fmt: skip
    _compact_kernel[(rows,)](kept, indices, out, top_k, BLOCK_K=triton.next_power_of_2(top_k),
                             num_warps=8)  # fmt: skip
    return out
