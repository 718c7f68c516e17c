"""The single-device engine against transformers: dense equality, Quest with a full
budget equal to dense, batching, and errors refused before any work."""

from __future__ import annotations

import pytest
import torch

from longquest.engine.cache import CacheCapacityError, CacheShape, KVCache
from longquest.engine.config import QuestConfig, SamplingParams
from longquest.engine.engine import LLMEngine
from longquest.engine.loader import load_model
from tests.tiny_models import make_tiny_model

STEPS = 32


def make_engine(
    model_dir,
    *,
    quest: QuestConfig,
    num_pages: int = 256,
    chunk: int = 8192,
    steps_per_launch: int = 1,
    eos: tuple[int, ...] = (),
    bounds_dtype: torch.dtype | None = None,
    impl: str | None = None,
    allow_long_context: bool = False,
    prefix_caching: bool = True,
):
    model, config = load_model(model_dir, dtype=torch.float32, device="cpu")
    shape = CacheShape(
        num_layers=config.num_layers,
        num_pages=num_pages,
        page_size=quest.page_size,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=torch.float32,
        bounds_dtype=bounds_dtype,
    )
    return LLMEngine(
        model=model,
        model_config=config,
        cache=KVCache(shape, device="cpu"),
        quest=quest,
        detokenize=lambda ids: " ".join(map(str, ids)),
        eos_token_ids=eos,
        prefill_chunk_tokens=chunk,
        steps_per_launch=steps_per_launch,
        impl=impl,
        allow_long_context=allow_long_context,
        prefix_caching=prefix_caching,
    )


def hf_greedy(model_dir, prompt: list[int], steps: int):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.eval()
    # The engine under test has no EOS: neither may transformers (raw logits, no processors).
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1) for s in out.logits]
    return tokens, logprobs


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), architecture="llama3.1")


@pytest.mark.parametrize("architecture", ["llama2", "mistral", "qwen2", "qwen3"])
def test_dense_greedy_matches_transformers(tmp_path, architecture):
    model_dir = make_tiny_model(tmp_path, architecture=architecture)
    engine = make_engine(model_dir, quest=QuestConfig(token_budget=None), chunk=24)
    vocab = engine.config.vocab_size
    # Shorter and longer than one prefill chunk; lengths not multiples of the page size.
    for length, seed in ((13, 1), (61, 2)):
        prompt = random_prompt(length, vocab, seed)
        (out,) = engine.generate([prompt], [SamplingParams(max_tokens=STEPS, logprobs=0)])
        want, want_logprobs = hf_greedy(model_dir, prompt, STEPS)
        assert out.token_ids == want
        for step, row in enumerate(out.logprobs):
            token = out.token_ids[step]
            assert row[token] == pytest.approx(float(want_logprobs[step][token]), abs=1e-4)


def test_batched_ragged_equals_one_by_one(llama_dir):
    engine = make_engine(llama_dir, quest=QuestConfig(token_budget=32, dense_layers=1), chunk=20)
    vocab = engine.config.vocab_size
    prompts = [random_prompt(n, vocab, n) for n in (5, 47, 90)]
    params = SamplingParams(max_tokens=12, logprobs=0)
    batched = engine.generate(prompts, [params] * 3)
    for prompt, out in zip(prompts, batched):
        (alone,) = engine.generate([prompt], [params])
        assert out.token_ids == alone.token_ids
        for a, b in zip(out.logprobs, alone.logprobs):
            for token, value in a.items():
                assert value == pytest.approx(b[token], abs=1e-5)


@pytest.mark.parametrize("budget", [None, 32])
def test_chained_greedy_steps_equal_single_steps(llama_dir, budget):
    """steps_per_launch > 1 chains greedy steps on the device: same tokens, same stops
    (EOS mid-launch, max_tokens not a multiple of the chain), pages all returned."""
    quest = QuestConfig(token_budget=budget, dense_layers=1)
    prompts = [random_prompt(n, 1000, n) for n in (37, 70, 5)]
    params = [SamplingParams(max_tokens=n) for n in (11, 4, 9)]
    reference = make_engine(llama_dir, quest=quest).generate(prompts, params)
    # Make the first request stop on a token it produces mid-way.
    eos = reference[0].token_ids[5]
    params[0] = SamplingParams(max_tokens=11)
    expected = make_engine(llama_dir, quest=quest, eos=(eos,)).generate(prompts, params)
    chained = make_engine(llama_dir, quest=quest, eos=(eos,), steps_per_launch=3)
    free = chained.allocator.num_free
    outputs = chained.generate(prompts, params)
    for want, got in zip(expected, outputs):
        assert got.token_ids == want.token_ids
        assert got.finish_reason == want.finish_reason
    assert outputs[0].finish_reason == "stop"
    assert chained.allocator.num_free == free


def test_quest_with_budget_covering_context_equals_dense(llama_dir):
    prompt = random_prompt(70, 1000, 7)
    params = SamplingParams(max_tokens=20, logprobs=3)
    dense = make_engine(llama_dir, quest=QuestConfig(token_budget=None))
    quest = make_engine(llama_dir, quest=QuestConfig(token_budget=1024, dense_layers=0))
    (a,), (b,) = dense.generate([prompt], [params]), quest.generate([prompt], [params])
    assert a.token_ids == b.token_ids
    for ra, rb in zip(a.logprobs, b.logprobs):
        for token, value in ra.items():
            assert rb[token] == pytest.approx(value, abs=1e-5)
    assert b.pages_attended == pytest.approx(b.pages_total)


