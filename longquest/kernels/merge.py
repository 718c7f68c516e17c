"""Merge partial attention states (out, lse) over disjoint token sets into exact attention.

The sequence-parallel engine combines the partial attention of several GPUs with
this; the split-K decode kernel reduces its splits with the same kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import FLOAT_DTYPES, check_dim, check_tensor, resolve_impl


@triton.jit
def _merge_kernel(
    o_ptr, lse_ptr, out_ptr, out_lse_ptr,
    num_sources, num_heads, head_dim,
    stride_on, stride_os, stride_oh,
    stride_ln, stride_ls, stride_lh,
    stride_out_s, stride_out_h, stride_out_lse_s, stride_out_lse_h,
    BLOCK_SRC: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per (sequence, query head) row; the sources are walked in chunks so
    # that any number of them (GPUs, decode splits) fits in registers.
    row = tl.program_id(0)
    seq = row // num_heads
    head = row % num_heads
    src = tl.arange(0, BLOCK_SRC)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    lse_base = lse_ptr + seq * stride_ls + head * stride_lh
    o_base = o_ptr + seq * stride_os + head * stride_oh

    # Pass 1: the largest lse, so every weight below is exp(<= 0) and cannot overflow.
    m_vec = tl.full([BLOCK_SRC], float("-inf"), tl.float32)
    for n0 in range(0, num_sources, BLOCK_SRC):
        n = n0 + src
        lse = tl.load(lse_base + n * stride_ln, mask=n < num_sources, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse.to(tl.float32))
    m = tl.max(m_vec, 0)
    # All sources empty: shift by 0 so that exp(-inf - 0) = 0 instead of exp(nan).
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    # Pass 2: weighted sum. Empty sources are never read, so garbage in their `o`
    # (e.g. uninitialised scratch) cannot turn into NaN.
    acc = tl.zeros([BLOCK_D], tl.float32)
    total_vec = tl.zeros([BLOCK_SRC], tl.float32)
    for n0 in range(0, num_sources, BLOCK_SRC):
        n = n0 + src
        lse = tl.load(lse_base + n * stride_ln, mask=n < num_sources, other=float("-inf"))
        lse = lse.to(tl.float32)
        has_tokens = lse > float("-inf")
        weight = tl.where(has_tokens, tl.exp(lse - m_safe), 0.0)
        o = tl.load(
            o_base + n[:, None] * stride_on + d[None, :],
            mask=has_tokens[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(weight[:, None] * o, 0)
        total_vec += weight
    total = tl.sum(total_vec, 0)
    total_safe = tl.where(total > 0, total, 1.0)
    out = tl.where(total > 0, acc / total_safe, 0.0)
    out_lse = tl.where(total > 0, m_safe + tl.log(total_safe), float("-inf"))
    out_ptrs = out_ptr + seq * stride_out_s + head * stride_out_h + d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    tl.store(out_lse_ptr + seq * stride_out_lse_s + head * stride_out_lse_h, out_lse)


@triton.jit
def reduce_partials(
    part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, seq, kv, num_qo_heads, num_splits, active,
    stride_os, stride_oh, stride_ls, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MERGE_G: tl.constexpr, BLOCK_SPLITS: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Merge the first ``active`` of the ``num_splits`` partial states of one (sequence,
    KV head) into out / lse (the others hold no tokens and are not read).

    Loads bypass L1 (``.cg``): the partials were written by other programs of this launch.
    """
    g = tl.arange(0, MERGE_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    rows = (seq * num_qo_heads + kv * GROUP + g) * num_splits  # [MERGE_G] first partial
    sp = tl.arange(0, BLOCK_SPLITS)
    lse_all = tl.load(
        part_lse_ptr + rows[:, None] + sp[None, :],
        mask=g_ok[:, None] & (sp[None, :] < active), other=float("-inf"),
        cache_modifier=".cg",
    )  # fmt: skip
    m = tl.max(lse_all, 1)
    # All splits empty: shift by 0 so that exp(-inf - 0) = 0 instead of exp(nan).
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([MERGE_G, BLOCK_D], tl.float32)
    total = tl.zeros([MERGE_G], tl.float32)
    c = tl.arange(0, MERGE_CHUNK)
    for s0 in tl.static_range(0, BLOCK_SPLITS, MERGE_CHUNK):
        part = rows[:, None] + s0 + c[None, :]  # [MERGE_G, MERGE_CHUNK]
        ok = g_ok[:, None] & (s0 + c[None, :] < active)
        if MERGE_CHUNK == BLOCK_SPLITS:
            lse = lse_all
        else:
            lse = tl.load(part_lse_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        # Not masked by lse, so that these loads issue beside the lse loads (one L2 round
        # trip when a single chunk covers the splits); empty splits are zeroed below instead,
        # so whatever their scratch holds cannot become NaN.
        o = tl.load(
            part_o_ptr + part.to(tl.int64)[:, :, None] * HEAD_DIM + d[None, None, :],
            mask=ok[:, :, None] & (d[None, None, :] < HEAD_DIM), other=0.0,
            cache_modifier=".cg",
        )  # fmt: skip
        has_tokens = lse > float("-inf")
        weight = tl.where(has_tokens, tl.exp(lse - m_safe[:, None]), 0.0)
        o = tl.where(has_tokens[:, :, None], o, 0.0)
        acc += tl.sum(weight[:, :, None] * o, 1)
        total += tl.sum(weight, 1)
    nonempty = total > 0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, total, 1.0)[:, None], 0.0)
    lse = tl.where(nonempty, m_safe + tl.log(tl.where(nonempty, total, 1.0)), float("-inf"))
    heads = kv * GROUP + g
    o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (d[None, :] < HEAD_DIM))
    tl.store(lse_ptr + seq * stride_ls + heads * stride_lh, lse, mask=g_ok)


