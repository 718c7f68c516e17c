"""Where a long-document job's time goes outside prefill: the job of ``batch_job.py`` (caching
on) with every engine phase timed (synchronized) and the host profiled.

    python benchmarks/job_profile.py --documents 2 --questions 16 --context 65536
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.job_engine import (  # noqa: E402
    cache_pages,
    job_prompts,
    load_setup,
    make_engine,
    warm_up,
)
from longquest.engine import decode_batch as decode_batch_module  # noqa: E402
from longquest.engine.config import SamplingParams  # noqa: E402

TOTALS: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])


def timed(name, fn, *, cuda):
    def wrapper(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
            entry = TOTALS[name]
            entry[0] += time.perf_counter() - start
            entry[1] += 1

    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--caching", choices=["on", "off"], default="on")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    setup = load_setup(model_dir=None, device=device, impl=None)
    prompts = job_prompts(documents=args.documents, questions=args.questions,
                          context=args.context, question_tokens=args.question_tokens,
                          vocab=setup.config.vocab_size)  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    pages = cache_pages(setup, prompts=prompts, max_tokens=args.max_tokens, cache_tokens=None,
                        reserve_gib=8.0)  # fmt: skip
    engine = make_engine(setup, pages=pages, chunk=args.chunk,
                         prefix_caching=args.caching == "on")  # fmt: skip
    warm_up(engine, setup, tokens=args.context, rows=len(prompts))
    for name in ("prefill", "decode", "admit", "release", "new_sequence"):
        setattr(engine, name, timed(name, getattr(engine, name), cuda=cuda))
    engine.admission.publish = timed("publish", engine.admission.publish, cuda=cuda)
    engine.ranks.prefill = timed("ranks.prefill", engine.ranks.prefill, cuda=cuda)
    run = decode_batch_module.DecodeBatch.run

    def run_timed(self, *, key, forward, capture=True):
        name = "graph replay" if key in self._graphs else ("eager+capture" if capture else "eager")
        return timed(f"batch.run {name} {key}", run, cuda=cuda)(
            self, key=key, forward=forward, capture=capture
        )

    decode_batch_module.DecodeBatch.run = run_timed
    profiler = cProfile.Profile()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    profiler.enable()
    engine.generate(prompts, [params] * len(prompts))
    profiler.disable()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    lines = [f"job {args.documents}x{args.questions}x{args.context} caching {args.caching}: "
             f"{wall:.2f} s"]  # fmt: skip
    for name, (seconds, count) in sorted(TOTALS.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {name:50s} {seconds:8.3f} s  x{count}")
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    report = "\n".join(lines) + "\n" + text.getvalue()
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
