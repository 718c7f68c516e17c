"""Context-parallel prefill that starts at a cached page (gloo, several processes).

A second prompt shares the first ``h`` pages of a prefilled one: it takes those
physical pages as they lie (ownership depends on the page's position alone, so
each rank already holds its share of them) and prefills only from token
``h * page_size``. Its tokens and logprobs must equal a from-scratch prefill.
"""

from __future__ import annotations

import pytest
import torch

from longquest.engine.cache import CacheShape, KVCache
from longquest.engine.config import QuestConfig, SamplingParams
from longquest.engine.engine import LLMEngine
from longquest.engine.loader import load_model
from longquest.engine.sequence import Sequence
from longquest.parallel.comm import SequenceParallelComm
from longquest.parallel.ownership import PageOwnership
from longquest.parallel.worker import SequenceParallelRanks
from tests.parallel.dist import run_distributed
from tests.tiny_models import make_tiny_model

PAGE = 4
DOC_TOKENS = 45
# (cached pages h, suffix tokens): round-aligned, mid-round, a suffix inside one block
# (other ranks have no tokens in the round), several rounds after the hit.
CASES = [(4, 9), (5, 13), (3, 1), (7, 10), (9, 2), (1, 30), (10, 5)]
QUEST = QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
PARAMS = SamplingParams(max_tokens=5, logprobs=2)


def _engine(model_dir, *, chunk, rank, world_size, group) -> LLMEngine:
    model, config = load_model(model_dir, dtype=torch.float32, device="cpu")
    shape = CacheShape(num_layers=config.num_layers, num_pages=256, page_size=PAGE,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       dtype=torch.float32)  # fmt: skip
    ownership = PageOwnership(world_size=world_size, page_size=PAGE, prefill_chunk_tokens=chunk)
    ranks = SequenceParallelRanks(
        group=group, ownership=ownership, world_size=world_size, rank=rank,
        comm=SequenceParallelComm(group=group, rank=rank, world_size=world_size), device="cpu",
    )  # fmt: skip
    return LLMEngine(model=model, model_config=config, cache=KVCache(shape, device="cpu"),
                     quest=QUEST, detokenize=str, eos_token_ids=(), ranks=ranks)  # fmt: skip


def _finish(engine: LLMEngine, seq: Sequence) -> tuple[list[int], list[dict[int, float]]]:
    engine.prefill(seq)
    while not seq.finish_reason:
        engine.decode([seq])
    return seq.output, seq.logprobs


def _with_cached_pages(engine: LLMEngine, donor: Sequence, prompt: list[int], h: int, rid: int):
    """A sequence for ``prompt`` holding ``donor``'s first ``h`` pages, the rest reserved."""
    seq = Sequence(request_id=rid, prompt=prompt, params=PARAMS, generator=None)
    seq.local_pages = [(g, physical) for g, physical in donor.local_pages if g < h]
    seq.cached_pages = h
    total = -(-(len(prompt) + PARAMS.max_tokens) // PAGE)
    need = sum(engine.ranks.owner(page_index=p) == engine.rank for p in range(h, total))
    engine.allocator.reserve(need)
    seq.reserved_pages = need
    return seq


def _prefix_rank(model_dir, chunk, *, rank, world_size, group) -> list:
    engine = _engine(model_dir, chunk=chunk, rank=rank, world_size=world_size, group=group)
    g = torch.Generator().manual_seed(11)
    vocab = engine.config.vocab_size
    doc = torch.randint(3, vocab, (DOC_TOKENS,), generator=g).tolist()
    donor = engine.add_request(doc, SamplingParams(max_tokens=1), request_id=0)
    engine.prefill(donor)
    results = []
    for i, (h, suffix_len) in enumerate(CASES):
        suffix = torch.randint(3, vocab, (suffix_len,), generator=g).tolist()
        prompt = doc[: h * PAGE] + suffix
        cached = _with_cached_pages(engine, donor, prompt, h, rid=2 * i + 1)
        got = _finish(engine, cached)
        fresh = engine.add_request(prompt, PARAMS, request_id=2 * i + 2)
        want = _finish(engine, fresh)
        results.append((got, want))
    return results


def _rank_without_tokens(ownership: PageOwnership, prompt_len: int, start: int) -> bool:
    first = dict(start=start, prompt_len=prompt_len, round_index=ownership.first_round(start=start))
    return any(
        not ownership.prefill_positions(rank=r, **first) for r in range(ownership.world_size)
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("prefix"), architecture="llama3.1")


@pytest.mark.parametrize("world_size, chunk", [(2, 8), (3, 8), (2, 24)])
def test_prefill_from_a_cached_page_equals_a_full_prefill(model_dir, world_size, chunk):
    ownership = PageOwnership(world_size=world_size, page_size=PAGE, prefill_chunk_tokens=chunk)
    starts = [(h * PAGE, h * PAGE + n) for h, n in CASES]
    assert all(start < DOC_TOKENS for start, _ in starts)  # shared pages are whole doc pages
    assert any(start % ownership.round_tokens for start, _ in starts)  # a hit mid-round
    assert any(_rank_without_tokens(ownership, end, start) for start, end in starts)
    results = run_distributed(
        _prefix_rank, world_size=world_size, args=(model_dir, chunk), timeout_s=600
    )
    for rank_results in results:
        for (h, _), ((tokens, logprobs), (want_tokens, want_logprobs)) in zip(CASES, rank_results):
            assert tokens == want_tokens, f"h={h}"
            for got, want in zip(logprobs, want_logprobs):
                assert got.keys() == want.keys()
                for token, value in want.items():
                    assert got[token] == pytest.approx(value, abs=1e-5), f"h={h}"
    tokens_by_rank = [[got[0] for got, _ in rank_results] for rank_results in results]
    assert all(tokens == tokens_by_rank[0] for tokens in tokens_by_rank)
