"""Two-level page selection: coarse bounds of page groups first, fine pages inside the best.

A sequence's pages are grouped ``group_pages`` at a time (group ``g`` holds its pages
``g * group_pages .. (g + 1) * group_pages - 1``); a group's coarse bounds are the
element-wise min / max of its pages' bounds (:mod:`.coarse`), so a group's score
bounds the score of every page in it, which bounds ``q . k`` of every key in them. A
decode query then:

1. scores every group from the coarse bounds (:func:`~longquest.kernels.scores.page_scores`
   on the coarse pool; groups at ``j >= pin_from`` score ``+inf``: their bounds are not
   final yet, the newest page's group among them);
2. keeps the ``kept_groups`` best groups of each (sequence, KV head)
   (:func:`~longquest.kernels.topk.select_pages`);
3. scores the pages of the kept groups from their fine bounds (:func:`group_page_scores`,
   the sequence's newest page ``+inf`` where pinned) and keeps the ``top_k`` best of those
   candidates (:func:`select_candidates`, which reports their page indices).

Exactness: a page of a dropped group scores at most that group's coarse score, so every
page scoring above the best dropped group's coarse score is a candidate and the result
holds every page of the single-level top ``top_k`` that scores above it; with
``kept_groups * group_pages`` pages at least the row, the result is the single-level one.

Cost a (sequence, KV head): the coarse bounds (``1 / group_pages`` of the fine ones) plus
``kept_groups * group_pages`` fine bounds, against every fine bound for the single level.
The second term does not shrink with the context: with 4-token pages, groups of 8 and
kept groups holding 2 budgets of 4096 tokens, a 64K-token row reads as many bound bytes
as one level of 16-token pages (a 512K-token row: about half). Two more launches a layer
than one level (the fine scores and their selection).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import (
    BOUNDS_DTYPES,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_group,
    check_tensor,
    resolve_impl,
)
from longquest.kernels.bound_tiles import (
    best_bound_elementwise,
    dot_options,
    load_bounds,
    query_signs,
)
from longquest.kernels.float8 import FLOAT8_DTYPE, check_float8_supported
from longquest.kernels.radix import DIGIT_BITS, NUM_BINS
from longquest.kernels.scores import page_scores
from longquest.kernels.topk import select_pages, select_row
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning


@triton.jit
def _group_page_scores_kernel(
    query_ptr, key_min_ptr, key_max_ptr, page_table_ptr, num_pages_ptr, pin_ptr, groups_ptr,
    out_ptr, out_page_ptr, num_kv_heads, max_pages, kept_groups,
    stride_qs, stride_qh, stride_bp, stride_bh, stride_ts, stride_tp,
    GROUP_PAGES: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``BLOCK_P`` candidate slots of one (sequence, KV head) row a program: slot ``c`` is
    page ``groups[c // GROUP_PAGES] * GROUP_PAGES + c % GROUP_PAGES``; its score and page
    index (-1: no page) are written."""
    row = tl.program_id(0)  # seq * num_kv_heads + head
    seq = row // num_kv_heads
    head = row % num_kv_heads
    list_len = kept_groups * GROUP_PAGES
    n = tl.minimum(tl.maximum(tl.load(num_pages_ptr + seq).to(tl.int32), 0), max_pages)
    pinned_page = tl.where(tl.load(pin_ptr + seq) != 0, n - 1, -1)
    slots = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_list = slots < list_len
    group = tl.load(groups_ptr + row.to(tl.int64) * kept_groups + slots // GROUP_PAGES,
                    mask=in_list, other=-1)  # fmt: skip
    page = group * GROUP_PAGES + slots % GROUP_PAGES
    valid = in_list & (group >= 0) & (page < n)
    ids = tl.load(page_table_ptr + seq.to(tl.int64) * stride_ts + page * stride_tp,
                  mask=valid, other=0)  # fmt: skip
    dims = tl.arange(0, BLOCK_D)
    kmin, kmax = load_bounds(key_min_ptr, key_max_ptr, ids, valid, head * stride_bh, dims,
                              stride_bp, HEAD_DIM)  # fmt: skip
    q_base = query_ptr + seq * stride_qs + (head * GROUP) * stride_qh
    if USE_DOT:
        # Pages as the product's rows, as in scores._score_blocks_as_rows (same exactness).
        cols = tl.arange(0, 16)
        q = tl.load(
            q_base + cols[None, :] * stride_qh + dims[:, None],
            mask=(cols[None, :] < GROUP) & (dims[:, None] < HEAD_DIM), other=0.0,
        )  # fmt: skip
        q_pos, q_neg = query_signs(q, key_min_ptr, query_ptr)
        bound = tl.dot(kmax.to(q_pos.dtype), q_pos, input_precision=DOT_PRECISION)
        bound = tl.dot(kmin.to(q_neg.dtype), q_neg, bound, input_precision=DOT_PRECISION)
        best = tl.max(tl.where(cols[None, :] < GROUP, bound, float("-inf")), axis=1)
    else:
        best = best_bound_elementwise(q_base, stride_qh, kmin, kmax, dims, GROUP, HEAD_DIM,
                                      BLOCK_P)  # fmt: skip
    best = tl.where(page == pinned_page, float("inf"), best)
    out = row.to(tl.int64) * list_len + slots
    tl.store(out_ptr + out, tl.where(valid, best, float("-inf")), mask=in_list)
    tl.store(out_page_ptr + out, tl.where(valid, page, -1), mask=in_list)


