"""fp8 (e4m3fn) storage of Quest's key bounds, rounded so that they stay bounds.

A page's score ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` is an upper bound of ``q . k``
for every key of the page only while ``kmin <= k <= kmax`` element-wise. Storing the
bounds in ``torch.float8_e4m3fn`` (one byte instead of two: the score kernel reads half
the bytes) therefore rounds the min *down* (toward -inf) and the max *up* (toward +inf)
to the nearest e4m3fn value, never to the nearest one. Rounding down is monotone and
idempotent, so the append kernel's incremental updates store exactly
``round_down(true min)`` and no error accumulates.

The limit: e4m3fn's finite range is ``[-448, 448]``. A key element beyond it cannot be
bounded; it is clamped to ``+-448`` (so the bound may be too low), and the engine refuses
such keys during prefill (:func:`check_keys_fit_float8`). e4m3fn values convert exactly
to fp16, bf16 and fp32, so the score kernel upcasts them in registers.

Bit layout used for the one-ulp steps: sign-magnitude, ``0x00 .. 0x7E`` are ``+0 .. 448``,
``0x80 .. 0xFE`` are ``-0 .. -448``; ``0x7F`` and ``0xFF`` are NaN and never produced
from a finite or infinite input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT8_DTYPE = torch.float8_e4m3fn
FLOAT8_MAX = 448.0  # largest finite e4m3fn value
BOUNDS_DIRECTIONS = ("down", "up")


def round_to_float8(x: torch.Tensor, *, direction: str) -> torch.Tensor:
    """Round ``x`` to a neighbouring e4m3fn value: ``"down"`` (toward -inf) or ``"up"``.

    x: any shape, any float dtype. Returns the same shape in ``torch.float8_e4m3fn``
    with ``round_down(x) <= x <= round_up(x)`` for ``|x| <= 448`` (exact where ``x`` is
    representable). Values beyond ``+-448`` (infinities included) are clamped to
    ``+-448``, which is not a bound on their side; NaN stays NaN.
    """
    if direction not in BOUNDS_DIRECTIONS:
        raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
    exact = x.float().clamp(-FLOAT8_MAX, FLOAT8_MAX)
    nearest = exact.to(FLOAT8_DTYPE)
    back = nearest.float()
    bits = nearest.view(torch.uint8).to(torch.int16)
    zero = (bits & 0x7F) == 0
    negative = bits >= 0x80
    if direction == "down":
        # Toward -inf: a positive magnitude shrinks, a negative one grows, +-0 -> -2^-9.
        wrong = back > exact
        stepped = torch.where(zero, 0x81, torch.where(negative, bits + 1, bits - 1))
    else:
        wrong = back < exact
        stepped = torch.where(zero, 0x01, torch.where(negative, bits - 1, bits + 1))
    return torch.where(wrong, stepped, bits).to(torch.uint8).view(FLOAT8_DTYPE)


@triton.jit
def directed_float8(x, DOWN: tl.constexpr):
    """``x`` (fp32) rounded to e4m3fn toward -inf (``DOWN``) or +inf, clamped to +-448.

    Same semantics as :func:`round_to_float8`, built from the fp32 bits instead of a
    round-to-nearest conversion and a fix-up (the CPU interpreter's fp32 -> fp8
    conversion misrounds where rounding carries into the exponent): truncate the
    magnitude to e4m3fn, add one ulp where something was cut off and the direction
    points away from zero, then set the sign.
    """
    exact = tl.minimum(tl.maximum(x, -448.0), 448.0)
    magnitude = tl.abs(exact)
    raw = magnitude.to(tl.int32, bitcast=True)
    # Normal e4m3fn (>= 2^-6): exponent rebiased from 127 to 7, the top 3 mantissa bits.
    normal = magnitude >= 0.015625
    cut_normal = (((raw >> 23) - 120) << 3) | ((raw >> 20) & 7)
    lost_normal = (raw & 0xFFFFF) != 0
    # Subnormal: multiples of 2^-9 (the scaling by a power of two is exact).
    scaled = magnitude * 512.0
    steps = tl.floor(scaled)
    cut = tl.where(normal, cut_normal, steps.to(tl.int32))
    lost = tl.where(normal, lost_normal, scaled != steps)
    negative = exact.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 stays -0
    away = negative if DOWN else exact > 0.0
    bits = cut + (lost & away).to(tl.int32)  # bits grow with the magnitude, carries included
    bits = tl.where(negative, bits | 0x80, bits)
    return bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


def store_bounds(
    key_min: torch.Tensor, key_max: torch.Tensor, index, low: torch.Tensor, high: torch.Tensor
) -> None:
    """``key_min[index] = low; key_max[index] = high`` in the bounds' dtype, rounded
    outward (min down, max up) when that dtype is fp8 and exactly otherwise (a min or max
    of model-dtype keys is itself a model-dtype value)."""
    if key_min.dtype == FLOAT8_DTYPE:
        low, high = round_to_float8(low, direction="down"), round_to_float8(high, direction="up")
    key_min[index] = low.to(key_min.dtype)
    key_max[index] = high.to(key_max.dtype)


def check_keys_fit_float8(*, keys: torch.Tensor, what: str = "keys") -> None:
    """Raise ValueError if any element of ``keys`` lies beyond e4m3fn's range (``+-448``).

    keys: any shape, any float dtype — e.g. one prefill chunk's post-RoPE keys of every
    layer, stacked. One device-to-host sync: call it outside a captured CUDA graph (the
    engine checks prefill chunks, not decode steps).
    """
    if keys.numel() == 0:
        return
    peak = float(keys.detach().abs().amax())
    if not peak <= FLOAT8_MAX:  # also catches NaN
        raise ValueError(
            f"{what} reach |k| = {peak:.4g}, beyond the float8_e4m3fn range (+-{FLOAT8_MAX:g}) "
            "of the Quest key bounds, so the page scores would no longer be upper bounds; "
            "use bounds in the model dtype (CacheConfig(bounds_dtype=None), the default)"
        )


def check_bounds_dtype(key_min: torch.Tensor, *, cache_dtype: torch.dtype) -> None:
    """Raise ValueError unless the bounds are in the K/V cache's dtype or in fp8."""
    if key_min.dtype not in (cache_dtype, FLOAT8_DTYPE):
        raise ValueError(
            f"key_min has dtype {key_min.dtype}; it must match k_cache ({cache_dtype}) or be "
            "float8_e4m3fn"
        )


def float8_supported(device: torch.device) -> bool:
    """Whether the Triton kernels can use fp8 bounds on ``device`` (the CPU interpreter,
    or a CUDA GPU of compute capability 8.9 or newer)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_float8_supported(device: torch.device) -> None:
    """Raise ValueError when fp8 bounds cannot run through Triton on ``device``."""
    if not float8_supported(device):
        raise ValueError(
            f"float8_e4m3fn key bounds need a GPU of compute capability >= 8.9 (Ada, "
            f"Hopper) for the Triton kernels; {device} is "
            f"{torch.cuda.get_device_capability(device)}: use bounds in the model dtype"
        )
