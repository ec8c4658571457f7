"""Small things several commands share (no heavy imports)."""

from __future__ import annotations

from lora_cli.config import DTYPE_ALIASES
from lora_cli.errors import UserError


def dtype_name(value: str | None, allowed: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> str | None:
    """Normalise a --dtype value (fp16/bf16/fp32 aliases) or raise a clear error."""
    if value is None:
        return None
    name = DTYPE_ALIASES.get(value.lower(), value.lower())
    if name not in allowed:
        aliases = [a for a in ("fp32", "bf16", "fp16") if DTYPE_ALIASES[a] in allowed]
        raise UserError(f"--dtype {value!r} is not one of {', '.join(allowed)} (or {', '.join(aliases)})")
    return name

