"""Ray GPU actors of one group see the group's GPUs on their node (so peer memory can map
them) and pick their own by index: the mapping on the CPU, the actors on GPUs."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from longquest.engine.config import (
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    QuestConfig,
    SamplingParams,
)
from longquest.launch.ray_devices import ActorDevices, group_devices
from tests.tiny_models import make_tiny_model, save_char_tokenizer


def test_one_node_every_actor_sees_the_group_in_rank_order():
    devices = group_devices(node_ids=["a"] * 4, gpu_ids=[["2"], ["0"], ["3"], ["1"]])
    assert devices == [ActorDevices(visible_devices="2,0,3,1", device_index=r) for r in range(4)]


def test_two_nodes_each_actor_sees_its_node_only():
    devices = group_devices(node_ids=["a", "b", "a", "b"], gpu_ids=[["5"], ["0"], ["7"], ["1"]])
    assert devices == [
        ActorDevices(visible_devices="5,7", device_index=0),
        ActorDevices(visible_devices="0,1", device_index=0),
        ActorDevices(visible_devices="5,7", device_index=1),
        ActorDevices(visible_devices="0,1", device_index=1),
    ]


def test_ranks_sharing_a_gpu_see_it_once():
    devices = group_devices(node_ids=["a"] * 3, gpu_ids=[["0"], ["0"], ["1"]])
    assert [d.visible_devices for d in devices] == ["0,1"] * 3
    assert [d.device_index for d in devices] == [0, 0, 1]


def test_bad_placements_are_refused():
    with pytest.raises(ValueError, match="2 node ids for 1 actors"):
        group_devices(node_ids=["a", "b"], gpu_ids=[["0"]])
    with pytest.raises(ValueError, match="rank 1 holds GPUs \\['0', '1'\\]"):
        group_devices(node_ids=["a", "a"], gpu_ids=[["2"], ["0", "1"]])


def test_an_actor_sets_its_visible_devices_and_index_before_cuda(monkeypatch, tmp_path):
    """RankWorker.setup run in this process with CUDA stubbed: it exports the group's
    GPUs and builds its rank on ``cuda:<device_index>``."""
    ray_cluster = pytest.importorskip("longquest.launch.ray_cluster")
    config = EngineConfig(
        model=str(tmp_path), parallel=ParallelConfig(world_size=2, launcher="ray")
    )
    (setup,) = ray_cluster.worker_setups(
        config, master_addr="127.0.0.1", master_port=1, use_gpu=True, timeout_s=1.0
    )[1:]
    setup = replace(setup, visible_devices="4,6", device_index=1)
    chosen, built = [], []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **_: None)
    monkeypatch.setattr(
        "longquest.parallel.worker.build_worker",
        lambda config, *, group, rank, device: built.append((rank, device)) or (None, None),
    )
    monkeypatch.setattr(ray_cluster, "Scheduler", lambda engine: None)
    ray_cluster.RankWorker().setup(setup)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"
    assert chosen == [1] and built == [(1, "cuda:1")]


def _ray_generate(model_dir, *, world_size: int, prompts, params):
    """Tokens from ``world_size`` Ray GPU actors, and whether they decode over peer memory."""
    import ray

    from longquest.launch.ray_cluster import RayCluster

    config = EngineConfig(
        model=str(model_dir), dtype="float32", device="cuda",
        quest=QuestConfig(page_size=16, token_budget=32, dense_layers=1),
        cache=CacheConfig(max_tokens=4096), prefill_chunk_tokens=64,
        parallel=ParallelConfig(world_size=world_size, launcher="ray"),
    )  # fmt: skip
    cluster = RayCluster(config)
    try:
        outputs = cluster.generate(prompts, [params] * len(prompts))
        peer = ray.get([a.peer_memory.remote() for a in cluster.actors])
    finally:
        cluster.shutdown()
    return [o.token_ids for o in outputs], peer


def _local_generate(model_dir, *, prompts, params):
    from longquest.launch.api import LLM

    llm = LLM(
        str(model_dir), dtype="float32", device="cuda",
        quest=QuestConfig(page_size=16, token_budget=32, dense_layers=1),
        cache=CacheConfig(max_tokens=4096), prefill_chunk_tokens=64,
    )  # fmt: skip
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _model(directory):
    """The tiny Llama with a tokenizer that needs neither sentencepiece nor tiktoken (the
    engine loads one from the model directory; the GPU machine has neither library)."""
    return save_char_tokenizer(make_tiny_model(directory, architecture="llama3.1"))


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 990, (n,), generator=gen).tolist() for n in (157, 70)]


@pytest.mark.gpu
def test_a_replica_of_one_gpu_actor_matches_one_gpu(tmp_path):
    model_dir = _model(tmp_path)
    params = SamplingParams(max_tokens=16)
    want = _local_generate(model_dir, prompts=_prompts(), params=params)
    got, peer = _ray_generate(model_dir, world_size=1, prompts=_prompts(), params=params)
    assert got == want
    assert peer == [False]  # one rank has no peers


@pytest.mark.multigpu
def test_two_gpu_actors_decode_over_peer_memory(tmp_path):
    model_dir = _model(tmp_path)
    params = SamplingParams(max_tokens=16)
    want = _local_generate(model_dir, prompts=_prompts(), params=params)
    got, peer = _ray_generate(model_dir, world_size=2, prompts=_prompts(), params=params)
    assert got == want
    assert peer == [True, True]
