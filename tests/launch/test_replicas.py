"""Data-parallel replicas on Ray with CPU actors (gloo for two ranks): a batch job over
replicas writes the single-device answers once each, a replica whose actor is killed
mid-job hands its lines to the others, a job that loses every replica stops with a clear
error and resumes, and a cluster too small for R x W is refused before any work. The Ray
cases share one Ray runtime, one model and one single-device reference run."""

from __future__ import annotations

import json
import threading
import time

import pytest

from longquest.engine.config import CacheConfig, EngineConfig, ParallelConfig, QuestConfig
from longquest.launch.replicas import check_capacity, replicas_that_fit
from tests.tiny_models import make_tiny_model, save_char_tokenizer

COMMON = dict(
    dtype="float32", device="cpu", impl="torch", cache=CacheConfig(max_tokens=4096),
    quest=QuestConfig(page_size=16, token_budget=32, dense_layers=1), prefill_chunk_tokens=64,
)  # fmt: skip


def test_data_parallel_size_is_checked_with_what_to_do():
    with pytest.raises(ValueError, match="whole number >= 1"):
        ParallelConfig(data_parallel_size=0, launcher="ray")
    with pytest.raises(ValueError, match="use launcher='ray'"):
        ParallelConfig(data_parallel_size=2, launcher="torchrun")
    with pytest.raises(ValueError, match="--data-parallel-size 2"):
        EngineConfig(model="m", parallel=ParallelConfig(data_parallel_size=2))


def test_a_cluster_too_small_is_refused_naming_what_is_missing():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16, "GPU": 8}},
        {"Alive": True, "Resources": {"CPU": 16, "GPU": 6}},
        {"Alive": False, "Resources": {"CPU": 16, "GPU": 8}},
    ]
    assert replicas_that_fit(nodes, world_size=4, use_gpu=True) == [2, 1]
    check_capacity(nodes, replicas=3, world_size=4, use_gpu=True)
    with pytest.raises(ValueError) as refused:
        check_capacity(nodes, replicas=4, world_size=4, use_gpu=True)
    message = str(refused.value)
    assert "need 16 GPUs, 4 on one node" in message and "have 8, 6 GPUs" in message
    assert "room for 3 replicas" in message and "--data-parallel-size" in message
    with pytest.raises(ValueError, match="need 6 CPU slots"):
        check_capacity([{"Resources": {"CPU": 4}}], replicas=3, world_size=2, use_gpu=False)


ray = pytest.importorskip("ray")

