"""Batch guarantees on the Ray launcher (CPU actors): one bad request is its own error
row, and a job that started its own Ray leaves no Ray process behind when it is
killed (on Ctrl-C it says so in one line and exits 130). The cases share one Ray
runtime and one model; the orphan case runs the CLI in a child process, which starts
a Ray of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from longquest.engine.config import CacheConfig, QuestConfig  # noqa: E402
from longquest.launch.api import LLM  # noqa: E402
from longquest.launch.batch import run_batch  # noqa: E402
from tests.launch.processes import alive as _alive  # noqa: E402
from tests.launch.processes import as_a_shell_starts_a_job  # noqa: E402
from tests.launch.processes import descendants as _descendants  # noqa: E402
from tests.tiny_models import make_tiny_model, save_char_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("ray-batch"), architecture="llama2")
    return save_char_tokenizer(directory)


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.mark.parametrize("seam", ["step", "generate"])
def test_one_bad_request_is_one_error_row_on_ray(ray_runtime, model_dir, tmp_path, seam):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"id": "a", "prompt": "one", "max_tokens": 2},
        {"id": "lp", "prompt": "x", "logprobs": 100000, "max_tokens": 2},
        {"id": "big", "prompt": "y" * 400, "max_tokens": 2},
        {"id": "b", "prompt": "two", "max_tokens": 2, "logprobs": 3},
        {"id": "long", "prompt": "z" * 600, "max_tokens": 2},
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    llm = LLM(
        model_dir, world_size=2, launcher="ray", dtype="float32", device="cpu",
        quest=QuestConfig(page_size=16, token_budget=32, dense_layers=1),
        cache=CacheConfig(max_tokens=256), prefill_chunk_tokens=64,
    )  # fmt: skip
    try:
        serve = (
            {"step": llm.step}
            if seam == "step"
            else {"generate": lambda ids, params: llm.generate(ids, params, use_tqdm=False)}
        )
        summary = run_batch(
            input_path=src,
            output_path=dst,
            **serve,
            tokenizer=llm.tokenizer,
            group_size=4,
            progress=False,
        )
    finally:
        llm.shutdown()
    by_id = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert "logprobs=100000" in by_id["lp"]["error"]
    assert by_id["big"]["error"].startswith('request id="big" (input line 3) has 400 tokens')
    assert "text" in by_id["a"] and "text" in by_id["b"]
    # Past the tiny model's 512 positions: refused on the ranks before any work.
    assert "past the model's context of 512 tokens" in by_id["long"]["error"]
    assert summary["served"] == 2 and summary["errors"] == 3


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_a_killed_ray_batch_leaves_no_ray_process(model_dir, tmp_path, ctrl_c):
    """SIGTERM to the driver, or SIGINT to its whole process group as Ctrl-C sends it."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    line = {"prompt": "hello " * 20, "max_tokens": 200, "ignore_eos": True}
    src.write_text("".join(json.dumps({"id": i, **line}) + "\n" for i in range(40)))
    command = [
        sys.executable, "-m", "longquest.launch.cli", "batch", "--model", str(model_dir),
        "--device", "cpu", "--dtype", "float32", "--cache-tokens", "4096", "--budget", "32",
        "--input", str(src), "--output", str(dst), "--launcher", "ray", "--world-size", "2",
        "--group-size", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        driver = subprocess.Popen(
            command, cwd=REPO, env=env, stderr=stderr, start_new_session=True,
            preexec_fn=as_a_shell_starts_a_job,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (dst.exists() and dst.read_text().count("\n") >= 1):
            assert driver.poll() is None and time.monotonic() < deadline, "the job never wrote"
            time.sleep(0.5)
        ray_processes = _descendants(driver.pid)
        assert len(ray_processes) >= 4  # GCS, raylet, its agents, the two workers
        if ctrl_c:
            os.killpg(driver.pid, signal.SIGINT)
        else:
            driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=120)
        deadline = time.monotonic() + 30
        while any(map(_alive, ray_processes)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [pid for pid in ray_processes if _alive(pid)]
        names = [Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in left]
        assert not left, f"left behind: {names}"
    finally:
        if driver.poll() is None:
            driver.kill()
    rows = [json.loads(row) for row in dst.read_text().splitlines()]
    assert rows and all("text" in row for row in rows)
    if ctrl_c:  # one line, status 130, as under the local launcher (test_interrupt)
        text = log.read_text(errors="replace")
        assert driver.returncode == 130, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        last = text.replace("\r", "\n").strip().splitlines()[-1]
        assert last.startswith("[longquest] interrupted; the rows written to "), text[-3000:]
