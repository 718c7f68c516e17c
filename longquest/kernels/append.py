"""Append new tokens' K/V to the paged cache and refresh the touched pages' key bounds.

Plan/run split: :func:`plan_append` turns a step's ``slot_mapping`` into *runs* — maximal
groups of consecutive tokens whose slots are consecutive in one page — once per step (it
syncs with the host), and every layer's :func:`append_kv` reuses the plan. The Triton
kernel runs one program per (run, KV head): it stores the run's keys and values and
recomputes the page's bounds from the page's earlier slots ``[0, page_offset)``, read back
from the cache, plus the run's new keys. That covers a decode token, a prefill chunk that
starts mid-page and a partial last page alike, and no two programs touch one page (the plan
rejects a page split across runs, which would race).

The bounds are stored in the cache's dtype (exact: a min or max of model-dtype keys is a
model-dtype value) or in fp8 e4m3fn, rounded outward — min down, max up — so they still
bound every key (:mod:`longquest.kernels.float8`); keys beyond +-448 are clamped there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import (
    BOUNDS_DTYPES,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dim,
    check_tensor,
    resolve_impl,
)
from longquest.kernels.float8 import (
    FLOAT8_DTYPE,
    check_bounds_dtype,
    check_float8_supported,
    directed_float8,
    store_bounds,
)


@triton.jit
def _append_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    key_min_ptr,
    key_max_ptr,
    page_ids_ptr,
    page_offsets_ptr,
    token_starts_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcp,
    stride_kch,
    stride_kcs,
    stride_vcp,
    stride_vch,
    stride_vcs,
    stride_bp,
    stride_bh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    FLOAT8_BOUNDS: tl.constexpr,
):
    run = tl.program_id(0)
    head = tl.program_id(1)
    # int64: page * page stride overflows int32 for pools past ~2G elements.
    page = tl.load(page_ids_ptr + run).to(tl.int64)
    # A negative page skips the run (plan_decode_append: a row this rank does not store).
    keep = page >= 0
    page = tl.maximum(page, 0)
    first = tl.load(page_offsets_ptr + run)
    token_start = tl.load(token_starts_ptr + run)
    end = tl.where(keep, first + tl.load(token_starts_ptr + run + 1) - token_start, 0)
    first = tl.where(keep, first, 0)

    slots = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    is_new = (slots >= first) & (slots < end)
    is_old = slots < first
    new_mask = is_new[:, None] & dim_ok[None, :]
    tokens = (token_start + slots - first).to(tl.int64)

    k_src = key_ptr + tokens[:, None] * stride_kt + head * stride_kh + dims[None, :]
    v_src = value_ptr + tokens[:, None] * stride_vt + head * stride_vh + dims[None, :]
    k_new = tl.load(k_src, mask=new_mask)
    v_new = tl.load(v_src, mask=new_mask)
    k_dst = k_cache_ptr + page * stride_kcp + head * stride_kch + slots[:, None] * stride_kcs
    v_dst = v_cache_ptr + page * stride_vcp + head * stride_vch + slots[:, None] * stride_vcs
    tl.store(k_dst + dims[None, :], k_new, mask=new_mask)
    tl.store(v_dst + dims[None, :], v_new, mask=new_mask)

    # The page's earlier slots come from the cache; this program is the page's only writer.
    k_old = tl.load(k_dst + dims[None, :], mask=is_old[:, None] & dim_ok[None, :])
    keys = tl.where(is_new[:, None], k_new, k_old).to(tl.float32)
    filled = (slots < end)[:, None]
    # fp32 min/max of stored-dtype values cast back to that dtype is exact.
    low = tl.min(tl.where(filled, keys, float("inf")), axis=0)
    high = tl.max(tl.where(filled, keys, float("-inf")), axis=0)
    bound = page * stride_bp + head * stride_bh + dims
    bound_ok = dims < tl.where(keep, HEAD_DIM, 0)
    if FLOAT8_BOUNDS:  # rounded outward, so the stored bounds still bound every key
        low_out = directed_float8(low, True)
        high_out = directed_float8(high, False)
    else:
        low_out = low.to(key_min_ptr.dtype.element_ty)
        high_out = high.to(key_max_ptr.dtype.element_ty)
    tl.store(key_min_ptr + bound, low_out, mask=bound_ok)
    tl.store(key_max_ptr + bound, high_out, mask=bound_ok)


@dataclass(frozen=True, kw_only=True)
class AppendPlan:
    """Where one step's new tokens go, grouped into runs; built by :func:`plan_append`.

    page_ids: ``[num_runs]`` int32 — the page each run writes (each page in one run only).
    page_offsets: ``[num_runs]`` int32 — slot within the page of the run's first token.
    token_starts: ``[num_runs + 1]`` int32 — run ``r`` covers tokens
        ``token_starts[r] : token_starts[r + 1]`` (at most ``page_size`` of them).
    slot_mapping: ``[num_tokens]`` int — the slots the plan was built from.
    The ints are host-side facts, so launchers validate without a device sync.
    """

    page_ids: torch.Tensor
    page_offsets: torch.Tensor
    token_starts: torch.Tensor
    slot_mapping: torch.Tensor
    page_size: int
    num_tokens: int
    max_run_length: int
    max_page_id: int

    @property
    def num_runs(self) -> int:
        """Number of runs (and of touched pages)."""
        return self.page_ids.shape[0]


def plan_append(*, slot_mapping: torch.Tensor, page_size: int) -> AppendPlan:
    """Group a step's slots into runs; build once per step and reuse for every layer.

    slot_mapping: ``[num_tokens]`` int32/int64 — ``page_id * page_size + offset`` of each
    new token. Syncs with the host once (the run count is data-dependent). The returned
    plan's tensors live on ``slot_mapping``'s device.
    Raises ValueError for negative slots or a page whose tokens do not form one run of
    consecutive slots (two programs would write the page concurrently).
    """
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    slots = slot_mapping.detach().to("cpu", torch.int64)
    num_tokens = slots.shape[0]
    if num_tokens and int(slots.min()) < 0:
        raise ValueError(
            f"slot_mapping has a negative slot ({int(slots.min())}); every slot must be "
            "page_id * page_size + offset with page_id >= 0"
        )
    pages, offsets = slots // page_size, slots % page_size
    starts_run = torch.ones(num_tokens, dtype=torch.bool)
    if num_tokens > 1:
        continues = (pages[1:] == pages[:-1]) & (offsets[1:] == offsets[:-1] + 1)
        starts_run[1:] = ~continues
    firsts = torch.nonzero(starts_run).flatten()
    page_ids = pages[firsts]
    if torch.unique(page_ids).numel() != page_ids.numel():
        values, counts = torch.unique(page_ids, return_counts=True)
        page = int(values[counts > 1][0])
        raise ValueError(
            f"slot_mapping writes page {page} in separate runs; the tokens of one page must "
            "have consecutive slots in consecutive positions of slot_mapping"
        )
    token_starts = torch.cat([firsts, torch.tensor([num_tokens])])
    lengths = token_starts.diff()
    # One host-to-device copy for all three index arrays.
    packed = torch.cat([page_ids, offsets[firsts], token_starts]).to(torch.int32)
    packed = packed.to(slot_mapping.device)
    num_runs = page_ids.numel()
    return AppendPlan(
        page_ids=packed[:num_runs],
        page_offsets=packed[num_runs : 2 * num_runs],
        token_starts=packed[2 * num_runs :],
        slot_mapping=slot_mapping,
        page_size=page_size,
        num_tokens=num_tokens,
        max_run_length=int(lengths.max()) if num_runs else 0,
        max_page_id=int(page_ids.max()) if num_runs else -1,
    )


def plan_decode_append(
    *, page_ids: torch.Tensor, page_offsets: torch.Tensor, page_size: int
) -> AppendPlan:
    """The append plan of a decode step (one new token per row), built without a host sync.

    page_ids: ``[num_seqs]`` int32 — the page each row's token goes to, or ``-1`` to skip
    the row (sequence parallelism: another rank stores it).
    page_offsets: ``[num_seqs]`` int32 — the slot within that page.
    Both stay referenced by the plan, so a caller may refill them in place between CUDA
    graph replays. The page ids are trusted (no range check: that would sync); the rows'
    pages must differ, as they do for distinct sequences.
    """
    check_tensor("page_ids", page_ids, ndim=1, dtypes=(torch.int32,))
    device = page_ids.device
    check_tensor("page_offsets", page_offsets, ndim=1, dtypes=(torch.int32,), device=device)
    num_rows = page_ids.shape[0]
    check_dim("page_offsets", page_offsets, 0, num_rows, "num_seqs")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    return AppendPlan(
        page_ids=page_ids,
        page_offsets=page_offsets,
        token_starts=torch.arange(num_rows + 1, dtype=torch.int32, device=device),
        slot_mapping=page_ids.long() * page_size + page_offsets.long(),
        page_size=page_size,
        num_tokens=num_rows,
        max_run_length=1,
        max_page_id=-1,  # unknown without a sync; the caller vouches for the ids
    )


def _append_kv_torch(key, value, k_cache, v_cache, key_min, key_max, plan: AppendPlan) -> None:
    """Vectorised PyTorch path: scatter the tokens, then recompute the touched pages' bounds."""
    page_size = k_cache.shape[2]
    slots = plan.slot_mapping.long()
    keep_tokens = slots >= 0  # a decode plan's skipped rows have negative slots
    if not bool(keep_tokens.all()):
        slots, key, value = slots[keep_tokens], key[keep_tokens], value[keep_tokens]
    pages, offsets = slots // page_size, slots % page_size
    k_cache[pages, :, offsets] = key  # advanced indices around a slice: [num_tokens, H, D]
    v_cache[pages, :, offsets] = value
    keep_runs = plan.page_ids >= 0
    touched = plan.page_ids.long()[keep_runs]
    filled = (plan.page_offsets.long() + plan.token_starts.long().diff())[keep_runs]
    keys = k_cache[touched]  # [num_runs, num_kv_heads, page_size, head_dim]
    empty = torch.arange(page_size, device=keys.device)[None, :] >= filled[:, None]
    empty = empty[:, None, :, None]
    low = keys.masked_fill(empty, float("inf")).amin(dim=2)
    high = keys.masked_fill(empty, float("-inf")).amax(dim=2)
    store_bounds(key_min, key_max, touched, low, high)


