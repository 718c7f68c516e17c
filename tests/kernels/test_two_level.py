"""Two-level selection (Triton and PyTorch paths) against the references, and its exactness:
no page scoring above the best dropped group's coarse bound is ever missed."""

import math

import pytest
import torch

from longquest.kernels import (
    FLOAT8_DTYPE,
    coarse_bounds,
    group_page_scores,
    page_scores,
    select_candidates,
    select_pages_two_level,
)
from longquest.kernels.ref import (
    coarse_bounds_ref,
    page_scores_ref,
    select_candidates_ref,
    select_pages_ref,
    select_pages_two_level_ref,
)

IMPLS = ("triton", "torch")


def _inputs(device, *, num_pages, qo_heads=4, kv_heads=2, head_dim=16, group_pages=4,
            dtype=torch.float32, seed=0, pool=None):  # fmt: skip
    """Random bounds, shuffled page tables and the groups' exact coarse bounds (on the CPU
    reference first, then moved)."""
    gen = torch.Generator().manual_seed(seed)
    seqs, width = len(num_pages), max(max(num_pages), 1)
    pool = pool or sum(num_pages) + 3
    query = torch.randn(seqs, qo_heads, head_dim, generator=gen).to(dtype)
    key_min = torch.randn(pool, kv_heads, head_dim, generator=gen)
    key_max = key_min + torch.rand(pool, kv_heads, head_dim, generator=gen)
    bounds_dtype = dtype
    if dtype == FLOAT8_DTYPE:
        query = torch.randn(seqs, qo_heads, head_dim, generator=gen).to(torch.bfloat16)
    key_min, key_max = key_min.to(bounds_dtype), key_max.to(bounds_dtype)
    table = torch.zeros(seqs, width, dtype=torch.int32)
    for s, n in enumerate(num_pages):
        table[s, :n] = torch.randperm(pool, generator=gen)[:n].int()
    n = torch.tensor(num_pages, dtype=torch.int32)
    cmin, cmax = coarse_bounds_ref(key_min=key_min, key_max=key_max, page_table=table,
                                   num_pages=n, group_pages=group_pages)  # fmt: skip
    max_groups = cmin.shape[1]
    args = dict(query=query, key_min=key_min, key_max=key_max, page_table=table, num_pages=n,
                pin_last=torch.tensor([s % 3 != 1 for s in range(seqs)]),
                coarse_min=cmin, coarse_max=cmax)  # fmt: skip
    args = {name: t.to(device) for name, t in args.items()}
    return args, max_groups


