"""Top-k page selection with each row spread over several programs, in one launch.

A long row (a rank's 32K pages at 1M tokens) selected by one program, or by a two-pass
chunked selection, keeps most of the GPU idle: 8 rows fill 8 SMs (the second pass) and
every radix level is a chain of barriers on one SM. Here ``programs`` programs share a row,
each holding a contiguous part of it in registers, and they agree on the threshold through
the row's histograms in global memory:

* **Levels.** Each program histograms its keys' current digit (4-bit digits: at most 8
  levels, and the search ends once the threshold is exact) and adds it to the row's
  histogram of that level with relaxed atomics. Every program then polls the whole
  histogram until its counts add up to ``programs * BLOCK`` (every lane of every program
  counts once, in some bin): counts only grow, so a poll that sees that total sees every
  bin's final count. No arrival counter, no fence: one round trip to L2 a level.
  Measured: 16 programs a row at 8 rows x 32768 pages and k = 256 (one rank of 1M tokens
  on two GPUs) select in 18.9 us against 26.0 for the two passes.
* **Compaction.** Each program publishes how many of its keys lie above the threshold and
  how many tie it, in one word a program (``(above + 1) << 16 | ties``: never 0 once
  written), and polls the row's words. The counts of the programs before it give its
  output offset and its share of the ties (ties go to the lowest indices), so the output
  is in ascending index order as in :func:`longquest.kernels.topk.select_pages`.
* **Reset.** Each program takes a ticket from the row's exit counter after its last poll;
  the last one zeroes the row's histograms, words and counter, so the workspace is zero
  again for the next launch (CUDA-graph replays included). Launches that share a workspace
  must run in order (one stream).

Every program of a row must be resident at once: the launcher uses at most one program an
SM over the whole grid, so the GPU holds them all (a poll that waits longer than
``TIMEOUT_NS`` traps: a CUDA error, not a hang). The CPU interpreter runs programs one
after another, so there a row has one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longquest.kernels._checks import check_tensor
from longquest.kernels._device import now_ns, on_gpu, sm_count, trap
from longquest.kernels.radix import (
    DIGIT_BITS,
    digit_counts,
    load_block,
    next_digit,
    positions,
    threshold,
)

MAX_PROGRAMS = 32  # programs a row may use (the words of its compaction)
MAX_BLOCK = 16384  # the most keys one program holds (counts fit 16 bits in a word)
# int32 a row: room for 1024 histogram bins (the kernel uses 32 // DIGIT_BITS levels of
# NUM_BINS), then MAX_PROGRAMS words, the exit counter last (the kernel asserts the fit).
WORKSPACE_STRIDE = 1088
TIMEOUT_NS = 10_000_000_000  # a poll longer than 10 s traps


@triton.jit
def _poll_histogram(level_ptr, bins, total, ON_GPU: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """The level's histogram once its counts add up to ``total`` (every program added)."""
    hist = tl.load(level_ptr + bins, volatile=True)
    started = now_ns(total, ON_GPU)
    while tl.sum(hist, axis=0) != total:
        if now_ns(total, ON_GPU) - started > TIMEOUT_NS:
            trap(total, ON_GPU)
        hist = tl.load(level_ptr + bins, volatile=True)
    return hist


