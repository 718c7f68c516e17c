"""benchmarks/prefill.py end to end on the CPU (``--tiny``: gloo, fp32, tiny shapes).

Part 2's three context-parallel strategies must give one device's exact attention on every
rank; part 1 must prefill through the engine and write its rows. Nothing here is timed.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.prefill import STRATEGIES, check_sizes, choose, merge_reports, parse_args

REPO_ROOT = Path(__file__).resolve().parents[1]


def _command(world_size: int, *args: str) -> list[str]:
    if world_size == 1:  # no torchrun: the script makes a group of one itself
        return [sys.executable, "benchmarks/prefill.py", *args]
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
            "--master-port", str(port), "benchmarks/prefill.py", *args]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_prefill_benchmark_tiny(tmp_path, world_size):
    args = ["--tiny", "--part", "both", "--warmup", "1", "--iters", "2",
            "--out-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(
        _command(world_size, *args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob(f"prefill-cpu-w{world_size}-*.json")
    record = json.loads(path.read_text())
    assert record["world_size"] == world_size and record["tiny"] is True
    assert {"device", "torch", "triton", "git_commit", "date"} <= set(record["environment"])

    # Part 2: tiny heads (4 query / 2 KV, head_dim 32), past 128, round 64, fp32.
    strategies = record["strategies"]
    assert strategies["shapes"] == {"num_qo_heads": 4, "num_kv_heads": 2, "head_dim": 32}
    (case,) = strategies["cases"]
    assert (case["past_tokens"], case["round_tokens"]) == (128, 64)
    chunk = 64 // (2 * world_size)
    for name in STRATEGIES:
        assert case["max_abs_diff_vs_single_device"][name] < 1e-5
        row = case["strategies"][name]
        assert row["max_abs_diff_vs_allgather_kv"] < 1e-5
        assert {"ms", "ms_per_rank", "comm_ms", "peak_extra_gib"} <= set(row)
        assert len(row["ms_per_rank"]) == world_size
    # Bytes one rank receives: queries in and fp32 (out, lse) back, or every other rank's K/V.
    others = world_size - 1
    assert case["strategies"]["pass_q"]["bytes_received_per_rank"] == (
        others * 2 * chunk * 4 * (32 * 4 + 33 * 4)
    )
    kv_bytes = others * (128 // world_size + 2 * chunk) * 2 * 2 * 32 * 4
    assert case["strategies"]["ring"]["bytes_received_per_rank"] == kv_bytes
    assert case["strategies"]["allgather_kv"]["bytes_received_per_rank"] == kv_bytes
    choice = record["choice"]
    if world_size == 1:
        assert choice["strategy"] is None
    else:
        assert choice["strategy"] in STRATEGIES and len(choice["by_case"]) == 1

    # Part 1: the tiny model prefills 256 and 512 tokens through the engine.
    engine = record["engine"]
    assert "N^2" in engine["model_flops"] and "world_size" in engine["mfu"]
    assert [row["context"] for row in engine["rows"]] == [256, 512]
    for row in engine["rows"]:
        assert "skipped" not in row
        assert row["tokens_per_second"] > 0 and row["mfu"] > 0
        assert row["mfu_counting_lm_head"] > row["mfu"]
        assert row["cache_pages_per_rank"] * 16 * world_size >= row["context"] + 1


def _case(past: int, ms: dict[str, float]) -> dict:
    traffic = {"pass_q": 1, "ring": 2, "allgather_kv": 2}
    rows = {n: {"ms": ms[n], "bytes_received_per_rank": traffic[n]} for n in ms}
    return {"past_tokens": past, "round_tokens": 64, "strategies": rows}


def test_choose_breaks_near_ties_by_traffic():
    cases = [
        _case(128, {"pass_q": 10.1, "ring": 10.0, "allgather_kv": 12.0}),  # within 2%: traffic
        _case(256, {"pass_q": 20.0, "ring": 15.0, "allgather_kv": 16.0}),
        _case(512, {"pass_q": 30.0, "ring": 40.0, "allgather_kv": 50.0}),
    ]
    choice = choose(cases, world=2)
    assert [c["chosen"] for c in choice["by_case"]] == ["pass_q", "ring", "pass_q"]
    assert choice["by_case"][0]["fastest"] == "ring"
    assert choice["strategy"] == "pass_q" and choice["wins"]["pass_q"] == 2


def test_merge_keeps_both_parts_and_replaces_rows():
    old = {"world_size": 2, "runs": [{"argv": ["--part", "1"]}],
           "engine": {"rows": [{"context": 128, "seconds": 1.0},
                               {"context": 256, "seconds": 2.0}]}}  # fmt: skip
    new = {"world_size": 2, "runs": [{"argv": ["--part", "2"]}],
           "engine": {"rows": [{"context": 256, "seconds": 1.5},
                               {"context": 512, "skipped": "no room"}]},
           "strategies": {"cases": [_case(128, {"pass_q": 1.0, "ring": 2.0,
                                                "allgather_kv": 3.0})]}}  # fmt: skip
    merged = merge_reports(old, new)
    assert [r.get("seconds") for r in merged["engine"]["rows"]] == [1.0, 1.5, None]
    assert len(merged["runs"]) == 2 and merged["choice"]["strategy"] == "pass_q"
    # A later run that skipped a context does not erase the measured row.
    again = merge_reports(merged, {"world_size": 2, "engine": {"rows": [
        {"context": 128, "skipped": "no room"}]}})  # fmt: skip
    assert again["engine"]["rows"][0]["seconds"] == 1.0


def test_bad_sizes_are_refused_with_the_option_named():
    with pytest.raises(ValueError, match="--contexts"):
        parse_args(["--contexts", "12x"])
    with pytest.raises(ValueError, match="--rounds"):
        check_sizes(parse_args(["--rounds", "100"]), world=2)
    with pytest.raises(ValueError, match="--pasts"):
        check_sizes(parse_args(["--pasts", "1000"]), world=4)
    with pytest.raises(ValueError, match="--chunk"):
        check_sizes(parse_args(["--chunk", "100"]), world=2)
    check_sizes(parse_args([]), world=4)  # the defaults split over 4 ranks
