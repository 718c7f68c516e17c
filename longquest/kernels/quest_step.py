"""One Quest decode step in three kernels: scores, selection, sparse attention.

:func:`quest_decode_step` computes exactly
``paged_decode_attention(selected=select_pages(scores=page_scores(...))[1])``, with less
on the critical path than the three public launchers in a row:

* **The selection also writes physical page ids**, so attention reads them beside the
  logical indices instead of looking them up in the page table afterwards (one dependent
  memory round trip less).
* **Attention reduces its own splits.** Each split program publishes its partial state and
  takes a ticket from an atomic arrival counter; the last of a (sequence, KV head) merges
  the partials from L2 and resets the counter. No merge kernel.
* Page counts come from ``seq_lens`` inside the kernels (no host-side or extra-kernel
  ``ceil(seq_lens / page_size)``).

The arrival counters live in a :class:`QuestWorkspace` made once (zeroed) and reused by
every layer and step: the kernel resets the counters it used, so CUDA-graph replays find
them zeroed. Launches that share a workspace must run in order (one stream).

Measured and dropped (benchmarks/NOTES-kernels.md): fusing the selection into the score
kernel (the last score program of a row selects) was 10 us slower at 32K tokens, because
one 4-warp program per row selects far slower than the select kernel's 8-16 warps.
"""

from __future__ import annotations

import dataclasses

import torch

from longquest.kernels._checks import (
    BOUNDS_DTYPES,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_group,
    check_tensor,
    resolve_impl,
)
from longquest.kernels.decode import _decode_triton, paged_decode_attention
from longquest.kernels.decode_torch import _check_pages
from longquest.kernels.float8 import FLOAT8_DTYPE, check_bounds_dtype, check_float8_supported
from longquest.kernels.scores import _page_scores_triton, page_scores
from longquest.kernels.topk import _select_pages_triton, select_pages
from longquest.kernels.topk_spread import check_select_workspace, make_select_workspace


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuestWorkspace:
    """Arrival counters of the attention's split reduction: int32 ``[max_rows]``, and the
    histograms of a selection spread over programs: int32 ``[max_rows, WORKSPACE_STRIDE]``
    (:mod:`longquest.kernels.topk_spread`); all zero between launches. A launch uses
    ``num_seqs * num_kv_heads`` rows."""

    counters: torch.Tensor
    selection: torch.Tensor

    @property
    def max_rows(self) -> int:
        return self.counters.shape[0]


def make_quest_workspace(
    *, max_num_seqs: int, num_kv_heads: int, device: torch.device | str
) -> QuestWorkspace:
    """A zeroed workspace for launches of up to ``max_num_seqs * num_kv_heads`` rows."""
    if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be an int >= 1, got {num_kv_heads!r}")
    rows = max_num_seqs * num_kv_heads
    return QuestWorkspace(
        counters=torch.zeros(rows, dtype=torch.int32, device=device),
        selection=make_select_workspace(max_rows=rows, device=device),
    )


