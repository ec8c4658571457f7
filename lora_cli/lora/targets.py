"""Which modules to wrap: resolving `--targets` against a model, and naming them for PEFT.

`attention` is read from the model itself: the innermost modules whose class name says they are
attention (LlamaAttention, GPT2Attention, GPTNeoXAttention, FalconAttention, …) and the linear layers
inside them. That covers fused projections (Phi-3 `qkv_proj`, GPT-2 `c_attn`, NeoX `query_key_value`)
and never picks an MLP layer that merely shares a name (GPT-2's `mlp.c_proj`).
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from lora_cli.errors import UserError
from lora_cli.lora.layer import is_linear_like
from lora_cli.lora.peft_format import ALL_LINEAR, suffix_matches

ATTENTION = "attention"
REGEX_PREFIX = "re:"


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every wrappable linear module of the model, by dotted path."""
    return {name: m for name, m in model.named_modules() if name and is_linear_like(m) and _maps_linearly(m)}


def _maps_linearly(module: nn.Module) -> bool:
    """False for a model's nn.Linear subclass whose own forward is not a linear map: MoE routers that return
    (scores, logits) (Phi-MoE, Llama 4), grouped projections. One call on a zero row tells; quantized
    linears (bitsandbytes) and plain ones are not asked."""
    forward = getattr(type(module), "forward", None)
    if not isinstance(module, nn.Linear) or forward is nn.Linear.forward:
        return True
    if not type(module).__module__.startswith("transformers.models.") or module.weight.device.type == "meta" \
            or module.weight.numel() == 0:  # partitioned (ZeRO-3): nothing to ask
        return True
    import torch

    try:
        with torch.no_grad():
            out = module(torch.zeros(1, module.in_features, dtype=module.weight.dtype, device=module.weight.device))
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, module.out_features)


def output_head_names(model: nn.Module) -> set[str]:
    """The output projection (lm_head) is never a target of `all-linear`, as in PEFT."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, m in model.named_modules():
        if (head is not None and m is head) or name.split(".")[-1] in ("lm_head", "embed_out"):
            names.add(name)
    return names


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


CROSS_ATTENTION = ("encoder_attn", "crossattention", "cross_attn", "cross_attention")  # attends to an encoder's output
ROUTERS = ("router", "gate", "gating")  # a mixture-of-attention's top-k gate (JetMoE) is no projection


def attention_projections(model: nn.Module, linears: dict[str, nn.Module] | None = None) -> list[str]:
    """Linear layers inside the model's innermost attention modules, detected by class name; of its text
    decoder only, when it has one inside (a multimodal model's vision tower never runs on text). Not the
    cross-attention of a decoder made for an encoder (BART's or Whisper's causal LM: it never runs on text
    alone) nor a router inside attention, when there are other projections."""
    attn = {name: m for name, m in model.named_modules() if name and _is_attention(m)}
    innermost = [n for n in attn if not any(o != n and o.startswith(n + ".") for o in attn)]
    linears = linear_modules(model) if linears is None else linears
    found = sorted(name for name in linears if any(name.startswith(a + ".") for a in innermost))
    decoder = _decoder_path(model)
    in_decoder = [n for n in found if decoder is None or n.startswith(decoder + ".")] or found
    projections = [n for n in in_decoder if not _cross_or_router(model, n, innermost)]
    return projections or in_decoder


def _cross_or_router(model: nn.Module, name: str, innermost: list[str]) -> bool:
    """Whether linear `name` is in a cross-attention module, or is (or is inside) a router of its attention."""
    attention = max((a for a in innermost if name.startswith(a + ".")), key=len)
    if attention.split(".")[-1].lower() in CROSS_ATTENTION or "crossattention" in \
            type(model.get_submodule(attention)).__name__.lower():
        return True
    inside = name[len(attention) + 1 :].split(".")
    path = attention
    for part in inside:
        path = f"{path}.{part}"
        kind = type(model.get_submodule(path)).__name__.lower()
        if part.lower() in ROUTERS or "router" in kind or "gating" in kind:
            return True
    return False


def _decoder_path(model: nn.Module) -> str | None:
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except Exception:
        return None
    return next((n for n, m in model.named_modules() if n and m is decoder), None)


def describe_linears(model: nn.Module, limit: int = 12) -> str:
    """A short list of the model's linear modules by their last name, with counts, for error messages."""
    counts = Counter(name.split(".")[-1] for name in linear_modules(model))
    shown = ", ".join(f"{k} (×{v})" if v > 1 else k for k, v in counts.most_common(limit))
    more = len(counts) - limit
    return shown + (f", … {more} more" if more > 0 else "") if counts else "none"


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Module paths to wrap for `--targets` (attention | all-linear | comma list, keywords allowed in it |
    re:PATTERN).

    Raises UserError naming the model's linear modules when nothing matches.
    """
    linears = linear_modules(model)
    if isinstance(targets, list):
        spec = ",".join(targets)
        keys = [t.strip() for t in targets if t.strip()]
    else:
        spec = targets.strip()
        keys = [t.strip() for t in spec.split(",") if t.strip()]
    if len(keys) > 1 and not spec.startswith(REGEX_PREFIX) and {ATTENTION, ALL_LINEAR} & set(keys):
        # a keyword with names: `attention,down_proj` is the attention projections plus the down projections
        return sorted(set().union(*(resolve_targets(model, k) for k in keys)))
    if spec == ATTENTION:
        found = attention_projections(model, linears)
        if not found:
            raise UserError(
                f"cannot find the attention projections of {type(model).__name__}; name them with --targets "
                f"(its linear modules: {describe_linears(model)}), or use --targets all-linear"
            )
        return found
    if spec == ALL_LINEAR:
        heads = output_head_names(model)
        found = sorted(n for n in linears if n not in heads)
    elif spec.startswith(REGEX_PREFIX):
        pattern = spec[len(REGEX_PREFIX) :]
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise UserError(f"--targets: invalid regular expression {pattern!r}: {e}") from None
        found = sorted(n for n in linears if rx.fullmatch(n))
    else:
        found = sorted(n for n in linears if any(suffix_matches(n, k) for k in keys))
        unmatched = [k for k in keys if not any(suffix_matches(n, k) for n in linears)]
        if found and unmatched:
            raise UserError(
                f"--targets: no linear module matches {', '.join(unmatched)} "
                f"(the model's linear modules: {describe_linears(model)})"
            )
    if not found:
        raise UserError(
            f"--targets {spec!r} matched no linear module of {type(model).__name__} "
            f"(its linear modules: {describe_linears(model)})"
        )
    return found


def peft_target_names(model: nn.Module, wrapped: list[str]) -> list[str]:
    """The shortest dotted suffixes that make PEFT's suffix match wrap exactly `wrapped`, sorted.

    GPT-2's attention `c_proj` becomes `attn.c_proj`, since a bare `c_proj` would also hit the MLP. A layer of
    an nn.Sequential keeps its container's name (`ffn.2`, never a bare `2`, which would name any third child).
    """
    wrapped_set = set(wrapped)
    all_names = [n for n, _ in model.named_modules() if n]
    names = set()
    for path in wrapped:
        parts = path.split(".")
        first = next((k for k in range(1, len(parts) + 1) if not parts[-k].isdigit()), len(parts))
        for k in range(first, len(parts) + 1):
            key = ".".join(parts[-k:])
            if all(n in wrapped_set for n in all_names if suffix_matches(n, key)):
                names.add(key)
                break
    return sorted(names)
