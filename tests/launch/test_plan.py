"""``longquest plan``: the memory model against hand counts and against the engine's own
cache and model, the table, and its errors. Configs are written in code; no weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from longquest.engine.config import CacheConfig, EngineConfig
from longquest.launch.cli import main
from longquest.launch.plan import (
    GIB,
    PlanAssumptions,
    PlanRequest,
    engine_cache_bytes,
    page_bytes_per_gpu,
    parameters_per_gpu,
    plan_layout,
    plan_layouts,
    read_model_config,
    recommend,
    tensor_parallel_sizes,
)
from longquest.launch.plan_report import gpu_memory_gib, parse_context
from tests.tiny_models import ARCHITECTURES, make_tiny_model

REPO = Path(__file__).resolve().parents[2]
MILLION = 2**20

LLAMA_31 = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
    rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256, max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)  # fmt: skip
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}  # fmt: skip


def write_config(directory: Path, shape: str, **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**LLAMA_31, **SHAPES[shape], **overrides}))
    return directory


@pytest.fixture
def llama_70b(tmp_path):
    return read_model_config(write_config(tmp_path / "Llama-3.1-70B", "70b"))


@pytest.fixture
def llama_8b(tmp_path):
    return read_model_config(write_config(tmp_path / "Llama-3.1-8B", "8b"))


def request(context=MILLION, gpus=8, memory=140.0, **fields) -> PlanRequest:
    return PlanRequest(context_tokens=context, num_gpus=gpus, gpu_memory_gib=memory, **fields)


def test_70b_weights_are_its_parameter_count_times_two_bytes(llama_70b):
    hidden, inter, vocab, layers = 8192, 28672, 128256, 80
    per_layer = (
        hidden * hidden + 2 * 1024 * hidden  # q, k, v (8 KV heads of 128)
        + hidden * hidden  # o
        + 3 * inter * hidden  # gate, up, down
        + 2 * hidden  # norms
    )  # fmt: skip
    total = layers * per_layer + 2 * vocab * hidden + hidden
    assert total == 70_553_706_496
    layout = plan_layout(llama_70b, tensor_parallel=1, request=request())
    assert layout.weight_bytes == 2 * total
    # T=8: every projection, the embedding and the head split 8 ways, the norms whole.
    split = layers * (per_layer - 2 * hidden) + 2 * vocab * hidden
    sharded = split // 8 + layers * 2 * hidden + hidden
    assert plan_layout(llama_70b, tensor_parallel=8, request=request()).weight_bytes == 2 * sharded


def test_70b_kv_and_largest_context_by_hand(llama_70b):
    # A page: K and V of 16 tokens plus the min and max bounds, per KV head, per layer.
    page = 80 * (2 * 16 * 2 + 2 * 2) * 128
    for t in (1, 2, 4, 8):
        layout = plan_layout(llama_70b, tensor_parallel=t, request=request())
        assert layout.page_bytes == page * 8 // t
        # The same bytes per GPU for 1M tokens at every T: T splits heads, S tokens.
        assert layout.kv_bytes_per_million == page * 8 * (MILLION // 16) // 8
    # T=8, S=1 on 140 GiB: the working estimate is under the engine's reserve, so the cache
    # is the engine's: 0.9 x (memory - weights - CUDA context - 2 GiB headroom).
    layout = plan_layout(llama_70b, tensor_parallel=8, request=request())
    cache = int((140 * GIB - layout.weight_bytes - GIB - 2 * GIB) * 0.9)
    assert layout.kv_budget_bytes == layout.engine_cache_bytes == cache
    assert layout.max_context == cache // layout.page_bytes * 16
    assert layout.weight_bytes + layout.working_bytes + layout.kv_budget_bytes <= 140 * GIB


@pytest.mark.parametrize("memory", [80.0, 140.0, 141.0])
def test_70b_does_not_fit_one_way_tensor_parallel_but_fits_eight(llama_70b, memory):
    layouts = {layout.tensor_parallel: layout for layout in
               plan_layouts(llama_70b, request=request(memory=memory))}  # fmt: skip
    assert sorted(layouts) == [1, 2, 4, 8]
    assert [layouts[t].sequence_parallel for t in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert not layouts[1].fits and layouts[8].fits
    best = recommend(list(layouts.values()))
    assert best is not None and best.tensor_parallel == (8 if memory == 80.0 else 2)


def test_8b_fits_one_gpu_at_128k(llama_8b):
    (layout,) = plan_layouts(llama_8b, request=request(context=131072, gpus=1, memory=80.0))
    assert (layout.tensor_parallel, layout.sequence_parallel) == (1, 1)
    assert layout.fits and layout.weight_bytes == 2 * 8_030_261_248


def test_largest_context_is_the_last_that_fits(llama_70b):
    for layout in plan_layouts(llama_70b, request=request()):
        if not layout.max_context:
            continue
        t, longest = layout.tensor_parallel, layout.max_context
        assert plan_layout(llama_70b, tensor_parallel=t, request=request(context=longest)).fits
        past = plan_layout(llama_70b, tensor_parallel=t, request=request(context=longest + 1))
        assert not past.fits and past.max_context == longest


def test_fp8_bounds_shrink_the_page(llama_70b):
    plain = plan_layout(llama_70b, tensor_parallel=8, request=request())
    fp8 = plan_layout(llama_70b, tensor_parallel=8, request=request(bounds_dtype="float8_e4m3fn"))
    assert plain.page_bytes - fp8.page_bytes == 80 * 2 * 128  # one byte less a bound element
    assert fp8.max_context > plain.max_context


def test_tensor_parallel_sizes_divide_heads_mlp_and_gpus(tmp_path):
    model = read_model_config(write_config(tmp_path, "8b", num_key_value_heads=4,
                                           num_attention_heads=12, hidden_size=1536))  # fmt: skip
    assert tensor_parallel_sizes(model, num_gpus=12) == [1, 2, 4]
    assert tensor_parallel_sizes(model, num_gpus=3) == [1]  # 3 divides no KV head count of 4


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_plan_matches_what_the_engine_allocates(tmp_path, monkeypatch, architecture):
    """Bytes per page and weight bytes at T=1 are the engine's own, for every family."""
    from longquest.engine import builder

    monkeypatch.setattr(builder, "Tokenizer", lambda path: SimpleNamespace(
        eos_token_ids=(), decode=lambda ids: " ".join(map(str, ids))))  # fmt: skip
    model_dir = make_tiny_model(tmp_path, architecture=architecture)
    for bounds in (None, "float8_e4m3fn"):
        config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32",
                              cache=CacheConfig(num_pages=7, bounds_dtype=bounds))  # fmt: skip
        engine, _ = builder.build_engine(config)
        cache = engine.cache
        allocated = sum(t.nbytes for t in (cache.k, cache.v, cache.key_min, cache.key_max))
        model = read_model_config(model_dir)
        plan = request(dtype="float32", bounds_dtype=bounds)
        assert page_bytes_per_gpu(model, tensor_parallel=1, request=plan) == allocated // 7
    parameters = sum(p.numel() for p in engine.model.parameters())
    assert parameters_per_gpu(model, tensor_parallel=1) == parameters


