"""Small things several commands share (no heavy imports)."""

from __future__ import annotations

from pathlib import Path

from lora_cli.config import DTYPE_ALIASES
from lora_cli.errors import UserError


def dtype_name(value: str | None, allowed: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> str | None:
    """Normalise a --dtype value (fp16/bf16/fp32 aliases) or raise a clear error."""
    if value is None:
        return None
    name = DTYPE_ALIASES.get(value.lower(), value.lower())
    if name not in allowed:
        raise UserError(f"--dtype {value!r} is not one of {', '.join(allowed)}")
    return name


def run_chat_template(adapter_dir: str | Path) -> str | None:
    """The chat template a run trained with, if it set one with --chat-template (read from train_config.yaml)."""
    import yaml

    cfg_file = Path(adapter_dir) / "train_config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        path = (yaml.safe_load(cfg_file.read_text()) or {}).get("chat_template")
    except yaml.YAMLError:
        return None
    return Path(path).read_text(encoding="utf-8") if path and Path(path).is_file() else None
