"""Benchmark `lora train` against transformers Trainer + PEFT, full fine-tuning and the frozen-model floor.

Same model (SmolLM2-135M-Instruct, the demo's GGUF unless --model), same data, same settings, in one run,
contenders alternating; each run is its own process (peak RSS is that process's). Writes docs/benchmarks_table.md
(the table pasted into docs/benchmarks.md), docs/benchmarks.json and docs/benchmarks.png.

    python scripts/bench.py                 # or: make bench
    python scripts/bench.py --repeats 1 --records 24    # quicker

Job (a): chat records with a realistic spread of lengths (short and long answers), r 16, alpha 32,
dropout 0.05, q/k/v/o, batch 8, max length 512, 1 epoch. Job (b): equal-length batches (8 × 256), to
isolate the per-step cost against the floor (frozen model, forward + input-gradient backward).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = ("the model learns a small update to each projection while the base weights stay frozen and the "
         "loss falls as the adapter fits the answers of the assistant in this synthetic chat data set with "
         "short and long replies about colors cities numbers rivers and mountains").split()
LORA = dict(r=16, alpha=32, dropout=0.05, batch=8, max_length=512, lr=2e-4)


# ---------------------------------------------------------------- data

def make_data(path: Path, n: int, equal: bool, seed: int = 0) -> None:
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    recs = []
    for _ in range(n):
        if equal:  # longer than 256 tokens: truncated to exactly 256 (max length 256 for job b)
            q, a = words(40), words(300)
        else:  # mixed: mostly short answers, some long ones (a long tail, as in real chat data)
            q = words(rng.randint(5, 60))
            a = words(rng.choice([rng.randint(3, 30)] * 3 + [rng.randint(80, 380)]))
        recs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def encoded(model_ref: str, data: Path, max_length: int):
    from lora_cli.data import Encoder
    from lora_cli.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(model_ref))
    exs, _ = Encoder(tok, max_length).encode_all([json.loads(x) for x in data.read_text().splitlines()])
    return tok, exs


def data_loss(model, tok, exs, device="cpu") -> float:
    """Mean loss per loss token of `model` over all records (eval mode, plain logits): the same measure
    for every contender, so speed never comes from doing less work."""
    import torch

    from lora_cli.data import collate
    from lora_cli.loss import CausalLMLoss

    loss = CausalLMLoss(model.eval(), fused=False)
    order = sorted(range(len(exs)), key=lambda i: len(exs[i].input_ids))
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(order), 8):
            b = collate([exs[j] for j in order[i : i + 8]], tok.pad_token_id)
            s, n = loss(**{k: v.to(device) for k, v in b.items()})
            total, count = total + float(s), count + float(n)
    return total / count


# ---------------------------------------------------------------- workers (each in its own process)

def peak_rss_gb() -> float:
    """This process's peak RSS so far: taken right after training, before the common loss evaluation."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker_lora(model_ref, data, equal, out):
    run = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "lora_cli", "train", "--model", model_ref, "--data", str(data), "--output", str(run),
           "--rank", str(LORA["r"]), "--alpha", str(LORA["alpha"]), "--dropout", str(LORA["dropout"]),
           "--batch-size", str(LORA["batch"]), "--max-length", str(LORA["max_length"]), "--lr", str(LORA["lr"]),
           "--epochs", "1", "--save-every", "1000000", "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True)
    s = json.loads((run / "train_summary.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    import torch

    from lora_cli.lora.adapter import load_adapter
    from lora_cli.models import load_model, resolve_model

    tok, exs = encoded(model_ref, data, LORA["max_length"])
    model = load_model(resolve_model(model_ref), torch.float32)
    load_adapter(model, run)
    return {"train_s": s["wall_time_s"], "steps": s["steps"], "losses": [r["loss"] for r in rows],
            "peak_rss_gb": s["peak_memory_bytes"] / 2**30,
            "step_s": [r["step_s"] for r in rows], "final_loss": data_loss(model, tok, exs), "adapter": str(run)}


def worker_trainer(model_ref, data, equal, out, peft_on=True):
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from lora_cli.models import load_model, resolve_model

    tok, exs = encoded(model_ref, data, LORA["max_length"])
    model = load_model(resolve_model(model_ref), torch.float32)
    if peft_on:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ds = [{"input_ids": e.input_ids.tolist(), "labels": e.labels.tolist(), "attention_mask": [1] * len(e.input_ids)} for e in exs]
    losses, step_s = [], []

    class Log(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=LORA["batch"],
                             num_train_epochs=1, learning_rate=LORA["lr"] if peft_on else 2e-5, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             lr_scheduler_type="cosine", warmup_steps=0.03, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Log()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    trainer.train()
    t = time.perf_counter() - t0
    return {"train_s": t, "steps": trainer.state.global_step, "losses": losses, "step_s": step_s,
            "peak_rss_gb": peak_rss_gb(),
            "final_loss": data_loss(model, tok, exs)}


def worker_floor(model_ref, data, equal, out, fused=False):
    """Frozen model, forward + input-gradient backward, no adapter: what any LoRA step must pay. With the
    same allocator setting as `lora train`; `fused`: our label-only chunked head + loss instead of the
    model's full logits (the strict floor: what is left is the adapter's own cost)."""
    import torch
    import torch.nn.functional as F

    from lora_cli.data import collate
    from lora_cli.loss import CausalLMLoss
    from lora_cli.models import load_model, resolve_model
    from lora_cli.training import keep_freed_memory

    keep_freed_memory()
    tok, exs = encoded(model_ref, data, LORA["max_length"])
    model = load_model(resolve_model(model_ref), torch.float32).train()
    model.requires_grad_(False)
    model.enable_input_require_grads()
    loss_model = CausalLMLoss(model)
    order = list(range(len(exs)))
    random.Random(0).shuffle(order)
    t0 = time.perf_counter()
    step_s = []
    for i in range(0, len(order), LORA["batch"]):
        t = time.perf_counter()
        b = collate([exs[j] for j in order[i : i + LORA["batch"]]], tok.pad_token_id)
        if fused:
            s, n = loss_model(**b)
            loss = s / n
        else:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        step_s.append(time.perf_counter() - t)
    return {"train_s": time.perf_counter() - t0, "steps": len(step_s), "losses": [], "step_s": step_s,
            "peak_rss_gb": peak_rss_gb(), "final_loss": None}


FLOOR, STRICT_FLOOR = "floor (frozen fwd+bwd)", "strict floor (frozen, fused head)"
WORKERS = {"lora train": worker_lora, "Trainer + PEFT": worker_trainer,
           "full fine-tune": lambda *a: worker_trainer(*a, peft_on=False), FLOOR: worker_floor,
           STRICT_FLOOR: lambda *a: worker_floor(*a, fused=True)}


def child_env(**extra: str) -> dict:
    """The environment for a child process: this checkout first on PYTHONPATH, the caller's path kept."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_worker(name: str, model_ref: str, data: Path, equal: bool) -> dict:
    """Run one contender in a child process (its peak RSS is its own)."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    env = child_env()
    p = subprocess.Popen([sys.executable, __file__, "--worker", name, "--model", model_ref, "--data", str(data),
                          "--out", str(out)] + (["--equal"] if equal else []), env=env)
    if p.wait() != 0:
        raise SystemExit(f"worker {name!r} failed ({p.returncode})")
    return json.loads(out.read_text())


def cli_latency(adapter_dir: str | None, n: int = 7) -> dict:
    """Median wall time of `lora --help` and `lora inspect` (fresh processes)."""
    lora = str(Path(sys.executable).parent / "lora")
    out = {}
    cmds = {"lora --help": [lora, "--help"]}
    if adapter_dir:
        cmds["lora inspect"] = [lora, "inspect", adapter_dir]
    for name, cmd in cmds.items():
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times), 3)
    return out


# ---------------------------------------------------------------- orchestration

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--equal", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--cli-only", metavar="ADAPTER_DIR", help="only time `lora --help` and `lora inspect`")
    args = ap.parse_args()
    if args.cli_only:
        print(json.dumps(cli_latency(args.cli_only)))
        return
    if args.equal:
        LORA["max_length"] = 256
    if args.worker:
        res = WORKERS[args.worker](args.model, Path(args.data), args.equal, args.out)
        Path(args.out).write_text(json.dumps(res))
        return

    from lora_cli.models import embedded_gguf, ensure_gguf_converted

    model_ref = args.model or str(embedded_gguf())
    if model_ref.endswith(".gguf"):
        ensure_gguf_converted(model_ref)  # convert once, outside the timings
    tmp = Path(tempfile.mkdtemp())
    results: dict = {}
    last_adapter = None
    for job, equal in (("a", False), ("b", True)):
        data = tmp / f"job_{job}.jsonl"
        make_data(data, args.records, equal)
        LORA["max_length"] = 256 if equal else 512
        tok, exs = encoded(model_ref, data, LORA["max_length"])
        real_tokens = sum(len(e.input_ids) for e in exs)
        names = list(WORKERS)[:4] if job == "a" else ["lora train", "Trainer + PEFT", FLOOR, STRICT_FLOOR]
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeats):
            for n in (names if rep % 2 == 0 else names[::-1]):  # alternate the order
                print(f"job {job} repeat {rep + 1}/{args.repeats}: {n}", flush=True)
                runs[n].append(run_worker(n, model_ref, data, equal))
                if n == "lora train":
                    last_adapter = runs[n][-1].get("adapter")
        results[job] = {"records": len(exs), "real_tokens": real_tokens, "contenders": {}}
        for n, rs in runs.items():
            t = statistics.median(r["train_s"] for r in rs)
            results[job]["contenders"][n] = {
                "train_s": round(t, 2), "tokens_per_s": round(real_tokens / t, 1), "steps": rs[0]["steps"],
                "peak_rss_gb": round(statistics.median(r["peak_rss_gb"] for r in rs), 2),
                "final_loss": round(statistics.median(r["final_loss"] for r in rs), 4) if rs[0]["final_loss"] else None,
                "runs_s": [round(r["train_s"], 2) for r in rs],
                # a step once warm: the median over runs of each run's median step, the first step left out
                "step_s": round(statistics.median(statistics.median(r["step_s"][1:] or r["step_s"]) for r in rs), 3),
            }
    results["cli_s"] = cli_latency(last_adapter)
    write_docs(results, Path(args.docs), model_ref, args.repeats)


