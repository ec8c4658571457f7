"""GPU benchmark: a 0.5B-class model in bf16, `lora train` against Trainer + PEFT, and the memory savers.

The jobs are bench.py's (a: mixed-length chat, batch 8, max length 512; b: equal 8 × 256 batches; r 16,
alpha 32, dropout 0.05, q/k/v/o, 1 epoch), in bf16 on one CUDA GPU. Each contender runs in its own
process; peak memory is `torch.cuda.max_memory_allocated` over the whole run (weights included).

The model is Qwen2.5-0.5B's architecture (24 layers, hidden 896, 151,936-token vocabulary, tied
embeddings: 494M parameters) with seeded random weights, built once with --init (GPU machines here
reach no Hub); speed and memory do not depend on the weights' values. Tokens come from --tokenizer: a
directory holding a tokenizer, or any model `lora train` accepts (default: the demo's SmolLM2 GGUF).

    python scripts/bench_gpu.py [--tokenizer DIR_OR_MODEL] [--repeats 2] [--records 256] [--out docs/benchmarks_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LORA, ROOT, child_env, data_loss, encoded, make_data  # noqa: E402

SAVERS = {"lora train": [], "lora train --gradient-checkpointing": ["--gradient-checkpointing"],
          "lora train --load-in-4bit": ["--load-in-4bit"],
          "lora train --load-in-4bit --gradient-checkpointing": ["--load-in-4bit", "--gradient-checkpointing"],
          "lora train --compile": ["--compile"]}
TRAINER = "Trainer + PEFT"


def init_model(tokenizer_dir: str | None, out: Path) -> None:
    """Qwen2.5-0.5B's config with random weights (seed 0), bf16 safetensors, plus the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        from lora_cli.models import embedded_gguf, load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model(tokenizer_dir or str(embedded_gguf())))  # a model: its tokenizer
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {out}", flush=True)


