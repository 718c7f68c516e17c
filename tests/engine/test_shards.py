"""Tensor-parallel shards of a model: what a rank reads from a sharded safetensors
directory, how much of the model it holds, and the sizes refused before any weight."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from longquest.engine import loader
from longquest.engine.config import EngineConfig, ParallelConfig
from longquest.engine.loader import load_model
from tests.tiny_models import make_tiny_model

transformers = pytest.importorskip("transformers")


@dataclass
class Shard:
    """A ``TensorParallel`` of one rank with no group: loading makes no collective call."""

    rank: int
    world_size: int

    def all_reduce(self, tensor):
        raise AssertionError("no collective while loading")

    all_gather = all_reduce


class SlicesOnly:
    """``safe_open`` whose files hand out slices only: ``get_tensor`` (the whole tensor)
    fails, so a test sees that a rank never reads more than its shard."""

    def __init__(self, *args, **kwargs):
        self._file = SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self._handle = self._file.__enter__()
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, name):
        return self._handle.get_slice(name)

    def get_tensor(self, name):
        raise AssertionError(f"{name} read whole")


SAFE_OPEN = loader.safe_open


def _expected(full, config, *, rank: int, size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s parameters cut from the whole model's, by hand."""
    d, inter = config.head_dim, config.intermediate_size // size
    q, kv = config.num_qo_heads * d // size, config.num_kv_heads * d // size
    q_all, kv_all = config.num_qo_heads * d, config.num_kv_heads * d
    vocab = -(-config.vocab_size // size)
    want = {}
    for name, param in full.named_parameters():
        if name.endswith(("qkv_proj", "qkv_bias")):
            parts = param.split([q_all, kv_all, kv_all])
            bounds = [(rank * q, q), (rank * kv, kv), (rank * kv, kv)]
            param = torch.cat([p.narrow(0, a, n) for p, (a, n) in zip(parts, bounds)])
        elif name.endswith("o_proj"):
            param = param[:, rank * q : (rank + 1) * q]
        elif name.endswith("gate_up_proj"):
            gate, up = param.chunk(2)
            rows = slice(rank * inter, (rank + 1) * inter)
            param = torch.cat([gate[rows], up[rows]])
        elif name.endswith("down_proj"):
            param = param[:, rank * inter : (rank + 1) * inter]
        elif name in ("embed_tokens", "lm_head"):
            param = param[rank * vocab : (rank + 1) * vocab]
            pad = vocab - param.shape[0]
            param = torch.cat([param, param.new_zeros(pad, param.shape[1])])
        want[name] = param
    return want


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])  # q/k/v biases; tied, q/k norm
def test_sharded_directory_gives_each_rank_its_slices(tmp_path, monkeypatch, architecture):
    tiny = make_tiny_model(
        tmp_path / "tiny", architecture=architecture, num_key_value_heads=2, vocab_size=1001
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    directory = tmp_path / "sharded"
    hf.save_pretrained(directory, max_shard_size="200KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 2
    full, config = load_model(directory, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(loader, "safe_open", SlicesOnly)
    for rank in range(2):
        model, _ = load_model(directory, dtype=torch.float32, device="cpu", tensor=Shard(rank, 2))
        assert (model.num_qo_heads, model.num_kv_heads) == (3, 1)
        got = dict(model.named_parameters())
        want = _expected(full, config, rank=rank, size=2)
        assert got.keys() == want.keys()
        for name, param in got.items():
            assert torch.equal(param, want[name]), (rank, name)


@pytest.mark.parametrize("size", [2, 4])
def test_a_rank_holds_one_tth_of_the_weights(tmp_path, size):
    """Norms are replicated by design; everything else is split T ways (a vocabulary T
    divides leaves no padding)."""
    directory = make_tiny_model(
        tmp_path, architecture="llama2", num_attention_heads=4, num_key_value_heads=4
    )
    full, config = load_model(directory, dtype=torch.float32, device="cpu")
    assert config.vocab_size % size == 0

    def count(model, replicated: bool) -> int:
        params = model.named_parameters()
        return sum(p.numel() for name, p in params if name.endswith("norm") == replicated)

    for rank in range(size):
        shard, _ = load_model(
            directory, dtype=torch.float32, device="cpu", tensor=Shard(rank, size)
        )
        assert count(shard, replicated=False) * size == count(full, replicated=False)
        assert count(shard, replicated=True) == count(full, replicated=True)
        held = sum(p.numel() for p in shard.parameters())
        assert held == count(full, replicated=False) // size + count(full, replicated=True)


def test_sizes_that_do_not_divide_are_refused_before_any_weight(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide world_size=4"):
        ParallelConfig(world_size=4, tensor_parallel_size=3, launcher="ray")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="ParallelConfig.tensor_parallel_size"):
            ParallelConfig(world_size=2, tensor_parallel_size=bad, launcher="ray")
    assert (
        ParallelConfig(world_size=6, tensor_parallel_size=2, launcher="ray").sequence_parallel_size
        == 3
    )

    # 3 KV heads of 2 query heads each, intermediate size 328.
    directory = make_tiny_model(tmp_path, architecture="llama3.1")

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(loader, "safe_open", no_weights)
    with pytest.raises(
        ValueError, match=r"num_key_value_heads=3.*use a tensor_parallel_size in \[1\]"
    ):
        load_model(directory, dtype=torch.float32, device="cpu", tensor=Shard(0, 2))
    with pytest.raises(ValueError, match="intermediate_size=328"):
        load_model(directory, dtype=torch.float32, device="cpu", tensor=Shard(0, 3))
    with pytest.raises(ValueError, match="Helix-style"):
        load_model(directory, dtype=torch.float32, device="cpu", tensor=Shard(0, 6))


def test_the_builder_needs_the_tensor_group_the_config_names(tmp_path):
    from longquest.engine.builder import build_engine

    parallel = ParallelConfig(world_size=2, tensor_parallel_size=2, launcher="torchrun")
    config = EngineConfig(model=str(tmp_path), device="cpu", parallel=parallel)
    with pytest.raises(ValueError, match="tensor group has 1 ranks"):
        build_engine(config)
