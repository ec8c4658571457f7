"""Adapter algebra on files: combine (exact, by stacking ranks), resize (SVD), extract (SVD of a fine-tune).

All outputs fold the scaling into B and set `lora_alpha = r`, so they load identically in PEFT, vLLM and
llama.cpp (one global alpha / r = 1 per module).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_cli.errors import UserError, check_output, few
from lora_cli.lora.layer import conv1d_paths, lora_scaling
from lora_cli.lora.peft_format import KEY_PREFIX, AdapterConfig, read_adapter_config


@dataclass
class Factors:
    """One module's update as delta = B @ A (scaling folded in), in the Linear (out, in) layout."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)


def read_factors(path: str | Path, warn=None) -> tuple[AdapterConfig, dict[str, Factors]]:
    """An adapter's modules with their scaling folded into B (fp32). `warn` hears of base weights PEFT saved
    beside a head's LoRA, which a low-rank result leaves out."""
    from lora_cli.lora.adapter import base_copies, read_adapter_tensors

    config = read_adapter_config(path)
    if config.use_dora:
        raise UserError(f"{path} is a DoRA adapter: its update is not a low-rank product (a per-row magnitude "
                        "rescales W), so it cannot be combined, resized, or exported with --portable or --format "
                        "gguf (vLLM and llama.cpp have no DoRA); merge it instead")
    if config.modules_to_save:
        raise UserError(f"{path} also carries whole layers ({', '.join(config.modules_to_save)}: modules_to_save), "
                        "which are no low-rank update, so it cannot be combined, resized, or exported with "
                        "--portable or --format gguf; merge it instead")
    tensors = read_adapter_tensors(path)
    if warn and (copies := sorted(base_copies(path))):
        warn(f"note: {path} holds {', '.join(copies)} (the base weights PEFT saved beside a head's or embedding's LoRA), "
             "which the result leaves out: it applies to the base's own, which lora merge and generate check are the "
             "same")
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        r, alpha = config.rank_and_alpha(module)
        s = lora_scaling(r, alpha, config.use_rslora)
        out[module] = Factors(tensors[key].float(), tensors[f"{module}.lora_B.weight"].float() * s)
    if not out:
        raise UserError(f"{path}: the adapter holds no LoRA weights")
    return config, out


