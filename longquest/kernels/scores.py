"""Quest page criticality: ``sum_d max(q_d * kmin_d, q_d * kmax_d)``, max over a KV group.

The Triton kernel is built for bandwidth: the bounds (``2 * head_dim`` elements a page and
KV head) are read exactly once and everything else is small. A program scores a run of
``BLOCK_P``-page blocks of one (sequence, KV head): it gathers each block's page ids from
the page table and loads the ``[BLOCK_P, head_dim]`` min and max tiles (each page's row is
contiguous, so the loads are 16-byte vectors). In the group-as-rows form (bf16 bounds) the
loop is software pipelined by hand: while block ``b`` is scored, the bounds of ``b + 1`` and
the page ids of ``b + 2`` are in flight; the pages-as-rows form (fp8 bounds, below) loads
the page ids a block ahead and leaves the bounds' pipeline to Triton. The grid is one wave
of programs (``KernelTuning.score_programs_per_sm`` an SM, or ``score_fp8_programs_per_sm``).

The bound runs on the tensor cores where that is exact (see ``_score_blocks``): the
elementwise fp32 form (the interpreter's, and GQA groups over 16) costs ~31 instructions a
page and head per warp and is issue-bound (117 us at 1M tokens, 76% of copy bandwidth on an
H100); the tensor-core form costs ~9 (108.7 us, 82%). At 1M tokens (65536 pages, 8 KV heads,
head_dim 128, bf16) the kernel reads 268 MB. Numbers: benchmarks/NOTES-kernels.md.

The bounds may also be fp8 e4m3fn (``CacheConfig(bounds_dtype="float8_e4m3fn")``), which
halves those bytes: they are loaded as fp8 and converted in registers to fp16 (exact; the
GPU converts e4m3 pairs to fp16 directly, not to bf16), and the products run in fp16. The
group-as-rows form is issue-bound there, so fp8 bounds are scored with the pages as the
product's rows (``_score_blocks_as_rows``): the bounds tile goes to shared memory through
Triton's pipeline and is the left operand, the group's query the right one. One rank's
scores at 8 x 192K tokens on two H200s: 38 us a layer as rows, 60 group-as-rows (bf16
bounds: 63 as rows, 62 group-as-rows, which bf16 keeps).
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
    check_page_table,
    check_tensor,
    resolve_impl,
)
from longquest.kernels._device import sm_count
from longquest.kernels.bound_tiles import (
    best_bound_elementwise,
    dot_options,
    load_bounds,
    query_signs,
)
from longquest.kernels.float8 import FLOAT8_DTYPE, check_float8_supported
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning


@triton.jit
def _score_blocks(
    query_ptr, key_min_ptr, key_max_ptr, table_row, out_row,
    n, pin, first, last, head, max_pages,
    stride_qh, stride_bp, stride_bh, stride_tp,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Score blocks ``first .. last - 1`` of one (sequence, KV head) row into ``out_row``.

    ``query_ptr`` points at the group's first query head; ``n`` is the row's valid pages.
    Slots at ``j >= n`` (below ``max_pages``) get ``-inf``, valid slots at ``j >= pin``
    ``+inf``.

    ``USE_DOT`` (fp16/bf16 query; bounds of its dtype, or fp8 bounds, which convert exactly
    to fp16 in registers, the query too): for ``q_d >= 0`` the bound's term is
    ``q_d * max(kmin_d, kmax_d)`` and for ``q_d < 0`` it is ``q_d * min(kmin_d, kmax_d)``
    (rounding is monotone, so this is exact), so a page's bound for every query head of the
    group is ``relu(q) . max(kmin, kmax) + min(q, 0) . min(kmin, kmax)``: two tensor-core
    products with exact fp16/bf16 products and fp32 sums (the elementwise form below is
    issue-bound: about 18 instructions per bound element).
    """
    dims = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_P)
    head_offset = head * stride_bh
    if USE_DOT:
        BLOCK_G: tl.constexpr = 16  # tl.dot's smallest M; rows past the group are masked
        rows = tl.arange(0, BLOCK_G)
        q = tl.load(
            query_ptr + rows[:, None] * stride_qh + dims[None, :],
            mask=(rows[:, None] < GROUP) & (dims[None, :] < HEAD_DIM), other=0.0,
        )  # fmt: skip
        q_pos, q_neg = query_signs(q, key_min_ptr, query_ptr)
    # The page table is read without waiting for n (any id below max_pages is in the row);
    # only the bounds loads are masked by n.
    # Masks compare lanes with a per-block limit (0 past the program's last block).
    pages = first * BLOCK_P + lanes
    ids = tl.load(table_row + pages * stride_tp, mask=pages < tl.where(first < last, max_pages, 0))
    nxt = pages + BLOCK_P
    ids_next = tl.load(
        table_row + nxt * stride_tp, mask=nxt < tl.where(first + 1 < last, max_pages, 0)
    )
    kmin, kmax = load_bounds(
        key_min_ptr, key_max_ptr, ids, pages < tl.where(first < last, n, 0), head_offset, dims,
        stride_bp, HEAD_DIM,
    )  # fmt: skip
    for block in range(first, last):
        pages = block * BLOCK_P + lanes
        nxt = pages + BLOCK_P
        after = nxt + BLOCK_P
        ids_after = tl.load(
            table_row + after * stride_tp, mask=after < tl.where(block + 2 < last, max_pages, 0)
        )
        kmin_next, kmax_next = load_bounds(
            key_min_ptr, key_max_ptr, ids_next, nxt < tl.where(block + 1 < last, n, 0),
            head_offset, dims, stride_bp, HEAD_DIM,
        )  # fmt: skip
        if USE_DOT:
            # kmin <= kmax in every valid page (masked lanes load 0 and 0), so the max and
            # min of the pair are kmax and kmin: no elementwise work on the bounds.
            bound = tl.dot(q_pos, tl.trans(kmax.to(q_pos.dtype)), input_precision=DOT_PRECISION)
            bound = tl.dot(
                q_neg, tl.trans(kmin.to(q_neg.dtype)), bound, input_precision=DOT_PRECISION
            )
            best = tl.max(tl.where(rows[:, None] < GROUP, bound, float("-inf")), axis=0)
        else:
            best = best_bound_elementwise(query_ptr, stride_qh, kmin, kmax, dims, GROUP,
                                          HEAD_DIM, BLOCK_P)  # fmt: skip
        best = tl.where(pages < pin, best, float("inf"))
        tl.store(out_row + pages, tl.where(pages < n, best, float("-inf")), mask=pages < max_pages)
        kmin, kmax, ids_next = kmin_next, kmax_next, ids_after


