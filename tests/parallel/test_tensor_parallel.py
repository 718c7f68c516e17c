"""Tensor x sequence parallelism (gloo, several processes, fp32, torch kernels) against
the single-device engine.

Every rank builds its engine the way the launchers do (``build_worker``: the T and S
groups, the weight shard read from safetensors, the cache of its KV heads) for each
case, on the tiny models of every family with head counts T divides (2 KV heads of 3
query heads each, 4 KV heads for T = 4) and odd vocabularies (the last vocabulary shard
is padded). Each case runs dense and Quest, greedy and seeded sampling in one batch,
then the same prompts again from the prefix cache with chained greedy steps. Tokens
must equal the single device's; logprobs agree within 1e-5 (fp32). The row-parallel sums
add the heads' and the MLP's parts in another order than one device does, which moves a
logit by an ulp or so: the tiny models keep their logits O(1) (``tiny_models``), as a
real model's are, so that stays well inside 1e-5.

One spawned run per world size holds every case (spawning costs seconds per process).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longquest.engine.builder import build_engine
from longquest.engine.config import (
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    QuestConfig,
    SamplingParams,
)
from tests.parallel.dist import run_distributed
from tests.tiny_models import make_tiny_model, save_char_tokenizer

PAGE = 4
QUESTS = {
    "dense": QuestConfig(page_size=PAGE, token_budget=None, dense_layers=0),
    # 4 pages of budget over prompts of up to 13 pages: selection matters.
    "quest": QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1),
}
# name: (tiny architecture, config overrides); three layers: one dense, two sparse.
MODELS = {
    "llama2": ("llama2", dict(num_attention_heads=4, num_key_value_heads=4)),  # MHA
    "llama3.1": ("llama3.1", dict(num_key_value_heads=2)),
    "llama3.2-tied": ("llama3.2-tied", dict(num_key_value_heads=2)),
    "mistral": ("mistral", dict(num_attention_heads=6, num_key_value_heads=2)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(num_key_value_heads=2)),
    "qwen2-gqa4": ("qwen2", dict(num_attention_heads=12, num_key_value_heads=4)),
}
# (model, tensor_parallel_size, quest) per world size; the sequence ranks are world // T.
# Quest runs its first layer and the prompt under the budget densely too.
CASES = {
    2: [(name, 2, "quest") for name in MODELS if name != "qwen2-gqa4"]
    + [("llama3.1", 2, "dense"), ("qwen3", 2, "dense")],
    4: [("qwen2", 2, "quest"), ("qwen2", 2, "dense"), ("llama3.2-tied", 2, "quest"),
        ("llama2", 4, "quest"), ("qwen2-gqa4", 4, "dense"), ("mistral", 1, "quest")],
}  # fmt: skip
PROMPT_LENGTHS = (51, 30, 7)  # not multiples of the page size; the last under the budget
MIXED = [
    SamplingParams(max_tokens=6, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.8, top_k=50, seed=11, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=6, logprobs=2, ignore_eos=True),
]
CHAINED = SamplingParams(max_tokens=6, ignore_eos=True)


def _config(model_dir, quest_name: str, *, world_size: int = 1, tensor: int = 1) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", quest=QUESTS[quest_name],
        cache=CacheConfig(num_pages=96), prefill_chunk_tokens=8,
        parallel=ParallelConfig(world_size=world_size, tensor_parallel_size=tensor,
                                launcher="local" if world_size == 1 else "torchrun"),
    )  # fmt: skip


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 990, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _generate(engine) -> tuple[list, list]:
    """``(mixed, chained)``: the mixed batch's (tokens, logprobs), then greedy tokens of
    the same prompts again (prefix-cache hits) with steps chained per launch."""
    mixed = engine.generate(_prompts(), MIXED)
    engine.steps_per_launch = 3
    engine.drop_decode_batch()
    chained = engine.generate(_prompts(), [CHAINED] * len(PROMPT_LENGTHS))
    return [(o.token_ids, o.logprobs) for o in mixed], [o.token_ids for o in chained]


def _rank(model_dirs, cases, *, rank, world_size, group):
    from longquest.parallel.worker import build_worker

    results = {}
    for name, tensor, quest_name in cases:
        config = _config(model_dirs[name], quest_name, world_size=world_size, tensor=tensor)
        engine, _ = build_worker(config, group=group, rank=rank, device="cpu")
        # The cache holds this tensor rank's KV heads only.
        assert engine.cache.shape.num_kv_heads == engine.config.num_kv_heads // tensor
        # Decode splits the rank's MLP shard over its S sequence ranks where they divide
        # it; at T > 1 the parts are summed over the whole replica.
        sequences = world_size // tensor
        splits = sequences > 1 and engine.config.intermediate_size // tensor % sequences == 0
        assert (engine.mlp_split is not None) == splits, (name, tensor)
        if splits and tensor > 1:
            assert engine.mlp_split.everyone.world_size == world_size
        results[name, tensor, quest_name] = _generate(engine)
    if world_size == 2:
        results["fp8"] = _keys_beyond_fp8(model_dirs["qwen2"], rank=rank, group=group)
    return results


def _keys_beyond_fp8(model_dir, *, rank, group) -> str | None:
    """fp8 key bounds, keys beyond +-448 in tensor rank 0's KV heads only: the prefill
    raises on both tensor ranks (neither is left waiting in a collective)."""
    from longquest.parallel.worker import build_worker

    config = _config(model_dir, "quest", world_size=2, tensor=2)
    cache = CacheConfig(num_pages=96, bounds_dtype="float8_e4m3fn")
    engine, _ = build_worker(
        dataclasses.replace(config, cache=cache), group=group, rank=rank, device="cpu"
    )
    if rank == 0:
        model, head_dim = engine.model, engine.config.head_dim
        q_size, kv_size = model.num_qo_heads * head_dim, model.num_kv_heads * head_dim
        with torch.no_grad():
            for layer in model.layers:
                layer.qkv_proj[q_size : q_size + kv_size] *= 1e4
    try:
        engine.generate(_prompts()[:1], [SamplingParams(max_tokens=2)])
    except ValueError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for name, (architecture, overrides) in MODELS.items():
        directory = make_tiny_model(
            tmp_path_factory.mktemp(name), architecture=architecture, num_hidden_layers=3,
            **overrides,
        )  # fmt: skip
        dirs[name] = save_char_tokenizer(directory)
    return dirs


def _single_device(model_dirs, cases) -> dict:
    """The single device's ``_generate`` per (model, quest) of ``cases``."""
    want = {}
    for name, quest_name in sorted({(name, quest_name) for name, _, quest_name in cases}):
        engine, _ = build_engine(_config(model_dirs[name], quest_name))
        want[name, quest_name] = _generate(engine)
    return want


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_and_sequence_layouts_match_single_device(model_dirs, world_size):
    cases = CASES[world_size]
    want = _single_device(model_dirs, cases)
    results = run_distributed(_rank, world_size=world_size, args=(model_dirs, cases), timeout_s=900)
    for rank, got in enumerate(results):
        if world_size == 2:
            assert "float8_e4m3fn range" in (got.pop("fp8") or ""), f"rank {rank}"
        for (name, tensor, quest_name), (mixed, chained) in got.items():
            where = f"{name} T={tensor} S={world_size // tensor} {quest_name} rank {rank}"
            want_mixed, want_chained = want[name, quest_name]
            assert [tokens for tokens, _ in mixed] == [t for t, _ in want_mixed], where
            assert chained == want_chained, where
            for (_, logprobs), (_, want_logprobs) in zip(mixed, want_mixed):
                for a, b in zip(want_logprobs, logprobs):
                    assert a.keys() == b.keys(), where
                    for token, value in a.items():
                        assert b[token] == pytest.approx(value, abs=1e-5), where


