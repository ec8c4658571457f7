"""`lora export`: a small shareable PEFT adapter (cast to float16 by default) with a model card."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch

from lora_cli.errors import UserError, atomic_dir, cast_finite, check_output, mark
from lora_cli.inspection import adapter_facts, eval_loss_text
from lora_cli.lora.adapter import base_copies, read_adapter_tensors, write_adapter
from lora_cli.lora.peft_format import GGUF_BASE_KEY, KEY_PREFIX, read_adapter_config


def base_size_bytes(ref: str | None) -> int | None:
    """On-disk size of a local base model (safetensors files, or the .gguf file), else None."""
    if not ref:
        return None
    p = Path(ref)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors")) or None
    return None


def export_adapter(adapter_dir: str | Path, output: str | Path, dtype: torch.dtype = torch.float16,
                   force: bool = False) -> dict:
    """Write adapter_config.json, adapter_model.safetensors (in `dtype`) and README.md to `output`."""
    output = Path(output)
    config = read_adapter_config(adapter_dir)
    held = check_output(output, force, reads=(adapter_dir, config.base_model_name_or_path))  # noqa: F841 (kept)
    tensors = {KEY_PREFIX + k: cast_finite(v, dtype, k).contiguous() for k, v in read_adapter_tensors(adapter_dir).items()}
    # the base weights PEFT saved beside a head's LoRA: PEFT loads them over the base's, so they stay, as stored
    tensors.update({KEY_PREFIX + k: v.contiguous() for k, v in base_copies(adapter_dir).items()})
    facts = adapter_facts(adapter_dir)
    meta = {GGUF_BASE_KEY: str(config.base_model_name_or_path)} if facts["base_is_gguf"] else {}
    with atomic_dir(output) as tmp:
        write_adapter(tmp, config, tensors, meta)
        (tmp / "README.md").write_text(model_card(facts, adapter_dir, dtype), encoding="utf-8")
        keep_chat_template(adapter_dir, tmp)
    size = (output / "adapter_model.safetensors").stat().st_size
    return {"output": str(output), "size_bytes": size, "base_size_bytes": base_size_bytes(config.base_model_name_or_path)}


def keep_chat_template(adapter_dir: str | Path, out: Path) -> None:
    """An adapter trained with its own chat template (--chat-template, or ours for a base without one) carries
    it as chat_template.jinja: `lora generate` and `lora merge` of the export prompt the way it trained."""
    from lora_cli.config import run_chat_template
    from lora_cli.data import CHAT_TEMPLATE_FILE

    template = run_chat_template(adapter_dir)
    if template:
        (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")


def model_card(facts: dict, adapter_dir: str | Path, dtype: torch.dtype) -> str:
    """A Hugging Face style README for the adapter."""
    from lora_cli.config import run_settings

    base = facts["base_model_name_or_path"]
    s = facts.get("train_summary") or {}
    cfg = run_settings(adapter_dir)  # of the run, for a checkpoint
    gguf_note = ("\n> The base was a GGUF file, dequantized on load: these weights were trained against the "
                 "dequantized model, not the Hub's original weights.\n" if facts["base_is_gguf"] else "")
    hub_base = hub_id_of(str(base)) if base else "BASE_MODEL"
    local_note = (f"\n`BASE_MODEL` is the model this adapter was trained on: here the local folder `{base}`; elsewhere, "
                  "its Hub id or a copy of it.\n" if hub_base == "BASE_MODEL" and base and not facts["base_is_gguf"]
                  else "")
    serve_note = ("\n`BASE_MODEL` here is the Hub model the GGUF file was converted from (vLLM serves LoRA on the "
                  "original weights).\n" if facts["base_is_gguf"] and hub_base == "BASE_MODEL" else "")
    serving = _serving(facts, hub_base)
    hub_meta = "" if hub_base == "BASE_MODEL" else f"base_model: {hub_base}\n"  # the Hub links it; a local path it refuses
    gguf = Path(str(base)) if facts["base_is_gguf"] and base else None  # transformers reads a GGUF by folder + file name
    load = (f'AutoModelForCausalLM.from_pretrained("{gguf.parent}", gguf_file="{gguf.name}")' if gguf
            else f'AutoModelForCausalLM.from_pretrained("{hub_base}"'
            + (f', revision="{facts["revision"]}")' if facts.get("revision") else ")"))

    def num(x, fmt=".4f"):
        return format(x, fmt) if isinstance(x, (int, float)) else "n/a"

    return f"""---
library_name: peft
{hub_meta}tags: [lora, peft, lora-cli]
---

# LoRA adapter for `{base}`
{gguf_note}
| | |
|---|---|
| base model | `{base}` |
| rank / alpha | {facts['r']} / {facts['lora_alpha']:g} (scaling {facts['scaling']:.4g}{', rsLoRA' if facts['use_rslora'] else ''}) |
| targets | {', '.join(f'`{k}` ×{v}' for k, v in facts['modules'].items())} |
| trainable parameters | {facts['trainable_params']:,} |
| weights dtype | {str(dtype).replace('torch.', '')} |
| training data | `{cfg.get('data', 'n/a')}` |
| steps | {s.get('steps', 'n/a')} |
| final train loss | {num(s.get('final_loss'))} |
| eval loss | {eval_loss_text(s) or 'n/a'} |

