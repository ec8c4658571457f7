"""`lora train`: its flags are generated from TrainConfig, so defaults live in one place."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Optional

import typer

from lora_cli.config import TrainConfig
from lora_cli.errors import UserError

EXTRA_FLAGS = {
    "config": (Optional[str], typer.Option(None, "--config", "-c", help="YAML file with option values "
                                           "(keys = option names with underscores).", rich_help_panel="Run")),
    "dry_run": (bool, typer.Option(False, "--dry-run", help="Print the resolved config as YAML and exit; write "
                                   "nothing.", rich_help_panel="Run")),
    "resume": (bool, typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint.",
                                  rich_help_panel="Run")),
    "force": (bool, typer.Option(False, "--force", help="Replace an earlier run at --output (never a folder of other files).",
                                 rich_help_panel="Run")),
}


# short forms, as the other commands spell them
SHORT = {"model": ["-m"], "output": ["-o"]}


def _config_params() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        base = next((a for a in getattr(hint, "__args__", ()) if a is not type(None)), hint)
        flag = "--" + f.name.replace("_", "-")
        decl = [flag] if base is not bool else [f"{flag}/--no-{flag[2:]}"]
        decl += SHORT.get(f.name, [])
        default = "" if f.default is None else f" [default: {f.default}]"
        option = typer.Option(None, *decl, help=f.metadata["help"] + default, show_default=False,
                              rich_help_panel=f.metadata["group"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[base]))
    for name, (ann, option) in EXTRA_FLAGS.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=ann))
    return params


def train_command(**kwargs) -> None:
    """Fine-tune MODEL on DATA with LoRA and write a run directory (PEFT-format adapter, metrics, config)."""
    import sys

    from lora_cli.display import stderr_console

    config_path, dry_run, resume, force = (kwargs.pop(k) for k in EXTRA_FLAGS)
    if resume and force:
        raise UserError("--resume continues the run and --force starts it over; give one of them")
    cfg, given = TrainConfig.from_sources({k: v for k, v in kwargs.items() if v is not None}, config_path)
    if dry_run:
        from pathlib import Path

        from lora_cli.checkpoints import check_run_dir
        from lora_cli.training import RUN_FILES, resolve_run_config

        cfg = resolve_run_config(cfg, resume, given).resolved()
        cfg.validate()
        check_run_dir(Path(cfg.output), force, resume, RUN_FILES)  # the real run would refuse this --output
        sys.stdout.write(cfg.to_yaml())
        return
    if not resume:
        cfg.resolved().validate()  # every flag problem at once, before any model loads
    from lora_cli.training import train

    train(cfg, stderr_console(), given, resume=resume, force=force)


_params = _config_params()
train_command.__signature__ = inspect.Signature(_params)
train_command.__annotations__ = {p.name: p.annotation for p in _params}


def register(app: typer.Typer) -> None:
    app.command("train", help=train_command.__doc__)(train_command)
