"""The kernel benchmark runs end to end on the CPU (``--smoke``) and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import bench_graph, device_slug, environment, print_table, write_result

REPO_ROOT = Path(__file__).resolve().parents[1]
OPS = ("append", "scores", "select", "attend", "merge", "quest_step", "dense_paged", "sdpa")


@pytest.mark.slow
def test_kernel_benchmark_smoke_writes_json(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--smoke", "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quest_step" in done.stdout
    (path,) = tmp_path.glob("kernels-*.json")
    record = json.loads(path.read_text())
    assert {"name", "environment", "config", "copy_gbps", "correctness", "results"} <= set(record)
    assert {"device", "torch", "git_commit", "git_dirty", "date"} <= set(record["environment"])
    assert record["correctness"]["passed"] is True, record["correctness"]["failures"]
    config = record["config"]
    assert config["smoke"] is True and config["impl"] == "torch"
    assert len(record["results"]) == len(config["contexts"]) * len(config["batches"])
    for row in record["results"]:
        assert row["finite"] is True
        assert set(OPS) <= set(row["eager_ms"])
        assert all(row["eager_ms"][op] > 0 for op in OPS)
        assert row["derived_eager"]["speedup_vs_sdpa"] > 0
        assert {"k_cache", "key_min", "page_table", "query", "selected"} <= set(row["shapes"])
        assert row["sdpa"]["kv_shape"][2] == row["context"]


def test_write_result_names_file_by_device_and_date(tmp_path):
    path = write_result("unit", {"value": 1.5}, out_dir=tmp_path)
    env = environment()
    assert path.name == f"unit-{device_slug(env['device'])}-{env['date'][:10]}.json"
    record = json.loads(path.read_text())
    assert record["value"] == 1.5 and record["environment"]["python"] == env["python"]


def test_write_result_rejects_a_name_that_is_not_a_file_name(tmp_path):
    with pytest.raises(ValueError, match="name"):
        write_result("../escape", {}, out_dir=tmp_path)


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_print_table_aligns_columns(capsys):
    print_table([{"op": "scores", "ms": 0.5}, {"op": "select", "ms": None}], ["op", "ms"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["op", "ms"]
    assert lines[2].split() == ["scores", "0.5000"] and lines[3].split() == ["select", "-"]
    assert len({len(line) for line in lines}) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_bench_graph_refuses_the_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        bench_graph(lambda: None)


def _torchrun(nproc: int, *args: str) -> list[str]:
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous (0 is not accepted)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(port), *args]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_decode_benchmark_smoke(tmp_path, world_size):
    """benchmarks/decode.py on a tiny model (gloo on the CPU): every mode timed, floors."""
    script = ["benchmarks/decode.py", "--tiny", "--contexts", "300", "--batches", "1,2",
              "--budgets", "64", "--steps", "2", "--warmup", "1", "--iters", "2",
              "--group-pages", "none,2", "--out-dir", str(tmp_path)]  # fmt: skip
    command = _torchrun(world_size, *script) if world_size > 1 else [sys.executable, *script]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob(f"decode-w{world_size}-*.json")
    record = json.loads(path.read_text())
    assert len(record["rows"]) == 2
    assert record["mlp_split_over_ranks"] == (world_size > 1)
    for row in record["rows"]:
        assert set(row["modes"]) >= {"quest-64", "quest-64/g2", "dense"}
        # Both report the bounds they read (two levels: more than one here, at 19 pages).
        assert row["modes"]["quest-64/g2"]["metadata_bytes"] > 0
        assert row["modes"]["quest-64"]["metadata_bytes"] > 0
        for mode in ("quest-64", "quest-64/g2", "dense"):
            entry = row["modes"][mode]
            assert entry["ms_per_token"] > 0 and entry["floor"]["floor_ms"] > 0
            assert entry["breakdown_ms"]["weights_and_mlp"] > 0
            # The floor's collective term: one collective timed in a chain of them.
            chained = entry["breakdown_ms"]["collective_latency_chained"]
            assert (chained > 0) == (world_size > 1)


def test_passkey_rewind_restores_the_prefilled_cache(tmp_path):
    """benchmarks/passkey.py decodes one prefill under several budgets: after each decode
    the pages, the reservation and the key bounds are what the prefill left, so every
    budget sees the same cache (a decode that grows a page included)."""
    from benchmarks.passkey import decode_with
    from longquest.engine.config import QuestConfig, SamplingParams
    from tests.engine.test_engine import make_engine
    from tests.tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path, architecture="llama3.1")
    engine = make_engine(model_dir, quest=QuestConfig(token_budget=None), num_pages=32)
    prompt = torch.randint(3, 200, (16 * 7 + 12,), generator=torch.Generator().manual_seed(0))
    seq = engine.add_request(prompt.tolist(), SamplingParams(max_tokens=12, ignore_eos=True))
    engine.prefill(seq)
    state = (list(seq.local_pages), seq.reserved_pages, engine.allocator.num_free)
    mine = [physical for _, physical in seq.local_pages]  # freed pages' bounds are garbage
    bounds = engine.cache.key_min[:, mine].clone(), engine.cache.key_max[:, mine].clone()
    texts = []
    for budget in (32, 64, 32, None):
        quest = QuestConfig(token_budget=budget, page_size=16, dense_layers=1)
        texts.append(decode_with(engine, seq, quest, 12))
        assert (list(seq.local_pages), seq.reserved_pages, engine.allocator.num_free) == state
        assert torch.equal(engine.cache.key_min[:, mine], bounds[0])
        assert torch.equal(engine.cache.key_max[:, mine], bounds[1])
        assert len(seq.output) == 1
    assert texts[0] == texts[2]  # the same budget on the same cache: the same tokens
