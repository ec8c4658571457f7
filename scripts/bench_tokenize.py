"""Time tokenizing (`Encoder.encode_all`) in one process and in --num-proc worker processes, on the demo model's
tokenizer (SmolLM2's ChatML template): single-turn chats with a long tail of answers, and chats of 10–40 turns.
The examples must be the same (same fingerprint) for the time to count. Prints a markdown table.

    python scripts/bench_tokenize.py --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import WORDS  # noqa: E402


def chats(n: int, turns: tuple[int, int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out = []
    for _ in range(n):
        messages = []
        for t in range(rng.randint(*turns)):
            answer = rng.choice([rng.randint(3, 30)] * 3 + [rng.randint(80, 380)])
            messages.append({"role": "user", "content": words(rng.randint(5, 60))} if t % 2 == 0
                            else {"role": "assistant", "content": words(answer)})
        if messages[-1]["role"] == "user":
            messages.append({"role": "assistant", "content": words(10)})
        out.append({"messages": messages})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from lora_cli.data import Encoder, fingerprint
    from lora_cli.models import embedded_gguf, ensure_gguf_converted

    tok = AutoTokenizer.from_pretrained(ensure_gguf_converted(embedded_gguf()))
    enc = Encoder(tok, 1024)
    print(f"{os.cpu_count()} CPUs, {args.workers} workers, median of {args.repeats}\n")
    print(f"| data | tokens | 1 process | --num-proc {args.workers} | speed-up |")
    print("|---|---|---|---|---|")
    for label, recs in (("6,000 single-turn chats", chats(6000, (2, 2))),
                        ("1,500 chats of 10–40 turns", chats(1500, (10, 40)))):
        times: dict[int, list[float]] = {1: [], args.workers: []}
        prints = set()
        for _ in range(args.repeats):
            for w in times:  # alternating
                t0 = time.perf_counter()
                exs, stats = enc.encode_all(recs, workers=w)
                times[w].append(time.perf_counter() - t0)
                prints.add(fingerprint(exs))
        assert len(prints) == 1, "workers changed the examples"
        one, many = statistics.median(times[1]), statistics.median(times[args.workers])
        print(f"| {label} | {stats.tokens:,} | {one:.2f} s | {many:.2f} s | {one / many:.2f}× |")


if __name__ == "__main__":
    main()
