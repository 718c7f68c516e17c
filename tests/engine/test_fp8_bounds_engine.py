"""fp8 Quest key bounds through the engine: config, cache sizing, generation on the tiny
model, the synthetic fill, and the prefill check that refuses keys beyond +-448."""

from __future__ import annotations

import pytest
import torch

from benchmarks.synthetic import fill_synthetic
from longquest.engine.builder import resolve_bounds_dtype
from longquest.engine.cache import CacheShape, KVCache, pages_that_fit
from longquest.engine.config import CacheConfig, QuestConfig, SamplingParams
from longquest.kernels.float8 import FLOAT8_DTYPE, round_to_float8
from tests.engine.test_engine import make_engine as make_test_engine
from tests.tiny_models import make_tiny_model

PAGE = 4


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), architecture="llama3.1")


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def make_engine(model_dir, *, quest, bounds_dtype=FLOAT8_DTYPE, impl=None, key_scale=None):
    """The tiny model on the CPU in fp32, its key bounds in ``bounds_dtype``; with
    ``key_scale`` every layer's key projection is scaled (huge keys)."""
    engine = make_test_engine(model_dir, quest=quest, num_pages=128, chunk=24,
                              bounds_dtype=bounds_dtype, impl=impl)  # fmt: skip
    if key_scale is not None:
        config = engine.config
        q_size = config.num_qo_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        with torch.no_grad():
            for layer in engine.model.layers:
                layer.qkv_proj[q_size : q_size + kv_size] *= key_scale
    return engine


def test_config_and_shape_validate_bounds_dtype():
    assert CacheConfig().bounds_dtype is None
    assert CacheConfig(bounds_dtype="float8_e4m3fn").bounds_dtype == "float8_e4m3fn"
    with pytest.raises(ValueError, match="bounds_dtype must be None .* 'float8_e4m3fn'"):
        CacheConfig(bounds_dtype="bfloat16")
    assert resolve_bounds_dtype(None) is None
    assert resolve_bounds_dtype("float8_e4m3fn") is torch.float8_e4m3fn
    common = dict(num_layers=3, num_pages=5, page_size=16, num_kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="CacheShape.bounds_dtype"):
        CacheShape(**common, dtype=torch.bfloat16, bounds_dtype=torch.float16)


def test_bounds_are_counted_and_allocated_at_their_size():
    common = dict(num_layers=3, num_pages=5, page_size=16, num_kv_heads=2, head_dim=32)
    model = CacheShape(**common, dtype=torch.bfloat16)
    fp8 = CacheShape(**common, dtype=torch.bfloat16, bounds_dtype=FLOAT8_DTYPE)
    vectors = 2 * 32
    assert model.bytes_per_page == 3 * (2 * 16 * 2 + 2 * 2) * vectors
    assert fp8.bytes_per_page == 3 * (2 * 16 * 2 + 2 * 1) * vectors
    cache = KVCache(fp8, device="cpu")
    assert cache.k.dtype == torch.bfloat16 and cache.key_min.dtype == FLOAT8_DTYPE
    assert cache.key_max.dtype == FLOAT8_DTYPE and cache.key_min.shape == (3, 5, 2, 32)
    fit = dict(page_size=16, num_layers=3, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16)
    free = 1000 * fp8.bytes_per_page
    assert pages_that_fit(free_bytes=free, **fit, bounds_dtype=FLOAT8_DTYPE) == 1000
    assert pages_that_fit(free_bytes=free, **fit) < 1000


@pytest.mark.parametrize("impl", [None, "triton"])
def test_generation_with_fp8_bounds(llama_dir, impl):
    """A budget covering the context decodes exactly as the model-dtype bounds (the
    selection cannot matter); a small budget runs sparse decode over fp8 bounds."""
    prompt = random_prompt(41 if impl else 70, 1000, 3)
    params = SamplingParams(max_tokens=6 if impl else 12)
    full = QuestConfig(page_size=PAGE, token_budget=1024, dense_layers=0)
    want = make_engine(llama_dir, quest=full, bounds_dtype=None, impl=impl)
    got = make_engine(llama_dir, quest=full, impl=impl)
    assert (
        got.generate([prompt], [params])[0].token_ids
        == want.generate([prompt], [params])[0].token_ids
    )

    sparse = QuestConfig(page_size=PAGE, token_budget=16, dense_layers=1)
    engine = make_engine(llama_dir, quest=sparse, impl=impl)
    (out,) = engine.generate([prompt], [params])
    assert len(out.token_ids) == params.max_tokens
    assert out.pages_attended < out.pages_total  # the bounds were used to select
    # The freed pages still hold the sequence (the pool hands out low ids first): every
    # stored key lies within its page's fp8 bounds.
    tokens = len(prompt) + params.max_tokens - 1
    pages = -(-tokens // PAGE)
    cache = engine.cache
    for page in range(pages):
        filled = min(PAGE, tokens - page * PAGE)
        keys = cache.k[:, page, :, :filled]  # [num_layers, num_kv_heads, filled, head_dim]
        assert (cache.key_min[:, page, :, None].float() <= keys).all()
        assert (cache.key_max[:, page, :, None].float() >= keys).all()
        low = round_to_float8(keys.amin(dim=2), direction="down")
        assert torch.equal(cache.key_min[:, page].view(torch.uint8), low.view(torch.uint8))


def test_prefill_refuses_keys_beyond_fp8_range(llama_dir):
    quest = QuestConfig(page_size=PAGE, token_budget=16, dense_layers=1)
    prompt = random_prompt(30, 1000, 4)
    params = SamplingParams(max_tokens=3)
    engine = make_engine(llama_dir, quest=quest, key_scale=1e4)
    with pytest.raises(ValueError, match=r"beyond the float8_e4m3fn range .*bounds_dtype=None"):
        engine.generate([prompt], [params])
    # The failed call gave its pages and reservation back.
    assert engine.allocator.num_free == engine.allocator.num_pages
    # The model-dtype bounds take the same keys.
    (out,) = make_engine(llama_dir, quest=quest, bounds_dtype=None, key_scale=1e4).generate(
        [prompt], [params]
    )
    assert len(out.token_ids) == 3


def test_synthetic_fill_rounds_fp8_bounds_outward(llama_dir):
    engine = make_engine(llama_dir, quest=QuestConfig(page_size=PAGE, token_budget=16))
    seq = fill_synthetic(engine, context_tokens=37, params=SamplingParams(max_tokens=2))
    cache = engine.cache
    for global_page, physical in seq.local_pages[:10]:
        filled = min(PAGE, 37 - global_page * PAGE)
        keys = cache.k[:, physical, :, :filled]
        low = round_to_float8(keys.amin(dim=2), direction="down")
        high = round_to_float8(keys.amax(dim=2), direction="up")
        assert torch.equal(cache.key_min[:, physical].view(torch.uint8), low.view(torch.uint8))
        assert torch.equal(cache.key_max[:, physical].view(torch.uint8), high.view(torch.uint8))
