"""``ray job submit`` as the README shows it: a local head with its dashboard (the Jobs
API), the project uploaded as the working directory, ``longquest batch`` as the
entrypoint. The output lands at the absolute path the command named; a relative
``--output`` is refused with a message that says what to give instead."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longquest.launch.cli import main
from longquest.launch.ray_job import (
    JOB_CONFIG_VARIABLE,
    RayJob,
    check_job_paths,
    current_ray_job,
)
from tests.tiny_models import make_tiny_model, save_char_tokenizer

REPO = Path(__file__).resolve().parents[2]
JOB_CONFIG = {
    "runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"},
    "metadata": {"job_submission_id": "raysubmit_abc"},
}


def test_the_driver_of_a_ray_job_knows_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = current_ray_job({JOB_CONFIG_VARIABLE: json.dumps(JOB_CONFIG)})
    assert job == RayJob(submission_id="raysubmit_abc", working_dir=tmp_path)
    bare = {"runtime_env": {}, "metadata": {}}
    assert current_ray_job({JOB_CONFIG_VARIABLE: json.dumps(bare)}).working_dir is None
    assert current_ray_job({"RAY_ADDRESS": "127.0.0.1:6379"}) is None


def test_paths_a_ray_job_refuses(tmp_path):
    job = RayJob(submission_id="raysubmit_abc", working_dir=tmp_path)
    absolute = tmp_path / "answers.jsonl"
    check_job_paths(input_path="docs.jsonl", output_path=absolute, job=job)
    check_job_paths(input_path="data/docs.jsonl", output_path=absolute, job=job)
    check_job_paths(input_path="/shared/docs.jsonl", output_path=absolute, job=job)
    check_job_paths(input_path="docs.jsonl", output_path="answers.jsonl", job=None)
    with pytest.raises(ValueError, match="--output answers.jsonl is a relative path.*absolute"):
        check_job_paths(input_path="docs.jsonl", output_path="answers.jsonl", job=job)
    with pytest.raises(ValueError, match="outside the uploaded working directory.*absolute"):
        check_job_paths(input_path="../docs.jsonl", output_path=absolute, job=job)
    no_upload = RayJob(submission_id="", working_dir=None)
    with pytest.raises(ValueError, match="no working directory was uploaded"):
        check_job_paths(input_path="docs.jsonl", output_path=absolute, job=no_upload)


def test_the_cli_refuses_a_relative_output_in_a_ray_job(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(JOB_CONFIG_VARIABLE, json.dumps(JOB_CONFIG))
    (tmp_path / "docs.jsonl").write_text('{"id": 1, "prompt": "x"}\n')
    argv = ["batch", "--model", str(tmp_path), "--input", "docs.jsonl", "--output", "out.jsonl"]
    assert main(argv) == 2
    assert "storage every node sees" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    pytest.importorskip("ray.dashboard.optional_deps", reason="needs ray[default]")
    from tests.launch.ray_nodes import LocalRayCluster

    with LocalRayCluster(num_cpus=2, dashboard=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The directory a user submits from: this checkout's package and an input file."""
    directory = tmp_path_factory.mktemp("project")
    shutil.copytree(
        REPO / "longquest", directory / "longquest",
        ignore=shutil.ignore_patterns("__pycache__"),
    )  # fmt: skip
    lines = [{"id": f"doc{i}", "prompt": f"document {i} " * 4, "max_tokens": 3} for i in range(3)]
    (directory / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def submit(head, project: Path, model: Path, output: str) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir PROJECT -- longquest batch ...`` (the README's
    shape), waiting for the job to end."""
    longquest = shutil.which("longquest")
    if longquest is None:
        pytest.skip("the longquest command is not installed (bash scripts/setup.sh)")
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
        "--address", head.dashboard_url, "--working-dir", str(project), "--",
        "longquest", "batch", "--model", str(model), "--input", "docs.jsonl",
        "--output", output, "--launcher", "ray", "--world-size", "1", "--device", "cpu",
        "--dtype", "float32", "--page-size", "16", "--budget", "32", "--dense-layers", "1",
        "--cache-tokens", "1024",
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=head.env, timeout=300)


@pytest.mark.slow
def test_ray_job_submit_writes_where_the_command_says(head, project, tmp_path):
    model = save_char_tokenizer(make_tiny_model(tmp_path / "model", architecture="llama2"))
    output = tmp_path / "answers.jsonl"
    done = submit(head, project, model, str(output))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["doc0", "doc1", "doc2"]
    assert all("text" in row for row in rows)

    refused = submit(head, project, model, "answers.jsonl")
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "--output answers.jsonl is a relative path" in said
    assert "storage every node sees" in said