from longquest.launch.api import LLM  # noqa: E402
from longquest.launch.batch import run_batch  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("replicas"), architecture="llama2")
    return save_char_tokenizer(directory)


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """An input of three documents asked two questions each (the documents are longer
    than the sticky prefix), a line the engine refuses (past the model's context: it
    costs no replica) and a line that is not JSON."""
    src = tmp_path_factory.mktemp("job") / "in.jsonl"
    lines = [
        {"id": f"d{d}q{q}", "prompt": f"Document {d}: " + f"w{d} " * 100 + f"? {q}",
         "max_tokens": 40, "ignore_eos": True}
        for d in range(3) for q in range(2)
    ]  # fmt: skip
    lines.insert(3, {"id": "too-long", "prompt": "x" * 600, "max_tokens": 4})
    src.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{broken\n")
    return src


@pytest.fixture(scope="module")
def reference(model_dir, job, tmp_path_factory):
    """The single-device answers, by id."""
    dst = tmp_path_factory.mktemp("reference") / "out.jsonl"
    llm = LLM(model_dir, launcher="local", **COMMON)
    run_batch(input_path=job, output_path=dst, step=llm.step, tokenizer=llm.tokenizer,
              group_size=2, progress=False)  # fmt: skip
    return {row["id"]: row.get("text") for row in map(json.loads, dst.read_text().splitlines())}


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def serve(llm: LLM, job, dst) -> dict:
    return run_batch(input_path=job, output_path=dst, replicas=llm.replicas,
                     tokenizer=llm.tokenizer, group_size=2, progress=False)  # fmt: skip


@pytest.mark.parametrize("replicas, world_size", [(2, 1), (1, 2)])
def test_replicas_write_the_single_device_answers_once(
    ray_runtime, model_dir, job, reference, tmp_path, replicas, world_size
):
    dst = tmp_path / "out.jsonl"
    llm = LLM(model_dir, launcher="ray", data_parallel_size=replicas, world_size=world_size,
              **COMMON)  # fmt: skip
    try:
        assert len(llm.worker_pids()) == replicas * world_size
        summary = serve(llm, job, dst)
    finally:
        llm.shutdown()
    rows = rows_of(dst)
    assert sorted(r["id"] for r in rows) == sorted(reference)  # each once
    assert {r["id"]: r.get("text") for r in rows} == reference
    assert summary["served"] == 6 and summary["errors"] == 2
    assert "past the model's context" in next(r for r in rows if r["id"] == "too-long")["error"]
    per_replica = summary["replicas"]
    assert [r["replica"] for r in per_replica] == list(range(replicas))
    assert sum(r["lines"] for r in per_replica) == 6 and not any(r["lost"] for r in per_replica)
    assert summary["prefill_tokens"] == sum(r["prefill_tokens"] for r in per_replica)
    assert summary["prefill_tokens"] <= sum(r["prompt_tokens"] for r in per_replica)


def _kill_when_written(llm: LLM, dst, replicas: list[int]) -> threading.Thread:
    """Kill the first actor of each of ``replicas`` once the job has written a row."""
    actors = [llm.replicas.clusters[r].actors[0] for r in replicas]

    def kill() -> None:
        deadline = time.monotonic() + 120
        while not (dst.exists() and dst.read_text().count("\n") >= 1):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        for actor in actors:
            ray.kill(actor, no_restart=True)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_killed_replica_hands_its_lines_to_the_others(
    ray_runtime, model_dir, job, reference, tmp_path
):
    dst = tmp_path / "out.jsonl"
    llm = LLM(model_dir, launcher="ray", data_parallel_size=2, **COMMON)
    try:
        killer = _kill_when_written(llm, dst, [1])
        summary = serve(llm, job, dst)
        killer.join()
    finally:
        llm.shutdown()
    rows = rows_of(dst)
    assert sorted(r["id"] for r in rows) == sorted(reference)
    assert {r["id"]: r.get("text") for r in rows} == reference
    lost = [r for r in summary["replicas"] if r["lost"]]
    assert [r["replica"] for r in lost] == [1] and "Actor" in lost[0]["lost"]


def test_a_job_that_loses_every_replica_stops_and_resumes(
    ray_runtime, model_dir, job, reference, tmp_path
):
    dst = tmp_path / "out.jsonl"
    llm = LLM(model_dir, launcher="ray", data_parallel_size=2, **COMMON)
    try:
        killer = _kill_when_written(llm, dst, [0, 1])
        with pytest.raises(RuntimeError, match="every replica failed.*rerun to resume"):
            serve(llm, job, dst)
        killer.join()
    finally:
        llm.shutdown()
    assert 1 <= len(rows_of(dst)) < len(reference)
    llm = LLM(model_dir, launcher="ray", data_parallel_size=2, **COMMON)
    try:
        serve(llm, job, dst)
    finally:
        llm.shutdown()
    rows = rows_of(dst)
    assert sorted(r["id"] for r in rows) == sorted(reference)
    assert {r["id"]: r.get("text") for r in rows} == reference


def test_generate_spreads_prompts_over_replicas_in_order(ray_runtime, model_dir):
    from longquest.engine.config import SamplingParams

    prompts = [f"prompt {i} " * (3 + i) for i in range(5)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    local = LLM(model_dir, launcher="local", **COMMON).generate(prompts, params, use_tqdm=False)
    llm = LLM(model_dir, launcher="ray", data_parallel_size=3, **COMMON)
    try:
        remote = llm.generate(prompts, params)
        with pytest.raises(ValueError, match="run_batch\\(replicas=llm.replicas"):
            llm.step([])
    finally:
        llm.shutdown()
    assert [o.token_ids for o in remote] == [o.token_ids for o in local]


def test_more_replicas_than_the_cluster_holds_is_refused_before_any_actor(ray_runtime, model_dir):
    from ray.util import placement_group_table

    def groups() -> int:
        return sum(g["state"] != "REMOVED" for g in placement_group_table().values())

    before = groups()
    with pytest.raises(ValueError, match="room for 2 replicas"):
        LLM(model_dir, launcher="ray", data_parallel_size=3, world_size=2, **COMMON)
    assert groups() == before


def test_the_cli_shows_each_replica_and_prints_the_summary_as_json(
    ray_runtime, model_dir, job, reference, tmp_path, capsys
):
    from longquest.launch import cli

    dst = tmp_path / "out.jsonl"
    argv = [
        "batch", "--model", str(model_dir), "--input", str(job), "--output", str(dst),
        "--launcher", "ray", "--data-parallel-size", "2", "--group-size", "2",
        "--device", "cpu", "--dtype", "float32", "--cache-tokens", "4096", "--budget", "32",
        "--page-size", "16", "--dense-layers", "1", "--prefill-chunk", "64",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert {r["id"]: r.get("text") for r in rows_of(dst)} == reference
    err = capsys.readouterr().err
    assert "replica 0" in err and "replica 1" in err
    (line,) = [x for x in err.splitlines() if x.startswith("[longquest] batch summary ")]
    summary = json.loads(line.removeprefix("[longquest] batch summary "))
    assert summary["served"] == 6 and len(summary["replicas"]) == 2
    assert ray.is_initialized()  # a Ray the job joined is left running