def merge_states_into(
    outputs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Launch the merge kernel writing into ``out`` ``[num_seqs, num_qo_heads, head_dim]``
    (any float dtype, last dimension contiguous) and ``lse`` ``[num_seqs, num_qo_heads]``
    fp32 (any strides).

    Shared with the split-K decode launcher; performs no checks and no host syncs.
    """
    num_sources, num_seqs, num_heads, head_dim = outputs.shape
    if num_seqs * num_heads == 0:
        return
    if outputs.stride(-1) != 1:
        outputs = outputs.contiguous()
    block_src = min(max(triton.next_power_of_2(num_sources), 2), 16)
    _merge_kernel[(num_seqs * num_heads,)](
        outputs, lses, out, lse,
        num_sources, num_heads, head_dim,
        *outputs.stride()[:3],
        *lses.stride(),
        out.stride(0), out.stride(1), *lse.stride(),
        BLOCK_SRC=block_src, BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        num_warps=2,
    )  # fmt: skip


def _merge_torch(outputs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lses = lses.float()
    m = lses.amax(dim=0) if lses.shape[0] else lses.new_full(lses.shape[1:], -math.inf)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    has_tokens = lses > -math.inf  # [num_sources, num_seqs, num_qo_heads]
    weights = torch.where(has_tokens, torch.exp(lses - m_safe), torch.zeros_like(lses))
    total = weights.sum(0)
    # Empty sources are masked out rather than multiplied by 0, so NaN in them cannot leak.
    acc = torch.einsum(
        "nsh,nshd->shd", weights, outputs.float().masked_fill(~has_tokens[..., None], 0)
    )
    nonempty = total > 0
    out = torch.where(nonempty[..., None], acc / total.clamp_min(1e-30)[..., None], 0.0)
    lse = torch.where(nonempty, m_safe + torch.log(total), -math.inf)
    return out, lse  # out in fp32: the caller rounds it once, to its dtype


def merge_attention_states(
    *,
    outputs: torch.Tensor,
    lses: torch.Tensor,
    impl: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over the union of disjoint token sets, from partial states.

    outputs: ``[num_sources, num_seqs, num_qo_heads, head_dim]`` fp16/bf16/fp32 — each
    source's normalised attention output over its own tokens.
    lses: ``[num_sources, num_seqs, num_qo_heads]`` float (fp32 expected), natural log;
    a source with ``lse = -inf`` had no tokens and contributes nothing (its ``outputs``
    entries are not read).
    impl: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA, PyTorch elsewhere).
    out_dtype: float dtype of ``out`` (default: the outputs'); the sum runs in fp32 and is
    rounded once, to it.

    Returns ``(out, lse)``: ``[num_seqs, num_qo_heads, head_dim]`` in ``out_dtype``
    and ``[num_seqs, num_qo_heads]`` fp32. All sources empty gives ``out = 0,
    lse = -inf``, never NaN. See :func:`longquest.kernels.ref.merge_attention_states_ref`.
    """
    check_tensor("outputs", outputs, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("lses", lses, ndim=3, dtypes=FLOAT_DTYPES, device=outputs.device)
    for dim, meaning in enumerate(("num_sources", "num_seqs", "num_qo_heads")):
        check_dim("lses", lses, dim, outputs.shape[dim], meaning)
    out_dtype = outputs.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be a float dtype, got {out_dtype}")
    impl = resolve_impl(impl, outputs.device)
    if impl == "torch":
        out, lse = _merge_torch(outputs, lses)
        return out.to(out_dtype), lse
    _, num_seqs, num_heads, head_dim = outputs.shape
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=out_dtype, device=outputs.device)
    lse = torch.empty(num_seqs, num_heads, dtype=torch.float32, device=outputs.device)
    merge_states_into(outputs, lses, out, lse)
    return out, lse
