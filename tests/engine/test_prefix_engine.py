"""Prefix caching on one device: outputs with reuse equal outputs without.

Every case runs the same calls on an engine with prefix caching and one without, and
compares tokens (equal) and logprobs: bit for bit where the cached prefix ends on the
prefill chunk grid, else within 1e-5 or 3e-6 of the value (fp32 logprobs of -10 and
below move by up to 3e-5 when the caching-off engine only changes its chunk size).
Pages of 4 tokens and chunks of 8 make every boundary case short: documents ending
mid-page, prompts shorter than the cached prefix, identical prompts."""

from __future__ import annotations

import pytest
import torch

from longquest.engine.cache import CacheCapacityError
from longquest.engine.config import QuestConfig, SamplingParams
from tests.engine.test_engine import make_engine, random_prompt
from tests.tiny_models import ARCHITECTURES, make_tiny_model

PAGE, CHUNK = 4, 8
QUESTS = {
    "dense": QuestConfig(page_size=PAGE, token_budget=None, dense_layers=1),
    "quest": QuestConfig(page_size=PAGE, token_budget=2 * PAGE, dense_layers=1),
}
GREEDY = SamplingParams(max_tokens=6, logprobs=3, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    made = {}

    def get(architecture: str):
        if architecture not in made:
            directory = tmp_path_factory.mktemp(architecture)
            made[architecture] = make_tiny_model(directory, architecture=architecture)
        return made[architecture]

    return get


def engines(model_dir, mode: str, **settings):
    """An engine with prefix caching and one without, on the same model and settings."""
    common = dict(quest=QUESTS[mode], chunk=CHUNK, impl="torch", **settings)
    return (
        make_engine(model_dir, prefix_caching=True, **common),
        make_engine(model_dir, prefix_caching=False, **common),
    )


def assert_same(got, want, *, exact: bool = False) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert (g.logprobs is None) == (w.logprobs is None)
        for a, b in zip(g.logprobs or [], w.logprobs or []):
            assert a.keys() == b.keys()
            for token, value in a.items():
                if exact:
                    assert value == b[token]
                else:
                    assert value == pytest.approx(b[token], abs=1e-5, rel=3e-6)


def both(cached, plain, prompts, params=GREEDY, **checks):
    """Generate ``prompts`` on both engines; check and return the cached engine's outputs."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    got, want = cached.generate(prompts, params), plain.generate(prompts, params)
    assert_same(got, want, **checks)
    assert all(o.cached_prompt_tokens == 0 for o in want)
    return got


def pool_state(engine) -> tuple:
    pool = engine.allocator
    pool.check()
    return (list(pool._refs), list(pool._empty), list(pool._idle), dict(pool._index),
            pool._reserved, pool.evictions)  # fmt: skip


@pytest.mark.parametrize("mode", list(QUESTS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_document_and_its_questions(model_dirs, architecture, mode):
    cached, plain = engines(model_dirs(architecture), mode)
    vocab = cached.config.vocab_size
    doc = random_prompt(37, vocab, 1)  # 9 full pages and one token
    # One call: the first request computes the document, the others take its 9 pages.
    first = [doc + random_prompt(n, vocab, 10 + n) for n in (1, 3, 6, 11)]
    got = both(cached, plain, first)
    assert [o.cached_prompt_tokens for o in got] == [0, 36, 36, 36]
    # A later call: a new question; a prompt shorter than the cached prefix (its last
    # page is computed); an identical prompt (its question's full page was cached too).
    second = [doc + random_prompt(5, vocab, 99), doc[:10], first[2]]
    got = both(cached, plain, second)
    assert [o.cached_prompt_tokens for o in got] == [36, 8, 40]
    stats = cached.prefix_stats()
    assert (stats.requests, stats.hit_requests) == (7, 6)
    assert stats.computed_prompt_tokens == sum(map(len, first + second)) - 36 * 4 - 8 - 40
    assert plain.prefix_stats().cached_pages == 0 and cached.allocator.num_cached > 0
    assert cached.allocator.num_free == cached.allocator.num_pages


@pytest.mark.parametrize("mode", list(QUESTS))
@pytest.mark.parametrize("architecture", ["llama3.1", "qwen3"])
def test_a_prefix_on_the_chunk_grid_is_bit_identical(model_dirs, architecture, mode):
    cached, plain = engines(model_dirs(architecture), mode)
    vocab = cached.config.vocab_size
    doc = random_prompt(4 * CHUNK, vocab, 2)
    prompts = [doc + random_prompt(n, vocab, 20 + n) for n in (2, 5, 9, 13)]
    got = both(cached, plain, prompts, exact=True)
    assert [o.cached_prompt_tokens for o in got] == [0, 32, 32, 32]
    # An identical prompt whose cached prefix ends on the grid (40 of its 41 tokens).
    again = [doc + random_prompt(7, vocab, 5), prompts[2]]
    got = both(cached, plain, again, exact=True)
    assert [o.cached_prompt_tokens for o in got] == [32, 40]


@pytest.mark.parametrize("mode", list(QUESTS))
def test_eviction_under_pressure(model_dirs, mode):
    """A pool just over one request: B evicts most of A's idle pages, last page first,
    so A's next call takes what is left of its head and computes the rest."""
    cached, plain = engines(model_dirs("llama3.1"), mode, num_pages=14)
    vocab = cached.config.vocab_size
    a, b = random_prompt(40, vocab, 3), random_prompt(40, vocab, 4)
    params = SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True)
    outputs = [both(cached, plain, [prompt], params)[0] for prompt in (a, b, a)]
    assert [o.cached_prompt_tokens for o in outputs] == [0, 0, 12]
    stats = cached.prefix_stats()
    # B needs 11 pages: the 4 empty ones, then 7 of A's 10 idle pages; A's second call
    # then needs 8: B's decode page and 7 of B's idle pages.
    assert stats.evictions == 7 + 7 and stats.computed_prompt_tokens == 40 + 40 + 28
    assert cached.allocator.num_free == 14
    cached.allocator.check()


