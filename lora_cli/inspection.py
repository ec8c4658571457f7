"""Facts about an adapter from its JSON, its safetensors header and a scan of its bytes for NaN/inf (no torch:
answers instantly)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lora_cli.errors import MARK, UserError
from lora_cli.lora.peft_format import (
    GGUF_BASE_KEY,
    KEY_PREFIX,
    adapter_files,
    broken_adapter_error,
    check_ranks,
    embedding_lora,
    gguf_type,
    is_gguf_file,
    nonfinite_tensors,
    read_adapter_config,
    read_safetensors_header,
    tied_copies,
)


def adapter_facts(path: str | Path) -> dict[str, Any]:
    """r, alpha, scaling, targets, trainable params, size, dtype, base, training summary (if a run)."""
    path = Path(path)
    if is_gguf_file(path):
        return gguf_adapter_facts(path)
    config = read_adapter_config(path, lenient=True)  # an adapter lora cannot use is still described
    _, weights = adapter_files(path)
    header, meta = read_safetensors_header(weights)
    unsupported = [*config.unsupported, *filter(None, [embedding_lora(header)])]
    try:
        check_ranks(config, {k.removeprefix(KEY_PREFIX): v["shape"] for k, v in header.items()}, weights)
    except UserError:
        if not unsupported:  # otherwise a feature lora does not implement (target_parameters, BD-LoRA's blocks,
            raise  # a tied head's embedding) lays the tensors out its own way: named below, not misread as damage
    if broken := [k.removeprefix(KEY_PREFIX) for k in nonfinite_tensors(weights, header)]:
        raise broken_adapter_error(weights, broken)  # as every other command refuses it
    modules = Counter()
    ranks = Counter()
    params = 0
    dtypes = Counter()
    copies = tied_copies(weights, header, config)  # one tensor saved twice: trained once
    # PEFT saves a targeted embedding's or head's frozen weight (and bias) too: not trained (a bias is, with bias=)
    frozen = (".base_layer.weight",) if any(u.startswith("bias=") for u in config.unsupported) \
        else (".base_layer.weight", ".base_layer.bias")
    for key, info in header.items():
        n = 1
        for d in info["shape"]:
            n *= d
        if not key.endswith(frozen) and key not in copies:
            params += n
        dtypes[info["dtype"]] += 1
        a = next((s for s in (".lora_A.weight", ".lora_embedding_A") if key.endswith(s)), None)
        if a:  # a linear layer's A (r, in), or an embedding's (r, vocab)
            modules[key[len(KEY_PREFIX):-len(a)]] += 1
            ranks[info["shape"][0]] += 1
    modules = short_names(modules, config.target_modules)
    scaling = config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)
    facts: dict[str, Any] = {
        "path": str(path),
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "base_is_gguf": GGUF_BASE_KEY in meta or str(config.base_model_name_or_path or "").lower().endswith(".gguf"),
        "r": config.r,
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "lora_alpha": config.lora_alpha,
        "scaling": scaling,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "target_modules": config.target_modules,
        "modules": dict(sorted(modules.items())),
        "num_modules": sum(modules.values()),
        "trainable_params": params,
        "size_bytes": weights.stat().st_size,
        "dtype": _dtype_name(dtypes.most_common(1)[0][0]) if dtypes else None,
        "fan_in_fan_out": config.fan_in_fan_out,
        **{k: v for k in ("layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save",
                          "ensure_weight_tying")
           if (v := getattr(config, k))},
        **({"unsupported": unsupported} if unsupported else {}),
    }
    summary, state = path / "train_summary.json", path / "trainer_state.json"  # a run; a checkpoint of one
    try:
        if summary.is_file():
            facts["train_summary"] = json.loads(summary.read_text())
        elif state.is_file():
            st = json.loads(state.read_text())
            evals = st.get("eval_history") or [{}]
            facts["train_summary"] = {"steps": st.get("step"), "final_loss": st.get("last_loss"),
                                      "eval_loss": evals[-1].get("eval_loss"), "eval_step": evals[-1].get("step"),
                                      "wall_time_s": round(st.get("wall_time_s") or 0.0, 2)}
    except (json.JSONDecodeError, AttributeError, TypeError):
        facts["train_summary"] = None
    return facts


def short_names(paths: Counter, targets=()) -> Counter:
    """Module paths counted by their last name, or by their parent's and last name where one last name is used
    under different parents (RWKV's attention.key and feed_forward.key; GPT-2's attn.c_proj and mlp.c_proj), or
    is an nn.Sequential's index (CTRL's ffn.0); by the config's own dotted target name where one names the path
    (GPT-2's attn.c_proj, as lora writes it)."""
    def parent(path: str) -> str:
        return next((p for p in reversed(path.split(".")[:-1]) if not p.isdigit()), "")

    dotted = [t for t in (targets if isinstance(targets, list) else []) if "." in t]
    parents: dict[str, set] = {}
    for path in paths:
        parents.setdefault(path.split(".")[-1], set()).add(parent(path))
    out = Counter()
    for path, n in paths.items():
        last = path.split(".")[-1]
        named = next((t for t in dotted if path == t or path.endswith("." + t)), None)
        out[named or (f"{parent(path)}.{last}" if (len(parents[last]) > 1 or last.isdigit()) and parent(path)
                      else last)] += n
    return out


def gguf_adapter_facts(path: Path) -> dict[str, Any]:
    """The same facts of a llama.cpp LoRA adapter (`lora export --format gguf`, llama.cpp's convert_lora_to_gguf):
    tensors `blk.N.attn_q.weight.lora_a` (r × in) and `.lora_b` (out × r), one alpha, scaling alpha / r."""
    from lora_cli.errors import UserError

    try:
        import gguf
        import numpy as np
    except ImportError:
        raise UserError(f"{path} is a GGUF file: reading it needs the gguf package (pip install 'lora-cli[gguf]')") from None
    if (kind := gguf_type(path)) not in ("adapter", None):  # (before the reader, which takes seconds on a model)
        raise UserError(f"{path} is a GGUF {kind}, not a LoRA adapter")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception:  # noqa: BLE001 - numpy's words about buffer sizes would not help
        raise UserError(f"cannot read {path}: a damaged or truncated GGUF file") from None

    def field(key: str) -> Any:
        return reader.fields[key].contents() if key in reader.fields else None

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        what = f"a GGUF {field('general.type') or 'model'}" + (f" ({field('adapter.type')})" if field("adapter.type") else "")
        raise UserError(f"{path} is {what}, not a LoRA adapter")
    modules, ranks, dtypes, broken, params = Counter(), Counter(), Counter(), [], 0
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # fastest first: a (in, r), b (r, out)
    for t in reader.tensors:
        dtypes[t.tensor_type.name] += 1
        values = _gguf_floats(t)
        if values is not None and not np.isfinite(values).all():
            broken.append(t.name)
        if t.name.endswith(".lora_a"):  # (data: r × in) rows of zeros pad a lower rank up to the file's one
            modules[t.name.removesuffix(".weight.lora_a").split(".")[-1]] += 1
            rank = int((np.abs(values).sum(axis=1) > 0).sum()) if values is not None else int(t.shape[-1])
            ranks[rank] += 1
            params += rank * (shapes[t.name][0] + shapes.get(t.name.removesuffix("_a") + "_b", [0])[-1])
    if broken:
        raise UserError(f"{path} holds NaN or inf in {len(broken)} tensor(s) ({', '.join(sorted(broken)[:3])}); "
                        "it was saved from a run that diverged")
    if not modules:
        raise UserError(f"{path} is a LoRA adapter with no lora_a tensors")
    r = max(int(t.shape[-1]) for t in reader.tensors if t.name.endswith(".lora_a"))  # as llama.cpp reads it
    alpha = field("adapter.lora.alpha")
    alpha = float(alpha) if alpha is not None else float(r)  # (llama.cpp: none given means a scaling of 1)
    return {
        "path": str(path),
        "format": "gguf",
        "architecture": field("general.architecture"),
        "base_model_name_or_path": None,  # a GGUF adapter names its architecture, not its base
        "base_is_gguf": False,
        "r": r,
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "lora_alpha": alpha,
        "scaling": alpha / r,
        "scaling_folded": MARK in reader.fields,  # lora's export folds each module's own scaling into lora_b
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": sorted(modules),
        "modules": dict(sorted(modules.items())),
        "num_modules": sum(modules.values()),
        "trainable_params": params,
        "size_bytes": path.stat().st_size,
        "dtype": _dtype_name(dtypes.most_common(1)[0][0]),
    }


def _gguf_floats(t):
    """A GGUF tensor's values as float32 (rows × columns), or None for a quantized type."""
    import numpy as np

    if t.tensor_type.name in ("F16", "F32"):
        return t.data.astype(np.float32)
    if t.tensor_type.name == "BF16":  # raw bytes: the high half of a float32
        return (np.ascontiguousarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return None


def eval_loss_text(summary: dict) -> str | None:
    """'6.0669', or '6.0669 (at step 9)' for a checkpoint whose last eval came before its own step."""
    if summary.get("eval_loss") is None:
        return None
    at = summary.get("eval_step")
    return f"{summary['eval_loss']:.4f}" + (f" (at step {at})" if at not in (None, summary.get("steps")) else "")


def _dtype_name(st: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(st, st)