def worker_lora(model_dir: str, data: Path, extra: list[str]) -> dict:
    import torch

    from lora_cli.lora.adapter import load_adapter

    run = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "lora_cli", "train", "--model", model_dir, "--data", str(data), "--output", str(run),
           "--rank", str(LORA["r"]), "--alpha", str(LORA["alpha"]), "--dropout", str(LORA["dropout"]),
           "--batch-size", str(LORA["batch"]), "--max-length", str(LORA["max_length"]), "--lr", str(LORA["lr"]),
           "--epochs", "1", "--save-every", "1000000", "--seed", "0", "--dtype", "bfloat16", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    s = json.loads((run / "train_summary.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    from transformers import AutoModelForCausalLM

    tok, exs = encoded(model_dir, data, LORA["max_length"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    load_adapter(model, run)
    return {"train_s": s["wall_time_s"], "steps": s["steps"], "peak_gb": s["peak_memory_bytes"] / 2**30,
            "step_s": [r["step_s"] for r in rows], "final_loss": data_loss(model, tok, exs, "cuda"),
            "gpu": s["device_name"]}


def worker_trainer(model_dir: str, data: Path, extra: list[str]) -> dict:
    """What most users write: Trainer, PEFT, bf16, completion-only labels, dynamic padding."""
    import peft
    import torch
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tok, exs = encoded(model_dir, data, LORA["max_length"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ds = [{"input_ids": e.input_ids.tolist(), "labels": e.labels.tolist(), "attention_mask": [1] * len(e.input_ids)} for e in exs]
    step_s = []

    class Log(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            step_s.append(time.perf_counter() - self.t0)

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=LORA["batch"], bf16=True,
                             num_train_epochs=1, learning_rate=LORA["lr"], logging_steps=1, save_strategy="no",
                             report_to=[], dataloader_num_workers=0, lr_scheduler_type="cosine", warmup_steps=0.03,
                             seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Log()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    return {"train_s": t, "steps": trainer.state.global_step, "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "step_s": step_s, "final_loss": data_loss(model, tok, exs, "cuda"), "gpu": torch.cuda.get_device_name()}


def run_worker(name: str, model_dir: str, data: Path, equal: bool) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    env = child_env()
    cmd = [sys.executable, __file__, "--worker", name, "--model", model_dir, "--data", str(data), "--result", str(out)]
    p = subprocess.run(cmd + (["--equal"] if equal else []), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n")
        last = (p.stderr or p.stdout).strip().splitlines()
        return {"error": "failed: " + (last[-1] if last else f"exit code {p.returncode}")}
    return json.loads(out.read_text())


def table(results: dict) -> str:
    lines = []
    for job, r in results["jobs"].items():
        lines += [f"### Job ({job}): {r['title']}", "", f"{r['records']} records, {r['real_tokens']:,} real tokens, "
                  f"{r['gpu']}, bf16.", "",
                  "| contender | train time (s) | real tokens/s | vs Trainer + PEFT | s/step once warm | peak GPU memory (GiB) "
                  "| loss on the training tokens after training |", "|---|---|---|---|---|---|---|"]
        ref = r["contenders"].get(TRAINER, {}).get("train_s")
        for n, c in r["contenders"].items():
            if "error" in c:
                lines.append(f"| {n} | {c['error'][:80]} | | | | | |")
                continue
            speed = f"{ref / c['train_s']:.2f}×" if ref else "–"
            lines.append(f"| {n} | {c['train_s']:.1f} | {c['tokens_per_s']:,.0f} | {speed} | {c['step_s']:.3f} | "
                         f"{c['peak_gb']:.2f} | {c['final_loss']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--result")
    ap.add_argument("--equal", action="store_true")
    ap.add_argument("--tokenizer")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--jobs", default="ab")
    ap.add_argument("--contenders", default=",".join([*SAVERS, TRAINER]))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_gpu.json"))
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():  # (on a CPU its bf16 0.5B jobs would run for hours)
        ap.error("needs a CUDA GPU; the CPU benchmark is scripts/bench.py")
    if args.worker:
        LORA["max_length"] = 256 if args.equal else 512
        fn = worker_trainer if args.worker == TRAINER else worker_lora
        res = fn(args.model, Path(args.data), SAVERS.get(args.worker, []))
        Path(args.result).write_text(json.dumps(res))
        return

    tmp = Path(tempfile.mkdtemp())
    model_dir = str(tmp / "qwen2.5-0.5b-arch")
    init_model(args.tokenizer, Path(model_dir))
    names = args.contenders.split(",")
    results: dict = {"model": "Qwen2.5-0.5B architecture, random weights", "jobs": {}}
    for job in args.jobs:
        equal = job == "b"
        data = tmp / f"job_{job}.jsonl"
        make_data(data, args.records, equal)
        LORA["max_length"] = 256 if equal else 512
        _, exs = encoded(model_dir, data, LORA["max_length"])
        real = sum(len(e.input_ids) for e in exs)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            for n in (names if rep % 2 == 0 else names[::-1]):
                print(f"job {job} repeat {rep + 1}/{args.repeats}: {n}", flush=True)
                r = run_worker(n, model_dir, data, equal)
                runs[n].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "step_s"}), flush=True)
                Path(args.out).with_suffix(".partial.json").write_text(json.dumps({**results, job: runs}))
        out = results["jobs"][job] = {"title": "equal-length batches (8 × 256)" if equal else
                                      "mixed-length chat, batch 8, max length 512, 1 epoch",
                                      "records": len(exs), "real_tokens": real, "contenders": {}}
        for n, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                out["contenders"][n] = {"error": rs[0]["error"]}
                continue
            out["gpu"] = ok[0]["gpu"]
            t = statistics.median(r["train_s"] for r in ok)
            out["contenders"][n] = {
                "train_s": round(t, 2), "tokens_per_s": round(real / t, 1), "steps": ok[0]["steps"],
                "peak_gb": round(statistics.median(r["peak_gb"] for r in ok), 2),
                "final_loss": round(statistics.median(r["final_loss"] for r in ok), 4),
                "runs_s": [round(r["train_s"], 2) for r in ok],
                "step_s": round(statistics.median(statistics.median(r["step_s"][1:] or r["step_s"]) for r in ok), 4)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))
    print(table(results))


def plot(results: dict, path: Path) -> None:
    """Real tokens/s and peak GPU memory of each contender, one row of panels per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = {j: {n: c for n, c in r["contenders"].items() if "error" not in c} for j, r in results["jobs"].items()}
    def short(name):
        for flag, word in (("--gradient-checkpointing", "+ checkpointing"), ("--load-in-4bit", "+ 4-bit"),
                           ("--compile", "+ compile")):
            name = name.replace(flag, word)
        return name

    fig, axes = plt.subplots(len(jobs), 2, figsize=(10, 2.8 * len(jobs)), dpi=110, squeeze=False, sharey="row")
    for row, (job, cs) in zip(axes, jobs.items()):
        for ax, key, title in zip(row, ("tokens_per_s", "peak_gb"), ("real tokens/s, higher is better",
                                                                      "peak GPU memory (GiB), lower is better")):
            ax.barh([short(n) for n in cs], [c[key] for c in cs.values()], color="#4c72b0")
            ax.set_title(f"job ({job}): {title}", fontsize=10)
        row[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
