"""SequenceParallelComm over gloo equals single-device selection and attention.

Each world size spawns its processes once and runs every check inside them:
spawning costs about two seconds a process, the checks themselves milliseconds.
"""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from longquest.kernels.ref import paged_decode_attention_ref, select_pages_ref
from longquest.parallel.comm import SequenceParallelComm, _as_packed
from longquest.parallel.ownership import PageOwnership
from tests.parallel.dist import run_distributed

PAGE_SIZE = 4
NUM_KV_HEADS = 2
NUM_QO_HEADS = 4
HEAD_DIM = 32
# Tokens per sequence: shorter than a page, a partial last page, several rounds' pages
# (a block is one page here, so their owners alternate in zigzag).
SEQUENCES = [3, 15, 58, 37]


def _world(seed: int) -> dict[str, torch.Tensor]:
    """Everything every rank agrees on: the pages' scores, K/V and the queries."""
    gen = torch.Generator().manual_seed(seed)
    num_pages = [-(-seq_len // PAGE_SIZE) for seq_len in SEQUENCES]
    max_pages = max(num_pages)
    # Scores from a handful of values, so ties are everywhere.
    scores = torch.randint(0, 4, (len(SEQUENCES), NUM_KV_HEADS, max_pages), generator=gen)
    pool = sum(num_pages)
    shape = (pool, NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM)
    return {
        "scores": scores.float(),
        "num_pages": torch.tensor(num_pages, dtype=torch.int32),
        "seq_lens": torch.tensor(SEQUENCES, dtype=torch.int32),
        # Physical page of global page p of sequence s: offsets[s] + p.
        "offsets": torch.tensor([0] + num_pages[:-1]).cumsum(0),
        "k_cache": torch.randn(shape, generator=gen),
        "v_cache": torch.randn(shape, generator=gen),
        "query": torch.randn(len(SEQUENCES), NUM_QO_HEADS, HEAD_DIM, generator=gen),
    }


def _local_view(world, ownership: PageOwnership, rank: int) -> dict[str, torch.Tensor]:
    """This rank's page table: its own pages of each sequence, in global order."""
    pages = [ownership.local_pages(rank=rank, num_pages=int(n)) for n in world["num_pages"]]
    width = max(1, max(len(p) for p in pages))
    global_pages = torch.full((len(SEQUENCES), width), -1, dtype=torch.int32)
    page_table = torch.zeros((len(SEQUENCES), width), dtype=torch.int32)
    scores = torch.full((len(SEQUENCES), NUM_KV_HEADS, width), -math.inf)
    for s, own in enumerate(pages):
        global_pages[s, : len(own)] = torch.tensor(own, dtype=torch.int32)
        page_table[s, : len(own)] = world["offsets"][s] + torch.tensor(own, dtype=torch.long)
        scores[s, :, : len(own)] = world["scores"][s, :, own]
    seq_lens = [ownership.local_seq_len(rank=rank, seq_len=seq_len) for seq_len in SEQUENCES]
    tail = [ownership.tail_owner(seq_len=n) == rank for n in SEQUENCES]
    return {
        "global_pages": global_pages,
        "page_table": page_table,
        "scores": scores,
        "num_pages": torch.tensor([len(p) for p in pages], dtype=torch.int32),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "pin_last": torch.tensor(tail),
    }


def _check_rank(seed: int, *, rank: int, world_size: int, group) -> dict:
    """Runs on every rank: select globally and merge, for several budgets."""
    world = _world(seed)
    ownership = PageOwnership(world_size=world_size, page_size=PAGE_SIZE, prefill_chunk_tokens=8)
    local = _local_view(world, ownership, rank)
    comm = SequenceParallelComm(group=group, rank=rank, world_size=world_size)
    result: dict = {"rank": rank, "selected": {}, "out": {}, "lse": {}}
    for top_k in (1, 2, 3, 7, 100):
        top_scores, indices = select_pages_ref(
            scores=local["scores"],
            num_pages=local["num_pages"],
            top_k=top_k,
            pin_last=local["pin_last"],
        )
        selected = comm.select_global(
            top_scores=top_scores,
            local_indices=indices,
            global_pages=local["global_pages"],
            top_k=top_k,
        )
        assert selected.shape == (len(SEQUENCES), NUM_KV_HEADS, top_k)
        assert selected.dtype == torch.int32
        result["selected"][top_k] = _as_global(selected, local["global_pages"])
        out, lse = paged_decode_attention_ref(
            query=world["query"],
            k_cache=world["k_cache"],
            v_cache=world["v_cache"],
            page_table=local["page_table"],
            seq_lens=local["seq_lens"],
            selected=selected,
        )
        result["out"][top_k], result["lse"][top_k] = comm.merge_with_lse(out=out, lse=lse)
        assert torch.equal(comm.merge(out=out, lse=lse), result["out"][top_k])
    out, lse = paged_decode_attention_ref(
        query=world["query"],
        k_cache=world["k_cache"],
        v_cache=world["v_cache"],
        page_table=local["page_table"],
        seq_lens=local["seq_lens"],
    )
    result["out"]["dense"], result["lse"]["dense"] = comm.merge_with_lse(out=out, lse=lse)
    # No rank attended to anything: zeros and -inf, never NaN.
    empty_out, empty_lse = comm.merge_with_lse(
        out=torch.randn(2, NUM_QO_HEADS, HEAD_DIM), lse=torch.full((2, NUM_QO_HEADS), -math.inf)
    )
    assert torch.equal(empty_out, torch.zeros_like(empty_out))
    assert torch.isneginf(empty_lse).all()
    # Lower precision outputs come back in their own dtype, or in the one asked for.
    assert comm.merge(out=out.half(), lse=lse).dtype == torch.float16
    assert comm.merge(out=out, lse=lse, dtype=torch.bfloat16).dtype == torch.bfloat16
    # Written into partial_buffers, the state is sent as it is and merges the same.
    packed_out, packed_lse = comm.partial_buffers(
        num_seqs=out.shape[0], num_qo_heads=NUM_QO_HEADS, head_dim=HEAD_DIM, device=out.device
    )
    packed_out.copy_(out), packed_lse.copy_(lse)
    assert _as_packed(packed_out, packed_lse) is not None
    assert _as_packed(out, lse) is None and _as_packed(packed_out, lse) is None
    again_out, again_lse = comm.merge_with_lse(out=packed_out, lse=packed_lse)
    assert torch.equal(again_out, result["out"]["dense"])
    assert torch.equal(again_lse, result["lse"]["dense"])
    # The Triton merge (interpreted on the CPU) agrees with the PyTorch one.
    triton_comm = SequenceParallelComm(group=group, rank=rank, world_size=world_size, impl="triton")
    # One sequence only: the interpreter runs a Python loop per (sequence, head).
    triton_out, triton_lse = triton_comm.merge_with_lse(out=out[:1], lse=lse[:1])
    # Not torch.testing.assert_close: with a process group up it imports DTensor (seconds).
    assert torch.allclose(triton_out, result["out"]["dense"][:1], rtol=1e-5, atol=1e-5)
    assert torch.allclose(triton_lse, result["lse"]["dense"][:1], rtol=1e-5, atol=1e-5)
    return result


def _as_global(selected: torch.Tensor, global_pages: torch.Tensor) -> list:
    """Local selections as sorted global page ids per (sequence, KV head); checks the padding."""
    rows = []
    for s in range(selected.shape[0]):
        heads = []
        for h in range(selected.shape[1]):
            entries = selected[s, h].tolist()
            kept = [i for i in entries if i >= 0]
            assert entries == kept + [-1] * (len(entries) - len(kept)), entries
            assert kept == sorted(kept)
            heads.append([int(global_pages[s, i]) for i in kept])
        rows.append(heads)
    return rows


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_select_and_merge_match_a_single_device(world_size):
    seed = random.randrange(2**31)
    results = run_distributed(_check_rank, world_size=world_size, args=(seed,))
    assert [r["rank"] for r in results] == list(range(world_size))
    world = _world(seed)
    all_pages = world["offsets"][:, None] + torch.arange(world["scores"].shape[2])
    for top_k in (1, 2, 3, 7, 100):
        _, expected = select_pages_ref(
            scores=world["scores"], num_pages=world["num_pages"], top_k=top_k, pin_last=True
        )
        for s in range(len(SEQUENCES)):
            for h in range(NUM_KV_HEADS):
                union = sorted(p for r in results for p in r["selected"][top_k][s][h])
                want = [i for i in expected[s, h].tolist() if i >= 0]
                assert union == want, (seed, top_k, s, h)
        out, lse = paged_decode_attention_ref(
            query=world["query"],
            k_cache=world["k_cache"],
            v_cache=world["v_cache"],
            page_table=all_pages.int(),
            seq_lens=world["seq_lens"],
            selected=expected,
        )
        for r in results:
            torch.testing.assert_close(r["out"][top_k], out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["lse"][top_k], lse, rtol=1e-5, atol=1e-5)
    out, lse = paged_decode_attention_ref(
        query=world["query"],
        k_cache=world["k_cache"],
        v_cache=world["v_cache"],
        page_table=all_pages.int(),
        seq_lens=world["seq_lens"],
    )
    for r in results:
        torch.testing.assert_close(r["out"]["dense"], out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["lse"]["dense"], lse, rtol=1e-5, atol=1e-5)
    if world_size > 1:
        # With one page of budget only the tail owner attends: every other rank merged
        # an empty partial state (the first sequence even has ranks with no pages at all).
        owners = {r["rank"] for r in results if any(r["selected"][1][0])}
        assert len(owners) == 1


def _check_bad_arguments(*, rank: int, world_size: int, group) -> bool:
    with pytest.raises(ValueError, match="group"):
        SequenceParallelComm(group=None, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match="world_size"):
        SequenceParallelComm(group=group, rank=rank, world_size=world_size + 1)
    with pytest.raises(ValueError, match="rank"):
        SequenceParallelComm(group=group, rank=rank + 1, world_size=world_size)
    comm = SequenceParallelComm(group=group, rank=rank, world_size=world_size)
    scores = torch.zeros(2, NUM_KV_HEADS, 3)
    indices = torch.zeros(2, NUM_KV_HEADS, 3, dtype=torch.int32)
    pages = torch.zeros(2, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="top_scores"):
        comm.select_global(top_scores=scores, local_indices=indices, global_pages=pages, top_k=4)
    with pytest.raises(ValueError, match="local_indices"):
        comm.select_global(
            top_scores=scores, local_indices=indices.long(), global_pages=pages, top_k=3
        )
    with pytest.raises(ValueError, match="global_pages"):
        comm.select_global(
            top_scores=scores, local_indices=indices, global_pages=pages[:1], top_k=3
        )
    with pytest.raises(ValueError, match="top_k"):
        comm.select_global(top_scores=scores, local_indices=indices, global_pages=pages, top_k=0)
    out = torch.zeros(2, NUM_QO_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="lse"):
        comm.merge(out=out, lse=torch.zeros(2, NUM_QO_HEADS + 1))
    with pytest.raises(ValueError, match="lse"):
        comm.merge(out=out, lse=torch.zeros(2, NUM_QO_HEADS, dtype=torch.float64))
    return True


def test_bad_arguments_raise():
    assert run_distributed(_check_bad_arguments, world_size=1) == [True]


def _fail_on_last_rank(message: str, *, rank: int, world_size: int, group) -> int:
    if rank == world_size - 1:
        raise KeyError(message)
    return rank


def _sleep(*, rank: int, world_size: int, group) -> None:
    time.sleep(600)


def test_run_distributed_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 raised:(.|\n)*KeyError: 'boom'"):
        run_distributed(_fail_on_last_rank, world_size=2, args=("boom",))


def test_run_distributed_times_out_instead_of_hanging():
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_sleep, world_size=1, timeout_s=5)