@triton.jit
def _poll_words(words_ptr, slots, programs, ON_GPU: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """The row's compaction words once every program wrote its own (0: not yet)."""
    inside = slots < programs
    words = tl.load(words_ptr + slots, mask=inside, other=1, volatile=True)
    started = now_ns(programs, ON_GPU)
    while tl.sum((words == 0).to(tl.int32), axis=0) > 0:
        if now_ns(programs, ON_GPU) - started > TIMEOUT_NS:
            trap(programs, ON_GPU)
        words = tl.load(words_ptr + slots, mask=inside, other=1, volatile=True)
    return words


@triton.jit
def _spread_select_kernel(
    score_ptr, num_pages_ptr, pin_ptr, out_score_ptr, out_index_ptr, work_ptr,
    num_kv_heads, max_pages, chunk_len, k_out, stride_ss, stride_sh,
    PIN: tl.constexpr, BLOCK: tl.constexpr, OUT_BLOCK: tl.constexpr, SLOTS: tl.constexpr,
    DIGIT_BITS: tl.constexpr, WORK_STRIDE: tl.constexpr, ON_GPU: tl.constexpr,
    TIMEOUT_NS: tl.constexpr,
):  # fmt: skip
    # One body: the keys stay in registers from the first level to the stores.
    row = tl.program_id(0)  # seq * num_kv_heads + head
    part = tl.program_id(1)  # this program's part of the row
    programs = tl.num_programs(1)
    seq = row // num_kv_heads
    NUM_BINS: tl.constexpr = 1 << DIGIT_BITS
    LEVELS: tl.constexpr = 32 // DIGIT_BITS
    tl.static_assert(32 % DIGIT_BITS == 0)
    tl.static_assert(LEVELS * NUM_BINS + SLOTS < WORK_STRIDE)  # the exit counter is last
    tl.static_assert(BLOCK <= 16384)  # (above + 1) << 16 | ties stays a positive int32
    n = tl.load(num_pages_ptr + seq).to(tl.int32)
    n = tl.minimum(tl.maximum(n, 0), max_pages)
    pin_index = -1
    if PIN == 1:
        pin_index = n - 1
    if PIN == 2:
        pin_index = tl.where(tl.load(pin_ptr + seq) != 0, n - 1, -1)
    score_ptr += seq.to(tl.int64) * stride_ss + (row % num_kv_heads) * stride_sh
    start = part * chunk_len
    end = tl.minimum(start + chunk_len, n)
    score, index, key = load_block(
        score_ptr, score_ptr, start + tl.arange(0, BLOCK), end, pin_index, False
    )
    work = work_ptr + row.to(tl.int64) * WORK_STRIDE
    words_ptr = work + LEVELS * NUM_BINS
    exit_ptr = work + WORK_STRIDE - 1

    # Radix select over the whole row (as the two-pass kernel, with the row's histograms).
    k = tl.minimum(k_out, n)
    total = programs * BLOCK
    bins = tl.arange(0, NUM_BINS)
    prefix = tl.zeros([], tl.uint32)
    count_lo = n
    count_hi = n * 0
    for level in tl.static_range(LEVELS):
        if count_lo != k:  # the same in every program of the row: same histograms
            mine = digit_counts(key, prefix, level, DIGIT_BITS, NUM_BINS)
            level_ptr = work + level * NUM_BINS
            tl.atomic_add(level_ptr + bins, mine, mask=mine > 0, sem="relaxed", scope="gpu")
            hist = _poll_histogram(level_ptr, bins, total, ON_GPU, TIMEOUT_NS)
            count_lo, count_hi, prefix = next_digit(
                hist, k, count_lo, count_hi, prefix, level, DIGIT_BITS, NUM_BINS
            )

    # Ties counted row-wide: the programs before this one take the first of them.
    floor, tie, ties = threshold(count_lo, count_hi, prefix, k)
    is_above = key >= floor
    is_tie = key == tie
    mine_above = tl.sum(is_above.to(tl.int32), axis=0)
    mine_ties = tl.sum(is_tie.to(tl.int32), axis=0)
    tl.store(words_ptr + part, ((mine_above + 1) << 16) | mine_ties)
    slots = tl.arange(0, SLOTS)
    words = _poll_words(words_ptr, slots, programs, ON_GPU, TIMEOUT_NS)
    before = (slots < part) & (slots < programs)
    above_before = tl.sum(tl.where(before, (words >> 16) - 1, 0), axis=0)
    ties_before = tl.sum(tl.where(before, words & 0xFFFF, 0), axis=0)
    chosen, position = positions(is_above, is_tie, above_before, ties_before, ties)
    # Past its last poll: take the exit ticket now, so that its round trip overlaps the
    # output stores; the last program out zeroes the row's workspace after them.
    tl.debug_barrier()
    ticket = tl.atomic_add(exit_ptr, 1, sem="acq_rel", scope="gpu")
    out = row.to(tl.int64) * k_out
    tl.store(out_score_ptr + out + position, score, mask=chosen)
    tl.store(out_index_ptr + out + position, index.to(tl.int32), mask=chosen)
    if part == 0:
        for block in range(0, k_out, OUT_BLOCK):
            pads = block + tl.arange(0, OUT_BLOCK)
            pad = (pads >= k) & (pads < k_out)
            fill = tl.full([OUT_BLOCK], float("-inf"), tl.float32)
            tl.store(out_score_ptr + out + pads, fill, mask=pad)
            tl.store(out_index_ptr + out + pads, tl.full([OUT_BLOCK], -1, tl.int32), mask=pad)

    if ticket == programs - 1:  # every program of the row is past its polls
        for level in tl.static_range(LEVELS):
            tl.store(work + level * NUM_BINS + bins, tl.zeros([NUM_BINS], tl.int32))
        tl.store(words_ptr + slots, tl.zeros([SLOTS], tl.int32))
        tl.store(exit_ptr, 0)


def make_select_workspace(*, max_rows: int, device: torch.device | str) -> torch.Tensor:
    """Zeroed int32 ``[max_rows, WORKSPACE_STRIDE]`` for spread selections of up to
    ``max_rows`` rows (``num_seqs * num_kv_heads``); every launch leaves it zeroed."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    return torch.zeros(max_rows, WORKSPACE_STRIDE, dtype=torch.int32, device=device)


def check_select_workspace(workspace: torch.Tensor, *, rows: int, device: torch.device) -> None:
    """Raise ValueError unless ``workspace`` can serve a spread selection of ``rows`` rows.

    It must also hold zeros (every launch leaves it so); that is not checked, since it
    would cost a sync: a workspace from ``torch.empty``, or one shared by two streams, makes
    the programs wait for counts that never add up (a trap after ``TIMEOUT_NS``) or
    miscount their output offsets.
    """
    check_tensor("workspace", workspace, ndim=2, dtypes=(torch.int32,), device=device)
    if workspace.shape[0] < rows or workspace.shape[1] != WORKSPACE_STRIDE:
        raise ValueError(
            f"workspace has shape {tuple(workspace.shape)}; this launch needs [>= {rows}, "
            f"{WORKSPACE_STRIDE}] (make_select_workspace(max_rows={rows}))"
        )
    if not workspace.is_contiguous():
        raise ValueError("workspace must be contiguous (make_select_workspace)")


def spread_programs(*, rows: int, max_pages: int, sm_count: int, min_chunk: int) -> int:
    """Programs a row for a spread selection: at most one an SM over the grid, parts of
    at least ``min_chunk`` pages, at most ``MAX_PROGRAMS``; 1 means "do not spread"."""
    if rows < 1 or max_pages < 1:
        return 1
    programs = min(sm_count // rows, MAX_PROGRAMS, triton.cdiv(max_pages, min_chunk))
    programs = max(programs, 1)
    if triton.cdiv(max_pages, programs) > MAX_BLOCK:
        return 1
    return programs


def launch_spread(scores, num_pages, pins, pin_mode, top_k, programs, done,
                  workspace) -> None:  # fmt: skip
    """Select into ``done`` (``(top_scores, indices)``, as
    :func:`longquest.kernels.select_pages` returns them) in one launch,
    ``programs`` a row; ``pins``/``pin_mode`` as there (1: pin every row's last page, 2: per
    sequence from ``pins``)."""
    num_seqs, num_kv_heads, max_pages = scores.shape
    device = scores.device
    rows = num_seqs * num_kv_heads
    if not 1 <= programs <= MAX_PROGRAMS:
        raise ValueError(f"programs a row must be in 1..{MAX_PROGRAMS}, got {programs}")
    gpu = on_gpu(device)
    if programs > 1 and not gpu:
        raise ValueError(
            f"a spread selection over {programs} programs a row needs a GPU: the interpreter "
            "runs programs one after another, so they would wait for each other forever"
        )
    if programs > 1 and rows * programs > sm_count(device):
        raise ValueError(
            f"{rows} rows x {programs} programs is more than the GPU's {sm_count(device)} "
            "SMs: every program of a row must be resident at once (spread_programs)"
        )
    if workspace is None:
        workspace = make_select_workspace(max_rows=rows, device=device)
    check_select_workspace(workspace, rows=rows, device=device)
    if not gpu and bool(workspace[:rows].any()):  # a poll would spin forever (no timer)
        raise ValueError("workspace is not zero: make it with make_select_workspace")
    chunk_len = triton.cdiv(max_pages, programs)
    if chunk_len > MAX_BLOCK:
        raise ValueError(
            f"{max_pages} pages over {programs} programs is {chunk_len} a program; at most "
            f"{MAX_BLOCK}: use more programs"
        )
    # 8 warps at 2048 pages a program, as the two-pass selection.
    num_warps = max(4, min(16, triton.next_power_of_2(chunk_len) // 256))
    block = max(triton.next_power_of_2(chunk_len), 32 * num_warps)  # no replicated lane
    top_scores, indices = done
    _spread_select_kernel[(rows, programs)](
        scores, num_pages, pins, top_scores, indices, workspace,
        num_kv_heads, max_pages, chunk_len, top_k, scores.stride(0), scores.stride(1),
        PIN=pin_mode, BLOCK=block, OUT_BLOCK=min(triton.next_power_of_2(top_k), 1024),
        SLOTS=max(triton.next_power_of_2(programs), 2), DIGIT_BITS=DIGIT_BITS,
        WORK_STRIDE=WORKSPACE_STRIDE, ON_GPU=gpu, TIMEOUT_NS=TIMEOUT_NS, num_warps=num_warps,
    )  # fmt: skip
