"""The one table at the end of bench/gpu.sh, from whatever its parts left in OUT_DIR (a part that was
stopped or skipped leaves fewer rows, never a broken table).

    python bench/gpu_summary.py OUT_DIR > OUT_DIR/summary.md
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of a results file (bench/conftest.py streams them); a torn last line is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# tokens/s at 32 x 512 of MiniMind2's own code on one H200 (the 2026-12-04 record), and the goals set for
# ours at that shape
MINIMIND2 = {"small": 600_650, "moe": 150_902}
GOALS = {"small": ">= 1.2M tokens/s", "moe": ">= 380k tokens/s"}


def summary(out: Path) -> str:
    lines = ["# bench/gpu.sh", ""]
    env = out / "env.txt"
    if env.exists():
        lines += ["```", env.read_text(encoding="utf-8").strip(), "```", ""]
    parts = out / "parts.log"
    lines += ["## Parts", ""] + [f"- {p}" for p in (parts.read_text(encoding="utf-8").splitlines()
                                                     if parts.exists() else ["(none ran)"])] + [""]
    stages = out / "stages.log"
    if stages.exists():
        lines += ["## Stages on CUDA", "", "```", stages.read_text(encoding="utf-8").strip(), "```", ""]
    steps = [r for r in read_rows(out / "steps.jsonl") if "tokens_per_s" in r]
    if steps:
        lines += ["## Training step (bf16 autocast)", "",
                  "| model | kernels | batch | ms | tokens/s | vs MiniMind2's code | goal (GPU-speed issue) |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(steps, key=lambda r: (str(r.get("model")), str(r.get("kernels")))):
            peer, goal = MINIMIND2.get(r.get("model")), GOALS.get(r.get("model"))
            vs = f"{r['tokens_per_s'] / peer:.2f}x" if peer and r.get("batch") == "32x512" else "-"
            lines.append(f"| {r.get('model')} | {r.get('kernels')} | {r.get('batch', '')} | {r['mean_s'] * 1e3:.1f} "
                         f"| {r['tokens_per_s']} | {vs} | {goal or '-'} |")
        lines += ["", "MiniMind2's own model code, same shape and recipe, H200 bf16 (2026-12-04 record): "
                  + ", ".join(f"{k} {v:,} tokens/s" for k, v in MINIMIND2.items()), ""]
    decode = read_rows(out / "decode.jsonl")
    if decode:
        lines += ["## Decode, batch 1", "", "| provider | tokens/s |", "|---|---|"]
        lines += [f"| {r['name']} | {r.get('tokens_per_s', 0):.1f} |" for r in decode] + [""]
    lines += _kernel_table(read_rows(out / "kernels.jsonl"))
    return "\n".join(lines).rstrip() + "\n"


def _kernel_table(rows: list[dict]) -> list[str]:
    copy = next((r.get("gb_per_s") for r in rows if r["name"].startswith("test_copy")), None)
    by_op = defaultdict(dict)
    for r in rows:
        if "op" in r:
            by_op[(r["op"], r["preset"], r.get("mode", ""))][r["provider"]] = r
    if not by_op:
        return []
    out = ["## Kernels", "", f"device-to-device copy: {copy} GB/s", "",
           "| op | preset | mode | provider | ms | GB/s (% of copy) or TFLOP/s | peak MiB | vs ref |",
           "|---|---|---|---|---|---|---|---|"]
    for (op, preset, mode), by in sorted(by_op.items()):
        for provider, r in sorted(by.items()):
            ms = r["mean_s"] * 1e3
            gbs, tflops = r.get("gb_per_s"), r.get("tflops")
            rate = f"{gbs} ({100 * gbs / copy:.0f}%)" if gbs and copy else (f"{tflops} TFLOP/s" if tflops else "-")
            vs_ref = f"{by['ref']['mean_s'] * 1e3 / ms:.2f}x" if "ref" in by else "-"
            peak = r.get("peak_mib")
            out.append(f"| {op} | {preset} | {mode} | {provider} | {ms:.3f} | {rate} | {peak} | {vs_ref} |")
    return out + [""]


if __name__ == "__main__":
    sys.stdout.write(summary(Path(sys.argv[1])))
