"""Adapter I/O in PEFT's format, natively: save a wrapped model's LoRA, load any PEFT LoRA adapter."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lora_cli.errors import UserError, atomic_path, atomic_write_text, few, mark
from lora_cli.lora.inject import inject_lora, lora_layers, lora_state_dict
from lora_cli.lora.layer import linear_shape
from lora_cli.lora.peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    WEIGHTS_NAME,
    AdapterConfig,
    adapter_files,
    broken_adapter_error,
    check_ranks,
    embedding_lora,
    older_layout_hint,
    read_adapter_config,
    save_safetensors,
)
from lora_cli.lora.targets import ALL_LINEAR, linear_modules, resolve_targets

_KEY_RX = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def natural_key(text: str) -> list:
    """Sorts layer 2 before layer 10."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", text)]


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    config: AdapterConfig,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT key layout) atomically."""
    out_dir = Path(out_dir)
    tensors = {
        KEY_PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in lora_state_dict(model).items()
    }
    write_adapter(out_dir, config, tensors, metadata)


def write_adapter(
    out_dir: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write PEFT-keyed tensors and their config; weights first, so a config never names missing weights."""
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_safetensors(tensors, tmp, metadata={"format": "pt", **mark(), **(metadata or {})})
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(config.to_peft_dict(), indent=2) + "\n")


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed by module path (`….lora_A.weight`), PEFT's prefix removed."""
    _, weights = adapter_files(path)
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights}: cannot read the adapter weights ({e}); the file is corrupt or truncated") from None
    problems = [k for k in raw if not k.startswith(KEY_PREFIX)]
    if problems:
        raise UserError(
            f"{weights}: tensor names lack PEFT's '{KEY_PREFIX}' prefix (e.g. {problems[0]!r}); not a PEFT adapter"
        )
    tensors = {k[len(KEY_PREFIX) :]: v for k, v in raw.items()}
    # PEFT saves the base weight (and bias) of a targeted output head or embedding beside its LoRA
    # (save_embedding_layers "auto"): a copy of the base's own, not part of the update, which merge and generate
    # check against the base (base_copies); a resized vocabulary shows in lora_B's shape
    tensors = {k: v for k, v in tensors.items() if not _base_copy(k, tensors)}
    config = read_adapter_config(path)
    saved = [k for k in tensors if _is_saved(k, config)]
    odd = sorted(k for k in tensors if not _KEY_RX.match(k) and not _is_saved(k, config)
                 # PEFT's ensure_weight_tying saves the tied partner of a saved layer too (the same tensor)
                 and not (config.ensure_weight_tying and any(tensors[s].shape == tensors[k].shape
                                                             and torch.equal(tensors[s], tensors[k]) for s in saved)))
    if odd:  # never dropped silently: a merge, export or combine without them would be another adapter
        if what := embedding_lora(odd):
            raise UserError(f"{weights} holds {what}; lora implements LoRA on linear layers only")
        if all(re.search(r"(embed|wte|lm_head|embed_out|output)[^.]*\.weight$", k) for k in odd):
            raise UserError(f"{weights} holds whole embedding or output-head matrices ({few(odd)}), as PEFT's "
                            "save_embedding_layers saves them (after a vocabulary resize, say), which PEFT loads "
                            "over the base's; lora applies LoRA to the base's own weights: merge it with PEFT, or "
                            "give --base the base with those matrices")
        raise UserError(f"{weights} holds {len(odd)} {'tensor that is' if len(odd) == 1 else 'tensors that are'} not "
                        f"LoRA factors (e.g. {odd[0]!r}); lora implements LoRA on linear layers only")
    check_ranks(config, {k: list(v.shape) for k, v in tensors.items()}, weights)
    broken = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:  # merge, export, combine and resize would pass them on
        raise broken_adapter_error(weights, broken)
    return tensors


def _base_copy(key: str, keys) -> str | None:
    """The module path of a `….base_layer.weight|bias` that PEFT saved beside that module's LoRA, else None."""
    path, _, leaf = key.rpartition(".base_layer.")
    return path if leaf in ("weight", "bias") and f"{path}.lora_A.weight" in keys else None


