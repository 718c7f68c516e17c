"""Decode steps replayed from CUDA graphs equal eager steps (GPU only).

The graph path reads every per-step fact from device buffers (DecodeBatch); a stale
buffer would show as a different token within a few steps, and a batch whose
membership changes (a sequence finishing early) must rebuild its buffers and graphs.
"""

from __future__ import annotations

import pytest
import torch

from longquest.engine.cache import CacheShape, KVCache
from longquest.engine.config import QuestConfig, SamplingParams
from longquest.engine.engine import LLMEngine
from longquest.engine.loader import load_model
from tests.tiny_models import make_tiny_model


def _engine(model_dir, *, quest: QuestConfig, cuda_graphs: bool, dtype=torch.float32):
    model, config = load_model(model_dir, dtype=dtype, device="cuda")
    shape = CacheShape(
        num_layers=config.num_layers,
        num_pages=512,
        page_size=quest.page_size,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
    )
    return LLMEngine(
        model=model,
        model_config=config,
        cache=KVCache(shape, device="cuda"),
        quest=quest,
        detokenize=lambda ids: " ".join(map(str, ids)),
        eos_token_ids=(),
        cuda_graphs=cuda_graphs,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), architecture="llama3.1")


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logprobs", [1, None])  # None: greedy steps chained in one graph
def test_graph_replay_equals_eager(model_dir, budget, dtype, logprobs):
    gen = torch.Generator().manual_seed(7)
    # Lengths off the page size; a short request finishes first so the batch changes.
    prompts = [torch.randint(0, 200, (n,), generator=gen).tolist() for n in (301, 157, 90)]
    params = [
        SamplingParams(max_tokens=40, ignore_eos=True, logprobs=logprobs),
        SamplingParams(max_tokens=12, ignore_eos=True, logprobs=logprobs),
        SamplingParams(max_tokens=25, ignore_eos=True, logprobs=logprobs),
    ]
    quest = QuestConfig(token_budget=budget, dense_layers=1)
    outputs = {}
    for graphs in (False, True):
        engine = _engine(model_dir, quest=quest, cuda_graphs=graphs, dtype=dtype)
        assert engine.cuda_graphs is graphs
        assert engine.steps_per_launch == (8 if graphs else 1)
        outputs[graphs] = engine.generate(prompts, params)
    for eager, graphed in zip(outputs[False], outputs[True]):
        assert graphed.token_ids == eager.token_ids
        for a, b in zip(eager.logprobs or [], graphed.logprobs or []):
            token = next(iter(a))
            assert abs(a[token] - b[token]) < 1e-4


def test_cuda_graphs_on_cpu_is_refused(model_dir):
    model, config = load_model(model_dir, dtype=torch.float32, device="cpu")
    shape = CacheShape(
        num_layers=config.num_layers,
        num_pages=8,
        page_size=16,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=torch.float32,
    )
    with pytest.raises(ValueError, match="cuda_graphs"):
        LLMEngine(
            model=model,
            model_config=config,
            cache=KVCache(shape, device="cpu"),
            quest=QuestConfig(),
            detokenize=str,
            eos_token_ids=(),
            cuda_graphs=True,
        )
