"""The PyTorch path of paged decode attention and its page checks.

:func:`longquest.kernels.decode.paged_decode_attention` runs this on the CPU (the engine's
CPU decode and the tests' reference runs) and when asked for ``impl="torch"``: the same
online softmax as the Triton kernel, over chunks of the page list, vectorised over
sequences and heads.
"""

from __future__ import annotations

import math

import torch

from longquest.kernels._checks import check_page_ids


def decode_torch(
    query, k_cache, v_cache, page_table, seq_lens, selected, scale, block_elements=1 << 24,
    out_dtype=None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Online softmax over chunks of the page list, vectorised over sequences and heads.

    A chunk gathers at most ``block_elements`` K (and V) values, so memory stays bounded
    however long the context is. ``out`` comes in ``out_dtype`` (default: the query's).
    """
    num_seqs, num_qo_heads, head_dim = query.shape
    _, num_kv_heads, page_size, _ = k_cache.shape
    group = num_qo_heads // num_kv_heads
    device = query.device
    lens = seq_lens.long()
    num_pages = (-(-lens // page_size)).clamp(max=page_table.shape[1])  # [num_seqs]
    if selected is None:
        width = int(num_pages.max()) if num_seqs else 0
        logical = torch.arange(width, device=device).expand(num_seqs, num_kv_heads, width)
    else:
        logical = selected.long()
    table = page_table.long()
    heads = torch.arange(num_kv_heads, device=device)[None, :, None]
    slots = torch.arange(page_size, device=device)
    q = query.float().reshape(num_seqs, num_kv_heads, group, head_dim) * scale
    m = torch.full((num_seqs, num_kv_heads, group), -math.inf, device=device)
    l = torch.zeros_like(m)
    acc = torch.zeros(num_seqs, num_kv_heads, group, head_dim, device=device)
    per_page = max(num_seqs * num_kv_heads * page_size * head_dim, 1)
    block_pages = max(1, block_elements // per_page)
    for c0 in range(0, logical.shape[2], block_pages):
        idx = logical[:, :, c0 : c0 + block_pages]  # [num_seqs, num_kv_heads, C]
        valid = (idx >= 0) & (idx < num_pages[:, None, None])
        idx = torch.where(valid, idx, 0)
        page = table.gather(1, idx.flatten(1)).view_as(idx)
        page = torch.where(valid, page, 0)
        k = k_cache[page, heads].float()  # [num_seqs, num_kv_heads, C, page_size, head_dim]
        v = v_cache[page, heads].float()
        pos = idx[..., None] * page_size + slots  # [num_seqs, num_kv_heads, C, page_size]
        token_valid = (valid[..., None] & (pos < lens[:, None, None, None])).flatten(2)
        logits = torch.einsum("skgd,sktd->skgt", q, k.flatten(2, 3))
        logits = logits.masked_fill(~token_valid[:, :, None], -math.inf)
        m_new = torch.maximum(m, logits.amax(-1))
        m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(logits - m_use[..., None])
        alpha = torch.exp(m - m_use)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("skgt,sktd->skgd", p, v.flatten(2, 3))
        m = m_new
    nonempty = l > 0
    out = torch.where(nonempty[..., None], acc / l.clamp_min(1e-30)[..., None], 0.0)
    lse = torch.where(nonempty, m + torch.log(l), -math.inf)
    out = out.view(num_seqs, num_qo_heads, head_dim).to(out_dtype or query.dtype)
    return out, lse.view(num_seqs, num_qo_heads)


def check_decode_pages(
    page_table, seq_lens, selected, num_pages_total: int, page_size: int
) -> None:
    """Host-syncing checks that every page the kernel will read lies in the pool."""
    lens = seq_lens.long()
    capacity = page_table.shape[1] * page_size
    if bool(((lens < 0) | (lens > capacity)).any()):
        raise ValueError(
            f"seq_lens must lie in [0, {capacity}] (page_table has {page_table.shape[1]} "
            f"columns of {page_size} tokens), got values in [{int(lens.min())}, {int(lens.max())}]"
        )
    num_pages = -(-lens // page_size)
    if selected is None:
        used = torch.arange(page_table.shape[1], device=page_table.device) < num_pages[:, None]
        ids = page_table[used]
    else:
        sel = selected.long()
        used = (sel >= 0) & (sel < num_pages[:, None, None])
        ids = page_table.long().gather(1, torch.where(used, sel, 0).flatten(1)).view_as(sel)[used]
    check_page_ids("page_table", ids, num_pages_total)
