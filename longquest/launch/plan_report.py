"""``longquest plan``: its options, the table it prints and what it advises when nothing
fits. The memory model is :mod:`longquest.launch.plan`."""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
from pathlib import Path

from longquest.engine.config import BOUNDS_DTYPE_NAMES, DTYPE_NAMES, ModelConfig
from longquest.launch.plan import (
    GIB,
    MILLION_TOKENS,
    Layout,
    PlanRequest,
    parameters_per_gpu,
    plan_layouts,
    read_model_config,
    recommend,
)

# Without a visible GPU (planning on a laptop or a login node) the plan assumes this
# many GiB a GPU (an 80 GB A100 or H100) and says so; --gpu-memory gives another.
DEFAULT_GPU_MEMORY_GIB = 80.0
# The multiples of --gpus the advice tries when no layout fits.
_MORE_GPUS = (2, 4, 8, 16)
_FLAGS = {
    "context_tokens": "--context",
    "num_gpus": "--gpus",
    "gpu_memory_gib": "--gpu-memory",
    "page_size": "--page-size",
    "prefill_chunk_tokens": "--prefill-chunk",
    "dtype": "--dtype",
    "bounds_dtype": "--bounds-dtype",
}


def parse_context(text: str) -> int:
    """Tokens of ``131072``, ``512K`` or ``1M`` (K = 1024, M = 1024 * 1024; ``1.5M`` too,
    rounded to a whole token)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"--context: cannot read {text!r}; give tokens as 131072, 512K or 1M")
    scale = {"": 1, "k": 1024, "m": MILLION_TOKENS}[match[2].lower()]
    tokens = round(float(match[1]) * scale)
    if tokens < 1:
        raise ValueError(f"--context must be at least 1 token, got {text!r}")
    return tokens


def format_tokens(tokens: int) -> str:
    """``1M``, ``1.50M``, ``512K``, ``1000``: K = 1024 (rounded), M = 1024 * 1024."""
    if tokens >= MILLION_TOKENS:
        value = tokens / MILLION_TOKENS
        return f"{value:.0f}M" if value == int(value) else f"{value:.2f}M"
    return f"{tokens / 1024:.0f}K" if tokens >= 1024 else str(tokens)


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def format_table(layouts: list[Layout], *, context_tokens: int) -> list[str]:
    """One row per layout, right-aligned under its header."""
    header = ("T", "S", "weights/GPU", "KV/1M tok/GPU", "working", "free for KV",
              "largest context", f"fits {format_tokens(context_tokens)}")  # fmt: skip
    rows = [header]
    for layout in layouts:
        largest = format_tokens(layout.max_context) if layout.max_context else "none"
        rows.append((
            str(layout.tensor_parallel), str(layout.sequence_parallel),
            _gib(layout.weight_bytes), _gib(layout.kv_bytes_per_million),
            _gib(layout.working_bytes), _gib(layout.kv_budget_bytes), largest,
            "yes" if layout.fits else "no",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]


def format_plan(
    *, name: str, model: ModelConfig, request: PlanRequest, layouts: list[Layout], memory_note: str
) -> str:
    """The whole report: what was planned for, the table, the recommendation, the notes."""
    params = parameters_per_gpu(model, tensor_parallel=1)
    bounds = request.bounds_dtype or "the model dtype"
    lines = [
        f"{name}: {model.architecture}, {params / 1e9:.1f}B parameters, {model.num_layers} "
        f"layers, {model.num_qo_heads} query / {model.num_kv_heads} KV heads, "
        f"{request.torch_dtype}".replace("torch.", ""),
        f"{request.num_gpus} GPUs x {request.gpu_memory_gib:.1f} GiB{memory_note}; pages of "
        f"{request.page_size} tokens, key bounds in {bounds}; context "
        f"{format_tokens(request.context_tokens)} ({request.context_tokens} tokens)",
        "",
        *format_table(layouts, context_tokens=request.context_tokens),
        "",
    ]
    notes = []
    best = recommend(layouts)
    if best is not None:
        notes.append(
            f"Use T={best.tensor_parallel} S={best.sequence_parallel}: the smallest "
            f"tensor-parallel size that holds {format_tokens(request.context_tokens)} (each "
            "larger T adds all-reduces to every layer)."
        )
    notes += [
        "weights: at T=1 every GPU holds the whole model; at T>1 1/T of every projection, "
        "of the embedding and of the LM head, and the norms whole.",
        "working: an estimate that errs high (a prefill chunk's activations, one layer's "
        "gathered K/V, decode logits, CUDA graphs, CUDA context, collective buffers).",
        "free for KV: the engine's default cache, 0.9 x (memory after weights - 2 GiB), or "
        "less where the working estimate needs more. largest context: of one sequence "
        "(prompt and output).",
    ]
    for layout in layouts:
        if layout.engine_cache_too_large and layout.max_context:
            notes.append(
                f"T={layout.tensor_parallel} S={layout.sequence_parallel}: the engine's default "
                f"cache would leave less than the working estimate; pass --cache-tokens "
                f"{layout.max_context}."
            )
    if request.context_tokens > model.context_length:
        notes.append(
            f"The model declares {format_tokens(model.context_length)} tokens of context: "
            f"serving {format_tokens(request.context_tokens)} needs --allow-long-context."
        )
    lines += [textwrap.fill(note, width=100, subsequent_indent="  ") for note in notes]
    return "\n".join(lines)


def no_fit_advice(model: ModelConfig, *, request: PlanRequest, layouts: list[Layout]) -> str:
    """Why no layout holds the context, and what would: more GPUs, fp8 key bounds or a
    shorter context."""
    context = format_tokens(request.context_tokens)
    options = []
    for factor in _MORE_GPUS:
        more = dataclasses.replace(request, num_gpus=request.num_gpus * factor)
        best = recommend(plan_layouts(model, request=more))
        if best is not None:
            options.append(
                f"{more.num_gpus} GPUs (T={best.tensor_parallel} S={best.sequence_parallel})"
            )
            break
    if request.bounds_dtype is None:
        fp8 = dataclasses.replace(request, bounds_dtype="float8_e4m3fn")
        best = recommend(plan_layouts(model, request=fp8))
        if best is not None:
            options.append(
                f"fp8 key bounds, --bounds-dtype float8_e4m3fn (T={best.tensor_parallel} "
                f"S={best.sequence_parallel})"
            )
    longest = max(layouts, key=lambda layout: layout.max_context, default=None)
    if longest is not None and longest.max_context:
        options.append(
            f"a context of at most {format_tokens(longest.max_context)} "
            f"(T={longest.tensor_parallel} S={longest.sequence_parallel})"
        )
    what = "; ".join(options) if options else "more GPUs or GPUs with more memory"
    return f"no layout of {request.num_gpus} GPUs holds {context} tokens; what would: {what}"


def add_plan_parser(commands: argparse._SubParsersAction) -> None:
    """The ``plan`` subcommand and its options."""
    plan = commands.add_parser(
        "plan", help="which tensor x sequence layouts hold a model and a context (config.json only)"
    )
    plan.add_argument("--model", required=True, help="Hugging Face model directory")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs of one replica (T x S)")
    plan.add_argument("--context", default=None,
                      help="tokens of one sequence: 131072, 512K or 1M (K = 1024, M = 1024 K; "
                      "default: the context the model declares)")  # fmt: skip
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                      help="memory of each GPU in GiB (default: the visible GPU's, else "
                      f"{DEFAULT_GPU_MEMORY_GIB:.0f})")  # fmt: skip
    plan.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES,
                      help="model dtype (bfloat16; auto is bfloat16, as on CUDA)")  # fmt: skip
    plan.add_argument("--bounds-dtype", default=None,
                      choices=[name for name in BOUNDS_DTYPE_NAMES if name],
                      help="Quest's key bounds in this dtype (default: the model "
                      "dtype); fp8 shrinks each page's bounds")  # fmt: skip
    plan.add_argument("--page-size", type=int, default=16, help="tokens per KV page (16)")
    plan.add_argument("--prefill-chunk", type=int, default=8192,
                      help="prompt tokens per prefill step (8192)")  # fmt: skip
    plan.set_defaults(func=cmd_plan)


def gpu_memory_gib(given: float | None) -> tuple[float, str]:
    """``(GiB per GPU, a note on where the figure comes from)``."""
    if given is not None:
        return given, ""
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return properties.total_memory / GIB, f" (this machine's {properties.name})"
    return DEFAULT_GPU_MEMORY_GIB, " (assumed: no GPU visible; pass --gpu-memory)"


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan; a ValueError (exit 2) when no layout holds the context."""
    model = read_model_config(args.model)
    memory, note = gpu_memory_gib(args.gpu_memory)
    context = model.context_length if args.context is None else parse_context(args.context)
    try:
        request = PlanRequest(
            context_tokens=context, num_gpus=args.gpus, gpu_memory_gib=memory, dtype=args.dtype,
            bounds_dtype=args.bounds_dtype, page_size=args.page_size,
            prefill_chunk_tokens=args.prefill_chunk,
        )  # fmt: skip
    except ValueError as error:
        flagged = re.sub(r"PlanRequest\.(\w+)", lambda m: _FLAGS[m[1]], str(error))
        raise ValueError(flagged) from None
    layouts = plan_layouts(model, request=request)
    name = Path(args.model).resolve().name
    print(format_plan(name=name, model=model, request=request, layouts=layouts, memory_note=note))
    if recommend(layouts) is None:
        raise ValueError(no_fit_advice(model, request=request, layouts=layouts))
    return 0