def _pin_from(num_pages, group_pages, device):
    """The last group's bounds are not final where the newest page is pinned (as in
    ``_inputs``: every sequence but 1, 4, ...) and in every other sequence besides."""
    groups = [-(-n // group_pages) for n in num_pages]
    firsts = [g - 1 if s % 3 != 1 or s % 2 else g for s, g in enumerate(groups)]
    return torch.tensor(firsts, dtype=torch.int32, device=device)


def _two_level(args, max_groups, *, group_pages, kept_groups, top_k, pin_from, impl):
    seqs = args["query"].shape[0]
    device = args["query"].device
    num_groups = ((args["num_pages"] + group_pages - 1) // group_pages).int()
    table = torch.arange(seqs * max_groups, dtype=torch.int32, device=device)
    fine = {k: v for k, v in args.items() if k not in ("coarse_min", "coarse_max")}
    return select_pages_two_level(
        **fine, coarse_min=args["coarse_min"].flatten(0, 1),
        coarse_max=args["coarse_max"].flatten(0, 1), coarse_table=table.view(seqs, max_groups),
        num_groups=num_groups, pin_from=pin_from, group_pages=group_pages,
        kept_groups=kept_groups, top_k=top_k, impl=impl,
    )  # fmt: skip


def _reference(args, *, group_pages, kept_groups, top_k, pin_from):
    cpu = {name: t.cpu() for name, t in args.items()}
    return select_pages_two_level_ref(**cpu, pin_from=pin_from.cpu(), group_pages=group_pages,
                                      kept_groups=kept_groups, top_k=top_k)  # fmt: skip


def test_coarse_bounds_match_reference():
    num_pages = [1, 7, 8, 0]
    for dtype in (torch.float32, torch.bfloat16, FLOAT8_DTYPE):
        args, _ = _inputs("cpu", num_pages=num_pages, dtype=dtype, group_pages=4)
        pages = []
        for s, n in enumerate(num_pages):
            for g in range(-(-n // 4)):
                ids = args["page_table"][s, g * 4 : min(n, g * 4 + 4)].tolist()
                pages.append(ids + [-1] * (4 - len(ids)))
        lo, hi = coarse_bounds(key_min=args["key_min"][None], key_max=args["key_max"][None],
                               pages=torch.tensor(pages))  # fmt: skip
        assert lo.shape == (1, len(pages), 2, 16) and lo.dtype == dtype
        want_lo = torch.cat([args["coarse_min"][s, : -(-n // 4)] for s, n in enumerate(num_pages)])
        want_hi = torch.cat([args["coarse_max"][s, : -(-n // 4)] for s, n in enumerate(num_pages)])
        assert torch.equal(lo[0].float(), want_lo.float())
        assert torch.equal(hi[0].float(), want_hi.float())


@pytest.mark.parametrize("impl", IMPLS)
def test_page_scores_pin_from(device, impl):
    args, _ = _inputs(device, num_pages=[5, 9, 0, 3])
    fine = {k: args[k] for k in ("query", "key_min", "key_max", "page_table", "num_pages")}
    pin_from = torch.tensor([2, 9, 0, 0], dtype=torch.int32, device=device)
    got = page_scores(**fine, pin_from=pin_from, impl=impl).cpu()
    want = page_scores_ref(**{k: v.cpu() for k, v in fine.items()})
    for s, (n, first) in enumerate(zip([5, 9, 0, 3], pin_from.tolist())):
        want[s, :, first:n] = math.inf
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("qo_heads, kv_heads", [(2, 2), (4, 1), (6, 2)], ids=str)
def test_group_page_scores_match_reference(device, impl, qo_heads, kv_heads):
    num_pages = [6, 11, 0]
    args, _ = _inputs(device, num_pages=num_pages, qo_heads=qo_heads, kv_heads=kv_heads,
                      group_pages=4, seed=qo_heads)  # fmt: skip
    groups = torch.tensor([[1, 0, -1], [0, 2, 1], [-1, -1, -1]], dtype=torch.int32)
    groups = groups[:, None].expand(-1, kv_heads, -1).contiguous()
    fine = {k: args[k] for k in ("query", "key_min", "key_max", "page_table", "num_pages")}
    got, pages = group_page_scores(**fine, pin_last=args["pin_last"], groups=groups.to(device),
                                   group_pages=4, impl=impl)  # fmt: skip
    got, pages = got.cpu(), pages.cpu()
    full = page_scores_ref(**{k: v.cpu() for k, v in fine.items()})
    for s, n in enumerate(num_pages):
        if n and bool(args["pin_last"][s]):
            full[s, :, n - 1] = math.inf
    assert got.shape == (3, kv_heads, 12)
    for s, n in enumerate(num_pages):
        for h in range(kv_heads):
            for c in range(12):
                g = int(groups[s, h, c // 4])
                page = g * 4 + c % 4
                want = full[s, h, page] if g >= 0 and page < n else -math.inf
                assert pages[s, h, c] == (page if g >= 0 and page < n else -1)
                torch.testing.assert_close(
                    got[s, h, c], torch.as_tensor(want), rtol=1e-6, atol=1e-5
                )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [1, 3, 8, 40])
def test_select_candidates_matches_reference(device, impl, top_k):
    """Candidates between non-candidates, ties (kept in slot order), a row with none, a
    row with fewer candidates than top_k."""
    gen = torch.Generator().manual_seed(top_k)
    scores = torch.randn(3, 2, 33, generator=gen).round(decimals=1)
    scores[0, 0, 5] = math.inf
    indices = torch.randint(0, 500, (3, 2, 33), generator=gen, dtype=torch.int32)
    indices[torch.rand(3, 2, 33, generator=gen) < 0.3] = -1
    indices[1, 1] = -1
    indices[2, 0, 4:] = -1
    want = select_candidates_ref(scores=scores, indices=indices, top_k=top_k)
    got = select_candidates(scores=scores.to(device), indices=indices.to(device), top_k=top_k,
                            impl=impl)  # fmt: skip
    assert torch.equal(got[1].cpu(), want[1])
    assert torch.equal(got[0].cpu(), want[0])


CASES = [
    # (num_pages, group_pages, kept_groups, top_k)
    ([1, 13, 0, 30], 4, 3, 5),  # one page, partial last group, empty row, long row
    ([30, 17], 2, 5, 7),
    ([30, 9], 4, 20, 6),  # every group kept: the single-level selection
    ([25, 4], 4, 2, 12),  # fewer candidates than top_k
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_two_level_matches_reference(device, impl, case):
    num_pages, group_pages, kept_groups, top_k = case
    args, max_groups = _inputs(device, num_pages=num_pages, group_pages=group_pages,
                               seed=len(num_pages) + top_k)  # fmt: skip
    pin_from = _pin_from(num_pages, group_pages, device)
    options = dict(group_pages=group_pages, kept_groups=kept_groups, top_k=top_k,
                   pin_from=pin_from)  # fmt: skip
    scores, indices = _two_level(args, max_groups, impl=impl, **options)
    want_scores, want_indices = _reference(args, **options)
    assert torch.equal(indices.cpu(), want_indices)
    torch.testing.assert_close(scores.cpu(), want_scores, rtol=1e-6, atol=1e-5)


def _exact(args):
    """Single-level fine scores (newest page pinned) of every page."""
    cpu = {k: args[k].cpu() for k in ("query", "key_min", "key_max", "page_table", "num_pages")}
    fine = page_scores_ref(**cpu)
    for s, n in enumerate(cpu["num_pages"].tolist()):
        if n and bool(args["pin_last"][s]):
            fine[s, :, n - 1] = math.inf
    return fine


@pytest.mark.parametrize("seed", range(6))
def test_never_misses_a_page_above_the_dropped_groups(seed):
    """Every page of the exact top-k missing from the two-level one scores no higher than the
    best coarse bound among the groups it dropped; every group kept gives the exact top-k."""
    num_pages, group_pages, top_k = [64, 41], 4, 6
    args, max_groups = _inputs("cpu", num_pages=num_pages, group_pages=group_pages, seed=seed)
    pin_from = _pin_from(num_pages, group_pages, "cpu")
    fine = _exact(args)
    _, exact = select_pages_ref(scores=fine, num_pages=args["num_pages"], top_k=top_k,
                                pin_last=False)  # fmt: skip
    table = torch.arange(2 * max_groups).view(2, max_groups)
    num_groups = torch.tensor([-(-n // group_pages) for n in num_pages])
    coarse = page_scores_ref(query=args["query"], key_min=args["coarse_min"].flatten(0, 1),
                             key_max=args["coarse_max"].flatten(0, 1), page_table=table,
                             num_pages=num_groups)  # fmt: skip
    for s, first in enumerate(pin_from.tolist()):
        coarse[s, :, first : int(num_groups[s])] = math.inf  # as the selection pins them
    for kept_groups in (2, 3, 5):
        scores, got = _two_level(args, max_groups, group_pages=group_pages,
                                 kept_groups=kept_groups, top_k=top_k, pin_from=pin_from,
                                 impl="torch")  # fmt: skip
        _, kept = select_pages_ref(scores=coarse, num_pages=num_groups, top_k=kept_groups,
                                   pin_last=False)  # fmt: skip
        for s, n in enumerate(num_pages):
            for h in range(2):
                dropped = set(range(int(num_groups[s]))) - set(kept[s, h].tolist())
                # The pages of each dropped group score at most its coarse bound.
                for g in dropped:
                    pages = fine[s, h, g * group_pages : min(n, (g + 1) * group_pages)]
                    assert pages.max() <= coarse[s, h, g] * (1 + 1e-6) + 1e-5
                # A missed page lies in a dropped group, below the best of their bounds.
                ceiling = max((float(coarse[s, h, g]) for g in dropped), default=-math.inf)
                missed = set(exact[s, h].tolist()) - set(got[s, h].tolist())
                for page in missed:
                    assert page // group_pages in dropped
                    assert float(fine[s, h, page]) <= ceiling + 1e-5
                # So where the k-th kept page scores above that bound, nothing is missed.
                if float(scores[s, h].min()) > ceiling:
                    assert not missed
    _, every = _two_level(args, max_groups, group_pages=group_pages, kept_groups=max_groups,
                          top_k=top_k, pin_from=pin_from, impl="torch")  # fmt: skip
    assert torch.equal(every, exact)


def test_rejects_bad_sizes():
    args, max_groups = _inputs("cpu", num_pages=[8])
    pin_from = _pin_from([8], 4, "cpu")
    for bad in (dict(kept_groups=0), dict(top_k=0), dict(group_pages=True)):
        options = dict(group_pages=4, kept_groups=2, top_k=2) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            _two_level(args, max_groups, pin_from=pin_from, impl="torch", **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, FLOAT8_DTYPE], ids=str)
@pytest.mark.parametrize("qo_heads, kv_heads", [(8, 2), (32, 8), (12, 4)], ids=str)
def test_two_level_gpu_large(dtype, qo_heads, kv_heads):
    """Engine-like sizes on the GPU: tensor-core scoring, long rows (two-pass and spread
    coarse selections), bf16 / fp16 / fp8 bounds against the reference."""
    device = torch.device("cuda")
    if dtype == FLOAT8_DTYPE and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 bounds need compute capability >= 8.9")
    num_pages = [4000, 2501, 1, 0]
    args, max_groups = _inputs(device, num_pages=num_pages, qo_heads=qo_heads,
                               kv_heads=kv_heads, head_dim=128, group_pages=4, dtype=dtype,
                               seed=qo_heads)  # fmt: skip
    pin_from = _pin_from(num_pages, 4, device)
    options = dict(group_pages=4, kept_groups=129, top_k=256, pin_from=pin_from)
    scores, indices = _two_level(args, max_groups, impl="triton", **options)
    torch_scores, torch_indices = _two_level(args, max_groups, impl="torch", **options)
    want_scores, want_indices = _reference(args, **options)
    # Scores agree to the products' rounding; a near-tie may swap (then both are kept ones).
    assert (indices.cpu() != want_indices).float().mean() < 1e-3
    assert torch.equal(torch_indices.cpu(), want_indices)
    finite = torch.isfinite(want_scores) & (indices.cpu() == want_indices)
    torch.testing.assert_close(scores.cpu()[finite], want_scores[finite], rtol=1e-3, atol=1e-2)
