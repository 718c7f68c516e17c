"""The torchrun entry on the CPU (gloo): same text as one device, and clear failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from longquest.launch import torchrun
from longquest.launch.cli import main as cli_main

PROMPT = "The capital of France is Paris. " * 40 + "What is the capital of France?"
COMMON = ["--max-tokens", "6", "--device", "cpu", "--dtype", "float32", "--chat"]


@pytest.fixture(scope="module")
def model_dir():
    from longquest.launch.assets import ensure_demo_model

    return str(ensure_demo_model())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, args: list[str], timeout: float = 240):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        "-m",
        "longquest.launch.torchrun",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", [["--budget", "64"], ["--dense"]])
def test_two_ranks_print_what_one_device_prints(model_dir, tmp_path, capsys, sparsity):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    args = ["--model", model_dir, "--prompt-file", str(prompt), *COMMON, *sparsity]
    assert cli_main(["generate", *args]) == 0
    single = capsys.readouterr().out
    done = _torchrun(2, args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == single  # rank 0 alone prints, the same text
    assert "world size 2" in done.stderr


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="2 ranks on this node but only 1 CUDA devices"):
        torchrun.init_distributed(device="cuda", timeout_s=5)


def test_missing_torchrun_environment_is_explained(monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code = torchrun.main(["--model", "x", "--prompt", "hi", "--device", "cpu"])
    assert code == 2
    assert "start this module with torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_a_rank_that_never_joins_times_out_clearly(model_dir):
    """One process of a world of two: a clear error after --timeout, not a hang."""
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "longquest.launch.torchrun",
            "--model",
            model_dir,
            "--prompt",
            "hi",
            "--device",
            "cpu",
            "--timeout",
            "5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - start < 100
    assert "did not form within 5 s" in done.stderr
    assert "check that every rank was started" in done.stderr


@pytest.mark.slow
def test_ranks_with_different_settings_fail_at_start(model_dir):
    port = str(_free_port())
    procs = []
    for rank, budget in ((0, "64"), (1, "128")):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "longquest.launch.torchrun",
                    "--model",
                    model_dir,
                    "--prompt",
                    "hi",
                    "--device",
                    "cpu",
                    "--budget",
                    budget,
                    "--timeout",
                    "60",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, err[-2000:]
        assert "different settings" in err
