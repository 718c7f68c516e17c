"""One Quest decode step composed from the public kernels, checked end to end.

append_kv fills a paged cache (scattered pages, a prefill chunk then decode tokens),
page_scores -> select_pages picks the pages, paged_decode_attention attends over them.
With a budget covering the context the result must be dense softmax attention over
the very keys that were appended; with a smaller budget the selection must be the
top pages of a direct computation of Quest's bound.
"""

import pytest
import torch

from longquest.kernels import append_kv, page_scores, paged_decode_attention, select_pages
from longquest.kernels.ref import page_scores_ref, paged_decode_attention_ref, select_pages_ref

IMPLS = ["torch", "triton"]
PAGE_SIZE = 16


def fill_cache(gen, *, seq_lens, num_kv_heads, head_dim, impl, device):
    """Append random K/V for every sequence: all but two tokens as one prefill chunk,
    then two single-token decode steps. Returns the cache, page table and raw K/V."""
    num_pages = [-(-n // PAGE_SIZE) for n in seq_lens]
    total = sum(num_pages) + 3
    shape = (total, num_kv_heads, PAGE_SIZE, head_dim)
    k_cache = torch.zeros(shape, device=device)
    v_cache = torch.zeros(shape, device=device)
    key_min = torch.zeros(total, num_kv_heads, head_dim, device=device)
    key_max = torch.zeros(total, num_kv_heads, head_dim, device=device)
    ids = torch.randperm(total, generator=gen)  # pages scattered over the pool
    table = torch.zeros(len(seq_lens), max(num_pages), dtype=torch.int32)
    used = 0
    for s, n in enumerate(num_pages):
        table[s, :n] = ids[used : used + n]
        used += n
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in seq_lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in seq_lens]

    def slots(s, positions):
        positions = torch.as_tensor(positions)
        return table[s, positions // PAGE_SIZE].long() * PAGE_SIZE + positions % PAGE_SIZE

    steps = [[range(0, n - 2) for n in seq_lens]]
    steps += [[[n - 2] for n in seq_lens], [[n - 1] for n in seq_lens]]
    for step in steps:
        positions = [torch.as_tensor(list(p), dtype=torch.long) for p in step]
        append_kv(
            key=torch.cat([keys[s][p] for s, p in enumerate(positions)]).to(device),
            value=torch.cat([values[s][p] for s, p in enumerate(positions)]).to(device),
            k_cache=k_cache, v_cache=v_cache, key_min=key_min, key_max=key_max,
            slot_mapping=torch.cat([slots(s, p) for s, p in enumerate(positions)]).to(device),
            impl=impl,
        )  # fmt: skip
    cache = dict(k_cache=k_cache, v_cache=v_cache, page_table=table.to(device))
    return cache, key_min, key_max, keys, values


def dense_attention(query, keys, values):
    """Softmax attention of each sequence's query over all its keys, in float64."""
    num_qo_heads = query.shape[1]
    outs, lses = [], []
    for s, (k, v) in enumerate(zip(keys, values, strict=True)):
        group = num_qo_heads // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)  # [tokens, num_qo_heads, head_dim]
        v = v.double().repeat_interleave(group, dim=1)
        logits = torch.einsum("hd,thd->ht", query[s].double(), k) * query.shape[2] ** -0.5
        lses.append(torch.logsumexp(logits, dim=1))
        outs.append(torch.einsum("ht,thd->hd", torch.softmax(logits, dim=1), v))
    return torch.stack(outs), torch.stack(lses)


def relative_error(actual, expected):
    return float((actual.double().cpu() - expected).norm() / expected.norm())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (8, 1)], ids=str)
