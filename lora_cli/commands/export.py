"""`lora export`: the small shareable adapter (PEFT format, float16 by default) plus a model card."""

from __future__ import annotations

from typing import Optional

import typer


def export_command(
    adapter: str = typer.Argument(..., metavar="ADAPTER", help="Run directory, checkpoint, or adapter directory."),
    output: str = typer.Option(..., "--output", "-o", help="Directory to write."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 | float32."),
    fmt: str = typer.Option("peft", "--format", help="peft (a directory) | gguf (a llama.cpp LoRA file)."),
    portable: bool = typer.Option(False, "--portable", help="Fold the scaling into B, one rank everywhere, "
                                  "r = lora_alpha: identical results in servers that assume one alpha / r."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model for --format gguf [default: the adapter's]."),
    force: bool = typer.Option(False, "--force", help="Replace --output if lora wrote it (never a folder of other files)."),
) -> None:
    """Write a small adapter that PEFT, vLLM and other servers load as it is, with a README model card."""
    from lora_cli.commands.common import dtype_name
    from lora_cli.display import size_text, stderr_console
    from lora_cli.errors import UserError

    name = dtype_name(dtype)
    if fmt not in ("peft", "gguf"):
        raise UserError(f"--format must be peft or gguf, got {fmt!r}")
    if fmt == "gguf" and portable:
        raise UserError("--portable is for --format peft: a GGUF adapter is portable already (one rank, the "
                        "scaling folded into B)")
    if base and fmt != "gguf":
        raise UserError("--base is for --format gguf: a PEFT adapter names the base it was trained on (PEFT and "
                        "servers load it onto the base they are given)")
    import torch

    from lora_cli.exporting import export_adapter, export_gguf, export_portable

    if fmt == "gguf":
        info = export_gguf(adapter, output, base, getattr(torch, name), force, stderr_console().print)
    elif portable:
        info = export_portable(adapter, output, getattr(torch, name), force)
    else:
        info = export_adapter(adapter, output, getattr(torch, name), force)
    line = f"wrote {info['output']}: adapter {size_text(info['size_bytes'])} ({name})"
    if info["base_size_bytes"]:
        line += (f", {100 * info['size_bytes'] / info['base_size_bytes']:.2f}% of the base model files' "
                 f"{size_text(info['base_size_bytes'])}")
    stderr_console().print(line)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
