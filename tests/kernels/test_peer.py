"""peer_exchange against peer_exchange_ref, with every rank's buffer in one process.

The kernel's two halves run as separate launches (every rank pushes, then every rank
finishes), as they must under the interpreter; the real cross-GPU run of both halves in
one kernel is tested in tests/parallel/test_peer.py.
"""

import math

import pytest
import torch

from longquest.kernels.global_topk import pack_candidates
from longquest.kernels.peer import MAX_PROGRAMS, buffer_bytes, peer_exchange
from longquest.kernels.peer_attention import peer_gather_candidates, peer_merge
from longquest.kernels.ref import merge_attention_states_ref, peer_exchange_ref


class Ranks:
    """``world_size`` simulated ranks: their buffers, bases and counters."""

    def __init__(self, world_size: int, slot_bytes: int, device) -> None:
        size = buffer_bytes(world_size=world_size, slot_bytes=slot_bytes)
        self.buffers = [
            torch.zeros(size, dtype=torch.uint8, device=device) for _ in range(world_size)
        ]
        self.bases = torch.tensor([b.data_ptr() for b in self.buffers], device=device)
        self.counters = [
            torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device) for _ in range(world_size)
        ]
        self.slot_bytes = slot_bytes
        self.world_size = world_size

    def run(self, rank, phase, src, out, reduce, programs=None):
        return peer_exchange(
            src=src, out=out, bases=self.bases, counters=self.counters[rank], rank=rank,
            slot_bytes=self.slot_bytes, reduce=reduce, programs=programs, phases=phase,
        )  # fmt: skip

    def call(self, payloads, *, reduce, programs=None):
        """One collective: every rank pushes, then every rank finishes; returns the outs."""
        world = self.world_size
        outs = [torch.empty_like(p) if reduce else p.new_empty(world, *p.shape) for p in payloads]
        for rank in range(world):
            self.run(rank, "push", payloads[rank], outs[rank], reduce, programs)
        for rank in range(world):
            self.run(rank, "finish", payloads[rank], outs[rank], reduce, programs)
        self.assert_clear()
        return outs

    def assert_clear(self):
        """Between calls every buffer holds zeros only: each receiver cleared what it read,
        so no word can pass for a later call's when call numbers wrap."""
        for buffer in self.buffers:
            assert int(buffer.count_nonzero()) == 0


def assert_same(got, want):
    """Bit for bit, except that the interpreter rounds fp32 to bf16 toward zero (the GPU
    rounds to nearest): one bf16 unit there."""
    if got.dtype == torch.bfloat16 and not torch.cuda.is_available():
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, want)


def payloads(gen, world, shape, dtype, device):
    if dtype == torch.int32:
        data = [
            torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)
            for _ in range(world)
        ]
    else:
        data = [torch.randn(shape, generator=gen).to(dtype) for _ in range(world)]
    return [d.to(device) for d in data]


