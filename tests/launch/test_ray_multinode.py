"""A two-node Ray cluster on this machine (a head and a second raylet with resources of
its own): ``longquest batch --launcher ray --world-size 2`` with CPU actors over gloo
places its group on one node, answers as one device does, and after that node's raylet
is killed mid-job, a rerun on a fresh node resumes to a complete, duplicate-free output.
"""

from __future__ import annotations

import json
import os
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
DOCS = 12  # long enough (about 10 s on 2 cores) for the kill to land mid-job
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
        "--input", str(src), "--output", str(dst), "--launcher", "ray", "--world-size", "2",
        *MODEL_OPTIONS,
    ]  # fmt: skip
    with open(log, "wb") as stderr:
        return subprocess.Popen(command, env=env, stderr=stderr)


def _rank_worker_nodes(cluster: LocalRayCluster) -> dict[str, set[str]]:
    """Each job's set of nodes its rank actors ran on."""
    nodes: dict[str, set[str]] = {}
    for job, node in cluster.actor_nodes("RankWorker"):
        nodes.setdefault(job, set()).add(node)
    return nodes


@pytest.mark.slow
def test_two_node_cluster_places_answers_and_resumes_after_a_node_dies(tmp_path):
    model = save_char_tokenizer(make_tiny_model(tmp_path / "model", architecture="llama2"))
    src, dst, want = _input(tmp_path / "docs.jsonl"), tmp_path / "out.jsonl", tmp_path / "one.jsonl"
    argv = ["batch", "--model", str(model), "--input", str(src), "--output", str(want)]
    assert main([*argv, *MODEL_OPTIONS]) == 0
    expected = {row["id"]: row["text"] for row in _rows(want)}

    # The head holds one CPU: a group of two 1-CPU actors fits only on a 2-CPU node.
    log, jobs = tmp_path / "job.log", []
    with LocalRayCluster(num_cpus=1) as cluster:
        try:
            first = cluster.add_node(num_cpus=2, resources={"second_node": 1})
            jobs.append(job := _batch_on(cluster, model, src, dst, log))
            deadline = time.monotonic() + 240
            while len(_rows(dst)) < 1 and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert job.poll() is None, f"the job ended before the kill: {log.read_text()[-2000:]}"
            cluster.kill_node(first)
            job.wait(timeout=180)
            assert job.returncode == 1, log.read_text()[-3000:]
            # The job's one replica died with the node: the job ends, its rows kept.
            assert "every replica failed" in log.read_text()
            served = [row["id"] for row in _rows(dst)]
            assert 1 <= len(served) < DOCS and len(set(served)) == len(served)

            second = cluster.add_node(num_cpus=2)
            jobs.append(job := _batch_on(cluster, model, src, dst, log))
            job.wait(timeout=300)
            assert job.returncode == 0, log.read_text()[-3000:]
            node_ids = cluster.node_ids()
            placed = _rank_worker_nodes(cluster)
        finally:
            for job in jobs:
                if job.poll() is None:
                    job.kill()
                    job.wait()

    rows = _rows(dst)
    assert sorted(row["id"] for row in rows) == sorted(expected)  # all, each once
    assert {row["id"]: row["text"] for row in rows} == expected
    # Each job's group on one node: the first on the node that was killed, the rerun
    # on the node that replaced it.
    assert sorted(map(sorted, placed.values())) == sorted([[node_ids[first]], [node_ids[second]]])