def _group_page_scores_torch(query, key_min, key_max, page_table, num_pages, pin_last, groups,
                             group_pages) -> torch.Tensor:  # fmt: skip
    num_seqs, num_qo_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    max_pages = page_table.shape[1]
    offsets = torch.arange(group_pages, device=query.device)
    pages = (groups.long()[..., None] * group_pages + offsets).flatten(2)  # [S, Hkv, L]
    n = num_pages.long().clamp(0, max_pages)[:, None, None]
    valid = (groups.long()[..., None] >= 0).expand(-1, -1, -1, group_pages).flatten(2)
    valid = valid & (pages < n)
    safe = torch.where(valid, pages, 0)
    rows = torch.arange(num_seqs, device=query.device)[:, None, None]
    ids = page_table.long()[rows, safe]  # [S, Hkv, L]
    heads = torch.arange(num_kv_heads, device=query.device)[None, :, None]
    kmin = key_min[ids, heads].float()[:, :, None]  # [S, Hkv, 1, L, D]
    kmax = key_max[ids, heads].float()[:, :, None]
    q = query.float().view(num_seqs, num_kv_heads, -1, 1, head_dim)
    scores = torch.maximum(q * kmin, q * kmax).sum(-1).amax(dim=2)  # [S, Hkv, L]
    pinned = pin_last.to(query.device)[:, None, None] & (pages == n - 1)
    scores = scores.masked_fill(pinned, math.inf).masked_fill(~valid, -math.inf)
    return scores, torch.where(valid, pages, -1).to(torch.int32)


