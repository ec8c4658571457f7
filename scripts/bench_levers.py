"""Measure `lora train`'s levers one at a time on the benchmark's equal-length job (SmolLM2-135M-Instruct,
r 16, alpha 32, q/k/v/o, batch 8): dropout off, gradient checkpointing, torch.compile, one thread, and
gradient checkpointing again at 8 × 512 tokens where activations weigh more.

Each run is `lora train --max-steps 6` in a fresh process, the variants alternating between repeats.
Figures: first step (where compilation happens), a warm step (median of steps 3–6), peak RSS of the
process (train_summary.json). Writes docs/benchmarks_levers.json and prints a markdown table.

    python scripts/bench_levers.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import LORA, WORDS, child_env  # noqa: E402

VARIANTS = [  # name, max length, extra flags, extra environment
    ("default", 256, [], {}),
    ("--dropout 0", 256, ["--dropout", "0"], {}),
    ("--gradient-checkpointing", 256, ["--gradient-checkpointing"], {}),
    ("--compile", 256, ["--compile"], {}),
    ("1 thread (OMP_NUM_THREADS=1)", 256, [], {"OMP_NUM_THREADS": "1"}),
    ("default", 512, [], {}),
    ("--gradient-checkpointing", 512, ["--gradient-checkpointing"], {}),
]


def make_long_data(path: Path, n: int = 48, seed: int = 0) -> None:
    """Records longer than 512 tokens, so every batch is exactly batch × max length."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    recs = [{"messages": [{"role": "user", "content": words(40)}, {"role": "assistant", "content": words(700)}]}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def run(model: str, data: Path, max_length: int, flags: list[str], env: dict) -> dict:
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "lora_cli", "train", "--model", model, "--data", str(data), "--output", str(out),
           "--rank", str(LORA["r"]), "--alpha", str(LORA["alpha"]), "--dropout", str(LORA["dropout"]),
           "--batch-size", str(LORA["batch"]), "--max-length", str(max_length), "--max-steps", "6",
           "--save-every", "1000000", "--seed", "0", *flags]
    subprocess.run(cmd, check=True, capture_output=True, env=child_env(**env))
    steps = [json.loads(x)["step_s"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "train_summary.json").read_text())
    return {"first_s": steps[0], "warm_s": statistics.median(steps[2:]),
            "peak_rss_gb": summary["peak_memory_bytes"] / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    args = ap.parse_args()
    from lora_cli.models import embedded_gguf, ensure_gguf_converted

    model = str(embedded_gguf())
    ensure_gguf_converted(model)
    data = Path(tempfile.mkdtemp()) / "long.jsonl"
    make_long_data(data)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(VARIANTS))}
    for rep in range(args.repeats):
        order = list(range(len(VARIANTS)))
        for i in order if rep % 2 == 0 else order[::-1]:
            name, length, flags, env = VARIANTS[i]
            print(f"repeat {rep + 1}/{args.repeats}: {name} at 8 × {length}", flush=True)
            runs[i].append(run(model, data, length, flags, env))
    rows = []
    for i, (name, length, _, _) in enumerate(VARIANTS):
        rs = runs[i]
        rows.append({"variant": name, "tokens": f"8 × {length}",
                     **{k: round(statistics.median(r[k] for r in rs), 3) for k in ("first_s", "warm_s", "peak_rss_gb")}})
    Path(args.docs, "benchmarks_levers.json").write_text(json.dumps(rows, indent=2) + "\n")
    base = {r["tokens"]: r for r in rows if r["variant"] == "default"}
    print("| variant | batch | first step (s) | warm step (s) | vs default | peak RSS (GB) | vs default |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[r["tokens"]]
        print(f"| {r['variant']} | {r['tokens']} | {r['first_s']:.2f} | {r['warm_s']:.2f} | "
              f"{100 * (r['warm_s'] / b['warm_s'] - 1):+.0f}% | {r['peak_rss_gb']:.2f} | "
              f"{r['peak_rss_gb'] - b['peak_rss_gb']:+.2f} GB |")


if __name__ == "__main__":
    main()
