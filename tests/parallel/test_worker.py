"""Sequence-parallel engine (gloo, several processes) against the single-device engine."""

from __future__ import annotations

import pytest
import torch

from longquest.engine.cache import CacheShape, KVCache
from longquest.engine.config import EngineConfig, ParallelConfig, QuestConfig, SamplingParams
from longquest.engine.engine import LLMEngine
from longquest.engine.loader import load_model
from longquest.parallel.comm import SequenceParallelComm
from longquest.parallel.ownership import PageOwnership
from longquest.parallel.worker import SequenceParallelRanks, check_same_everywhere
from tests.parallel.dist import run_distributed
from tests.tiny_models import make_tiny_model

PAGE = 4
CHUNK = 8  # tokens per rank per prefill round: several rounds per prompt
QUESTS = {
    "dense": QuestConfig(page_size=PAGE, token_budget=None, dense_layers=0),
    # 4 pages of budget over prompts of 13-25 pages: selection matters.
    "quest": QuestConfig(page_size=PAGE, token_budget=4 * PAGE, dense_layers=1),
}
PROMPT_LENGTHS = (51, 97, 7)  # not multiples of the page size or any world size
STEPS = 10


def _ranks(*, group, rank, world_size, device="cpu", peer=None):
    return SequenceParallelRanks(
        group=group,
        ownership=PageOwnership(world_size=world_size, page_size=PAGE, prefill_chunk_tokens=CHUNK),
        world_size=world_size,
        rank=rank,
        comm=SequenceParallelComm(group=group, rank=rank, world_size=world_size, peer=peer),
        device=device,
    )


def _engine(model_dir, quest, **kwargs):
    model, config = load_model(model_dir, dtype=torch.float32, device="cpu")
    shape = CacheShape(
        num_layers=config.num_layers,
        num_pages=128,
        page_size=PAGE,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=torch.float32,
    )
    return LLMEngine, dict(
        model=model,
        model_config=config,
        cache=KVCache(shape, device="cpu"),
        quest=quest,
        detokenize=lambda ids: " ".join(map(str, ids)),
        eos_token_ids=(),
        **kwargs,
    )


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _run(model_dir, quest_name, params, steps_per_launch=1, *, rank, world_size, group):
    cls, kwargs = _engine(
        model_dir,
        QUESTS[quest_name],
        ranks=_ranks(group=group, rank=rank, world_size=world_size),
        steps_per_launch=steps_per_launch,
    )
    engine = cls(**kwargs)
    # Decode splits the MLP wherever the ranks divide it (intermediate size 200 here).
    splits = world_size > 1 and engine.config.intermediate_size % world_size == 0
    assert (engine.mlp_split is not None) == splits
    outs = engine.generate(_prompts(engine.config.vocab_size), [params] * len(PROMPT_LENGTHS))
    return [(o.token_ids, o.logprobs) for o in outs]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sp"), architecture="qwen2")


@pytest.mark.parametrize("quest_name", ["dense", "quest"])
def test_world_sizes_match_single_device(model_dir, quest_name):
    params = SamplingParams(max_tokens=STEPS, logprobs=2)
    cls, kwargs = _engine(model_dir, QUESTS[quest_name])
    single = cls(**kwargs)
    want = single.generate(_prompts(single.config.vocab_size), [params] * len(PROMPT_LENGTHS))
    for world_size in (1, 2, 3, 4):
        results = run_distributed(
            _run, world_size=world_size, args=(model_dir, quest_name, params), timeout_s=300
        )
        for rank_result in results:
            for out, (tokens, logprobs) in zip(want, rank_result):
                assert tokens == out.token_ids, f"world_size={world_size}"
                for a, b in zip(out.logprobs, logprobs):
                    for token, value in a.items():
                        assert b[token] == pytest.approx(value, abs=1e-5)


def test_chained_greedy_steps_match_single_device(model_dir):
    """Greedy steps chained per launch (tokens broadcast on the device) give the tokens
    of one step at a time on a single device."""
    params = SamplingParams(max_tokens=STEPS)
    cls, kwargs = _engine(model_dir, QUESTS["quest"])
    single = cls(**kwargs)
    want = single.generate(_prompts(single.config.vocab_size), [params] * len(PROMPT_LENGTHS))
    for world_size in (2, 3):
        results = run_distributed(
            _run, world_size=world_size, args=(model_dir, "quest", params, 4), timeout_s=300
        )
        for rank_result in results:
            assert [tokens for tokens, _ in rank_result] == [o.token_ids for o in want]


def test_sampling_agrees_across_ranks(model_dir):
    params = SamplingParams(max_tokens=STEPS, temperature=1.0)  # unseeded: ranks must agree
    results = run_distributed(_run, world_size=3, args=(model_dir, "quest", params), timeout_s=300)
    assert results[0] == results[1] == results[2]


def _mismatch(*, rank, world_size, group):
    quest = QuestConfig(token_budget=256 if rank == 0 else 512)
    parallel = ParallelConfig(world_size=world_size, launcher="torchrun")
    check_same_everywhere(EngineConfig(model="m", quest=quest, parallel=parallel), group=group)


def test_different_settings_are_detected():
    with pytest.raises(RuntimeError, match="different settings"):
        run_distributed(_mismatch, world_size=2, timeout_s=120)


