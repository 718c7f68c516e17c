"""RMSNorm and rotary embedding as one kernel each (decode is launch-bound on these).

In PyTorch, an RMSNorm is eight small kernels and the rotation of q and k eighteen;
at one token a step, a 32-layer model spends more time launching them than the
weights take to stream. Each function here is one Triton launch on CUDA and the
plain PyTorch math elsewhere (``impl="torch"``, the reference), computing exactly as
Hugging Face does: fp32 math, cast to the input dtype, then the weight product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import FLOAT_DTYPES, check_dim, check_tensor, resolve_impl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, size, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / size
    normed = (x * tl.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=ok)


def rms_norm(
    *, x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension.

    x: ``[..., size]`` fp16/bf16/fp32 (last dimension contiguous); weight: ``[size]``,
    x's dtype. Returns x's shape and dtype: ``weight * (x32 * rsqrt(mean(x32^2) + eps))``
    with the normalised value rounded to x's dtype before the product (as transformers).
    """
    check_tensor("x", x, ndim=x.dim() if isinstance(x, torch.Tensor) else 1, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=(x.dtype,), device=x.device)
    check_dim("weight", weight, 0, x.shape[-1], "x's last dimension")
    if resolve_impl(impl, x.device) == "torch":
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)
    size = x.shape[-1]
    rows = x.reshape(-1, size) if x.stride(-1) == 1 else x.contiguous().view(-1, size)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, rows.stride(0), out.stride(0), size, float(eps),
            BLOCK=triton.next_power_of_2(size), num_warps=4 if size <= 4096 else 8,
        )  # fmt: skip
    return out.view(x.shape)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, res_out_ptr, out_ptr, stride_x, stride_r, size, eps,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    # The sum is rounded to the model dtype first, as an eager residual add would.
    total = (x + res).to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * size + cols, total, mask=ok)
    total = total.to(tl.float32)
    mean_square = tl.sum(total * total, axis=0) / size
    normed = (total * tl.rsqrt(mean_square + eps)).to(out_ptr.dtype.element_ty)
    weight = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * size + cols, out, mask=ok)


def add_rms_norm(
    *,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one pass.

    x, residual: ``[num_tokens, size]``, one float dtype (last dimension contiguous);
    weight: ``[size]``. Returns ``(x + residual, rms_norm(x + residual))``, both new
    ``[num_tokens, size]`` tensors; the sum is rounded to the dtype before the norm.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; x has {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=1, dtypes=(x.dtype,), device=x.device)
    check_dim("weight", weight, 0, x.shape[1], "x's last dimension")
    if resolve_impl(impl, x.device) == "torch":
        total = x + residual
        return total, rms_norm(x=total, weight=weight, eps=eps, impl="torch")
    if x.stride(1) != 1 or residual.stride(1) != 1:
        x, residual = x.contiguous(), residual.contiguous()
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    num_tokens, size = x.shape
    if num_tokens:
        _add_rms_norm_kernel[(num_tokens,)](
            x, residual, weight, total, out, x.stride(0), residual.stride(0), size, float(eps),
            BLOCK=triton.next_power_of_2(size), num_warps=4 if size <= 4096 else 8,
        )  # fmt: skip
    return total, out


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_g, size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < size
    gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_g + size + cols, mask=ok, other=0.0)
    # Round silu(gate) to the dtype before the product, as eager PyTorch does.
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty)
    out = (act.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * size + cols, out, mask=ok)


def silu_mul(*, gate_up: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` from the fused projection ``[num_tokens, 2 * size]``
    (gate columns first, then up). Returns ``[num_tokens, size]`` in gate_up's dtype."""
    check_tensor("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have an even last dimension, got {gate_up.shape[1]}")
    if resolve_impl(impl, gate_up.device) == "torch":
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    num_tokens, size = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, size, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        block = 1024
        _silu_mul_kernel[(num_tokens, triton.cdiv(size, block))](
            gate_up, out, gate_up.stride(0), size, BLOCK=block
        )
    return out


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, num_qo_heads,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    head = tl.program_id(1)  # query heads first, then key heads
    dims = tl.arange(0, BLOCK)
    ok = dims < HALF
    cos = tl.load(cos_ptr + token * stride_ct + dims, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + token * stride_ct + dims, mask=ok, other=0.0)
    if head < num_qo_heads:
        src = q_ptr + token * stride_qt + head * stride_qh
        dst = q_out_ptr + (token * num_qo_heads + head) * 2 * HALF
    else:
        num_kv = tl.num_programs(1) - num_qo_heads
        kv_head = head - num_qo_heads
        src = k_ptr + token * stride_kt + kv_head * stride_kh
        dst = k_out_ptr + (token * num_kv + kv_head) * 2 * HALF
    x1 = tl.load(src + dims, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + dims, mask=ok, other=0.0).to(tl.float32)
    kind = q_out_ptr.dtype.element_ty
    tl.store(dst + dims, (x1 * cos - x2 * sin).to(kind), mask=ok)
    tl.store(dst + HALF + dims, (x2 * cos + x1 * sin).to(kind), mask=ok)


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x.float().split(half, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotate_query_key(
    *,
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (rotate-half convention) of a step's queries and keys.

    query: ``[num_tokens, num_qo_heads, head_dim]``; key: ``[num_tokens, num_kv_heads,
    head_dim]``; one float dtype, head_dim even, last dimension contiguous (views of a
    fused qkv projection are fine). cos, sin: ``[num_tokens, head_dim // 2]`` fp32.
    Returns new contiguous ``(query, key)`` in the input dtype (fp32 math).
    """
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    device = query.device
    check_tensor("key", key, ndim=3, dtypes=(query.dtype,), device=device)
    num_tokens, num_qo_heads, head_dim = query.shape
    check_dim("key", key, 0, num_tokens, "num_tokens")
    check_dim("key", key, 2, head_dim, "head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for the rotary embedding, got {head_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, ndim=2, dtypes=(torch.float32,), device=device)
        check_dim(name, table, 0, num_tokens, "num_tokens")
        check_dim(name, table, 1, head_dim // 2, "head_dim // 2")
    if resolve_impl(impl, device) == "torch":
        return _rotate_torch(query, cos, sin), _rotate_torch(key, cos, sin)
    if query.stride(2) != 1 or key.stride(2) != 1:
        query, key = query.contiguous(), key.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype, device=device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=device)
    if num_tokens:
        half = head_dim // 2
        _rope_kernel[(num_tokens, num_qo_heads + key.shape[1])](
            query, key, cos, sin, q_out, k_out,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos.stride(0),
            num_qo_heads, HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1,
        )  # fmt: skip
    return q_out, k_out
