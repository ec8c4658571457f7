"""`lora combine` and `lora resize`: exact adapter arithmetic on files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from lora_cli.commands.common import dtype_name

ADAPTERS_DTYPE = "float32 | bfloat16 | float16 [default: the adapters' own, float32 if they differ]."

def combine_command(
    adapters: list[str] = typer.Argument(..., metavar="ADAPTER...", help="Two or more adapter directories (same base)."),
    output: str = typer.Option(..., "--output", "-o", help="Directory for the combined adapter."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma list of weights [default: 1 each]."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Compress to this rank by SVD [default: exact, Σ ranks]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=ADAPTERS_DTYPE),
    force: bool = typer.Option(False, "--force", help="Replace --output if lora wrote it (never a folder of other files)."),
) -> None:
    """The weighted sum of the adapters' updates, exact by stacking ranks (correct with rsLoRA and mixed
    ranks/alphas); --rank compresses it by SVD."""
    from lora_cli.errors import UserError

    name = dtype_name(dtype)
    try:
        w = [float(x) for x in weights.split(",")] if weights is not None else [1.0] * len(adapters)
    except ValueError:
        raise UserError(f"--weights must be a comma list of numbers, got {weights!r}") from None
    if not all(math.isfinite(x) for x in w):
        raise UserError(f"--weights must be finite numbers, got {weights!r}")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be >= 1, got {rank}")
    from lora_cli.algebra import combine, write_factors
    from lora_cli.display import stderr_console

    config, factors, kept = combine(adapters, w, rank, warn=stderr_console().print)
    dtype = _dtype(name) or _stored_dtype(adapters)
    write_factors(Path(output), config, factors, dtype, force=force, reads=tuple(adapters))
    _report(output, config.r, kept, dtype=dtype, asked=name is not None)


def resize_command(
    adapter: str = typer.Argument(..., metavar="ADAPTER", help="Adapter directory."),
    rank: float = typer.Option(..., "--rank", help="New rank (a whole number >= 1), or a fraction of energy to keep per layer (< 1)."),
    output: str = typer.Option(..., "--output", "-o", help="Directory for the resized adapter."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=ADAPTERS_DTYPE.replace("adapters' own", "adapter's own")),
    force: bool = typer.Option(False, "--force", help="Replace --output if lora wrote it (never a folder of other files)."),
) -> None:
    """Change an adapter's rank by a per-layer truncated SVD of its update; prints the energy kept."""
    from lora_cli.algebra import resize, write_factors
    from lora_cli.display import stderr_console

    name = dtype_name(dtype)
    config, factors, kept = resize(adapter, rank, warn=stderr_console().print)
    dtype = _dtype(name) or _stored_dtype([adapter])
    write_factors(Path(output), config, factors, dtype, force=force, reads=(adapter,))
    _report(output, config.r, kept, {m: f.a.shape[0] for m, f in factors.items()}, dtype, asked=name is not None)


def extract_command(
    base: str = typer.Option(..., "--base", help="The base model (Hub id, directory, .gguf)."),
    tuned: str = typer.Option(..., "--tuned", help="The fully fine-tuned model (same architecture)."),
    rank: int = typer.Option(..., "--rank", help="Rank of the extracted adapter."),
    output: str = typer.Option(..., "--output", "-o", help="Directory for the adapter."),
    targets: str = typer.Option("all-linear", "--targets", help="all-linear, attention, a comma list of module names, or re:PATTERN (as for lora train)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    force: bool = typer.Option(False, "--force", help="Replace --output if lora wrote it (never a folder of other files)."),
) -> None:
    """A LoRA adapter approximating a full fine-tune: per-layer SVD of W_tuned − W_base, streamed."""
    from lora_cli.algebra import extract, write_factors
    from lora_cli.display import stderr_console
    from lora_cli.errors import check_output

    name = dtype_name(dtype)
    check_output(output, force, reads=(base, tuned))  # before the slow part
    config, factors, kept = extract(base, tuned, rank, targets, status=stderr_console().print)
    write_factors(Path(output), config, factors, _dtype(name), force=force, reads=(base, tuned))
    _report(output, config.r, kept, dtype=_dtype(name), asked=True)


def _dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _stored_dtype(adapters: list[str]):
    """The adapters' own float dtype when they share one (an export's float16 stays float16), else float32."""
    import torch

    from lora_cli.lora.peft_format import adapter_files, read_safetensors_header

    names = {t["dtype"] for a in adapters for t in read_safetensors_header(adapter_files(a)[1])[0].values()}
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(names.pop(), torch.float32) if len(names) == 1 \
        else torch.float32


def _report(output: str, r: int, kept: dict[str, tuple[float, float]], ranks: dict[str, int] | None = None,
            dtype=None, asked: bool = False) -> None:
    """Retained energy (Σ s² kept / Σ s²) per layer and overall."""
    from rich.table import Table

    from lora_cli.display import stderr_console

    console = stderr_console()
    if kept:
        table = Table(title="retained energy", title_justify="left", box=None, pad_edge=False)
        table.add_column("module", style="cyan")
        table.add_column("energy kept", justify="right")
        if ranks:
            table.add_column("r", justify="right")
        for m, (k, total) in kept.items():
            table.add_row(m, f"{100 * k / total if total else 100:.2f}%", *([str(ranks[m])] if ranks else []))
        console.print(table)
        k_all, t_all = sum(k for k, _ in kept.values()), sum(t for _, t in kept.values())
        console.print(f"overall: {100 * k_all / t_all if t_all else 100:.2f}% of the energy kept")
    name = str(dtype).replace("torch.", "")
    stored = "" if dtype is None or name == "float32" else f"; {name}" if asked else f"; {name}, as its input"
    console.print(f"wrote {output} (r={r}, scaling folded into B: lora_alpha = r{stored})")


def register(app: typer.Typer) -> None:
    app.command("combine")(combine_command)
    app.command("resize")(resize_command)
    app.command("extract")(extract_command)
