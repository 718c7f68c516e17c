"""Ray launcher on GPUs gives the tokens of the torchrun path (NCCL, 2 GPUs).

    python benchmarks/ray_gpu_check.py --tokenizer DIR [--world-size 2] [--out-dir DIR]

Builds a small random-weight Llama model (with the tokenizer files of DIR, e.g. the
demo model's), generates greedily from the same ~3K-token prompt through
``LLM(..., world_size=N, launcher="ray")`` and through
``torchrun -m longquest.launch.torchrun``, and compares the two texts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer files")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()

    from benchmarks.common import write_result
    from longquest.engine.config import QuestConfig, SamplingParams
    from longquest.launch.api import LLM
    from tests.tiny_models import make_tiny_model

    work = Path(tempfile.mkdtemp())
    model_dir = make_tiny_model(
        work / "model", architecture="llama3.1", vocab_size=49152, hidden_size=256,
        num_attention_heads=8, num_key_value_heads=4, intermediate_size=704,
        max_position_embeddings=65536,
    )  # fmt: skip
    for name in os.listdir(args.tokenizer):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(Path(args.tokenizer) / name, model_dir / name)
    prompt = ("The quick brown fox jumps over the lazy dog near the river bank. " * 230).strip()
    prompt_file = work / "prompt.txt"
    prompt_file.write_text(prompt)

    start = time.perf_counter()
    llm = LLM(model_dir, world_size=args.world_size, launcher="ray", dtype="bfloat16",
              device="cuda", quest=QuestConfig(token_budget=256))  # fmt: skip
    try:
        (ray_out,) = llm.generate([prompt], SamplingParams(max_tokens=args.max_tokens))
    finally:
        llm.shutdown()
    ray_seconds = time.perf_counter() - start

    start = time.perf_counter()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.world_size}", "-m", "longquest.launch.torchrun",
        "--model", str(model_dir), "--prompt-file", str(prompt_file),
        "--max-tokens", str(args.max_tokens), "--budget", "256", "--dtype", "bfloat16",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    torchrun_seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-4000:])
        return 1
    torchrun_text = done.stdout.rstrip("\n")
    summary = [line for line in done.stderr.splitlines() if line.startswith("[longquest]")]
    same = torchrun_text == ray_out.text
    report = {
        "world_size": args.world_size,
        "prompt_tokens": len(ray_out.prompt_token_ids),
        "max_tokens": args.max_tokens,
        "ray_text": ray_out.text,
        "torchrun_text": torchrun_text,
        "identical": same,
        "ray_pages_attended": ray_out.pages_attended,
        "ray_pages_total": ray_out.pages_total,
        "torchrun_summary": summary,
        "ray_seconds_incl_startup": round(ray_seconds, 1),
        "torchrun_seconds_incl_startup": round(torchrun_seconds, 1),
    }
    print(report)
    print("wrote", write_result("ray_gpu_check", report, out_dir=args.out_dir))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