def test_sparse_attends_fewer_pages(llama_dir):
    engine = make_engine(llama_dir, quest=QuestConfig(token_budget=32, dense_layers=1))
    (out,) = engine.generate([random_prompt(150, 1000, 3)], [SamplingParams(max_tokens=4)])
    assert out.pages_attended == 2
    assert out.pages_total > 9


def test_seeded_sampling_is_reproducible(llama_dir):
    engine = make_engine(llama_dir, quest=QuestConfig(token_budget=None))
    prompt = random_prompt(20, 1000, 5)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=11)
    (a,) = engine.generate([prompt], [params])
    (b,) = engine.generate([prompt], [params])
    assert a.token_ids == b.token_ids
    assert a.finish_reason == "length"


def test_capacity_refused_before_any_work(llama_dir):
    engine = make_engine(llama_dir, quest=QuestConfig(token_budget=None), num_pages=4)
    calls = []
    engine.model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(CacheCapacityError, match="cache holds 64 tokens"):
        engine.generate(
            [random_prompt(10, 1000, 1), random_prompt(60, 1000, 2)],
            [SamplingParams(max_tokens=8)] * 2,
        )
    assert not calls
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], [SamplingParams()])


def test_past_the_models_context_refused_before_any_work(llama_dir):
    """The tiny model declares 512 positions: a prompt that, with max_tokens, runs past
    them is refused with both lengths and the option, unless that option is given."""
    engine = make_engine(llama_dir, quest=QuestConfig(token_budget=None), num_pages=64)
    assert engine.config.context_length == 512
    calls = []
    engine.model.register_forward_pre_hook(lambda *a: calls.append(1))
    prompts, params = [random_prompt(10, 1000, 1), random_prompt(500, 1000, 2)], [
        SamplingParams(max_tokens=4), SamplingParams(max_tokens=20)]  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"prompt 1 has 500 tokens; with max_tokens=20 it reaches 520 tokens, past the "
        r"model's context of 512 tokens .*--allow-long-context",
    ):
        engine.generate(prompts, params)
    assert not calls
    (out,) = engine.generate([prompts[1]], [SamplingParams(max_tokens=12)])  # 512: fits
    assert len(out.token_ids) == 12
    free = make_engine(llama_dir, quest=QuestConfig(token_budget=None), num_pages=64,
                       allow_long_context=True)  # fmt: skip
    outputs = free.generate(prompts, params)
    assert [len(o.token_ids) for o in outputs] == [4, 20]


def test_prefill_progress_is_reported_from_the_start_after_every_chunk(llama_dir):
    engine = make_engine(llama_dir, quest=QuestConfig(token_budget=None), chunk=64)
    reports = []
    engine.generate(
        [random_prompt(200, 1000, 3), random_prompt(30, 1000, 4)],
        [SamplingParams(max_tokens=3)] * 2,
        on_progress=lambda *report: reports.append(report),
    )
    prefill = [r for r in reports if r[0] == "prefill"]
    assert prefill == [
        ("prefill", 0, 200), ("prefill", 64, 200), ("prefill", 128, 200),
        ("prefill", 192, 200), ("prefill", 200, 200), ("prefill", 0, 30), ("prefill", 30, 30),
    ]  # fmt: skip
    assert [r for r in reports if r[0] == "requests"] == [("requests", 1, 2), ("requests", 2, 2)]


def test_pages_are_returned_after_generation(llama_dir):
    engine = make_engine(llama_dir, quest=QuestConfig(token_budget=None), num_pages=12)
    free = engine.allocator.num_free
    for _ in range(3):  # would run out if pages leaked
        engine.generate([random_prompt(100, 1000, 9)], [SamplingParams(max_tokens=50)])
    assert engine.allocator.num_free == free


def test_public_steps_make_what_generate_makes(llama_dir):
    """add_request, prefill, decode and release, driven one step at a time (as the
    benchmarks do), give generate's tokens and return every page."""
    engine = make_engine(llama_dir, quest=QuestConfig(token_budget=32, dense_layers=1),
                         num_pages=8)  # fmt: skip
    prompt, params = random_prompt(90, 1000, 4), SamplingParams(max_tokens=6)
    (want,) = engine.generate([prompt], [params])
    free = engine.allocator.num_free
    seq = engine.add_request(prompt, params)
    with pytest.raises(CacheCapacityError, match="free pages"):  # the first holds most pages
        engine.add_request(random_prompt(90, 1000, 5), params, request_id=1)
    engine.prefill(seq)
    while not seq.finish_reason:
        engine.decode([seq])
    assert engine.decode_batch is not None
    engine.release(seq)
    assert engine.decode_batch is None and engine.allocator.num_free == free
    assert seq.result().token_ids == want.token_ids


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"page_size": 12}, "power of two"),
        ({"token_budget": 8, "page_size": 16}, "smaller than one page"),
        ({"dense_layers": -1}, "dense_layers"),
    ],
)
def test_bad_quest_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuestConfig(**kwargs)
