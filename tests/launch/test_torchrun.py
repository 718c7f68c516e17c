"""``torchrun -m longquest.launch.torchrun`` on the CPU (gloo) with a tiny random model.

Rank 0 prints exactly what ``longquest generate`` prints and batch mode writes what
the local launcher writes; a bad start (too many ranks for the GPUs, a rank that
never joins, ranks with different settings, a missing model) is a one-line error
and a nonzero exit in bounded time, never a hang.

The model directory is built here (random weights, a word-level tokenizer over
``w3 .. w1002``), so nothing is downloaded. Each torchrun launch costs a few seconds
of process start-up per rank, so every launch checks as much as it can.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longquest.launch import torchrun
from longquest.launch.cli import main as cli_main
from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1003
SETTINGS = ["--device", "cpu", "--dtype", "float32", "--page-size", "16", "--dense-layers", "1"]
SETTINGS += ["--prefill-chunk", "64"]  # several context-parallel rounds
TIMEOUT = ["--timeout", "60"]  # torchrun only: how long the group may take to form
QUEST = ["--budget", "32"]  # two pages of the prompt's ten
DENSE = ["--dense"]
LAUNCH_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = make_tiny_model(
        tmp_path_factory.mktemp("torchrun"), architecture="llama3.1", eos_token_id=2
    )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
    tokenizer.save_pretrained(directory)
    return directory


def _words(count: int, seed: int) -> str:
    draw = random.Random(seed)
    return " ".join(f"w{draw.randrange(5, VOCAB)}" for _ in range(count))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    # --standalone: the launcher picks its own free port, so parallel runs cannot collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "longquest.launch.torchrun", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=ROOT
    )


def _start_rank(*, rank: int, world: int, port: int, args: list[str]) -> subprocess.Popen:
    """One rank started by hand, as torchrun would describe it in the environment."""
    env = dict(
        os.environ,
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, "-m", "longquest.launch.torchrun", *args]
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, stderr) of every process; none is left running, whatever happens."""
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _summary(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[longquest] context ")]


def _local_generate(capsys, args: list[str]) -> tuple[str, str]:
    assert cli_main(["generate", *args]) == 0
    out = capsys.readouterr()
    (summary,) = _summary(out.err)
    return out.out, summary


@pytest.mark.parametrize(
    ("world", "extra"),
    [(2, DENSE), (2, QUEST), (3, [*QUEST, "--chat"])],
    ids=["dense-2", "quest-2", "quest-chat-3"],
)
def test_rank_zero_prints_what_one_device_prints(model_dir, tmp_path, capsys, world, extra):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(_words(150, seed=world))
    common = ["--model", str(model_dir), "--prompt-file", str(prompt), "--max-tokens", "8"]
    common += SETTINGS + [a for a in extra if a == "--chat"]
    sparsity = [a for a in extra if a != "--chat"]
    single, single_summary = _local_generate(capsys, common + sparsity)
    assert len(single.split()) == 8  # eight words, nothing cut short by an EOS
    if sparsity != DENSE:
        # The budget must bite, or Quest and dense would agree trivially.
        dense, _ = _local_generate(capsys, common + DENSE)
        assert dense != single
        assert "pages attended per step 2 of 10" in single_summary

    done = _torchrun(world, common + sparsity + TIMEOUT)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == single  # the same text, once: the other ranks print nothing
    (summary,) = _summary(done.stderr)
    assert summary.endswith(f" | world size {world}")
    # Context and pages attended agree; only the timings differ.
    assert summary.split(" | prefill")[0] == single_summary.split(" | prefill")[0]


def test_batch_mode_writes_what_the_local_launcher_writes(model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    requests = [
        {"id": "long", "prompt": _words(150, seed=1), "max_tokens": 6},
        {"id": 7, "messages": [{"role": "user", "content": _words(40, seed=2)}], "max_tokens": 4},
        {"id": "short", "prompt": "w5 w6 w7", "max_tokens": 5},
        {"id": "empty", "prompt": ""},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in requests))
    model = ["--model", str(model_dir), *SETTINGS, *QUEST]
    local = tmp_path / "local.jsonl"
    assert cli_main(["batch", "--input", str(source), "--output", str(local), *model]) == 0
    expected = {row["id"]: row for row in map(json.loads, local.read_text().splitlines())}
    assert sorted(expected, key=str) == [7, "empty", "long", "short"]  # ids keep their type
    assert "error" in expected["empty"] and "error" not in expected["long"]
    # A row already there (an earlier, interrupted job) must be skipped, not served again.
    remote = tmp_path / "remote.jsonl"
    remote.write_text(json.dumps(expected["short"]) + "\n")

    done = _torchrun(2, [*model, "--input", str(source), "--output", str(remote), *TIMEOUT])

    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in remote.read_text().splitlines()]
    assert sorted((row["id"] for row in rows), key=str) == sorted(expected, key=str)
    assert "'served': 2, 'errors': 1, 'skipped': 1" in done.stderr
    compared = ("text", "error", "finish_reason", "prompt_tokens", "completion_tokens")
    compared += ("pages_attended", "pages_total")
    for row in rows:
        want = expected[row["id"]]
        assert {k: row.get(k) for k in compared} == {k: want.get(k) for k in compared}


