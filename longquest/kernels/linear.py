"""``x @ weight^T (+ bias)`` for a few rows: the decode step's matmuls, at memory speed.

A decode step multiplies a handful of rows (one a sequence) by every weight matrix, so it
is a stream of weight bytes with almost no arithmetic. cuBLAS does not stream them fast at
these shapes: measured on an H200 at 8 rows, in CUDA graphs with L2 flushed
(``benchmarks/results/score-variants-weights-nvidia-h200-2026-11-30.json``), Llama-3.1-8B's
qkv (6144 x 4096) ran at 52% of copy bandwidth, o (4096 x 4096) at 40%, the split MLP's
gate/up (14336 x 4096) at 67% and down (4096 x 7168) at 50%: about 50 us a layer more than
the bytes need. Only the LM head (128256 rows) reached 94%.

The Triton kernel gives each program ``BLOCK_N`` output columns over the whole of K: the
weight tile ``[BLOCK_N, BLOCK_K]`` is the product's left operand and the rows ``x``
(padded to 16) its right one, so Triton streams the tiles into shared memory
``NUM_STAGES`` deep (``cp.async``) straight into the tensor cores. Accumulation is fp32,
as in cuBLAS. No split over K: every output is written once, by one program, so nothing
needs zeroing or a second pass; a small ``BLOCK_N`` gives enough programs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from longquest.kernels._checks import FLOAT_DTYPES, check_dim, check_tensor, resolve_impl
from longquest.kernels.merge import _wait_for_inputs, launch_options, pdl_enabled

MAX_ROWS = 16  # more rows: F.linear (prefill, large batches), where cuBLAS is compute-bound
_DTYPES = (torch.float16, torch.bfloat16)
# Tile and pipeline. Under trial: see benchmarks/score_variants.py.
_BLOCK_N = 32
_BLOCK_K = 256
_NUM_STAGES = 4
_NUM_WARPS = 4


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    num_rows, n, k,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns (weight rows)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows[None, :] * stride_xm + ks[:, None]  # [BLOCK_K, BLOCK_M]
    col_ok = cols < n
    row_ok = rows < num_rows
    _wait_for_inputs(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=col_ok[:, None], other=0.0)
            x = tl.load(x_ptrs + k0, mask=row_ok[None, :], other=0.0)
        else:
            k_ok = k0 + ks < k
            w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=row_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows[None, :] * stride_om + cols[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


def _linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    num_rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if num_rows == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand_as(out))
    device = x.device
    _linear_kernel[(triton.cdiv(n, _BLOCK_N),)](
        x, weight, bias if bias is not None else weight, out,
        num_rows, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
        EVEN_K=k % _BLOCK_K == 0, NUM_STAGES=_NUM_STAGES,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_PDL=pdl_enabled(device),
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, **launch_options(device),
    )  # fmt: skip
    return out


def linear(
    *, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """``x @ weight^T + bias``, as ``F.linear``, streamed by Triton when ``x`` has few rows.

    x: ``[num_rows, in_features]``; weight: ``[out_features, in_features]`` with a
    contiguous last dimension (a slice of a larger matrix is fine: its row stride is
    used); bias: ``[out_features]`` or None; all one dtype, on one device.
    Returns ``[num_rows, out_features]`` in that dtype, accumulated in fp32.
    ``impl=None`` runs the Triton kernel on CUDA for fp16/bf16 with ``num_rows <=
    MAX_ROWS``, ``impl="triton"`` for any float dtype with that many rows (fp32: exact
    products, for the CPU interpreter's tests); everything else runs ``F.linear``.
    Semantics: :func:`longquest.kernels.ref.linear_ref`.
    """
    check_tensor("x", x, ndim=2)
    device = x.device
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=device)
    check_dim("weight", weight, 1, x.shape[1], "in_features of x")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=device)
        check_dim("bias", bias, 0, weight.shape[0], "out_features of weight")
    fits = x.shape[0] <= MAX_ROWS and weight.stride(1) == 1
    if impl is None:
        impl = "triton" if device.type == "cuda" and fits and x.dtype in _DTYPES else "torch"
    if resolve_impl(impl, device) == "torch" or not fits:
        return F.linear(x, weight, bias)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.stride(1) != 1:
        x = x.contiguous()
    return _linear_triton(x, weight, bias)