def _checked_plan(key, value, k_cache, v_cache, key_min, key_max, slot_mapping, plan) -> AppendPlan:
    """Validate :func:`append_kv`'s arguments; its plan (built from ``slot_mapping`` if
    None)."""
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    device, dtype = k_cache.device, k_cache.dtype
    num_pages_total, num_kv_heads, page_size, head_dim = k_cache.shape
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(dtype,), device=device)
    check_tensor("key_min", key_min, ndim=3, dtypes=BOUNDS_DTYPES, device=device)
    check_bounds_dtype(key_min, cache_dtype=dtype)
    check_tensor("key_max", key_max, ndim=3, dtypes=(key_min.dtype,), device=device)
    check_dim("v_cache", v_cache, 0, num_pages_total, "num_pages_total")
    for dim, size, meaning in ((1, num_kv_heads, "num_kv_heads"), (2, page_size, "page_size")):
        check_dim("v_cache", v_cache, dim, size, meaning)
    check_dim("v_cache", v_cache, 3, head_dim, "head_dim")
    for name, tensor in (("key_min", key_min), ("key_max", key_max)):
        check_dim(name, tensor, 0, num_pages_total, "num_pages_total")
        check_dim(name, tensor, 1, num_kv_heads, "num_kv_heads")
        check_dim(name, tensor, 2, head_dim, "head_dim")
    check_tensor("key", key, ndim=3, device=device)
    check_tensor("value", value, ndim=3, device=device)
    num_tokens = key.shape[0]
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype}; it must match k_cache ({dtype})")
        check_dim(name, tensor, 0, num_tokens, "num_tokens")
        check_dim(name, tensor, 1, num_kv_heads, "num_kv_heads")
        check_dim(name, tensor, 2, head_dim, "head_dim")
    if slot_mapping is None and plan is None:
        raise ValueError("append_kv needs slot_mapping or plan (from plan_append); got neither")
    if slot_mapping is not None:
        check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=device)
        check_dim("slot_mapping", slot_mapping, 0, num_tokens, "num_tokens")
    if plan is None:
        plan = plan_append(slot_mapping=slot_mapping, page_size=page_size)
    elif not isinstance(plan, AppendPlan):
        raise ValueError(f"plan must be an AppendPlan from plan_append, got {type(plan).__name__}")
    if plan.page_size != page_size or plan.num_tokens != num_tokens:
        raise ValueError(
            f"plan was built for {plan.num_tokens} tokens with page_size {plan.page_size}, but "
            f"key has {num_tokens} tokens and k_cache page_size {page_size}; rebuild it with "
            "plan_append"
        )
    if plan.page_ids.device != device:
        raise ValueError(f"plan is on {plan.page_ids.device}, expected {device}")
    if plan.max_page_id >= num_pages_total:
        raise ValueError(
            f"slot_mapping points outside the page pool: page {plan.max_page_id} but the pool "
            f"has {num_pages_total} pages"
        )
    return plan