def base_copies(path: str | Path) -> dict[str, torch.Tensor]:
    """The base weights PEFT saved beside a targeted head's or embedding's LoRA, by `{module}.base_layer.weight`
    (or `.bias`), PEFT's prefix removed."""
    from safetensors import safe_open

    _, weights = adapter_files(path)
    with safe_open(str(weights), "pt") as f:
        keys = [k.removeprefix(KEY_PREFIX) for k in f.keys()]
        return {k: f.get_tensor(KEY_PREFIX + k) for k in keys if _base_copy(k, keys)}


def check_base_copies(copies: dict[str, torch.Tensor], base_value, adapter: str | Path) -> None:
    """The base weights an adapter carries (base_copies) must be the base's own (`base_value("{module}.weight")`,
    or None where the base has none): PEFT loads them over the base's, and lora applies LoRA to the base's
    weights, so one that differs (the adapter trained on another version of the base, or on a head whose new
    tokens' rows were set before training) is an error, not another model."""
    for key, saved in copies.items():
        own = base_value(key.replace(".base_layer.", "."))
        if own is None:
            continue
        saved = saved.to(own.device)
        low = saved.dtype if saved.element_size() <= own.element_size() else own.dtype  # (compared as stored)
        if saved.shape != own.shape or not torch.equal(saved.to(low), own.to(low)):
            gap = f" (max |Δ| {(saved.float() - own.float()).abs().max().item():.3g})" if saved.shape == own.shape \
                else f" (shape {tuple(saved.shape)}, the base's {tuple(own.shape)})"
            raise UserError(f"{adapter} holds {key}, the weights it was trained on, and they are not the base's{gap}: "
                            "trained on another version of the base (--base gives it), or on a head changed before "
                            "training (new tokens' rows); lora applies LoRA to the base's own weights: use the base "
                            "it was trained on, or PEFT")


def _is_saved(key: str, config: AdapterConfig) -> bool:
    """A whole layer's weight or bias carried by the adapter (modules_to_save)."""
    path, _, leaf = key.rpartition(".")
    return leaf in ("weight", "bias") and config.saves(path, within=True)


def saved_layers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's whole-layer tensors (modules_to_save), by `{module path}.weight|bias`."""
    return {k: v for k, v in tensors.items() if not _KEY_RX.match(k)}


def adapter_module_paths(model: nn.Module, config: AdapterConfig, linears: dict[str, nn.Module] | None = None
                         ) -> list[str]:
    """The linear modules PEFT would wrap for this config (list = suffix match, str = full-match regex,
    with layers_to_transform and exclude_modules). `linears`: linear_modules(model), if already found."""
    if config.target_modules == ALL_LINEAR:  # PEFT expands it to the names of the linear layers
        names = sorted({p.rsplit(".", 1)[-1] for p in resolve_targets(model, ALL_LINEAR)})
        config = dataclasses.replace(config, target_modules=names)
    return sorted(n for n in (linear_modules(model) if linears is None else linears) if config.targets(n))


