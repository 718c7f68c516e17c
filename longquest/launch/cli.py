"""The ``longquest`` command line: ``generate`` one prompt, serve a ``batch`` file,
``plan`` which GPU layouts hold a model and a context, run the ``demo``.

Exit codes: 0 done, 2 bad input or usage (a one-line message), 130 interrupted (Ctrl-C),
1 anything else.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from longquest import __version__
from longquest.engine.config import (
    EngineConfig,
    QuestConfig,
)
from longquest.launch.demo import run_demo
from longquest.launch.options import (
    TENSOR_PARALLEL_HELP,
    add_model_arguments,
    add_sampling_arguments,
    engine_config_from_args,
    sampling_from_args,
)
from longquest.launch.plan_report import add_plan_parser


def summary_line(output, quest: QuestConfig) -> str:
    """One line: context, pages attended per step out of total, speed."""
    context = len(output.prompt_token_ids) + len(output.token_ids)
    mode = "dense" if quest.token_budget is None else f"quest budget {quest.token_budget}"
    return (
        f"[longquest] context {context} tokens | {mode} | pages attended per step "
        f"{output.pages_attended:.0f} of {output.pages_total:.0f} | prefill "
        f"{output.prefill_seconds:.2f} s | decode {output.decode_tokens_per_second:.1f} tok/s"
        f" | finish: {output.finish_reason}"
    )


def logprob_lines(output, decode) -> list[str]:
    """One line per generated token: the token, then each top token's log-probability."""
    lines = []
    for token, top in zip(output.token_ids, output.logprobs or []):
        ranked = sorted(top.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{decode([t])!r} {lp:.3f}" for t, lp in ranked)
        lines.append(f"[logprobs] {decode([token])!r}: {shown}")
    return lines


def read_prompt(args: argparse.Namespace) -> str:
    """The text of --prompt or --prompt-file; ValueError when there is none."""
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"--prompt-file {path} does not exist")
        prompt = path.read_text()
    else:
        prompt = args.prompt
    if not prompt:
        raise ValueError("the prompt is empty; give --prompt TEXT or --prompt-file F")
    return prompt


def cmd_generate(args: argparse.Namespace) -> int:
    from longquest.launch.api import LLM

    prompt = read_prompt(args)
    params = sampling_from_args(args)
    config = engine_config_from_args(args)
    llm = LLM(config=config)
    request = [{"role": "user", "content": prompt}] if args.chat else prompt
    (output,) = llm.generate([request], params)
    print(output.text)
    for line in logprob_lines(output, llm.tokenizer.decode):
        print(line, file=sys.stderr)
    print(summary_line(output, llm.config.quest), file=sys.stderr)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from longquest.launch.batch import check_batch_files, run_batch
    from longquest.launch.ray_job import check_job_paths, current_ray_job

    check_job_paths(input_path=args.input, output_path=args.output, job=current_ray_job())
    check_batch_files(input_path=args.input, output_path=args.output, group_size=args.group_size)
    if args.launcher == "local" and args.world_size != 1:
        raise ValueError("--launcher local runs one device; use ray or torchrun for --world-size")
    config = engine_config_from_args(
        args, world_size=args.world_size, tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size, launcher=args.launcher,
    )  # fmt: skip
    from longquest.launch.api import LLM, check_tensor_layout

    if args.launcher == "torchrun":
        check_tensor_layout(config)
        return _batch_with_torchrun(config, args)

    llm = LLM(config=config)
    # On Ray the replicas (one or more) are fed from the shared queue, one progress line
    # and one summary entry each.
    seam = {"replicas": llm.replicas} if args.launcher == "ray" else {"step": llm.step}
    try:
        summary = run_batch(
            input_path=args.input,
            output_path=args.output,
            **seam,
            tokenizer=llm.tokenizer,
            group_size=args.group_size,
            retry_errors=args.retry_errors,
        )
    finally:
        llm.shutdown()
    print(f"[longquest] batch summary {json.dumps(summary)}", file=sys.stderr)
    return 0


