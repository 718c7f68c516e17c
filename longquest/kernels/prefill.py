"""Prefill attention: a chunk of consecutive queries over contiguous keys from position 0.

On CUDA in bf16/fp16 the GPU path calls cuDNN's fused attention through torch, split
where the causal mask's diagonal is (below): 600-640 TFLOP/s on an H200 for 8K-32K-token
chunks over 64K-128K keys, against 460-500 for the Triton kernel
(``benchmarks/prefill_forms.py``). The Triton kernel runs where cuDNN does not (fp32, head
dims past 128, no cuDNN attention in the torch build): a flash-attention forward,
tensor-core ``tl.dot`` with fp32 accumulation, an online softmax in base 2, causal
masking offset by ``query_start``, key blocks that are fully masked skipped and fully
visible ones run without masks. The PyTorch path (the engine's CPU prefill) walks key
blocks with the same online softmax so memory stays bounded at long contexts.

The split: keys before ``query_start`` are visible to every query, so one call attends
them with no mask, with the query heads of a KV group folded into the query length (no
copy of K/V per query head); the keys from ``query_start`` on are visible to query ``i``
iff their offset is ``<= i``: torch's top-left causal mask, a second call. The two
partial results merge exactly by their LSE.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import (
    FLOAT_DTYPES,
    check_dim,
    check_group,
    check_tensor,
    resolve_impl,
)
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc, l, m, q, k_ptrs, v_ptrs, n0, offs_n, q_pos, d_mask, num_k, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    k_pos = n0 + offs_n
    if MASKED:
        load_mask = (k_pos < num_k)[:, None] & d_mask[None, :]
    else:
        load_mask = d_mask[None, :]
    k = tl.load(k_ptrs, mask=load_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
    if MASKED:
        visible = (k_pos < num_k)[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 1))
    # A row with no visible key yet keeps m = -inf; shift by 0 to avoid inf - inf.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m - m_use)
    v = tl.load(v_ptrs, mask=load_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    l = l * alpha + tl.sum(p, 1)
    return acc, l, m_new


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    num_q, num_k, query_start, group, head_dim, qk_scale,
    stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
    stride_om, stride_oh, stride_lm,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    kv = head // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < num_q
    d_mask = d < head_dim
    q = tl.load(
        q_ptr + offs_m[:, None] * stride_qm + head * stride_qh + d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(k_ptr.dtype.element_ty)
    q_pos = query_start + offs_m

    if CAUSAL:
        # Keys past the block's last query are masked for every row: never visited.
        hi = tl.minimum(num_k, query_start + tl.minimum(start_m + BLOCK_M, num_q))
        # Keys up to the block's first query are visible to every row: no mask needed.
        full_end = tl.minimum(num_k, query_start + start_m + 1)
    else:
        hi = num_k
        full_end = num_k
    full_end = (full_end // BLOCK_N) * BLOCK_N

    k_ptrs = k_ptr + offs_n[:, None] * stride_km + kv * stride_kh + d[None, :]
    v_ptrs = v_ptr + offs_n[:, None] * stride_vm + kv * stride_vh + d[None, :]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        acc, l, m = _attend_block(
            acc, l, m, q, k_ptrs + n0 * stride_km, v_ptrs + n0 * stride_vm, n0, offs_n, q_pos,
            d_mask, num_k, qk_scale, False, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
    for n0 in range(full_end, hi, BLOCK_N):
        acc, l, m = _attend_block(
            acc, l, m, q, k_ptrs + n0 * stride_km, v_ptrs + n0 * stride_vm, n0, offs_n, q_pos,
            d_mask, num_k, qk_scale, True, CAUSAL, DOT_PRECISION,
        )  # fmt: skip

    nonempty = l > 0
    l_safe = tl.where(nonempty, l, 1.0)
    out = tl.where(nonempty[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(nonempty, (m + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    o_ptrs = o_ptr + offs_m[:, None] * stride_om + head * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + offs_m * stride_lm + head, lse, mask=m_mask)


def _prefill_config(device: torch.device, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes: large tiles for tensor cores on CUDA, small ones for the CPU interpreter."""
    if device.type != "cuda":
        return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4}
    if dtype == torch.float32 or head_dim > 128:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def _prefill_triton(query, key, value, query_start, causal, scale):
    num_q, num_qo_heads, head_dim = query.shape
    num_k, num_kv_heads, _ = key.shape
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty(num_q, num_qo_heads, dtype=torch.float32, device=query.device)
    if num_q == 0:
        return out, lse
    config = _prefill_config(query.device, head_dim, key.dtype)
    grid = (triton.cdiv(num_q, config["BLOCK_M"]), num_qo_heads)
    _prefill_kernel[grid](
        query, key, value, out, lse,
        num_q, num_k, query_start, num_qo_heads // num_kv_heads, head_dim, scale * _LOG2E,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        CAUSAL=causal, BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        DOT_PRECISION="ieee" if key.dtype == torch.float32 else "tf32",
        **config,
    )  # fmt: skip
    return out, lse


