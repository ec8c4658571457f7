"""The adapter's own cost per training step, measured in one process: `lora train`'s step (forward,
backward, clipping, AdamW) against the strict floor (the frozen model's forward + input-gradient backward
with the same label-only head, no adapter), on the same 8 × 256 batches, the variants taking turns step
by step. Paired ratios (each step against the floor step next to it) cancel most of the drift of a shared
machine, which end-to-end runs in separate processes cannot.

Variants: the default (dropout 0.05, q/k/v down-projections fused), dropout 0, and dropout 0.05 with
every layer's down-projection computed separately (the lever "A of q/k/v as one matmul" switched off).

    python scripts/bench_step.py [--steps 12] [--out docs/benchmarks_step.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import LORA, encoded, make_data  # noqa: E402

FLOOR = "strict floor (frozen, fused head)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="default: the demo's SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_step.json"))
    args = ap.parse_args()

    import torch

    from lora_cli.data import collate
    from lora_cli.lora import inject_lora, resolve_targets
    from lora_cli.lora.layer import LoraLinear
    from lora_cli.loss import CausalLMLoss
    from lora_cli.models import embedded_gguf, ensure_gguf_converted, load_model, resolve_model
    from lora_cli.training import keep_freed_memory, probe_forward

    keep_freed_memory()
    model_ref = args.model or str(embedded_gguf())
    if model_ref.endswith(".gguf"):
        ensure_gguf_converted(model_ref)
    data = Path(tempfile.mkdtemp()) / "job_b.jsonl"
    make_data(data, 8 * LORA["batch"], equal=True)
    tok, exs = encoded(model_ref, data, 256)
    batches = [collate(exs[i : i + LORA["batch"]], tok.pad_token_id) for i in range(0, len(exs), LORA["batch"])]
    fuses_with = LoraLinear._fuses_with

    def build(dropout: float | None, fused: bool = True):
        model = load_model(resolve_model(model_ref), torch.float32).train()
        model.requires_grad_(False)
        if dropout is None:  # the floor: gradients flow to the input, nothing trains
            model.enable_input_require_grads()
            loss_model = CausalLMLoss(model)
            probe_forward(loss_model, exs[0], tok.pad_token_id, "cpu")
            return loss_model.train(), None, fused
        torch.manual_seed(0)
        inject_lora(model, resolve_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj"]), LORA["r"],
                    LORA["alpha"], dropout)
        loss_model = CausalLMLoss(model)
        probe_forward(loss_model, exs[0], tok.pad_token_id, "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        return loss_model.train(), torch.optim.AdamW(params, lr=LORA["lr"], fused=True), fused

    variants = {FLOOR: build(None), "lora train (dropout 0.05)": build(LORA["dropout"]),
                "dropout 0": build(0.0), "dropout 0.05, q/k/v separate": build(LORA["dropout"], fused=False)}

    def step(loss_model, optimizer, fused, batch) -> float:
        LoraLinear._fuses_with = fuses_with if fused else (lambda self, other: False)
        t = time.perf_counter()
        s, n = loss_model(**batch)
        (s / n).backward()
        if optimizer is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    names = list(variants)
    for n in names:  # warm-up: first-touch allocations, lazy initialisation
        step(*variants[n], batches[0])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.steps):
        for n in (names if i % 2 == 0 else names[::-1]):
            times[n].append(step(*variants[n], batches[i % len(batches)]))
        print(f"step {i + 1}/{args.steps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)

    rows = {}
    for n in names:
        ratios = [t / f for t, f in zip(times[n], times[FLOOR])]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        rows[n] = {"median_step_s": round(statistics.median(times[n]), 3),
                   "vs_floor": round(statistics.median(ratios) - 1, 4),
                   "vs_floor_quartiles": [round(q1 - 1, 4), round(q3 - 1, 4)], "steps_s": times[n]}
    Path(args.out).write_text(json.dumps({"steps": args.steps, "batch": "8 x 256", "variants": rows}, indent=2) + "\n")
    print(f"\n{args.steps} steps each, taking turns, SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads\n")
    print("| variant | median step (s) | vs strict floor (median of paired ratios) | quartiles |")
    print("|---|---|---|---|")
    for n, r in rows.items():
        q = r["vs_floor_quartiles"]
        print(f"| {n} | {r['median_step_s']:.2f} | {100 * r['vs_floor']:+.1f}% | {100 * q[0]:+.1f}% … "
              f"{100 * q[1]:+.1f}% |")


if __name__ == "__main__":
    main()
