"""A long-document QA job: D documents x Q questions, prefix caching on, off, and transformers.

Every prompt is one document's L tokens followed by a distinct short question; every answer
is ``--max-tokens`` greedy tokens (EOS ignored). One run times, on the same model:

- the engine with prefix caching on, then off: all D x Q prompts in one ``generate`` call
  (``LLMEngine.generate``, the call ``LLM.generate`` makes on one device for token ids);
- transformers ``generate`` (SDPA, dynamic cache) on the same weights (shared tensors, see
  ``benchmarks/hf_reference.py``), one prompt at a time; on ``--hf-prompts`` of them when
  the whole job would take too long, the job's time extrapolated per prompt.

Reported per mode: job wall time, documents x questions per hour, prompt tokens computed and
taken from the cache (``RequestOutput.cached_prompt_tokens``); the ratios; and the target
"prefill tokens computed <= 1.05 x (D x L + question tokens)".

Other cases (one per run):
  --distinct N    N distinct prompts of --context tokens, caching on against off, engines
                  built afresh for each run in ABBA order (target: on within 3% of off)
  --prefill-only  one prompt per --contexts: the engine's exact prefill (per --chunks)
                  against one transformers forward, with MFU (as benchmarks/prefill.py)

    python benchmarks/batch_job.py                    # GPU: random Llama-3.1-8B shape, bf16
    python benchmarks/batch_job.py --distinct 32 --context 32768
    python benchmarks/batch_job.py --prefill-only --contexts 65536 131072
    python benchmarks/batch_job.py --smoke            # CPU: SmolLM2-135M, fp32, D=2 Q=8 L=3000

Without the engine's ``prefix_caching`` switch only the caching-off engine runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, write_result  # noqa: E402
from benchmarks.hf_reference import (  # noqa: E402
    hf_generate,
    hf_logprobs,
    hf_prefill_seconds,
    transformers_twin,
)
from benchmarks.job_engine import (  # noqa: E402
    Setup,
    cache_pages,
    engine_summary,
    job_prompts,
    load_setup,
    make_engine,
    random_tokens,
    release,
    timed_generate,
    warm_up,
)
from benchmarks.prefill import MODEL_FLOPS, Bench, model_flops, peak_matmul_tflops  # noqa: E402
from longquest.engine.cache import pages_for  # noqa: E402
from longquest.engine.config import SamplingParams  # noqa: E402
from longquest.engine.engine import LLMEngine  # noqa: E402

ON, OFF, HF = "engine, prefix caching on", "engine, prefix caching off", "transformers"
PREFILL_SLACK = 1.05  # computed prompt tokens may exceed the unshared ones by 5%
DISTINCT_SLACK = 0.03  # with nothing shared, caching on may take 3% longer than off
MFU_TARGET = 0.65


def engine_modes() -> list[tuple[str, bool | None]]:
    """``(mode, prefix_caching)`` of the engine's two modes."""
    return [(ON, True), (OFF, False)]


def warm_tokens(args: argparse.Namespace) -> int:
    """A warm-up prompt as long as a document: every chunk shape of the job's prefills is
    seen once before the clock starts (cuDNN builds a plan per new shape), in each mode
    alike, as in a job of many documents."""
    return args.context + 16


def model_check(engine: LLMEngine, twin: torch.nn.Module, setup: Setup, *, tokens: int) -> dict:
    """Whether the engine and its transformers twin pick the same next token of one prompt,
    and how far apart their log-probabilities of that token are."""
    prompt = random_tokens(tokens, vocab=setup.config.vocab_size, seed=11)
    (out,) = engine.generate([prompt], [SamplingParams(max_tokens=1, logprobs=1)])
    token = out.token_ids[0]
    theirs = hf_logprobs(twin, prompt)
    diff = abs(out.logprobs[0][token] - float(theirs[token]))
    return {"prompt_tokens": tokens, "same_next_token": int(theirs.argmax()) == token,
            "logprob_abs_diff": round(diff, 5)}  # fmt: skip