def _quest_select_triton(
    query, key_min, key_max, page_table, count, top_k, pin_last, *, page_size=0, workspace=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top_scores, indices, physical)``, all ``[num_seqs, num_kv_heads, top_k]``.

    ``count``: valid pages per sequence, or with ``page_size > 0`` tokens (seq_lens).
    ``page_table`` must have unit inner stride.
    """
    scores = _page_scores_triton(query, key_min, key_max, page_table, count, page_size)
    return _select_pages_triton(
        scores,
        count,
        top_k,
        pin_last,
        page_size=page_size,
        page_table=page_table,
        workspace=workspace,
    )


def _check_common(query, key_min, key_max, page_table, top_k, pin_last, workspace) -> None:
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    device = query.device
    num_seqs, num_qo_heads, head_dim = query.shape
    check_tensor("key_min", key_min, ndim=3, dtypes=BOUNDS_DTYPES, device=device)
    check_tensor("key_max", key_max, ndim=3, dtypes=(key_min.dtype,), device=device)
    if key_max.shape != key_min.shape:
        raise ValueError(
            f"key_max has shape {tuple(key_max.shape)}; it must match key_min "
            f"{tuple(key_min.shape)}"
        )
    check_dim("key_min", key_min, 2, head_dim, "head_dim of query")
    num_kv_heads = key_min.shape[1]
    check_group(num_qo_heads, num_kv_heads)
    if key_min.stride(2) != 1 or key_max.stride(2) != 1 or key_min.stride() != key_max.stride():
        raise ValueError("key_min and key_max need equal strides and a contiguous last dimension")
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_dim("page_table", page_table, 0, num_seqs, "num_seqs")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if isinstance(pin_last, torch.Tensor):
        check_tensor("pin_last", pin_last, ndim=1, dtypes=(torch.bool,), device=device)
        check_dim("pin_last", pin_last, 0, num_seqs, "num_seqs")
    elif not isinstance(pin_last, bool):
        raise ValueError(f"pin_last must be a bool or a bool tensor, got {type(pin_last).__name__}")
    if not isinstance(workspace, QuestWorkspace):
        raise ValueError(
            f"workspace must be a QuestWorkspace (make_quest_workspace), got "
            f"{type(workspace).__name__}"
        )
    check_tensor("workspace.counters", workspace.counters, ndim=1, dtypes=(torch.int32,))
    if workspace.counters.device != device:
        raise ValueError(f"workspace is on {workspace.counters.device}, expected {device}")
    check_select_workspace(workspace.selection, rows=workspace.max_rows, device=device)
    if workspace.max_rows < num_seqs * num_kv_heads:
        raise ValueError(
            f"workspace holds {workspace.max_rows} rows but this launch needs "
            f"num_seqs * num_kv_heads = {num_seqs * num_kv_heads}: make a larger one"
        )


def quest_decode_step(
    *,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    top_k: int,
    workspace: QuestWorkspace,
    pin_last: bool | torch.Tensor = True,
    scale: float | None = None,
    check_pages: bool = True,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token per sequence over its ``top_k`` most critical pages.

    query: ``[num_seqs, num_qo_heads, head_dim]`` fp16/bf16/fp32 (post-RoPE).
    k_cache, v_cache: ``[num_pages_total, num_kv_heads, page_size, head_dim]``, one dtype.
    key_min, key_max: ``[num_pages_total, num_kv_heads, head_dim]``, the cache's bounds:
    the cache's dtype or float8_e4m3fn.
    page_table: ``[num_seqs, max_pages]`` int32/int64 physical page ids.
    seq_lens: ``[num_seqs]`` int — tokens per sequence; its pages are
    ``ceil(seq_lens / page_size)``.
    top_k, pin_last: as in :func:`longquest.kernels.topk.select_pages`; scale as in
    :func:`longquest.kernels.decode.paged_decode_attention`.
    workspace: from :func:`make_quest_workspace`, with ``num_seqs * num_kv_heads`` rows.
    check_pages: verify seq_lens and the page ids (a host sync); pass False on the hot path.
    Returns ``(out, lse)``: ``[num_seqs, num_qo_heads, head_dim]`` in the query's dtype and
    ``[num_seqs, num_qo_heads]`` fp32 — exactly ``paged_decode_attention(selected=
    select_pages(scores=page_scores(...))[1], ...)`` with ``num_pages`` from ``seq_lens``.
    """
    _check_common(query, key_min, key_max, page_table, top_k, pin_last, workspace)
    device = query.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=device)
    check_bounds_dtype(key_min, cache_dtype=k_cache.dtype)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    num_pages_total, num_kv_heads, page_size, head_dim = k_cache.shape
    check_dim("k_cache", k_cache, 3, query.shape[2], "head_dim, as in query")
    check_dim("k_cache", k_cache, 1, key_min.shape[1], "num_kv_heads, as in key_min")
    check_dim("key_min", key_min, 0, num_pages_total, "num_pages_total, as in k_cache")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_dim("seq_lens", seq_lens, 0, query.shape[0], "num_seqs")
    if check_pages:
        _check_pages(page_table, seq_lens, None, num_pages_total, page_size)
    scale = head_dim**-0.5 if scale is None else float(scale)
    attend = dict(query=query, k_cache=k_cache, v_cache=v_cache, page_table=page_table)
    if resolve_impl(impl, device) == "torch":
        num_pages = (seq_lens.long() + page_size - 1) // page_size
        scores = page_scores(
            query=query, key_min=key_min, key_max=key_max, page_table=page_table,
            num_pages=num_pages, check_pages=False, impl="torch",
        )  # fmt: skip
        _, selected = select_pages(
            scores=scores, num_pages=num_pages, top_k=top_k, pin_last=pin_last, impl="torch"
        )
        return paged_decode_attention(
            **attend, seq_lens=seq_lens, selected=selected, scale=scale, check_pages=False,
            impl="torch",
        )  # fmt: skip
    if page_size & (page_size - 1):
        raise ValueError(f"k_cache page_size must be a power of two for Triton, got {page_size}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    if key_min.dtype == FLOAT8_DTYPE:
        check_float8_supported(device)
    query, page_table = _contiguous_rows(query, page_table)
    seq_lens = seq_lens if seq_lens.stride(0) == 1 else seq_lens.contiguous()
    _, selected, physical = _quest_select_triton(
        query,
        key_min,
        key_max,
        page_table,
        seq_lens,
        top_k,
        pin_last,
        page_size=page_size,
        workspace=workspace.selection,
    )
    return _decode_triton(
        query, k_cache, v_cache, page_table, seq_lens, selected, scale, None,
        physical=physical, counters=workspace.counters,
    )  # fmt: skip


def _contiguous_rows(query, page_table) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels index query rows and page-table rows with unit inner stride."""
    query = query if query.stride(-1) == 1 else query.contiguous()
    page_table = page_table if page_table.stride(1) == 1 else page_table.contiguous()
    return query, page_table
