"""Prefix caching under sequence parallelism (gloo, several processes, fp32, torch kernels).

Every rank runs an engine with prefix caching and one without on the same calls; the
outputs must equal the caching-off single-device engine's (tokens exactly, logprobs
within 1e-5 or 3e-6 of the value, as in tests/engine/test_prefix_engine.py) and the
caching-off sequence-parallel engine's, and every rank must report the same
``cached_prompt_tokens``, the expected ones. Each rank caches only the pages it owns;
the ranks agree on the hit (one MIN over their local hits), so a rank that lost a
cached page lowers the hit of every rank.

One spawned run per world size holds every case (spawning costs seconds per process):
pages of 4 tokens; chunks of 8 (blocks of one page, many rounds) and bigger blocks.
"""

from __future__ import annotations

import pytest
import torch

from longquest.engine.cache import CacheShape, KVCache
from longquest.engine.config import QuestConfig, SamplingParams
from longquest.engine.engine import LLMEngine
from longquest.engine.loader import load_model
from longquest.engine.page_keys import page_keys, page_tokens
from longquest.parallel.comm import SequenceParallelComm
from longquest.parallel.ownership import PageOwnership
from longquest.parallel.worker import SequenceParallelRanks
from tests.engine.test_engine import make_engine, random_prompt
from tests.parallel.dist import run_distributed
from tests.parallel.test_prefill_from_cached import _rank_without_tokens
from tests.tiny_models import make_tiny_model

PAGE = 4
QUESTS = {
    "dense": QuestConfig(page_size=PAGE, token_budget=None, dense_layers=1),
    "quest": QuestConfig(page_size=PAGE, token_budget=2 * PAGE, dense_layers=1),
}
# (mode, prefill chunk) per world size: chunks of 8 make blocks of one page; 24 and 16
# make blocks of 3 and 2 pages, so hits land mid-block too.
CONFIGS = {
    2: [("dense", 8), ("quest", 8), ("quest", 24)],
    3: [("quest", 8), ("dense", 8), ("dense", 16)],
}
GREEDY = SamplingParams(max_tokens=5, logprobs=2, ignore_eos=True)
EVICT = SamplingParams(max_tokens=4, logprobs=2, ignore_eos=True)
DOC = 37  # 9 full pages and one token
QUESTIONS = (1, 3, 6, 11)
# The eviction pool (pages per rank): just over one 44-token request's share.
EVICT_PAGES = {2: 7, 3: 5}
# A's second call after B: the agreed hit, worked out from each rank's LRU (leaf first):
# W=2 keeps pages {0, 3} on rank 0 and {1} on rank 1 -> 2 pages; W=3 keeps {0, 5},
# {1}, {2} -> 3 pages.
EVICT_HIT_PAGES = {2: 2, 3: 3}


def prompts(vocab: int) -> dict[str, list[list[int]]]:
    """The prompts of every stage, the same in every process."""
    doc = random_prompt(DOC, vocab, 1)
    a, b = random_prompt(40, vocab, 3), random_prompt(40, vocab, 4)
    first = [doc + random_prompt(n, vocab, 10 + n) for n in QUESTIONS]
    new = doc + random_prompt(5, vocab, 99)
    return {
        # A document ending mid-page and questions of different lengths in one call.
        "first": first,
        # A new question; a prompt shorter than the cached prefix; prompts of the first
        # call again (the 40-token one ends on a page: its last page is computed); the
        # new question again (its first copy's pages cached in this call).
        "second": [new, doc[:10], first[2], first[1], new],
        "diverge": [doc + random_prompt(7, vocab, 77)],
        # A, B, A, one call each, in a pool just over one request.
        "evict": [a, b, a],
    }