def hf_job(
    twin: torch.nn.Module,
    prompts: list[list[int]],
    *,
    args: argparse.Namespace,
    reference: list | None,
) -> dict:
    """transformers on evenly spaced prompts until ``--hf-prompts`` or ``--hf-budget-s``;
    the job's time is the mean per prompt times the job's prompts."""
    total = len(prompts)
    count = total if args.hf_prompts in (0, None) else min(args.hf_prompts, total)
    picks = sorted({round(i * total / count) for i in range(count)})
    hf_generate(twin, prompts[0][:256], max_new_tokens=4)  # warm-up
    times, same = [], 0
    for index in picks:
        seconds, tokens = hf_generate(twin, prompts[index], max_new_tokens=args.max_tokens)
        times.append(seconds)
        same += reference is not None and tokens == reference[index]
        if sum(times) > args.hf_budget_s:
            break
    per_prompt = statistics.mean(times)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "wall_seconds": round(per_prompt * total, 3), "extrapolated": len(times) < total,
        "seconds_per_prompt": round(per_prompt, 3), "prompts_timed": len(times),
        "doc_questions_per_hour": round(3600 / per_prompt, 1), "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": 0, "prefill_tokens_computed": prompt_tokens,
        "same_answers_as_caching_off": same if reference is not None else None,
    }  # fmt: skip


def ratios(modes: dict) -> dict:
    """Wall-time ratios of caching on to off and to transformers (below 1: on is faster)."""
    wall = {name: mode["wall_seconds"] for name, mode in modes.items()}
    on = wall.get(ON)

    def over(other: str) -> float | None:
        return round(on / wall[other], 4) if on and wall.get(other) else None

    return {"on_over_off": over(OFF), "on_over_hf": over(HF)}


def job_case(setup: Setup, args: argparse.Namespace) -> dict:
    """The job in every mode; the result's fields for the JSON."""
    prompts = job_prompts(documents=args.documents, questions=args.questions,
                          context=args.context, question_tokens=args.question_tokens,
                          vocab=setup.config.vocab_size)  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    pages = cache_pages(setup, prompts=prompts, max_tokens=args.max_tokens,
                        cache_tokens=args.cache_tokens, reserve_gib=args.reserve_gib)  # fmt: skip
    twin = None if args.no_hf else transformers_twin(setup.model, hf_config=setup.hf_config)
    modes, answers, check = {}, {}, None
    for name, caching in engine_modes():
        engine = make_engine(setup, pages=pages, chunk=args.chunk, prefix_caching=caching)
        warm_up(engine, setup, tokens=warm_tokens(args), rows=len(prompts))
        if twin is not None and check is None:
            check = model_check(engine, twin, setup, tokens=min(args.context, 1024))
        call = timed_generate(engine, setup, prompts, params)
        modes[name] = engine_summary(call, jobs=len(prompts))
        answers[name] = [o.token_ids for o in call.outputs]
        print(f"{name}: {call.seconds:.2f} s", flush=True)
        del engine, call
        release(setup)
    reference = answers.get(OFF)
    for name, mode in modes.items():
        mode["same_answers_as_caching_off"] = sum(a == b for a, b in zip(answers[name], reference))
    if twin is not None:
        modes[HF] = hf_job(twin, prompts, args=args, reference=reference)
    unshared = args.documents * args.context + len(prompts) * args.question_tokens
    computed = modes[ON]["prefill_tokens_computed"] if ON in modes else None
    return {
        "documents": args.documents, "questions": args.questions, "context": args.context,
        "question_tokens": args.question_tokens, "max_tokens": args.max_tokens,
        "prefill_chunk_tokens": args.chunk, "cache_pages": pages,
        "hf_prompts_timed": modes[HF]["prompts_timed"] if HF in modes else 0,
        "model_check": check, "modes": modes, "ratios": ratios(modes),
        "prefill_target": {
            "rule": f"caching on computes <= {PREFILL_SLACK} x (D x L + question tokens)",
            "limit_tokens": round(PREFILL_SLACK * unshared), "computed_tokens": computed,
            "met": None if computed is None else computed <= PREFILL_SLACK * unshared,
        },
    }  # fmt: skip


def distinct_case(setup: Setup, args: argparse.Namespace) -> dict:
    """``--distinct`` prompts sharing nothing, each engine mode built afresh per run, ABBA."""
    prompts = [random_tokens(args.context, vocab=setup.config.vocab_size, seed=2_000 + i)
               for i in range(args.distinct)]  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    pages = cache_pages(setup, prompts=prompts, max_tokens=args.max_tokens,
                        cache_tokens=args.cache_tokens, reserve_gib=args.reserve_gib)  # fmt: skip
    modes, runs = engine_modes(), []
    for repeat in range(args.repeats):
        for name, caching in modes if repeat % 2 == 0 else modes[::-1]:
            engine = make_engine(setup, pages=pages, chunk=args.chunk, prefix_caching=caching)
            warm_up(engine, setup, tokens=warm_tokens(args), rows=len(prompts))
            call = timed_generate(engine, setup, prompts, params)
            runs.append({"mode": name, "repeat": repeat, **engine_summary(call, jobs=len(prompts))})
            print(f"{name} (run {repeat}): {call.seconds:.2f} s", flush=True)
            del engine, call
            release(setup)
    mean = {name: statistics.mean(r["wall_seconds"] for r in runs if r["mode"] == name)
            for name, _ in modes}  # fmt: skip
    ratio = round(mean[ON] / mean[OFF], 4) if ON in mean else None
    return {
        "prompts": args.distinct, "context": args.context, "max_tokens": args.max_tokens,
        "prefill_chunk_tokens": args.chunk, "cache_pages": pages, "repeats": args.repeats,
        "runs": runs, "mean_wall_seconds": {k: round(v, 3) for k, v in mean.items()},
        "on_over_off": ratio,
        "target": {"rule": f"caching on takes at most {DISTINCT_SLACK:.0%} longer than off",
                   "met": None if ratio is None else ratio <= 1 + DISTINCT_SLACK},
    }  # fmt: skip