def test_budget_covering_the_context_is_dense_attention(impl, heads, device):
    gen = torch.Generator().manual_seed(heads[0] * 10 + heads[1])
    num_qo_heads, num_kv_heads = heads
    seq_lens = [70, 33, 18]
    cache, key_min, key_max, keys, values = fill_cache(
        gen, seq_lens=seq_lens, num_kv_heads=num_kv_heads, head_dim=32, impl=impl, device=device
    )
    query = torch.randn(len(seq_lens), num_qo_heads, 32, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    num_pages = (lens + PAGE_SIZE - 1) // PAGE_SIZE
    scores = page_scores(
        query=query.to(device), key_min=key_min, key_max=key_max,
        page_table=cache["page_table"], num_pages=num_pages, impl=impl,
    )  # fmt: skip
    top_k = 6  # >= the longest sequence's 5 pages
    _, selected = select_pages(scores=scores, num_pages=num_pages, top_k=top_k, impl=impl)
    expected = torch.full((len(seq_lens), num_kv_heads, top_k), -1, dtype=torch.int32)
    for s, n in enumerate(num_pages.tolist()):
        expected[s, :, :n] = torch.arange(n, dtype=torch.int32)
    assert torch.equal(selected.cpu(), expected)
    out, lse = paged_decode_attention(
        query=query.to(device), **cache, seq_lens=lens, selected=selected, impl=impl
    )
    dense_out, dense_lse = dense_attention(query, keys, values)
    assert relative_error(out, dense_out) <= 1e-5
    assert relative_error(lse, dense_lse) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_budget_below_the_context_selects_the_top_pages(impl, device):
    gen = torch.Generator().manual_seed(21)
    num_qo_heads, num_kv_heads, head_dim = 4, 2, 32
    seq_lens = [200, 90, 40]
    cache, key_min, key_max, keys, values = fill_cache(
        gen, seq_lens=seq_lens, num_kv_heads=num_kv_heads, head_dim=head_dim, impl=impl,
        device=device,
    )  # fmt: skip
    query = torch.randn(len(seq_lens), num_qo_heads, head_dim, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    num_pages = (lens + PAGE_SIZE - 1) // PAGE_SIZE
    top_k = 4  # fewer than 13 and 6 pages; more than the last sequence's 3
    scores = page_scores(
        query=query.to(device), key_min=key_min, key_max=key_max,
        page_table=cache["page_table"], num_pages=num_pages, impl=impl,
    )  # fmt: skip
    _, selected = select_pages(scores=scores, num_pages=num_pages, top_k=top_k, impl=impl)

    # Direct computation: page bounds from the raw keys, Quest's bound, top-k by the ref.
    table = cache["page_table"].cpu()
    bound_min = torch.zeros(key_min.shape)
    bound_max = torch.zeros(key_max.shape)
    for s, k in enumerate(keys):
        for i, page in enumerate(table[s, : int(num_pages[s])].tolist()):
            bound_min[page] = k[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].amin(dim=0)
            bound_max[page] = k[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].amax(dim=0)
    ref_scores = page_scores_ref(
        query=query, key_min=bound_min, key_max=bound_max, page_table=table,
        num_pages=num_pages.cpu(),
    )  # fmt: skip
    _, ref_selected = select_pages_ref(scores=ref_scores, num_pages=num_pages.cpu(), top_k=top_k)
    assert torch.equal(selected.cpu(), ref_selected)
    assert (selected[:2] >= 0).all()  # the long sequences use their whole budget
    last = (num_pages - 1).view(-1, 1, 1).to(selected.dtype)
    assert (selected == last).any(dim=2).all()  # the newest token's page is pinned

    out, lse = paged_decode_attention(
        query=query.to(device), **cache, seq_lens=lens, selected=selected, impl=impl
    )
    cpu_cache = {k: v.cpu() for k, v in cache.items()}
    ref_out, ref_lse = paged_decode_attention_ref(
        query=query, **cpu_cache, seq_lens=lens.cpu(), selected=ref_selected
    )
    assert relative_error(out, ref_out.double()) <= 1e-5
    assert relative_error(lse, ref_lse.double()) <= 1e-5
