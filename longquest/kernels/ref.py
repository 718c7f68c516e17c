"""Plain PyTorch references for every kernel in this package.

These functions *define* the semantics the Triton kernels must match. They are
written for clarity, compute in fp32, and loop in Python where that is clearer
than a vectorised trick. Tests compare each Triton launcher against them.

Shared layout (dimension names as in ARCHITECTURE.md):

- ``k_cache``, ``v_cache``: ``[num_pages_total, num_kv_heads, page_size, head_dim]``
  — the page pool of one layer; a page holds ``page_size`` consecutive tokens of
  one sequence, every KV head's slice of a page is contiguous.
- ``key_min``, ``key_max``: ``[num_pages_total, num_kv_heads, head_dim]``, same
  dtype as ``k_cache`` — element-wise min / max of the page's filled key slots — or
  ``float8_e4m3fn``, then rounded outward (min down, max up; see
  :mod:`longquest.kernels.float8`), so they still bound every key of the page.
- ``page_table``: ``[num_seqs, max_pages]`` int32 — physical page ids of each
  sequence in position order; entries past ``num_pages[s]`` are ignored.
- ``seq_lens``: ``[num_seqs]`` int32 — valid tokens of the sequence's page list;
  every page but the last is full.
- LSE: natural log, fp32, ``[num_seqs, num_qo_heads]``; ``-inf`` for no tokens.
"""

from __future__ import annotations

import math

import torch

from longquest.kernels.float8 import store_bounds


def append_kv_ref(
    *,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
) -> None:
    """Write new tokens' K/V into their slots and refresh the touched pages' bounds.

    key, value: ``[num_tokens, num_kv_heads, head_dim]``, the cache's dtype.
    slot_mapping: ``[num_tokens]`` int — ``page_id * page_size + offset``.
    A touched page's bounds become the min / max over its slots ``0..offset``
    of the last token written to it (slots past that are not part of the page
    yet); fp8 bounds store them rounded down / up. In place.
    """
    page_size = k_cache.shape[2]
    slots = slot_mapping.long().tolist()
    fill: dict[int, int] = {}
    for token, slot in enumerate(slots):
        page, offset = divmod(slot, page_size)
        k_cache[page, :, offset] = key[token]
        v_cache[page, :, offset] = value[token]
        fill[page] = max(fill.get(page, 0), offset + 1)
    for page, filled in fill.items():
        keys = k_cache[page, :, :filled].float()  # [num_kv_heads, filled, head_dim]
        store_bounds(key_min, key_max, page, keys.amin(dim=1), keys.amax(dim=1))


def page_scores_ref(
    *,
    query: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
) -> torch.Tensor:
    """Quest criticality of every page, reduced over each KV head's query group by max.

    query: ``[num_seqs, num_qo_heads, head_dim]``.
    num_pages: ``[num_seqs]`` int — valid pages per sequence.
    Returns ``[num_seqs, num_kv_heads, max_pages]`` fp32; entries at
    ``j >= num_pages[s]`` are ``-inf``.
    """
    num_seqs, num_qo_heads, head_dim = query.shape
    num_kv_heads = key_min.shape[1]
    group = num_qo_heads // num_kv_heads
    max_pages = page_table.shape[1]
    scores = torch.full(
        (num_seqs, num_kv_heads, max_pages), -math.inf, dtype=torch.float32, device=query.device
    )
    for s in range(num_seqs):
        n = int(num_pages[s])
        if n == 0:
            continue
        pages = page_table[s, :n].long()
        kmin = key_min[pages].float()  # [n, num_kv_heads, head_dim]
        kmax = key_max[pages].float()
        q = query[s].float().view(num_kv_heads, group, 1, head_dim)
        bound = torch.maximum(q * kmin.transpose(0, 1)[:, None], q * kmax.transpose(0, 1)[:, None])
        scores[s, :, :n] = bound.sum(-1).amax(dim=1)  # [num_kv_heads, n]
    return scores