def prefill_row(*, runner: str, chunk: int | None, tokens: int, seconds: float,
                flops: float, peak_tflops: float, peak_gib: float | None) -> dict:  # fmt: skip
    """One timed prefill of ``tokens`` tokens: speed, MFU and peak memory (weights included)."""
    return {"context": tokens, "runner": runner, "chunk": chunk, "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1),
            "mfu": round(flops / (seconds * peak_tflops * 1e12), 4),
            "peak_memory_gib": None if peak_gib is None else round(peak_gib, 2)}  # fmt: skip


def hf_prefill_row(twin: torch.nn.Module, setup: Setup, prompt: list[int], **row) -> dict:
    """transformers' forward over ``prompt`` after a short warm-up forward."""
    hf_prefill_seconds(twin, prompt[:1024])
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    seconds = hf_prefill_seconds(twin, prompt)
    peak = torch.cuda.max_memory_allocated(setup.device) / 2**30 if setup.cuda else None
    return prefill_row(runner=HF, chunk=None, seconds=seconds, peak_gib=peak, **row)


def prefill_case(setup: Setup, args: argparse.Namespace) -> dict:
    """Exact prefill of one prompt per context: the engine at each chunk size, transformers."""
    # peak_matmul_tflops reads only the device of its Bench: no process group is needed.
    peak_tflops = peak_matmul_tflops(Bench(device=setup.device, group=None, rank=0, world=1))
    twin = None if args.no_hf else transformers_twin(setup.model, hf_config=setup.hf_config)
    chunks = sorted(set(args.chunks) | {args.chunk})
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    rows = []
    for tokens in args.contexts:
        prompt = random_tokens(tokens, vocab=setup.config.vocab_size, seed=3_000 + tokens)
        flops, _ = model_flops(config=setup.config, model=setup.model, tokens=tokens)
        row = dict(tokens=tokens, flops=flops, peak_tflops=peak_tflops)
        for chunk in chunks:
            engine = make_engine(setup, pages=pages_for(tokens + 1, setup.quest.page_size),
                                 chunk=chunk, prefix_caching=None)  # fmt: skip
            if setup.cuda:  # compile the kernels and build cuDNN's plans for these shapes
                warm = random_tokens(tokens, vocab=setup.config.vocab_size, seed=7)
                engine.generate([warm], [one])
            call = timed_generate(engine, setup, [prompt], one)
            rows.append(prefill_row(runner="engine", chunk=chunk, seconds=call.seconds,
                                    peak_gib=call.peak_gib, **row))  # fmt: skip
            rows[-1]["engine_prefill_seconds"] = round(call.outputs[0].prefill_seconds, 3)
            print(f"engine {tokens} chunk {chunk}: {call.seconds:.2f} s", flush=True)
            del engine, call
            release(setup)
        if twin is not None:
            rows.append(hf_prefill_row(twin, setup, prompt, **row))
            print(f"transformers {tokens}: {rows[-1]['seconds']:.2f} s", flush=True)
            release(setup)
    default = {
        r["context"]: r for r in rows if r["runner"] == "engine" and r["chunk"] == args.chunk
    }
    hf = {r["context"]: r for r in rows if r["runner"] == HF}
    longest = max(args.contexts)
    return {
        "contexts": args.contexts, "chunks": chunks, "peak_tflops": round(peak_tflops, 1),
        "engine_prefix_caching": "the engine's default",
        "model_flops": MODEL_FLOPS, "hf_call": "model(input_ids, use_cache=True, logits_to_keep=1)",
        "rows": rows,
        "targets": {
            "chunk": args.chunk,
            "engine_not_slower_than_hf": {str(c): default[c]["seconds"] <= hf[c]["seconds"]
                                          for c in hf},
            f"mfu_at_{longest}": default[longest]["mfu"], "mfu_target": MFU_TARGET,
            "mfu_met": default[longest]["mfu"] >= MFU_TARGET,
        },
    }  # fmt: skip


