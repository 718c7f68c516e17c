"""The engine with two-level page selection (QuestConfig.group_pages) on one device: the
tokens of a reference selection, the single-level tokens when every group is kept,
chaining and the prefix cache change nothing."""

from __future__ import annotations

import pytest
import torch

import longquest.engine.attention as attention_module
from longquest.engine.config import QuestConfig, SamplingParams
from longquest.engine.decode_batch import DecodeBatch
from longquest.kernels.ref import coarse_bounds_ref, select_pages_two_level_ref
from tests.engine.test_engine import make_engine, random_prompt
from tests.tiny_models import make_tiny_model

PAGE = 4
# 4 pages of budget; kept groups: ceil(1 * 4 / 2) + 1 = 3 groups of 2 pages.
TWO_LEVEL = QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1, group_pages=2,
                        group_margin=1.0)  # fmt: skip
LENGTHS = (61, 98, 9)  # 16, 25 and 3 pages: ragged, one below the budget


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("two_level"), architecture="llama3.1")


def _prompts():
    return [random_prompt(n, 1000, n) for n in LENGTHS]


def reference_selection(calls: list[int]):
    """A stand-in for ``select_pages_two_level`` that checks the engine's coarse bounds of
    every final group against the reference recomputed from the pages, then selects with
    the reference (coarse bounds recomputed from scratch). A rank's pages are all full but
    the newest, where it holds it (``pin_last``): groups of full pages are final."""

    def select(*, query, key_min, key_max, page_table, num_pages, pin_last, coarse_min,
               coarse_max, coarse_table, num_groups, pin_from, group_pages, kept_groups,
               top_k, **_):  # fmt: skip
        calls.append(1)
        want_min, want_max = coarse_bounds_ref(key_min=key_min, key_max=key_max,
                                               page_table=page_table, num_pages=num_pages,
                                               group_pages=group_pages)  # fmt: skip
        final = torch.div(num_pages - pin_last.int(), group_pages, rounding_mode="floor")
        assert torch.equal(pin_from.long(), final.long())
        for s, count in enumerate(final.tolist()):
            slots = coarse_table[s, :count].long()
            assert torch.equal(coarse_min[slots], want_min[s, :count])
            assert torch.equal(coarse_max[slots], want_max[s, :count])
        return select_pages_two_level_ref(
            query=query, key_min=key_min, key_max=key_max, page_table=page_table,
            num_pages=num_pages, pin_last=pin_last, coarse_min=want_min, coarse_max=want_max,
            pin_from=final, group_pages=group_pages, kept_groups=kept_groups, top_k=top_k,
        )  # fmt: skip

    return select


def _generate(model_dir, quest, *, steps=12, **kwargs):
    engine = make_engine(model_dir, quest=quest, **kwargs)
    params = SamplingParams(max_tokens=steps)
    return [out.token_ids for out in engine.generate(_prompts(), [params] * len(LENGTHS))]


# The Triton kernels of a CPU engine run on the interpreter (no GPU); the GPU test below
# runs them on CUDA.
INTERPRETED = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter runs only")


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=INTERPRETED)])
def test_tokens_equal_the_reference_selection(llama_dir, monkeypatch, impl):
    got = _generate(llama_dir, TWO_LEVEL, impl=impl)
    calls: list[int] = []
    monkeypatch.setattr(attention_module, "select_pages_two_level", reference_selection(calls))
    want = _generate(llama_dir, TWO_LEVEL, impl="torch")
    assert calls and got == want
    # The selection matters at this budget: one level of 4-token pages picks otherwise.
    single = QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
    assert _generate(llama_dir, single) != got


def test_chained_steps_and_prefix_cache_change_nothing(llama_dir):
    """Groups become final at the step after they fill however steps are chained; pages
    from the prefix cache give the coarse bounds a full prefill gives."""
    want = _generate(llama_dir, TWO_LEVEL, prefix_caching=False)
    assert _generate(llama_dir, TWO_LEVEL, steps_per_launch=5) == want
    engine = make_engine(llama_dir, quest=TWO_LEVEL)
    params = [SamplingParams(max_tokens=12)] * len(LENGTHS)
    engine.generate(_prompts(), params)  # fills the prefix cache
    again = engine.generate(_prompts(), params)
    assert engine.prefix_stats().hit_requests > 0
    assert [out.token_ids for out in again] == want