def divergent_page(ownership: PageOwnership) -> int:
    """The document page rank 1 forgets: its last full document page."""
    return max(p for p in range(DOC // PAGE) if ownership.owner(page_index=p) == 1)


def _engine(model_dir, mode, chunk, *, prefix_caching, num_pages, rank, world_size, group):
    model, config = load_model(model_dir, dtype=torch.float32, device="cpu")
    shape = CacheShape(num_layers=config.num_layers, num_pages=num_pages, page_size=PAGE,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       dtype=torch.float32)  # fmt: skip
    ownership = PageOwnership(world_size=world_size, page_size=PAGE, prefill_chunk_tokens=chunk)
    comm = SequenceParallelComm(group=group, rank=rank, world_size=world_size, impl="torch")
    ranks = SequenceParallelRanks(group=group, ownership=ownership, world_size=world_size,
                                  rank=rank, comm=comm, device="cpu")  # fmt: skip
    return LLMEngine(model=model, model_config=config, cache=KVCache(shape, device="cpu"),
                     quest=QUESTS[mode], detokenize=str, eos_token_ids=(), impl="torch",
                     prefill_chunk_tokens=chunk, ranks=ranks,
                     prefix_caching=prefix_caching)  # fmt: skip


def forget_page(engine: LLMEngine, prompt: list[int], page: int) -> None:
    """Test-only: drop ``prompt``'s idle cached page ``page`` from this rank's index, as an
    eviction on this rank alone would (ranks plan allocations together, so allocation
    pressure cannot reach one rank only)."""
    pool, salt = engine.allocator, engine.admission.salt
    keys = page_keys(prompt, page_size=PAGE, salt=salt)
    tokens = page_tokens(prompt, page_index=page, page_size=PAGE)
    physical = pool.lookup(keys[page], parent=keys[page - 1] if page else salt, tokens=tokens)
    assert physical is not None and pool.is_idle(physical)
    del pool._index[keys[page]], pool._idle[physical]
    pool._entry[physical] = None
    pool._empty.append(physical)
    pool.check()


def _summary(outputs) -> list[tuple]:
    return [(o.token_ids, o.logprobs, o.cached_prompt_tokens) for o in outputs]


def _both(engines, prompts: list[list[int]]) -> tuple:
    return tuple(_summary(e.generate(prompts, [GREEDY] * len(prompts))) for e in engines)


def _stats(engine: LLMEngine) -> tuple[int, int]:
    stats = engine.prefix_stats()
    engine.allocator.check()
    assert engine.allocator.num_free == engine.allocator.num_pages
    return stats.cached_prompt_tokens, stats.computed_prompt_tokens


def _rank(model_dir, *, rank, world_size, group) -> dict:
    """Every config's stages on this rank: ``{(mode, chunk): {stage: (cached, plain)}}``."""
    results = {}
    for mode, chunk in CONFIGS[world_size]:
        setup = dict(rank=rank, world_size=world_size, group=group)
        cached, plain = (
            _engine(model_dir, mode, chunk, prefix_caching=on, num_pages=256, **setup)
            for on in (True, False)
        )
        stages = prompts(cached.config.vocab_size)
        out = {stage: _both((cached, plain), stages[stage]) for stage in ("first", "second")}
        if rank == 1:  # loses one cached document page: the agreed hit drops on every rank
            forget_page(cached, stages["diverge"][0], divergent_page(cached.ranks.ownership))
        out["diverge"] = _both((cached, plain), stages["diverge"])
        out["stats"] = _stats(cached)
        _stats(plain)
        if chunk == 8:  # A, B, A in a pool just over one request
            pages = EVICT_PAGES[world_size]
            small = [_engine(model_dir, mode, chunk, prefix_caching=on, num_pages=pages,
                             **setup) for on in (True, False)]  # fmt: skip
            # One call per prompt: B's allocations evict A's idle pages.
            summaries = [[], []]
            for prompt in stages["evict"]:
                for summary, engine in zip(summaries, small):
                    summary += _summary(engine.generate([prompt], [EVICT]))
            out["evict"] = tuple(summaries)
            out["evict_stats"] = _stats(small[0])
            out["evictions"] = small[0].prefix_stats().evictions
        results[mode, chunk] = out
    return results


def _same(got: list[tuple], want) -> None:
    """``got`` (rank summaries) has ``want``'s tokens and, within tolerance, logprobs."""
    assert len(got) == len(want)
    for (tokens, logprobs, _), w in zip(got, want):
        assert tokens == w.token_ids
        for a, b in zip(logprobs, w.logprobs):
            assert a.keys() == b.keys()
            for token, value in a.items():
                assert value == pytest.approx(b[token], abs=1e-5, rel=3e-6)


class _Output:
    """A rank summary in the shape ``_same`` compares against."""

    def __init__(self, summary: tuple) -> None:
        self.token_ids, self.logprobs, _ = summary


def _expected_hits(world_size: int, chunk: int) -> dict[str, list[int]]:
    ownership = PageOwnership(world_size=world_size, page_size=PAGE, prefill_chunk_tokens=chunk)
    full = DOC // PAGE * PAGE
    return {
        "first": [0] + [full] * (len(QUESTIONS) - 1),
        "second": [full, 8, full + PAGE, full, full + PAGE],
        "diverge": [divergent_page(ownership) * PAGE],
        "evict": [0, 0, EVICT_HIT_PAGES[world_size] * PAGE],
    }


def _single_device(model_dir, mode: str) -> tuple[dict, dict]:
    """Every stage's prompts and the caching-off single-device engine's outputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend for the cores
    try:
        single = make_engine(model_dir, quest=QUESTS[mode], chunk=8, impl="torch",
                             prefix_caching=False)  # fmt: skip
        stages = prompts(single.config.vocab_size)
        want = {s: single.generate(stages[s], [GREEDY] * len(stages[s]))
                for s in ("first", "second", "diverge")}  # fmt: skip
        want["evict"] = [single.generate([p], [EVICT])[0] for p in stages["evict"]]
    finally:
        torch.set_num_threads(threads)
    return stages, want


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("prefix_sp"), architecture="llama3.1")


@pytest.fixture(scope="module")
def references(model_dir):
    return {mode: _single_device(model_dir, mode) for mode in QUESTS}


@pytest.mark.parametrize("world_size", list(CONFIGS))
def test_prefix_caching_under_sequence_parallelism(model_dir, references, world_size):
    results = run_distributed(_rank, world_size=world_size, args=(model_dir,), timeout_s=180)
    for mode, chunk in CONFIGS[world_size]:
        stages, want = references[mode]
        hits = _expected_hits(world_size, chunk)
        ownership = PageOwnership(world_size=world_size, page_size=PAGE, prefill_chunk_tokens=chunk)
        # The document's hit starts mid-round; after it, a round where a rank has nothing.
        assert (DOC // PAGE * PAGE) % ownership.round_tokens
        assert any(
            _rank_without_tokens(ownership, len(p), h)
            for p, h in zip(stages["first"], hits["first"])
            if h
        )
        for rank, out in enumerate(results):
            where = f"{mode} chunk={chunk} rank={rank}"
            prompt_tokens = cached_tokens = 0
            for stage in ("first", "second", "diverge", "evict"):
                if stage not in out[mode, chunk]:
                    continue
                cached, plain = out[mode, chunk][stage]
                _same(cached, want[stage]), _same(plain, want[stage])
                _same(cached, [_Output(s) for s in plain])
                assert [c for _, _, c in cached] == hits[stage], f"{where} {stage}"
                assert all(c == 0 for _, _, c in plain), where
                if stage != "evict":
                    prompt_tokens += sum(map(len, stages[stage]))
                    cached_tokens += sum(hits[stage])
            # The hits really skipped prefill: less computed than the prompts hold.
            assert out[mode, chunk]["stats"] == (cached_tokens, prompt_tokens - cached_tokens)
            if "evict" in out[mode, chunk]:
                evict_hit = hits["evict"][-1]
                assert out[mode, chunk]["evict_stats"] == (evict_hit, 3 * 40 - evict_hit)
                assert out[mode, chunk]["evictions"] > 0
