"""One Quest decode step, composed from the public kernels and fused, checked end to end.

append_kv fills a paged cache (scattered pages, a prefill chunk then decode tokens),
page_scores -> select_pages picks the pages, paged_decode_attention attends over them.
With a budget covering the context the result must be dense softmax attention over
the very keys that were appended; with a smaller budget the selection must be the
top pages of a direct computation of Quest's bound.
"""

import pytest
import torch

from longquest.kernels import (
    append_kv,
    page_scores,
    paged_decode_attention,
    select_pages,
    topk,
)
from longquest.kernels import decode as decode_module
from longquest.kernels import scores as scores_module
from longquest.kernels.quest_step import make_quest_workspace, quest_decode_step
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


# The fused launchers (quest_step.py) against the composition of the public ones. ----------


def quest_inputs(gen, *, seq_lens, num_qo_heads, num_kv_heads, head_dim, device, dtype=None):
    """Random full-page bounds (min / max of the page's keys) over a scattered pool."""
    num_pages = [-(-n // PAGE_SIZE) for n in seq_lens]
    width = max(num_pages) + 2
    total = sum(num_pages) + 5
    k_cache = torch.randn(total, num_kv_heads, PAGE_SIZE, head_dim, generator=gen)
    v_cache = torch.randn(total, num_kv_heads, PAGE_SIZE, head_dim, generator=gen)
    table = torch.full((len(seq_lens), width), 0, dtype=torch.int32)
    ids, used = torch.randperm(total, generator=gen), 0
    for s, n in enumerate(num_pages):
        table[s, :n] = ids[used : used + n]
        used += n
    query = torch.randn(len(seq_lens), num_qo_heads, head_dim, generator=gen)
    dtype = dtype or torch.float32
    return dict(
        query=query.to(dtype).to(device),
        k_cache=k_cache.to(dtype).to(device),
        v_cache=v_cache.to(dtype).to(device),
        key_min=k_cache.amin(dim=2).to(dtype).to(device),
        key_max=k_cache.amax(dim=2).to(dtype).to(device),
        page_table=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


def composed(inputs, top_k, pin_last, impl):
    lens = inputs["seq_lens"]
    num_pages = (lens + PAGE_SIZE - 1) // PAGE_SIZE
    scores = page_scores(
        query=inputs["query"], key_min=inputs["key_min"], key_max=inputs["key_max"],
        page_table=inputs["page_table"], num_pages=num_pages, impl=impl,
    )  # fmt: skip
    top_scores, selected = select_pages(
        scores=scores, num_pages=num_pages, top_k=top_k, pin_last=pin_last, impl=impl
    )
    attend = {k: inputs[k] for k in ("query", "k_cache", "v_cache", "page_table", "seq_lens")}
    out, lse = paged_decode_attention(**attend, selected=selected, impl=impl)
    return top_scores, selected, out, lse, num_pages


def check_fused(inputs, top_k, pin_last, impl, *, atol=1e-5):
    *_, out, lse, _ = composed(inputs, top_k, pin_last, impl)
    workspace = make_quest_workspace(
        max_num_seqs=inputs["query"].shape[0], num_kv_heads=inputs["key_min"].shape[1],
        device=inputs["query"].device,
    )  # fmt: skip
    for _ in range(2):  # the counters must come back zeroed for the next launch
        got_out, got_lse = quest_decode_step(
            **inputs, top_k=top_k, pin_last=pin_last, workspace=workspace, impl=impl
        )
        assert not (workspace.counters != 0).any()
        assert got_out.dtype == out.dtype and got_lse.dtype == torch.float32
        torch.testing.assert_close(got_out.float(), out.float(), atol=atol, rtol=1e-4)
        assert torch.equal(torch.isinf(got_lse), torch.isinf(lse))
        finite = ~torch.isinf(lse)
        torch.testing.assert_close(got_lse[finite], lse[finite], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [1, 9])
def test_fused_step_equals_the_composed_step(impl, top_k, device, monkeypatch):
    # Several score programs and attention splits a row: the pipelined score loop and the
    # last-arriving split's reduction both run.
    monkeypatch.setattr(scores_module, "_PROGRAMS_PER_SM", 40)
    monkeypatch.setattr(decode_module, "_PROGRAMS_PER_SM", 24)
    gen = torch.Generator().manual_seed(30 + top_k)
    inputs = quest_inputs(
        gen, seq_lens=[130, 1, 0, 47], num_qo_heads=6, num_kv_heads=2, head_dim=32,
        device=device,
    )  # fmt: skip
    pins = torch.tensor([True, False, True, False], device=device)
    for pin_last in (True, False, pins):
        check_fused(inputs, top_k, pin_last, impl)


def test_fused_step_reduces_many_splits_in_chunks(device, monkeypatch):
    # 7 splits a row merged 2 at a time: the chunked reduction, with empty splits mixed in.
    monkeypatch.setattr(decode_module, "_PROGRAMS_PER_SM", 28)
    monkeypatch.setattr(decode_module, "_TOKENS_PER_BLOCK", 16)
    monkeypatch.setattr(decode_module, "_MERGE_CHUNK", 2)
    gen = torch.Generator().manual_seed(35)
    inputs = quest_inputs(
        gen, seq_lens=[200, 20], num_qo_heads=4, num_kv_heads=2, head_dim=32, device=device
    )
    check_fused(inputs, 7, True, "triton")


@pytest.mark.parametrize("ties", [False, True])
def test_fused_step_ties_and_two_pass_selection(ties, device, monkeypatch):
    monkeypatch.setattr(decode_module, "_PROGRAMS_PER_SM", 24)
    gen = torch.Generator().manual_seed(40 + ties)
    inputs = quest_inputs(
        gen, seq_lens=[300, 90], num_qo_heads=4, num_kv_heads=2, head_dim=32, device=device
    )
    if ties:  # equal bounds on many pages: equal scores, decided by page index
        inputs["key_min"] = inputs["key_min"].round()
        inputs["key_max"] = inputs["key_min"] + 1
    check_fused(inputs, 5, True, "triton")
    # Rows of 19 and 6 pages in chunks of 8: the physical ids come from the second pass.
    monkeypatch.setattr(topk, "_SINGLE_PASS_MAX", 8)
    monkeypatch.setattr(topk, "_MIN_CHUNK", 8)
    check_fused(inputs, 3, True, "triton")


def test_fused_launchers_reject_bad_input(device):
    gen = torch.Generator().manual_seed(50)
    inputs = quest_inputs(
        gen, seq_lens=[40, 20], num_qo_heads=4, num_kv_heads=2, head_dim=32, device=device
    )
    small = make_quest_workspace(max_num_seqs=1, num_kv_heads=2, device=device)
    good = make_quest_workspace(max_num_seqs=2, num_kv_heads=2, device=device)
    cases = [
        (dict(workspace=small), "workspace holds 2 rows"),
        (dict(workspace=good.counters), "workspace must be a QuestWorkspace"),
        (dict(top_k=0), "top_k must be an int >= 1"),
        (dict(pin_last=1), "pin_last must be a bool"),
        (dict(seq_lens=inputs["seq_lens"][:1]), r"seq_lens.shape\[0\]"),
        (dict(key_max=inputs["key_max"][:3]), "key_max has shape"),
        (dict(k_cache=inputs["k_cache"][:, :1], v_cache=inputs["v_cache"][:, :1]), "k_cache"),
        (dict(seq_lens=inputs["seq_lens"] + 1000), "seq_lens must lie in"),
    ]
    for change, match in cases:
        args = {**inputs, "top_k": 2, "workspace": good, **change}
        with pytest.raises(ValueError, match=match):
            quest_decode_step(**args)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="max_num_seqs must be an int"):
            make_quest_workspace(max_num_seqs=bad, num_kv_heads=2, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("pages", [2048, 8192, 20000])  # 8192, 20000: two-pass select
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_step_engine_sizes_on_gpu(pages, dtype, device):
    gen = torch.Generator().manual_seed(pages)
    seq_lens = [pages * PAGE_SIZE, pages * PAGE_SIZE // 3 + 5, 1]
    inputs = quest_inputs(
        gen, seq_lens=seq_lens, num_qo_heads=32, num_kv_heads=8, head_dim=128, device=device,
        dtype=dtype,
    )  # fmt: skip
    check_fused(inputs, 256, True, "triton", atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
def test_fused_step_replays_in_a_cuda_graph(device):
    gen = torch.Generator().manual_seed(60)
    inputs = quest_inputs(
        gen, seq_lens=[3000, 700], num_qo_heads=32, num_kv_heads=8, head_dim=128,
        device=device, dtype=torch.bfloat16,
    )  # fmt: skip
    workspace = make_quest_workspace(max_num_seqs=2, num_kv_heads=8, device=device)
    _, _, want_out, want_lse, _ = composed(inputs, 64, True, "triton")

    def step():
        return quest_decode_step(
            **inputs, top_k=64, workspace=workspace, check_pages=False, impl="triton"
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)
    assert not (workspace.counters != 0).any()