@triton.jit
def _score_blocks_as_rows(
    query_ptr, key_min_ptr, key_max_ptr, table_row, out_row,
    n, pin, first, last, head, max_pages,
    stride_qh, stride_bp, stride_bh, stride_tp,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """:func:`_score_blocks` with the pages as the product's rows: ``bounds @ q^T``.

    The bounds tile is the left operand (``[BLOCK_P, head_dim]``, ``BLOCK_P >= 64``) and
    the group's query the right one (``[head_dim, 16]``, loaded once), so the tile goes
    from memory to shared memory (``cp.async``, pipelined ``NUM_STAGES`` deep by Triton)
    and into the tensor cores without passing through registers in another layout. Same
    bound, same exactness as the ``USE_DOT`` form of :func:`_score_blocks`.
    """
    BLOCK_G: tl.constexpr = 16
    dims = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_G)
    q = tl.load(
        query_ptr + cols[None, :] * stride_qh + dims[:, None],
        mask=(cols[None, :] < GROUP) & (dims[:, None] < HEAD_DIM), other=0.0,
    )  # fmt: skip
    q_pos, q_neg = query_signs(q, key_min_ptr, query_ptr)
    head_offset = head * stride_bh
    # Page ids one block ahead: a block's bounds loads wait on ids already loaded (Triton's
    # pipeline alone does not overlap the bounds loads with the id loads they depend on).
    pages = first * BLOCK_P + lanes
    ids_next = tl.load(table_row + pages * stride_tp, mask=pages < n, other=0)
    for block in tl.range(first, last, num_stages=NUM_STAGES):
        pages = block * BLOCK_P + lanes
        valid = pages < n
        ids = ids_next
        nxt = pages + BLOCK_P
        ids_next = tl.load(table_row + nxt * stride_tp,
                           mask=nxt < tl.where(block + 1 < last, n, 0), other=0)  # fmt: skip
        kmin, kmax = load_bounds(key_min_ptr, key_max_ptr, ids, valid, head_offset, dims,
                                  stride_bp, HEAD_DIM)  # fmt: skip
        _store_rows_bound(kmin, kmax, q_pos, q_neg, out_row, pages, valid, pin, max_pages, cols,
                          GROUP, DOT_PRECISION)  # fmt: skip