def low_rank_svd(f: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B A without forming it: B = Qb Rb, Aᵀ = Qa Ra, Rb Raᵀ = U S Vᵀ → B A = (Qb U) S (Qa V)ᵀ."""
    qb, rb = torch.linalg.qr(f.b.double())  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(f.a.double().T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, qa @ vh.T  # (out, r), (r,), (in, r)


def truncate(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, k: int) -> Factors:
    """Rank-k factors of U S Vᵀ, the singular values split evenly between A and B."""
    root = s[:k].sqrt()
    return Factors((root[:, None] * v[:, :k].T).float().contiguous(), (u[:, :k] * root).float().contiguous())


def energy(s: torch.Tensor, k: int) -> tuple[float, float]:
    """(Σ s² kept, Σ s² in all): the Frobenius energy of the rank-k truncation and of the whole."""
    return float((s[:k] ** 2).sum()), float((s**2).sum())


def combine(adapters: list[str], weights: list[float], rank: int | None = None, warn=None
            ) -> tuple[AdapterConfig, dict[str, Factors], dict[str, float]]:
    """Σ wᵢ · deltaᵢ, exact: stack the ranks (r = Σ rᵢ, zero blocks where an adapter lacks a module);
    with `rank`, compress each module by SVD. Returns (config, factors, retained energy per module).
    `warn` hears about adapters that name different bases (same shapes, so possibly on purpose); bases of
    different architectures (their config.json, where local) are refused."""
    from lora_cli.models import model_type_of

    if len(adapters) < 2:
        raise UserError("combine needs at least two adapters")
    if len(weights) != len(adapters):
        raise UserError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    loaded = [read_factors(a, warn) for a in adapters]
    configs = [c for c, _ in loaded]
    bases = {str(Path(b).resolve()) if b and Path(b).exists() else b for b in (c.base_model_name_or_path for c in configs)
             if b}
    types = {b: t for b in bases if (t := model_type_of(b))}
    if len(set(types.values())) > 1:
        raise UserError("the adapters were trained on different architectures ("
                        + ", ".join(f"{t}: {b}" for b, t in sorted(types.items())) + "); combine adds adapters of "
                        "one base model")
    if len(bases) > 1 and warn:
        warn(f"warning: the adapters were trained on different bases ({', '.join(sorted(map(str, bases)))}); "
             "their sum is only meaningful on one of them")
    stacks = [s for s in map(_layer_stacks, (f for _, f in loaded)) if s]  # `model.layers` (Llama), `transformer.h`
    if any(not (a & b) for a in stacks for b in stacks):  # (GPT-2): a sum of two models' adapters fits neither
        raise UserError(f"the adapters are for different models (their layers are {', '.join(sorted(set().union(*stacks)))}"
                        "); combine adds adapters of one base model")
    modules = sorted(set().union(*(f for _, f in loaded)))
    ranks = [max(x.a.shape[0] for x in f.values()) for _, f in loaded]
    total = sum(ranks)
    if rank is not None and rank > total:
        if warn:
            warn(f"note: --rank {rank} is above the sum's exact rank ({total} = the adapters' ranks added); it is "
                 f"kept exact at rank {total}")
        rank = None
    out, kept = {}, {}
    for m in modules:
        shapes = {(f[m].b.shape[0], f[m].a.shape[1]) for _, f in loaded if m in f}
        if len(shapes) > 1:
            raise UserError(f"{m} has different shapes in the adapters: {sorted(shapes)}; were they made for "
                            "different bases?")
        (n_out, n_in), = shapes
        a = torch.zeros(total, n_in)
        b = torch.zeros(n_out, total)
        row = 0
        for (_, f), w, r in zip(loaded, weights, ranks):
            if m in f:
                k = f[m].a.shape[0]
                a[row : row + k] = f[m].a
                b[:, row : row + k] = w * f[m].b
            row += r
        if not b.isfinite().all():  # (each adapter's are: read_factors checks)
            raise UserError(f"--weights {', '.join(map(str, weights))} overflow float32 in {m}; nothing was written")
        fac = Factors(a, b)
        if rank is not None:
            u, s, v = low_rank_svd(fac)
            fac, kept[m] = truncate(u, s, v, min(rank, len(s))), energy(s, rank)
            if fac.a.shape[0] < rank:  # pad: one rank for every module
                fac = Factors(torch.cat([fac.a, torch.zeros(rank - fac.a.shape[0], n_in)]),
                              torch.cat([fac.b, torch.zeros(n_out, rank - fac.b.shape[1])], dim=1))
        out[m] = fac
    r_out = rank if rank is not None else total
    # the factors are (r, in), (out, r) whatever the layout: adapters of GPT-2's Conv1D layers and Linear ones add
    like = replace(configs[0], fan_in_fan_out=any(c.fan_in_fan_out for c in configs))  # PEFT: per module anyway
    return _folded_config(like, dict.fromkeys(modules, r_out)), out, kept


def _layer_stacks(modules) -> set[str]:
    """Where an adapter's numbered layers live: `model.layers.3.self_attn.q_proj` → `model.layers`."""
    stacks = set()
    for m in modules:
        parts = m.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if at:
            stacks.add(".".join(parts[:at]))
    return stacks


def resize(adapter: str, rank: float, warn=None) -> tuple[AdapterConfig, dict[str, Factors], dict[str, float]]:
    """Per-module truncated SVD: `rank` ≥ 1 keeps that many singular values, 0 < rank < 1 keeps the
    smallest number that retains that fraction of each module's energy (Σ s²). `warn(text)` hears that
    a rank above the adapter's keeps its own (an update of rank r has r singular values)."""
    if not (rank > 0 and math.isfinite(rank)) or (rank >= 1 and rank != int(rank)):
        raise UserError(f"--rank must be a whole rank >= 1 or a fraction of energy below 1, got {rank}")
    config, factors = read_factors(adapter, warn)
    out, kept, ranks = {}, {}, {}
    for m, f in factors.items():
        u, s, v = low_rank_svd(f)
        if rank >= 1:
            k = min(int(rank), len(s))
        else:
            cum = torch.cumsum(s**2, 0) / float((s**2).sum()) if s.any() else torch.ones_like(s)  # B = 0: rank 1
            k = min(int((cum < rank - 1e-12).sum()) + 1, len(s))
        out[m], kept[m], ranks[m] = truncate(u, s, v, k), energy(s, k), k
    if warn and rank >= 1 and int(rank) > max(ranks.values()):
        warn(f"note: --rank {int(rank)} is above the adapter's rank ({max(ranks.values())}); "
             "its update has no more directions to keep, so the rank stays")
    return _folded_config(config, ranks), out, kept


def _folded_config(like: AdapterConfig, ranks: dict[str, int]) -> AdapterConfig:
    """Scaling folded into B: alpha = r, no rsLoRA; targets are the exact module paths (a full-match regex).
    Modules of a lower rank than the largest are named in rank_pattern / alpha_pattern."""
    r = max(ranks.values())
    return AdapterConfig(r=r, lora_alpha=float(r), target_modules=exact_targets(list(ranks)), lora_dropout=0.0,
                         use_rslora=False, fan_in_fan_out=like.fan_in_fan_out,
                         base_model_name_or_path=_absolute(like.base_model_name_or_path),
                         rank_pattern={re.escape(m): k for m, k in sorted(ranks.items()) if k != r},
                         alpha_pattern={re.escape(m): float(k) for m, k in sorted(ranks.items()) if k != r})


def _absolute(base: str | None) -> str | None:
    """A local base named relative to here (as PEFT writes what it was given) is written absolute, so the new
    adapter finds its base from anywhere; a Hub id stays as it is."""
    return str(Path(base).resolve()) if base and Path(base).expanduser().exists() else base


def exact_targets(modules: list[str]) -> str:
    """A PEFT `target_modules` regex that full-matches exactly these module paths."""
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def write_factors(out_dir: Path, config: AdapterConfig, factors: dict[str, Factors], dtype=torch.float32,
                  force: bool = False, reads: tuple = ()) -> None:
    """Write an adapter directory (PEFT format) from folded factors, atomically; `reads`: what it came from."""
    from lora_cli.errors import atomic_dir, cast_finite
    from lora_cli.lora.adapter import write_adapter

    held = check_output(out_dir, force, reads=reads)  # noqa: F841 (kept until written)
    tensors = {}
    for m, f in factors.items():
        tensors[f"{KEY_PREFIX}{m}.lora_A.weight"] = cast_finite(f.a, dtype, f"{m} lora_A").contiguous()
        tensors[f"{KEY_PREFIX}{m}.lora_B.weight"] = cast_finite(f.b, dtype, f"{m} lora_B").contiguous()
    with atomic_dir(out_dir) as tmp:
        write_adapter(tmp, config, tensors)


_NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "embed_out", "norm", "ln_")


