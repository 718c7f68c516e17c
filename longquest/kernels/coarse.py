"""Coarse bounds of page groups for the two-level selection (:mod:`.two_level`).

A group's coarse bounds are the element-wise min / max of its pages' bounds: exact in the
bounds' own dtype (fp8 included: a min or max of representable values is one of them), so
a group's score bounds every page's score in it. :func:`coarse_bounds` builds many
groups at once (PyTorch; the engine runs it when a batch is built, outside the captured
step); :func:`refresh_last_full_group` recomputes one group a row, every layer, in one
launch, from inside the captured decode step: the last group whose pages are all full,
so a group is final from the first step after its last page fills.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import (
    BOUNDS_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_tensor,
    resolve_impl,
)


@triton.jit
def _refresh_kernel(
    key_min_ptr, key_max_ptr, coarse_min_ptr, coarse_max_ptr, page_table_ptr, full_pages_ptr,
    num_kv_heads, max_groups, width,
    stride_bl, stride_bp, stride_bh, stride_cl, stride_cp, stride_ch, stride_ts,
    GROUP_PAGES: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    layer = tl.program_id(1) // num_kv_heads
    head = tl.program_id(1) % num_kv_heads
    group = tl.load(full_pages_ptr + row).to(tl.int32) // GROUP_PAGES - 1
    if group >= 0:
        cols = group * GROUP_PAGES + tl.arange(0, BLOCK_G)
        in_group = (tl.arange(0, BLOCK_G) < GROUP_PAGES) & (cols < width)
        ids = tl.load(page_table_ptr + row.to(tl.int64) * stride_ts + cols, mask=in_group, other=0)
        dims = tl.arange(0, BLOCK_D)
        offsets = (layer.to(tl.int64) * stride_bl + ids.to(tl.int64)[:, None] * stride_bp
                   + head * stride_bh + dims[None, :])  # fmt: skip
        mask = in_group[:, None] & (dims[None, :] < HEAD_DIM)
        lo = tl.load(key_min_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(key_max_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(mask, lo, float("inf")), axis=0)
        hi = tl.max(tl.where(mask, hi, float("-inf")), axis=0)
        out = (layer.to(tl.int64) * stride_cl + (row.to(tl.int64) * max_groups + group) * stride_cp
               + head * stride_ch + dims)  # fmt: skip
        # The min / max is one of the loaded values: converting back to their dtype is exact.
        tl.store(coarse_min_ptr + out, lo.to(coarse_min_ptr.dtype.element_ty), mask=dims < HEAD_DIM)
        tl.store(coarse_max_ptr + out, hi.to(coarse_max_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def coarse_bounds(
    *, key_min: torch.Tensor, key_max: torch.Tensor, pages: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse bounds of page groups: the element-wise min / max of their pages' bounds.

    key_min, key_max: ``[..., num_pages_total, num_kv_heads, head_dim]`` (leading dims,
    e.g. layers, are kept), any bounds dtype.
    pages: ``[num_groups, group_pages]`` int physical page ids, ``-1`` past a group's end;
    every group has at least one page.
    Returns ``(coarse_min, coarse_max)``, ``[..., num_groups, num_kv_heads, head_dim]`` in
    the bounds' dtype: exact (a min or max of values of a dtype is one of them).
    Plain PyTorch: the engine runs it outside the captured decode step, when groups fill.
    """
    check_tensor("key_min", key_min, ndim=key_min.dim(), dtypes=BOUNDS_DTYPES)
    check_tensor("key_max", key_max, ndim=key_min.dim(), dtypes=(key_min.dtype,),
                 device=key_min.device)  # fmt: skip
    if key_min.dim() < 3 or key_max.shape != key_min.shape:
        raise ValueError(
            f"key_min and key_max must be [..., num_pages_total, num_kv_heads, head_dim] of "
            f"one shape, got {tuple(key_min.shape)} and {tuple(key_max.shape)}"
        )
    check_tensor("pages", pages, ndim=2, dtypes=INDEX_DTYPES, device=key_min.device)
    valid = (pages >= 0)[:, :, None, None]  # [num_groups, group_pages, 1, 1]
    ids = pages.long().clamp(min=0)
    lo = key_min[..., ids, :, :].float().masked_fill(~valid, math.inf).amin(dim=-3)
    hi = key_max[..., ids, :, :].float().masked_fill(~valid, -math.inf).amax(dim=-3)
    return lo.to(key_min.dtype), hi.to(key_max.dtype)


