"""Top-k page selection per (sequence, KV head), listed in ascending page order.

Design of the Triton path (not torch.topk, which costs 37-95 us on an H200 here):

* **Keys.** An fp32 score maps to an order-preserving uint32 key (flip all bits of
  negatives, set the sign bit of the rest; ``-0.0`` folds into ``+0.0`` and NaN to 1, below
  ``-inf``, as a stable sort treats them). Slots outside the row get key 0, below every
  valid key, so they are never counted or selected.
* **Threshold.** The k-th largest key ``T`` is found by radix select, most significant
  digit first (4-bit digits: 8 levels of a 16-bin ``tl.histogram``; :mod:`.radix`). Keys below the
  current prefix fall in bin 0 (never used), keys above it in the top bin, so the suffix
  sums of the histogram are exactly ``count(key >= candidate)``. The search stops as soon
  as ``count(key >= prefix) == k`` (no tie to break): at once for ``k >= num_pages`` and
  empty rows, after about half the levels for continuous scores.
* **Compaction.** One ``tl.cumsum`` over packed (key > T, key == T) flags gives every
  selected slot its output position: keys above ``T`` plus the lowest-index keys equal to
  it, written in ascending index order — the contract's order, with ties to the lower index.
* **Parallelism.** A row of up to ``KernelTuning.select_single_pass_max`` pages is one
  program, held in registers. A longer row is split into chunks of ``~sqrt(pages * k)``:
  pass 1 takes each chunk's local top-k (a page of the global top-k is in its chunk's
  top-k under the same tie rule, so nothing is lost) on a (row, chunk) grid; pass 2 selects
  from the ``chunks * k`` candidates, which sit in index order. A list too long for registers is
  looped over in blocks (every level re-reads it), the correct but slow path for huge k.
* **Spread.** On a GPU, a row longer than ``spread_min_pages`` that can have at least
  ``spread_min_programs`` programs (one program an SM over the grid) is instead selected
  in one launch by several programs that share its histograms through a workspace
  (:mod:`longquest.kernels.topk_spread`): a rank's 8 x 32768 pages at k = 256 in 18.9 us
  against 26.0 for the two passes.

Measured on an H100, CUDA graph, k = 256, 8 rows (benchmarks/NOTES-kernels.md): 8.0-8.4 us
at 2048 pages, 14-15 us at 8192 (two passes), 30 us at 65536.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import INDEX_DTYPES, check_dim, check_tensor, resolve_impl
from longquest.kernels._device import on_gpu, sm_count
from longquest.kernels.radix import (
    DIGIT_BITS,
    NUM_BINS,
    digit_counts,
    load_block,
    next_digit,
    positions,
    threshold,
)
from longquest.kernels.topk_spread import check_select_workspace, launch_spread, spread_programs
from longquest.kernels.tuning import DEFAULT_TUNING, KernelTuning


@triton.jit
def select_row(
    score_ptr, index_ptr, start, end, count, pin_index, k_out, out_score_ptr, out_index_ptr,
    FROM_CANDIDATES: tl.constexpr, BLOCK: tl.constexpr, IN_REGISTERS: tl.constexpr,
    OUT_BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr, NUM_BINS: tl.constexpr,
):  # fmt: skip
    """Top ``k_out`` of list positions ``start .. end - 1`` (``count`` of them valid), written
    in index order to ``out_score_ptr`` / ``out_index_ptr`` and padded with -inf / -1."""
    k = tl.minimum(k_out, count)
    lanes = tl.arange(0, BLOCK)
    if IN_REGISTERS:
        score, index, key = load_block(
            score_ptr, index_ptr, start + lanes, end, pin_index, FROM_CANDIDATES
        )

    # Radix select (radix.next_digit states the invariant).
    prefix = tl.zeros([], tl.uint32)
    count_lo = count
    count_hi = count * 0
    for level in tl.static_range(32 // DIGIT_BITS):
        if count_lo != k:
            if IN_REGISTERS:
                hist = digit_counts(key, prefix, level, DIGIT_BITS, NUM_BINS)
            else:
                hist = tl.zeros([NUM_BINS], tl.int32)
                for block in range(start, end, BLOCK):
                    _, _, key = load_block(
                        score_ptr, index_ptr, block + lanes, end, pin_index, FROM_CANDIDATES
                    )
                    hist += digit_counts(key, prefix, level, DIGIT_BITS, NUM_BINS)
            count_lo, count_hi, prefix = next_digit(
                hist, k, count_lo, count_hi, prefix, level, DIGIT_BITS, NUM_BINS
            )

    # Select key >= floor, plus the first `ties` keys equal to `tie` in index order.
    floor, tie, ties = threshold(count_lo, count_hi, prefix, k)
    above_before = count * 0
    ties_before = count * 0
    for block in range(start, end, BLOCK):
        if not IN_REGISTERS:
            score, index, key = load_block(
                score_ptr, index_ptr, block + lanes, end, pin_index, FROM_CANDIDATES
            )
        is_above = key >= floor
        is_tie = key == tie
        chosen, position = positions(is_above, is_tie, above_before, ties_before, ties)
        tl.store(out_score_ptr + position, score, mask=chosen)
        tl.store(out_index_ptr + position, index.to(tl.int32), mask=chosen)
        above_before += tl.sum(is_above.to(tl.int32), axis=0)
        ties_before += tl.sum(is_tie.to(tl.int32), axis=0)

    for block in range(0, k_out, OUT_BLOCK):
        slots = block + tl.arange(0, OUT_BLOCK)
        pad = (slots >= k) & (slots < k_out)
        tl.store(out_score_ptr + slots, tl.full([OUT_BLOCK], float("-inf"), tl.float32), pad)
        tl.store(out_index_ptr + slots, tl.full([OUT_BLOCK], -1, tl.int32), pad)


@triton.jit
def _select_kernel(
    score_ptr, index_ptr, num_pages_ptr, pin_ptr, out_score_ptr, out_index_ptr,
    num_kv_heads, max_pages, chunk_len, list_len, k_out,
    stride_ss, stride_sh, stride_out_row, stride_out_chunk,
    FROM_CANDIDATES: tl.constexpr, PIN: tl.constexpr, BLOCK: tl.constexpr,
    IN_REGISTERS: tl.constexpr, OUT_BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr,
    NUM_BINS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # seq * num_kv_heads + head
    chunk = tl.program_id(1)
    seq = row // num_kv_heads
    n = tl.load(num_pages_ptr + seq).to(tl.int32)
    n = tl.minimum(tl.maximum(n, 0), max_pages)
    pin_index = -1
    if FROM_CANDIDATES:
        # Pass 2: the row's chunks * k_chunk candidates (index -1: none), in index order.
        # k_chunk = list_len // num_chunks candidates came from each chunk of chunk_len pages.
        score_ptr += row.to(tl.int64) * list_len
        index_ptr += row.to(tl.int64) * list_len
        start, end = 0, list_len
        k_chunk = list_len // tl.cdiv(max_pages, chunk_len)
        full = n // chunk_len
        count = full * k_chunk + tl.minimum(k_chunk, n - full * chunk_len)
    else:
        score_ptr += seq.to(tl.int64) * stride_ss + (row % num_kv_heads) * stride_sh
        start = chunk * chunk_len
        end = tl.minimum(start + chunk_len, n)
        count = tl.maximum(end - start, 0)
        if PIN == 1:
            pin_index = n - 1
        if PIN == 2:
            pin_index = tl.where(tl.load(pin_ptr + seq) != 0, n - 1, -1)
    offset = row.to(tl.int64) * stride_out_row + chunk * stride_out_chunk
    select_row(
        score_ptr, index_ptr, start, end, count, pin_index, k_out,
        out_score_ptr + offset, out_index_ptr + offset,
        FROM_CANDIDATES, BLOCK, IN_REGISTERS, OUT_BLOCK, DIGIT_BITS, NUM_BINS,
    )  # fmt: skip


def _select_pages_torch(scores, num_pages, top_k, pins) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised PyTorch path: topk over unique (score, -index) keys, then sort by index."""
    num_seqs, num_kv_heads, max_pages = scores.shape
    device = scores.device
    top_scores = torch.full((num_seqs, num_kv_heads, top_k), -math.inf, device=device)
    indices = torch.full((num_seqs, num_kv_heads, top_k), -1, dtype=torch.int32, device=device)
    if max_pages == 0 or num_seqs == 0:
        return top_scores, indices
    n = num_pages.long().clamp(0, max_pages)[:, None, None]
    positions = torch.arange(max_pages, device=device)
    row = scores.float().clone()
    pinned = (positions == n - 1) & pins.to(device)[:, None, None]
    row.masked_fill_(pinned, math.inf)
    # Order-preserving int32 key; -0.0 ties +0.0 and NaN ranks below -inf, as in a stable sort.
    bits = torch.where(row == 0, 0.0, row).view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    key = torch.where(torch.isnan(row), -(2**31) + 1, key)
    key = torch.where(positions < n, key, -(2**31))
    # Unique keys: the lower index wins a tie.
    key = key * 2**31 + (max_pages - 1 - positions)
    k = min(top_k, max_pages)
    chosen = key.topk(k, dim=-1).indices  # [num_seqs, num_kv_heads, k]
    chosen = torch.where(chosen < n, chosen, max_pages).sort(dim=-1).values
    valid = chosen < max_pages
    safe = torch.where(valid, chosen, 0)
    top_scores[..., :k] = torch.where(valid, row.gather(-1, safe), -math.inf)
    indices[..., :k] = torch.where(valid, chosen, -1).int()
    return top_scores, indices