def group_page_scores(
    *,
    query: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    pin_last: torch.Tensor,
    groups: torch.Tensor,
    group_pages: int,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine Quest scores of the pages in each (sequence, KV head)'s kept groups.

    query, key_min, key_max, page_table, num_pages: as for
    :func:`~longquest.kernels.scores.page_scores`.
    pin_last: ``[num_seqs]`` bool — the sequence's last valid page scores ``+inf``.
    groups: ``[num_seqs, num_kv_heads, kept_groups]`` int32 group indices, ``-1`` none.
    Returns ``(scores, pages)``, both ``[num_seqs, num_kv_heads, kept_groups * group_pages]``
    (fp32, int32): slot ``c`` is page ``groups[.., c // group_pages] * group_pages + c %
    group_pages``, or ``-inf`` / ``-1`` where that is no page (group ``-1`` or page
    ``>= num_pages``).
    """
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    device = query.device
    num_seqs, num_qo_heads, head_dim = query.shape
    check_tensor("key_min", key_min, ndim=3, dtypes=BOUNDS_DTYPES, device=device)
    check_tensor("key_max", key_max, ndim=3, dtypes=(key_min.dtype,), device=device)
    num_kv_heads = key_min.shape[1]
    check_dim("key_min", key_min, 2, head_dim, "head_dim of query")
    check_group(num_qo_heads, num_kv_heads)
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_dim("page_table", page_table, 0, num_seqs, "num_seqs")
    check_tensor("num_pages", num_pages, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_dim("num_pages", num_pages, 0, num_seqs, "num_seqs")
    check_tensor("pin_last", pin_last, ndim=1, dtypes=(torch.bool,), device=device)
    check_dim("pin_last", pin_last, 0, num_seqs, "num_seqs")
    check_tensor("groups", groups, ndim=3, dtypes=(torch.int32,), device=device)
    check_dim("groups", groups, 0, num_seqs, "num_seqs")
    check_dim("groups", groups, 1, num_kv_heads, "num_kv_heads")
    if isinstance(group_pages, bool) or not isinstance(group_pages, int) or group_pages < 1:
        raise ValueError(f"group_pages must be an int >= 1, got {group_pages!r}")
    if resolve_impl(impl, device) == "torch":
        return _group_page_scores_torch(
            query, key_min, key_max, page_table, num_pages, pin_last, groups, group_pages
        )
    if key_min.dtype == FLOAT8_DTYPE:
        check_float8_supported(device)
    return _group_page_scores_triton(
        query, key_min, key_max, page_table, num_pages, pin_last, groups, group_pages
    )


def _group_page_scores_triton(query, key_min, key_max, page_table, num_pages, pin_last, groups,
                              group_pages) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    num_seqs, num_qo_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    kept = groups.shape[2]
    list_len = kept * group_pages
    out = torch.empty(num_seqs, num_kv_heads, list_len, device=query.device)
    pages = torch.empty(out.shape, dtype=torch.int32, device=query.device)
    if not out.numel():
        return out, pages
    if query.stride(2) != 1:
        query = query.contiguous()
    if key_min.stride(2) != 1 or key_max.stride(2) != 1 or key_min.stride() != key_max.stride():
        raise ValueError("key_min and key_max need equal strides and a contiguous last dimension")
    groups = groups.contiguous()
    dot = dot_options(query, key_min)
    block_d = triton.next_power_of_2(head_dim)
    # tl.dot's operands need 16 rows; the elementwise form keeps its tile near 4K elements.
    block_p = 64 if dot["USE_DOT"] else max(16, min(64, 4096 // block_d))
    grid = (num_seqs * num_kv_heads, triton.cdiv(list_len, block_p))
    _group_page_scores_kernel[grid](
        query, key_min, key_max, page_table, num_pages, pin_last, groups, out, pages,
        num_kv_heads, page_table.shape[1], kept,
        query.stride(0), query.stride(1), key_min.stride(0), key_min.stride(1),
        page_table.stride(0), page_table.stride(1),
        GROUP_PAGES=group_pages, GROUP=num_qo_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_P=block_p, num_warps=4, **dot,
    )  # fmt: skip
    return out, pages


@triton.jit
def _select_candidates_kernel(
    score_ptr, index_ptr, out_score_ptr, out_index_ptr, list_len, k_out,
    BLOCK: tl.constexpr, IN_REGISTERS: tl.constexpr, OUT_BLOCK: tl.constexpr,
    DIGIT_BITS: tl.constexpr, NUM_BINS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    score_ptr += row.to(tl.int64) * list_len
    index_ptr += row.to(tl.int64) * list_len
    lanes = tl.arange(0, BLOCK)
    count = tl.zeros([], tl.int32)
    for block in range(0, list_len, BLOCK):
        index = tl.load(index_ptr + block + lanes, mask=block + lanes < list_len, other=-1)
        count += tl.sum((index >= 0).to(tl.int32), axis=0)
    offset = row.to(tl.int64) * k_out
    select_row(
        score_ptr, index_ptr, 0, list_len, count, -1, k_out,
        out_score_ptr + offset, out_index_ptr + offset,
        True, BLOCK, IN_REGISTERS, OUT_BLOCK, DIGIT_BITS, NUM_BINS,
    )  # fmt: skip


def _select_candidates_torch(scores, indices, top_k):
    num_seqs, num_kv_heads, list_len = scores.shape
    device = scores.device
    top_scores = torch.full((num_seqs, num_kv_heads, top_k), -math.inf, device=device)
    top_indices = torch.full(top_scores.shape, -1, dtype=torch.int32, device=device)
    k = min(top_k, list_len)
    if not k:
        return top_scores, top_indices
    valid = indices >= 0
    # Order-preserving int key, as in topk._select_pages_torch; earlier slots win ties.
    bits = torch.where(scores == 0, 0.0, scores.float()).view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    key = torch.where(valid, key, -(2**31)) * 2**31 + (
        list_len - 1 - torch.arange(list_len, device=device)
    )
    chosen = key.topk(k, dim=-1).indices.sort(dim=-1).values
    ok = valid.gather(-1, chosen)
    # Chosen slots that are no candidate (fewer candidates than k) sort last: move them out.
    order = torch.sort((~ok).int(), dim=-1, stable=True).indices
    chosen, ok = chosen.gather(-1, order), ok.gather(-1, order)
    top_scores[..., :k] = torch.where(ok, scores.gather(-1, chosen), -math.inf)
    top_indices[..., :k] = torch.where(ok, indices.gather(-1, chosen), -1)
    return top_scores, top_indices


def select_candidates(
    *,
    scores: torch.Tensor,
    indices: torch.Tensor,
    top_k: int,
    impl: str | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``top_k`` candidates of each row by score, with their indices, in list order.

    scores: ``[num_seqs, num_kv_heads, list_len]`` fp32; indices: the same shape, int32 —
    each slot's page index, ``-1`` where the slot is no candidate.
    Returns ``(top_scores, top_indices)``, ``[num_seqs, num_kv_heads, top_k]`` (fp32,
    int32): the ``min(top_k, candidates)`` highest scores, ties to the earlier slot, in slot
    order, padded at the end with ``-inf`` / ``-1``. One program a row (the radix select of
    :mod:`.topk` over a candidate list); ``tuning``: ``select_register_max`` and
    ``select_loop_block``.
    """
    check_tensor("scores", scores, ndim=3, dtypes=(torch.float32,))
    device = scores.device
    check_tensor("indices", indices, ndim=3, dtypes=(torch.int32,), device=device)
    for dim in range(3):
        check_dim("indices", indices, dim, scores.shape[dim], "as scores")
    if resolve_impl(impl, device) == "torch":
        return _select_candidates_torch(scores, indices, top_k)
    num_seqs, num_kv_heads, list_len = scores.shape
    top_scores = torch.empty(num_seqs, num_kv_heads, top_k, device=device)
    top_indices = torch.empty(top_scores.shape, dtype=torch.int32, device=device)
    if not top_scores.numel():
        return top_scores, top_indices
    if not list_len:
        return top_scores.fill_(-math.inf), top_indices.fill_(-1)
    fits = list_len <= tuning.select_register_max
    block = triton.next_power_of_2(list_len) if fits else tuning.select_loop_block
    num_warps = max(4, min(16, block // 256))  # as topk's one-program selection
    _select_candidates_kernel[(num_seqs * num_kv_heads,)](
        scores.contiguous(), indices.contiguous(), top_scores, top_indices, list_len, top_k,
        BLOCK=max(block, 32 * num_warps), IN_REGISTERS=fits,
        OUT_BLOCK=min(triton.next_power_of_2(top_k), 1024),
        DIGIT_BITS=DIGIT_BITS, NUM_BINS=NUM_BINS, num_warps=num_warps,
    )  # fmt: skip
    return top_scores, top_indices


def select_pages_two_level(
    *,
    query: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    pin_last: torch.Tensor,
    coarse_min: torch.Tensor,
    coarse_max: torch.Tensor,
    coarse_table: torch.Tensor,
    num_groups: torch.Tensor,
    pin_from: torch.Tensor,
    group_pages: int,
    kept_groups: int,
    top_k: int,
    workspace: torch.Tensor | None = None,
    spread: bool = True,
    impl: str | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``top_k`` pages of each (sequence, KV head), scanning the fine bounds only inside
    the ``kept_groups`` best groups by coarse bound (see the module docstring).

    query, key_min, key_max, page_table, num_pages: as for
    :func:`~longquest.kernels.scores.page_scores` (the fine level).
    pin_last: ``[num_seqs]`` bool — keep the sequence's last valid page (score ``+inf``).
    coarse_min, coarse_max: ``[num_groups_total, num_kv_heads, head_dim]``, the bounds'
    dtype: each group's min / max over its pages' bounds (:func:`coarse_bounds`).
    coarse_table: ``[num_seqs, max_groups]`` int32 — row of group ``g`` in the coarse pool.
    num_groups: ``[num_seqs]`` int32 ``ceil(num_pages / group_pages)`` (not checked: that
    would sync).
    pin_from: ``[num_seqs]`` int32 — groups at ``g >= pin_from`` are always kept (their
    coarse bounds are not final; the newest page's group must be among them where pinned).
    kept_groups: groups kept a row, ``>= 1``; with ``kept_groups * group_pages >= top_k +
    group_pages`` a row of at least ``top_k`` pages gets ``top_k``.
    workspace, spread, tuning: passed to both selections (see ``select_pages``).
    Returns ``(top_scores, indices)`` in :func:`select_pages`' contract: ``[num_seqs,
    num_kv_heads, top_k]`` fp32 / int32 page indices, ascending, ``-inf`` / ``-1`` padding.
    Semantics: :func:`longquest.kernels.ref.select_pages_two_level_ref`.
    """
    for name, value in (("group_pages", group_pages), ("kept_groups", kept_groups),
                        ("top_k", top_k)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    common = dict(impl=impl, tuning=tuning)
    coarse = page_scores(query=query, key_min=coarse_min, key_max=coarse_max,
                         page_table=coarse_table, num_pages=num_groups, pin_from=pin_from,
                         check_pages=False, **common)  # fmt: skip
    _, groups = select_pages(scores=coarse, num_pages=num_groups, top_k=kept_groups,
                             pin_last=False, workspace=workspace, spread=spread,
                             **common)  # fmt: skip
    fine, pages = group_page_scores(query=query, key_min=key_min, key_max=key_max,
                                    page_table=page_table, num_pages=num_pages,
                                    pin_last=pin_last, groups=groups, group_pages=group_pages,
                                    impl=impl)  # fmt: skip
    # Candidates sit in ascending page order (kept groups ascending), so the slot order the
    # selection keeps is page order, and its ties go to the lower page.
    return select_candidates(scores=fine, indices=pages, top_k=top_k, **common)
