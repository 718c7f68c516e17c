"""Radix-select steps shared by the selection kernels (:mod:`longquest.kernels.topk`,
:mod:`longquest.kernels.topk_spread`): order-preserving keys, per-digit histograms, the
threshold and the compaction.

A score's key is a uint32 whose order is the score's (see :func:`order_key`); key 0 marks
a slot outside the row, below every valid key. A radix select walks the key's digits most
significant first, ``DIGIT_BITS`` at a time; at each level the histogram of the current
digit puts keys below the prefix chosen so far in bin 0 (never chosen) and keys above it
in the top bin, so the histogram's suffix sums are exactly ``count(key >= candidate
prefix)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 4-bit digits, 16-bin histograms, up to 8 levels. The spread selection's workspace is laid
# out for them (:data:`longquest.kernels.topk_spread.WORKSPACE_STRIDE`); 8-bit digits are
# slower in both selections (benchmarks/NOTES-kernels.md).
DIGIT_BITS = 4
NUM_BINS = 1 << DIGIT_BITS


@triton.jit
def order_key(score):
    """Order-preserving uint32 key of fp32 scores (>= 1; NaN is 1, below -inf)."""
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    return tl.where(score != score, tl.full(key.shape, 1, tl.uint32), key)


@triton.jit
def int32_order_key(bits):
    """Signed int32 whose order is the float order of fp32 ``bits`` (negatives flipped):
    the global top-k compares packed candidates by it."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def load_block(score_ptr, index_ptr, offsets, end, pin_index, FROM_CANDIDATES: tl.constexpr):
    """Scores, page indices and keys of list positions ``offsets`` (key 0: not in the row)."""
    inside = offsets < end
    if FROM_CANDIDATES:
        index = tl.load(index_ptr + offsets, mask=inside, other=-1)
        valid = index >= 0
        score = tl.load(score_ptr + offsets, mask=valid, other=float("-inf"))
    else:
        index = offsets
        valid = inside
        score = tl.load(score_ptr + offsets, mask=valid, other=float("-inf"))
        score = tl.where(offsets == pin_index, float("inf"), score)
    key = tl.where(valid, order_key(score), tl.zeros(offsets.shape, tl.uint32))
    return score, index, key


@triton.jit
def digit_counts(
    key,
    prefix,
    LEVEL: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Histogram of this level's digit; keys below the prefix go to bin 0, above to the top."""
    shift = 32 - (LEVEL + 1) * DIGIT_BITS
    digit = (key >> shift) & (NUM_BINS - 1)
    if LEVEL > 0:
        high, wanted = key >> (shift + DIGIT_BITS), prefix >> (shift + DIGIT_BITS)
        digit = tl.where(high == wanted, digit, tl.where(high > wanted, NUM_BINS - 1, 0))
    return tl.histogram(digit.to(tl.int32), NUM_BINS)


@triton.jit
def next_digit(hist, k, count_lo, count_hi, prefix, LEVEL: tl.constexpr,
                DIGIT_BITS: tl.constexpr, NUM_BINS: tl.constexpr):  # fmt: skip
    """One level's step from the histogram of its digit: ``(count_lo, count_hi, prefix)``.

    Invariant: ``count(key >= prefix) = count_lo >= k > count_hi = count(key >= prefix +
    one step of the current digit)``; the digit appended is the highest whose suffix count
    still reaches ``k`` (bin 0, the keys below the prefix, is never chosen).
    """
    bins = tl.arange(0, NUM_BINS)
    suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    digit = tl.sum(((bins > 0) & (suffix >= k)).to(tl.int32), axis=0)
    at_digit = tl.sum(tl.where(bins == digit, suffix, 0), axis=0)
    above = tl.sum(tl.where(bins == digit + 1, suffix, 0), axis=0)
    count_lo = tl.where(digit > 0, at_digit, count_lo)
    count_hi = tl.where(digit + 1 < NUM_BINS, above, count_hi)
    prefix = prefix | (digit.to(tl.uint32) << (32 - (LEVEL + 1) * DIGIT_BITS))
    return count_lo, count_hi, prefix


@triton.jit
def threshold(count_lo, count_hi, prefix, k):
    """``(floor, tie, ties)``: the top ``k`` are the keys >= ``floor`` plus the first
    ``ties`` keys equal to ``tie`` in index order."""
    exact = count_lo == k
    floor = tl.where(exact, tl.maximum(prefix, 1), prefix + 1)
    tie = tl.where(exact, 0, prefix)
    ties = tl.where(exact, 0, k - count_hi)
    return floor, tie, ties


@triton.jit
def positions(is_above, is_tie, above_before, ties_before, ties):
    """``(chosen, position)`` of a block's keys, in index order, given how many keys above
    the threshold and how many tying it come before the block."""
    packed = is_above.to(tl.int32) + (is_tie.to(tl.int32) << 16)
    exclusive = tl.cumsum(packed, axis=0) - packed
    above_seen = above_before + (exclusive & 0xFFFF)
    ties_seen = ties_before + (exclusive >> 16)
    chosen = is_above | (is_tie & (ties_seen < ties))
    return chosen, above_seen + tl.minimum(ties_seen, ties)