def _prefill_torch(
    query, key, value, query_start, causal, scale, block_k=1024, max_logits=1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked over queries and keys with an online softmax, vectorised over heads.

    A logits tile holds at most ``max(max_logits, num_qo_heads * block_k)`` fp32 values
    (``[num_kv_heads, group * block_q, block_k]``), however long the context.
    """
    num_q, num_qo_heads, head_dim = query.shape
    num_k, num_kv_heads, _ = key.shape
    group = num_qo_heads // num_kv_heads
    device = query.device
    block_q = max(1, max_logits // (num_qo_heads * block_k))
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty(num_q, num_qo_heads, dtype=torch.float32, device=device)
    for q0 in range(0, num_q, block_q):
        q1 = min(q0 + block_q, num_q)
        rows = q1 - q0
        # [num_kv_heads, group * rows, head_dim], rows ordered (g, i).
        q = query[q0:q1].float().reshape(rows, num_kv_heads, group, head_dim)
        q = q.permute(1, 2, 0, 3).reshape(num_kv_heads, group * rows, head_dim) * scale
        q_pos = (torch.arange(q0, q1, device=device) + query_start).repeat(group)
        hi = min(num_k, query_start + q1) if causal else num_k
        m = torch.full((num_kv_heads, group * rows), -math.inf, device=device)
        l = torch.zeros_like(m)
        acc = torch.zeros(num_kv_heads, group * rows, head_dim, device=device)
        for k0 in range(0, hi, block_k):
            k1 = min(k0 + block_k, hi)
            k = key[k0:k1].float().transpose(0, 1)  # [num_kv_heads, keys, head_dim]
            v = value[k0:k1].float().transpose(0, 1)
            logits = q @ k.transpose(1, 2)  # [num_kv_heads, group * rows, keys]
            if causal and k1 - 1 > query_start + q0:  # only blocks crossing the diagonal
                hidden = torch.arange(k0, k1, device=device)[None, :] > q_pos[:, None]
                logits = logits.masked_fill(hidden, -math.inf)
            m_new = torch.maximum(m, logits.amax(-1))
            m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(logits - m_use[..., None])
            alpha = torch.exp(m - m_use)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v
            m = m_new
        nonempty = l > 0
        o = torch.where(nonempty[..., None], acc / l.clamp_min(1e-30)[..., None], 0.0)
        s = torch.where(nonempty, m + torch.log(l), -math.inf)
        out[q0:q1] = o.view(num_qo_heads, rows, head_dim).transpose(0, 1).to(query.dtype)
        lse[q0:q1] = s.view(num_qo_heads, rows).transpose(0, 1)
    return out, lse


_CUDNN = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)


def _cudnn_takes(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether cuDNN's fused attention takes these inputs (else the Triton kernel runs)."""
    return (
        _CUDNN is not None
        and query.device.type == "cuda"
        and key.dtype in (torch.bfloat16, torch.float16)
        and query.shape[2] % 8 == 0
        and query.shape[2] <= 128
        and torch.backends.cudnn.is_available()
        and torch.cuda.get_device_capability(query.device) >= (9, 0)
    )


def _cudnn_call(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, heads, L, D]`` query, ``[1, heads, S, D]`` keys and values -> output
    ``[1, heads, L, D]`` and natural-log LSE ``[1, heads, L]`` fp32."""
    out, lse = _CUDNN(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse.float().reshape(out.shape[:3])


def _prefill_cudnn(query, key, value, query_start, causal, scale):
    from longquest.kernels.merge import merge_attention_states

    num_q, num_qo_heads, head_dim = query.shape
    num_k, num_kv_heads, _ = key.shape
    group = num_qo_heads // num_kv_heads
    query = query.to(key.dtype)
    split = min(query_start, num_k) if causal else num_k
    parts = []
    if split > 0:
        # [1, num_kv_heads, group * num_q, head_dim]: a group's query heads one after another.
        q = query.view(num_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        q = q.reshape(1, num_kv_heads, group * num_q, head_dim)
        out, lse = _cudnn_call(
            q, key[:split].transpose(0, 1)[None], value[:split].transpose(0, 1)[None],
            False, scale,
        )  # fmt: skip
        out = out.view(num_kv_heads, group, num_q, head_dim).permute(2, 0, 1, 3)
        lse = lse.view(num_kv_heads, group, num_q).permute(2, 0, 1)
        parts.append((out.reshape(num_q, num_qo_heads, head_dim), lse.reshape(num_q, -1)))
    if split < num_k:
        k = key[split:].repeat_interleave(group, dim=1).transpose(0, 1)[None]
        v = value[split:].repeat_interleave(group, dim=1).transpose(0, 1)[None]
        out, lse = _cudnn_call(query.transpose(0, 1)[None], k, v, True, scale)
        parts.append((out[0].transpose(0, 1), lse[0].transpose(0, 1)))
    if len(parts) == 1:
        out, lse = parts[0]
    else:
        out, lse = merge_attention_states(
            outputs=torch.stack([p[0] for p in parts]), lses=torch.stack([p[1] for p in parts])
        )
    return out.contiguous(), lse.contiguous()


# PyTorch's fused CPU flash attention also returns the LSE (natural log), which the
# context-parallel prefill needs; ~5x faster than the blocked path on the CPU.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefill_cpu_flash(
    query, key, value, query_start, causal, scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with an offset as two fused calls merged exactly.

    Keys ``< query_start`` are visible to every query (no mask); key
    ``query_start + t`` is visible to query ``i`` iff ``t <= i`` — PyTorch's
    top-left-aligned causal mask over the remaining keys.
    """
    from longquest.kernels.merge import merge_attention_states

    num_q, num_qo_heads, head_dim = query.shape
    group = num_qo_heads // key.shape[1]
    split = min(query_start, key.shape[0]) if causal else key.shape[0]

    def fused(k, v, is_causal):
        q = query.float().transpose(0, 1)[None]  # [1, num_qo_heads, num_q, head_dim]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
        out, lse = _CPU_FLASH(q, k, v, 0.0, is_causal, attn_mask=None, scale=scale)
        return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()

    parts = []
    if split > 0:
        parts.append(fused(key[:split], value[:split], False))
    if split < key.shape[0]:
        parts.append(fused(key[split:], value[split:], True))
    if not parts:
        return (
            torch.zeros_like(query),
            torch.full((num_q, num_qo_heads), -math.inf, device=query.device),
        )
    if len(parts) == 1:
        out, lse = parts[0]
    else:
        out, lse = merge_attention_states(
            outputs=torch.stack([p[0] for p in parts]), lses=torch.stack([p[1] for p in parts])
        )
    return out.to(query.dtype).contiguous(), lse.contiguous()


def prefill_attention(
    *,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start: int,
    causal: bool = True,
    scale: float | None = None,
    impl: str | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of consecutive query positions over contiguous keys.

    query: ``[num_q, num_qo_heads, head_dim]`` fp16/bf16/fp32 at positions
    ``query_start .. query_start + num_q - 1``.
    key, value: ``[num_k, num_kv_heads, head_dim]``, one float dtype, at positions
    ``0 .. num_k - 1`` (the Triton path rounds the query to their dtype for the
    tensor-core product). Query head ``h`` reads KV head ``h // (num_qo_heads //
    num_kv_heads)``.
    query_start: position of the first query, ``>= 0``.
    causal: a query at position ``p`` sees keys ``<= p``; otherwise every key.
    scale: logit scale, default ``head_dim ** -0.5``.
    impl: ``"triton"`` (the GPU path: cuDNN where it takes the inputs and the chunk has
        at least ``tuning.prefill_cudnn_min_queries`` queries, else the Triton kernel),
        ``"torch"`` or ``None`` (the GPU path on CUDA, PyTorch elsewhere).

    Returns ``(out, lse)``: ``[num_q, num_qo_heads, head_dim]`` in the query's dtype and
    ``[num_q, num_qo_heads]`` fp32, natural log (``out = 0, lse = -inf`` for a query
    that sees no key). See :func:`longquest.kernels.ref.prefill_attention_ref`.
    """
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    device = query.device
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("value", value, ndim=3, dtypes=(key.dtype,), device=device)
    if value.shape != key.shape:
        raise ValueError(
            f"value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}"
        )
    check_dim("key", key, 2, query.shape[2], "head_dim, as in query")
    check_group(query.shape[1], key.shape[1])
    if isinstance(query_start, bool) or not isinstance(query_start, int) or query_start < 0:
        raise ValueError(f"query_start must be an int >= 0, got {query_start!r}")
    impl = resolve_impl(impl, device)
    scale = query.shape[2] ** -0.5 if scale is None else float(scale)
    if impl == "torch":
        if device.type == "cpu" and _CPU_FLASH is not None and query.shape[0] and key.shape[0]:
            return _prefill_cpu_flash(query, key, value, query_start, bool(causal), scale)
        return _prefill_torch(query, key, value, query_start, bool(causal), scale)
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    cudnn = query.shape[0] >= tuning.prefill_cudnn_min_queries and key.shape[0]
    if cudnn and _cudnn_takes(query, key):
        return _prefill_cudnn(query, key, value, query_start, bool(causal), scale)
    return _prefill_triton(query, key, value, query_start, bool(causal), scale)