def test_plan_sizes_the_cache_as_the_engine_does(llama_70b, monkeypatch):
    from longquest.engine import builder

    free = 37 * GIB + 12345
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 140 * GIB))
    pages = builder.cache_pages(config=llama_70b, cache=CacheConfig(), page_size=16,
                                dtype=torch.bfloat16, device=torch.device("cuda"))  # fmt: skip
    page = page_bytes_per_gpu(llama_70b, tensor_parallel=1, request=request())
    cache = engine_cache_bytes(free_bytes=free, memory_fraction=0.9, assumptions=PlanAssumptions())
    assert pages == cache // page


@pytest.mark.parametrize(
    "text, tokens",
    [("1M", MILLION), ("512K", 524288), ("131072", 131072), ("1.5m", 3 * MILLION // 2)],
)
def test_context_forms(text, tokens):
    assert parse_context(text) == tokens


@pytest.mark.parametrize("text", ["", "1x", "-5", "0", "M"])
def test_bad_context_is_refused(text):
    with pytest.raises(ValueError, match="--context"):
        parse_context(text)


def test_without_a_gpu_the_memory_is_the_stated_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    memory, note = gpu_memory_gib(None)
    assert memory == 80.0 and "--gpu-memory" in note
    assert gpu_memory_gib(141.0) == (141.0, "")


def test_cli_end_to_end_through_the_module_entry_point(tmp_path):
    model_dir = write_config(tmp_path / "Llama-3.1-70B", "70b")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "longquest.launch.cli", "plan", "--model", str(model_dir),
               "--context", "1M", "--gpus", "8", "--gpu-memory", "140"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Llama-3.1-70B: LlamaForCausalLM, 70.6B parameters")
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("T  S"))
    rows = [line.split() for line in lines[header + 1 : header + 5]]
    assert [(row[0], row[1], row[-1]) for row in rows] == [
        ("1", "8", "no"), ("2", "4", "yes"), ("4", "2", "yes"), ("8", "1", "yes"),
    ]  # fmt: skip
    assert rows[0][2:4] == ["131.4", "GiB"]  # T=1 holds the whole model on each GPU
    assert "Use T=2 S=4" in done.stdout


def test_no_layout_fits_says_what_would(tmp_path, capsys):
    model_dir = write_config(tmp_path, "70b")
    code = main(["plan", "--model", str(model_dir), "--context", "1.3M", "--gpus", "8",
                 "--gpu-memory", "80"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2 and "T  S" in out  # the table still prints
    assert "no layout of 8 GPUs holds 1.30M tokens" in err
    assert "16 GPUs" in err and "--bounds-dtype float8_e4m3fn" in err
    assert "a context of at most 1.28M (T=8 S=1)" in err


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: d / "absent", [], "does not exist"),
        (lambda d: d, [], "has no config.json"),
        (lambda d: write_config(d, "70b", architectures=["GPT2LMHeadModel"], model_type="gpt2"),
         [], "unsupported architecture 'GPT2LMHeadModel'"),
        (lambda d: write_config(d, "70b"), ["--gpus", "0"], "--gpus must be a whole number >= 1"),
        (lambda d: write_config(d, "70b"), ["--gpu-memory", "-1"], "--gpu-memory must be"),
        (lambda d: write_config(d, "70b"), ["--context", "lots"], "--context: cannot read"),
        (lambda d: write_config(d, "70b"), ["--page-size", "24"], "--page-size must be a power"),
    ],
)  # fmt: skip
def test_bad_input_is_a_one_line_error(tmp_path, capsys, make, extra, message):
    model_dir = make(tmp_path)
    args = ["plan", "--model", str(model_dir), "--gpus", "8", "--gpu-memory", "80", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
