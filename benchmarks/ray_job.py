"""A batch job over Ray replicas on the CPU: job time per layout of 4 actors in all.

    python benchmarks/ray_job.py                         # 32 documents of ~2K tokens
    python benchmarks/ray_job.py --docs 4 --context 256  # a quick look (about a minute)

The same job (``--docs`` documents of about ``--context`` tokens, one question each,
``--max-tokens`` greedy tokens) runs once per layout, ``R x W`` = replicas x actors per
replica (default 1x4, 2x2, 4x1), in one Ray runtime of 4 CPU slots, with the demo's
SmolLM2-135M-Instruct (fp32, CPU actors, gloo between the ranks of a replica). Start-up
(actors, model loading) is timed apart from the job (``run_batch`` over the replicas).
Reads the demo model from the cache (``longquest demo`` prepares it). Writes
benchmarks/results/ray-job-<device>-<date>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_result  # noqa: E402
from longquest.engine.config import (  # noqa: E402
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    QuestConfig,
)

WORDS = (
    "river stone lantern orchard copper meadow harbor violet summit thistle ember willow "
    "quarry saffron glacier falcon"
).split()


def document(index: int, tokens: int, tokenizer) -> str:
    """A document of about ``tokens`` tokens; its words depend on ``index``."""
    words, step = [], max(8, tokens // 8)
    while True:
        words += [WORDS[(index * 7 + i * (index + 3)) % len(WORDS)] for i in range(step)]
        text = f"Document {index}. " + " ".join(words) + "."
        if len(tokenizer.encode(text)) >= tokens:
            return text


def write_job(path: Path, *, docs: int, context: int, max_tokens: int, tokenizer) -> None:
    with open(path, "w") as out:
        for index in range(docs):
            prompt = document(index, context, tokenizer) + f"\nWhich word opens document {index}?"
            line = {"id": f"doc{index}", "prompt": prompt, "max_tokens": max_tokens,
                    "ignore_eos": True}  # fmt: skip
            out.write(json.dumps(line) + "\n")


def run_layout(config: EngineConfig, job: Path, *, group_size: int) -> dict:
    from longquest.launch.api import LLM
    from longquest.launch.batch import run_batch

    start = time.perf_counter()
    llm = LLM(config=config)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            summary = run_batch(
                input_path=job, output_path=Path(scratch) / "out.jsonl",
                replicas=llm.replicas, tokenizer=llm.tokenizer, group_size=group_size,
                progress=False,
            )  # fmt: skip
    finally:
        llm.shutdown()
    job_s = time.perf_counter() - started
    return {
        "replicas": config.parallel.data_parallel_size,
        "world_size": config.parallel.world_size,
        "startup_s": round(started - start, 2),
        "job_s": round(job_s, 2),
        "lines": summary["served"],
        "errors": summary["errors"],
        "tokens": summary["tokens"],
        "prefill_tokens": summary["prefill_tokens"],
        "lines_per_minute": round(60 * summary["served"] / job_s, 2),
        "per_replica": summary["replicas"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=32, help="documents, one question each")
    parser.add_argument("--context", type=int, default=2048, help="tokens per document")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated a line")
    parser.add_argument("--layouts", default="1x4,2x2,4x1", help="RxW,... (replicas x actors)")
    parser.add_argument("--group-size", type=int, default=4, help="requests in flight a replica")
    parser.add_argument("--budget", type=int, default=256, help="Quest token budget")
    parser.add_argument("--out-dir", default=None, help="results folder (benchmarks/results)")
    args = parser.parse_args(argv)

    import ray

    from longquest.engine.tokenizer import Tokenizer
    from longquest.launch.assets import ensure_demo_model

    model = ensure_demo_model()
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    actors = max(r * w for r, w in layouts)
    rows = []
    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            job = Path(scratch) / "job.jsonl"
            write_job(job, docs=args.docs, context=args.context, max_tokens=args.max_tokens,
                      tokenizer=Tokenizer(str(model)))  # fmt: skip
            for replicas, world_size in layouts:
                config = EngineConfig(
                    model=str(model), dtype="float32", device="cpu", impl="torch",
                    quest=QuestConfig(page_size=16, token_budget=args.budget),
                    cache=CacheConfig(max_tokens=args.group_size * (args.context + 256)),
                    parallel=ParallelConfig(world_size=world_size, data_parallel_size=replicas,
                                            launcher="ray"),
                )  # fmt: skip
                rows.append(run_layout(config, job, group_size=args.group_size))
                print(f"[ray_job] {replicas}x{world_size}: {rows[-1]['job_s']} s", flush=True)
    finally:
        ray.shutdown()
    print_table(rows, ["replicas", "world_size", "startup_s", "job_s", "lines_per_minute",
                       "tokens", "prefill_tokens", "errors"])  # fmt: skip
    settings = {k: getattr(args, k) for k in ("docs", "context", "max_tokens", "group_size",
                                             "budget")}  # fmt: skip
    path = write_result("ray-job", {"config": {**settings, "model": "SmolLM2-135M-Instruct",
                                               "actors": actors}, "results": rows},
                        out_dir=args.out_dir)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