def extract(base: str, tuned: str, rank: int, targets: str = "all-linear", status=None
            ) -> tuple[AdapterConfig, dict[str, Factors], dict[str, float]]:
    """A rank-`rank` LoRA approximating a full fine-tune: per-layer truncated SVD of W_tuned − W_base,
    read tensor by tensor from the two checkpoints (never a whole model in memory)."""
    import json

    from safetensors import safe_open

    from lora_cli.merging import base_directory, meta_model, model_key_names, weight_shards
    from lora_cli.models import resolve_model

    if rank < 1:
        raise UserError(f"--rank must be >= 1, got {rank}")
    sources = [resolve_model(x) for x in (base, tuned)]
    dirs = [base_directory(src, status, flag) for src, flag in zip(sources, ("--base", "--tuned"))]
    skeleton = meta_model(dirs[0])
    shard_of = [{k: d / s for s in weight_shards(d) for k in _keys(d / s)} for d in dirs]  # checkpoint key → file
    # the model's name of each weight → its checkpoint key: adapters name modules as the model does (a
    # multimodal Gemma 3 saves its language model's weights as `language_model.model.…`)
    saved = [model_key_names(skeleton, keys) for keys in shard_of]
    base_type, model_type = (json.loads((d / "config.json").read_text()).get("model_type")
                             if (d / "config.json").is_file() else None for d in dirs)
    if base_type and model_type and base_type != model_type:
        raise UserError(f"--tuned is a {model_type} model and --base a {base_type} one; a fine-tune keeps its "
                        "base's architecture")
    is_conv1d = conv1d_paths(skeleton, lambda module: model_type == "gpt2")  # remote code: GPT-2's are
    wanted = _target_test(skeleton, targets)
    factors, kept, ranks = {}, {}, {}
    changed, resized = [], []  # weights that differ, and weights of another shape: LoRA carries neither here
    unpaired = sorted(set(saved[0]) ^ set(saved[1]))  # in one model only: a head tied in one, its own in the other
    targeted_kinds = {_kind(k) for k in saved[0] if k.endswith(".weight") and wanted(k[: -len(".weight")])}
    for key in unpaired:
        if _kind(key) in targeted_kinds:  # a targeted layer more or less: another model
            which = "tuned model" if key in saved[1] else "base"
            raise UserError(f"{key} is only in the {which}; are they the same architecture?")
    for key in sorted(set(saved[0]) & set(saved[1])):
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        targeted = module is not None and wanted(module)
        with safe_open(str(shard_of[1][saved[1][key]]), "pt") as f:
            w_t = f.get_tensor(saved[1][key])
        with safe_open(str(shard_of[0][saved[0][key]]), "pt") as f:
            w_b = f.get_tensor(saved[0][key])
        if w_t.shape != w_b.shape:
            if targeted and w_t.dim() == 2:
                raise UserError(f"{key} is {tuple(w_t.shape)} in the tuned model and {tuple(w_b.shape)} in the base: "
                                "a LoRA update keeps a layer's shape; leave it out of --targets")
            resized.append(f"{key} {tuple(w_b.shape)} → {tuple(w_t.shape)}")
            continue
        # compared, and subtracted, at the lower of the two precisions: a bf16 save of an fp32 base changed
        # nothing, and a bf16 fine-tune's update is not the base's rounding to bf16
        low = min((w_t.dtype, w_b.dtype), key=lambda t: torch.finfo(t).bits if t.is_floating_point else 64)
        w_b = w_b.to(low)
        if torch.equal(w_t.to(low), w_b):
            continue
        if not targeted or w_t.dim() != 2:
            changed.append(key)
            continue
        d = (w_t.double() - w_b.double())
        d = d.T if is_conv1d(module) else d  # (out, in)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = min(rank, len(s))
        factors[module], kept[module], ranks[module] = truncate(u, s, vh.T, k), energy(s, k), k
    if status and resized:
        status(f"warning: {_listed(resized)} changed shape in the fine-tune (a vocabulary resized for new tokens?); "
               "LoRA cannot carry that, so base + adapter keeps the base's: tokens the base lacks stay unknown")
    if status and unpaired:
        status(f"warning: {_listed(unpaired, 'is', 'are')} in only one of the two models (an output head tied to "
               "the embeddings in one, its own in the other?); not in the adapter, so base + adapter will not be the "
               "tuned model there")
    if not factors:
        raise UserError(f"none of the layers --targets {targets!r} chose differs between the base and the tuned model"
                        + (f"; {_listed(changed, 'differs', 'differ')} (choose them with --targets)" if changed else ""))
    if status and changed:
        status(f"warning: {_listed(changed, 'differs', 'differ')} between the two models but "
               f"{'is' if len(changed) == 1 else 'are'} not in the adapter (LoRA holds the targeted linear layers only: "
               "not norms, embeddings, biases, routers or fused experts); base + adapter will not be the tuned model "
               "there")
    # PEFT takes the layout of each module from the module itself; the flag says whether any is a Conv1D
    like = AdapterConfig(r=rank, lora_alpha=rank, target_modules=[], fan_in_fan_out=any(map(is_conv1d, factors)),
                         base_model_name_or_path=sources[0].path)  # a local base named absolutely
    return _folded_config(like, ranks), factors, kept  # a layer smaller than --rank keeps its own rank


