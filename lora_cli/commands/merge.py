"""`lora merge`: bake an adapter into its base model's weights (streaming, shard by shard)."""

from __future__ import annotations

from typing import Optional

import typer


def merge_command(
    adapter: str = typer.Argument(..., metavar="ADAPTER", help="Run directory, checkpoint, or any PEFT LoRA adapter directory."),
    output: str = typer.Option(..., "--output", "-o", help="Directory for the merged model."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model [default: the adapter's "
                                       "base_model_name_or_path]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 | auto (the base's) "
                                       "[default: auto]."),
    verify: bool = typer.Option(False, "--verify", help="Compare merged logits with base + adapter before writing "
                                "(an error if they differ by more than rounding to the dtype explains)."),
    force: bool = typer.Option(False, "--force", help="Replace --output if lora wrote it (never a folder of other files)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled base weights."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model's own Python code (models "
                                           "that need it): only from sources you trust. Without it, merge reads their "
                                           "files only, and --verify cannot run them."),
) -> None:
    """Bake the adapter into the base weights: a plain transformers model, no LoRA code needed to load it."""
    import time

    from lora_cli.commands.common import dtype_name
    from lora_cli.config import run_chat_template, run_settings
    from lora_cli.display import stderr_console
    from lora_cli.errors import UserError

    dtype = dtype_name(dtype, ("auto", "float32", "bfloat16", "float16"))
    dtype = None if dtype == "auto" else dtype  # the base's, as train and generate read auto
    console = stderr_console()
    import torch

    from lora_cli.merging import merge_to_directory, verify_merge

    if run_settings(adapter).get("load_in_4bit"):
        console.print("the run trained on a 4-bit (NF4) base: merging into the base's original unquantized weights, "
                      "never into 4-bit ones")
    verify_s = []

    def check(merged):
        t = time.perf_counter()
        v = verify_merge(adapter, merged, base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        verify_s.append(time.perf_counter() - t)
        explained = f"rounding to {v.dtype} explains {v.rounding:.3g}; " if v.rounding else ""
        said = f"max |logits(merged) − logits(base + adapter)| = {v.diff:.3g} ({explained}allowed {v.allowed:.3g})"
        if not v.ok:
            raise UserError(f"--verify: {said}: the merged model is not base + adapter, so nothing was written. "
                            "This is a bug in lora merge: please report it with the adapter's adapter_config.json")
        console.print(f"verify: {said}: ok")

    t0 = time.perf_counter()
    result = merge_to_directory(adapter, output, base, getattr(torch, dtype) if dtype else None, force, allow_pickle,
                                run_chat_template(adapter), status=console.print, check=check if verify else None,
                                trust_remote_code=trust_remote_code)
    console.print(f"merged {result.merged_modules} weights into {result.output} ({result.shards} shard(s), "
                  f"{result.dtype}) in {time.perf_counter() - t0 - sum(verify_s):.1f} s"
                  + (f", verified in {verify_s[0]:.1f} s" if verify_s else ""))


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