def test_every_group_kept_is_the_single_level_selection(llama_dir):
    wide = QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1, group_pages=4,
                       group_margin=50.0)  # fmt: skip
    single = QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
    assert _generate(llama_dir, wide, steps=8) == _generate(llama_dir, single, steps=8)


def test_batch_rebuilt_when_the_selection_changes(llama_dir):
    engine = make_engine(llama_dir, quest=TWO_LEVEL)
    prompt = random_prompt(40, 1000, 1)
    engine.generate([prompt], [SamplingParams(max_tokens=3)])
    engine.quest = QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1)
    engine.generate([prompt], [SamplingParams(max_tokens=3)])
    assert engine.decode_batch is None or engine.decode_batch.group_pages is None
    with pytest.raises(ValueError, match="needs the cache"):
        DecodeBatch(request_ids=[0], width=4, page_size=PAGE, device=torch.device("cpu"),
                    num_kv_heads=3, group_pages=2)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_pages": 3}, "group_pages must be None .* or a power of two >= 2"),
        ({"group_pages": 1}, "group_pages must be"),
        ({"group_pages": 4.0}, "group_pages must be"),
        ({"group_margin": 0.5}, "group_margin must be a finite number >= 1"),
        ({"group_margin": float("nan")}, "group_margin must be"),
        ({"group_margin": "2"}, "group_margin must be"),
    ],
)
def test_bad_two_level_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuestConfig(**kwargs)


def test_kept_groups():
    assert QuestConfig().kept_groups is None
    assert QuestConfig(token_budget=None, group_pages=4).kept_groups is None
    # 2048 tokens of 4-token pages: 512 pages, twice that in groups of 4 pages, plus one.
    assert QuestConfig(page_size=4, token_budget=2048, group_pages=4).kept_groups == 257


def _gpu_engine(model_dir, *, device, dtype, bounds_dtype=None, **kwargs):
    from longquest.engine.cache import CacheShape, KVCache
    from longquest.engine.engine import LLMEngine
    from longquest.engine.loader import load_model

    model, config = load_model(model_dir, dtype=dtype, device=device)
    shape = CacheShape(num_layers=config.num_layers, num_pages=256, page_size=PAGE,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=dtype,
                       bounds_dtype=bounds_dtype)  # fmt: skip
    return LLMEngine(model=model, model_config=config, cache=KVCache(shape, device=device),
                     quest=TWO_LEVEL, detokenize=str, eos_token_ids=(), prefill_chunk_tokens=64,
                     **kwargs)  # fmt: skip


@pytest.mark.gpu
def test_gpu_graphs_match_the_cpu_and_eager_steps(llama_dir):
    """fp32: the GPU's kernels in CUDA graphs, 8 chained steps a launch, decode the CPU
    reference path's tokens; fp8 bounds in bf16: graphs decode what eager steps decode."""
    params = [SamplingParams(max_tokens=20)] * len(LENGTHS)
    cpu = _gpu_engine(llama_dir, device="cpu", dtype=torch.float32, impl="torch")
    gpu = _gpu_engine(llama_dir, device="cuda", dtype=torch.float32)
    assert gpu.cuda_graphs and gpu.steps_per_launch > 1
    want = [o.token_ids for o in cpu.generate(_prompts(), params)]
    assert [o.token_ids for o in gpu.generate(_prompts(), params)] == want
    if torch.cuda.get_device_capability() < (8, 9):
        return
    fp8 = dict(device="cuda", dtype=torch.bfloat16, bounds_dtype=torch.float8_e4m3fn)
    graphs = _gpu_engine(llama_dir, **fp8).generate(_prompts(), params)
    eager = _gpu_engine(llama_dir, cuda_graphs=False, steps_per_launch=1, **fp8)
    assert [o.token_ids for o in graphs] == [
        o.token_ids for o in eager.generate(_prompts(), params)
    ]
