"""PeerCollectives (peer memory, one Triton kernel) against NCCL on real GPUs, and its
refusal to run where it cannot (CPU, gloo, one rank)."""

from __future__ import annotations

import pytest
import torch

from longquest.parallel.comm import SequenceParallelComm
from longquest.parallel.peer import PeerCollectives
from tests.parallel.dist import run_distributed


def _on_gloo(*, rank, world_size, group):
    return PeerCollectives.create(group=group, rank=rank, world_size=world_size, device="cpu")


def test_not_possible_on_the_cpu():
    assert run_distributed(_on_gloo, world_size=2) == [None, None]


def _against_nccl(*, rank, world_size, group):
    """Many calls of mixed sizes, eager then replayed in a CUDA graph; NCCL's answers."""
    import torch.distributed as dist

    device = torch.device("cuda", rank)
    peer = PeerCollectives.create(group=group, rank=rank, world_size=world_size, device=device)
    assert peer is not None
    gen = torch.Generator(device=device).manual_seed(rank)
    sizes = [1, 7, 4096, 33 * 1024 + 3, 300_000, 5]  # 300K floats: grows the 1 MiB slots

    def inputs():
        gathers = [torch.randn(n, generator=gen, device=device) for n in sizes]
        sums = [torch.randn(n, generator=gen, device=device).bfloat16() for n in sizes]
        return gathers, sums

    def nccl(gathers, sums):
        outs = []
        for g, s in zip(gathers, sums):
            full = g.new_empty(world_size * g.numel())
            dist.all_gather_into_tensor(full, g, group=group)
            outs.append(full.view(world_size, -1))
            total = s.clone()
            dist.all_reduce(total, group=group)  # two ranks: the same single rounding
            outs.append(total)
        return outs

    def peers(gathers, sums):
        outs = []
        for g, s in zip(gathers, sums):
            outs.append(peer.all_gather(g))
            outs.append(peer.all_reduce(s.clone()))
        return outs

    mismatches = 0
    for _ in range(3):  # eager: several rounds, both parities, the buffer grows once
        gathers, sums = inputs()
        want = nccl(gathers, sums)
        got = peers(gathers, sums)
        mismatches += sum(not torch.equal(a, b) for a, b in zip(got, want))
    # A graph of many calls, replayed with new inputs each time.
    gathers, sums = inputs()
    peers(gathers, sums)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = peers(gathers, sums)
    for _ in range(5):
        fresh_g, fresh_s = inputs()
        for old, new in zip(gathers + sums, fresh_g + fresh_s):
            old.copy_(new)
        graph.replay()
        want = nccl(gathers, sums)
        mismatches += sum(not torch.equal(a, b) for a, b in zip(captured, want))
    torch.cuda.synchronize()
    # Through the comm: the merge fused into the exchange agrees with NCCL's gather and
    # the merge kernel (to rounding: the fused sum may contract into FMAs), also in bf16,
    # with rows empty on one rank and on both.
    comm = SequenceParallelComm(group=group, rank=rank, world_size=world_size)
    for dtype in (torch.float32, torch.bfloat16):
        out, lse = comm.partial_buffers(num_seqs=8, num_qo_heads=32, head_dim=128, device=device)
        out.copy_(torch.randn(out.shape, generator=gen, device=device))
        lse.copy_(torch.randn(lse.shape, generator=gen, device=device) * 3)
        lse[0] = -float("inf")
        if rank == 0:
            lse[1] = -float("inf")
        comm.peer = None
        want = comm.merge(out=out, lse=lse, dtype=dtype)
        comm.peer = peer
        got = comm.merge(out=out, lse=lse, dtype=dtype)
        close = torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-6)
        mismatches += int(not close) + int(got.isnan().any()) + int(bool(got[0].any()))
    # The global top-k: candidates packed inside the exchange, the same pages kept.
    scores = torch.randn(8, 8, 64, generator=gen, device=device)
    local = torch.stack([torch.randperm(500, device=device)[:64] for _ in range(64)])
    local = local.view(8, 8, 64).int().sort(dim=-1).values
    local[0, 0, 40:] = -1
    scores[0, 0, 40:] = -float("inf")
    pages = torch.randperm(4000, device=device)[:1000].view(2, 500).repeat(4, 1).int()
    kept = {}
    for name, which in (("nccl", None), ("peer", peer)):
        comm.peer = which
        kept[name] = comm.select_global(
            top_scores=scores, local_indices=local, global_pages=pages, top_k=64
        )
    mismatches += int(not torch.equal(kept["nccl"], kept["peer"]))
    return mismatches, peer.slot_bytes


@pytest.mark.multigpu
def test_peer_collectives_match_nccl():
    for mismatches, slot_bytes in run_distributed(
        _against_nccl, world_size=2, timeout_s=300, backend="nccl"
    ):
        assert mismatches == 0
        assert slot_bytes == 2 * 2**20  # grew once, to the next power of two