@triton.jit
def _store_rows_bound(kmin, kmax, q_pos, q_neg, out_row, pages, valid, pin, max_pages, cols,
                      GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """The pages-as-rows bound of one ``[BLOCK_P, head_dim]`` block, stored at ``pages``."""
    bound = tl.dot(kmax.to(q_pos.dtype), q_pos, input_precision=DOT_PRECISION)
    bound = tl.dot(kmin.to(q_neg.dtype), q_neg, bound, input_precision=DOT_PRECISION)
    best = tl.max(tl.where(cols[None, :] < GROUP, bound, float("-inf")), axis=1)
    best = tl.where(pages < pin, best, float("inf"))
    tl.store(out_row + pages, tl.where(valid, best, float("-inf")), mask=pages < max_pages)


@triton.jit
def _page_scores_kernel(
    query_ptr, key_min_ptr, key_max_ptr, page_table_ptr, num_pages_ptr, pin_from_ptr, out_ptr,
    num_kv_heads, max_pages, blocks_per_program,
    stride_qs, stride_qh, stride_bp, stride_bh, stride_ts, stride_tp, stride_os, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, AS_ROWS: tl.constexpr = False,
    NUM_STAGES: tl.constexpr = 2, PIN_FROM: tl.constexpr = False,
):  # fmt: skip
    # Axis 0 packs (program of the row, KV head), heads fastest; axis 0 has no 65535 limit.
    head = tl.program_id(0) % num_kv_heads
    chunk = tl.program_id(0) // num_kv_heads
    seq = tl.program_id(1)
    count = tl.load(num_pages_ptr + seq).to(tl.int32)
    n = tl.minimum(tl.maximum(count, 0), max_pages)
    pin = max_pages
    if PIN_FROM:
        pin = tl.load(pin_from_ptr + seq).to(tl.int32)
    first = chunk * blocks_per_program
    last = tl.minimum(first + blocks_per_program, tl.cdiv(max_pages, BLOCK_P))
    if AS_ROWS:
        _score_blocks_as_rows(
            query_ptr + seq * stride_qs + (head * GROUP) * stride_qh, key_min_ptr, key_max_ptr,
            page_table_ptr + seq.to(tl.int64) * stride_ts,
            out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh,
            n, pin, first, last, head, max_pages, stride_qh, stride_bp, stride_bh, stride_tp,
            GROUP, HEAD_DIM, BLOCK_D, BLOCK_P, DOT_PRECISION, NUM_STAGES,
        )  # fmt: skip
    else:
        _score_blocks(
            query_ptr + seq * stride_qs + (head * GROUP) * stride_qh, key_min_ptr, key_max_ptr,
            page_table_ptr + seq.to(tl.int64) * stride_ts,
            out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh,
            n, pin, first, last, head, max_pages, stride_qh, stride_bp, stride_bh, stride_tp,
            GROUP, HEAD_DIM, BLOCK_D, BLOCK_P, USE_DOT, DOT_PRECISION,
        )  # fmt: skip


def _form_options(as_rows: bool, tuning: KernelTuning) -> dict:
    """Launch keywords of the pages-as-rows form (fp8 bounds) or the group-as-rows one."""
    if as_rows:
        return {"AS_ROWS": True, "NUM_STAGES": tuning.score_fp8_num_stages,
                "num_warps": tuning.score_fp8_num_warps,
                "num_stages": tuning.score_fp8_num_stages}  # fmt: skip
    return {"num_warps": tuning.score_num_warps}


def score_grid(
    device: torch.device,
    num_seqs: int,
    num_kv_heads: int,
    max_pages: int,
    head_dim: int,
    use_dot: bool,
    as_rows: bool = False,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> tuple[int, int, int]:
    """``(BLOCK_P, blocks_per_program, programs_per_row)`` for a score launch.

    Depends on shapes only (no host sync), so the launch can be captured in a CUDA graph.
    """
    block_d = triton.next_power_of_2(head_dim)
    tile = tuning.score_dot_tile_elements if use_dot else tuning.score_tile_elements
    block_p = max(16, tile // block_d) if device.type == "cuda" else 16
    per_sm = tuning.score_programs_per_sm
    if as_rows:
        block_p, per_sm = tuning.score_fp8_block_pages, tuning.score_fp8_programs_per_sm
    blocks = triton.cdiv(max_pages, block_p)
    # Rounded down: a grid just past one wave (batch 16: 5 programs a row = 640 > 528 slots)
    # adds a second wave as long as the first (261 us against ~190 at 128K tokens).
    target = per_sm * sm_count(device)
    per_row = max(1, target // max(1, num_seqs * num_kv_heads))
    blocks_per_program = triton.cdiv(blocks, min(per_row, blocks))
    return block_p, blocks_per_program, triton.cdiv(blocks, blocks_per_program)


def _page_scores_torch(query, key_min, key_max, page_table, num_pages, pin_from) -> torch.Tensor:
    """Vectorised PyTorch path, in page chunks that bound the [.., pages, head_dim] temporary."""
    num_seqs, num_qo_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    group = num_qo_heads // num_kv_heads
    max_pages = page_table.shape[1]
    positions = torch.arange(max_pages, device=query.device)
    valid = positions[None, :] < num_pages.long()[:, None]  # [num_seqs, max_pages]
    ids = torch.where(valid, page_table.long(), 0)
    q = query.float().view(num_seqs, num_kv_heads, group, 1, head_dim)
    scores = torch.empty(num_seqs, num_kv_heads, max_pages, device=query.device)
    step = max(1, (1 << 24) // max(1, num_seqs * num_qo_heads * head_dim))
    for start in range(0, max_pages, step):
        chunk = ids[:, start : start + step]  # [num_seqs, P]
        # .float() is exact for every bounds dtype, fp8 included.
        kmin = key_min[chunk].float().permute(0, 2, 1, 3)[:, :, None]  # [S, Hkv, 1, P, D]
        kmax = key_max[chunk].float().permute(0, 2, 1, 3)[:, :, None]
        bound = torch.maximum(q * kmin, q * kmax).sum(-1)  # [S, Hkv, group, P]
        scores[:, :, start : start + step] = bound.amax(dim=2)
    if pin_from is not None:
        scores.masked_fill_((positions[None, :] >= pin_from.long()[:, None])[:, None], math.inf)
    return scores.masked_fill_(~valid[:, None, :], -math.inf)


def page_scores(
    *,
    query: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    pin_from: torch.Tensor | None = None,
    check_pages: bool = True,
    impl: str | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """Quest criticality of every page, reduced over each KV head's query group by max.

    query: ``[num_seqs, num_qo_heads, head_dim]`` (post-RoPE), any float dtype.
    key_min, key_max: ``[num_pages_total, num_kv_heads, head_dim]``, one float dtype
    (fp16/bf16/fp32, or float8_e4m3fn: upcast exactly, scored as that fp32 value).
    page_table: ``[num_seqs, max_pages]`` int32/int64 physical page ids; entries at
    ``j >= num_pages[s]`` are ignored.
    num_pages: ``[num_seqs]`` int — valid pages per sequence, ``0 <= num_pages <= max_pages``.
    pin_from: ``[num_seqs]`` int or None — valid pages at ``j >= pin_from[s]`` score ``+inf``
    (the two-level selection's groups whose bounds are not final yet, always kept).
    check_pages: verify that the used page ids lie in the pool and that ``num_pages`` is in
    range. That costs one device-to-host sync, so a caller that builds its page tables
    itself (the engine) passes False on the hot path; the kernel then still never reads
    the page table out of bounds (it clamps ``num_pages``), but trusts the page ids.
    tuning: the kernel's tiles and grid (``score_*`` fields).
    Returns ``[num_seqs, num_kv_heads, max_pages]`` fp32 (math in fp32); ``-inf`` at
    ``j >= num_pages[s]``. Semantics: :func:`longquest.kernels.ref.page_scores_ref`.
    """
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
    num_pages_total, num_kv_heads, _ = key_min.shape
    check_dim("key_min", key_min, 2, head_dim, "head_dim of query")
    check_group(num_qo_heads, num_kv_heads)
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_dim("page_table", page_table, 0, num_seqs, "num_seqs")
    check_tensor("num_pages", num_pages, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_dim("num_pages", num_pages, 0, num_seqs, "num_seqs")
    if pin_from is not None:
        check_tensor("pin_from", pin_from, ndim=1, dtypes=INDEX_DTYPES, device=device)
        check_dim("pin_from", pin_from, 0, num_seqs, "num_seqs")
    max_pages = page_table.shape[1]
    if check_pages and num_seqs and max_pages:
        check_page_table(page_table, num_pages, num_pages_total)

    if resolve_impl(impl, device) == "torch":
        return _page_scores_torch(query, key_min, key_max, page_table, num_pages, pin_from)
    if query.stride(2) != 1:
        query = query.contiguous()
    if key_min.stride(2) != 1 or key_max.stride(2) != 1 or key_min.stride() != key_max.stride():
        raise ValueError("key_min and key_max need equal strides and a contiguous last dimension")
    if key_min.dtype == FLOAT8_DTYPE:
        check_float8_supported(device)
    return _page_scores_triton(query, key_min, key_max, page_table, num_pages, pin_from, tuning)


def _page_scores_triton(
    query, key_min, key_max, page_table, num_pages, pin_from, tuning
) -> torch.Tensor:
    """Launch the score kernel (no checks, no host sync)."""
    num_seqs, num_qo_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    max_pages = page_table.shape[1]
    device = query.device
    out = torch.empty(num_seqs, num_kv_heads, max_pages, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    dot = dot_options(query, key_min)
    # Pages as the product's rows for fp8 bounds only (see the module docstring).
    as_rows = dot["USE_DOT"] and key_min.dtype == FLOAT8_DTYPE
    block_p, blocks_per_program, per_row = score_grid(
        device, num_seqs, num_kv_heads, max_pages, head_dim, dot["USE_DOT"], as_rows, tuning
    )
    _page_scores_kernel[(per_row * num_kv_heads, num_seqs)](
        query, key_min, key_max, page_table, num_pages,
        num_pages if pin_from is None else pin_from, out,
        num_kv_heads, max_pages, blocks_per_program,
        query.stride(0), query.stride(1), key_min.stride(0), key_min.stride(1),
        page_table.stride(0), page_table.stride(1), out.stride(0), out.stride(1),
        GROUP=num_qo_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_P=block_p, **dot,
        PIN_FROM=pin_from is not None, **_form_options(as_rows, tuning),
    )  # fmt: skip
    return out
