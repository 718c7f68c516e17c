"""Rotary position embedding, computed from the positions at every step.

There is no cos/sin table sized by the maximum context: contexts reach
millions of tokens, and a step only ever needs the angles of its own tokens.
The rotation pairs dimension ``i`` with ``i + head_dim // 2`` (the Hugging Face
"rotate_half" layout, which is how Llama-family checkpoints store q/k weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

RopeScaling = Mapping[str, object] | tuple[tuple[str, object], ...] | None


def rope_type_of(rope_scaling: RopeScaling) -> str:
    """The scaling kind of a ``rope_scaling`` mapping (or item tuple); ``"default"`` for None."""
    if rope_scaling is None:
        return "default"
    params = dict(rope_scaling)
    return str(params.get("rope_type", params.get("type", "default")))


def rope_inv_freq(*, head_dim: int, rope_theta: float, rope_scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, on the CPU.

    rope_scaling: None (plain RoPE) or the items of a "llama3" scaling
    (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``), as a mapping or a tuple of items.
    Returns ``[head_dim // 2]`` fp32. Computed in fp64 and rounded once.
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if rope_theta <= 0:
        raise ValueError(f"rope_theta must be positive, got {rope_theta}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (float(rope_theta) ** exponents)  # [head_dim // 2]
    kind = rope_type_of(rope_scaling)
    if kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, dict(rope_scaling))
    elif kind != "default":
        raise ValueError(
            f"rope scaling type {kind!r} is not supported; longquest supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return inv_freq.float()


def _llama3_scale(inv_freq: torch.Tensor, params: dict[str, object]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: slow rotations are stretched by ``factor``.

    Wavelengths shorter than ``original / high_freq_factor`` stay as they are,
    those longer than ``original / low_freq_factor`` are divided by ``factor``,
    and the band between blends the two linearly in ``original / wavelength``.
    """
    missing = [key for key in LLAMA3_KEYS if key not in params]
    if missing:
        raise ValueError(f"llama3 rope scaling needs {', '.join(missing)} in rope_scaling")
    factor = float(params["factor"])
    low = float(params["low_freq_factor"])
    high = float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    if high <= low:
        raise ValueError(
            f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {params}"
        )
    wavelength = 2 * math.pi / inv_freq
    # 1 for wavelengths at most original/high (kept), 0 for those past original/low (scaled).
    keep = (original / wavelength - low) / (high - low)
    keep = torch.where(wavelength < original / high, 1.0, keep)
    keep = torch.where(wavelength > original / low, 0.0, keep)
    return keep * inv_freq + (1.0 - keep) * inv_freq / factor


def rope_cos_sin(
    *, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotation angles, shared by every layer of a step.

    positions: ``[num_tokens]`` int64. inv_freq: ``[head_dim // 2]`` fp32.
    Returns ``(cos, sin)``, each ``[num_tokens, 1, head_dim // 2]`` fp32
    (broadcast over heads).
    """
    angles = positions.float()[:, None] * inv_freq.float()[None, :]  # [num_tokens, head_dim // 2]
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def rotate(x: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[num_tokens, num_heads, head_dim]`` by angles from ``rope_cos_sin``.

    Math in fp32; the result has ``x``'s dtype.
    """
    half = x.shape[-1] // 2
    x1, x2 = x.float().split(half, dim=-1)  # [num_tokens, num_heads, head_dim // 2] each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rope(
    *,
    query: torch.Tensor,
    key: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of query and key at their token positions.

    query: ``[num_tokens, num_qo_heads, head_dim]``; key:
    ``[num_tokens, num_kv_heads, head_dim]``; positions: ``[num_tokens]``
    int64; inv_freq: ``[head_dim // 2]`` fp32 from ``rope_inv_freq``.
    Returns the rotated ``(query, key)`` in their own dtypes; cos/sin in fp32.
    """
    if positions.dim() != 1 or positions.shape[0] != query.shape[0]:
        raise ValueError(
            f"positions must have shape [num_tokens] = [{query.shape[0]}], "
            f"got {tuple(positions.shape)}"
        )
    if inv_freq.shape != (query.shape[-1] // 2,):
        raise ValueError(
            f"inv_freq must have shape [head_dim // 2] = [{query.shape[-1] // 2}], "
            f"got {tuple(inv_freq.shape)}"
        )
    cos, sin = rope_cos_sin(positions=positions, inv_freq=inv_freq)
    return rotate(query, cos=cos, sin=sin), rotate(key, cos=cos, sin=sin)