TINY = dict(
    architecture="LlamaForCausalLM", vocab_size=300, hidden_size=64, intermediate_size=96,
    num_layers=3, num_qo_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
    rope_theta=1e4,
)  # fmt: skip
SYNTH_CONTEXT = 301
SYNTH_QUEST = QuestConfig(page_size=PAGE, token_budget=6 * PAGE, dense_layers=1)


def _synthetic_engine(num_pages, **kwargs):
    from benchmarks.synthetic import random_model
    from longquest.engine.config import ModelConfig

    config = ModelConfig(**TINY)
    model = random_model(config, dtype=torch.float32, device="cpu", seed=3)
    shape = CacheShape(num_layers=3, num_pages=num_pages, page_size=PAGE, num_kv_heads=2,
                       head_dim=16, dtype=torch.float32)  # fmt: skip
    return LLMEngine(model=model, model_config=config, cache=KVCache(shape, device="cpu"),
               quest=SYNTH_QUEST, detokenize=str, eos_token_ids=(), **kwargs)  # fmt: skip


def _synthetic_decode(engine):
    from benchmarks.synthetic import decode_steps, fill_synthetic

    params = SamplingParams(max_tokens=9, ignore_eos=True)
    seq = fill_synthetic(engine, context_tokens=SYNTH_CONTEXT, params=params, seed=5)
    decode_steps(engine, [seq], launches=8)
    return seq.output


def _synthetic_rank(*, rank, world_size, group):
    engine = _synthetic_engine(
        60,  # 240 tokens a rank: the 301-token context fits only across ranks
        ranks=_ranks(group=group, rank=rank, world_size=world_size),
    )
    return _synthetic_decode(engine)


def test_context_past_one_device_decodes_like_a_big_one():
    from longquest.engine.cache import CacheCapacityError

    with pytest.raises(CacheCapacityError, match="cache holds 240 tokens"):
        _synthetic_decode(_synthetic_engine(60))
    want = _synthetic_decode(_synthetic_engine(200))  # one device with room for it
    results = run_distributed(_synthetic_rank, world_size=2, timeout_s=300)
    assert results[0] == results[1] == want


def _run_on_gpus(model_dir, peer, *, rank, world_size, group):
    """Quest decode on CUDA ranks over NCCL (or peer memory): CUDA graphs, the MLP split,
    chained steps."""
    from longquest.parallel.peer import PeerCollectives

    model, config = load_model(model_dir, dtype=torch.float32, device=f"cuda:{rank}")
    shape = CacheShape(num_layers=config.num_layers, num_pages=128, page_size=PAGE,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       dtype=torch.float32)  # fmt: skip
    common = dict(model=model, model_config=config, quest=QUESTS["quest"], eos_token_ids=(),
                  detokenize=lambda ids: "", steps_per_launch=4)  # fmt: skip
    params = SamplingParams(max_tokens=STEPS)
    prompts = _prompts(config.vocab_size)
    single = LLMEngine(cache=KVCache(shape, device=f"cuda:{rank}"), **common)
    want = [o.token_ids for o in single.generate(prompts, [params] * len(prompts))]
    if peer:
        peer = PeerCollectives.create(group=group, rank=rank, world_size=world_size,
                                      device=f"cuda:{rank}")  # fmt: skip
        assert peer is not None
    engine = LLMEngine(
        cache=KVCache(shape, device=f"cuda:{rank}"),
        ranks=_ranks(
            group=group, rank=rank, world_size=world_size, device=f"cuda:{rank}", peer=peer or None
        ),
        **common,
    )
    assert engine.cuda_graphs and engine.mlp_split is not None
    got = [o.token_ids for o in engine.generate(prompts, [params] * len(prompts))]
    return got, want


@pytest.mark.multigpu
@pytest.mark.parametrize("peer", [False, True], ids=["nccl", "peer"])
def test_gpu_ranks_with_graphs_and_split_mlp_match_one_gpu(model_dir, peer):
    results = run_distributed(
        _run_on_gpus, world_size=2, args=(model_dir, peer), timeout_s=300, backend="nccl"
    )
    for got, want in results:
        assert got == want


def _refuse_huge_keys(model_dir, *, rank, world_size, group):
    model, config = load_model(model_dir, dtype=torch.float32, device="cpu")
    q_size, kv_size = config.num_qo_heads * config.head_dim, config.num_kv_heads * config.head_dim
    with torch.no_grad():
        for layer in model.layers:  # keys far beyond fp8's +-448
            layer.qkv_proj[q_size : q_size + kv_size] *= 1e4
    shape = CacheShape(num_layers=config.num_layers, num_pages=128, page_size=PAGE,
                       num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       dtype=torch.float32, bounds_dtype=torch.float8_e4m3fn)  # fmt: skip
    engine = LLMEngine(
        model=model, model_config=config, cache=KVCache(shape, device="cpu"),
        quest=QUESTS["quest"], detokenize=str, eos_token_ids=(),
        ranks=_ranks(group=group, rank=rank, world_size=world_size),
    )  # fmt: skip
    try:
        engine.generate(_prompts(config.vocab_size)[:1], [SamplingParams(max_tokens=2)])
    except ValueError as error:
        return str(error), engine.allocator.num_free == engine.allocator.num_pages
    return None, None


def test_fp8_bounds_refuse_huge_keys_on_every_rank(model_dir):
    """Every rank raises (none is left waiting in a collective) and frees its pages."""
    for message, freed in run_distributed(
        _refuse_huge_keys, world_size=2, args=(model_dir,), timeout_s=120
    ):
        assert message is not None and "float8_e4m3fn range" in message
        assert freed
