"""pack_candidates + keep_global_top_k (Triton and PyTorch) against a brute-force ranking."""

import pytest
import torch

from longquest.kernels.global_topk import keep_global_top_k, pack_candidates

IMPLS = ("triton", "torch")


def _rank_candidates(world_size, num_seqs, num_kv_heads, top_k, gen):
    """Each rank's local top-k (ascending indices, -1 padding) with many tied scores."""
    ranks = []
    next_page = 0
    for _ in range(world_size):
        local_pages = int(torch.randint(0, 2 * top_k + 2, (1,), generator=gen))
        # Global pages held by this rank: distinct across ranks, any order.
        global_pages = torch.arange(next_page, next_page + local_pages, dtype=torch.int32)
        global_pages = global_pages[torch.randperm(local_pages, generator=gen)]
        next_page += local_pages
        table = torch.full((num_seqs, max(local_pages, 1)), -1, dtype=torch.int32)
        table[:, :local_pages] = global_pages
        scores = torch.full((num_seqs, num_kv_heads, top_k), -torch.inf)
        indices = torch.full((num_seqs, num_kv_heads, top_k), -1, dtype=torch.int32)
        for s in range(num_seqs):
            for h in range(num_kv_heads):
                count = min(top_k, local_pages)
                chosen = torch.randperm(local_pages, generator=gen)[:count].sort().values
                values = torch.randint(-2, 3, (count,), generator=gen).float()
                values[values == 2] = torch.inf  # pinned pages
                values[values == -2] = -torch.inf  # a real page scoring -inf
                scores[s, h, :count] = values
                indices[s, h, :count] = chosen.int()
        ranks.append((scores, indices, table[:, : max(local_pages, 0)]))
    return ranks


def _brute_force(ranks, top_k):
    """Per (seq, head): the global winners as a set of (rank, local index)."""
    num_seqs, num_kv_heads, _ = ranks[0][0].shape
    winners = {}
    for s in range(num_seqs):
        for h in range(num_kv_heads):
            cands = []
            for r, (scores, indices, table) in enumerate(ranks):
                for j in range(top_k):
                    local = int(indices[s, h, j])
                    if local >= 0:
                        cands.append((-float(scores[s, h, j]), int(table[s, local]), r, local))
            cands.sort()
            winners[s, h] = {(r, local) for _, _, r, local in cands[:top_k]}
    return winners


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("top_k", [1, 5, 8, 300])
def test_every_rank_keeps_its_share_of_the_global_top_k(device, impl, world_size, top_k):
    gen = torch.Generator().manual_seed(world_size * 100 + top_k)
    num_seqs, num_kv_heads = 3, 2
    ranks = _rank_candidates(world_size, num_seqs, num_kv_heads, top_k, gen)
    packed = [
        pack_candidates(
            top_scores=s.to(device),
            local_indices=i.to(device),
            global_pages=t.to(device),
            impl=impl,
        )
        for s, i, t in ranks
    ]
    gathered = torch.stack(packed)
    expected = _brute_force(ranks, top_k)
    for r, (_, indices, _) in enumerate(ranks):
        kept = keep_global_top_k(
            gathered=gathered, local_indices=indices.to(device), rank=r, impl=impl
        ).cpu()
        for s in range(num_seqs):
            for h in range(num_kv_heads):
                row = kept[s, h].tolist()
                real = [x for x in row if x >= 0]
                assert row == real + [-1] * (top_k - len(real)), "ascending, padding last"
                assert real == sorted(real)
                want = sorted(local for rr, local in expected[s, h] if rr == r)
                assert real == want, (r, s, h)


def test_bad_arguments_raise():
    scores = torch.zeros(1, 2, 4)
    indices = torch.zeros(1, 2, 4, dtype=torch.int32)
    pages = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="local_indices"):
        pack_candidates(top_scores=scores, local_indices=indices[:, :1], global_pages=pages)
    with pytest.raises(ValueError, match="global_pages"):
        pack_candidates(top_scores=scores, local_indices=indices, global_pages=pages.long())
    gathered = torch.zeros(2, 1, 2, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="rank"):
        keep_global_top_k(gathered=gathered, local_indices=indices, rank=2)
    with pytest.raises(ValueError, match="gathered"):
        keep_global_top_k(gathered=gathered[..., :1], local_indices=indices, rank=0)
