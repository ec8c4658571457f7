"""What the user sees: rich tables, the training progress bar, and the loss curve."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def stderr_console() -> Console:
    """Human output goes to stderr, so stdout stays clean for machine output (--dry-run, --json)."""
    return Console(stderr=True, highlight=False)


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


class RecordProgress:
    """A transient bar while records are tokenized (large datasets take a while: ~0.6 ms a chat record on
    a CPU core, mostly rendering the template); nothing at all for small ones or when disabled."""

    def __init__(self, console: Console | None, what: str, total: int, min_total: int = 2000) -> None:
        self.progress = None
        if console is not None and console.is_terminal and total >= min_total:  # a log gets no bar (nor a blank line)
            self.progress = Progress(TextColumn(f"[bold]{what}"), MofNCompleteColumn(), BarColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=console, transient=True)
            self.task = self.progress.add_task(what, total=total)

    def __enter__(self):
        if self.progress is None:
            return None
        self.progress.start()
        return lambda: self.progress.advance(self.task)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


class TrainProgress:
    """A rich progress bar with loss, lr, tokens/s and ETA; silent when disabled (non-main processes)."""

    def __init__(self, console: Console, total: int, start: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss [bold]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False, disable=not enabled,
            refresh_per_second=4 if console.is_terminal else 0.2,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", extra="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tps: float, extra: str = "") -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}",
                             extra=extra)


def plot_loss(metrics: list[dict], path: Path) -> bool:
    """Draw train (and eval) loss against step into `path` if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [m["step"] for m in metrics if "loss" in m]
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [m["loss"] for m in metrics if "loss" in m], label="train loss", lw=1.2)
    ev = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from lora_cli.errors import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True