Made with [`lora`](https://pypi.org/project/lora-cli/), saved in PEFT's format.

## Use it
{local_note}
```bash
lora generate --model {gguf or hub_base} --adapter path/to/this/folder --prompt "Hello"
```

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained({load}, "path/to/this/folder")
```

{serving}{serve_note if "BASE_MODEL" in serving else ""}"""


HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")  # ORG/NAME or NAME, as the Hub names models


def hub_id_of(base: str) -> str:
    """The Hub id to load `base` by: itself if it is one and no local folder; a folder in the Hugging Face cache
    (…/models--ORG--NAME/snapshots/REV) is ORG/NAME, even once gone; another local path is BASE_MODEL, for the
    reader to fill."""
    cached = re.search(r"(?:^|/)models--([^/]+)/snapshots/[^/]+/?$", base.replace(os.sep, "/"))
    if cached:
        return cached.group(1).replace("--", "/", 1)  # (models--gpt2: gpt2)
    if Path(base).expanduser().exists() or not HUB_ID.fullmatch(base) or ".." in base or base.lower().endswith(".gguf"):
        return "BASE_MODEL"
    return base


# the values vLLM's --max-lora-rank accepts (vllm/config/lora.py, MaxLoRARanks; 1 only in recent versions)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _serving(facts: dict, hub_base: str) -> str:
    """How to serve the adapter with vLLM, or what to do first where vLLM would refuse it or scale it wrongly."""
    if facts["use_dora"] or facts.get("modules_to_save"):
        what = "DoRA" if facts["use_dora"] else "layers saved whole (modules_to_save)"
        return (f"vLLM cannot serve an adapter with {what}: merge it into the base and serve the merged model.\n\n"
                "```bash\nlora merge path/to/this/folder --output merged\nvllm serve merged\n```\n")
    rank = max(int(k) for k in facts["ranks"]) if facts["ranks"] else facts["r"]
    slot = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if slot is None:
        return (f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]} and this adapter's is {rank}: merge it into "
                "the base and serve the merged model, or lower its rank (`lora resize`).\n")
    serve = (f"```bash\nvllm serve {hub_base} --enable-lora --lora-modules my-adapter=path/to/this/folder "
             f"--max-lora-rank {slot}\n```\n")
    if facts["use_rslora"] or facts["rank_pattern"] or facts["alpha_pattern"]:
        why = "rsLoRA" if facts["use_rslora"] else "per-layer ranks or alphas"
        return (f"vLLM computes one alpha / r for the whole adapter, so this one ({why}) would be scaled wrongly: "
                "export a portable copy first (the scaling folded into B) and serve that.\n\n"
                "```bash\nlora export path/to/this/folder --portable --output portable\n```\n\n"
                + serve.replace("path/to/this/folder", "portable"))
    return serve


# ---------------------------------------------------------------- portable and llama.cpp exports

def portable_factors(adapter_dir: str | Path):
    """Scaling folded into B, one rank for every module (zero padding), r = lora_alpha, no rsLoRA or
    patterns: what servers that assume a single global alpha / r (vLLM, llama.cpp) compute correctly."""
    from lora_cli.algebra import Factors, read_factors

    config, factors = read_factors(adapter_dir)
    r = max(f.a.shape[0] for f in factors.values())
    padded = {}
    for m, f in factors.items():
        k = f.a.shape[0]
        padded[m] = Factors(torch.cat([f.a, torch.zeros(r - k, f.a.shape[1])]),
                            torch.cat([f.b, torch.zeros(f.b.shape[0], r - k)], dim=1))
    portable = dataclasses.replace(config, r=r, lora_alpha=float(r), lora_dropout=0.0, use_rslora=False,
                                   rank_pattern={}, alpha_pattern={})
    return portable, padded


def export_portable(adapter_dir: str | Path, output: str | Path, dtype: torch.dtype, force: bool) -> dict:
    from lora_cli.algebra import write_factors

    output = Path(output)
    config, factors = portable_factors(adapter_dir)
    facts = adapter_facts(adapter_dir)
    write_factors(output, config, factors, dtype=dtype, force=force, reads=(adapter_dir,))
    (output / "README.md").write_text(model_card(adapter_facts(output) | {"train_summary": facts.get("train_summary")},
                                                 adapter_dir, dtype), encoding="utf-8")
    keep_chat_template(adapter_dir, output)
    return {"output": str(output), "size_bytes": (output / "adapter_model.safetensors").stat().st_size,
            "base_size_bytes": base_size_bytes(config.base_model_name_or_path)}


