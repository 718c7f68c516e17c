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

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Per scaling kind: (keys it needs, keys it may have), as Hugging Face names them.
ROPE_KEYS = {
    "llama3": (LLAMA3_KEYS, ()),
    "linear": (("factor",), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}

RopeScaling = Mapping[str, object] | tuple[tuple[str, object], ...] | None


def rope_type_of(rope_scaling: RopeScaling) -> str:
    """The scaling kind of a ``rope_scaling`` mapping (or item tuple); ``"default"`` for None."""
    if rope_scaling is None:
        return "default"
    params = dict(rope_scaling)
    return str(params.get("rope_type", params.get("type", "default")))


def rope_inv_freq(*, head_dim: int, rope_theta: float, rope_scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, on the CPU.

    rope_scaling: None (plain RoPE) or the items of a scaling (``rope_type`` and the keys
    ``ROPE_KEYS`` lists for it), as a mapping or a tuple of items: "llama3" (Llama 3.1),
    "linear" (positions divided by ``factor``) or "yarn" (YaRN; its cos/sin are also
    scaled, by :func:`rope_attention_factor`).
    Returns ``[head_dim // 2]`` fp32. Computed in fp64 and rounded once.
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if rope_theta <= 0:
        raise ValueError(f"rope_theta must be positive, got {rope_theta}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (float(rope_theta) ** exponents)  # [head_dim // 2]
    kind = check_rope_scaling(rope_scaling)
    if kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, dict(rope_scaling))
    elif kind == "linear":
        inv_freq = inv_freq / _factor(dict(rope_scaling))
    elif kind == "yarn":
        inv_freq = _yarn_scale(inv_freq, dict(rope_scaling), head_dim, float(rope_theta))
    return inv_freq.float()


def rope_attention_factor(rope_scaling: RopeScaling) -> float:
    """The factor a scaling multiplies cos and sin by (so the logits by its square): YaRN's
    ``attention_factor``, given or ``0.1 ln(factor) + 1`` (with ``mscale`` /
    ``mscale_all_dim``: their ratio of such terms, as DeepSeek's configs set); else 1."""
    if check_rope_scaling(rope_scaling) != "yarn":
        return 1.0
    params = dict(rope_scaling)
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = _factor(params)

    def mscale(weight: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(float(params["mscale"])) / mscale(float(params["mscale_all_dim"]))
    return mscale(1.0)


def check_rope_scaling(rope_scaling: RopeScaling) -> str:
    """The scaling's kind; ValueError if longquest does not support it or a key it needs
    (``ROPE_KEYS``) is missing."""
    kind = rope_type_of(rope_scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {kind!r} is not supported; longquest supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind != "default":
        params = dict(rope_scaling)
        missing = [key for key in ROPE_KEYS[kind][0] if params.get(key) is None]
        if missing:
            raise ValueError(f"{kind} rope scaling needs {', '.join(missing)} in rope_scaling")
    return kind


def _factor(params: dict[str, object]) -> float:
    factor = float(params["factor"])
    if factor <= 0:
        raise ValueError(f"rope scaling factor must be positive, got {factor}")
    return factor


def _yarn_scale(
    inv_freq: torch.Tensor, params: dict[str, object], head_dim: int, theta: float
) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than ``beta_slow`` times over the original context
    are divided by ``factor`` (interpolated), those turning more than ``beta_fast`` times
    are kept (extrapolated), and a linear ramp over the dimensions between blends them."""
    factor = _factor(params)
    original = float(params["original_max_position_embeddings"])
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def dimension(rotations: float) -> float:  # where a frequency turns `rotations` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a step, not a division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (the frequency as it is), 0: interpolate
    return inv_freq / factor * (1.0 - keep) + inv_freq * keep


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
    *, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotation angles, shared by every layer of a step.

    positions: ``[num_tokens]`` int64. inv_freq: ``[head_dim // 2]`` fp32.
    attention_factor: scales both (:func:`rope_attention_factor`; 1 but for YaRN).
    Returns ``(cos, sin)``, each ``[num_tokens, 1, head_dim // 2]`` fp32
    (broadcast over heads).
    """
    angles = positions.float()[:, None] * inv_freq.float()[None, :]  # [num_tokens, head_dim // 2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


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
