"""Batch jobs submitted with ``ray job submit``: where their files may live.

Ray runs a submitted command (the job's driver) on a node of the cluster, in a temporary
copy of the ``--working-dir`` it uploaded, and deletes that copy with the job. A
relative ``--output`` would be written there, out of the user's sight and lost with the
job, and a relative ``--input`` names a file only if it was uploaded with the working
directory. So inside a job the output needs an absolute path on storage every node sees.

Ray tells a job's driver that it is one through the environment variable
``RAY_JOB_CONFIG_JSON_ENV_VAR`` (the job's runtime environment and metadata as JSON);
it sets no ``RAY_JOB_ID`` or submission id variable of its own in the driver.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass(frozen=True, kw_only=True)
class RayJob:
    """The Ray job this process is the driver of.

    submission_id: the id ``ray job submit`` printed (``raysubmit_...``), or "" if unknown.
    working_dir: the driver's copy of the uploaded working directory (its working
        directory), or None when the job was submitted without ``--working-dir``.
    """

    submission_id: str
    working_dir: Path | None


def current_ray_job(environ: dict[str, str] | None = None) -> RayJob | None:
    """The Ray job this process drives, read from the environment Ray gives a job's
    driver; None outside a Ray job."""
    environ = os.environ if environ is None else environ
    raw = environ.get(JOB_CONFIG_VARIABLE)
    if raw is None:
        return None
    try:
        job_config = json.loads(raw)
    except json.JSONDecodeError:
        job_config = {}
    runtime_env = job_config.get("runtime_env") or {}
    metadata = job_config.get("metadata") or {}
    return RayJob(
        submission_id=str(metadata.get("job_submission_id", "")),
        working_dir=Path.cwd() if runtime_env.get("working_dir") else None,
    )


def check_job_paths(*, input_path: str | Path, output_path: str | Path, job: RayJob | None) -> None:
    """Refuse, inside a Ray job, an output path that is relative and an input path that
    is relative but not inside the uploaded working directory; outside one (``job`` is
    None), accept anything. Raises ValueError with what to give instead."""
    if job is None:
        return
    where = f"inside a Ray job ({job.submission_id or 'ray job submit'})"
    shared = "give an absolute path on storage every node sees (e.g. /shared/{})"
    if not Path(output_path).is_absolute():
        raise ValueError(
            f"--output {output_path} is a relative path: {where} it would be written into "
            "Ray's temporary copy of the working directory, on the node that runs the "
            f"job, and deleted with it; {shared.format('answers.jsonl')}"
        )
    input_path = Path(input_path)
    if input_path.is_absolute():
        return
    root = job.working_dir
    if root is None or not (root / input_path).resolve().is_relative_to(root.resolve()):
        uploaded = (
            "no working directory was uploaded (ray job submit --working-dir)"
            if root is None
            else "it is outside the uploaded working directory"
        )
        raise ValueError(
            f"--input {input_path} is a relative path and {uploaded}: {where} it does not "
            f"name your file; {shared.format('docs.jsonl')}"
        )