# model_type → (llama.cpp architecture, whether llama.cpp permutes the rows of Q and K): its converter
# permutes for the models it reads as LlamaModel (Llama, Mistral, Mixtral) and for no other of these.
GGUF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "mixtral": ("llama", True),
              "qwen2": ("qwen2", False), "qwen3": ("qwen3", False), "gemma": ("gemma", False),
              "gemma2": ("gemma2", False), "gemma3_text": ("gemma3", False), "phi3": ("phi3", False)}


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row permutation of Llama Q/K weights (rotary pairs interleaved → halves), rows only."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(adapter_dir: str | Path, output: str | Path, base: str | None, dtype: torch.dtype,
                force: bool, status=None) -> dict:
    """A llama.cpp LoRA adapter (GGUF): tensors `blk.N.attn_q.weight.lora_a/.lora_b`, alpha = r with the
    scaling folded into B, and lora_b of Q/K permuted the way llama.cpp permutes the base weights."""
    import json

    try:
        import gguf
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'lora-cli[gguf]'") from None
    from lora_cli.errors import atomic_path
    from lora_cli.merging import adapter_base, base_directory
    from lora_cli.models import other_architecture

    output = Path(output)
    config, factors = portable_factors(adapter_dir)
    source = adapter_base(adapter_dir, config, base, allow_pickle=True)  # its config.json alone is read
    check_output(output, force, file=(b"GGUF", "a GGUF file"), ours=_gguf_we_wrote,
                 reads=(adapter_dir, source.path if source.kind != "hub" else None))
    hp = json.loads((base_directory(source) / "config.json").read_text())
    model_type = hp.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise UserError(f"--format gguf supports {', '.join(sorted(GGUF_ARCHS))} bases; this base is "
                        f"{model_type!r}. Merge instead (`lora merge`) and convert the merged model with llama.cpp")
    skeleton = _check_fits(factors, base_directory(source))
    warning = base and other_architecture(config.base_model_name_or_path, model_type, "--base", "exports")
    if warning and status:  # (the llama adapter written as a qwen2 one: its Q/K rows not permuted)
        status(warning)
    head = skeleton.get_output_embeddings() if skeleton is not None else None
    tied = head is not None and head.weight is skeleton.get_input_embeddings().weight
    on_head = [m for m in factors if tied and skeleton.get_submodule(m) is head]
    if on_head:  # llama.cpp finds no tensor for them: the GGUF of a tied base has token_embd and no output
        raise UserError(f"the adapter has LoRA on {on_head[0]}, which this base ties to its embeddings; llama.cpp "
                        "loads such a base without an output tensor, so it cannot apply the adapter. Merge instead "
                        "(`lora merge`, which unties the head) and convert the merged model with llama.cpp")
    arch, permute = GGUF_ARCHS[model_type]
    n_head, n_kv = hp["num_attention_heads"], hp.get("num_key_value_heads") or hp["num_attention_heads"]
    names = gguf.get_tensor_name_map(_arch_enum(gguf, arch), hp["num_hidden_layers"])
    qtype = {torch.float16: gguf.GGMLQuantizationType.F16, torch.float32: gguf.GGMLQuantizationType.F32,
             torch.bfloat16: gguf.GGMLQuantizationType.BF16}[dtype]  # (as llama.cpp's convert_lora_to_gguf.py)
    tensors = []
    for module, f in sorted(factors.items()):
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"llama.cpp has no tensor for {module}")
        b = f.b
        if permute and module.endswith("q_proj"):
            b = llama_permute(b, n_head)
        elif permute and module.endswith("k_proj"):
            b = llama_permute(b, n_kv)
        tensors += [(name + ".lora_a", cast_finite(f.a, dtype, f"{module} lora_A")),
                    (name + ".lora_b", cast_finite(b, dtype, f"{module} lora_B (scaling folded in)"))]
    with atomic_path(output) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        for key, value in mark().items():  # (what --force may replace)
            w.add_string(key, value)
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.lora_alpha))
        for name, t in tensors:
            data = gguf.quants.quantize(t.to(torch.float32).numpy(), qtype)  # (bfloat16: bytes, rounded to even)
            w.add_tensor(name, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.BF16 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"output": str(output), "size_bytes": output.stat().st_size, "base_size_bytes": base_size_bytes(source.ref)}


def _check_fits(factors: dict, base_dir: Path):
    """The adapter's (out, in) per module against the base's layers (built from its config on the meta device:
    no weights read), as merge and generate check them; llama.cpp would only fail on load. Returns that
    skeleton (None where it cannot be built without remote code)."""
    from lora_cli.lora.layer import is_linear_like, linear_shape
    from lora_cli.merging import meta_model

    skeleton = meta_model(base_dir)
    if skeleton is None:
        return
    layers, problems = dict(skeleton.named_modules()), []
    for module, f in sorted(factors.items()):
        layer = layers.get(module)
        want = [f.b.shape[0], f.a.shape[1]]
        if layer is None or not is_linear_like(layer):
            problems.append(f"{module}: no such linear layer in the base")
        elif (have := list(linear_shape(layer))[::-1]) != want:
            problems.append(f"{module}: base weight {have}, adapter gives {want}")
    if problems:
        raise UserError("the adapter does not fit this base model: " + "; ".join(problems[:6]))
    return skeleton


def _gguf_we_wrote(path: Path) -> bool:
    import gguf

    from lora_cli.errors import MARK

    try:
        return MARK in gguf.GGUFReader(str(path)).fields
    except Exception:  # not a readable GGUF
        return False


def _arch_enum(gguf, arch: str):
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