def _pretend_one_gpu(monkeypatch) -> None:
    env = dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    for key, value in {**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_more_ranks_than_gpus_is_refused(monkeypatch, capsys):
    _pretend_one_gpu(monkeypatch)
    with pytest.raises(ValueError, match="2 ranks on this node but only 1 CUDA devices") as info:
        torchrun.init_distributed(device="cuda", timeout_s=5)
    assert "--nproc-per-node 1 or fewer, or --device cpu" in str(info.value)
    # The default device on a machine with CUDA is CUDA: refused the same way.
    with pytest.raises(ValueError, match="only 1 CUDA devices"):
        torchrun.init_distributed(device=None, timeout_s=5)

    code = torchrun.main(["--model", "unused", "--prompt", "w5", "--device", "cuda"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "[longquest] error: 2 ranks on this node but only 1 CUDA devices; use "
        "--nproc-per-node 1 or fewer, or --device cpu"
    ]
    assert not dist.is_initialized()


def test_missing_environment_and_missing_model_are_one_line_errors(monkeypatch, capsys, tmp_path):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert torchrun.main(["--model", "x", "--prompt", "w5", "--device", "cpu"]) == 2
    assert "start this module with torchrun" in capsys.readouterr().err

    # A group of one forms at once; the model directory is then found missing.
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    for key, value in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    missing = tmp_path / "nope"
    code = torchrun.main(["--model", str(missing), "--prompt", "w5", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and str(missing) in err
    assert err.startswith("[longquest] rank 0: error: ")
    assert not dist.is_initialized()  # torn down for whoever runs next in this process


def test_a_rank_that_never_joins_is_a_clear_error_not_a_hang(model_dir):
    args = ["--model", str(model_dir), "--prompt", "w5 w6", "--device", "cpu", "--timeout", "5"]
    start = time.monotonic()
    ((code, err),) = _finish([_start_rank(rank=0, world=2, port=_free_port(), args=args)])
    assert time.monotonic() - start < 60
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert "rank 0: the group of 2 ranks did not form within 5 s" in err
    assert "check that every rank was started" in err


def test_ranks_started_with_different_settings_all_fail(model_dir):
    port = _free_port()
    procs = [
        _start_rank(
            rank=rank,
            world=2,
            port=port,
            args=["--model", str(model_dir), "--prompt", "w5 w6", *SETTINGS, *TIMEOUT]
            + ["--budget", budget],
        )
        for rank, budget in ((0, "32"), (1, "64"))
    ]
    for rank, (code, err) in enumerate(_finish(procs)):
        assert code == 2, err[-3000:]
        assert f"[longquest] rank {rank}: error: ranks were started with different settings" in err
        assert "start every rank with the same arguments" in err
        assert "Traceback" not in err
