"""Plot time per output token against context length from benchmarks/decode.py results.

    cd benchmarks/results && python ../plot_decode.py --out decode-plot.svg decode-w1-gc-*.json \
        decode-w1-spread8d-*.json decode-w2-split-*.json decode-w2-1m-final6-*.json \
        decode-w4-split-gc-*.json

(the inputs of ``benchmarks/results/decode-plot.svg``, listed in benchmarks/RESULTS.md).

Writes an SVG (no plotting library needed): batch 1, one colour per world size, solid
lines for Quest (budget 4096), dashed for dense attention, dotted for Quest 2048. A point
given by several files is taken from the last; a run that timed several selections
(``--selection``) gives its ``spread`` modes, the engine's default.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 720, 440, 60
COLOURS = {1: "#1f77b4", 2: "#d62728", 4: "#2ca02c"}
STYLES = {"quest-4096": "", "quest-2048": "2,3", "dense": "8,5"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/decode-plot.svg")
    args = parser.parse_args()
    points_by: dict[tuple[int, str], dict[int, float]] = {}
    for path in args.results:
        record = json.loads(Path(path).read_text())
        for row in record["rows"]:
            if "skipped" in row or row["batch"] != 1:
                continue
            for mode, entry in row["modes"].items():
                mode = mode.removesuffix("/spread")
                if mode in STYLES:
                    key = (row["world_size"], mode)
                    points_by.setdefault(key, {})[row["context"]] = entry["ms_per_token"]
    series = {key: sorted(points.items()) for key, points in points_by.items()}
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = math.log2(min(xs)) - 0.2, math.log2(max(xs)) + 0.2
    y1 = max(ys) * 1.1

    def px(x: float) -> float:
        return MARGIN + (math.log2(x) - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)

    def py(y: float) -> float:
        return HEIGHT - MARGIN - y / y1 * (HEIGHT - 2 * MARGIN)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">'
             "Llama-3.1-8B shape, bf16, batch 1, H200: ms per output token</text>"]  # fmt: skip
    axis_y = HEIGHT - MARGIN
    parts.append(f'<line x1="{MARGIN}" y1="{axis_y}" x2="{WIDTH - MARGIN}" y2="{axis_y}" '
                 'stroke="black"/>')  # fmt: skip
    parts.append(f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{axis_y}" stroke="black"/>')
    for context in sorted(set(xs)):
        label = f"{context / 2**20:g}M" if context >= 2**20 else f"{context // 1024}K"
        parts.append(f'<text x="{px(context):.1f}" y="{axis_y + 18}" text-anchor="middle">'
                     f"{label}</text>")  # fmt: skip
    step = 5 if y1 > 20 else 2
    for tick in range(0, int(y1) + 1, step):
        parts.append(f'<text x="{MARGIN - 8}" y="{py(tick) + 4:.1f}" text-anchor="end">'
                     f"{tick}</text>")  # fmt: skip
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 15}" text-anchor="middle">'
                 "context tokens (log scale)</text>")  # fmt: skip
    legend_y = MARGIN
    for (world, mode), points in sorted(series.items()):
        points.sort()
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        dash = f' stroke-dasharray="{STYLES[mode]}"' if STYLES[mode] else ""
        colour = COLOURS.get(world, "black")
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                     f'stroke-width="2"{dash}/>')  # fmt: skip
        for x, y in points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        lx = WIDTH - MARGIN - 150
        parts.append(f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 30}" y2="{legend_y}" '
                     f'stroke="{colour}" stroke-width="2"{dash}/>')  # fmt: skip
        parts.append(f'<text x="{lx + 36}" y="{legend_y + 4}">{mode}, {world} GPU</text>')
        legend_y += 16
    parts.append("</svg>")
    Path(args.out).write_text("\n".join(parts) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