def append_kv(
    *,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    slot_mapping: torch.Tensor | None = None,
    plan: AppendPlan | None = None,
    impl: str | None = None,
) -> None:
    """Write new tokens' K/V into their slots and refresh the touched pages' bounds, in place.

    key, value: ``[num_tokens, num_kv_heads, head_dim]``, the cache's dtype (any strides
    with a contiguous last dimension).
    k_cache, v_cache: ``[num_pages_total, num_kv_heads, page_size, head_dim]``.
    key_min, key_max: ``[num_pages_total, num_kv_heads, head_dim]``, the cache's dtype or
    both ``float8_e4m3fn`` (then stored rounded outward, min down and max up; key elements
    beyond +-448 are clamped, which no longer bounds them: check the keys beforehand with
    :func:`longquest.kernels.float8.check_keys_fit_float8`, this launcher does not sync).
    slot_mapping: ``[num_tokens]`` int — ``page_id * page_size + offset`` per token.
    plan: the step's :func:`plan_append` result. Give ``plan`` (the hot path: no sync),
    ``slot_mapping`` (a plan is built here, with one sync), or both (``plan`` must have
    been built from that ``slot_mapping``; only their lengths are compared).
    A touched page's bounds become the min / max over its slots ``0 ..`` (last offset
    written), exactly as :func:`longquest.kernels.ref.append_kv_ref`.
    """
    plan = _checked_plan(key, value, k_cache, v_cache, key_min, key_max, slot_mapping, plan)
    device = k_cache.device
    _, num_kv_heads, page_size, head_dim = k_cache.shape
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return

    if resolve_impl(impl, device) == "torch":
        _append_kv_torch(key, value, k_cache, v_cache, key_min, key_max, plan)
        return
    if key.stride(2) != 1 or value.stride(2) != 1:
        key, value = key.contiguous(), value.contiguous()
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last (head_dim) dimension")
    if key_min.stride(2) != 1 or key_max.stride(2) != 1:
        raise ValueError("key_min and key_max need a contiguous last (head_dim) dimension")
    if key_min.stride() != key_max.stride():
        raise ValueError("key_min and key_max must have the same strides")
    float8_bounds = key_min.dtype == FLOAT8_DTYPE
    if float8_bounds:
        check_float8_supported(device)
    _append_kv_kernel[(plan.num_runs, num_kv_heads)](
        key,
        value,
        k_cache,
        v_cache,
        key_min,
        key_max,
        plan.page_ids,
        plan.page_offsets,
        plan.token_starts,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        key_min.stride(0),
        key_min.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_S=triton.next_power_of_2(page_size),
        FLOAT8_BOUNDS=float8_bounds,
    )
