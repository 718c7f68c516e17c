"""Paged decode attention: one query token per sequence over all or selected KV pages.

The Triton path is split-K ("flash-decoding"): the (selected) pages of every
(sequence, KV head) are divided among ``num_splits`` programs so that even batch 1
with a 256-page budget fills the GPU; each program writes a partial (out, lse), and the
partials are reduced either by the merge kernel (:mod:`longquest.kernels.merge`) or, when
the caller provides zeroed arrival counters (``split_counters``: the engine keeps them per
decode batch), by the last program
of each (sequence, KV head) to finish: it takes a ticket from an atomic counter after
publishing its partial, and the one that draws ``num_splits - 1`` reads the others back
from L2, writes the result and resets the counter (so CUDA-graph replays find it
zeroed).

One program serves every query head of its KV group, so each K/V page is read from
memory once per group. Scores and the weighted sum use ``tl.dot`` with the group
padded to 16 rows: decode is memory-bound, so the padded rows only cost tensor-core
cycles that would sit idle, while an elementwise ``[group, tokens, head_dim]`` product
would put about one CUDA-core instruction on every byte read. Triton pipelines the page
gathers through shared memory (cp.async), so a program keeps a block of K and V in flight
while it computes the previous one.
The PyTorch path (the engine's CPU decode, :mod:`longquest.kernels.decode_torch`) runs
the same online softmax over chunks of the page list, vectorised over sequences and heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_group,
    check_tensor,
    resolve_impl,
)
from longquest.kernels._device import fence_gpu, sm_count
from longquest.kernels.decode_torch import check_decode_pages, decode_torch
from longquest.kernels.merge import merge_states_into, reduce_partials
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning

_LOG2E = 1.4426950408889634
# What the kernel reads for the page list (SELECTION) and how splits are reduced (REDUCE).
_DENSE, _SELECTED = 0, 1
_SINGLE, _PARTIALS, _LAST_REDUCES = 0, 1, 2


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, seq_lens_ptr, selected_ptr,
    part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, counter_ptr,
    num_kv_heads, num_splits, list_len, max_pages, qk_scale,
    stride_qs, stride_qh,
    stride_kp, stride_kh, stride_kt,
    stride_vp, stride_vh, stride_vt,
    stride_table, stride_sel_s, stride_sel_h,
    stride_os, stride_oh, stride_ls, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGES_PER_BLOCK: tl.constexpr,
    SELECTION: tl.constexpr, REDUCE: tl.constexpr, SCAN_BLOCK: tl.constexpr,
    MERGE_G: tl.constexpr, BLOCK_SPLITS: tl.constexpr, MERGE_CHUNK: tl.constexpr,
    FENCE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # One body: its loop and the reductions share registers, and splitting it costs them.
    LN2: tl.constexpr = 0.6931471805599453
    split = tl.program_id(0)
    kv = tl.program_id(1)
    seq = tl.program_id(2)
    num_qo_heads = num_kv_heads * GROUP
    BLOCK_N: tl.constexpr = PAGES_PER_BLOCK * PAGE_SIZE

    seq_len = tl.load(seq_lens_ptr + seq)
    # Clamped so that a too-long seq_len can never index past the page table's row.
    num_pages = tl.minimum(tl.cdiv(seq_len, PAGE_SIZE), max_pages)
    sel_row = selected_ptr + seq * stride_sel_s + kv * stride_sel_h
    if SELECTION == 0:
        total = num_pages
    else:
        # The splits share the list up to its last used entry, not its full length: a
        # rank's share of a global top-k fills about 1 / world_size of the list, at its
        # front, and splits over the padding would sit idle while the others work.
        lanes = tl.arange(0, SCAN_BLOCK)
        total = 0
        for b in range(0, list_len, SCAN_BLOCK):
            entry = tl.load(sel_row + b + lanes, mask=b + lanes < list_len, other=-1)
            used = (entry >= 0) & (entry < num_pages)
            total = tl.maximum(total, tl.max(tl.where(used, b + lanes + 1, 0), 0))
    # Splits own whole blocks of pages, so no split wastes a partly used iteration.
    per_split = tl.cdiv(tl.cdiv(total, num_splits), PAGES_PER_BLOCK) * PAGES_PER_BLOCK
    start = split * per_split
    end = tl.minimum(start + per_split, total)
    # Splits past the last used block have nothing: where the last split reduces, they
    # write no partial and it merges only the first `active` (a rank's share of a global
    # top-k leaves about half the splits idle at two ranks).
    active = tl.cdiv(total, tl.maximum(per_split, 1))

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_N)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv * GROUP + g
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(k_ptr.dtype.element_ty)

    page_of_token = t // PAGE_SIZE
    slot = t % PAGE_SIZE
    k_base = k_ptr + kv * stride_kh + slot[:, None] * stride_kt + d[None, :]
    v_base = v_ptr + kv * stride_vh + slot[:, None] * stride_vt + d[None, :]
    table_row = table_ptr + seq * stride_table
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for j0 in range(start, end, PAGES_PER_BLOCK):
        j = j0 + page_of_token  # [BLOCK_N] position in the page list, per token
        in_range = j < end
        if SELECTION == 0:
            logical = j
        else:
            logical = tl.load(sel_row + j, mask=in_range, other=-1)
        valid = in_range & (logical >= 0) & (logical < num_pages)
        page = tl.load(table_row + logical, mask=valid, other=0)
        page = page.to(tl.int64)  # pool offsets overflow int32 at million-token pools
        valid = valid & (logical * PAGE_SIZE + slot < seq_len)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + page[:, None] * stride_kp, mask=kv_mask, other=0.0)
        v = tl.load(v_base + page[:, None] * stride_vp, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G, N], log2
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        # A block with no valid token leaves m at -inf; shift by 0 to avoid inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_use[:, None])
        alpha = tl.exp2(m - m_use)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    nonempty = l > 0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l, 1.0)[:, None], 0.0)
    lse = tl.where(nonempty, (m + tl.log2(tl.where(nonempty, l, 1.0))) * LN2, float("-inf"))
    gd_mask = g_mask[:, None] & d_mask[None, :]
    if REDUCE == 0:
        o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=gd_mask)
        tl.store(lse_ptr + seq * stride_ls + heads * stride_lh, lse, mask=g_mask)
    else:
        # Partials: [num_seqs, num_qo_heads, num_splits, HEAD_DIM] fp32 and its lse.
        part = (seq * num_qo_heads + heads) * num_splits + split
        o_ptrs = part_o_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
        write = g_mask
        if REDUCE == 2:  # the merge kernel (REDUCE 1) reads every split
            write = write & (g * 0 + split < active)
        tl.store(o_ptrs, out, mask=write[:, None] & d_mask[None, :])
        tl.store(part_lse_ptr + part, lse, mask=write)
        if REDUCE == 2:
            fence_gpu(split, FENCE)
            tl.debug_barrier()
            counter = counter_ptr + seq * num_kv_heads + kv
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:
                fence_gpu(split, FENCE)
                tl.store(counter, 0)
                reduce_partials(
                    part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, seq, kv, num_qo_heads,
                    num_splits, active, stride_os, stride_oh, stride_ls, stride_lh, GROUP, HEAD_DIM,
                    BLOCK_D, MERGE_G, BLOCK_SPLITS, MERGE_CHUNK,
                )  # fmt: skip


def _choose_num_splits(
    device: torch.device, num_seqs: int, num_kv_heads: int, pages: int, pages_per_block: int,
    programs_per_sm: int,
) -> int:  # fmt: skip
    """Enough splits to give the GPU a few waves of programs, but at least one block each.

    Depends on shapes only (no host sync), so the launch can be captured in a CUDA graph.
    """
    # Rounded down: one more split than fits pushes programs into a second wave (dense at
    # 8 x 192K on a rank: 9 splits, 576 programs, 1027 us against 771 for 5).
    target = programs_per_sm * sm_count(device)
    wanted = target // max(num_seqs * num_kv_heads, 1)
    return max(1, min(wanted, triton.cdiv(pages, pages_per_block)))


def _decode_triton(
    query, k_cache, v_cache, page_table, seq_lens, selected, scale, num_splits,
    *, tuning: KernelTuning, counters=None, out=None, lse=None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the split kernel, then the merge kernel unless ``counters`` (int32 zeros,
    ``[>= num_seqs * num_kv_heads]``, left zeroed) let the last split of each row reduce.

    ``out`` / ``lse``: buffers to write into
    (out with a unit inner stride), else new ones in the query's dtype / fp32.
    """
    num_seqs, num_qo_heads, head_dim = query.shape
    _, num_kv_heads, page_size, _ = k_cache.shape
    group = num_qo_heads // num_kv_heads
    device = query.device
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if lse is None:
        lse = torch.empty(num_seqs, num_qo_heads, dtype=torch.float32, device=device)
    if num_seqs == 0:
        return out, lse
    pages_per_block = max(1, tuning.decode_tokens_per_block // page_size)
    pages = selected.shape[2] if selected is not None else page_table.shape[1]
    if num_splits is None:
        num_splits = _choose_num_splits(device, num_seqs, num_kv_heads, pages, pages_per_block,
                                        tuning.decode_programs_per_sm)  # fmt: skip
        if counters is not None:
            cap = tuning.decode_max_splits_dense
            if selected is not None:
                cap = tuning.decode_max_splits_selected
            num_splits = min(num_splits, cap)
    reduce = _SINGLE if num_splits == 1 else (_PARTIALS if counters is None else _LAST_REDUCES)
    if reduce == _SINGLE:
        part_out, part_lse = out, lse  # unused
    else:
        part_out = torch.empty(
            num_seqs, num_qo_heads, num_splits, head_dim, dtype=torch.float32, device=device
        )
        part_lse = torch.empty(
            num_seqs, num_qo_heads, num_splits, dtype=torch.float32, device=device
        )
    sel = selected if selected is not None else page_table  # any valid pointer when unused
    selection = _DENSE if selected is None else _SELECTED
    block_d = max(triton.next_power_of_2(head_dim), 16)
    scan_block = min(max(triton.next_power_of_2(pages), 16), 1024)  # the selection's scan
    _decode_kernel[(num_splits, num_kv_heads, num_seqs)](
        query, k_cache, v_cache, page_table, seq_lens, sel,
        part_out, part_lse, out, lse, counters if counters is not None else seq_lens,
        num_kv_heads, num_splits, pages if selected is not None else 0, page_table.shape[1],
        scale * _LOG2E,
        query.stride(0), query.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        page_table.stride(0), sel.stride(0), sel.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(triton.next_power_of_2(group), 16),
        BLOCK_D=block_d, PAGE_SIZE=page_size, PAGES_PER_BLOCK=pages_per_block,
        SELECTION=selection, REDUCE=reduce, SCAN_BLOCK=scan_block,
        MERGE_G=triton.next_power_of_2(group),
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        MERGE_CHUNK=min(triton.next_power_of_2(num_splits), tuning.decode_merge_chunk),
        FENCE=device.type == "cuda",
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=tuning.decode_num_warps * (1 if block_d <= 128 else 2),
        num_stages=tuning.decode_num_stages,
    )  # fmt: skip
    if reduce == _PARTIALS:
        # The merge kernel takes [num_splits, num_seqs, num_qo_heads, head_dim] views.
        merge_states_into(part_out.permute(2, 0, 1, 3), part_lse.permute(2, 0, 1), out, lse)
    return out, lse


def _check_decode_inputs(query, k_cache, v_cache, page_table, seq_lens, selected, num_splits,
                         split_counters, out, lse) -> None:  # fmt: skip
    """Validate :func:`paged_decode_attention`'s arguments (no host sync)."""
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    device = query.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=device)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    num_seqs, num_qo_heads, head_dim = query.shape
    num_pages_total, num_kv_heads, page_size, _ = k_cache.shape
    check_dim("k_cache", k_cache, 3, head_dim, "head_dim, as in query")
    check_group(num_qo_heads, num_kv_heads)
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_dim("page_table", page_table, 0, num_seqs, "num_seqs")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_dim("seq_lens", seq_lens, 0, num_seqs, "num_seqs")
    if selected is not None:
        check_tensor("selected", selected, ndim=3, dtypes=INDEX_DTYPES, device=device)
        check_dim("selected", selected, 0, num_seqs, "num_seqs")
        check_dim("selected", selected, 1, num_kv_heads, "num_kv_heads")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if split_counters is not None:
        check_tensor("split_counters", split_counters, ndim=1, dtypes=(torch.int32,),
                     device=device)  # fmt: skip
        if split_counters.stride(0) != 1:
            raise ValueError("split_counters must be contiguous")
        if split_counters.shape[0] < num_seqs * num_kv_heads:
            raise ValueError(
                f"split_counters holds {split_counters.shape[0]} counters but this launch "
                f"needs num_seqs * num_kv_heads = {num_seqs * num_kv_heads}"
            )
    for name, buffer, shape, dtypes in (
        ("out", out, query.shape, FLOAT_DTYPES),
        ("lse", lse, (num_seqs, num_qo_heads), (torch.float32,)),
    ):
        if buffer is None:
            continue
        check_tensor(name, buffer, ndim=len(shape), dtypes=dtypes, device=device)
        if tuple(buffer.shape) != tuple(shape) or (name == "out" and buffer.stride(-1) != 1):
            raise ValueError(
                f"{name} must have shape {tuple(shape)}"
                + (" and a contiguous last dimension" if name == "out" else "")
                + f", got shape {tuple(buffer.shape)}, strides {buffer.stride()}"
            )