KINDS = [
    (False, torch.int32),
    (False, torch.float32),
    (True, torch.bfloat16),
    (True, torch.float32),
]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("reduce,dtype", KINDS)
def test_matches_ref_over_many_calls(world, reduce, dtype, device):
    gen = torch.Generator().manual_seed(world)
    ranks = Ranks(world, slot_bytes=16384, device=device)
    # Sizes that leave programs with empty chunks, one element, a partial block, and a
    # full slot; several calls, so both parities and the growing flags are used.
    elem = torch.tensor([], dtype=dtype).element_size()
    for numel in (2, 6, 1000, 3000, 16384 // elem, 8):
        for programs in (None, 3):
            data = payloads(gen, world, (numel,), dtype, device)
            outs = ranks.call(data, reduce=reduce, programs=programs)
            want = peer_exchange_ref([d.cpu() for d in data], reduce=reduce)
            for out in outs:
                assert_same(out.cpu(), want)
            # Every program's counter names the same call, whatever the call's programs:
            # a word's tag must name one call, not one program's.
            for counters in ranks.counters:
                assert counters.unique().numel() == 1


def test_in_place_reduce_and_shapes(device):
    gen = torch.Generator().manual_seed(0)
    ranks = Ranks(2, slot_bytes=4096, device=device)
    data = payloads(gen, 2, (4, 3, 5), torch.bfloat16, device)
    want = peer_exchange_ref([d.cpu() for d in data], reduce=True)
    for rank in range(2):
        ranks.run(rank, "push", data[rank], data[rank], True)
    for rank in range(2):
        ranks.run(rank, "finish", data[rank], data[rank], True)
    for d in data:
        assert_same(d.cpu(), want)


def test_a_rank_may_run_one_call_ahead(device):
    """Rank 0 pushes call 2 before rank 1 has finished call 1: the parities keep them apart."""
    gen = torch.Generator().manual_seed(1)
    ranks = Ranks(2, slot_bytes=4096, device=device)
    first = payloads(gen, 2, (500,), torch.float32, device)
    second = payloads(gen, 2, (500,), torch.float32, device)
    out1 = [f.new_empty(2, 500) for f in first]
    out2 = [f.new_empty(2, 500) for f in second]
    ranks.run(0, "push", first[0], out1[0], False)
    ranks.run(1, "push", first[1], out1[1], False)
    ranks.run(0, "finish", first[0], out1[0], False)
    ranks.run(0, "push", second[0], out2[0], False)  # rank 0 runs ahead
    ranks.run(1, "finish", first[1], out1[1], False)
    ranks.run(1, "push", second[1], out2[1], False)
    ranks.run(0, "finish", second[0], out2[0], False)
    ranks.run(1, "finish", second[1], out2[1], False)
    for outs, data in ((out1, first), (out2, second)):
        want = torch.stack([d.cpu() for d in data])
        assert all(torch.equal(o.cpu(), want) for o in outs)
    assert [int(c[0]) for c in ranks.counters] == [2, 2]
    ranks.assert_clear()


def test_refuses_bad_input(device):
    ranks = Ranks(2, slot_bytes=64, device=device)
    src = torch.zeros(8, device=device)
    out = src.new_empty(2, 8)
    with pytest.raises(ValueError, match="exceeds the 64-byte slots"):
        ranks.run(0, "push", torch.zeros(17, device=device), src.new_empty(2, 17), False)
    with pytest.raises(ValueError, match="out must have shape"):
        ranks.run(0, "push", src, src.new_empty(8), False)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        peer_exchange(
            src=src, out=out, bases=ranks.bases, counters=ranks.counters[0], rank=2,
            slot_bytes=64, reduce=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="sums fp32, fp16 or bf16"):
        ranks.run(0, "push", src.int(), src.int(), True)
    with pytest.raises(ValueError, match="whole 4-byte words"):
        ranks.run(0, "push", src[:3].bfloat16(), src[:3].bfloat16(), True)
    with pytest.raises(ValueError, match="must not overlap"):
        ranks.run(0, "push", out[0], out, False)
    with pytest.raises(ValueError, match="phases"):
        ranks.run(0, "all", src, out, False)


def test_call_numbers_wrap_and_keep_alternating(device):
    """After 2**30 calls the call number wraps from even to odd: results stay right."""
    gen = torch.Generator().manual_seed(2)
    ranks = Ranks(2, slot_bytes=4096, device=device)
    for counters in ranks.counters:
        counters.fill_(2**30 - 2)
    for _ in range(4):
        data = payloads(gen, 2, (300,), torch.float32, device)
        want = peer_exchange_ref([d.cpu() for d in data], reduce=False)
        for out in ranks.call(data, reduce=False, programs=1):
            assert torch.equal(out.cpu(), want)
    assert [int(c[0]) for c in ranks.counters] == [2, 2]


def _merge_call(ranks, partials, out_dtype, programs=None):
    outs = [p.new_empty(*p.shape[:2], p.shape[2] - 1, dtype=out_dtype) for p in partials]
    lses = [p.new_empty(p.shape[:2]) for p in partials]
    for phase in ("push", "finish"):
        for rank, partial in enumerate(partials):
            peer_merge(
                partial=partial, out=outs[rank], lse=lses[rank], bases=ranks.bases,
                counters=ranks.counters[rank], rank=rank, slot_bytes=ranks.slot_bytes,
                programs=programs, phases=phase,
            )  # fmt: skip
    ranks.assert_clear()
    return outs, lses


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_ref_with_empty_sources(world, out_dtype, device):
    gen = torch.Generator().manual_seed(world)
    ranks = Ranks(world, slot_bytes=65536, device=device)
    num_seqs, num_heads, head_dim = 3, 5, 16
    for programs in (None, 4, 1):
        partials = []
        for rank in range(world):
            partial = torch.randn(num_seqs, num_heads, head_dim + 1, generator=gen)
            partial[..., head_dim] *= 4
            partial[1, 2, head_dim] = -math.inf  # this row is empty everywhere
            partial[1, 2, :head_dim] = float("nan")  # never read
            if rank == 0:
                partial[0, :, head_dim] = -math.inf  # empty on rank 0 only
            partials.append(partial.to(device))
        # A gather between merges: the two kinds share the counters and the buffer.
        ranks.call(payloads(gen, world, (100,), torch.float32, device), reduce=False)
        outs, lses = _merge_call(ranks, partials, out_dtype, programs)
        stacked = torch.stack([p.cpu() for p in partials])
        want, want_lse = merge_attention_states_ref(
            outputs=stacked[..., :head_dim].nan_to_num(0.0), lses=stacked[..., head_dim]
        )
        for out, lse in zip(outs, lses):
            assert not out.isnan().any()
            torch.testing.assert_close(out.cpu().float(), want, atol=1e-5, rtol=1e-2)
            torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)
            assert torch.equal(out, outs[0]) and torch.equal(lse, lses[0])  # same bits


