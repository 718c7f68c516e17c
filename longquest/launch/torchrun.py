"""torchrun entry: ``torchrun --nproc-per-node N -m longquest.launch.torchrun --model DIR ...``.

Every process is one rank of one replica (NCCL on GPUs, gloo with ``--device cpu``):
``--tensor-parallel-size T`` splits the weights T ways and the N processes' KV pages
N / T ways. Rank 0 prints what ``longquest generate`` prints. The ranks are
configured by the model options, or by ``--config-json``: an ``EngineConfig`` as
JSON, which ``longquest batch --launcher torchrun`` passes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from longquest.engine.config import EngineConfig
from longquest.launch.cli import logprob_lines, summary_line
from longquest.launch.options import (
    TENSOR_PARALLEL_HELP,
    add_model_arguments,
    add_sampling_arguments,
    engine_config_from_args,
    sampling_from_args,
)


def init_distributed(*, device: str | None, timeout_s: float) -> tuple[int, int, torch.device]:
    """Join the group torchrun describes in the environment; return (rank, world, device).

    Raises RuntimeError with the cause when ranks don't all join within ``timeout_s``,
    and ValueError when more ranks than GPUs were asked for on this node.
    """
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise ValueError(
            f"environment variables {missing} are not set: start this module with torchrun, "
            "e.g. torchrun --nproc-per-node 2 -m longquest.launch.torchrun --model DIR ..."
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        available = torch.cuda.device_count()
        if local_world > available:
            raise ValueError(
                f"{local_world} ranks on this node but only {available} CUDA devices; use "
                f"--nproc-per-node {available} or fewer, or --device cpu"
            )
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    try:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        # The first collective is where a missing rank shows: make it happen here.
        dist.barrier()
    except Exception as error:  # noqa: BLE001 - re-raised with the cause attached
        raise RuntimeError(
            f"rank {rank}: the group of {world} ranks did not form within {timeout_s:.0f} s "
            f"({type(error).__name__}: {error}); check that every rank was started and can "
            "reach MASTER_ADDR:MASTER_PORT"
        ) from error
    return rank, world, where


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun -m longquest.launch.torchrun",
        description="sequence-parallel generation, one process per GPU",
    )
    add_model_arguments(parser, model_required=False)
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, metavar="T", help=TENSOR_PARALLEL_HELP
    )
    parser.add_argument(
        "--config-json", help="the EngineConfig as JSON (instead of --model and its options)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompt-file")
    source.add_argument("--input", help="batch mode: JSONL requests (see longquest batch)")
    parser.add_argument("--output", help="batch mode: JSONL results (resumable)")
    parser.add_argument("--retry-errors", action="store_true", help="batch mode: retry errors")
    parser.add_argument("--chat", action="store_true")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--group-size", type=int, default=8, help="batch mode: requests in the engine at once"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to form the group")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.input is None) != (args.output is None):
        parser.error("--input and --output go together")
    if (args.model is None) == (args.config_json is None):
        parser.error("give --model (and its options) or --config-json, one of them")
    if args.config_json is not None:
        try:
            config = EngineConfig.from_json(args.config_json)
        except (ValueError, TypeError) as error:
            parser.error(f"--config-json: {error}")
    try:
        if args.config_json is None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            config = engine_config_from_args(
                args,
                world_size=world,
                tensor_parallel_size=args.tensor_parallel_size,
                launcher="torchrun",
            )
        params = None if args.input is not None else sampling_from_args(args)
    except ValueError as error:
        parser.error(str(error))

    from longquest.parallel.worker import build_worker

    try:
        rank, world, device = init_distributed(device=config.device, timeout_s=args.timeout)
    except (ValueError, RuntimeError) as error:
        print(f"[longquest] error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    try:
        engine, tokenizer = build_worker(config, group=dist.group.WORLD, rank=rank, device=device)
        if args.input is not None:
            _serve_batch(args, engine=engine, tokenizer=tokenizer, rank=rank)
        else:
            _serve_prompt(args, params, engine=engine, tokenizer=tokenizer, rank=rank)
    except (ValueError, FileNotFoundError) as error:  # bad settings or paths, ranks that disagree
        print(f"[longquest] rank {rank}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: `longquest batch` says what it means, once
        if rank == 0:
            print("[longquest] interrupted", file=sys.stderr)
        return 130
    finally:
        dist.destroy_process_group()
    return 0


def _serve_batch(args: argparse.Namespace, *, engine, tokenizer, rank: int) -> None:
    from longquest.engine.scheduler import Scheduler
    from longquest.launch.batch import run_batch
    from longquest.launch.results import read_id_table

    # Every rank runs the same runner over the same file and rank 0 alone writes; rank 0
    # reads what is already done and tells the others, so nobody reads while it appends.
    # The runner's picks depend only on the file and the order requests finish in, the
    # same on every rank (rank 0's tokens are everyone's), so every rank's scheduler gets
    # the same requests in the same steps.
    done = [read_id_table(Path(args.output)) if rank == 0 else None]
    dist.broadcast_object_list(done, src=0)
    summary = run_batch(
        input_path=args.input,
        output_path=args.output,
        step=Scheduler(engine).step,
        tokenizer=tokenizer,
        group_size=args.group_size,
        done_ids=done[0],
        write=rank == 0,
        progress=rank == 0,
        retry_errors=args.retry_errors,
    )
    if rank == 0:
        print(f"[longquest] batch {summary}", file=sys.stderr)


def _serve_prompt(args: argparse.Namespace, params, *, engine, tokenizer, rank: int) -> None:
    from longquest.launch.api import progress_callback

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    request = [{"role": "user", "content": prompt}] if args.chat else prompt
    bars = progress_callback(rank == 0, prefill_chunk_tokens=engine.prefill_chunk_tokens)
    try:
        (output,) = engine.generate([tokenizer.encode(request)], [params], on_progress=bars)
    finally:
        if bars is not None:
            bars.close()
    if rank == 0:
        print(output.text)
        for line in logprob_lines(output, tokenizer.decode):
            print(line, file=sys.stderr)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        layout = f"tensor parallel {world // engine.world_size} | world size {world}"
        print(summary_line(output, engine.quest) + f" | {layout}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