def _gpu_rank(model_dir, tensor, peer, *, rank, world_size, group):
    """Quest decode on CUDA ranks over NCCL (or peer memory) with CUDA graphs and chained
    greedy steps, against one GPU."""
    from longquest.parallel.worker import build_worker

    def config(world, tensor_size):
        base = _config(model_dir, "quest", world_size=world, tensor=tensor_size)
        parallel = dataclasses.replace(base.parallel, peer_collectives=peer)
        return dataclasses.replace(base, device=f"cuda:{rank}", parallel=parallel)

    params = [CHAINED] * len(PROMPT_LENGTHS)
    single, _ = build_engine(config(1, 1), device=f"cuda:{rank}")
    want = [o.token_ids for o in single.generate(_prompts(), params)]
    engine, _ = build_worker(
        config(world_size, tensor), group=group, rank=rank, device=f"cuda:{rank}"
    )
    assert engine.cuda_graphs
    assert (engine.model.tensor.peer is not None) == peer
    got = [o.token_ids for o in engine.generate(_prompts(), params)]
    return got, want


@pytest.mark.multigpu
@pytest.mark.parametrize("peer", [False, True], ids=["nccl", "peer"])
@pytest.mark.parametrize("world_size, tensor", [(2, 2), (4, 2)], ids=["T2", "T2xS2"])
def test_gpu_ranks_with_graphs_match_one_gpu(model_dirs, peer, world_size, tensor):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA GPUs")
    results = run_distributed(
        _gpu_rank, world_size=world_size, args=(model_dirs["qwen2"], tensor, peer),
        timeout_s=600, backend="nccl",
    )  # fmt: skip
    for got, want in results:
        assert got == want
