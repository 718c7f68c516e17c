"""The single-device engine on a CUDA GPU against the CPU reference path (GPU only).

The CPU path (PyTorch kernels, fp32) is what the CPU tests check against
transformers; here the GPU's Triton kernels, CUDA graphs and bf16 must agree with it.
Everything imported here loads without CUDA, so collection works on any machine.
"""

from __future__ import annotations

import pytest
import torch

from longquest.engine.cache import CacheShape, KVCache
from longquest.engine.config import QuestConfig, SamplingParams
from longquest.engine.engine import LLMEngine
from longquest.engine.loader import load_model
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu

# Where the engine under test runs; a constant so the checks can be tried elsewhere.
GPU = "cuda"
STEPS = 24
SPARSE = QuestConfig(page_size=16, token_budget=32, dense_layers=1)


def make_engine(model_dir, *, quest: QuestConfig, device, dtype, impl=None) -> LLMEngine:
    model, config = load_model(model_dir, dtype=dtype, device=device)
    shape = CacheShape(
        num_layers=config.num_layers,
        num_pages=128,
        page_size=quest.page_size,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
    )
    return LLMEngine(
        model=model,
        model_config=config,
        cache=KVCache(shape, device=device),
        quest=quest,
        detokenize=lambda ids: " ".join(map(str, ids)),
        eos_token_ids=(),
        prefill_chunk_tokens=64,  # several chunks per prompt
        impl=impl,
    )


def random_prompts(lengths, *, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), architecture="llama3.1")


@pytest.mark.parametrize("architecture", ["llama3.1", "qwen3"])
@pytest.mark.parametrize("quest", [QuestConfig(token_budget=None), SPARSE], ids=["dense", "quest"])
def test_triton_fp32_matches_cpu_torch(tmp_path, architecture, quest):
    model_dir = make_tiny_model(tmp_path, architecture=architecture)
    # Lengths off the page size, the longer one far past budget + one page.
    prompts = random_prompts((157, 70), vocab=990, seed=3)
    params = [SamplingParams(max_tokens=STEPS, logprobs=0)] * 2
    cpu = make_engine(model_dir, quest=quest, device="cpu", dtype=torch.float32, impl="torch")
    gpu = make_engine(model_dir, quest=quest, device=GPU, dtype=torch.float32, impl="triton")
    want, got = cpu.generate(prompts, params), gpu.generate(prompts, params)
    for a, b in zip(want, got):
        assert b.token_ids == a.token_ids
        for row_a, row_b in zip(a.logprobs, b.logprobs):
            token = next(iter(row_a))
            assert row_b[token] == pytest.approx(row_a[token], abs=1e-3)
        assert b.pages_attended == pytest.approx(a.pages_attended)
    if quest.token_budget is not None:
        assert got[0].pages_attended < got[0].pages_total  # selection really happened


def test_quest_with_budget_covering_context_equals_dense_bf16(llama_dir):
    (prompt,) = random_prompts((150,), vocab=1000, seed=5)
    params = [SamplingParams(max_tokens=STEPS)]
    pages = -(-(len(prompt) + STEPS) // 16)
    # Exactly enough pages for the whole context: the boundary where Quest stays dense.
    full = QuestConfig(page_size=16, token_budget=16 * pages, dense_layers=0)
    dense = make_engine(
        llama_dir, quest=QuestConfig(token_budget=None), device=GPU, dtype=torch.bfloat16
    )
    quest = make_engine(llama_dir, quest=full, device=GPU, dtype=torch.bfloat16)
    (a,), (b,) = dense.generate([prompt], params), quest.generate([prompt], params)
    assert b.token_ids == a.token_ids
    assert b.pages_attended == pytest.approx(b.pages_total)


def test_bf16_logprobs_are_close_to_fp32(llama_dir):
    (prompt,) = random_prompts((150,), vocab=1000, seed=8)
    params = [SamplingParams(max_tokens=8, logprobs=20)]
    dense = QuestConfig(token_budget=None)
    (high,) = make_engine(llama_dir, quest=dense, device=GPU, dtype=torch.float32).generate(
        [prompt], params
    )
    (low,) = make_engine(llama_dir, quest=dense, device=GPU, dtype=torch.bfloat16).generate(
        [prompt], params
    )
    # Steps up to and including the first different token saw the same context.
    compared = 0
    for step, (row_high, row_low) in enumerate(zip(high.logprobs, low.logprobs)):
        best = high.token_ids[step]
        assert best in row_low, f"step {step}: fp32's choice is not in bf16's top 20"
        for token in row_high.keys() & row_low.keys():
            assert row_low[token] == pytest.approx(row_high[token], abs=0.2), (step, token)
        compared += 1
        if low.token_ids[step] != best:
            break
    assert compared >= 1


@pytest.mark.parametrize("quest", [QuestConfig(token_budget=None), SPARSE], ids=["dense", "quest"])
def test_ragged_batch_equals_one_at_a_time(llama_dir, quest):
    # fp32: a batch changes GEMM shapes, and bf16 rounding could then flip near-ties.
    engine = make_engine(llama_dir, quest=quest, device=GPU, dtype=torch.float32)
    prompts = random_prompts((5, 163, 48, 97), vocab=1000, seed=11)
    # Different lengths, so the batch shrinks while it decodes.
    params = [SamplingParams(max_tokens=n) for n in (20, 9, 16, 3)]
    batched = engine.generate(prompts, params)
    for prompt, param, out in zip(prompts, params, batched):
        (alone,) = engine.generate([prompt], [param])
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == param.max_tokens