def print_result(case: str, result: dict) -> None:
    if case == "prefill":
        print_table(result["rows"], ["context", "runner", "chunk", "seconds", "mfu"])
        print("targets:", result["targets"])
    elif case == "distinct":
        print_table(result["runs"], ["mode", "repeat", "wall_seconds", "prefill_tokens_computed"])
        print("on / off:", result["on_over_off"], "target:", result["target"])
    else:
        rows = [{"mode": name, **mode} for name, mode in result["modes"].items()]
        print_table(rows, ["mode", "wall_seconds", "doc_questions_per_hour", "prompt_tokens",
                           "prefill_tokens_computed", "same_answers_as_caching_off"])  # fmt: skip
        print("ratios:", result["ratios"], "prefill target:", result["prefill_target"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--smoke", action="store_true", help="CPU, SmolLM2-135M (demo asset), fp32, torch kernels")
    add("--model-dir", type=Path, help="a model directory instead of random 8B-shaped weights")
    add("--documents", type=int, default=2)
    add("--questions", type=int, help="questions a document (16; --smoke 8)")
    add("--context", type=int, help="document tokens (65536; --smoke 3000)")
    add("--question-tokens", type=int, default=32)
    add("--max-tokens", type=int, default=64, help="answer tokens (EOS ignored)")
    add("--chunk", type=int, default=8192, help="the engine's prefill_chunk_tokens")
    add("--cache-tokens", type=int, help="KV cache size (default: all requests, or what fits)")
    add("--reserve-gib", type=float, default=16.0, help="GPU memory kept from the KV cache")
    add("--no-hf", action="store_true", help="skip transformers")
    add("--hf-prompts", type=int, default=8, help="transformers prompts timed (0: all)")
    add("--hf-budget-s", type=float, default=240.0, help="stop timing transformers past this")
    add("--distinct", type=int, metavar="N", help="the no-shared-prefix case with N prompts")
    add("--repeats", type=int, default=2, help="--distinct runs a mode (ABBA order)")
    add("--prefill-only", action="store_true", help="the prefill case (engine vs transformers)")
    add("--contexts", type=int, nargs="+", help="prefill case (65536 131072; --smoke 2048)")
    add("--chunks", type=int, nargs="+", help="prefill case (8192 16384 32768; --smoke 512)")
    add("--impl", choices=("triton", "torch"), help="kernels (default: the engine's)")
    add("--label", default="", help="added to the result file's name")
    add("--out-dir", default=None, help="default benchmarks/results")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.questions = args.questions or (8 if smoke else 16)
    args.context = args.context or (3000 if smoke else 65536)
    args.contexts = args.contexts or ([2048] if smoke else [65536, 131072])
    args.chunks = args.chunks or ([512] if smoke else [8192, 16384, 32768])
    args.impl = "torch" if smoke else args.impl
    counts = [args.documents, args.questions, args.context, args.question_tokens,
              args.max_tokens, args.chunk, args.repeats, args.distinct or 1, *args.contexts,
              *args.chunks]  # fmt: skip
    if min(counts) < 1:
        parser.error("sizes, counts and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model_dir = args.model_dir
    if args.smoke and model_dir is None:
        from longquest.launch.assets import ensure_demo_model

        model_dir = ensure_demo_model()
    setup = load_setup(model_dir=model_dir, device=device, impl=args.impl)
    case = "prefill" if args.prefill_only else "distinct" if args.distinct else "job"
    run = {"prefill": prefill_case, "distinct": distinct_case, "job": job_case}[case]
    result = run(setup, args)
    print_result(case, result)
    name = "batch-job" + ("" if case == "job" else f"-{case}")
    name += f"-{args.label}" if args.label else ""
    payload = {
        "case": case, "model": setup.description, "dtype": str(setup.dtype).removeprefix("torch."),
        "impl": setup.impl, "smoke": args.smoke, "argv": sys.argv[1:] if argv is None else argv,
        "model_config": {k: v for k, v in vars(setup.config).items() if isinstance(v, int)},
        "quest": dataclasses.asdict(setup.quest),
        "user_path": "LLMEngine.generate with every prompt in one call (LLM.generate's call on "
                     "one device, once prompts are token ids)",
        **result,
    }  # fmt: skip
    print("wrote", write_result(name, payload, out_dir=args.out_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