def _target_test(model, targets: str):
    """module path → whether to extract it: `--targets` resolved on the model's modules (on the meta device) as
    `lora train` resolves it (attention, all-linear without the output head, names, re:PATTERN), so a router
    or fused experts, not linear layers, never are. Without the modules (remote code), by name."""
    from lora_cli.lora.targets import ALL_LINEAR, ATTENTION, REGEX_PREFIX, resolve_targets, suffix_matches

    if model is not None:
        chosen = set(resolve_targets(model, targets))
        return lambda module: module in chosen
    keys = [t.strip() for t in targets.split(",") if t.strip()]
    if ATTENTION in keys:
        raise UserError("--targets attention needs the model's architecture, which transformers does not know "
                        "here (remote code); name the modules (e.g. --targets q_proj,v_proj) or use all-linear")
    try:
        pattern = re.compile(targets[len(REGEX_PREFIX):]) if targets.startswith(REGEX_PREFIX) else None
    except re.error as e:
        raise UserError(f"--targets: invalid regular expression ({e})") from None
    names = None if targets == ALL_LINEAR or pattern else keys
    return lambda module: (not any(p in module.rsplit(".", 1)[-1] for p in _NOT_LINEAR)
                           and (names is None or any(suffix_matches(module, n) for n in names))
                           and (pattern is None or pattern.fullmatch(module) is not None))


def _kind(key: str) -> str:
    """A weight's name without its layer numbers: model.layers.N.self_attn.q_proj.weight."""
    return re.sub(r"\.\d+(?=\.)", ".N", key)


def _listed(keys: list[str], one: str = "", many: str = "") -> str:
    """'2 weights (a, b) differ': `one` / `many`, the verb that follows."""
    verb = one if len(keys) == 1 else many
    return f"{len(keys)} weight{'s' if len(keys) > 1 else ''} ({few(keys, 4)})" + (f" {verb}" if verb else "")


def _keys(path: Path) -> list[str]:
    from lora_cli.lora.peft_format import read_safetensors_header

    return list(read_safetensors_header(path)[0])
