"""Checkpoints (save / find / resume), the run-directory lock, and interruption by signals."""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_cli.errors import UserError, atomic_dir, creating

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
_STEP_RX = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their state file exists), oldest first. Temp dirs never match."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RX.match(d.name)
        if m and (d / STATE_NAME).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states of this process (JSON-able + tensors)."""
    np_state = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def optimizer_state(model, optimizer, engine: str) -> dict:
    """The optimizer's state in a form that resumes on every process. A collective under FSDP and DeepSpeed.

    Plain and DDP: keyed by parameter name (torch.distributed.checkpoint's full format). FSDP: the same,
    gathered from the shards by torch.distributed.checkpoint (rank 0 gets it, on CPU; the others `{}`).
    DeepSpeed: every rank's ZeRO partition, in rank order, as DeepSpeed's own loader takes them.
    """
    if engine == "FSDP":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, _inner(optimizer), options=opts)
    if engine == "DeepSpeed":
        from accelerate.utils import gather_object

        return {"deepspeed_partitions": gather_object([_inner(optimizer).state_dict()])}
    sd, names = optimizer.state_dict(), _trainable_names(model)
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(model, optimizer, sd: dict, engine: str) -> None:
    """Inverse of `optimizer_state`: every process takes its own part."""
    if engine == "FSDP":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, _inner(optimizer), sd, options=StateDictOptions(full_state_dict=True))
    elif engine == "DeepSpeed":
        _inner(optimizer).load_state_dict(sd["deepspeed_partitions"])
    elif all(isinstance(i, int) for g in sd["param_groups"] for i in g["params"]):
        optimizer.load_state_dict(sd)  # keyed by position: a checkpoint written before names were used
    else:
        index = {n: i for i, n in enumerate(_trainable_names(model))}
        optimizer.load_state_dict({"state": {index[n]: v for n, v in sd["state"].items()},
                                   "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                                    for g in sd["param_groups"]]})


def _trainable_names(model) -> list[str]:
    """Names of the trainable parameters in the order the optimizer was given them (DDP's `module.` off)."""
    model = getattr(model, "module", model)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _deepspeed_state_classes() -> list:
    """The non-tensor objects in a ZeRO optimizer's state, allowed through torch.load(weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one


def save_checkpoint(run_dir: Path, step: int, write_adapter, optimizer_sd: dict, scheduler, state: dict,
                    rng_states: list[dict], engine: str = "none") -> Path:
    """Write checkpoints/step-NNNNNN atomically (temp dir, then rename). Called on the main process with
    every process's RNG state and the gathered optimizer state; `write_adapter(dir)` writes the adapter."""
    target = checkpoint_dir(run_dir, step)
    with atomic_dir(target) as tmp:
        write_adapter(tmp)
        torch.save(optimizer_sd, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng_state_{rank}.pt")
        state = {**state, "step": step, "world_size": len(rng_states), "parallelism": engine}
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2))
    return target


def load_checkpoint_state(ckpt: Path, model, optimizer, scheduler, rank: int = 0, world: int = 1,
                          engine: str = "none") -> dict:
    """Restore optimizer, scheduler and RNG from `ckpt`; return its trainer state. A run resumes with the
    process count it was written by (--batch-size is per process) and with or without DeepSpeed as it was."""
    try:
        state = json.loads((ckpt / STATE_NAME).read_text())
    except (OSError, ValueError) as e:
        raise _unreadable(ckpt, e) from None
    saved_world, saved_engine = state.pop("world_size", 1), state.pop("parallelism", "none")
    if saved_world != world:
        raise UserError(f"{ckpt.name} was written by {saved_world} process(es) and this resume runs {world}; "
                        f"launch it with {saved_world} to continue the same run")
    if (saved_engine == "DeepSpeed") != (engine == "DeepSpeed"):
        raise UserError(f"{ckpt.name} was written {'under' if saved_engine == 'DeepSpeed' else 'without'} DeepSpeed "
                        f"(its optimizer state is in that form); resume it the same way")
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes() if engine == "DeepSpeed" else []):
            optimizer_sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
        load_optimizer_state(model, optimizer, optimizer_sd, engine)
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        rng_file = ckpt / f"rng_state_{rank}.pt"
        if not rng_file.is_file():  # (every checkpoint holds one per process: without it, dropout would differ)
            raise UserError(f"checkpoint {ckpt} lacks {rng_file.name}, so the run cannot continue exactly; delete "
                            "the checkpoint to resume from an earlier one")
        set_rng_state(torch.load(rng_file, weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise _unreadable(ckpt, e) from None
    return state


def _unreadable(ckpt: Path, e: Exception) -> UserError:
    text = str(e)
    # torch's own advice (load with weights_only=False) is wrong for a damaged file: keep what it found
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    reason = found.group(1) if found else (text.strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
    return UserError(f"checkpoint {ckpt} is unreadable ({reason.rstrip('.')}): the file is damaged; delete the "
                     "checkpoint to resume from an earlier one")


def prune_checkpoints(run_dir: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest `keep` checkpoints plus the best one by eval loss."""
    ckpts = list_checkpoints(run_dir)
    newest = {s for s, _ in ckpts[-keep:]}
    for s, d in ckpts:
        if s not in newest and s != best_step:
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An OS file lock on the run directory (released automatically if the process dies), held through
    `.lock`, which is removed at the end: a finished run folder holds only what the run wrote.

    The directories this lock created (the run's, and parents such as runs/) that are still empty afterwards
    (the run failed early) are removed.
    """
    import fcntl
    import itertools
    import os

    created = list(itertools.takewhile(lambda d: not d.exists(), (run_dir, *run_dir.absolute().parents)))
    with creating(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    while True:
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise UserError(f"{run_dir} is in use by another lora run (locked); wait for it or pick another "
                            "--output") from None
        try:  # the file a run that just ended removed is not the lock any more: take the one now there
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # (while held: a run that opened it now finds it gone and takes a new one)
        fh.close()
        for d in created:  # the deepest first, up to one that holds something
            try:
                d.rmdir()
            except OSError:
                break


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks after each step; a second signal aborts at once.

    Explicit handlers, since a background process of a non-interactive shell starts with SIGINT ignored.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[s] = signal.signal(s, self._handle)
        for s in (signal.SIGINT, signal.SIGTERM):  # a signal a library swallowed before (the CLI's handler marks
            if getattr(self._old.get(s), "received", False):  # it): stop at the first step, as if it came now
                self.signal = signal.Signals(s).name
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def check_run_dir(run_dir: Path, force: bool, resume: bool, run_files: tuple[str, ...]) -> None:
    """Raise unless `run_dir` may hold this run: absent or empty (hidden files aside: .gitkeep, a killed run's
    .lock and temporary files), continued (--resume) or an earlier run (--force replaces its files; what else
    it holds, an export of it say, stays). Never a folder of other files: the run would be written among them.
    `run_files`: what a run writes, its config first."""
    if blocking := next((a for a in run_dir.absolute().parents if a.exists() and not a.is_dir()), None):
        raise UserError(f"cannot write {run_dir}: {blocking} is a file, not a folder")
    if resume or not run_dir.exists():
        return
    if run_dir.is_file():
        raise UserError(f"--output {run_dir} is a file")
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    if not names:
        return
    if (run_dir / run_files[0]).is_file():
        if not force:
            raise UserError(f"--output {run_dir} holds an earlier run; pass --force to replace it, or --resume to "
                            "continue it")
        return
    theirs = [n for n in names if n in run_files]  # another tool's adapter holds a run's file names
    what = f"holds {theirs[0]} but is not a lora run" if theirs else f"is not a lora run (it holds {names[0]})"
    raise UserError(f"--output {run_dir} {what}; the run would be written among its files (--force replaces only "
                    "an earlier run's): choose a new or empty folder")
