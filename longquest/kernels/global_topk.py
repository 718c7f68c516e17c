"""The two local halves of the cross-rank top-k merge, one kernel each.

Sequence parallelism selects pages in three launches per layer: :func:`pack_candidates`
turns this rank's local top-k into ``(score bits, global page)`` int32 pairs, one
all-gather (in longquest.parallel.comm) shares every rank's pairs, and
:func:`keep_global_top_k` ranks all of them and keeps this rank's pages among the
global top ``top_k``. Ranking: higher score first, ties to the lower global page; a
candidate's rank is the number of candidates that beat it, so every rank computes
the same cut without a sort. The PyTorch path (``impl="torch"``) is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import check_dim, check_tensor, resolve_impl

_INT32_MAX = 2**31 - 1
# Up to this many candidates a rank, one program ranks and compacts a whole row; above
# it (e.g. a 4096-token budget in 4-token pages: 1024), one program a row spent ~0.3 ms
# a layer at 1M tokens, so ranking is spread over programs of _RANK_BLOCK candidates.
_ONE_PROGRAM_TOP_K = 256
_RANK_BLOCK = 64
# Fewer rows than this spread their ranking too (0: never): one program a row leaves
# most SMs idle at batch 1.
_SPREAD_BELOW_ROWS = 0
# The one-program ranking's candidate chunk (0: 32, fewer past 256 candidates) and warps.
# Measured on an H200
# at 64 rows, top_k 128, two ranks (score-variants-attn-nvidia-h200-2026-11-30.json):
# chunks of 32 on 8 warps 10.4 us, of 64 on 4 warps 13.4 us, of 128-256 15-25 us.
_KEEP_BLOCK_C = 0
_KEEP_NUM_WARPS = 8


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
def _order_key(bits):
    # Signed-int order equal to the float order of the bits (negative floats flipped).
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


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
        key = _order_key(tl.load(gathered_ptr + slot * 2, mask=ok, other=0))
        page = tl.load(gathered_ptr + slot * 2 + 1, mask=ok, other=-1)
        better = (key[None, :] > my_key[:, None]) | (
            (key[None, :] == my_key[:, None]) & (page[None, :] < my_page[:, None])
        )
        better = better & (page[None, :] >= 0)
        beaten_by += tl.sum(better.to(tl.int32), axis=1)
    return beaten_by


@triton.jit
def _compact(indices_ptr, out_ptr, pages_ptr, table_ptr, stride_table, num_kv_heads, kept,
             row, top_k, BLOCK_K: tl.constexpr, WRITE_PAGES: tl.constexpr):  # fmt: skip
    # This rank's candidates come in ascending local index order: compact, keeping it.
    mine = tl.arange(0, BLOCK_K)
    mine_ok = mine < top_k
    position = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    local = tl.load(indices_ptr + row * top_k + mine, mask=mine_ok, other=-1)
    if WRITE_PAGES:
        table_row = table_ptr + (row // num_kv_heads).to(tl.int64) * stride_table
        page = tl.load(table_row + local, mask=kept, other=-1)
    none = tl.full([BLOCK_K], -1, tl.int32)
    tl.store(out_ptr + row * top_k + mine, none, mask=mine_ok)
    if WRITE_PAGES:
        tl.store(pages_ptr + row * top_k + mine, none, mask=mine_ok)
    tl.debug_barrier()
    tl.store(out_ptr + row * top_k + position, local, mask=kept)
    if WRITE_PAGES:
        tl.store(pages_ptr + row * top_k + position, page.to(tl.int32), mask=kept)


@triton.jit
def _kept(gathered_ptr, mine, row, top_k, num_rows, rank, world_size,
          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Which of this rank's candidates ``mine`` of ``row`` are in the global top ``top_k``."""
    mine_ok = mine < top_k
    base = (rank * num_rows + row) * top_k
    my_key = _order_key(tl.load(gathered_ptr + (base + mine) * 2, mask=mine_ok, other=0))
    my_page = tl.load(gathered_ptr + (base + mine) * 2 + 1, mask=mine_ok, other=-1)
    beaten_by = _beaten_by(gathered_ptr, my_key, my_page, row, top_k, num_rows, world_size,
                           BLOCK_M, BLOCK_C)  # fmt: skip
    return mine_ok & (my_page >= 0) & (beaten_by < top_k)


@triton.jit
def _keep_kernel(
    gathered_ptr, indices_ptr, out_ptr, pages_ptr, table_ptr, stride_table, num_kv_heads,
    top_k, num_rows, rank, world_size,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_PAGES: tl.constexpr,
):  # fmt: skip
    """One program a row: rank this rank's candidates, then compact the winners."""
    row = tl.program_id(0)
    mine = tl.arange(0, BLOCK_K)
    kept = _kept(gathered_ptr, mine, row, top_k, num_rows, rank, world_size, BLOCK_K, BLOCK_C)
    _compact(indices_ptr, out_ptr, pages_ptr, table_ptr, stride_table, num_kv_heads, kept,
             row, top_k, BLOCK_K, WRITE_PAGES)  # fmt: skip