def select_pages_ref(
    *,
    scores: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    pin_last: bool | torch.Tensor = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``top_k`` pages of each (sequence, KV head) by score.

    scores: ``[num_seqs, num_kv_heads, max_pages]`` fp32.
    pin_last: pin the sequence's last valid page (it holds the newest token) —
    a bool for every sequence or a ``[num_seqs]`` bool tensor. A pinned page
    reports the score ``+inf``.
    Returns ``(top_scores, indices)``, both ``[num_seqs, num_kv_heads, top_k]``
    (fp32, int32): the logical page indices (positions in ``page_table``) of
    the ``min(top_k, num_pages)`` highest scores, ties going to the lower
    index, listed in ascending index order (reads walk memory forward), with
    their scores; rows with fewer than ``top_k`` valid pages are padded at the
    end with score ``-inf`` and index ``-1``.
    """
    num_seqs, num_kv_heads, _ = scores.shape
    pins = pin_last.tolist() if isinstance(pin_last, torch.Tensor) else [bool(pin_last)] * num_seqs
    top_scores = torch.full((num_seqs, num_kv_heads, top_k), -math.inf, device=scores.device)
    indices = torch.full(
        (num_seqs, num_kv_heads, top_k), -1, dtype=torch.int32, device=scores.device
    )
    for s in range(num_seqs):
        n = int(num_pages[s])
        if n == 0:
            continue
        row = scores[s, :, :n].float().clone()
        if pins[s]:
            row[:, n - 1] = math.inf
        k = min(top_k, n)
        for h in range(num_kv_heads):
            # Stable sort on the negated score keeps ties in index order.
            order = torch.sort(-row[h], stable=True).indices[:k].sort().values
            top_scores[s, h, :k] = row[h, order]
            indices[s, h, :k] = order.int()
    return top_scores, indices


def select_candidates_ref(
    *, scores: torch.Tensor, indices: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``top_k`` candidates of each row: ``scores`` / ``indices`` ``[num_seqs,
    num_kv_heads, list_len]`` (fp32, int32 with ``-1`` for no candidate). Returns their
    scores and indices ``[num_seqs, num_kv_heads, top_k]`` in list order (ties to the
    earlier slot), padded with ``-inf`` / ``-1``."""
    num_seqs, num_kv_heads, _ = scores.shape
    top_scores = torch.full((num_seqs, num_kv_heads, top_k), -math.inf, device=scores.device)
    top_indices = torch.full_like(top_scores, -1, dtype=torch.int32)
    for s in range(num_seqs):
        for h in range(num_kv_heads):
            slots = [c for c, i in enumerate(indices[s, h].tolist()) if i >= 0]
            if not slots:
                continue
            row = scores[s, h, slots].float()
            order = torch.sort(-row, stable=True).indices[:top_k].sort().values
            chosen = torch.tensor(slots, device=scores.device)[order]
            top_scores[s, h, : len(order)] = scores[s, h, chosen]
            top_indices[s, h, : len(order)] = indices[s, h, chosen]
    return top_scores, top_indices


def coarse_bounds_ref(
    *,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    group_pages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of each sequence's page groups: group ``g`` covers its pages
    ``g * group_pages .. min((g + 1) * group_pages, num_pages) - 1``.

    Returns ``(coarse_min, coarse_max)``, ``[num_seqs, max_groups, num_kv_heads, head_dim]``
    in the bounds' dtype (``max_groups = ceil(max_pages / group_pages)``): the element-wise
    min / max over the group's pages' bounds; zeros for groups past ``num_pages``.
    """
    num_seqs, max_pages = page_table.shape
    max_groups = -(-max_pages // group_pages)
    shape = (num_seqs, max_groups, *key_min.shape[1:])
    coarse_min = torch.zeros(shape, dtype=key_min.dtype, device=key_min.device)
    coarse_max = torch.zeros(shape, dtype=key_max.dtype, device=key_max.device)
    for s in range(num_seqs):
        n = int(num_pages[s])
        for g in range(-(-n // group_pages)):
            pages = page_table[s, g * group_pages : min(n, (g + 1) * group_pages)].long()
            coarse_min[s, g] = key_min[pages].float().amin(dim=0).to(key_min.dtype)
            coarse_max[s, g] = key_max[pages].float().amax(dim=0).to(key_max.dtype)
    return coarse_min, coarse_max


def select_pages_two_level_ref(
    *,
    query: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    pin_last: torch.Tensor,
    coarse_min: torch.Tensor,
    coarse_max: torch.Tensor,
    pin_from: torch.Tensor,
    group_pages: int,
    kept_groups: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``top_k`` pages among those of the ``kept_groups`` best page groups.

    coarse_min, coarse_max: ``[num_seqs, max_groups, num_kv_heads, head_dim]`` as from
    :func:`coarse_bounds_ref`. pin_last: ``[num_seqs]`` bool. pin_from: ``[num_seqs]`` int —
    groups at ``g >= pin_from`` score ``+inf`` (always kept).
    A group scores as a page would with its coarse bounds; the best ``kept_groups`` of each
    (sequence, KV head) are kept (ties to the lower group); their pages are scored from the
    fine bounds, the last page ``+inf`` where pinned, and the best ``top_k`` of them kept
    (ties to the lower page). Returns ``(top_scores, indices)`` as :func:`select_pages_ref`.
    """
    num_seqs, max_groups = coarse_min.shape[:2]
    num_kv_heads = key_min.shape[1]
    num_groups = torch.tensor([-(-int(n) // group_pages) for n in num_pages.tolist()])
    table = torch.arange(num_seqs * max_groups, device=query.device).view(num_seqs, max_groups)
    coarse = page_scores_ref(query=query, key_min=coarse_min.flatten(0, 1),
                             key_max=coarse_max.flatten(0, 1), page_table=table,
                             num_pages=num_groups)  # fmt: skip
    fine = page_scores_ref(query=query, key_min=key_min, key_max=key_max,
                           page_table=page_table, num_pages=num_pages)  # fmt: skip
    top_scores = torch.full((num_seqs, num_kv_heads, top_k), -math.inf, device=query.device)
    indices = torch.full_like(top_scores, -1, dtype=torch.int32)
    for s in range(num_seqs):
        n, first_pinned = int(num_pages[s]), int(pin_from[s])
        coarse[s, :, first_pinned : int(num_groups[s])] = math.inf
        if n and bool(pin_last[s]):
            fine[s, :, n - 1] = math.inf
        _, kept = select_pages_ref(scores=coarse[s : s + 1], num_pages=num_groups[s : s + 1],
                                   top_k=kept_groups, pin_last=False)  # fmt: skip
        for h in range(num_kv_heads):
            pages = [g * group_pages + t for g in kept[0, h].tolist() if g >= 0
                     for t in range(group_pages) if g * group_pages + t < n]  # fmt: skip
            if not pages:
                continue
            row = fine[s, h, pages]
            order = torch.sort(-row, stable=True).indices[:top_k].sort().values
            k = len(order)
            top_scores[s, h, :k] = row[order]
            indices[s, h, :k] = torch.tensor(pages, device=query.device)[order].int()
    return top_scores, indices


def paged_decode_attention_ref(
    *,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query token per sequence over (selected) pages.

    query: ``[num_seqs, num_qo_heads, head_dim]``.
    selected: ``[num_seqs, num_kv_heads, top_k]`` int32 logical page indices,
    ``-1`` for none; ``None`` attends to every page of the sequence. Query head
    ``h`` reads the pages of KV head ``h // (num_qo_heads // num_kv_heads)``.
    Slots past ``seq_lens`` on the last page are masked.
    Returns ``(out, lse)``: ``[num_seqs, num_qo_heads, head_dim]`` in the
    query's dtype and ``[num_seqs, num_qo_heads]`` fp32 (natural log); a head
    with no tokens gives ``out = 0, lse = -inf``.
    """
    num_seqs, num_qo_heads, head_dim = query.shape
    _, num_kv_heads, page_size, _ = k_cache.shape
    group = num_qo_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(num_seqs, num_qo_heads, head_dim, device=query.device)
    lse = torch.full((num_seqs, num_qo_heads), -math.inf, device=query.device)
    for s in range(num_seqs):
        length = int(seq_lens[s])
        n = -(-length // page_size)
        for h in range(num_qo_heads):
            kv = h // group
            if selected is None:
                logical = list(range(n))
            else:
                logical = [int(i) for i in selected[s, kv].tolist() if 0 <= i < n]
            if not logical:
                continue
            keys, values = [], []
            for i in logical:
                page = int(page_table[s, i])
                filled = min(page_size, length - i * page_size)
                keys.append(k_cache[page, kv, :filled].float())
                values.append(v_cache[page, kv, :filled].float())
            k = torch.cat(keys)  # [tokens, head_dim]
            v = torch.cat(values)
            logits = (k @ query[s, h].float()) * scale
            lse[s, h] = torch.logsumexp(logits, dim=0)
            out[s, h] = torch.softmax(logits, dim=0) @ v
    return out.to(query.dtype), lse


def merge_attention_states_ref(
    *, outputs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over the union of disjoint token sets.

    outputs: ``[num_sources, num_seqs, num_qo_heads, head_dim]``.
    lses: ``[num_sources, num_seqs, num_qo_heads]`` fp32, natural log; a
    source with ``lse = -inf`` had no tokens and contributes nothing.
    Returns ``(out, lse)``: ``[num_seqs, num_qo_heads, head_dim]`` in the
    outputs' dtype and ``[num_seqs, num_qo_heads]`` fp32. All sources empty
    gives ``out = 0, lse = -inf`` (never NaN).
    """
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)  # -inf where every source is -inf
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - safe)  # exp(-inf) = 0 for empty sources
    out = (weights[..., None] * outputs.float()).sum(0)
    return out.to(outputs.dtype), lse


def prefill_attention_ref(
    *,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start: int,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk of consecutive query positions over contiguous keys.

    query: ``[num_q, num_qo_heads, head_dim]`` at positions
    ``query_start .. query_start + num_q - 1``; key, value:
    ``[num_k, num_kv_heads, head_dim]`` at positions ``0 .. num_k - 1``.
    With ``causal`` a query at position ``p`` sees keys ``<= p``.
    Returns ``(out, lse)``: ``[num_q, num_qo_heads, head_dim]`` in the query's
    dtype and ``[num_q, num_qo_heads]`` fp32.
    """
    num_q, num_qo_heads, head_dim = query.shape
    group = num_qo_heads // key.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, num_k, D]
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)
    q = query.float().transpose(0, 1)  # [H, num_q, D]
    logits = (q @ k.transpose(1, 2)) * scale  # [H, num_q, num_k]
    if causal:
        q_pos = torch.arange(num_q, device=query.device)[:, None] + query_start
        k_pos = torch.arange(key.shape[0], device=query.device)[None, :]
        logits = logits.masked_fill(k_pos > q_pos, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # [H, num_q]
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = (probs @ v).transpose(0, 1)
    return out.to(query.dtype), lse.transpose(0, 1).contiguous()


def peer_exchange_ref(payloads: list[torch.Tensor], *, reduce: bool) -> torch.Tensor:
    """What :func:`longquest.kernels.peer.peer_exchange` returns on every rank, given each
    rank's payload (index = rank): their stack ``[world_size, *shape]``, or their sum
    taken in fp32 in rank order and rounded once to the payloads' dtype."""
    if not reduce:
        return torch.stack(payloads)
    total = torch.zeros(payloads[0].shape, dtype=torch.float32, device=payloads[0].device)
    for payload in payloads:
        total += payload.float()
    return total.to(payloads[0].dtype)
