"""A tensor-parallel size the model cannot take is refused in the driver, before any
worker (Ray actor or torchrun rank) starts."""

from __future__ import annotations

import pytest

from longquest.launch.api import LLM
from longquest.launch.cli import main
from tests.tiny_models import make_tiny_model, save_char_tokenizer


@pytest.fixture(scope="module")
def three_kv_heads(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("llama2"), architecture="llama2")
    save_char_tokenizer(directory)
    return directory


def test_llm_refuses_a_tensor_size_the_heads_cannot_take_before_ray_starts(three_kv_heads):
    ray = pytest.importorskip("ray")
    was_running = ray.is_initialized()
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide"):
        LLM(three_kv_heads, world_size=2, tensor_parallel_size=2, launcher="ray")
    assert ray.is_initialized() == was_running


def test_torchrun_batch_refuses_it_before_starting_ranks(three_kv_heads, tmp_path, capsys):
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"prompt": "hello"}\n')
    args = ["batch", "--model", str(three_kv_heads), "--input", str(lines),
            "--output", str(tmp_path / "out.jsonl"), "--launcher", "torchrun",
            "--world-size", "2", "--tensor-parallel-size", "2", "--device", "cpu"]  # fmt: skip
    code = main(args)
    assert code == 2
    err = capsys.readouterr().err
    assert "tensor_parallel_size=2 does not divide" in err
    assert "num_key_value_heads=3" in err
    assert not (tmp_path / "out.jsonl").exists()
