"""What the user sees: rich tables, the training progress bar, and the loss curve."""

from __future__ import annotations

import time
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
    return console_for(stderr=True)


def console_for(stderr: bool) -> Console:
    """A terminal's width wraps; into a file or a pipe, nothing is cut or broken to fit 80 columns (rich's
    default there: a log's messages would not grep whole, and a table cut a model's path with '…'), unless
    $COLUMNS says a width. No console markup: what is printed holds paths, prompts and answers, whose square
    brackets are text (styles are given as Text)."""
    import os

    console = Console(stderr=stderr, highlight=False, markup=False)
    if not console.is_terminal:
        console.soft_wrap = True
        if not os.environ.get("COLUMNS"):
            console.width = 1000  # (tables stay as wide as their content)
    return console


def counted(n: int, noun: str) -> str:
    """1 module, 2 modules, 1,024 records."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def size_text(n: float) -> str:
    """Bytes for people: '512 bytes', '37.5 KiB', '3.55 MiB', '1.20 GiB' (binary units, named as such)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit != "KiB" else f"{n / scale:.1f} KiB"
    return f"{n:.0f} bytes"


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


class RecordProgress:
    """A transient bar while records are tokenized (large datasets take a while: ~0.6 ms a chat record on
    a CPU core, mostly rendering the template); nothing at all for small ones or when disabled. Without a
    terminal (a log) a plain line every `every_s` seconds instead, so a long tokenization is not silent."""

    def __init__(self, console: Console | None, what: str, total: int, min_total: int = 2000,
                 every_s: float = 30.0) -> None:
        self.progress, self.plain = None, False
        if console is None or total < min_total:
            return
        if not console.is_terminal:
            self.plain, self.console, self.what, self.total, self.every_s = True, console, what, total, every_s
            self.done, self.t0 = 0, time.monotonic()
            self.last = self.t0
            return
        self.progress = Progress(TextColumn(f"[bold]{what}"), MofNCompleteColumn(), BarColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.task = self.progress.add_task(what, total=total)

    def __enter__(self):
        if self.plain:
            return self._advance_plain
        if self.progress is None:
            return None
        self.progress.start()
        return lambda: self.progress.advance(self.task)

    def _advance_plain(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last, elapsed = now, now - self.t0
            eta = elapsed * (self.total - self.done) / self.done
            self.console.print(f"{self.what} {self.done:,}/{self.total:,} ({100 * self.done // self.total}%)  "
                               f"elapsed {_clock(elapsed)}  ETA {_clock(eta)}", highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


class TrainProgress:
    """A rich progress bar with loss, lr, tokens/s and ETA; silent when disabled (non-main processes).

    Without a terminal (a log file, CI, nohup) a live bar would print nothing until the end: instead a plain
    line every 10% of the run and at least every `every_s` seconds, and one for the last step."""

    def __init__(self, console: Console, total: int, start: int = 0, enabled: bool = True,
                 every_s: float = 30.0) -> None:
        self.enabled, self.console, self.total, self.start = enabled, console, total, start
        self.plain = enabled and not console.is_terminal
        self.every_s, self.t0 = every_s, time.monotonic()
        self.last_line, self.last_decile = self.t0, start * 10 // max(total, 1)
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss [bold]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False, disable=not enabled or self.plain,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", extra="")
        self.shown_extra = ""  # the live bar keeps the last eval in view (its width jumped at every eval step)

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tps: float, extra: str = "") -> None:
        self.shown_extra = extra or self.shown_extra
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}",
                             extra=self.shown_extra)
        if not self.plain:
            return
        now, decile = time.monotonic(), step * 10 // max(self.total, 1)
        if (step not in (self.start + 1, self.total) and decile == self.last_decile
                and now - self.last_line < self.every_s):
            return
        self.last_line, self.last_decile = now, decile
        elapsed = now - self.t0
        eta = elapsed / (step - self.start) * (self.total - step) if step > self.start else 0.0
        self.console.print(f"step {step}/{self.total} ({100 * step // max(self.total, 1)}%)  loss {loss:.4f}  "
                           f"lr {lr:.2e}  {tps:,.0f} tok/s  {extra + '  ' if extra else ''}"
                           f"elapsed {_clock(elapsed)}  ETA {_clock(eta)}", highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plot_loss(metrics: list[dict], path: Path) -> bool:
    """Draw train (and eval) loss against step into `path` if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    steps = [m["step"] for m in metrics if "loss" in m]
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [m["loss"] for m in metrics if "loss" in m], label="train loss", lw=1.2)
    ev = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if ev:
        ax.plot(*zip(*ev), "o-" if len(ev) <= 50 else "-", label="eval loss", lw=1.5)  # (markers would hide the train curve)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # (a 3-step run had ticks at 1.25, 1.5…)
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from lora_cli.errors import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True