@triton.jit
def _rank_kernel(
    gathered_ptr, kept_ptr, top_k, num_rows, rank, world_size,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Large ``top_k``: ``BLOCK_M`` of a row's candidates a program, kept flags out."""
    row = tl.program_id(0)
    mine = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    kept = _kept(gathered_ptr, mine, row, top_k, num_rows, rank, world_size, BLOCK_M, BLOCK_C)
    tl.store(kept_ptr + row * top_k + mine, kept.to(tl.int8), mask=mine < top_k)


@triton.jit
def _compact_kernel(
    kept_ptr, indices_ptr, out_ptr, pages_ptr, table_ptr, stride_table, num_kv_heads, top_k,
    BLOCK_K: tl.constexpr, WRITE_PAGES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    mine = tl.arange(0, BLOCK_K)
    kept = tl.load(kept_ptr + row * top_k + mine, mask=mine < top_k, other=0) != 0
    _compact(indices_ptr, out_ptr, pages_ptr, table_ptr, stride_table, num_kv_heads, kept,
             row, top_k, BLOCK_K, WRITE_PAGES)  # fmt: skip


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
    page_table: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's pages among the global top ``top_k`` of every (sequence, KV head).

    gathered: ``[world_size, num_seqs, num_kv_heads, top_k, 2]`` int32 — every rank's
        :func:`pack_candidates`, in rank order.
    local_indices: ``[num_seqs, num_kv_heads, top_k]`` int32 — this rank's local top-k
        (ascending, ``-1`` padding), as packed.
    page_table: ``[num_seqs, max_local_pages]`` int32 — this rank's physical page of each
        local page, or None.
    Returns ``(indices, physical)``: ``[num_seqs, num_kv_heads, top_k]`` int32 local
    indices of this rank's winners, ascending, ``-1`` padding; and, given a
    ``page_table``, their physical pages in the same layout (``-1`` beside ``-1``;
    attention then skips the page-table lookup), else None.
    """
    check_tensor("gathered", gathered, ndim=5, dtypes=(torch.int32,))
    device = gathered.device
    check_tensor("local_indices", local_indices, ndim=3, dtypes=(torch.int32,), device=device)
    world_size, num_seqs, num_kv_heads, top_k, _ = gathered.shape
    check_dim("gathered", gathered, 4, 2, "(score bits, page)")
    for dim, size in enumerate(gathered.shape[1:4]):
        check_dim("local_indices", local_indices, dim, size, "as gathered")
    if page_table is not None:
        check_tensor("page_table", page_table, ndim=2, dtypes=(torch.int32,), device=device)
        check_dim("page_table", page_table, 0, num_seqs, "num_seqs")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if resolve_impl(impl, device) == "torch":
        kept = _keep_torch(gathered, local_indices, rank)
        if page_table is None:
            return kept, None
        rows = torch.arange(num_seqs, device=device)[:, None, None]
        pages = page_table[rows, kept.long().clamp(min=0)]
        return kept, torch.where(kept >= 0, pages, -1)
    out = torch.empty_like(local_indices)
    pages = None if page_table is None else torch.empty_like(local_indices)
    rows = num_seqs * num_kv_heads
    if not (rows and top_k):
        return out, pages
    gathered, indices = gathered.contiguous(), local_indices.contiguous()
    if page_table is not None and page_table.stride(1) != 1:
        page_table = page_table.contiguous()
    table = dict(
        pages_ptr=out if pages is None else pages,
        table_ptr=out if page_table is None else page_table,
        stride_table=0 if page_table is None else page_table.stride(0),
        num_kv_heads=num_kv_heads,
        WRITE_PAGES=page_table is not None,
    )
    block_k = triton.next_power_of_2(top_k)
    spread = block_k > _ONE_PROGRAM_TOP_K or (rows < _SPREAD_BELOW_ROWS and top_k > _RANK_BLOCK)
    if not spread:
        _keep_kernel[(rows,)](
            gathered, indices, out, top_k=top_k, num_rows=rows, rank=rank,
            world_size=world_size, BLOCK_K=block_k,
            BLOCK_C=_KEEP_BLOCK_C or max(16, min(32, 8192 // block_k)),
            num_warps=_KEEP_NUM_WARPS or 8, **table,
        )  # fmt: skip
        return out, pages
    # Ranking costs top_k x world_size x top_k comparisons a row: spread it over
    # programs of _RANK_BLOCK candidates, then compact each row in one program.
    kept = torch.empty(rows, top_k, dtype=torch.int8, device=device)
    _rank_kernel[(rows, triton.cdiv(top_k, _RANK_BLOCK))](
        gathered, kept, top_k, rows, rank, world_size, BLOCK_M=_RANK_BLOCK, BLOCK_C=64,
    )  # fmt: skip
    _compact_kernel[(rows,)](kept, indices, out, top_k=top_k, BLOCK_K=block_k, num_warps=8,
                             **table)  # fmt: skip
    return out, pages
