"""Two-level page selection: coarse bounds of page groups first, fine pages inside the best.

A sequence's pages are grouped ``group_pages`` at a time (group ``g`` holds its pages
``g * group_pages .. (g + 1) * group_pages - 1``); a group's coarse bounds are the
element-wise min / max of its pages' bounds (:func:`coarse_bounds`), so a group's score
bounds the score of every page in it, which bounds ``q . k`` of every key in them. A
decode query then:

1. scores every group from the coarse bounds (:func:`~longquest.kernels.scores.page_scores`
   on the coarse pool; groups at ``j >= pin_from`` score ``+inf``: their bounds are not
   final yet, the newest page's group among them);
2. keeps the ``kept_groups`` best groups of each (sequence, KV head)
   (:func:`~longquest.kernels.topk.select_pages`);
3. scores the pages of the kept groups from their fine bounds (:func:`group_page_scores`,
   the sequence's newest page ``+inf`` where pinned) and keeps the ``top_k`` best of those
   candidates (``select_pages`` again);
4. maps candidate positions back to the sequence's page indices (:func:`candidate_pages`).

Exactness: a page of a dropped group scores at most that group's coarse score, so every
page scoring above the best dropped group's coarse score is a candidate and the result
holds every page of the single-level top ``top_k`` that scores above it; with
``kept_groups * group_pages`` pages at least the row, the result is the single-level one.

Cost a (sequence, KV head): the coarse bounds (``1 / group_pages`` of the fine ones) plus
``kept_groups * group_pages`` fine bounds, against every fine bound for the single level.
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
from longquest.kernels.bound_tiles import dot_options, load_bounds, query_signs
from longquest.kernels.float8 import FLOAT8_DTYPE, check_float8_supported
from longquest.kernels.scores import page_scores
from longquest.kernels.topk import select_pages
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning


@triton.jit
def _group_page_scores_kernel(
    query_ptr, key_min_ptr, key_max_ptr, page_table_ptr, num_pages_ptr, pin_ptr, groups_ptr,
    out_ptr, num_kv_heads, max_pages, kept_groups,
    stride_qs, stride_qh, stride_bp, stride_bh, stride_ts, stride_tp,
    GROUP_PAGES: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``BLOCK_P`` candidate slots of one (sequence, KV head) row a program: slot ``c`` is
    page ``groups[c // GROUP_PAGES] * GROUP_PAGES + c % GROUP_PAGES``."""
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
        lo = kmin.to(tl.float32)
        hi = kmax.to(tl.float32)
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        for g in range(GROUP):
            q = tl.load(q_base + g * stride_qh + dims, mask=dims < HEAD_DIM, other=0.0)
            q = q.to(tl.float32)
            best = tl.maximum(best, tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1))
    best = tl.where(page == pinned_page, float("inf"), best)
    tl.store(out_ptr + row.to(tl.int64) * list_len + slots,
             tl.where(valid, best, float("-inf")), mask=in_list)  # fmt: skip