def _launch_select(
    grid, scores, num_pages, pins, src, out, strides, *, pin_mode, from_candidates,
    chunk_len, list_len, k_out, out_block, tuning: KernelTuning,
) -> None:  # fmt: skip
    """One launch of ``_select_kernel``: a row (or a chunk of one) a program."""
    max_pages = scores.shape[2]
    length = list_len if from_candidates else min(chunk_len, max_pages)
    fits = length <= tuning.select_register_max
    block = triton.next_power_of_2(length) if fits else tuning.select_loop_block
    # 8 warps at 2048 pages, 16 from 4096 (4 and 16 are slower at 2048).
    num_warps = max(4, min(16, block // 256))
    # No lane may hold a replicated element: tl.histogram's GPU lowering would count it
    # once per replica.
    block = max(block, 32 * num_warps)
    _select_kernel[grid](
        *src, num_pages, pins, *out,
        scores.shape[1], max_pages, chunk_len, list_len, k_out,
        scores.stride(0), scores.stride(1), *strides,
        FROM_CANDIDATES=from_candidates, PIN=0 if from_candidates else pin_mode, BLOCK=block,
        IN_REGISTERS=fits, OUT_BLOCK=out_block,
        DIGIT_BITS=DIGIT_BITS, NUM_BINS=NUM_BINS, num_warps=num_warps,
    )  # fmt: skip


def _spread_programs(scores: torch.Tensor, tuning: KernelTuning) -> int:
    """Programs a row for a spread selection of ``scores``; 0: the one- or two-pass one."""
    num_seqs, num_kv_heads, max_pages = scores.shape
    device = scores.device
    if not on_gpu(device) or max_pages <= tuning.spread_min_pages:
        return 0
    programs = spread_programs(
        rows=num_seqs * num_kv_heads,
        max_pages=max_pages,
        sm_count=sm_count(device),
        min_chunk=tuning.spread_min_chunk,
    )
    return programs if programs >= tuning.spread_min_programs else 0


def _select_pages_triton(
    scores: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    pin_last: bool | torch.Tensor,
    *,
    tuning: KernelTuning = DEFAULT_TUNING,
    chunk: int | None = None,
    workspace: torch.Tensor | None = None,
    spread: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch one spread selection, or one or two selection passes (see the module
    docstring). ``chunk``: pass-1 chunk length (None: from the shape and ``tuning``).

    ``workspace``: a spread selection's zeroed workspace (``make_select_workspace``; a
    fresh one if None). ``spread``: None chooses; 0 never spreads; ``p >= 1`` spreads every
    row over ``p`` programs (``p > 1`` only on CUDA: the interpreter runs programs in turn).
    """
    num_seqs, num_kv_heads, max_pages = scores.shape
    device = scores.device
    top_scores = torch.empty(num_seqs, num_kv_heads, top_k, device=device)
    indices = torch.empty(num_seqs, num_kv_heads, top_k, dtype=torch.int32, device=device)
    done = (top_scores, indices)
    rows = num_seqs * num_kv_heads
    if rows == 0:
        return done
    if max_pages == 0:
        top_scores.fill_(-math.inf), indices.fill_(-1)
        return done
    if scores.stride(2) != 1:
        scores = scores.contiguous()
    if isinstance(pin_last, torch.Tensor):
        pin_mode, pins = 2, pin_last
    else:
        pin_mode, pins = int(bool(pin_last)), num_pages  # pins unread unless pin_mode == 2
    spread = _spread_programs(scores, tuning) if spread is None else spread
    if spread:
        launch_spread(scores, num_pages, pins, pin_mode, top_k, spread, done, workspace)
        return done
    out_block = min(triton.next_power_of_2(top_k), 1024)  # the padding's block
    common = dict(pin_mode=pin_mode, out_block=out_block, tuning=tuning)
    if chunk is None:
        chunk = triton.next_power_of_2(math.isqrt(max_pages * top_k))
        chunk = max(tuning.select_min_chunk, min(tuning.select_register_max, chunk))
    k_chunk = min(top_k, chunk)
    num_chunks = triton.cdiv(max_pages, chunk)
    if max_pages <= tuning.select_single_pass_max or num_chunks == 1 or 2 * k_chunk > chunk:
        _launch_select((rows, 1), scores, num_pages, pins, (scores, scores), done, (top_k, 0),
                       from_candidates=False, chunk_len=max_pages, list_len=0, k_out=top_k,
                       **common)  # fmt: skip
        return done
    list_len = num_chunks * k_chunk
    cand_scores = torch.empty(rows, list_len, device=device)
    cand_index = torch.empty(rows, list_len, dtype=torch.int32, device=device)
    candidates = (cand_scores, cand_index)
    _launch_select((rows, num_chunks), scores, num_pages, pins, (scores, scores), candidates,
                   (list_len, k_chunk), from_candidates=False, chunk_len=chunk,
                   list_len=list_len, k_out=k_chunk, **common)  # fmt: skip
    _launch_select((rows, 1), scores, num_pages, pins, candidates, done, (top_k, 0),
                   from_candidates=True, chunk_len=chunk, list_len=list_len, k_out=top_k,
                   **common)  # fmt: skip
    return done


def select_pages(
    *,
    scores: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    pin_last: bool | torch.Tensor = True,
    workspace: torch.Tensor | None = None,
    spread: bool = True,
    impl: str | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``top_k`` pages of each (sequence, KV head) by score, in ascending page order.

    scores: ``[num_seqs, num_kv_heads, max_pages]`` fp32 (from :func:`page_scores`).
    num_pages: ``[num_seqs]`` int — valid pages per sequence, ``0 <= num_pages <= max_pages``
    (not checked: that would sync; out-of-range values are clamped).
    top_k: pages to keep, ``>= 1``; rows with fewer valid pages keep them all.
    pin_last: always keep the sequence's last valid page, reported with score ``+inf`` — a
    bool for every sequence or a ``[num_seqs]`` bool tensor.
    workspace: int32 ``[>= num_seqs * num_kv_heads, WORKSPACE_STRIDE]`` zeros from
    :func:`longquest.kernels.make_select_workspace`, which a long row's
    selection spread over several programs uses and leaves zeroed (reuse it across layers,
    steps and graph replays, on one stream); None allocates a fresh one when needed.
    spread: allow that spread selection (its programs must all be resident at once: pass
    False where other work holds the GPU's SMs); False always takes the one- or two-pass
    selection.
    tuning: the selection's sizes (``select_*``, ``spread_*`` fields).
    Returns ``(top_scores, indices)``, both ``[num_seqs, num_kv_heads, top_k]`` (fp32,
    int32): logical page indices (positions in the page table) of the ``min(top_k,
    num_pages)`` highest scores, ties to the lower index, in ascending index order, with
    their scores; padded at the end with ``-inf`` / ``-1``. Semantics:
    :func:`longquest.kernels.ref.select_pages_ref`.
    """
    check_tensor("scores", scores, ndim=3, dtypes=(torch.float32,))
    device = scores.device
    num_seqs = scores.shape[0]
    check_tensor("num_pages", num_pages, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_dim("num_pages", num_pages, 0, num_seqs, "num_seqs")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if isinstance(pin_last, torch.Tensor):
        check_tensor("pin_last", pin_last, ndim=1, dtypes=(torch.bool,), device=device)
        check_dim("pin_last", pin_last, 0, num_seqs, "num_seqs")
    elif not isinstance(pin_last, bool):
        raise ValueError(f"pin_last must be a bool or a bool tensor, got {type(pin_last).__name__}")

    if not isinstance(spread, bool):
        raise ValueError(f"spread must be a bool, got {type(spread).__name__}")
    if workspace is not None:
        check_select_workspace(workspace, rows=num_seqs * scores.shape[1], device=device)
    if resolve_impl(impl, device) == "torch":
        pins = (
            pin_last
            if isinstance(pin_last, torch.Tensor)
            else torch.full((num_seqs,), pin_last, dtype=torch.bool, device=device)
        )
        return _select_pages_torch(scores, num_pages, top_k, pins)
    return _select_pages_triton(
        scores, num_pages, top_k, pin_last, tuning=tuning, workspace=workspace,
        spread=None if spread else 0,
    )  # fmt: skip