def check_adapter_fits(
    model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], source: str
) -> list[str]:
    """Every name / shape / dtype problem of `tensors` (as read_adapter_tensors gives them: finite, ranks
    checked) against `model`, raised together.

    Returns the module paths to wrap.
    """
    modules, linears = dict(model.named_modules()), linear_modules(model)
    paths = adapter_module_paths(model, config, linears)
    problems: list[str] = []
    wanted: set[str] = set()  # the module paths the tensors name
    for key, t in tensors.items():
        m = _KEY_RX.match(key)
        if m is None:  # a layer saved whole (modules_to_save): read_adapter_tensors let only these through
            path, _, leaf = key.rpartition(".")
            wanted.add(path)
            base = getattr(modules.get(path), leaf, None)
            if not isinstance(base, torch.Tensor):
                problems.append(f"{path} has no {leaf} in the base")
            elif tuple(base.shape) != tuple(t.shape):
                problems.append(f"{key} is {tuple(t.shape)}, the base's {tuple(base.shape)}"
                                + (" (the vocabulary was resized)" if t.shape[1:] == base.shape[1:] else ""))
            continue
        wanted.add(m["path"])
        if m["path"] not in paths:
            if m["path"] not in modules:
                where = "is not a module of the base"
            elif m["path"] not in linears:
                where = f"is not a linear layer of the base (a {type(modules[m['path']]).__name__})"
            else:
                where = "is not in target_modules"
            problems.append(f"{m['path']} {where}")
        elif not t.is_floating_point():
            problems.append(f"{key} has dtype {t.dtype}")
    for path in paths:
        a, b = tensors.get(f"{path}.lora_A.weight"), tensors.get(f"{path}.lora_B.weight")
        if a is None or b is None:
            problems.append(f"no lora_A/lora_B weights for {path}")
            continue
        n_in, n_out = linear_shape(modules[path])
        r, _ = config.rank_and_alpha(path)
        if tuple(a.shape) != (r, n_in):
            problems.append(f"{path}.lora_A is {tuple(a.shape)}, the base needs ({r}, {n_in})")
        if tuple(b.shape) != (n_out, r):
            problems.append(f"{path}.lora_B is {tuple(b.shape)}, the base needs ({n_out}, {r})")
        mag = tensors.get(f"{path}.lora_magnitude_vector")
        if config.use_dora and (mag is None or tuple(mag.shape) != (n_out,)):
            problems.append(f"{path}.lora_magnitude_vector is {None if mag is None else tuple(mag.shape)}, DoRA "
                            f"needs ({n_out},)")
        if not config.use_dora and mag is not None:
            problems.append(f"{path} has a DoRA magnitude but the config says use_dora=false")
    if wanted and not wanted & modules.keys():
        raise UserError(f"adapter {source} does not fit this base model: none of its {len(wanted)} modules (e.g. "
                        f"{min(wanted)}) is in it; it was trained on {config.base_model_name_or_path or 'another model'}"
                        + older_layout_hint(wanted))
    if problems:
        # one line a module; shape mismatches first (they say most plainly that it is another model), layers in order
        problems = sorted(dict.fromkeys(problems), key=lambda p: ("needs (" not in p and ", the base's (" not in p,
                                                                  natural_key(p)))
        shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        trained = f" (it was trained on {config.base_model_name_or_path})" if config.base_model_name_or_path else ""
        raise UserError(f"adapter {source} does not fit this base model{trained}: {shown}")
    return paths


def read_adapter(path: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """An adapter's config and checked tensors."""
    return read_adapter_config(path), read_adapter_tensors(path)


def load_adapter(model: nn.Module, path: str | Path, dropout: float = 0.0,
                 read: tuple[AdapterConfig, dict[str, torch.Tensor]] | None = None) -> AdapterConfig:
    """Wrap `model` with the adapter at `path` (any PEFT LoRA adapter) and load its weights (`read`: what
    read_adapter(path) gave, if it was read already)."""
    config, tensors = read or read_adapter(path)
    paths = check_adapter_fits(model, config, tensors, str(path))
    check_base_copies(base_copies(path), lambda key: _param(model, key), path)
    inject_lora(model, paths, config.rank_and_alpha, dropout=dropout, use_rslora=config.use_rslora,
                use_dora=config.use_dora)
    with torch.no_grad():
        for p, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(tensors[f"{p}.lora_A.weight"])
            layer.lora_B.weight.copy_(tensors[f"{p}.lora_B.weight"])
            if layer.use_dora:
                layer.lora_magnitude_vector.copy_(tensors[f"{p}.lora_magnitude_vector"])
    replace_saved_layers(model, saved_layers(tensors))
    return config


def _param(model: nn.Module, key: str) -> torch.Tensor | None:
    """A module's weight or bias by `{module path}.weight|bias` (of its base layer once LoRA wraps it)."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path)
    value = getattr(getattr(module, "base_layer", module), leaf, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def replace_saved_layers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put the adapter's whole layers (modules_to_save) in place, as new parameters: a tied output head gets
    its own weight, as under PEFT. The originals are kept for unload_lora."""
    originals = model.__dict__.setdefault("_lora_replaced", {})
    for key, t in saved.items():
        path, _, leaf = key.rpartition(".")
        module = model.get_submodule(path)
        old = getattr(module, leaf)
        originals.setdefault(key, old)
        setattr(module, leaf, nn.Parameter(t.to(old.device, old.dtype), requires_grad=False))
