"""Shared benchmark utilities: environment record, JSON results, tables and timers.

Timers return milliseconds. On CUDA they time with device events and keep the L2
cache out of the numbers (triton's ``do_bench`` flushes it before every call;
callers of ``bench_graph`` rotate among input sets much larger than L2). On the
CPU they fall back to wall-clock loops so that smoke runs work anywhere.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def _version(package: str) -> str | None:
    # Metadata, not import: importing transformers alone takes seconds.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def environment() -> dict:
    """Where and with what a result was measured (no hostname)."""
    cuda = torch.cuda.is_available()
    status = _git("status", "--porcelain")
    # Untracked source counts (a new kernel file changes what ran); result files do not.
    changes = (
        None
        if status is None
        else [
            line for line in status.splitlines() if not line[3:].startswith("benchmarks/results/")
        ]
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gib": (
            round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None
        ),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        # A copied tree's .git can be stale: the caller may name the commit it copied.
        "git_commit": os.environ.get("LONGQUEST_GIT_COMMIT") or _git("rev-parse", "HEAD"),
        "git_dirty": None if changes is None else bool(changes),
    }


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: safe in a file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def write_result(name: str, payload: dict, *, out_dir: Path | str | None = None) -> Path:
    """Write ``payload`` plus ``environment()`` as JSON; return the file's path.

    The file is ``<out_dir>/<name>-<device-slug>-<YYYY-MM-DD>.json``; ``out_dir``
    defaults to ``benchmarks/results``. A second run on the same day and device
    replaces the first.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-', got {name!r}")
    env = environment()
    directory = Path(out_dir) if out_dir is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{device_slug(env['device'])}-{env['date'][:10]}.json"
    record = {"name": name, "environment": env, **payload}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as plain aligned text; numbers right-aligned, missing cells ``-``."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(col), (int, float)) or row.get(col) is None for row in rows)
        for col in columns
    ]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    print(line(columns))
    print(line(["-" * w for w in widths]))
    for r in cells:
        print(line(r))


def _wall_median(fn: Callable[[], object], *, warmup_ms: float, rep_ms: float) -> float:
    """Median wall-clock ms of single calls (for the CPU, where there are no events)."""
    deadline = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < deadline:
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _on_cuda(device: torch.device | str | None) -> bool:
    return torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"


def bench(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    device: torch.device | str | None = None,
) -> float:
    """Median ms of one call of ``fn``, which runs on ``device`` (default: CUDA if present).

    CUDA: ``triton.testing.do_bench`` (device events, L2 flushed before every
    call, so this is the cold-cache device time; host launch cost shows only
    where it exceeds the flush it overlaps). CPU: wall clock.
    """
    if not _on_cuda(device):
        return _wall_median(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def bench_host(
    fn: Callable[[], object],
    *,
    calls: int = 20,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> float:
    """Median ms per call when ``fn`` is called back to back, as an eager decode loop does.

    Includes the host's launch and validation cost whenever that, not the
    device, is the bottleneck. Each of ``repeats`` groups of ``calls`` is synchronized.
    """
    sync = torch.cuda.synchronize if _on_cuda(device) else (lambda: None)
    fn()
    sync()
    groups = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        groups.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(groups)


def capture_graph(fn: Callable[[], object], *, warmups: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one ``fn()`` call, replayed once and synced.

    ``fn`` first runs ``warmups`` times on a side stream (compiles kernels, lets the
    allocators and communicators settle), as capture requires.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def bench_graph(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median ms of one replay of a CUDA graph that captured one call of ``fn``.

    ``fn`` runs a few times on a side stream first (compiles kernels, lets
    allocators settle), as capture requires. Replays are timed with
    ``do_bench``, so L2 is flushed before each one. Raises RuntimeError from the
    capture if ``fn`` is not capturable (a host sync, a CPU tensor).
    """
    if not torch.cuda.is_available():
        raise ValueError("bench_graph needs a CUDA device; use bench() on the CPU")
    import triton.testing

    graph = capture_graph(fn)
    ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    del graph
    return float(ms)


def measure_copy_bandwidth(device: torch.device | str, *, num_bytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes), counting bytes read + written.

    CUDA: a 2 GiB buffer copied into another (less if memory is short), median of
    20 copies timed with events. CPU: 64 MiB, wall clock.
    """
    device = torch.device(device)
    if num_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            num_bytes = min(2 * 2**30, free // 4)
        else:
            num_bytes = 64 * 2**20
    numel = num_bytes // 2
    src = torch.randn(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    if device.type != "cuda":
        ms = _wall_median(lambda: dst.copy_(src), warmup_ms=5, rep_ms=50)
        return moved / (ms * 1e-3) / 1e9
    for _ in range(3):
        dst.copy_(src)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(20)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(20)]
    for start, end in zip(starts, ends):
        start.record()
        dst.copy_(src)
        end.record()
    torch.cuda.synchronize(device)
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    return moved / (ms * 1e-3) / 1e9