def _refresh_torch(key_min, key_max, coarse_min, coarse_max, page_table, full_pages, group_pages):
    rows, width = page_table.shape
    max_groups = coarse_min.shape[1] // rows
    group = torch.div(full_pages.long(), group_pages, rounding_mode="floor") - 1  # [rows]
    cols = group.clamp(min=0)[:, None] * group_pages + torch.arange(
        group_pages, device=group.device
    )
    pages = torch.where(cols < width, page_table.long().gather(1, cols.clamp(max=width - 1)), -1)
    lo, hi = coarse_bounds(key_min=key_min, key_max=key_max, pages=pages)  # [L, rows, Hkv, D]
    slots = torch.arange(rows, device=group.device) * max_groups + group.clamp(min=0)
    keep = (group >= 0)[None, :, None, None]
    coarse_min[:, slots] = torch.where(keep, lo, coarse_min[:, slots])
    coarse_max[:, slots] = torch.where(keep, hi, coarse_max[:, slots])


def refresh_last_full_group(
    *,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    coarse_min: torch.Tensor,
    coarse_max: torch.Tensor,
    page_table: torch.Tensor,
    full_pages: torch.Tensor,
    group_pages: int,
    impl: str | None = None,
) -> None:
    """Recompute, in every layer, the coarse bounds of each row's last group of full pages.

    key_min, key_max: ``[num_layers, num_pages_total, num_kv_heads, head_dim]``.
    coarse_min, coarse_max: ``[num_layers, num_seqs * max_groups, num_kv_heads, head_dim]``,
    the same dtype; row ``s``'s group ``g`` at ``s * max_groups + g``. In place.
    page_table: ``[num_seqs, width]`` int32 physical pages of each row, position order.
    full_pages: ``[num_seqs]`` int — the row's first pages that are full and written; group
    ``full_pages // group_pages - 1`` is recomputed (none where that is negative).
    No host sync: the engine runs it inside the captured decode step.
    """
    check_tensor("key_min", key_min, ndim=4, dtypes=BOUNDS_DTYPES)
    device = key_min.device
    for name, tensor in (("key_max", key_max), ("coarse_min", coarse_min),
                         ("coarse_max", coarse_max)):  # fmt: skip
        check_tensor(name, tensor, ndim=4, dtypes=(key_min.dtype,), device=device)
    check_tensor("page_table", page_table, ndim=2, dtypes=INDEX_DTYPES, device=device)
    rows = page_table.shape[0]
    check_tensor("full_pages", full_pages, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_dim("full_pages", full_pages, 0, rows, "num_seqs")
    if rows == 0 or coarse_min.shape[1] % rows:
        if rows == 0:
            return
        raise ValueError(f"coarse_min has {coarse_min.shape[1]} groups, not a multiple of {rows}")
    if resolve_impl(impl, device) == "torch":
        _refresh_torch(key_min, key_max, coarse_min, coarse_max, page_table, full_pages,
                       group_pages)  # fmt: skip
        return
    layers, _, kv_heads, head_dim = key_min.shape
    if page_table.stride(1) != 1:
        page_table = page_table.contiguous()
    _refresh_kernel[(rows, layers * kv_heads)](
        key_min, key_max, coarse_min, coarse_max, page_table, full_pages,
        kv_heads, coarse_min.shape[1] // rows, page_table.shape[1],
        key_min.stride(0), key_min.stride(1), key_min.stride(2),
        coarse_min.stride(0), coarse_min.stride(1), coarse_min.stride(2), page_table.stride(0),
        GROUP_PAGES=group_pages, BLOCK_G=triton.next_power_of_2(group_pages), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
