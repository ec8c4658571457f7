"""`lora inspect`: what an adapter is, as a table or JSON. Never imports torch."""

from __future__ import annotations

import json

import typer


def inspect_command(
    adapter: str = typer.Argument(..., metavar="ADAPTER", help="Run directory, adapter directory or GGUF adapter file."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as one JSON object on stdout."),
) -> None:
    """Rank, alpha, targets, trainable parameters, size, dtype and base model of an adapter."""
    from lora_cli.inspection import adapter_facts, eval_loss_text

    facts = adapter_facts(adapter)
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    from lora_cli.display import console_for, counted, kv_table, size_text

    ranks = ", ".join(f"r={k} ×{v}" for k, v in facts["ranks"].items())
    rows = [
        ("base model", f"not recorded (a llama.cpp adapter for a {facts['architecture']} model)"
                       if facts.get("format") == "gguf" else f"{facts['base_model_name_or_path']}"
                       + (f" at revision {facts['revision']}" if facts.get("revision") else "")
                       + (" (dequantized GGUF: not the Hub's original weights)" if facts["base_is_gguf"] else "")),
        ("rank", f"{facts['r']} ({ranks})" if len(facts["ranks"]) > 1 else str(facts["r"])),
        ("alpha / scaling", f"{facts['lora_alpha']:g} / {facts['scaling']:.4g}"
                            + (" (rsLoRA: alpha/√r)" if facts["use_rslora"] else "")
                            + (" (written by lora export: each module's own scaling is folded into lora_b)"
                               if facts.get("scaling_folded") else "")
                            + (f"; {len(facts['alpha_pattern'])} module pattern(s) with their own alpha"
                               if facts["alpha_pattern"] else "")),
        *([("method", "DoRA: LoRA plus a learned magnitude per output row")] if facts["use_dora"] else []),
        ("targets", ", ".join(f"{k} ×{v}" for k, v in facts["modules"].items())
                    + f"  ({counted(facts['num_modules'], 'module')})"),
        *([("saved whole", ", ".join(facts["modules_to_save"]) + " (modules_to_save: trained in full)")]
          if facts.get("modules_to_save") else []),
        *([("unsupported", ", ".join(facts["unsupported"]) + " (lora describes it; its other commands refuse it)")]
          if facts.get("unsupported") else []),
        ("trainable params", f"{facts['trainable_params']:,}"),
        ("size", f"{size_text(facts['size_bytes'])} ({facts['dtype']})"),
    ]
    s = facts.get("train_summary")
    if s:
        steps = counted(s["steps"], "step") if isinstance(s.get("steps"), int) else f"{s.get('steps')} steps"
        line = f"{steps}, final loss {s.get('final_loss') or float('nan'):.4f}"
        if ev := eval_loss_text(s):
            line += f", eval loss {ev}"
        rows.append(("training", line + f", {s.get('wall_time_s')} s"))
    console_for(stderr=False).print(kv_table(f"adapter {adapter}", rows))


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
