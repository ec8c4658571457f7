"""Putting LoRA into a model and taking it out again: wrap, freeze, collect, merge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lora_cli.errors import UserError
from lora_cli.lora.layer import LoraLinear, linear_shape

# (module path) -> (r, lora_alpha); lets adapters with PEFT's rank_pattern / alpha_pattern load.
RankFn = Callable[[str], tuple[int, float]]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def inject_lora(
    model: nn.Module,
    paths: list[str],
    r: int | RankFn,
    lora_alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> dict[str, LoraLinear]:
    """Freeze every weight of `model`, then wrap each module in `paths` with a LoraLinear.

    `r` is an int (with `lora_alpha`) or a function path → (r, alpha). Only the LoRA A/B train afterwards.
    Refuses a model that already holds LoRA layers (wrapping twice is always a bug).
    """
    if lora_layers(model):
        raise UserError("the model already has LoRA layers; refusing to wrap it twice")
    model.requires_grad_(False)  # a head tied to the embeddings stays tied: its LoRA is a branch beside it
    layers = {}
    groups: dict[str, dict] = {}  # one per parent module: siblings reading one input share its mask and matmul
    for path in paths:
        r_i, alpha_i = r(path) if callable(r) else (r, lora_alpha if lora_alpha is not None else 2 * r)
        layer = LoraLinear.from_base(model.get_submodule(path), r_i, alpha_i, dropout, use_rslora, use_dora)
        layer.siblings = groups.setdefault(path.rpartition(".")[0], {})
        _set_submodule(model, path, layer)
        layers[path] = layer
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the plain base modules back. Returns `model`.
    A head tied to the input embeddings gets its own weight first (merging must not change the embeddings)."""
    layers = lora_layers(model)
    get_in = getattr(model, "get_input_embeddings", None)
    embeddings = get_in() if callable(get_in) else None
    for layer in layers.values():
        head = layer.base_layer
        if embeddings is not None and getattr(head, "weight", None) is embeddings.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            for config in (model.config, model.config.get_text_config()):
                config.tie_word_embeddings = False
    for path, layer in layers.items():
        _set_submodule(model, path, layer.to_base())
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Put the original base modules back, discarding the LoRA updates (unmerged). Returns `model`."""
    for path, layer in lora_layers(model).items():
        layer.unmerge()
        _set_submodule(model, path, layer.base_layer)
    for key, original in model.__dict__.pop("_lora_replaced", {}).items():  # layers an adapter saved whole
        path, _, leaf = key.rpartition(".")
        setattr(model.get_submodule(path), leaf, original)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{module path}.lora_A.weight` (r, in), `.lora_B.weight` (out, r) and, for DoRA,
    `.lora_magnitude_vector` (out,) for every LoRA layer (PEFT's names)."""
    out = {}
    for path, layer in lora_layers(model).items():
        out[f"{path}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{path}.lora_B.weight"] = layer.lora_B.weight.detach()
        if layer.use_dora:
            out[f"{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    return out


@dataclass(frozen=True)
class ParamReport:
    """Trainable vs total parameter counts of a LoRA-wrapped model."""

    trainable: int
    total: int
    trainable_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        from lora_cli.display import size_text

        return (
            f"{self.trainable:,} trainable of {self.total:,} parameters ({self.percent:.3f}%), "
            f"{size_text(self.trainable_bytes)}"
        )


def param_report(model: nn.Module) -> ParamReport:
    """Count trainable and total parameters (each shared tensor once)."""
    seen: set[int] = set()
    trainable = total = nbytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += _numel(p)
        if p.requires_grad:
            trainable += _numel(p)
            nbytes += _numel(p) * p.element_size()
    return ParamReport(trainable, total, nbytes)


def _numel(p: nn.Parameter) -> int:
    """Elements of the parameter as the model defines it: ZeRO-3 leaves a process an empty tensor and keeps the
    real count in `ds_numel`; bitsandbytes packs two 4-bit values per byte of its storage dtype."""
    if hasattr(p, "ds_numel"):
        return p.ds_numel
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def expected_trainable(model: nn.Module) -> int:
    """Σ r·(in + out) (+ out for DoRA's magnitude) over the LoRA layers: the closed form of the trainable count."""
    total = 0
    for layer in lora_layers(model).values():
        n_in, n_out = linear_shape(layer.base_layer)
        total += layer.r * (n_in + n_out) + (n_out if layer.use_dora else 0)
    return total
