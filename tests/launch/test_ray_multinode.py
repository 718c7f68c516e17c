"""A two-node Ray cluster on this machine (a head and two raylets with resources of their
own): ``longquest batch --launcher ray --data-parallel-size 2 --world-size 2`` with CPU
actors over gloo places each replica on one node, answers as one device does, and when
one node's raylet is killed mid-job the replica on the other node serves the dead one's
lines: a complete, duplicate-free output from the one job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longquest.launch.cli import main
from tests.launch.ray_nodes import LocalRayCluster
from tests.tiny_models import make_tiny_model, save_char_tokenizer

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
SUMMARY = "[longquest] batch summary "
DOCS = 16  # enough work that the kill finds lines in flight on the killed node
MODEL_OPTIONS = [
    "--device", "cpu", "--dtype", "float32", "--page-size", "16", "--budget", "32",
    "--dense-layers", "1", "--cache-tokens", "2048", "--group-size", "2",
]  # fmt: skip


def _input(path: Path) -> Path:
    lines = [
        {"id": f"doc{i}", "prompt": f"document {i}: " + "lorem ipsum " * (6 + i),
         "max_tokens": 48, "ignore_eos": True}
        for i in range(DOCS)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _batch_on(cluster: LocalRayCluster, model: Path, src: Path, dst: Path, log: Path):
    """``longquest batch`` as its own process, a driver joining ``cluster``; its stderr
    goes to ``log`` (a pipe left unread could fill and stall it)."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "longquest.launch.cli", "batch", "--model", str(model),
        "--input", str(src), "--output", str(dst), "--launcher", "ray",
        "--data-parallel-size", "2", "--world-size", "2", *MODEL_OPTIONS,
    ]  # fmt: skip
    with open(log, "wb") as stderr:
        return subprocess.Popen(command, env=env, stderr=stderr)


def _summary(log: Path) -> dict:
    (line,) = [x for x in log.read_text().splitlines() if x.startswith(SUMMARY)]
    return json.loads(line.removeprefix(SUMMARY))


@pytest.mark.slow
def test_two_replicas_on_two_nodes_answer_once_when_one_node_dies(tmp_path):
    model = save_char_tokenizer(make_tiny_model(tmp_path / "model", architecture="llama2"))
    src, dst, want = _input(tmp_path / "docs.jsonl"), tmp_path / "out.jsonl", tmp_path / "one.jsonl"
    argv = ["batch", "--model", str(model), "--input", str(src), "--output", str(want)]
    assert main([*argv, *MODEL_OPTIONS]) == 0
    expected = {row["id"]: row["text"] for row in _rows(want)}

    # The head holds no CPU slot: a replica of two 1-slot actors fits only on a 2-slot
    # node, so each worker node gets one replica.
    log = tmp_path / "job.log"
    with LocalRayCluster(num_cpus=0) as cluster:
        nodes = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
        node_ids = cluster.node_ids()
        job = _batch_on(cluster, model, src, dst, log)
        try:
            deadline = time.monotonic() + 240
            while len(_rows(dst)) < 2 and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert job.poll() is None, f"the job ended before the kill: {log.read_text()[-2000:]}"
            cluster.kill_node(nodes[0])
            job.wait(timeout=240)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert job.returncode == 0, log.read_text()[-3000:]

    rows = _rows(dst)
    assert sorted(row["id"] for row in rows) == sorted(expected)  # all, each once
    assert {row["id"]: row["text"] for row in rows} == expected
    # Each replica's two actors on one node, one replica a node; the one on the killed
    # node was lost and the other served the rest.
    replicas = {tuple(r["nodes"]): r for r in _summary(log)["replicas"]}
    killed, kept = (node_ids[n] for n in nodes)
    assert sorted(replicas) == sorted([(killed, killed), (kept, kept)])
    assert replicas[killed, killed]["lost"] and not replicas[kept, kept]["lost"]
    assert replicas[kept, kept]["lines"] + replicas[killed, killed]["lines"] == DOCS
    handed = re.search(r"replica \d lost .*; (\d+) of its lines go to", log.read_text())
    assert handed and int(handed[1]) >= 1  # it had lines in flight, served by the other
