"""Tiles of Quest's page bounds shared by the score kernels (:mod:`.scores`, the one-level
scan, and :mod:`.two_level`, the fine pass over kept groups): loading a block of pages'
bounds, the bound in CUDA-core arithmetic, the query's sign split for the tensor-core
bound, and when that form is exact."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longquest.kernels.float8 import FLOAT8_DTYPE

# tl.dot's smallest M, the tensor-core forms' BLOCK_G: larger GQA groups go elementwise.
DOT_MAX_GROUP = 16


@triton.jit
def load_bounds(key_min_ptr, key_max_ptr, ids, valid, head_offset, dims, stride_bp, HEAD_DIM):
    """The ``[len(ids), len(dims)]`` min and max tiles of pages ``ids`` at one KV head
    (``head_offset``); masked rows and dims load 0."""
    offsets = ids.to(tl.int64)[:, None] * stride_bp + head_offset + dims[None, :]
    mask = valid[:, None] & (dims[None, :] < HEAD_DIM)
    kmin = tl.load(key_min_ptr + offsets, mask=mask, other=0.0)
    kmax = tl.load(key_max_ptr + offsets, mask=mask, other=0.0)
    return kmin, kmax


@triton.jit
def best_bound_elementwise(
    q_base, stride_qh, kmin, kmax, dims,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_P]`` fp32: each page's bound ``sum_d max(q_d * kmin_d, q_d * kmax_d)``,
    maxed over the ``GROUP`` query heads of one KV head (head ``g`` at ``q_base + g *
    stride_qh``), in CUDA-core arithmetic: the form for fp32 without tensor cores, GQA
    groups past ``DOT_MAX_GROUP`` and the interpreter."""
    lo = kmin.to(tl.float32)
    hi = kmax.to(tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in range(GROUP):
        q = tl.load(q_base + g * stride_qh + dims, mask=dims < HEAD_DIM, other=0.0)
        q = q.to(tl.float32)
        best = tl.maximum(best, tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1))
    return best


@triton.jit
def query_signs(q, key_min_ptr, query_ptr):
    """``(relu(q), min(q, 0))`` in the tensor-core products' input dtype: the query's own,
    or fp16 for fp8 bounds (e4m3 pairs convert to fp16 in one instruction, to bf16 in
    several), the query then clamped into fp16's range."""
    if key_min_ptr.dtype.element_ty == tl.float8e4nv:
        q_pos = tl.minimum(tl.where(q > 0, q, 0.0), 65504.0).to(tl.float16)
        q_neg = tl.maximum(tl.where(q < 0, q, 0.0), -65504.0).to(tl.float16)
    else:
        q_pos = tl.where(q > 0, q, 0.0).to(query_ptr.dtype.element_ty)
        q_neg = tl.where(q < 0, q, 0.0).to(query_ptr.dtype.element_ty)
    return q_pos, q_neg


def dot_options(query: torch.Tensor, key_min: torch.Tensor) -> dict:
    """Tensor-core scoring where it is exact: on CUDA, query and bounds of one dtype (fp32
    through the ``ieee`` path), or fp8 bounds with an fp16/bf16 query (both taken to fp16
    in registers), for GQA groups of up to 16 query heads. The interpreter keeps the
    elementwise form."""
    upcast = key_min.dtype == FLOAT8_DTYPE and query.dtype in (torch.float16, torch.bfloat16)
    same = query.dtype == key_min.dtype
    # The product pads the group to 16 query heads; a larger group is scored elementwise.
    small_group = query.shape[1] <= DOT_MAX_GROUP * key_min.shape[1]
    use_dot = query.device.type == "cuda" and (same or upcast) and small_group
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    return {"USE_DOT": use_dot, "DOT_PRECISION": precision}