def test_a_request_that_cannot_fit_changes_nothing(model_dirs):
    engine = make_engine(model_dirs("llama3.1"), quest=QUESTS["quest"], chunk=CHUNK,
                         impl="torch", num_pages=14)  # fmt: skip
    vocab = engine.config.vocab_size
    a, b = random_prompt(40, vocab, 3), random_prompt(40, vocab, 4)
    params = SamplingParams(max_tokens=4)
    engine.generate([a], [params])
    before = pool_state(engine)
    with pytest.raises(CacheCapacityError, match="KV cache"):  # never fits: 16 pages
        engine.generate([a + random_prompt(20, vocab, 5)], [params])
    assert pool_state(engine) == before
    held = engine.add_request(b, params)  # holds 11 of the 14 pages
    during = pool_state(engine)
    with pytest.raises(CacheCapacityError, match="free pages"):  # not now: 9 cached + 2
        engine.add_request(a, params, request_id=1)
    assert pool_state(engine) == during
    engine.release(held)
    assert engine.allocator.num_free == 14
    engine.allocator.check()


def test_seeded_sampling_is_unchanged(model_dirs):
    cached, plain = engines(model_dirs("qwen2"), "quest")
    vocab = cached.config.vocab_size
    doc = random_prompt(29, vocab, 6)
    prompts = [doc + random_prompt(n, vocab, 30 + n) for n in (3, 8, 3)]
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=s, logprobs=2,
                             ignore_eos=True) for s in (1, 2, 1)]  # fmt: skip
    got = both(cached, plain, prompts, params)
    assert [o.cached_prompt_tokens for o in got] == [0, 28, 28]
    assert got[0].token_ids == got[2].token_ids  # same seed and prompt: same sample