def test_merge_refuses_bad_input(device):
    ranks = Ranks(2, slot_bytes=4096, device=device)
    kw = dict(bases=ranks.bases, counters=ranks.counters[0], rank=0, slot_bytes=4096)
    partial = torch.zeros(2, 3, 13, device=device)
    with pytest.raises(ValueError, match="power of two"):
        peer_merge(partial=partial, out=partial[..., :12], lse=partial[..., 0], **kw)
    partial = torch.zeros(2, 3, 17, device=device)
    with pytest.raises(ValueError, match="out must be"):
        peer_merge(partial=partial, out=partial.new_empty(2, 3, 8), lse=partial[..., 0], **kw)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_candidates_are_packed_as_pack_candidates_does(world, device):
    gen = torch.Generator().manual_seed(world)
    ranks = Ranks(world, slot_bytes=65536, device=device)
    num_seqs, heads, top_k, local_pages = 3, 2, 5, 9
    for programs in (None, 2):
        inputs = []
        for _ in range(world):
            scores = torch.randn(num_seqs, heads, top_k, generator=gen)
            indices = torch.randint(0, local_pages, (num_seqs, heads, top_k), generator=gen)
            indices[0, 1, 3:] = -1  # padding
            scores[0, 1, 3:] = -math.inf
            scores[2, 0, 0] = math.inf  # the pinned newest page
            pages = torch.randint(0, 10_000, (num_seqs, local_pages), generator=gen)
            pages[1, -2:] = -1  # past this rank's pages
            inputs.append(tuple(t.to(device) for t in (scores, indices.int(), pages.int())))
        outs = []
        for phase in ("push", "finish"):
            for rank, (scores, indices, pages) in enumerate(inputs):
                out = peer_gather_candidates(
                    top_scores=scores, local_indices=indices, global_pages=pages,
                    bases=ranks.bases, counters=ranks.counters[rank], rank=rank,
                    slot_bytes=ranks.slot_bytes, programs=programs, phases=phase,
                )  # fmt: skip
                if phase == "finish":
                    outs.append(out)
        ranks.assert_clear()
        want = torch.stack(
            [
                pack_candidates(top_scores=s, local_indices=i, global_pages=p, impl="torch").cpu()
                for s, i, p in inputs
            ]  # fmt: skip
        )
        for out in outs:
            assert torch.equal(out.cpu(), want)


def test_empty_payloads_launch_nothing(device):
    """No rank launches for an empty payload, so no counter moves anywhere."""
    ranks = Ranks(2, slot_bytes=4096, device=device)
    empty = torch.zeros(0, device=device)
    for rank in range(2):
        ranks.run(rank, "push", empty, empty.new_empty(2, 0), False)
        ranks.run(rank, "push", empty, empty, True)
    assert all(int(c.abs().sum()) == 0 for c in ranks.counters)


@pytest.mark.skipif(torch.cuda.is_available(), reason="off the GPU only")
def test_both_phases_at_once_refused_off_the_gpu():
    ranks = Ranks(2, slot_bytes=4096, device="cpu")
    src = torch.zeros(8)
    with pytest.raises(ValueError, match="phases='push' on every rank"):
        ranks.run(0, "both", src, src.new_empty(2, 8), False)