@triton.jit
def _candidate_pages_kernel(
    positions_ptr, scores_ptr, groups_ptr, out_ptr, top_k, kept_groups,
    GROUP_PAGES: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    slots = tl.arange(0, BLOCK_K)
    ok = slots < top_k
    base = row.to(tl.int64) * top_k
    position = tl.load(positions_ptr + base + slots, mask=ok, other=-1)
    score = tl.load(scores_ptr + base + slots, mask=ok, other=float("-inf"))
    chosen = ok & (position >= 0) & (score > float("-inf"))
    group = tl.load(groups_ptr + row.to(tl.int64) * kept_groups + position // GROUP_PAGES,
                    mask=chosen, other=-1)  # fmt: skip
    page = group * GROUP_PAGES + position % GROUP_PAGES
    tl.store(out_ptr + base + slots, tl.where(chosen & (group >= 0), page, -1), mask=ok)


def _group_page_scores_torch(query, key_min, key_max, page_table, num_pages, pin_last, groups,
                             group_pages) -> torch.Tensor:  # fmt: skip
    num_seqs, num_qo_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    kept = groups.shape[2]
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
    return scores.reshape(num_seqs, num_kv_heads, kept * group_pages)


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
) -> torch.Tensor:
    """Fine Quest scores of the pages in each (sequence, KV head)'s kept groups.

    query, key_min, key_max, page_table, num_pages: as for
    :func:`~longquest.kernels.scores.page_scores`.
    pin_last: ``[num_seqs]`` bool — the sequence's last valid page scores ``+inf``.
    groups: ``[num_seqs, num_kv_heads, kept_groups]`` int32 group indices, ``-1`` none.
    Returns ``[num_seqs, num_kv_heads, kept_groups * group_pages]`` fp32: slot ``c`` is page
    ``groups[.., c // group_pages] * group_pages + c % group_pages``; ``-inf`` where that is
    no page (group ``-1`` or page ``>= num_pages``).
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
                              group_pages) -> torch.Tensor:  # fmt: skip
    num_seqs, num_qo_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    kept = groups.shape[2]
    list_len = kept * group_pages
    out = torch.empty(num_seqs, num_kv_heads, list_len, device=query.device)
    if not out.numel():
        return out
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
        query, key_min, key_max, page_table, num_pages, pin_last, groups, out,
        num_kv_heads, page_table.shape[1], kept,
        query.stride(0), query.stride(1), key_min.stride(0), key_min.stride(1),
        page_table.stride(0), page_table.stride(1),
        GROUP_PAGES=group_pages, GROUP=num_qo_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_P=block_p, num_warps=4, **dot,
    )  # fmt: skip
    return out


def candidate_pages(
    *,
    positions: torch.Tensor,
    top_scores: torch.Tensor,
    groups: torch.Tensor,
    group_pages: int,
    impl: str | None = None,
) -> torch.Tensor:
    """Page indices of the candidates :func:`select_pages` chose from
    :func:`group_page_scores`.

    positions: ``[num_seqs, num_kv_heads, top_k]`` int32 candidate slots, ``-1`` none.
    top_scores: their scores, fp32; a ``-inf`` one was no page.
    groups: ``[num_seqs, num_kv_heads, kept_groups]`` int32, as scored.
    Returns ``[num_seqs, num_kv_heads, top_k]`` int32 page indices, ``-1`` for none.
    """
    device = positions.device
    check_tensor("positions", positions, ndim=3, dtypes=(torch.int32,), device=device)
    check_tensor("top_scores", top_scores, ndim=3, dtypes=(torch.float32,), device=device)
    check_tensor("groups", groups, ndim=3, dtypes=(torch.int32,), device=device)
    for dim in range(3):
        check_dim("top_scores", top_scores, dim, positions.shape[dim], "as positions")
    for dim in range(2):
        check_dim("groups", groups, dim, positions.shape[dim], "as positions")
    if resolve_impl(impl, device) == "torch":
        chosen = (positions >= 0) & (top_scores > -math.inf)
        slot = positions.long().clamp(min=0)
        group = groups.long().gather(-1, slot // group_pages)
        page = group * group_pages + slot % group_pages
        return torch.where(chosen & (group >= 0), page, -1).to(torch.int32)
    out = torch.empty_like(positions)
    num_seqs, num_kv_heads, top_k = positions.shape
    if out.numel():
        _candidate_pages_kernel[(num_seqs * num_kv_heads,)](
            positions.contiguous(), top_scores.contiguous(), groups.contiguous(), out,
            top_k, groups.shape[2], GROUP_PAGES=group_pages,
            BLOCK_K=triton.next_power_of_2(top_k),
        )  # fmt: skip
    return out


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
    fine = group_page_scores(query=query, key_min=key_min, key_max=key_max,
                             page_table=page_table, num_pages=num_pages, pin_last=pin_last,
                             groups=groups, group_pages=group_pages, impl=impl)  # fmt: skip
    # Every slot is in range for the selection; a slot that is no page scores -inf and is
    # mapped to -1 below.
    slots = torch.full_like(num_groups, fine.shape[2])
    top_scores, positions = select_pages(scores=fine, num_pages=slots, top_k=top_k,
                                         pin_last=False, workspace=workspace, spread=spread,
                                         **common)  # fmt: skip
    indices = candidate_pages(positions=positions, top_scores=top_scores, groups=groups,
                              group_pages=group_pages, impl=impl)  # fmt: skip
    return top_scores, indices