def test_an_exception_mid_prefill_publishes_nothing(model_dirs, monkeypatch):
    cached, plain = engines(model_dirs("mistral"), "quest")
    vocab = cached.config.vocab_size
    doc = random_prompt(37, vocab, 7)
    both(cached, plain, [doc + random_prompt(3, vocab, 8)])
    before = pool_state(cached)
    model, forward, calls = cached.model, cached.model.forward, []

    def failing(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) == 2:  # the second chunk of the next prefill
            raise RuntimeError("injected")
        return forward(**kwargs)

    monkeypatch.setattr(model, "forward", failing)
    question = random_prompt(20, vocab, 9)  # prefill from 36: chunks to 40, 48, 57
    with pytest.raises(RuntimeError, match="injected"):
        cached.generate([doc + question], [GREEDY])
    assert calls == [4, 8]
    assert pool_state(cached) == before  # the taken pages back to idle, nothing published
    monkeypatch.setattr(model, "forward", forward)
    (out,) = both(cached, plain, [doc + question])
    assert out.cached_prompt_tokens == 36


def test_prefill_progress_starts_at_the_cached_tokens(model_dirs):
    engine = make_engine(model_dirs("llama3.1"), quest=QUESTS["quest"], chunk=CHUNK,
                         impl="torch")  # fmt: skip
    doc = random_prompt(37, engine.config.vocab_size, 12)
    engine.generate([doc + [5, 6]], [SamplingParams(max_tokens=1)])
    reports = []
    engine.generate([doc + [7] * 12], [SamplingParams(max_tokens=1)],
                    on_progress=lambda *report: reports.append(report))  # fmt: skip
    prefill = [done for stage, done, total in reports if stage == "prefill"]
    assert prefill == [36, 40, 48, 49]  # then chunks on the grid of 8


@pytest.mark.gpu
def test_cuda_graphs_with_a_shared_document(tmp_path):
    """Eight requests share a document, decoded in CUDA graphs: the same as without
    caching, greedy (chained steps) and with logprobs."""
    from longquest.engine.cache import CacheShape, KVCache
    from longquest.engine.engine import LLMEngine
    from longquest.engine.loader import load_model

    model_dir = make_tiny_model(tmp_path, architecture="llama3.1")

    def engine(prefix_caching: bool) -> LLMEngine:
        model, config = load_model(model_dir, dtype=torch.float32, device="cuda")
        quest = QuestConfig(page_size=16, token_budget=64, dense_layers=1)
        shape = CacheShape(num_layers=config.num_layers, num_pages=256, page_size=16,
                           num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                           dtype=torch.float32)  # fmt: skip
        return LLMEngine(model=model, model_config=config, cache=KVCache(shape, device="cuda"),
                         quest=quest, detokenize=lambda ids: " ".join(map(str, ids)),
                         eos_token_ids=(), prefill_chunk_tokens=128, cuda_graphs=True,
                         prefix_caching=prefix_caching)  # fmt: skip

    cached, plain = engine(True), engine(False)
    doc = random_prompt(301, cached.config.vocab_size, 11)
    prompts = [doc + random_prompt(5 + 7 * i, cached.config.vocab_size, 40 + i) for i in range(8)]
    # The first call shares the document's 18 full pages; the second finds every prompt's
    # own pages too, up to the page of its last token.
    expected = [[0] + [288] * 7, [(len(p) - 1) // 16 * 16 for p in prompts]]
    for logprobs, cached_tokens in zip((None, 1), expected):
        params = [SamplingParams(max_tokens=10 + 3 * i, logprobs=logprobs, ignore_eos=True)
                  for i in range(8)]  # fmt: skip
        got, want = cached.generate(prompts, params), plain.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        if logprobs is not None:
            assert_same(got, want)
        assert [o.cached_prompt_tokens for o in got] == cached_tokens