def _batch_with_torchrun(config: EngineConfig, args: argparse.Namespace) -> int:
    """Start ``world_size`` local ranks with torchrun, each serving the same file with
    ``config`` (carried as JSON)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={config.parallel.world_size}", "-m", "longquest.launch.torchrun",
        "--config-json", config.to_json(), "--input", args.input, "--output", args.output,
        "--group-size", str(args.group_size),
    ]  # fmt: skip
    command += ["--retry-errors"] if args.retry_errors else []
    return run_quietly_on_interrupt(command)


def run_quietly_on_interrupt(command: list[str]) -> int:
    """Run ``command`` in its own process group, its stderr passed through; on Ctrl-C,
    send it SIGINT, wait for it, drop what it prints while it stops (its ranks' and
    torchrun's own reports), and raise KeyboardInterrupt. SIGTERM and SIGHUP are passed
    on to the group, so the ranks stop with this process."""
    import os
    import signal
    import subprocess
    import threading

    child = subprocess.Popen(command, stderr=subprocess.PIPE, start_new_session=True)
    interrupted = threading.Event()
    last = [b"\n"]

    def relay() -> None:
        while chunk := os.read(child.stderr.fileno(), 65536):
            if not interrupted.is_set():
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                last[0] = chunk[-1:]

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    forwarded = (signal.SIGTERM, signal.SIGHUP)
    previous = {
        signum: signal.signal(signum, lambda signum, frame: os.killpg(child.pid, signum))
        for signum in forwarded
    }
    try:
        code = child.wait()
    except KeyboardInterrupt:
        interrupted.set()
        os.killpg(child.pid, signal.SIGINT)
        child.wait()
        if last[0] != b"\n":  # a progress bar's line, left unfinished
            sys.stderr.write("\n")
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:  # an exit other than Ctrl-C: leave no rank behind
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        relay_thread.join(timeout=5)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longquest", description="Quest sparse decoding for long contexts"
    )
    parser.add_argument("--version", action="version", version=f"longquest {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate from one prompt")
    add_model_arguments(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="a file holding the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    batch = commands.add_parser("batch", help="serve a JSONL file of requests (resumable)")
    add_model_arguments(batch)
    batch.add_argument("--input", required=True, help="JSONL: id, prompt|messages, sampling")
    batch.add_argument("--output", required=True, help="JSONL results; rerun to resume")
    batch.add_argument("--world-size", type=int, default=1,
                       help="ranks (GPUs) of one replica: tensor x sequence ranks (1)")  # fmt: skip
    batch.add_argument("--tensor-parallel-size", type=int, default=1, metavar="T",
                       help=TENSOR_PARALLEL_HELP)  # fmt: skip
    batch.add_argument("--data-parallel-size", type=int, default=1,
                       help="replicas of --world-size ranks each, fed from one queue "
                       "(--launcher ray; 1)")  # fmt: skip
    batch.add_argument("--launcher", default="local", choices=["local", "ray", "torchrun"])
    batch.add_argument("--group-size", type=int, default=8,
                       help="requests in the engine at once (a finished one's place is "
                       "refilled at once)")  # fmt: skip
    batch.add_argument("--retry-errors", action="store_true",
                       help="serve again the ids whose last row is an error")  # fmt: skip
    batch.set_defaults(func=cmd_batch)
    add_plan_parser(commands)

    # The demo's defaults live in run_demo's signature only.
    defaults = {
        name: param.default for name, param in inspect.signature(run_demo).parameters.items()
    }
    demo = commands.add_parser(
        "demo", help="passkey retrieval over long documents (no GPU)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    demo.add_argument("--trials", type=int, default=defaults["trials"],
                      help="documents, one pass key each")  # fmt: skip
    demo.add_argument("--context", type=int, default=defaults["context_tokens"],
                      help="tokens per document")  # fmt: skip
    demo.add_argument("--budget", type=int, default=defaults["token_budget"],
                      help="Quest token budget")  # fmt: skip
    demo.add_argument("--page-size", type=int, default=defaults["page_size"],
                      help="tokens a page (this small model needs small pages)")  # fmt: skip
    demo.add_argument("--world-size", type=int, default=defaults["world_size"],
                      help="sequence-parallel workers")  # fmt: skip
    demo.add_argument("--launcher", default=defaults["launcher"], choices=["ray", "local"],
                      help="Ray actors or local processes")  # fmt: skip
    demo.set_defaults(func=_cmd_demo)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(
        trials=args.trials,
        context_tokens=args.context,
        token_budget=args.budget,
        page_size=args.page_size,
        world_size=args.world_size,
        launcher=args.launcher,
    )


def interrupted_message(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind, and how to go on."""
    if args.command == "batch":
        return (
            f"[longquest] interrupted; the rows written to {args.output} are safe: rerun the "
            "same command to resume"
        )
    return "[longquest] interrupted"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
