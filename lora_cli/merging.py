"""Streaming merge: W' = W + scaling · B A, shard by shard straight through safetensors.

Peak memory stays near one shard plus the adapter: read a shard, merge the weights it holds (fp32
arithmetic, cast to the output dtype), write it, free it. The output is a plain transformers directory.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_cli.errors import UserError, atomic_dir, cast_finite, check_output, mark, read_json_object
from lora_cli.lora.layer import conv1d_paths, lora_scaling
from lora_cli.lora.peft_format import (
    AdapterConfig,
    older_layout_hint,
    read_adapter_config,
    read_safetensors_header,
    save_safetensors,
)
from lora_cli.models import (
    PICKLE_SUFFIXES,
    ModelSource,
    check_shards,
    ensure_gguf_converted,
    ensure_pickle_converted,
    has_tokenizer_files,
    load_tokenizer,
    model_type_of,
    other_architecture,
    resolve_model,
)

INDEX_NAME = "model.safetensors.index.json"
# Files of a model directory that are not weights and that the merged model keeps.
_KEEP_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_SKIP_NAMES = {INDEX_NAME, "adapter_config.json", "lora_cli_gguf.json", "lora_cli_pickled.json"}


@dataclass
class MergeResult:
    output: Path
    merged_modules: int
    shards: int
    dtype: str  # of the weights written


def base_directory(source: ModelSource, status=None, flag: str = "--base", allow_pickle: bool = False) -> Path:
    """A local transformers directory holding the model's safetensors (downloading a Hub id's files; pickled
    weights converted once, with `allow_pickle`); `flag` names the option that gave it."""
    if source.kind == "dir":
        d = Path(source.path)
        if allow_pickle and not any(d.glob("*.safetensors")) and _pickled(d):
            return ensure_pickle_converted(d, status)
        check_model_files(d)
        return d
    if source.is_gguf:
        return ensure_gguf_converted(source.path, status)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        d = Path(snapshot_download(source.ref, revision=source.revision, allow_patterns=patterns))
        if allow_pickle and not any(d.glob("*.safetensors")):  # (pickles only where there are no safetensors)
            d = Path(snapshot_download(source.ref, revision=source.revision,
                                       allow_patterns=patterns + [f"*{s}" for s in PICKLE_SUFFIXES]))
    except Exception as e:
        what = "base model" if flag == "--base" else "model"
        why = ("not in the local Hugging Face cache, and the Hub cannot be reached" if isinstance(
            e, LocalEntryNotFoundError) else type(e).__name__)
        at = f" at revision {source.revision!r}" if source.revision else ""
        raise UserError(f"cannot get {what} {source.ref!r}{at} from the Hub ({why}); pass {flag} with a local "
                        "directory or .gguf file") from None
    return base_directory(ModelSource(source.ref, str(d), "dir"), status, flag, allow_pickle)


def check_model_files(directory: Path) -> None:
    """A model directory's config.json (an object naming its model_type) and shard index (each shard it lists
    there): what the commands reading the files themselves rely on, each fault one error naming the file."""
    config = read_json_object(directory / "config.json") if (directory / "config.json").is_file() else None
    if config is None:
        raise UserError(f"{directory} is not a model directory: it has no config.json")
    if not isinstance(config.get("model_type"), str):
        raise UserError(f"{directory / 'config.json'}: no model_type (the architecture transformers builds)")
    check_shards(directory)


def weight_shards(base_dir: Path) -> list[str]:
    """The safetensors shard file names of a model directory: model.safetensors where there is one (what
    transformers loads, before a shard index that an earlier save may have left beside it), else the index's."""
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    index = base_dir / INDEX_NAME
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    pickled = " (its weights are pickled: pass --allow-pickle if you trust it)" if _pickled(base_dir) else ""
    raise UserError(f"{base_dir} has no safetensors weights (model.safetensors or {INDEX_NAME}){pickled}")


def _pickled(directory: Path) -> bool:
    return any(f.name.endswith(PICKLE_SUFFIXES) for f in directory.iterdir())


def _header_keys(path: Path) -> dict[str, list[int]]:
    header, _ = read_safetensors_header(path)
    return {k: v["shape"] for k, v in header.items()}


