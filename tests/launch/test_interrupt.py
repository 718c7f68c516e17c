"""Ctrl-C: ``longquest generate`` and ``longquest batch`` (local, torchrun) stop with one
line on stderr and exit status 130, no traceback; a batch keeps the rows it wrote. The
Ray launcher's case is in test_batch_ray (it shares that module's Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.launch.processes import as_a_shell_starts_a_job
from tests.tiny_models import make_tiny_model, save_char_tokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL_OPTIONS = ["--device", "cpu", "--dtype", "float32", "--budget", "32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("interrupt"), architecture="llama2")
    return str(save_char_tokenizer(directory))


class Command:
    """The CLI in a child process of its own group, as a shell runs it; stderr collected."""

    def __init__(self, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = str(REPO)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "longquest.launch.cli", *args],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=as_a_shell_starts_a_job,
        )  # fmt: skip
        self.stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            self.stderr += chunk

    def wait_for(self, ready, *, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, f"exited early: {self.stderr.decode()[-2000:]}"
            assert time.monotonic() < deadline, "the job never got going"
            time.sleep(0.2)

    def ctrl_c(self) -> tuple[int, str]:
        """SIGINT to the whole group, as the terminal sends it; (status, stderr)."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            code = self.process.wait(timeout=120)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._reader.join(timeout=10)
        return code, self.stderr.decode(errors="replace")


def _last_line(stderr: str) -> str:
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


def test_ctrl_c_in_generate_is_one_line_and_130(model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a long document. " * 180)  # ~3000 tokens: a prefill bar shows
    command = Command([
        "generate", "--model", model_dir, *MODEL_OPTIONS, "--prompt-file", str(prompt),
        "--prefill-chunk", "256", "--allow-long-context", "--cache-tokens", "24000",
        "--max-tokens", "20000", "--ignore-eos",
    ])  # fmt: skip
    command.wait_for(lambda: b"prefill" in command.stderr)
    time.sleep(1.0)
    code, stderr = command.ctrl_c()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert _last_line(stderr) == "[longquest] interrupted"


def _batch_input(path: Path, lines: int) -> None:
    line = {"prompt": "hello " * 10, "max_tokens": 300, "ignore_eos": True}
    path.write_text("".join(json.dumps({"id": i, **line}) + "\n" for i in range(lines)))


@pytest.mark.parametrize("launcher", ["local", "torchrun"])
def test_ctrl_c_in_batch_keeps_the_rows_and_says_how_to_resume(model_dir, tmp_path, launcher):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _batch_input(src, 40)
    command = Command([
        "batch", "--model", model_dir, *MODEL_OPTIONS, "--cache-tokens", "2048",
        "--input", str(src), "--output", str(dst), "--group-size", "1",
        "--launcher", launcher, "--world-size", "2" if launcher == "torchrun" else "1",
    ])  # fmt: skip
    command.wait_for(lambda: dst.exists() and dst.read_text().count("\n") >= 1)
    code, stderr = command.ctrl_c()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert _last_line(stderr) == (
        f"[longquest] interrupted; the rows written to {dst} are safe: rerun the same "
        "command to resume"
    )
    rows = [json.loads(row) for row in dst.read_text().splitlines()]
    assert rows and len(rows) < 40 and all("text" in row for row in rows)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_sigterm_to_a_torchrun_batch_stops_its_ranks(model_dir, tmp_path):
    """The ranks run in a process group of their own (so Ctrl-C is answered once): a
    SIGTERM to the command alone still reaches them."""
    from tests.launch.processes import alive, descendants

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _batch_input(src, 40)
    command = Command([
        "batch", "--model", model_dir, *MODEL_OPTIONS, "--cache-tokens", "2048",
        "--input", str(src), "--output", str(dst), "--group-size", "1",
        "--launcher", "torchrun", "--world-size", "2",
    ])  # fmt: skip
    command.wait_for(lambda: dst.exists() and dst.read_text().count("\n") >= 1)
    below = descendants(command.process.pid)
    assert len(below) >= 3  # torchrun's agent and its two ranks
    command.process.send_signal(signal.SIGTERM)
    try:
        assert command.process.wait(timeout=120) != 0
        deadline = time.monotonic() + 60
        while any(map(alive, below)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in below if alive(pid)]
    finally:
        for pid in below:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