def paged_decode_attention(
    *,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str | None = None,
    num_splits: int | None = None,
    check_pages: bool = True,
    split_counters: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query token per sequence over its (selected) KV pages.

    query: ``[num_seqs, num_qo_heads, head_dim]`` fp16/bf16/fp32.
    k_cache, v_cache: ``[num_pages_total, num_kv_heads, page_size, head_dim]``, one float
    dtype (the Triton path rounds the query to it for the tensor-core product).
    page_table: ``[num_seqs, max_pages]`` int32/int64 — physical page ids in position
    order, any ids of the pool; entries past the sequence's last page are not read.
    seq_lens: ``[num_seqs]`` int32/int64 — tokens per sequence; slots past it on the
    last page are masked; 0 gives an empty sequence.
    selected: ``[num_seqs, num_kv_heads, top_k]`` int32/int64 logical page indices
    (positions in ``page_table``), ``-1`` (or any index past the last page) for none;
    ``None`` attends to every page. Query head ``h`` reads the pages of KV head
    ``h // (num_qo_heads // num_kv_heads)``.
    scale: logit scale, default ``head_dim ** -0.5``.
    impl: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA, PyTorch elsewhere).
    num_splits: Triton split-K factor; ``None`` picks one from the shapes to fill the GPU
    (the PyTorch path ignores it).
    check_pages: verify that ``seq_lens`` fit the page table and every page read lies in
    the pool — costs a host sync; pass ``False`` on the hot path (CUDA graphs).
    split_counters: ``[>= num_seqs * num_kv_heads]`` int32 zeros, reused across launches
    in one stream (the kernel leaves them zeroed): with them the last split of each
    (sequence, KV head) reduces the splits, instead of a merge kernel after. Triton only
    (the PyTorch path ignores them).
    out, lse: ``[num_seqs, num_qo_heads, head_dim]`` (any float dtype, contiguous last
    dimension) and ``[num_seqs, num_qo_heads]`` fp32 (any strides) buffers to write the
    result into (views of a larger buffer are fine); returned as the result.
    tuning: the kernel's blocks, grid and split caps (``decode_*`` fields).

    Returns ``(out, lse)``: ``[num_seqs, num_qo_heads, head_dim]`` in the query's dtype
    (``out``'s, when given) and ``[num_seqs, num_qo_heads]`` fp32, natural log; a head
    with no tokens gives ``out = 0, lse = -inf``. See
    :func:`longquest.kernels.ref.paged_decode_attention_ref`.
    """
    _check_decode_inputs(query, k_cache, v_cache, page_table, seq_lens, selected, num_splits,
                         split_counters, out, lse)  # fmt: skip
    device = query.device
    head_dim = query.shape[2]
    num_pages_total, _, page_size, _ = k_cache.shape
    impl = resolve_impl(impl, device)
    if check_pages:
        check_decode_pages(page_table, seq_lens, selected, num_pages_total, page_size)
    scale = head_dim**-0.5 if scale is None else float(scale)
    if impl == "torch":
        result = decode_torch(query, k_cache, v_cache, page_table, seq_lens, selected, scale,
                               out_dtype=None if out is None else out.dtype)  # fmt: skip
        if out is not None:
            result = (out.copy_(result[0]), result[1])
        if lse is not None:
            result = (result[0], lse.copy_(result[1]))
        return result
    if page_size & (page_size - 1):
        raise ValueError(f"k_cache page_size must be a power of two for Triton, got {page_size}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    query = query if query.stride(-1) == 1 else query.contiguous()
    seq_lens = seq_lens if seq_lens.stride(0) == 1 else seq_lens.contiguous()
    page_table = page_table if page_table.stride(1) == 1 else page_table.contiguous()
    if selected is not None and selected.stride(2) != 1:
        selected = selected.contiguous()
    return _decode_triton(
        query, k_cache, v_cache, page_table, seq_lens, selected, scale, num_splits,
        tuning=tuning, counters=split_counters, out=out, lse=lse,
    )  # fmt: skip