def match_weights(adapter_paths: list[str], checkpoint_keys: dict[str, list[int]]) -> dict[str, str]:
    """Module path → checkpoint key of its weight. Keys may lack the model's prefix (GPT-2's `h.0…`)."""
    found, problems = {}, []
    for path in adapter_paths:
        cands = _checkpoint_keys_for(path + ".weight", checkpoint_keys)
        if len(cands) == 1:
            found[path] = cands[0]
        else:
            problems.append(f"{path} ({'no weight' if not cands else 'ambiguous'} in the base checkpoint)")
    if problems and not found:
        raise UserError(f"the adapter does not fit this base model: none of its {len(problems)} modules (e.g. "
                        f"{min(adapter_paths)}) has a weight in it; was it trained on another model? (--base sets it)"
                        + older_layout_hint(adapter_paths))
    if problems:
        from lora_cli.lora.adapter import natural_key

        problems.sort(key=natural_key)
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UserError(f"the adapter does not fit this base model: {shown}")
    return found


def _checkpoint_keys_for(key: str, checkpoint_keys) -> list[str]:
    """The checkpoint's name for a model key: itself, else the keys it ends with (checkpoints may lack the
    model's prefix, as GPT-2's `h.0…`)."""
    return [key] if key in checkpoint_keys else [k for k in checkpoint_keys if key.endswith("." + k)]


def delta(config: AdapterConfig, path: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """scaling · B A in fp32, (out, in); transposed by the caller for fan_in_fan_out weights."""
    r, alpha = config.rank_and_alpha(path)
    return (b.float() @ a.float()) * lora_scaling(r, alpha, config.use_rslora)


def merge_to_directory(adapter_dir: str | Path, output: str | Path, base: str | None = None,
                       dtype: torch.dtype | None = None, force: bool = False, allow_pickle: bool = False,
                       chat_template: str | None = None, status=None, check=None,
                       trust_remote_code: bool = False) -> MergeResult:
    """Bake the adapter into the base weights and write a plain transformers directory at `output`. `check`,
    if given, is called with the finished directory before it takes `output`'s name (an error there leaves
    nothing written). `trust_remote_code`: the base's own code may build its config, model and tokenizer;
    without it they are read as files (never a prompt to run it)."""
    from lora_cli.lora.adapter import base_copies, check_base_copies, read_adapter_tensors, saved_layers

    output = Path(output)
    config = read_adapter_config(adapter_dir)
    source = adapter_base(adapter_dir, config, base, allow_pickle, status)
    held = check_output(output, force, reads=(adapter_dir, source.path if source.kind != "hub" else None))  # noqa: F841
    tensors = read_adapter_tensors(adapter_dir)
    base_dir = base_directory(source, status, allow_pickle=allow_pickle)
    if has_tokenizer_files(base_dir):  # the merged model gets its files: they must load
        load_tokenizer(ModelSource(source.ref, str(base_dir), "dir"), trust_remote_code)
    elif status:
        status(f"warning: the base {source.ref} has no tokenizer files, so neither has the merged model: copy its "
               f"tokenizer's into {output}")
    shards = weight_shards(base_dir)
    keys_by_shard = {s: _header_keys(base_dir / s) for s in shards}
    all_keys = {k: shape for ks in keys_by_shard.values() for k, shape in ks.items()}
    whole = saved_layers(tensors)  # modules_to_save: layers the adapter replaces outright
    tensors = {k: v for k, v in tensors.items() if k not in whole}
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})  # …lora_A / lora_B / lora_magnitude_vector
    skeleton = meta_model(base_dir, trust_remote_code)
    named = model_key_names(skeleton, all_keys)  # the model's name of each checkpoint key → the key
    shapes = {k: all_keys[c] for k, c in named.items()}
    aliases, own_heads = _shared_weight_aliases(config, tensors, paths, skeleton, shapes)
    weight_of = {p: named[k] for p, k in match_weights([p for p in paths if p not in aliases | set(own_heads)],
                                                       shapes).items()}
    transposed = conv1d_paths(skeleton, lambda path: config.fan_in_fan_out)  # Conv1D weights are (in, out)
    _check_shapes(tensors, weight_of, all_keys, transposed)
    base_key = {**weight_of, **{head: named.get(key, key) for head, key in own_heads.items()}}  # module → its weight

    def base_value(key: str) -> torch.Tensor | None:  # `{module}.weight|bias` of the base, where it has one
        path, _, leaf = key.rpartition(".")
        found = base_key.get(path, "").removesuffix("weight") + leaf
        return _read_tensor(base_dir, keys_by_shard, found) if path in base_key and found in all_keys else None

    check_base_copies(base_copies(adapter_dir), base_value, adapter_dir)
    if base and status:  # (once the shapes are known to fit: an adapter that does not fit is an error instead)
        warning = other_architecture(config.base_model_name_or_path, model_type_of(base_dir), "--base", "merges")
        if warning:
            status(warning)
    replace = {k: named.get(v, v)  # → checkpoint key
               for k, v in _saved_layer_keys(whole, shapes, base_dir, trust_remote_code).items()}
    kept = _tied_heads_kept(whole, skeleton, all_keys)  # a head that keeps the weights of an embedding replaced
    originals = {head: _read_tensor(base_dir, keys_by_shard, key) for head, key in kept.items() if head not in all_keys}
    for head, key in own_heads.items():  # LoRA on a head tied to the embeddings: the head gets W + ΔW of its own
        w = _read_tensor(base_dir, keys_by_shard, named.get(key, key))
        originals[named.get(f"{head}.weight", f"{head}.weight")] = cast_finite(
            _merged_weight(config, head, w, tensors, transposed(head)), dtype or w.dtype, head)
    # heads given their own weight: into the last shard, unless the checkpoint holds a (tied) copy already
    untie = [k for k in [*replace.values(), *originals] if k not in all_keys]

    if source.is_gguf and dtype is None and status:
        status("note: the GGUF base is dequantized to float32, and so is the merged model (--dtype bfloat16 writes half "
               "the size)")
    merged, stored = 0, set()
    with atomic_dir(output) as tmp:
        for shard in shards:
            state = load_file(str(base_dir / shard))
            for path, key in weight_of.items():
                if key not in state:
                    continue
                w = state[key]
                state[key] = cast_finite(_merged_weight(config, path, w, tensors, transposed(path)), dtype or w.dtype,
                                         f"merged {path}")
                merged += 1
            for k, key in replace.items():
                if key in state or (key in untie and shard == shards[-1]):
                    like = state[key] if key in state else next(v for v in state.values() if v.is_floating_point())
                    state[key] = cast_finite(whole[k], dtype or like.dtype, k)
            state.update({k: v for k, v in originals.items() if k in state or (shard == shards[-1] and k in untie)})
            if dtype is not None:
                state = {k: cast_finite(v, dtype, k) if v.is_floating_point() else v for k, v in state.items()}
            stored |= {str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()}
            save_safetensors({k: v.contiguous() for k, v in state.items()}, tmp / shard, metadata={"format": "pt", **mark()})
            del state
        _copy_side_files(base_dir, tmp, shards, dtype)
        if untie or kept or own_heads:
            _untie(tmp, untie, shards[-1])
        _write_tokenizer_and_generation(base_dir, tmp, chat_template, trust_remote_code)
        if check:
            check(tmp)
    written = str(dtype).replace("torch.", "") if dtype else f"{' + '.join(sorted(stored))}, the base's"
    return MergeResult(output, merged + len(own_heads), len(shards), written)


