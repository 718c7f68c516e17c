"""Ray launcher with CPU actors: same tokens as one device, a killed actor is a clear
error in bounded time, and a batch job interrupted that way resumes to a complete,
duplicate-free output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from longquest.engine.config import CacheConfig, QuestConfig, SamplingParams  # noqa: E402
from longquest.launch.api import LLM  # noqa: E402
from longquest.launch.batch import run_batch  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

QUEST = QuestConfig(page_size=16, token_budget=32, dense_layers=1)
COMMON = dict(
    dtype="float32", device="cpu", quest=QUEST, cache=CacheConfig(max_tokens=8192),
    prefill_chunk_tokens=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from longquest.launch.assets import ensure_demo_model

    directory = make_tiny_model(
        tmp_path_factory.mktemp("ray"), architecture="llama3.1", vocab_size=49152
    )
    # The demo model's tokenizer, so text prompts work; the tiny vocab covers its ids.
    demo = ensure_demo_model()
    for name in os.listdir(demo):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(demo / name, directory / name)
    return directory


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def prompts():
    return [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate((150, 61, 9))]


def test_two_cpu_actors_give_single_device_tokens(model_dir):
    params = SamplingParams(max_tokens=12)
    local = LLM(model_dir, launcher="local", **COMMON).generate(prompts(), params)
    llm = LLM(model_dir, world_size=2, launcher="ray", **COMMON)
    try:
        remote = llm.generate(prompts(), params)
        with pytest.raises(ValueError, match="empty"):
            llm.generate([[1, 2, 3], []], params)
        again = llm.generate(prompts()[:1], params)  # the group survives bad input
    finally:
        llm.shutdown()
    assert [o.token_ids for o in remote] == [o.token_ids for o in local]
    assert again[0].token_ids == local[0].token_ids
    assert remote[0].pages_attended < remote[0].pages_total


def _kill_one_actor_soon(llm: LLM, delay_s: float) -> threading.Timer:
    pid = llm.worker_pids()[1]
    timer = threading.Timer(delay_s, os.kill, args=(pid, signal.SIGKILL))
    timer.start()
    return timer


def test_killed_actor_is_a_clear_error_in_bounded_time(model_dir):
    # A request that decodes for long, past the tiny model's 512 positions.
    llm = LLM(model_dir, world_size=2, launcher="ray", allow_long_context=True, **COMMON)
    _kill_one_actor_soon(llm, 2.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank"):
        llm.generate(prompts(), SamplingParams(max_tokens=6000, ignore_eos=True))
    assert time.monotonic() - start < 60
    llm.shutdown()


def test_batch_resumes_after_an_actor_dies(model_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        json.dumps({"id": f"doc{i}", "prompt": f"Document {i}: " + "word " * (20 + 9 * i),
                    "max_tokens": 150, "ignore_eos": True})
        for i in range(10)
    ] + ["{broken"]  # fmt: skip
    src.write_text("\n".join(lines) + "\n")

    def batch(llm):
        run_batch(
            input_path=src,
            output_path=dst,
            tokenizer=llm.tokenizer,
            group_size=2,
            generate=lambda ids, p: llm.generate(ids, p, use_tqdm=False),
            progress=False,
        )

    llm = LLM(model_dir, world_size=2, launcher="ray", **COMMON)
    _kill_one_actor_soon(llm, 6.0)
    with pytest.raises(RuntimeError, match="worker rank"):
        batch(llm)
    first = [json.loads(line) for line in dst.read_text().splitlines()]
    assert 1 <= len(first) < 11
    llm = LLM(model_dir, world_size=2, launcher="ray", **COMMON)
    try:
        batch(llm)
    finally:
        llm.shutdown()
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted([f"doc{i}" for i in range(10)] + ["line-11"])
    assert all("text" in r for r in rows if r["id"] != "line-11")