def write_docs(results: dict, docs: Path, model_ref: str, repeats: int) -> None:
    import platform

    import torch

    docs.mkdir(exist_ok=True)
    (docs / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    ref = "Trainer + PEFT"
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__} (threads {torch.get_num_threads()}), fp32. Model: SmolLM2-135M-Instruct "
             f"({Path(model_ref).name}). Median of {repeats} runs, contenders alternating.", ""]
    for job, title in (("a", "Job (a): mixed-length chat, batch 8, max length 512, 1 epoch"),
                       ("b", "Job (b): equal-length batches (8 × 256 tokens)")):
        r = results[job]
        lines += [f"### {title}", "", f"{r['records']} records, {r['real_tokens']:,} real tokens.", "",
                  "| contender | train time (s) | real tokens/s | speed vs Trainer + PEFT | s/step once warm | "
                  "peak RSS (GB) | loss on the training tokens after training |", "|---|---|---|---|---|---|---|"]
        base = r["contenders"][ref]["train_s"]
        for n, c in r["contenders"].items():
            step = f"{c['step_s']:.2f}" if job == "b" else "–"  # batches of mixed lengths: no typical step
            lines.append(f"| {n} | {c['train_s']:.1f} | {c['tokens_per_s']:,.0f} | {base / c['train_s']:.2f}× | "
                         f"{step} | {c['peak_rss_gb']:.2f} | "
                         f"{c['final_loss'] if c['final_loss'] is not None else '–'} |")
        ours = r["contenders"]["lora train"]
        for f in (FLOOR, STRICT_FLOOR):
            if job == "b" and f in r["contenders"]:
                fl = r["contenders"][f]
                lines.append(f"\n`lora train` vs {f}: {100 * (ours['train_s'] / fl['train_s'] - 1):+.1f}% end to end, "
                             f"{100 * (ours['step_s'] / fl['step_s'] - 1):+.1f}% per warm step.")
        lines.append("")
    lines += ["### CLI latency (median of 7 fresh processes)", "", "| command | seconds |", "|---|---|"]
    lines += [f"| `{k}` | {v:.2f} |" for k, v in results.get("cli_s", {}).items()] + [""]
    (docs / "benchmarks_table.md").write_text("\n".join(lines) + "\n")  # pasted into benchmarks.md
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
        for ax, job in zip(axes, ("a", "b")):
            c = results[job]["contenders"]
            ax.barh(list(c), [v["tokens_per_s"] for v in c.values()], color="#4c72b0")
            ax.set_title(f"job ({job}): real tokens/s, higher is better", fontsize=10)
            ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(docs / "benchmarks.png")
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