def _merged_weight(config: AdapterConfig, path: str, w: torch.Tensor, tensors: dict, transposed: bool) -> torch.Tensor:
    """W + scaling · B A in fp32 (DoRA: m ⊙ (W + sBA) / ‖W + sBA‖, norms over the input dimension)."""
    d = delta(config, path, tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"])
    new = w.float() + (d.T if transposed else d)
    if config.use_dora:
        rows = new.T if transposed else new  # (out, in)
        m = tensors[f"{path}.lora_magnitude_vector"].float()
        rows = rows * (m / torch.linalg.norm(rows, dim=1))[:, None]
        new = rows.T if transposed else rows
    if not torch.isfinite(new).all():
        raise UserError(f"merging {path} gives non-finite weights; the adapter is broken")
    return new


def _saved_layer_keys(whole: dict[str, torch.Tensor], all_keys: dict[str, list[int]], base_dir: Path,
                      trust_remote_code: bool = False) -> dict[str, str]:
    """Checkpoint key of each whole layer an adapter carries; a tied output head (no key of its own in the
    checkpoint) gets one, written into the last shard."""
    text = _read_config(base_dir, trust_remote_code).get_text_config() if whole else None
    keys, problems = {}, []
    for k, t in whole.items():
        cands = _checkpoint_keys_for(k, all_keys)
        if len(cands) == 1:
            keys[k], shape = cands[0], list(all_keys[cands[0]])
        elif not cands and text.tie_word_embeddings and k.rsplit(".", 1)[0].endswith("lm_head"):
            keys[k], shape = k, [text.vocab_size, text.hidden_size][: t.dim()]  # the tied input embeddings'
        else:
            problems.append(f"{k} ({'no such weight' if not cands else 'ambiguous'} in the base checkpoint)")
            continue
        if list(t.shape) != shape:
            problems.append(f"{k} is {list(t.shape)}, the base's {shape}"
                            + (" (the vocabulary was resized)" if list(t.shape[1:]) == shape[1:] else ""))
    if problems:
        raise UserError("the adapter does not fit this base model: " + "; ".join(problems[:6]))
    return keys


def _tied_heads_kept(whole: dict[str, torch.Tensor], skeleton, checkpoint_keys) -> dict[str, str]:
    """An adapter that replaces a weight shared by several modules (modules_to_save) replaces it for that module
    only, in PEFT: a tied output head keeps the base's embedding when the input embedding is replaced. The
    merged checkpoint then gives such a head its own weight (and unties it): {head's key: the checkpoint key of
    the original}. A shared weight other than a tied head cannot be split so: refused."""
    from lora_cli.lora.targets import output_head_names

    replaced = {k.removesuffix(".weight") for k in whole if k.endswith(".weight")}
    heads = output_head_names(skeleton) if skeleton is not None else set()
    kept = {}
    for group in shared_weight_groups(skeleton):
        mine = [p for p in group if p in replaced]
        stored = [c for p in group for c in _checkpoint_keys_for(f"{p}.weight", checkpoint_keys)]
        # the members left as they were need the original: the one the checkpoint stores has it already
        left = [p for p in group if p not in replaced and not _checkpoint_keys_for(f"{p}.weight", checkpoint_keys)]
        if not mine or not left:
            continue
        if not stored or any(p not in heads for p in left):
            raise UserError(f"cannot merge: the adapter replaces {mine[0]} (modules_to_save), whose weight is shared "
                            f"with {', '.join(left[:3])}, which keeps the base's; a merged checkpoint holds that "
                            "tensor once. Use the base with the adapter instead (lora generate --adapter, PEFT)")
        kept.update({f"{p}.weight": stored[0] for p in left})
    return kept


def _read_tensor(base_dir: Path, keys_by_shard: dict[str, dict], key: str) -> torch.Tensor:
    from safetensors import safe_open

    shard = next(s for s, keys in keys_by_shard.items() if key in keys)
    with safe_open(str(base_dir / shard), "pt") as f:
        return f.get_tensor(key)


def meta_model(base_dir: Path, trust_remote_code: bool = False):
    """The model of `base_dir` built on the meta device (its modules and ties; no memory, no weights read),
    or None when it cannot be built without its own code."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(_read_config(base_dir, trust_remote_code),
                                                    trust_remote_code=trust_remote_code)
    except Exception:  # remote code, or not a causal LM: what does not fit is reported where it matters
        return None


def model_key_names(model, checkpoint_keys) -> dict[str, str]:
    """{the model's name for a checkpoint key: the key}. transformers renames keys as it loads them (a
    multimodal Gemma 3 checkpoint's `language_model.model.layers…` are `model.language_model.layers…` in
    the model, whose names adapters use); renamings only (fused MoE experts are not LoRA layers here)."""
    same = {k: k for k in checkpoint_keys}
    if model is None:
        return same
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        if not renamings:
            return same
        meta = model.state_dict()
        named = {}
        for key in checkpoint_keys:
            named.setdefault(rename_source_key(key, renamings, [], model.base_model_prefix, meta)[0], key)
        return named
    except Exception:  # transformers 4 (no renaming on load), or its internals moved: the names as saved
        return same


def shared_weight_groups(model) -> list[list[str]]:
    """Module paths of `model` (loaded, or on the meta device) whose weight is one tensor (a shared block
    reused by several layers, a head tied to the embeddings). A checkpoint holds such a tensor once."""
    if model is None:
        return []
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.endswith(".weight"):
            owners.setdefault(id(p), []).append(name.removesuffix(".weight"))
    return [paths for paths in owners.values() if len(paths) > 1]


def _shared_weight_aliases(config: AdapterConfig, tensors: dict, paths: list[str], skeleton,
                           all_keys: dict) -> tuple[set[str], dict[str, str]]:
    """Merging into a weight that several modules use changes all of them: only right when every one of
    them has the same update. Then that update is merged once, where the checkpoint holds the weight:
    the other paths are returned, to be skipped. An output head tied to the embeddings with LoRA of its own
    gets its own weight instead (the merged model is untied): returned as {head: the shared weight's key}.
    Otherwise refused."""
    from lora_cli.lora.targets import output_head_names

    adapted, aliases, own_heads = set(paths), set(), {}
    heads = output_head_names(skeleton) if skeleton is not None else set()
    for group in shared_weight_groups(skeleton):
        if adapted.isdisjoint(group):
            continue
        updates = [delta(config, p, tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"])
                   if p in adapted and f"{p}.lora_A.weight" in tensors else None for p in group]
        stored = [p for p in group if len(_checkpoint_keys_for(p + ".weight", all_keys)) == 1]
        if all(u is not None and torch.equal(u, updates[0]) for u in updates):
            aliases.update(p for p in group if p != (stored or group)[0])
            continue
        mine = [p for p in group if p in adapted]
        source = [p for p in stored if p not in heads]  # the input embeddings, which the tied heads take
        if source and source[0] not in adapted and all(p in heads for p in mine):
            # a head whose key the checkpoint holds as well keeps it: transformers ties only equal values
            own_heads.update({p: f"{p if p in stored else source[0]}.weight" for p in mine})
            continue
        mine = mine[0]
        others = [p for p in group if p != mine]
        raise UserError(f"cannot merge: {mine} shares its weight with {', '.join(others[:3])}"
                        f"{' …' if len(others) > 3 else ''} (one tensor used in {len(group)} places), and the "
                        f"adapter {'updates them differently' if all(u is not None for u in updates) else 'does not update them all'}; "
                        "a merged checkpoint holds that tensor once. Use the base with the adapter instead "
                        "(lora generate --adapter, PEFT, vLLM)")
    return aliases, own_heads


def _untie(out: Path, keys: list[str], shard: str) -> None:
    """The merged head has its own weight now: the config must stop tying it to the input embeddings."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tie_word_embeddings"] = False
    if isinstance(cfg.get("text_config"), dict) and "tie_word_embeddings" in cfg["text_config"]:
        cfg["text_config"]["tie_word_embeddings"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    index = out / INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update({k: shard for k in keys})
        index.write_text(json.dumps(data, indent=2))


def _check_shapes(tensors, weight_of, all_keys, transposed) -> None:
    problems = []
    for path, key in weight_of.items():
        a, b = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
        want = [b.shape[0], a.shape[1]]
        if transposed(path):
            want = want[::-1]
        if list(all_keys[key]) != want:
            problems.append(f"{path}: base weight {list(all_keys[key])}, adapter gives {want}")
    if problems:
        raise UserError("the adapter does not fit this base model: " + "; ".join(problems[:6]))


def _copy_side_files(base_dir: Path, out: Path, shards: list[str], dtype) -> None:
    for f in base_dir.iterdir():
        if f.is_file() and f.suffix in _KEEP_SUFFIXES and f.name not in _SKIP_NAMES and f.name not in shards:
            shutil.copy2(f, out / f.name)
    index = base_dir / INDEX_NAME
    if index.is_file() and shards != ["model.safetensors"]:
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = sum(  # the tensors' bytes, as transformers counts them
            end - start for s in shards for t in read_safetensors_header(out / s)[0].values()
            for start, end in [t["data_offsets"]])
        (out / INDEX_NAME).write_text(json.dumps(data, indent=2))
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        if dtype is not None:  # (and a transformers-4 config's torch_dtype, which would contradict the weights)
            for c in (cfg, cfg.get("text_config")):
                if isinstance(c, dict):
                    c.update({k: str(dtype).replace("torch.", "") for k in ("dtype", "torch_dtype")
                              if k in c or (k == "dtype" and c is cfg)})
        cfg_path.write_text(json.dumps(cfg, indent=2))


def _write_tokenizer_and_generation(base_dir: Path, out: Path, chat_template: str | None,
                                    trust_remote_code: bool = False) -> None:
    """The tokenizer with its chat template, and a generation config whose EOS includes the end of turn."""
    from transformers import GenerationConfig

    from lora_cli.generation import chat_template_for, turn_end_ids

    try:
        tok = load_tokenizer(ModelSource(str(base_dir), str(base_dir), "dir"), trust_remote_code)
    except UserError:
        tok = None  # a base without a tokenizer: nothing to carry over
    if tok is not None:
        if chat_template:
            tok.chat_template = chat_template
        tok.save_pretrained(out)
    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except Exception:
        gen = GenerationConfig.from_model_config(_read_config(base_dir, trust_remote_code))
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = [e for e in eos if e is not None]
    if tok is not None:  # its EOS and its template's end of turn, which the adapter learned to end answers with
        ends = [tok.eos_token_id, *turn_end_ids(tok, chat_template_for(tok, []))]
        eos += [e for e in dict.fromkeys(ends) if e is not None and e not in eos]
    gen.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
    if gen.pad_token_id is None and tok is not None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(out)


def _read_config(base_dir: Path, trust_remote_code: bool = False):
    """The base's config. A model with its own code runs it only if trusted, and is read as a plain config
    otherwise (unset, transformers would ask on the terminal)."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        return AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        return PretrainedConfig.from_json_file(str(Path(base_dir) / "config.json"))


@dataclass
class Verification:
    diff: float  # max |logits(merged) − logits(base + adapter)|, both run in fp32
    rounding: float  # what storing base + adapter in the merged dtype alone changes: 0 for float32
    scale: float  # max |logits(base + adapter)|
    dtype: str  # the merged weights' dtype

    @property
    def allowed(self) -> float:
        return 2 * self.rounding + 1e-3 * max(self.scale, 1.0)

    @property
    def ok(self) -> bool:
        return self.diff <= self.allowed


def adapter_base(adapter_dir, config: AdapterConfig, base: str | None, allow_pickle: bool = False,
                 status=None) -> ModelSource:
    """The model an adapter goes onto: --base, else the base it names (a moved or deleted folder, then: the error
    says where the name came from), at the revision it names (PEFT records the base's revision; its auto-loader
    loads that one), also when --base names the same Hub id."""
    ref = base or config.base_model_name_or_path
    if not ref:
        raise UserError(f"{adapter_dir} does not name its base model; pass --base MODEL")
    try:
        source = resolve_model(ref, allow_pickle)
    except UserError as e:
        if base:
            raise
        raise UserError(f"{e} (the base the adapter names in its base_model_name_or_path; --base MODEL gives "
                        "another)", e.exit_code) from None
    if config.revision and ref == config.base_model_name_or_path:
        if source.kind == "hub":
            source = dataclasses.replace(source, revision=config.revision)
        elif status:
            status(f"note: the adapter was trained on revision {config.revision!r} of its base; {ref} is a local "
                   "copy, merged as it is")
    return source


def verify_merge(adapter_dir: str | Path, merged_dir: str | Path, base: str | None = None,
                 prompts: tuple[str, ...] = ("Hello, how are you?", "The capital of France is", "1, 2, 3,"),
                 allow_pickle: bool = False, trust_remote_code: bool = False) -> Verification:
    """The merged model's logits against the base with the adapter on a few prompts, both in fp32, and the
    difference that rounding base + adapter to the merged dtype explains (measured: the in-memory merge,
    rounded)."""
    from lora_cli.lora.adapter import load_adapter
    from lora_cli.lora.inject import merge_lora
    from lora_cli.models import load_model, load_tokenizer

    source = adapter_base(adapter_dir, read_adapter_config(adapter_dir), base, allow_pickle)
    tok = load_tokenizer(source, trust_remote_code)
    with_adapter = load_model(source, torch.float32, trust_remote_code, allow_pickle).eval()
    load_adapter(with_adapter, adapter_dir)
    merged = load_model(resolve_model(str(merged_dir)), torch.float32, trust_remote_code).eval()
    floats = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    stored = Counter(floats[t["dtype"]] for s in weight_shards(Path(merged_dir))
                     for t in read_safetensors_header(Path(merged_dir) / s)[0].values() if t["dtype"] in floats)
    dtype = stored.most_common(1)[0][0] if stored else torch.float32
    ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
    with torch.no_grad():
        want = [with_adapter(input_ids=x).logits for x in ids]
        diff = max((merged(input_ids=x).logits - w).abs().max().item() for x, w in zip(ids, want))
        rounding = 0.0
        if dtype != torch.float32:
            del merged
            merge_lora(with_adapter)
            for p in with_adapter.parameters():
                p.copy_(p.to(dtype).float())
            rounding = max((with_adapter(input_ids=x).logits - w).abs().max().item() for x, w in zip(ids, want))
    return Verification(diff, rounding, max(w.abs().max().item() for w in want), str(dtype).replace("torch.", ""))
